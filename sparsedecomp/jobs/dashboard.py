"""The ``dashboard`` job (also the demo's): gather the dashboard data in one pass and write the site
(:mod:`sparsedecomp.dashboards`) through the one writer, with an evaluation report beside it as the site's analysis
page. The maths lives in the dashboards package."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError
from ..outputs import MANIFEST_NAME, RunWriter


def write_dashboards(model, tokens, head_saes, concat, decompositions, out, *, progress: bool = False,
                     tokenizer=None, analysis_href: str | None = None, context: dict | None = None,
                     neuronpedia: bool = True, exclude_bos: bool = True, ignore_tokens: Sequence[int] | None = None,
                     log: Callable[[str], None] = print, writer: RunWriter | None = None,
                     parts: Sequence[str] = (), command: str = "dashboard"):
    """Gather the dashboard data in one pass and write the site into ``out`` (sparsedecomp.dashboards) through a
    :class:`~sparsedecomp.outputs.RunWriter` (``writer``, when the caller already holds the folder's). Tokens are
    shown through ``tokenizer`` (default: the model's; ``<id>`` without one); ``analysis_href`` (relative to ``out``)
    links the site's analysis page, and ``parts`` names sub-folders written by their own runs that the site's manifest
    covers (an evaluation report); ``command`` names the run in its manifest. Position 0 (``exclude_bos``) and the ``ignore_tokens`` ids (default: the
    tokenizer's special tokens, :func:`~sparsedecomp.loading.models.special_token_ids`) are left out of every statistic and example; the front page
    says which. Returns the :class:`~sparsedecomp.dashboards.site.DashboardSite`."""
    from functools import lru_cache

    from ..activations import hooked_transformer
    from ..dashboards.gather import gather_dashboard_data
    from ..loading.models import special_token_ids
    from ..dashboards.site import write_site

    hooked = hooked_transformer(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(hooked, "tokenizer", None)

    @lru_cache(maxsize=None)
    def token_str(i: int) -> str:
        # special tokens shown as themselves (tokenizers.Tokenizer.decode skips them by default)
        return tokenizer.decode([i], skip_special_tokens=False) if tokenizer is not None else f"<{i}>"

    ignore_tokens = special_token_ids(tokenizer) if ignore_tokens is None else tuple(ignore_tokens)
    left_out = (["position 0 (BOS)"] if exclude_bos else []) + [f"{token_str(i)!r} (id {i})" for i in ignore_tokens]
    context = {**(context or {}), "left out of every statistic": ", ".join(left_out) or "nothing"}
    own = writer is None
    if own:
        writer = RunWriter(out, command=command, settings={"decompositions": sorted(decompositions)})
    t0 = time.time()
    data = gather_dashboard_data(model, tokens, head_saes, concat, decompositions, progress=progress,
                                 exclude_bos=exclude_bos, ignore_tokens=ignore_tokens, log=log)
    t1 = time.time()
    log(f"dashboards: writing {sum(g.sae.d_sae for g in data.saes.values()):,} feature pages into {writer.out}")
    with writer if own else nullcontext():
        site = write_site(data, writer, token_str=token_str, model_id=str(hooked.cfg.model_name),
                          analysis_href=analysis_href, context=context, neuronpedia=neuronpedia, progress=progress)
        for part in parts:
            writer.add_part(part)
    size = sum(p.stat().st_size for p in site.out.rglob("*") if p.is_file())
    log(f"dashboards: {sum(site.n_pages.values())} feature pages ({site.batches_skipped} batches already done) in "
        f"{site.out}: gather {t1 - t0:.1f}s, write {time.time() - t1:.1f}s, {size / 2**20:.1f} MiB")
    return site


EVALUATION_REPORT_FILES = ("report.json", "report.html", "plotly.min.js")


def evaluation_report_files(folder: Path) -> dict[str, Path]:
    """The report files (:data:`EVALUATION_REPORT_FILES`) of a finished ``sparsedecomp evaluate`` run in ``folder``,
    refused by name when ``folder`` is not one (no folder, no manifest, an unfinished run, a file missing)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise InputError(f"--evaluation: no folder at {folder}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise InputError(f"--evaluation: {folder} holds no {MANIFEST_NAME}: give the --out folder of a "
                         "`sparsedecomp evaluate` run") from None
    except json.JSONDecodeError:
        raise InputError(f"--evaluation: {manifest_path} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise InputError(f"--evaluation: the run in {folder} did not finish (its {MANIFEST_NAME} is not complete)")
    listed = manifest.get("files") or {}
    missing = [name for name in EVALUATION_REPORT_FILES if name not in listed or not (folder / name).is_file()]
    if missing:
        raise InputError(f"--evaluation: {folder} is not an evaluation run: it lacks {', '.join(missing)} "
                         f"(its command was {manifest.get('command')!r})")
    return {name: folder / name for name in EVALUATION_REPORT_FILES}


def check_evaluation_matches(files: dict[str, Path], *, hook_name: str, n_heads: int, d_head: int,
                             concat_fingerprint: str | None = None) -> None:
    """Refuse a report of another site or SAE: its ``hook_name``, ``n_heads`` and ``d_head`` must be these SAEs', and
    the concat SAE's fingerprint (:func:`~sparsedecomp.jobs.inputs.sae_fingerprint`, in the report's context) this
    one's."""
    try:
        report = json.loads(files["report.json"].read_text())
    except json.JSONDecodeError:
        raise InputError(f"--evaluation: {files['report.json']} is not valid JSON") from None
    wanted = {"hook_name": hook_name, "n_heads": n_heads, "d_head": d_head}
    got = {key: report.get(key) if isinstance(report, dict) else None for key in wanted}
    if got != wanted:
        raise InputError(f"--evaluation: {files['report.json']} evaluates {got}, not these SAEs' {wanted}")
    if concat_fingerprint is not None:
        recorded = ((report.get("context") or {}) if isinstance(report, dict) else {}).get("concat_sae_fingerprint")
        if recorded != concat_fingerprint:
            raise InputError(f"--evaluation: {files['report.json']} evaluates another concat SAE (decoder fingerprint "
                             f"{recorded or 'not recorded'}, this one's {concat_fingerprint})")


def copy_evaluation_report(files: dict[str, Path], out: Path) -> None:
    """The evaluation report's files copied into ``out`` (atomically, with a manifest naming where they came
    from), so the site opens from disk on its own."""
    sources = {name: str(path.resolve()) for name, path in files.items()}
    with RunWriter(out, command="evaluate", settings={"copied_from": sources}) as writer:
        for name, path in files.items():
            writer.write_bytes(name, path.read_bytes())
