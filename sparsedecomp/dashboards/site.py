"""Write the dashboard site (docs/dashboards.md, "Site layout") with :class:`~sparsedecomp.outputs.RunWriter`'s
guarantees: every file is written atomically (a temporary file renamed into place); feature pages go out in batches
of :data:`BATCH_SIZE`, and a batch is recorded as finished in ``dashboard_state.json`` only after all its pages are
written. A rerun over the same data skips the finished batches, so an interrupted run, rerun, leaves the same bytes
as an uninterrupted one (nothing in any file depends on time or on which run wrote it).

Pages render through ``render_page(kind, **context)`` (``kind`` is ``"feature"``, ``"index"`` or ``"site_index"``),
by default the package templates ``dashboard/<kind>.html.j2``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import InputError
from ..outputs import _atomic, check_output_folder, dumps_strict
from .gather import DashboardData
from .neuronpedia import neuronpedia_batch
from .records import decomposition_links, decomposition_quality, group_links, index_table, sae_records

BATCH_SIZE = 256
STATE_NAME = "dashboard_state.json"
MANIFEST_NAME = "manifest.json"


def default_render_page(kind: str, **context: Any) -> str:
    from ..rendering import render

    return render(f"dashboard/{kind}.html.j2", **context)


@dataclass(frozen=True)
class DashboardSite:
    """What :func:`write_site` wrote: the folder, pages per SAE, batches written now and skipped as finished."""

    out: Path
    n_pages: dict[str, int]
    batches_written: int
    batches_skipped: int


SITE_FORMAT = "sparsedecomp-dashboards/1"


def claim_site_folder(out_dir: str | Path) -> Path:
    """``out_dir`` checked (new, empty, or an earlier site's: another command's run folder is refused), made, and
    marked unfinished (``"complete": false``, keeping the earlier site's file list so its stale files can be
    removed at the end). An interrupted run's folder is so recognised (and resumed) by the next one, a finished site
    being rewritten never says it is complete while half of it is new, and a caller may write beside the pages (an
    evaluation report in ``out_dir/evaluation/``) before they are written."""
    out = check_output_folder(out_dir)
    previous = _read_manifest(out)
    if previous and previous.get("format") != SITE_FORMAT:
        raise InputError(f"the output folder {out} holds a `sparsedecomp {previous.get('command', '?')}` run, not a "
                         "dashboards site: give a new or empty folder (or that of an earlier dashboards run)")
    out.mkdir(parents=True, exist_ok=True)
    claim = {"format": SITE_FORMAT, "complete": False, "files": dict(previous.get("files") or {})}
    _atomic(out / MANIFEST_NAME, lambda tmp: tmp.write_text(dumps_strict(claim, indent=1) + "\n"))
    return out


def write_site(data: DashboardData, out_dir: str | Path, *, token_str: Callable[[int], str],
               render_page: Callable[..., str] = default_render_page, batch_size: int = BATCH_SIZE,
               model_id: str = "model", after_batch: Callable[[str, int], None] | None = None,
               analysis_href: str | None = None, context: Mapping[str, str] | None = None,
               neuronpedia: bool = True) -> DashboardSite:
    """Write the site for ``data`` into ``out_dir`` (see the module docstring). ``after_batch(sae, batch)`` is
    called after each batch is recorded finished (a progress hook; tests interrupt there); ``context`` (what the site
    was built from, in words) is shown on the front page; ``neuronpedia`` writes the Neuronpedia batch export (as
    large as the pages again: the demo leaves it out)."""
    out = claim_site_folder(out_dir)
    previous_files = set(_read_manifest(out).get("files") or {})
    for leftover in out.rglob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    fingerprint = _fingerprint(data, batch_size, token_str)
    state = _read_state(out / STATE_NAME)
    if state.get("fingerprint") != fingerprint:
        state = {"fingerprint": fingerprint, "finished": {}}
    files: dict[str, int] = {}

    def write(rel: str, text: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        files[rel] = path.stat().st_size

    _copy_assets(out, files)
    links, quality = group_links(decomposition_links(data)), decomposition_quality(data)
    written = skipped = 0
    n_pages = {}
    for name in data.saes:
        n_features = data.saes[name].sae.d_sae
        n_pages[name] = n_features
        finished = set(state["finished"].get(name, []))
        table: dict[str, Any] | None = None
        exported: list[str] = []  # the Neuronpedia export's features, as JSON text, a batch at a time
        # One batch of records at a time: a finished batch's are rebuilt only for the index and the export.
        for b, start in enumerate(range(0, n_features, batch_size)):
            batch = sae_records(data, name, token_str, links=links, quality=quality,
                                features=range(start, min(start + batch_size, n_features)))
            part = index_table(batch)
            table = part if table is None else {**table, "rows": table["rows"] + part["rows"]}
            if neuronpedia:
                exported += [json.dumps(f, separators=(",", ":"), allow_nan=False)
                             for f in neuronpedia_batch(data, name, batch, model_id=model_id)["features"]]
            if b in finished:
                skipped += 1
                for rec in batch:
                    rel = f"{name}/f/{rec['feature']}.html"
                    files[rel] = (out / rel).stat().st_size
                continue
            for rec in batch:
                write(f"{name}/f/{rec['feature']}.html",
                      render_page("feature", record_json=_inline_json(rec), title=rec["title"],
                                  assets="../../assets", site_root="../.."))
            state["finished"].setdefault(name, []).append(b)
            state["finished"][name].sort()
            write(STATE_NAME, dumps_strict(state, indent=1) + "\n")
            written += 1
            if after_batch is not None:
                after_batch(name, b)
        write(f"{name}/features.js", "window.SD_INDEX = " + _inline_json(table) + ";\n")
        write(f"{name}/index.html", render_page("index", sae=name, title=_sae_title(name), n_features=n_features,
                                                assets="../assets", site_root="..", data_src="features.js"))
        if neuronpedia:
            # The batch object with its features written in as the batches made them ("features" is its last key).
            shell = dumps_strict(neuronpedia_batch(data, name, [], model_id=model_id))
            if not shell.endswith('"features":[]}'):
                raise AssertionError(f"the Neuronpedia batch object must end with its features: {shell[-40:]}")
            write(f"neuronpedia/{name}.json", shell[:-2] + ",".join(exported) + "]}\n")
    saes = [{"name": name, "n_features": n_pages[name], "href": f"{name}/index.html", "description": _sae_title(name)}
            for name in data.saes]
    write("index.html", render_page("site_index", title="Feature dashboards", saes=saes, analysis_href=analysis_href,
                                    context=dict(context or {})))
    write(STATE_NAME, dumps_strict({**state, "complete": True}, indent=1) + "\n")
    _remove_stale(out, previous_files - set(files))
    manifest = {"format": SITE_FORMAT, "complete": True, "files": dict(sorted(files.items()))}
    _atomic(out / MANIFEST_NAME, lambda tmp: tmp.write_text(dumps_strict(manifest, indent=1) + "\n"))
    return DashboardSite(out=out, n_pages=n_pages, batches_written=written, batches_skipped=skipped)


def _sae_title(name: str) -> str:
    return "concatenated-z SAE" if name == "concat" else f"per-head SAE of head {name.removeprefix('head_')}"


def _inline_json(value: Any) -> str:
    """Strict JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` escaped so no token text can close
    the element. Records hold plain numbers already (non-finite ones as ``None``), so the standard encoder writes
    them, with the same bytes as :func:`~sparsedecomp.outputs.dumps_strict`; only a record holding a NaN or a
    tensor goes through that slower converter."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError):  # a NaN, or a tensor / numpy number: the strict converter handles both
        text = dumps_strict(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _copy_assets(out: Path, files: dict[str, int]) -> None:
    import plotly.offline

    assets = out / "assets"
    assets.mkdir(exist_ok=True)
    script = plotly.offline.get_plotlyjs()
    _atomic(assets / "plotly.min.js", lambda tmp: tmp.write_text(script, encoding="utf-8"))
    files["assets/plotly.min.js"] = (assets / "plotly.min.js").stat().st_size
    package = resources.files("sparsedecomp.dashboards") / "assets"
    if package.is_dir():
        for item in sorted(package.iterdir(), key=lambda p: p.name):
            if item.is_file():
                body = item.read_bytes()
                _atomic(assets / item.name, lambda tmp, body=body: tmp.write_bytes(body))
                files[f"assets/{item.name}"] = len(body)


def _fingerprint(data: DashboardData, batch_size: int, token_str: Callable[[int], str]) -> str:
    """What makes two runs the same: the features and tokens counted per SAE (and which were left out), the
    decompositions, the batch size, how tokens are shown, and the package and its page assets (a rerun after an
    upgrade rewrites every page instead of mixing formats)."""
    from .. import __version__

    h = hashlib.sha256()
    h.update(json.dumps({"batch_size": batch_size, "n_contexts": data.n_contexts, "context_size": data.context_size,
                         "saes": {n: [g.sae.d_sae, g.data.n_tokens, g.data.n_firing.sum().item(),
                                      g.data.activation_sum.sum().item(), g.data.exclude_bos,
                                      list(g.data.ignore_tokens)] for n, g in data.saes.items()},
                         "decompositions": sorted(data.decompositions), "version": __version__,
                         "tokens_shown": [token_str(i) for i in _shown_token_ids(data)]}).encode())
    package = resources.files("sparsedecomp")
    for folder in (package / "dashboards" / "assets", package / "templates" / "dashboard"):
        if folder.is_dir():
            for item in sorted(folder.iterdir(), key=lambda p: p.name):
                if item.is_file():
                    h.update(item.read_bytes())
    return h.hexdigest()[:16]


def _shown_token_ids(data: DashboardData, n: int = 64) -> list[int]:
    """A few token ids the pages show (the first windows'), to notice a change of tokenizer between runs."""
    ids = next(iter(data.saes.values())).windows.token_ids.reshape(-1)
    return ids[ids >= 0][:n].tolist()


def _read_manifest(out: Path) -> dict[str, Any]:
    """The folder's ``manifest.json`` (``{}`` when there is none)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path} is not valid JSON: give a new folder, or remove it to rewrite the site") from None
    return manifest if isinstance(manifest, dict) else {}


def _remove_stale(out: Path, names: set[str]) -> None:
    """Remove the files an earlier site listed that this one did not write (pages of features or SAEs no longer
    there, an export no longer asked for); only files inside ``out``."""
    root = out.resolve()
    for name in sorted(names):
        path = (out / name).resolve()
        if path.is_relative_to(root) and path.is_file():
            path.unlink()
            parent = path.parent
            while parent != root and not any(parent.iterdir()):  # a folder left empty goes too
                parent.rmdir()
                parent = parent.parent


def _read_state(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path} is not valid JSON: remove it to rewrite every page") from None
