"""How long splice-in losses take on the demo world: every variant the researcher compares, in one pass.

Variants: clean, 8 ``zero_head``, ``zero_layer``, ``mean_layer``, 8 ``head_sae``, ``all_head_saes``, ``concat_sae``
and three routed settings (``pinv``; ``nn_omp`` with ``n_nonzero=16, tol=0.01``; ``nn_lasso`` with ``alpha=0.2``
as a fraction of each target's ``alpha_max``), decomposed in ``z`` space like the pipeline. Timed separately:

* **activations**: the activation pass alone (the model up to the hooked layer, ``resid_pre`` kept), i.e. what
  the stream costs whatever is computed on it;
* **mean**: the earlier pass that computes ``mean_z`` (:class:`~sparsedecomp.activations.MeanAccumulator`);
* **splice**: the full splice pass (activations plus 23+ reruns of the layers from the hooked one on).

    python -m benchmarks.splice_speed                    # 782 held-out contexts = 100k tokens
    python -m benchmarks.splice_speed --contexts 64 --profile

Acceptance: the splice pass over 100k demo tokens in under 3 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from sparsedecomp import make_solver
from sparsedecomp.activations import ActivationStream, MeanAccumulator, run_accumulators
from sparsedecomp.demo import demo_tokens, load_demo_world
from sparsedecomp.evaluation.routing import route_decomposition, routing_error
from sparsedecomp.evaluation.splice import splice_losses, splice_variants
from sparsedecomp.jobs.solve import concat_targets

SETTINGS = {
    "pinv": ("pinv", {}),
    "nn_omp_16": ("nn_omp", {"n_nonzero": 16, "tol": 0.01}),
    "nn_lasso_0.2": ("nn_lasso", {"alpha": 0.2, "alpha_is_fraction_of_max": True}),
}


def routed_decoders(world) -> dict:
    dictionary = world.head_saes.dictionary(normalize=True)
    targets, _ = concat_targets(world.concat_sae)
    out = {}
    for label, (method, params) in SETTINGS.items():
        decomposition = make_solver(method, **params).prepare(dictionary).solve(targets)
        out[label] = route_decomposition(world.concat_sae, decomposition, dictionary, label=label)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=782, help="held-out demo contexts (128 tokens each)")
    parser.add_argument("--batch-size", type=int, default=None, help="contexts per batch (default: memory budget)")
    parser.add_argument("--profile", action="store_true", help="print the splice pass's top functions by time")
    args = parser.parse_args()

    world = load_demo_world()
    tokens = demo_tokens(args.contexts)
    n_tokens = tokens.tokens.numel()
    cfg = world.model.cfg
    print(f"{args.contexts} contexts, {n_tokens} tokens, torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    routed = routed_decoders(world)
    print(f"decompositions: {time.perf_counter() - start:.1f} s; routing error (relative) "
          + ", ".join(f"{k} {routing_error(r, world.concat_sae):.2g}" for k, r in routed.items()))

    start = time.perf_counter()
    stream = ActivationStream(world.model, tokens, layer=world.layer, include=("resid_pre",),
                              batch_size=args.batch_size)
    for _ in stream:
        pass
    activations_s = time.perf_counter() - start

    start = time.perf_counter()
    mean_z = run_accumulators(world.model, tokens, {"mean": MeanAccumulator()}, layer=world.layer)["mean"]
    mean_s = time.perf_counter() - start

    variants = splice_variants(cfg.n_heads, cfg.d_head, head_saes=world.head_saes, concat_sae=world.concat_sae,
                               mean_z=mean_z, routed=routed)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    report = splice_losses(world.model, tokens, variants, layer=world.layer, batch_size=args.batch_size)
    if profiler:
        profiler.disable()
    splice_s = time.perf_counter() - start

    per_m = 1e6 / n_tokens
    print(f"batch size {stream.batch_size} contexts; {len(variants)} variants ({len(variants) - 1} reruns + clean)")
    print(f"activation pass: {activations_s:.1f} s ({activations_s * per_m:.1f} s per million tokens)")
    print(f"mean pass:       {mean_s:.1f} s ({mean_s * per_m:.1f} s per million tokens)")
    print(f"splice pass:     {splice_s:.1f} s ({splice_s * per_m:.1f} s per million tokens)")
    for name, r in report.results.items():
        score = "" if r.score is None else f"  score {r.score:.3f} ± {r.score_stderr:.3f}"
        print(f"  {name:22s} CE {r.ce_loss:.4f}  KL {r.kl:.4f}{score}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
