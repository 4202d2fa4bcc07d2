"""What the pipeline's way of solving costs over one bare solve, and what sparse codes save.

The pipeline (and the evaluation and dashboards after it) solves through a prepared solver with a progress bar
driven by the solver's own chunks. This benchmark runs, in one process and alternating so that load on a shared
machine hits all alike:

* **bare**: one ``decompose(targets, dictionary, ...)`` call;
* **pipeline**: the real ``sparsedecomp.jobs.decompose.run_decomposition`` on SAE objects holding the same planted
  problem (concat SAE decoder = the targets, per-head decoders = the blocks), timing its decomposition step (from
  ``summary.json``'s ``timings_s``) and the whole run (metrics, codes file, summary and page written);
* **previous**: the pipeline's solve before prepared solvers, one ``decompose`` per progress chunk of
  ``max(512, n/10)`` targets, each rebuilding the solver and redoing its dictionary-only work;

and reports the result's memory as stored (``Decomposition.codes``) against the dense ``(n_targets, n_atoms)``
matrix it replaces.

    python -m benchmarks.pipeline_overhead --size full --method nn_omp --n-nonzero 16 --repeats 3
    python -m benchmarks.pipeline_overhead --size full --method pinv --repeats 2

Acceptance (issue 7): at full size (16,384 targets on 8 x 2,048 x 64) the pipeline's decomposition step costs
within 10 % of the bare call. Results go to ``benchmarks/results/pipeline-overhead-*.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sparsedecomp import decompose, make_solver
from sparsedecomp.loading import SAE, HeadSAEs
from sparsedecomp.jobs.decompose import run_decomposition

from .planted import PlantedConfig, PlantedProblem, make_planted

BAR = 1.10
HOOK = "blocks.1.attn.hook_z"


def planted_saes(problem: PlantedProblem) -> tuple[SAE, HeadSAEs]:
    """SAE objects whose decoders are the planted problem: what ``run_decomposition`` takes."""

    def sae(W_dec: torch.Tensor, head: int | str) -> SAE:
        d_sae, d_in = W_dec.shape
        return SAE(W_enc=W_dec.T.contiguous(), b_enc=W_dec.new_zeros(d_sae), W_dec=W_dec, b_dec=W_dec.new_zeros(d_in),
                   apply_b_dec_to_input=False, hook_name=HOOK, layer=1, head=head, model_name="planted")

    concat = sae(problem.targets, "concatenated")
    heads = HeadSAEs(tuple(sae(block.to(problem.targets.dtype), h) for h, block in enumerate(problem.blocks)))
    return concat, heads


def solver_params(method: str, n_nonzero: int, alpha: float) -> dict[str, Any]:
    """Every parameter given explicitly, so that the pipeline (which adds its defaults, e.g. nn_omp's tol=0.01) and
    the bare call solve the same problem."""
    if method in ("omp", "nn_omp"):
        return {"n_nonzero": n_nonzero, "tol": 0.01}
    if method in ("lasso", "nn_lasso"):
        return {"alpha": alpha, "alpha_is_fraction_of_max": True}
    return {}


def measure(size: str, method: str, params: dict[str, Any], repeats: int, seed: int) -> dict[str, Any]:
    problem = make_planted(PlantedConfig.for_size(size, seed=seed))
    targets, dictionary = problem.targets, problem.dictionary
    concat, heads = planted_saes(problem)
    make_solver(method, **params)  # a bad setting fails here, before any timing
    bare, step, whole, previous = [], [], [], []
    same, layout, nbytes = None, None, None
    for repeat in range(repeats):
        # Alternate which of the two runs first, so neither always meets the other's leftovers in the allocator.
        order = ("bare", "pipeline") if repeat % 2 == 0 else ("pipeline", "bare")
        codes: dict[str, torch.Tensor] = {}
        for which in order:
            gc.collect()
            if which == "bare":
                start = time.perf_counter()
                result = decompose(targets, dictionary, method=method, **params)
                bare.append(time.perf_counter() - start)
                layout, nbytes = result.codes.layout, result.codes.nbytes
                codes["bare"] = result.codes.to_dense().clone()
                del result  # each timed call starts with the same memory held (a dense pinv result is 2 GB)
            else:
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    run = run_decomposition(concat, heads, out_dir=Path(out) / "run", method=method, params=params,
                                            progress=False, log=lambda _: None)
                    whole.append(time.perf_counter() - start)
                step.append(run.summary.timings_s["decompose_z"])
                if run.summary.params != params:
                    raise RuntimeError(f"the pipeline solved with {run.summary.params}, the bare call with {params}")
                codes["pipeline"] = run.decompositions["z"].codes.to_dense().clone()
                del run
        # The pipeline renormalises the concat decoder rows (already unit norm up to rounding), so the two codes
        # agree to rounding, not bit for bit.
        same = {"max_abs_difference": float((codes["pipeline"] - codes["bare"]).abs().max()),
                "identical_supports": float(((codes["pipeline"] != 0) == (codes["bare"] != 0)).all(dim=1)
                                            .double().mean())}
        del codes
        gc.collect()

        chunk = max(512, -(-targets.shape[0] // 10))
        start = time.perf_counter()
        for first in range(0, targets.shape[0], chunk):
            decompose(targets[first : first + chunk], dictionary, method=method, **params)
        previous.append(time.perf_counter() - start)
    n_targets = targets.shape[0]
    dense_bytes = n_targets * dictionary.n_atoms * targets.element_size()
    ratio = min(step) / min(bare)
    return {
        "size": size, "method": method, "params": params, "n_targets": n_targets,
        "n_atoms": dictionary.n_atoms, "torch_threads": torch.get_num_threads(), "repeats": repeats,
        "bare_seconds": bare, "pipeline_decompose_seconds": step, "pipeline_total_seconds": whole,
        "previous_pipeline_seconds": previous,
        "ratio_best": ratio, "previous_ratio_best": min(previous) / min(bare),
        "pipeline_vs_bare_codes": same,
        "codes_layout": layout, "codes_bytes": nbytes, "dense_bytes": dense_bytes,
        "memory_saving": dense_bytes / nbytes,
        "check": "PASS" if ratio <= BAR else "FAIL", "bar": f"pipeline decomposition step / bare <= {BAR}",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="full", choices=["tiny", "small", "medium", "full"])
    parser.add_argument("--method", default="nn_omp", choices=["pinv", "omp", "nn_omp", "lasso", "nn_lasso", "nnls"])
    parser.add_argument("--n-nonzero", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.2, help="lasso: fraction of each target's alpha_max")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    row = measure(args.size, args.method, solver_params(args.method, args.n_nonzero, args.alpha), args.repeats,
                  args.seed)
    print(json.dumps(row, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline-overhead-{args.size}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, path)
    return 0 if row["check"] == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
