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
from typing import Any, Callable, Mapping, Protocol

from ..errors import InputError
from ..jsonio import dumps_strict
from ..naming import CONCAT_NAME, head_of
from .gather import DashboardData
from .neuronpedia import neuronpedia_batch
from .records import decomposition_links, decomposition_quality, group_links, index_table, sae_records

BATCH_SIZE = 256
STATE_NAME = "dashboard_state.json"


class SiteWriter(Protocol):
    """What :func:`write_site` needs of a writer (:class:`sparsedecomp.outputs.RunWriter` is one): the folder, files
    written under relative paths and committed at checkpoints, and files of an earlier run kept as they are."""

    out: Path

    def write_text(self, name: str, text: str) -> Path: ...

    def write_bytes(self, name: str, data: bytes) -> Path: ...

    def keep(self, name: str) -> Path: ...

    def commit(self) -> None: ...


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


def write_site(data: DashboardData, writer: SiteWriter, *, token_str: Callable[[int], str],
               render_page: Callable[..., str] = default_render_page, batch_size: int = BATCH_SIZE,
               model_id: str = "model", after_batch: Callable[[str, int], None] | None = None,
               analysis_href: str | None = None, context: Mapping[str, str] | None = None,
               neuronpedia: bool = True, progress: bool = False) -> DashboardSite:
    """Write the site for ``data`` through ``writer`` (see the module docstring). ``after_batch(sae, batch)`` is
    called after each batch is committed and recorded finished (a progress hook; tests interrupt there);
    ``context`` (what the site was built from, in words) is shown on the front page; ``neuronpedia`` writes the
    Neuronpedia batch export."""
    from tqdm.auto import tqdm

    out = writer.out
    fingerprint = _fingerprint(data, batch_size, token_str)
    state = _read_state(out / STATE_NAME)
    if state.get("fingerprint") != fingerprint:
        state = {"fingerprint": fingerprint, "finished": {}}
    _copy_assets(writer)
    links, quality = group_links(decomposition_links(data)), decomposition_quality(data)
    written = skipped = 0
    n_pages = {}
    bar = tqdm(total=sum(g.sae.d_sae for g in data.saes.values()), desc="dashboard pages", unit="page",
               disable=not progress)
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
                    writer.keep(f"{name}/f/{rec['feature']}.html")
                bar.update(len(batch))
                continue
            for rec in batch:
                writer.write_text(f"{name}/f/{rec['feature']}.html",
                                  render_page("feature", record_json=_inline_json(rec), title=rec["title"],
                                              assets="../../assets", site_root="../.."))
            writer.commit()  # the batch's pages are in place before the state says they are
            state["finished"].setdefault(name, []).append(b)
            state["finished"][name].sort()
            writer.write_text(STATE_NAME, dumps_strict(state, indent=1) + "\n")
            writer.commit()
            written += 1
            bar.update(len(batch))
            if after_batch is not None:
                after_batch(name, b)
        writer.write_text(f"{name}/features.js", "window.SD_INDEX = " + _inline_json(table) + ";\n")
        writer.write_text(f"{name}/index.html", render_page("index", sae=name, title=sae_title(name),
                                                            n_features=n_features, assets="../assets",
                                                            site_root="..", data_src="features.js"))
        if neuronpedia:
            # The batch object with its features written in as the batches made them ("features" is its last key).
            shell = dumps_strict(neuronpedia_batch(data, name, [], model_id=model_id))
            if not shell.endswith('"features":[]}'):
                raise AssertionError(f"the Neuronpedia batch object must end with its features: {shell[-40:]}")
            writer.write_text(f"neuronpedia/{name}.json", shell[:-2] + ",".join(exported) + "]}\n")
    bar.close()
    saes = [{"name": name, "n_features": n_pages[name], "href": f"{name}/index.html", "description": sae_title(name)}
            for name in data.saes]
    writer.write_text("index.html", render_page("site_index", title="Feature dashboards", saes=saes,
                                                analysis_href=analysis_href, context=dict(context or {})))
    writer.write_text(STATE_NAME, dumps_strict({**state, "complete": True}, indent=1) + "\n")
    return DashboardSite(out=out, n_pages=n_pages, batches_written=written, batches_skipped=skipped)


def sae_title(name: str) -> str:
    """How the site names an SAE in words."""
    return "concatenated-z SAE" if name == CONCAT_NAME else f"per-head SAE of head {head_of(name)}"


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


def _copy_assets(writer: SiteWriter) -> None:
    import plotly.offline

    writer.write_text("assets/plotly.min.js", plotly.offline.get_plotlyjs())
    package = resources.files("sparsedecomp.dashboards") / "assets"
    if package.is_dir():
        for item in sorted(package.iterdir(), key=lambda p: p.name):
            if item.is_file():
                writer.write_bytes(f"assets/{item.name}", item.read_bytes())


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


def _read_state(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path} is not valid JSON: remove it to rewrite every page") from None
