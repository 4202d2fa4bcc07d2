"""What the feature dashboards (:func:`sparsedecomp.dashboards.gather.gather_dashboard_data` and
:func:`sparsedecomp.dashboards.site.write_site`) cost, stage by stage, with each stage's peak RSS.

    python -m benchmarks.dashboards --size gelu-2l              # 4 random contexts of 1,024 tokens, extrapolated
    python -m benchmarks.dashboards --size demo --contexts 256  # the demo world's held-out contexts of 128 tokens
    python -m benchmarks.dashboards --size gelu-2l --device cuda --contexts 64
    python -m benchmarks.dashboards --size gemma-3-270m         # 2 random contexts of 1,024 tokens, extrapolated

Worlds (:func:`benchmarks.evaluation.build_world`): ``gelu-2l`` (random gelu-2l weights, 16,384 + 8 x 2,048
features, encoder biases calibrated to ``--l0``), ``demo`` (the demo world) or ``gemma-3-270m`` (random weights in
gemma-3-270m's geometry, JumpReLU SAEs of 16,384 + 4 x 4,096 features, thresholds calibrated to ``--l0``). One decomposition (``nn_omp``,
``n_nonzero=16, tol=0.01``, through :func:`sparsedecomp.jobs.solve.decompose_settings`) feeds the attribution
and the pages' decomposition links.

The stages are the building blocks :func:`gather_dashboard_data` calls, in its order and with its defaults (top 20,
5 quantile groups of 5: 45 shown examples a feature, window 8 left + 8 right), run one after the other in one
process; before each, the RSS high-water mark is reset (``/proc/self/clear_refs``), so ``peak RSS`` is that stage's
``VmHWM`` (everything still alive included: the world and the earlier stages' results) and ``delta`` is it minus
the RSS before the stage. How each stage scales:

* tokens: the streamed pass (a ``FeatureDataAccumulator`` per SAE and the ``DFAAccumulator``) -- extrapolated
  linearly to a million tokens;
* features: head attribution, logits, correlated features, histograms, page writing -- independent of tokens;
* features x shown examples: the shown examples' windows, their activations and their DFA by source -- on few
  contexts most of the 45 slots a feature has are empty, so the table also gives the time per filled example and
  that times ``n_features x 45`` (all slots filled, as on a million tokens). These two stages also run the model
  over the contexts holding an example (at most every context: at most the activation pass's time again).

Results: a markdown table, printed and written to ``benchmarks/results/dashboards-<size>-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.evaluation import (DEFAULT_CONTEXTS, _proc_status_kib, add_world_arguments, build_world, measure_call,
                                   resolve_device, write_result)
from benchmarks.quality_speed import _PassOnly

TOP_K, GROUPS, PER_GROUP = 20, 5, 5
SHOWN = TOP_K + GROUPS * PER_GROUP


class Stages:
    """Runs and records stages: wall seconds (synchronised on CUDA), RSS before, peak RSS, CUDA peak."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, work: Callable[[], Any], **extra: Any) -> Any:
        m = measure_call(work, self.device)
        row = dict(name=name, seconds=m.seconds, rss_mib=m.rss_before_kib / 1024, peak_mib=m.peak_rss_kib / 1024,
                   **extra)
        if m.cuda_peak_bytes is not None:
            row["cuda_peak_mib"] = m.cuda_peak_bytes / 2**20
        self.rows.append(row)
        print(f"  {name}: {m.seconds:.2f} s, peak RSS {row['peak_mib']:,.0f} MiB", flush=True)
        return m.result


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from sparsedecomp.activations import run_accumulators
    from sparsedecomp.dashboards.data import FeatureDataAccumulator
    from sparsedecomp.dashboards.replay import DEFAULT_CACHE_BUDGET, KeepBatches, cache_bytes
    from sparsedecomp.dashboards.gather import (CONCAT_NAME, DashboardData, GatheredSAE, head_name,
                                                shown_examples, source_dfa_windows, window_activations)
    from sparsedecomp.dashboards.site import write_site
    from sparsedecomp.outputs import RunWriter
    from sparsedecomp.dashboards.weights import correlated_features, feature_logits
    from sparsedecomp.dashboards.windows import example_windows
    from sparsedecomp.evaluation.attribution import DFAAccumulator, dfa_bias, head_attribution
    from sparsedecomp.jobs.solve import decompose_settings
    from sparsedecomp.loading.sae import CONCATENATED
    from sparsedecomp.solver_settings import SolverSetting

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    stages = Stages(args.device)
    world = build_world(args)
    model, layer, tokens = world.model, world.layer, world.tokens
    n_heads = model.cfg.n_heads
    saes = {CONCAT_NAME: (world.concat_sae, CONCATENATED)}
    saes.update({head_name(h): (sae, h) for h, sae in world.head_saes.items()})
    n_features = sum(sae.d_sae for sae, _ in saes.values())
    info = dict(n_contexts=tokens.shape[0], context_size=tokens.shape[1], n_tokens=tokens.numel(),
                n_features=n_features, n_heads=len(saes) - 1, world_rss_mib=_proc_status_kib("VmRSS") / 1024)

    decompositions = stages.run("decompose (nn_omp n_nonzero=16, weights only)", lambda: decompose_settings(
        world.concat_sae, world.head_saes, [SolverSetting("nn_omp", {"n_nonzero": 16, "tol": 0.01})],
        log=lambda _: None), scale="features")

    def accumulators() -> dict[str, Any]:
        # gather_dashboard_data's options: sample_size = max(256, 4 * groups * per_group).
        accs: dict[str, Any] = {name: FeatureDataAccumulator(sae, site, top_k=TOP_K, quantile_groups=GROUPS,
                                                             examples_per_group=PER_GROUP,
                                                             sample_size=max(256, 4 * GROUPS * PER_GROUP))
                                for name, (sae, site) in saes.items()}
        accs["dfa"] = DFAAccumulator(world.concat_sae, n_heads, k=TOP_K)
        return accs

    # One context first, untimed: the first call of each kernel (allocator, thread pool, lazy inits) is slower.
    run_accumulators(model, tokens[:1], accumulators(), layer=layer)
    stages.run("activation pass alone (model up to the hooked layer)",
               lambda: run_accumulators(model, tokens, {"pass": _PassOnly()}, layer=layer), scale="tokens")
    accs = accumulators()
    # As gather_dashboard_data: the pass keeps its batches for the windows and DFA to replay when they fit.
    if cache_bytes(model.cfg, *tokens.shape) <= DEFAULT_CACHE_BUDGET:
        accs["kept"] = KeepBatches()
    results = stages.run("streamed pass: FeatureData x 9 SAEs + DFA", lambda: run_accumulators(
        model, tokens, accs, layer=layer), scale="tokens")
    kept = results.pop("kept", None)
    info.update(replayed=kept is not None)
    attribution = stages.run("head attribution", lambda: head_attribution(
        world.concat_sae, n_heads, dfa=results["dfa"], decompositions=decompositions), scale="features")
    quantiles = stages.run("quantile examples", lambda: {name: results[name].quantile_examples() for name in saes},
                           scale="features")
    shown = {name: shown_examples(results[name], quantiles[name]) for name in saes}
    filled = int(sum(s.filled.sum() for s in shown.values()))
    info.update(filled=filled, slots=n_features * SHOWN)
    windows = stages.run("example windows (token ids)", lambda: {
        name: example_windows(tokens, shown[name].context, shown[name].position) for name in saes},
        scale="examples")
    W_O, W_U = model.W_O[layer].detach(), model.W_U.detach()
    logits = stages.run("weights: feature_logits", lambda: {
        name: feature_logits(sae.W_dec.detach(), W_O if site == CONCATENATED else W_O[site], W_U, k=10)
        for name, (sae, site) in saes.items()}, scale="features")
    correlated = stages.run("weights: correlated_features", lambda: {
        name: correlated_features(sae.W_dec.detach(), min(5, sae.d_sae - 1)) for name, (sae, _) in saes.items()},
        scale="features")
    acts = stages.run("window_activations", lambda: window_activations(
        model, tokens, saes, shown, windows, layer=layer, kept=kept), scale="examples")
    dfas = stages.run("source_dfa_windows", lambda: source_dfa_windows(
        model, tokens, saes, shown, windows, layer=layer, kept=kept), scale="examples")

    def assemble() -> DashboardData:
        gathered = {}
        for name, (sae, _) in saes.items():
            bias = dfa_bias(sae)
            dfa, before_window, heads = dfas[name]
            gathered[name] = GatheredSAE(
                name=name, sae=sae, data=results[name], quantiles=quantiles[name],
                activation_histograms=results[name].activation_histograms(), logits=logits[name],
                correlated=correlated[name], examples=shown[name], windows=windows[name],
                window_acts=acts[name].cpu(), dfa=dfa.cpu(), dfa_before_window=before_window, dfa_heads=heads,
                dfa_bias_encoder=bias.encoder.cpu(),
                dfa_bias_decoder=bias.decoder.cpu())
        return DashboardData(saes=gathered, attribution=attribution, decompositions=decompositions, n_heads=n_heads,
                             layer=layer, n_contexts=tokens.shape[0], context_size=tokens.shape[1])

    data = stages.run("histograms + assembly", assemble, scale="features")
    with tempfile.TemporaryDirectory(prefix="dashboards-bench-") as out:
        def write() -> Any:
            with RunWriter(out, command="dashboard") as writer:  # the writer the dashboard command uses
                return write_site(data, writer, token_str=lambda i: f"<{i}>", model_id="bench")

        site = stages.run("write_site (real templates, Neuronpedia export)", write, scale="features")
        pages = sum(site.n_pages.values())
        page_bytes = sum(p.stat().st_size for p in Path(out).glob("*/f/*.html"))
        total_bytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    info.update(pages=pages, page_mb=page_bytes / pages / 1e6, site_mb=total_bytes / 1e6)
    return stages.rows, info


def table(rows: list[dict[str, Any]], info: dict[str, Any], cuda: bool) -> str:
    per_m = 1e6 / info["n_tokens"]
    per_slot = info["slots"] / max(info["filled"], 1)
    lines = ["| stage | scales with | measured (s) | s per 1M tokens | s with all 45 slots filled | RSS before (MiB) | "
             "peak RSS (MiB) | delta (MiB) |" + (" CUDA peak (MiB) |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    scale_words = {"tokens": "tokens", "features": "features", "examples": "features x shown examples"}
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['name']} | {scale_words[r['scale']]} | {s:.2f} | "
                     + (f"{s * per_m:,.0f}" if r["scale"] == "tokens" else "") + " | "
                     + (f"{s * per_slot:,.1f}" if r["scale"] == "examples" else "") + " | "
                     f"{r['rss_mib']:,.0f} | {r['peak_mib']:,.0f} | {r['peak_mib'] - r['rss_mib']:,.0f} |"
                     + (f" {r['cuda_peak_mib']:,.0f} |" if cuda else ""))
    write = next(r for r in rows if r["name"].startswith("write_site"))
    lines += ["", f"- write_site: {info['pages']:,} feature pages, {info['pages'] / write['seconds']:,.0f} pages/s, "
              f"{info['page_mb']:.3f} MB per feature page, {info['site_mb']:,.1f} MB in all (Neuronpedia export "
              "included); pages here hold only the filled examples, so a million tokens' pages are larger"]
    return "\n".join(lines) + "\n"


def header(args: argparse.Namespace, info: dict[str, Any], load: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return "\n".join([
        f"# Dashboard cost, size {args.size}",
        "",
        f"- {info['n_contexts']} contexts x {info['context_size']:,} = {info['n_tokens']:,} tokens measured; "
        f"{info['n_features']:,} features (concat + {info['n_heads']} heads); 'per 1M tokens' = the measurement "
        "extrapolated linearly",
        f"- shown-example slots filled: {info['filled']:,} of {info['slots']:,} ({info['filled'] / info['slots']:.1%}); "
        "'all 45 slots filled' = measured x slots / filled (the per-example work; the model pass over the contexts "
        "holding examples is included in the measurement and does not scale so)",
        "- windows and DFA " + ("replay the streamed pass's kept batches (z, v, pattern fit the cache budget): no "
                                "second forward pass" if info["replayed"] else "run the model again over the "
                                "contexts holding examples (z, v, pattern exceed the cache budget)"),
        f"- device {args.device}; torch {torch.__version__}, {args.threads} threads; {os.cpu_count()} CPUs; "
        f"load average before/after {load} / {os.getloadavg()[0]:.2f}; {platform.platform()}; commit {commit}",
        f"- world resident before the stages: {info['world_rss_mib']:,.0f} MiB"
        + ("; the demo's trained SAEs" if args.size == "demo" else f"; random SAEs calibrated to L0 {args.l0:g}"),
        "- one process, stages in gather_dashboard_data's order; peak RSS = the stage's VmHWM (earlier results alive)",
        "",
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_world_arguments(parser)
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.contexts is None:
        args.contexts = DEFAULT_CONTEXTS[args.size]
    load = f"{os.getloadavg()[0]:.2f}"
    print(f"size {args.size}, {args.contexts} contexts, device {args.device}, {args.threads} threads", flush=True)
    rows, info = measure(args)
    write_result(f"dashboards-{args.size}", header(args, info, load) + table(rows, info, args.device == "cuda"))


if __name__ == "__main__":
    main()
