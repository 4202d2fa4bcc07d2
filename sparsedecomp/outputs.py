"""The one writer of a run's output folder: atomic files, strict JSON, a manifest of what the run wrote.

Guarantees, for every command that writes a folder:

* **Atomic files.** Each file is written to a temporary file in the same folder and renamed over its final name
  (``os.replace``), so a kill leaves either the old file or the new one, never a truncated one. Files get the
  usual ``0666 & ~umask`` mode (a bare ``mkstemp`` would leave them ``0600``).
* **A manifest.** ``manifest.json`` lists every file of the run (size, SHA-256), the command and its settings,
  and ``"complete"``. It is rewritten with ``"complete": false`` before the first file is replaced and after each
  file (still listing the earlier run's files), and with ``true`` only after the last, so a folder from an
  interrupted run says so and the next run knows every file either run wrote.
* **No mixing of runs.** Files that an earlier run in the same folder wrote and this run did not (say residual
  codes from a ``--space both`` run, when this one is ``--space z``) are deleted when the run completes, so the
  folder holds exactly one run; so are temporary files a killed run left behind. A non-empty folder without a manifest holds someone else's files and is refused,
  as is an ``--out`` that is an existing file or an empty path.
* **Strict JSON.** NaN and infinities become ``null`` (``json`` would write the invalid tokens ``NaN`` /
  ``Infinity``); tensors and numpy scalars become lists and numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sparsedecomp-run/1"
_TMP_SUFFIX = ".sparsedecomp-tmp"


def check_output_folder(out_dir: str | Path | None) -> Path:
    """The output folder as a path, after refusing an empty value, an existing file, or a non-empty folder that
    no sparsedecomp run wrote (it would be mixed with, or cleaned of, someone else's files)."""
    if out_dir is None or str(out_dir).strip() == "":
        raise InputError("the output folder is empty: give a folder path (e.g. --out results/)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"the output folder {out} is an existing file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise InputError(f"the output folder {out} is not empty and holds no {MANIFEST_NAME} from an earlier "
                         "sparsedecomp run; give a new or empty folder so no one else's files are overwritten")
    # Fail now, not after a long solve: the folder (or the nearest existing parent it will be made in) must be
    # a writable directory.
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"the output folder {out} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"the output folder {out} cannot be written: no write permission on {existing}")
    return out


class RunWriter:
    """Writes one run's files into ``out_dir`` (see the module docstring for the guarantees).

    Use as a context manager: files are written with :meth:`write_json`, :meth:`write_text` or :meth:`write_with`;
    on a clean exit the stale files of an earlier run are removed and the manifest is completed.
    """

    def __init__(self, out_dir: str | Path, *, command: str, settings: Mapping[str, Any] | None = None) -> None:
        self.out = check_output_folder(out_dir)
        self.command = command
        self.settings = dict(settings or {})
        self.files: dict[str, dict[str, Any]] = {}
        self._previous = _read_manifest_files(self.out)
        self._started = time.time()

    def __enter__(self) -> "RunWriter":
        self.out.mkdir(parents=True, exist_ok=True)
        for leftover in self.out.glob(f".*{_TMP_SUFFIX}"):  # from a run that was killed mid-write
            leftover.unlink(missing_ok=True)
        # Claim the folder first: an interrupted run leaves a manifest that says it is incomplete and still
        # lists the earlier run's files, so the next run can clean them.
        self._write_manifest(complete=False, extra_files=self._previous)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return  # leave the incomplete manifest; nothing half-written was renamed into place
        for name in set(self._previous) - set(self.files):
            stale = self.out / name
            if stale.is_file():
                stale.unlink()
        self._write_manifest(complete=True)

    # -- writing ---------------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        if "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST_NAME):
            raise InputError(f"output file name {name!r} must be a plain file name other than {MANIFEST_NAME}")
        return self.out / name

    def write_with(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write file ``name`` atomically: ``write(tmp_path)`` fills a temporary file that is then renamed."""
        final = self.path(name)
        _atomic(final, write)
        self.files[name] = {"bytes": final.stat().st_size, "sha256": _sha256(final)}
        # Record it at once: if the run dies later, the next run still knows this file is a run's, not a user's.
        self._write_manifest(complete=False, extra_files=self._previous)
        return final

    def write_text(self, name: str, text: str) -> Path:
        return self.write_with(name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_json(self, name: str, value: Any) -> Path:
        return self.write_text(name, dumps_strict(value) + "\n")

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
        }
        _atomic(self.out / MANIFEST_NAME, lambda tmp: tmp.write_text(dumps_strict(manifest, indent=1) + "\n"))


def dumps_strict(value: Any, *, indent: int | None = None) -> str:
    """JSON text that every parser accepts: non-finite floats become ``null``, tensors become lists."""
    separators = None if indent is not None else (",", ":")
    return json.dumps(to_json_ready(value), indent=indent, separators=separators, allow_nan=False)


def to_json_ready(value: Any) -> Any:
    """``value`` with tensors / numpy values / paths converted and NaN or infinite floats replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_json_ready(value.tolist())
    if hasattr(value, "item"):
        return to_json_ready(value.item())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic(final: Path, write: Callable[[Path], None]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _read_manifest_files(out: Path) -> dict[str, Any]:
    """The files an earlier run recorded in ``out`` (empty if none); a manifest we cannot read is refused."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a readable sparsedecomp manifest ({err}); remove it or use a new folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise InputError(f"{path} is not a sparsedecomp run manifest (format {MANIFEST_FORMAT!r}); use a new folder")
    return {name: meta for name, meta in manifest["files"].items() if "/" not in name and name != MANIFEST_NAME}
