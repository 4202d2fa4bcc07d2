"""What the pipeline's way of solving costs over one bare solve, and what sparse codes save.

The pipeline (and the evaluation and dashboards after it) solves through a prepared solver with a progress bar
driven by the solver's own chunks: ``make_solver(...).prepare(dictionary).solve(targets, progress=True)``. This
benchmark times that against one bare ``decompose(targets, dictionary, ...)`` call on the same problem, in the same
process, alternating them (and the previous pipeline's per-chunk ``decompose`` calls) so that load on a shared machine hits both alike, and reports the result's memory
as stored (``Decomposition.codes``) against the dense ``(n_targets, n_atoms)`` matrix it replaces.

    python -m benchmarks.pipeline_overhead --size full --method nn_omp --n-nonzero 16 --repeats 2

Acceptance (issue 7): at full size (16,384 targets on 8 x 2,048 x 64) the pipeline's solve costs within 10 % of
the bare call. Results go to ``benchmarks/results/pipeline-overhead-*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sparsedecomp import decompose, make_solver

from .planted import PlantedConfig, make_planted

BAR = 1.10


def measure(size: str, method: str, params: dict, repeats: int, seed: int) -> dict:
    problem = make_planted(PlantedConfig.for_size(size, seed=seed))
    targets, dictionary = problem.targets, problem.dictionary
    bare, piped, previous = [], [], []
    result = None
    for _ in range(repeats):
        # The pipeline before prepared solvers: one decompose() per progress chunk of max(512, n/10) targets,
        # each rebuilding the solver and redoing its dictionary-only work.
        chunk = max(512, -(-targets.shape[0] // 10))
        t = time.perf_counter()
        for start in range(0, targets.shape[0], chunk):
            decompose(targets[start : start + chunk], dictionary, method=method, **params)
        previous.append(time.perf_counter() - t)
        t = time.perf_counter()
        decompose(targets, dictionary, method=method, **params)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = make_solver(method, **params).prepare(dictionary).solve(targets, progress=True, desc="pipeline")
        piped.append(time.perf_counter() - t)
    dense_bytes = result.n_targets * dictionary.n_atoms * result.codes.values.element_size()
    ratio = min(piped) / min(bare)
    return {
        "size": size, "method": method, "params": params, "n_targets": result.n_targets,
        "n_atoms": dictionary.n_atoms, "torch_threads": torch.get_num_threads(), "repeats": repeats,
        "bare_seconds": bare, "pipeline_seconds": piped, "ratio_best": ratio,
        "previous_pipeline_seconds": previous, "previous_ratio_best": min(previous) / min(bare),
        "codes_layout": result.codes.layout, "codes_bytes": result.codes.nbytes, "dense_bytes": dense_bytes,
        "memory_saving": dense_bytes / result.codes.nbytes,
        "check": "PASS" if ratio <= BAR else "FAIL", "bar": f"pipeline / bare <= {BAR}",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="full", choices=["tiny", "small", "medium", "full"])
    parser.add_argument("--method", default="nn_omp")
    parser.add_argument("--n-nonzero", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    params = {"n_nonzero": args.n_nonzero} if "omp" in args.method else {}
    row = measure(args.size, args.method, params, args.repeats, args.seed)
    print(json.dumps(row, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline-overhead-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, path)
    return 0 if row["check"] == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
