"""Feature-dashboard data throughput: sparsedecomp against SAEDashboard 0.8 on the same SAE, model, features and
tokens (issue 9, "How fast").

Run from the repository root in the package's environment, after ``benchmarks/saedashboard/setup.sh``::

    python -m benchmarks.saedashboard.compare --features 32 --contexts 64      # 32 features x 8,192 tokens

Both sides read the demo world: its concatenated-``z`` SAE on ``blocks.1.attn.hook_z`` (written here as a SAELens 6
folder for SAEDashboard), its model (SAEDashboard's side rebuilds it from the same folder with the same processing
flags), the first ``--contexts`` held-out contexts (one token file for both) and ``--features`` features drawn with
``--seed`` from all of them. Each side is timed after its model and SAE are loaded.

Our side, timed as one unit: one streamed pass of :class:`~sparsedecomp.dashboards.FeatureDataAccumulator`
(counts, density, top-k, a uniform sample of non-zero activations), quantile examples and activation histograms,
feature logits through ``W_O`` and ``W_U`` with their histograms, correlated features by decoder cosine, token
windows of every shown example, and DFA by source position and head of every shown example (a batch of 256
features at a time, as pages are written). It is timed twice: on the N features only (an SAE cut down to them) and
on all features of the SAE. SAEDashboard runs ``SaeVisRunner.run`` (defaults, DFA on, BOS left out) in its own
environment, through ``run_saedashboard.py``.

Throughput is feature x tokens per second. The headline ratio divides our throughput on all features by
SAEDashboard's on N (how each tool is used: ours gathers every feature in one pass); the same-work ratio divides
SAEDashboard's seconds by ours on the same N features. As a check that both did the same work, each feature's
largest activation is compared (SAEDashboard folds decoder norms into the SAE; the demo SAE's are already 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
RUNNER = HERE / "run_saedashboard.py"


@dataclasses.dataclass(frozen=True)
class Timing:
    """One side's timed run: ``n_features x n_tokens`` in ``seconds``."""

    tool: str
    n_features: int
    n_tokens: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Feature x tokens per second."""
        return self.n_features * self.n_tokens / self.seconds


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def restrict_sae(sae, features: torch.Tensor):
    """``sae`` cut down to ``features`` (their encoder columns, encoder biases and decoder rows)."""
    return dataclasses.replace(sae, W_enc=sae.W_enc[:, features].contiguous(), b_enc=sae.b_enc[features].clone(),
                               W_dec=sae.W_dec[features].clone(), log_sparsity=None,
                               transformations=(*sae.transformations, f"restricted to {len(features)} features"))


@torch.no_grad()
def our_dashboard_data(model, sae, tokens: torch.Tensor, layer: int, all_decoder_rows: torch.Tensor) -> dict[str, object]:
    """Everything our feature pages show, for every feature of ``sae``; returns the results (not timed here).

    Correlated features are ranked among ``all_decoder_rows`` (every feature of the full SAE, so that a cut-down
    SAE's neighbours are still real ones; this over-counts our cost on N features, never under-counts it)."""
    from sparsedecomp.activations import run_accumulators
    from sparsedecomp.dashboards import (FeatureDataAccumulator, correlated_features, dfa_by_source_many,
                                         example_windows, feature_logits)
    from sparsedecomp.dashboards.replay import DEFAULT_CACHE_BUDGET, KeepBatches, cache_bytes
    from sparsedecomp.dashboards.source_dfa import DFARequest

    # As gather_dashboard_data does: when the layer's activations fit the cache budget, the pass keeps its
    # batches and the DFA replays them instead of running the model again.
    accumulators = {"data": FeatureDataAccumulator(sae, "concatenated")}
    hooked = getattr(model, "model", model)
    if cache_bytes(hooked.cfg, *tokens.shape) <= DEFAULT_CACHE_BUDGET:
        accumulators["kept"] = KeepBatches()
    results = run_accumulators(model, tokens, accumulators, layer=layer)
    data, kept = results["data"], results.get("kept")
    quantiles = data.quantile_examples()
    histograms = data.activation_histograms()
    logits = feature_logits(sae.W_dec, hooked.W_O[layer], hooked.W_U)
    correlated = correlated_features(all_decoder_rows)
    # the shown examples: top-k then the quantile groups, per feature
    context = torch.cat([data.top.context, quantiles.context.flatten(1)], dim=1)
    position = torch.cat([data.top.position, quantiles.position.flatten(1)], dim=1)
    windows = example_windows(tokens, context, position)
    gathered = time.perf_counter()
    # As the pages do: every shown example's DFA by source on its window, one forward over their contexts.
    shown = context >= 0
    feature = torch.arange(sae.d_sae)[:, None].expand_as(shown)[shown]
    sources = torch.where(windows.valid[shown], windows.positions[shown], -1)
    dfa = dfa_by_source_many(model, tokens, [DFARequest(sae=sae, context=context[shown], position=position[shown],
                                                        feature=feature, sources=sources)], layer=layer,
                              kept=kept)
    return {"data": data, "quantiles": quantiles, "histograms": histograms, "logits": logits,
            "correlated": correlated, "windows": windows, "dfa": dfa, "gathered_at": gathered}


def time_ours(model, sae, tokens: torch.Tensor, layer: int, all_decoder_rows: torch.Tensor,
              label: str) -> tuple[Timing, Timing, dict[str, object]]:
    """The whole run, and the part before the DFA of the shown examples (whose cost grows with examples shown,
    not with tokens)."""
    start = time.perf_counter()
    result = our_dashboard_data(model, sae, tokens, layer, all_decoder_rows)
    end = time.perf_counter()
    return (Timing(label, sae.d_sae, tokens.numel(), end - start),
            Timing(f"{label}, without DFA", sae.d_sae, tokens.numel(), result["gathered_at"] - start), result)


def top_outside_buffer(data, features: torch.Tensor, buffer: tuple[int, int] = (5, 5)) -> list[float]:
    """Per feature, our largest top-k activation at a position SAEDashboard may show as a top example: its
    sequence buffer (default ``(5, 5)``) keeps positions in ``[buffer[0] + 1, context_size - buffer[1])``; -inf
    when none of our top-k lies there."""
    top = data.top
    allowed = (top.position > buffer[0]) & (top.position < data.context_size - buffer[1])
    values = top.values.nan_to_num(nan=float("-inf")).masked_fill(~allowed, float("-inf"))
    return [float(v) for v in values[features].max(dim=1).values]


def run_saedashboard(work: Path, model_dir: Path, extra: list[str]) -> tuple[Timing, dict]:
    if not VENV_PYTHON.is_file():
        raise SystemExit(f"no SAEDashboard environment at {VENV_PYTHON.parent.parent}: run {HERE / 'setup.sh'}")
    out = work / "saedashboard_timing.json"
    command = [str(VENV_PYTHON), str(RUNNER), "--sae-dir", str(work / "sae"), "--model-dir", str(model_dir),
               "--inputs", str(work / "inputs.safetensors"), "--out", str(out), *extra]
    subprocess.run(command, check=True)
    result = json.loads(out.read_text())
    return Timing("SAEDashboard 0.8", result["n_features"], result["n_tokens"], result["seconds"]), result


def markdown(rows: list[Timing], reference: Timing, headline: Timing, same_work: Timing) -> str:
    lines = ["| tool | features | tokens | seconds | feature·tokens/s | vs SAEDashboard |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.tool} | {row.n_features:,} | {row.n_tokens:,} | {row.seconds:.2f} | "
                     f"{row.throughput:,.0f} | {row.throughput / reference.throughput:.1f}x |")
    lines += ["", f"Headline ratio (throughput, ours on all {headline.n_features:,} features / SAEDashboard on "
              f"{reference.n_features}): **{headline.throughput / reference.throughput:.0f}x**. "
              f"Same-work ratio (seconds, both on the same {same_work.n_features} features): "
              f"**{reference.seconds / same_work.seconds:.1f}x**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=32, help="features SAEDashboard computes (default 32)")
    parser.add_argument("--contexts", type=int, default=64, help="128-token held-out contexts (default 64: 8,192)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the feature draw")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/saedashboard"))
    parser.add_argument("--no-dfa", action="store_true", help="run SAEDashboard without its DFA")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from sparsedecomp.demo import demo_tokens
    from sparsedecomp.demo.layout import ARTIFACTS_DIR, MODEL_DIR
    from sparsedecomp.demo.world import concat_sae_path
    from sparsedecomp.loading import load_model, load_sae, save_saelens6

    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = ARTIFACTS_DIR / MODEL_DIR
    model = load_model(model_dir)
    folder, version = concat_sae_path()
    sae = load_sae(folder, version=version)
    layer = sae.layer
    tokens = demo_tokens(args.contexts).tokens.long()
    features = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(args.seed))[:args.features]
    features = features.sort().values
    save_saelens6(sae, args.out / "sae")  # writes cfg.metadata.hook_name; the runner copies it to cfg.hook_name
    save_file({"tokens": tokens.contiguous(), "features": features}, str(args.out / "inputs.safetensors"))

    load_before = uptime()
    ours_n, ours_n_gather, result_n = time_ours(model, restrict_sae(sae, features), tokens, layer, sae.W_dec,
                                   "sparsedecomp (N features)")
    ours_all, ours_all_gather, _ = time_ours(model, sae, tokens, layer, sae.W_dec, "sparsedecomp (all features)")
    theirs, their_result = run_saedashboard(args.out, model_dir, ["--no-dfa"] if args.no_dfa else [])
    load_after = uptime()

    # SAEDashboard rounds shown activations to 4 decimals and never picks a top example within its buffer of the
    # context's ends, so it is compared with our largest activation outside that buffer
    ours_max = top_outside_buffer(result_n["data"], torch.arange(len(features)))
    their_max = [their_result["top_max"][str(int(f))] for f in features]
    diffs = [abs(a - b) / max(abs(b), 1e-3) for a, b in zip(ours_max, their_max) if a != float("-inf")]
    diff, n_compared = max(diffs, default=float("nan")), len(diffs)
    rows = [theirs, ours_n, ours_n_gather, ours_all, ours_all_gather]
    table = markdown(rows, theirs, ours_all, ours_n)
    report = "\n".join([
        f"SAE: demo concat SAE ({sae.d_sae} features on {sae.hook_name}); tokens: {args.contexts} demo held-out "
        f"contexts x {tokens.shape[1]} = {tokens.numel():,}; features: {args.features} drawn with seed {args.seed}; "
        f"SAEDashboard DFA {'off' if args.no_dfa else 'on'}; torch threads {torch.get_num_threads()}.",
        "", table, "",
        f"Check: largest top-example activation per feature (outside SAEDashboard's (5, 5) sequence buffer), "
        f"{n_compared} of {len(features)} features compared, max relative difference {diff:.2e}.",
        f"uptime before: {load_before}", f"uptime after: {load_after}",
    ])
    print(report)
    (args.out / "comparison.md").write_text(report + "\n")
    (args.out / "comparison.json").write_text(json.dumps({
        "rows": [dict(dataclasses.asdict(t), throughput=t.throughput) for t in rows],
        "headline_ratio": ours_all.throughput / theirs.throughput,
        "same_work_ratio": theirs.seconds / ours_n.seconds,
        "max_activation_rel_diff": diff, "max_activation_compared": n_compared, "features": features.tolist(), "contexts": args.contexts,
        "saedashboard": {k: v for k, v in their_result.items() if k != "top_max"},
        "uptime_before": load_before, "uptime_after": load_after, "argv": sys.argv[1:],
    }, indent=2))


if __name__ == "__main__":
    main()
