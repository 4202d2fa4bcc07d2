"""The one writer of every output folder (a command's run, the dashboards site, the demo's folders): atomic files,
strict JSON, a manifest of what the run wrote, one run at a time.

Guarantees:

* **The last complete run stays until the new one is complete.** Each file is written to a temporary file beside
  its final name; the temporary files are renamed into place (``os.replace``) together when the run commits — at its
  end, or at checkpoints a long run asks for (:meth:`RunWriter.commit`: the site commits each batch of pages so a
  killed run resumes). A run that fails before its first commit (a kill, a full disk, a bug) leaves the folder as
  the last complete run left it, and its temporary files are removed by the next run. A failed write names its file.
* **A manifest.** ``manifest.json`` lists every file (path relative to the folder, size, SHA-256), the command and its
  settings, the runs nested in sub-folders (``parts``: each sub-folder's own manifest, complete, with its SHA-256) and
  ``"complete"``, which is ``true`` only when every file and every part is. Before the first rename of a commit it is
  rewritten with ``"complete": false``, still listing the earlier run's files, so an interrupted run says so and the
  next run knows every file either run wrote.
* **No mixing of runs, no lost results.** Files an earlier run in the folder wrote and this run did not are removed
  when the run completes, so the folder holds one run. A non-empty folder without a manifest holds someone else's
  files and is refused; so is a folder holding another command's run (``evaluate`` never deletes a ``decompose``
  run's results), an ``--out`` that is a file, a broken link, or an empty path.
* **One run at a time.** A run holds an exclusive lock on its folder (``.sparsedecomp.lock``, ``flock``) from the
  moment its writer is made until it completes; a second run into the same folder is refused by name.
* **Strict JSON** through :mod:`sparsedecomp.jsonio` (NaN and infinities become ``null``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InputError, OutputError
from .jsonio import dumps_strict

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sparsedecomp-run/1"
LEGACY_SITE_FORMAT = "sparsedecomp-dashboards/1"  # read, never written
LOCK_NAME = ".sparsedecomp.lock"
_TMP_SUFFIX = ".sparsedecomp-tmp"

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "RunWriter", "check_output_folder", "dumps_strict", "read_manifest"]


def _is_ours(path: Path) -> bool:
    """A file any sparsedecomp run leaves (its lock, a killed run's temporary file): not someone else's."""
    return path.name == LOCK_NAME or path.name.endswith(_TMP_SUFFIX)


def check_output_folder(out_dir: str | Path | None, *, command: str | None = None) -> Path:
    """The output folder as a path, after refusing an empty value, an existing file, a broken or looping link, a
    non-empty folder that no sparsedecomp run wrote, and (``command`` given) a folder holding another command's run."""
    if out_dir is None or str(out_dir).strip() == "":
        raise InputError("the output folder is empty: give a folder path (e.g. --out results/)")
    out = Path(out_dir)
    try:
        out.resolve(strict=False)
        exists = out.exists()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise InputError(f"the output folder {out} cannot be resolved ({err}); give a plain folder path") from None
    if out.is_symlink() and not exists:
        raise InputError(f"the output folder {out} is a broken symbolic link (to {os.readlink(out)}); give a folder")
    if exists and not out.is_dir():
        raise InputError(f"the output folder {out} is an existing file; give a folder path")
    if out.is_dir():
        manifest = read_manifest(out)
        if manifest is None and any(not _is_ours(p) for p in out.iterdir()):
            raise InputError(f"the output folder {out} is not empty and holds no {MANIFEST_NAME} from an earlier "
                             "sparsedecomp run; give a new or empty folder so no one else's files are overwritten")
        if manifest is not None and command is not None and manifest.get("command") not in (None, command):
            raise InputError(f"the output folder {out} holds a `sparsedecomp {manifest['command']}` run, which "
                             f"`sparsedecomp {command}` would replace: give a new folder (or that of an earlier "
                             f"`{command}` run)")
    # Fail now, not after a long solve: the folder (or the nearest existing parent it will be made in) must be a
    # writable directory.
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"the output folder {out} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"the output folder {out} cannot be written: no write permission on {existing}")
    return out


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The folder's manifest (``None`` when it has none); one that is not a sparsedecomp run manifest is refused."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a readable sparsedecomp manifest ({err}); remove it or use a new folder") from None
    if (isinstance(manifest, dict) and manifest.get("format") == LEGACY_SITE_FORMAT
            and isinstance(manifest.get("files"), dict)):
        # A dashboards site written before the one writer (sizes only, no command): its files are a run's.
        return {"format": MANIFEST_FORMAT, "command": None, "complete": bool(manifest.get("complete")),
                "files": {name: {"bytes": size} for name, size in manifest["files"].items()}}
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict)):
        raise InputError(f"{path} is not a sparsedecomp run manifest (format {MANIFEST_FORMAT!r}); use a new folder")
    return manifest


class _FolderLock:
    """An exclusive ``flock`` on ``folder/.sparsedecomp.lock``; refused by name when another run holds it. Where
    ``fcntl`` is missing (Windows) runs are not locked."""

    def __init__(self, folder: Path, command: str) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The file may have been removed by the run that held it between our open and our lock: then the lock
            # is on a file nobody else will see, so the folder is as good as in use.
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            holder = ""
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            raise OutputError(f"the output folder {folder} is in use by another sparsedecomp run"
                              f"{f' ({holder})' if holder else ''}: wait for it to finish or give another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, sparsedecomp {command}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class RunWriter:
    """Writes one run's files into ``out_dir`` (see the module docstring for the guarantees).

    Use as a context manager: files are written with :meth:`write_json`, :meth:`write_text` or :meth:`write_with`
    (a name may hold sub-folders: ``head_0/f/12.html``), kept from an earlier run with :meth:`keep`, and committed at
    the end (or at :meth:`commit`); on a clean exit the stale files of an earlier run are removed and the manifest is
    completed. The folder is locked from construction to exit.
    """

    def __init__(self, out_dir: str | Path, *, command: str, settings: Mapping[str, Any] | None = None) -> None:
        self.out = check_output_folder(out_dir, command=command)
        self.command = command
        self.settings = dict(settings or {})
        self.files: dict[str, dict[str, Any]] = {}
        self.parts: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, Path] = {}
        previous = read_manifest(self.out) if self.out.is_dir() else None
        self._previous: dict[str, Any] = _own_files(previous)
        self._started = time.time()
        self._lock = _FolderLock(self.out, command)
        for leftover in self.out.rglob(f"*{_TMP_SUFFIX}"):  # from a run that was killed mid-write
            leftover.unlink(missing_ok=True)
        if previous is None:
            # A new folder is claimed at once, so that what a failed run leaves in it (a finished sub-folder, say)
            # is known to be a run's; an earlier run's complete manifest stays until this run commits.
            self._write_manifest(complete=False)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._discard_pending()  # the folder keeps what was committed; the manifest says how complete
                return
            self.commit()
            for name in sorted(set(self._previous) - set(self.files)):
                self._remove_stale(name)
            self._write_manifest(complete=True)
        finally:
            self._lock.release()

    def __del__(self) -> None:  # a writer made but never entered still lets the folder go
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    # -- writing ---------------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The final path of file ``name`` (relative, inside the folder, not the manifest or the lock)."""
        parts = name.replace("\\", "/").split("/")
        if (not name or any(p in ("", ".", "..") for p in parts) or name.startswith("/")
                or name in (MANIFEST_NAME, LOCK_NAME)):
            raise InputError(f"output file name {name!r} must be a relative path inside the folder, other than "
                             f"{MANIFEST_NAME}")
        return self.out.joinpath(*parts)

    def write_with(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write file ``name``: ``write(tmp_path)`` fills a temporary file that is renamed into place at the next
        commit. Returns the final path."""
        final = self.path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"could not write {final}: {err.strerror or err}; the folder keeps its last complete "
                              "run") from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        old = self._pending.pop(name, None)
        if old is not None:
            old.unlink(missing_ok=True)
        self._pending[name] = tmp
        self.files[name] = {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
        return final

    def write_text(self, name: str, text: str) -> Path:
        return self.write_with(name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self.write_with(name, lambda tmp: tmp.write_bytes(data))

    def write_json(self, name: str, value: Any) -> Path:
        return self.write_text(name, dumps_strict(value) + "\n")

    def keep(self, name: str) -> Path:
        """Keep file ``name`` as an earlier run of this folder wrote it (recorded with its size and SHA-256)."""
        path = self.path(name)
        if not path.is_file():
            raise InputError(f"{path} cannot be kept: it is not there")
        self.files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        return path

    def add_part(self, folder: str) -> None:
        """Record the run in sub-folder ``folder`` (written by its own writer) as part of this one: its manifest
        must be complete, and this run is complete only with it."""
        manifest = read_manifest(self.path(folder))
        if manifest is None or manifest.get("complete") is not True:
            raise OutputError(f"the run in {self.path(folder)} is not complete, so {self.out} cannot be")
        self.parts[folder] = {"command": manifest.get("command"), "complete": True,
                              "manifest_sha256": _sha256(self.path(folder) / MANIFEST_NAME)}

    def commit(self) -> None:
        """Rename every file written since the last commit into place (the manifest says incomplete meanwhile)."""
        if not self._pending:
            return
        # Listed (as incomplete) before the first rename: a kill between renames leaves a manifest that names every
        # file either run may have left.
        self._write_manifest(complete=False, extra_files=self._previous)
        for name, tmp in list(self._pending.items()):
            os.replace(tmp, self.path(name))
            del self._pending[name]

    def _discard_pending(self) -> None:
        for tmp in self._pending.values():
            tmp.unlink(missing_ok=True)
        self._pending.clear()

    def _remove_stale(self, name: str) -> None:
        """Remove a file the earlier run listed and this one did not write, and folders it leaves empty (only inside
        the folder)."""
        root = self.out.resolve()
        path = (self.out / name).resolve()
        if not (path.is_relative_to(root) and path.is_file()):
            return
        path.unlink()
        parent = path.parent
        while parent != root and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def _write_manifest(self, *, complete: bool, extra_files: Mapping[str, Any] | None = None) -> None:
        from . import __version__

        files = {**(extra_files or {}), **self.files}
        manifest = {
            "format": MANIFEST_FORMAT,
            "command": self.command,
            "settings": self.settings,
            "sparsedecomp_version": __version__,
            "started_unix": round(self._started, 3),
            "finished_unix": round(time.time(), 3) if complete else None,
            "complete": complete,
            "files": dict(sorted(files.items())),
            "parts": dict(sorted(self.parts.items())),
        }
        final = self.out / MANIFEST_NAME
        fd, tmp_name = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=_TMP_SUFFIX, dir=self.out)
        os.close(fd)
        try:
            Path(tmp_name).write_text(dumps_strict(manifest, indent=1) + "\n", encoding="utf-8")
            os.chmod(tmp_name, 0o666 & ~_umask())
            os.replace(tmp_name, final)
        except OSError as err:
            Path(tmp_name).unlink(missing_ok=True)
            raise OutputError(f"could not write {final}: {err.strerror or err}") from err


def _own_files(manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """The files an earlier run's manifest lists (relative paths inside the folder)."""
    if not manifest:
        return {}
    return {name: meta for name, meta in manifest["files"].items()
            if name not in (MANIFEST_NAME, LOCK_NAME) and ".." not in name.split("/") and not name.startswith("/")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
