"""Solver benchmark: every package solver against scikit-learn and cvxpy on one planted problem, in one process.

Run from the repository root::

    python -m benchmarks.solvers --size small            # < 1 minute, for development
    python -m benchmarks.solvers --size full --device auto   # the acceptance run (see benchmarks/README.md)

For each package method it measures wall time (prepare + solve, after one warm-up on a few targets), the mean
objective, the objective gap to a reference on a subset of targets, support precision/recall against the planted
support, relative reconstruction error, L0 and statuses. The baselines (scikit-learn loops, cvxpy/Clarabel) run
in the same process on the same data; a baseline timed on a subset is extrapolated linearly to all targets and
flagged as such. Speed-ups are ratios of times measured in this run. The acceptance checks of the solver issue are
computed and printed as PASS / FAIL / SKIP lines. Results go to ``<out>/solvers-<size>-<space>-<time>.json`` and
``.md``.

Full-size CPU and GPU checks run each solver in a fresh subprocess (``--worker``) so that peak memory is that
solver's own: the child's own ``VmHWM`` on Linux CPU (``ru_maxrss`` would include the forking parent's peak), ``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparsedecomp import SOLVERS, Decomposition, Dictionary, decompose
from sparsedecomp.optimality import lasso_objective, least_squares_objective

from .acceptance import (GIB, CPU_MEMORY_LIMIT_BYTES, CPU_TIME_LIMITS_S, GPU_TIME_LIMITS_S, NN_LASSO_MAX_GAP,
                         NN_LASSO_MIN_SPEEDUP, OMP_MIN_SPEEDUP, Verdict, judge_failed_run, judge_nn_lasso, judge_omp,
                         judge_worker)
from .baselines import Baseline, cvxpy_reference, sklearn_lasso_loop, sklearn_omp, sklearn_omp_gram
from .planted import SIZES, PlantedConfig, make_planted, mix_planted

ALL_METHODS = ["pinv", "nnls", "lasso", "nn_lasso", "omp", "nn_omp",
               "cvxpy_lasso", "cvxpy_nn_lasso", "cvxpy_nnls", "cvxpy_bpdn"]
# At 16,384 atoms the package's cvxpy programs take minutes per target, so large sizes leave them out by default.
LARGE_SIZE_METHODS = ["pinv", "nnls", "lasso", "nn_lasso", "omp", "nn_omp"]
LASSO_METHODS = ("lasso", "nn_lasso", "cvxpy_lasso", "cvxpy_nn_lasso")
LEAST_SQUARES_METHODS = ("pinv", "nnls", "omp", "nn_omp", "cvxpy_nnls")
# Which reference each method's objective is compared with: (cache key kind, label).
REFERENCE_OF = {
    "lasso": "sk_lasso", "nn_lasso": "sk_nn_lasso", "omp": "sk_omp_gram", "nn_omp": "sk_omp_gram",
    "nnls": "cvx_nnls", "cvxpy_lasso": "cvx_lasso", "cvxpy_nn_lasso": "cvx_nn_lasso", "cvxpy_nnls": "cvx_nnls",
    "cvxpy_bpdn": "cvx_bpdn",
}
# Which baselines a method's speed is compared with.
SPEED_BASELINES = {
    "lasso": ("sk_lasso", "cvx_lasso"), "nn_lasso": ("sk_nn_lasso", "cvx_nn_lasso"),
    "omp": ("sk_omp_gram", "sk_omp"), "nn_omp": ("sk_omp_gram", "sk_omp"), "nnls": ("cvx_nnls",),
    "cvxpy_lasso": ("cvx_lasso",), "cvxpy_nn_lasso": ("cvx_nn_lasso",), "cvxpy_nnls": ("cvx_nnls",),
    "cvxpy_bpdn": ("cvx_bpdn",),
}
# Subset sizes for the per-target baselines, by problem size: (sklearn lasso loop, sklearn OMP, cvxpy).
SUBSETS = {"tiny": (16, 48, 4), "small": (32, 128, 8), "medium": (128, 64, 16), "full": (128, 64, 16)}
ACCEPTANCE_SHAPE = (8, 2048, 64)


# ---------------------------------------------------------------------------------------------------- utilities
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accepted_params(method: str, wanted: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Keep the parameters the registered solver takes; report the others (so a renamed field is visible)."""
    cls, fixed = SOLVERS[method]
    allowed = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    kept = {k: v for k, v in wanted.items() if k in allowed and v is not None}
    return kept, sorted(k for k, v in wanted.items() if k not in allowed and v is not None)


def method_params(method: str, args: argparse.Namespace, **override: Any) -> dict[str, Any]:
    if method in ("lasso", "nn_lasso"):
        wanted = {"alpha": args.alpha, "tol": args.lasso_tol, "max_iter": args.max_iter}
    elif method == "nnls":
        wanted = {"tol": args.nnls_tol, "max_iter": args.max_iter}
    elif method in ("omp", "nn_omp"):
        wanted = {"n_nonzero": args.n_nonzero}
    elif method in ("cvxpy_lasso", "cvxpy_nn_lasso"):
        wanted = {"alpha": args.alpha}
    elif method == "cvxpy_bpdn":
        wanted = {"eps": args.eps}
    else:
        wanted = {}
    wanted.update(override)
    return wanted


def objective(method: str, targets: Tensor, coefficients: Tensor, atoms: Tensor, alpha: float) -> Tensor:
    """The objective each method minimises, evaluated the same way for package and reference codes (float64)."""
    targets, coefficients, atoms = targets.double(), coefficients.double(), atoms.double()
    if method in LASSO_METHODS:
        return lasso_objective(targets, coefficients, atoms, alpha)
    if method == "cvxpy_bpdn":
        return coefficients.abs().sum(dim=1)
    return least_squares_objective(targets, coefficients, atoms)


def support_sets(codes: np.ndarray) -> list[frozenset[int]]:
    return [frozenset(np.flatnonzero(row).tolist()) for row in codes]


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine_info(device: torch.device) -> dict[str, Any]:
    import cvxpy
    import scipy
    import sklearn

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "cvxpy": cvxpy.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda_available": torch.cuda.is_available(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    info.update(git_commit())
    return info


def problem_stats(dictionary: Dictionary, targets: Tensor, support: Tensor, weights: Tensor) -> dict[str, Any]:
    if dictionary.is_block_diagonal:
        # Atoms of different heads are orthogonal, so the coherence is the largest within-head coherence.
        coherence = max(Dictionary.from_atoms(dictionary.atoms[dictionary.head_atoms(h)]).coherence()
                        for h in range(dictionary.n_heads))
    else:
        coherence = dictionary.coherence()
    valid = support >= 0
    return {
        "n_atoms": dictionary.n_atoms, "dim": dictionary.dim, "n_targets": targets.shape[0],
        "coherence": round(coherence, 4),
        "scale_median": float(dictionary.scales.median()), "scale_min": float(dictionary.scales.min()),
        "scale_max": float(dictionary.scales.max()),
        "planted_l0_mean": float(valid.sum(1).double().mean()),
        "planted_weight_min": float(weights[valid].min()),
    }


# ------------------------------------------------------------------------------------------- package measurement
def time_package(method: str, targets: Tensor, dictionary: Dictionary, params: dict[str, Any],
                 device: torch.device, warmup_rows: int | None = None) -> tuple[Decomposition, float]:
    """Warm up once, then time one full ``decompose`` call (synchronised on CUDA).

    The warm-up solves a few targets on CPU (first-call overheads only) and all of them on CUDA, where it is cheap
    and also settles kernel selection and the caching allocator for the timed shapes.
    """
    if warmup_rows is None:
        warmup_rows = targets.shape[0] if device.type == "cuda" else 8
    if warmup_rows > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decompose(targets[:warmup_rows], dictionary, method=method, **params)
    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = decompose(targets, dictionary, method=method, **params)
        synchronize(device)
        seconds = time.perf_counter() - start
    return result, seconds


def quality(result: Decomposition, support: Tensor, threshold: float, method: str, alpha: float,
            chunk: int = 2048) -> dict[str, Any]:
    """Objective, sparsity, reconstruction and planted-support recovery, in chunks (codes can be 1 GB)."""
    n = result.n_targets
    l0, precision, recall, rel_err, obj = [], [], [], [], []
    atoms = result.dictionary.atoms.double()
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        c = result.codes.rows(rows).to_dense()  # one chunk dense at a time, never the whole matrix
        found = c.abs() > threshold
        s = support[rows].to(c.device)
        valid = s >= 0
        hits = found.gather(1, s.clamp_min(0)) & valid
        n_found = found.sum(1)
        l0.append(n_found.cpu())
        precision.append((hits.sum(1) / n_found.clamp_min(1)).cpu())
        recall.append((hits.sum(1) / valid.sum(1).clamp_min(1)).cpu())
        y = result.targets[rows]
        rel_err.append(((y - result.reconstruction[rows]).norm(dim=1) / y.norm(dim=1).clamp_min(1e-30)).cpu())
        obj.append(objective(method, y, c, atoms, alpha).cpu())
    l0, precision, recall, rel_err, obj = (torch.cat(x).double() for x in (l0, precision, recall, rel_err, obj))
    return {
        "objective_mean": float(obj.mean()),
        "l0_mean": float(l0.mean()), "precision": float(precision.mean()), "recall": float(recall.mean()),
        "rel_error_mean": float(rel_err.mean()), "rel_error_median": float(rel_err.median()),
        "statuses": result.status_counts(),
        "certificate_kind": result.certificate_kind,
        "certificate_max": float(result.certificate.double().max()) if n else None,
    }


def compare(method: str, result: Decomposition, reference: Baseline, atoms64: Tensor, alpha: float) -> dict[str, Any]:
    """Objective gap on the reference's targets (float64), positive when the package is worse.

    Lasso and BPDN objectives are bounded away from zero, so the gap is relative to the reference objective,
    ``(P_pkg - P_ref) / |P_ref|``. Least-squares objectives (NNLS, OMP) can be ~0 when atoms outnumber
    dimensions, so their gap is relative to the zero-code objective ``0.5 ||y||^2`` instead.
    """
    m = reference.n_solved
    targets = result.targets[:m].double().cpu()
    ours_codes = result.codes.rows(slice(0, m)).to_dense().cpu()
    ours = objective(method, targets, ours_codes, atoms64, alpha)
    theirs = objective(method, targets, torch.from_numpy(reference.codes), atoms64, alpha)
    if method in LEAST_SQUARES_METHODS:
        scale, scale_kind = 0.5 * targets.pow(2).sum(dim=1), "0.5*||y||^2"
    else:
        scale, scale_kind = theirs.abs(), "reference objective"
    gap = (ours - theirs) / scale.clamp_min(1e-12)
    out = {"reference": reference.name, "n_compared": m, "gap_median": float(gap.median()),
           "gap_max": float(gap.max()), "gap_relative_to": scale_kind,
           "objective_reference_mean": float(theirs.mean())}
    if reference.name.startswith("sklearn orthogonal_mp"):
        ours_sets = support_sets(ours_codes.double().numpy())
        theirs_sets = support_sets(reference.codes)
        out["identical_supports"] = float(np.mean([a == b for a, b in zip(ours_sets, theirs_sets)]))
    if method == "cvxpy_bpdn":
        out["residual_max"] = float((targets - ours_codes.double() @ atoms64).norm(dim=1).max())
    return out


# --------------------------------------------------------------------------------------------------- the run
class Benchmark:
    """One benchmark run: the problem, cached baselines, rows and checks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = torch.float64 if args.dtype == "float64" else torch.float32
        overrides = {"seed": args.seed}
        if args.n_targets is not None:
            overrides["n_targets"] = args.n_targets
        self.config = PlantedConfig.for_size(args.size, **overrides)
        start = time.perf_counter()
        planted = make_planted(self.config, dtype=torch.float64)
        if args.space == "residual":
            mixed = mix_planted(planted)
            self.dictionary64, self.targets64 = mixed.dictionary, mixed.targets
            self.support, self.weights = mixed.support, mixed.weights
        else:
            self.dictionary64, self.targets64 = planted.dictionary, planted.targets
            self.support, self.weights = planted.support, planted.weights
        self.generate_seconds = time.perf_counter() - start
        self.atoms64 = self.dictionary64.atoms
        self.atoms_np = self.atoms64.numpy()
        self.targets_np = self.targets64.numpy()
        subsets = SUBSETS[args.size]
        n = self.targets64.shape[0]
        self.n_sklearn = min(n, args.n_sklearn if args.n_sklearn is not None else subsets[0])
        self.n_omp_ref = min(n, args.n_omp_ref if args.n_omp_ref is not None else subsets[1])
        self.n_cvxpy = min(n, args.n_cvxpy if args.n_cvxpy is not None else subsets[2])
        if args.methods is not None:
            self.methods = list(args.methods)
        else:
            self.methods = ALL_METHODS if args.size in ("tiny", "small") else LARGE_SIZE_METHODS
        self.n_main = min(n, args.main_targets) if args.main_targets is not None else n
        self.baselines: dict[tuple, Baseline] = {}
        self.rows: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []

    @property
    def n_targets(self) -> int:
        return self.targets64.shape[0]

    def log(self, message: str) -> None:
        if not self.args.quiet:
            print(message, file=sys.stderr, flush=True)

    # -- baselines (cached by what determines them) ------------------------------------------------------------
    def baseline(self, kind: str, **kw: Any) -> Baseline:
        key = (kind, tuple(sorted(kw.items())))
        if key not in self.baselines:
            self.log(f"  baseline {kind} {kw}")
            a, alpha = self.args, kw.get("alpha", self.args.alpha)
            if kind in ("sk_lasso", "sk_nn_lasso"):
                m = kw.get("n", self.n_sklearn)
                b = sklearn_lasso_loop(self.atoms_np, self.targets_np[:m], alpha=alpha, positive=kind == "sk_nn_lasso",
                                       tol=kw.get("tol", a.sklearn_tol), max_iter=a.sklearn_max_iter)
            elif kind == "sk_omp_gram":
                b = sklearn_omp_gram(self.atoms_np, self.targets_np[: self.n_omp_ref], n_nonzero=kw["n_nonzero"])
            elif kind == "sk_omp":
                b = sklearn_omp(self.atoms_np, self.targets_np[: self.n_omp_ref], n_nonzero=kw["n_nonzero"])
            elif kind.startswith("cvx_"):
                b = cvxpy_reference(self.atoms_np, self.targets_np[: self.n_cvxpy], kind=kind[4:], alpha=alpha,
                                    eps=a.eps)
            else:
                raise ValueError(kind)
            self.baselines[key] = b
        return self.baselines[key]

    def baseline_for(self, kind: str, params: dict[str, Any] | None = None) -> Baseline:
        """The baseline ``kind`` matching a package run with ``params`` (same OMP budget)."""
        params = params or {}
        if kind in ("sk_omp_gram", "sk_omp"):
            return self.baseline(kind, n_nonzero=params.get("n_nonzero", self.args.n_nonzero))
        if kind in ("sk_lasso", "sk_nn_lasso"):
            return self.baseline(kind, tol=self.args.sklearn_tol)
        return self.baseline(kind)

    # -- package rows ------------------------------------------------------------------------------------------
    def run_method(self, method: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None,
                   n: int | None = None, label: str = "main", **override: Any) -> dict[str, Any]:
        dtype = dtype or self.dtype
        device = device or self.device
        if n is None:
            n = self.n_cvxpy if method.startswith("cvxpy_") else self.n_main
        params, dropped = accepted_params(method, method_params(method, self.args, **override))
        row: dict[str, Any] = {"method": method, "label": label, "dtype": str(dtype).replace("torch.", ""),
                               "device": str(device), "n_targets": n, "params": params}
        if dropped:
            row["params_not_accepted"] = dropped
        self.log(f"  {label}: {method} {params} on {n} targets ({row['dtype']}, {device})")
        dictionary = self.dictionary64.to(device=device, dtype=dtype)
        targets = self.targets64[:n].to(device=device, dtype=dtype)
        try:
            # cvxpy methods solve one program per target: nothing to warm up, and each solve is expensive.
            warmup = 0 if method.startswith("cvxpy_") else None
            result, seconds = time_package(method, targets, dictionary, params, device, warmup_rows=warmup)
        except Exception as error:  # a solver still being written must not stop the benchmark
            row["error"] = f"{type(error).__name__}: {error}"[:300]
            self.rows.append(row)
            return row
        row.update(seconds=seconds, ms_per_target=1000 * seconds / max(n, 1))
        row.update(quality(result, self.support[:n], self.args.support_threshold, method, self.args.alpha))
        ref_kind = REFERENCE_OF.get(method)
        if ref_kind is not None and not self.args.no_references:
            reference = self.baseline_for(ref_kind, params)
            row["vs_reference"] = compare(method, result, reference, self.atoms64, self.args.alpha)
        speedups = {}
        for kind in SPEED_BASELINES.get(method, ()) if not self.args.no_references else ():
            b = self.baseline_for(kind, params)
            speedups[b.name] = {"ratio": b.extrapolate(n) / seconds, "baseline_seconds": b.extrapolate(n),
                                "extrapolated": b.n_solved < n, "baseline_targets_timed": b.n_solved}
        row["speedups"] = speedups
        del result
        self.rows.append(row)
        return row

    # -- acceptance checks ---------------------------------------------------------------------------------------
    def at_acceptance_shape(self) -> bool:
        c = self.config
        return (c.n_heads, c.n_features, c.d_head) == ACCEPTANCE_SHAPE and self.args.space == "z"

    def add_check(self, name: str, verdict: Verdict, detail: str, **values: Any) -> None:
        self.checks.append({"check": name, "status": verdict.status, "detail": detail, "unmet": list(verdict.unmet),
                            **values})

    def check_a(self) -> None:
        """(a) 2,048 targets: OMP 16 atoms >= 50x orthogonal_mp_gram with identical supports (float64); nn_lasso
        within 1e-6 of sklearn's objective >= 5x the sklearn positive-Lasso loop. Run on CPU, float64."""
        official = self.at_acceptance_shape() and self.n_targets >= 2048
        n = min(self.n_targets, 2048)
        where = "" if official else f" [measured at {self.shape_text()} x {n} targets; defined at 8x2048x64 x 2048]"
        if self.args.no_references:
            # (a) is a comparison with scikit-learn: nothing to judge without the reference runs.
            for name in ("a-omp", "a-nn_omp", "a-nn_lasso"):
                self.add_check(name, Verdict("SKIP"), "needs the scikit-learn references (run without --no-references)")
            return
        cpu = torch.device("cpu")
        gram = self.baseline_for("sk_omp_gram", {"n_nonzero": 16})
        for method in ("omp", "nn_omp"):
            row = self.run_method(method, dtype=torch.float64, device=cpu, n=n, label="check-a", n_nonzero=16)
            if "error" in row:
                self.add_check(f"a-{method}", judge_failed_run(row["error"], official=official),
                               f"{method} failed: {row['error']}{where}")
                continue
            ratio = gram.extrapolate(n) / row["seconds"]
            identical = row.get("vs_reference", {}).get("identical_supports")
            verdict = judge_omp(method, speedup=ratio, identical_supports=identical, official=official)
            text = (f"{method} n_nonzero=16 float64: {row['seconds']:.3f} s vs orthogonal_mp_gram "
                    f"{gram.extrapolate(n):.2f} s{' (extrapolated)' if gram.n_solved < n else ''} = {ratio:.1f}x "
                    f"(need >= {OMP_MIN_SPEEDUP:g}x)")
            if method == "omp":
                text += f"; identical supports on {gram.n_solved} targets: {100 * (identical or 0):.1f}% (need 100%)"
            else:
                text += f"; supports equal to sklearn OMP (informational): {100 * (identical or 0):.1f}%"
            self.add_check(f"a-{method}", verdict, text + where, speedup=ratio, identical_supports=identical)
        tol = self.args.check_tol
        sk = self.baseline_for("sk_nn_lasso")
        row = self.run_method("nn_lasso", dtype=torch.float64, device=cpu, n=n, label="check-a", tol=tol)
        if "error" in row:
            self.add_check("a-nn_lasso", judge_failed_run(row["error"], official=official),
                           f"nn_lasso failed: {row['error']}{where}")
            return
        ratio = sk.extrapolate(n) / row["seconds"]
        gap = row["vs_reference"]["gap_max"]
        self.add_check(
            "a-nn_lasso", judge_nn_lasso(speedup=ratio, gap_max=gap, official=official),
            f"nn_lasso tol={tol:g} float64: {row['seconds']:.3f} s vs sklearn positive-Lasso loop (tol="
            f"{self.args.sklearn_tol:g}) {sk.extrapolate(n):.2f} s{' (extrapolated from ' + str(sk.n_solved) + ')' if sk.n_solved < n else ''}"
            f" = {ratio:.1f}x (need >= {NN_LASSO_MIN_SPEEDUP:g}x); max objective gap to sklearn {gap:.2e} on "
            f"{sk.n_solved} targets (need <= {NN_LASSO_MAX_GAP:g})" + where, speedup=ratio, gap_max=gap)

    def check_b(self) -> None:
        """(b) full 16,384 targets on CPU: omp (32 atoms) < 60 s, nn_lasso tol 1e-4 < 180 s, peak memory < 8 GB."""
        official = self.at_acceptance_shape() and self.n_targets >= 16384
        if not official:
            for name in ("b-omp", "b-nn_lasso"):
                self.add_check(name, Verdict("SKIP"), f"needs --size full (16,384 targets on 8x2048x64); this run "
                                                      f"is {self.shape_text()} x {self.n_targets}")
            return
        for method, params in (("omp", {"n_nonzero": 32}), ("nn_lasso", {"tol": 1e-4})):
            out = self.run_worker(method, params, "cpu")
            self.record_worker(f"b-{method}", method, params, out, CPU_TIME_LIMITS_S[method], CPU_MEMORY_LIMIT_BYTES,
                               "peak RSS (VmHWM)")

    def check_c(self) -> None:
        """(c) CUDA, full size: omp (32 atoms) < 0.2 s and nn_lasso < 1 s (after one warm-up)."""
        if not torch.cuda.is_available():
            for name in ("c-omp", "c-nn_lasso"):
                self.add_check(name, Verdict("SKIP"), "CUDA not available")
            return
        if not (self.at_acceptance_shape() and self.n_targets >= 16384):
            for name in ("c-omp", "c-nn_lasso"):
                self.add_check(name, Verdict("SKIP"),
                               f"needs --size full; this run is {self.shape_text()} x {self.n_targets}")
            return
        for method, params in (("omp", {"n_nonzero": 32}), ("nn_lasso", {"tol": 1e-4})):
            out = self.run_worker(method, params, "cuda")
            self.record_worker(f"c-{method}", method, params, out, GPU_TIME_LIMITS_S[method], None,
                               "cuda_max_memory_allocated")

    def record_worker(self, name: str, method: str, params: dict, out: dict, limit: float, memory_limit: float | None,
                      memory_kind: str) -> None:
        if "error" in out:
            self.add_check(name, judge_failed_run(out["error"], official=True), f"{method} {params} failed: "
                                                                               f"{out['error']}", **out)
            return
        memory = out.get("peak_bytes")
        verdict = judge_worker(seconds=out["seconds"], time_limit=limit, peak_bytes=memory, memory_limit=memory_limit)
        memory_text = "not measured" if memory is None else f"{memory / GIB:.2f} GiB"
        need = f", need < {memory_limit / GIB:g} GiB" if memory_limit is not None else ""
        text = (f"{method} {out['params']} on {out['n_targets']} targets ({out['device_name']}): "
                f"{out['seconds']:.3f} s (need < {limit:g} s); peak memory {memory_text} ({memory_kind}{need}); "
                f"statuses {out['statuses']}")
        self.add_check(name, verdict, text, **out)
        row = {"method": method, "label": name, "dtype": out["dtype"], "device": out["device"],
               "n_targets": out["n_targets"], "params": out["params"], "seconds": out["seconds"],
               "ms_per_target": 1000 * out["seconds"] / out["n_targets"], "statuses": out["statuses"],
               "peak_bytes": memory, "speedups": {}}
        self.rows.append(row)

    def run_worker(self, method: str, params: dict, device: str) -> dict:
        """Run one solver in a fresh Python process and measure its own peak memory."""
        wanted, _ = accepted_params(method, {**method_params(method, self.args), **params})
        spec = {"config": self.config.to_dict(), "method": method, "params": wanted, "device": device,
                "dtype": "float32", "space": self.args.space}
        self.log(f"  subprocess: {method} {wanted} on {device}")
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.solvers", "--worker", json.dumps(spec)],
                                cwd=root, env=env, stdout=subprocess.PIPE, text=True)
        stdout = proc.stdout.read()
        proc.stdout.close()
        # wait4 reaps this child only and returns its own rusage (RUSAGE_CHILDREN would accumulate all children).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"worker exited with {proc.returncode}", "stdout_tail": stdout[-500:]}
        out = json.loads(lines[-1])
        if device == "cpu" and "peak_bytes" not in out:
            # Fallback off Linux: ru_maxrss (bytes on macOS, KiB elsewhere), which may include the parent's peak.
            scale = 1 if sys.platform == "darwin" else 1024
            out["peak_bytes"] = usage.ru_maxrss * scale
        return out

    def shape_text(self) -> str:
        c = self.config
        return f"{c.n_heads}x{c.n_features}x{c.d_head}"

    # -- everything ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.time()
        self.log(f"problem {self.shape_text()} x {self.n_targets} targets ({args.space} space), "
                 f"generated in {self.generate_seconds:.1f} s")
        stats = problem_stats(self.dictionary64, self.targets64, self.support, self.weights)
        for method in self.methods:
            self.run_method(method)
        for check in args.checks:
            {"a": self.check_a, "b": self.check_b, "c": self.check_c}[check]()
        return {
            "benchmark": "solvers",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "total_seconds": time.time() - started,
            "machine": machine_info(self.device),
            "arguments": {**{k: v for k, v in vars(args).items() if k != "worker"}, "methods": self.methods},
            "planted": self.config.to_dict(),
            "space": args.space,
            "problem": stats,
            "subsets": {"main": self.n_main, "sklearn_lasso": self.n_sklearn, "sklearn_omp": self.n_omp_ref,
                        "cvxpy": self.n_cvxpy},
            "baselines": [baseline_record(b, self.n_targets) for b in self.baselines.values()],
            "rows": self.rows,
            "checks": self.checks,
        }


def baseline_record(b: Baseline, n_targets: int) -> dict[str, Any]:
    return {"name": b.name, "targets_timed": b.n_solved, "seconds": b.seconds, "setup_seconds": b.setup_seconds,
            "ms_per_target": 1000 * b.per_target, "extrapolated_seconds": b.extrapolate(n_targets),
            "extrapolated": b.n_solved < n_targets, "notes": b.notes}


# -------------------------------------------------------------------------------------------------- the worker
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Solve the full planted problem once with one method (after a warm-up) and report time and memory."""
    device = resolve_device(spec["device"])
    dtype = torch.float64 if spec["dtype"] == "float64" else torch.float32
    config = PlantedConfig(**{**spec["config"], "spread": tuple(spec["config"]["spread"])})
    planted = make_planted(config, dtype=dtype)
    if spec["space"] == "residual":
        mixed = mix_planted(planted)
        dictionary, targets = mixed.dictionary, mixed.targets
    else:
        dictionary, targets = planted.dictionary, planted.targets
    del planted
    dictionary, targets = dictionary.to(device=device), targets.to(device)
    method, params = spec["method"], spec["params"]
    if device.type == "cuda":
        # GPU: warm up on the whole problem once (kernels, allocator), then measure only the timed call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decompose(targets, dictionary, method=method, **params)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result, seconds = time_package(method, targets, dictionary, params, device, warmup_rows=0)
    else:
        result, seconds = time_package(method, targets, dictionary, params, device)
    out = {"method": method, "params": params, "device": str(device), "dtype": spec["dtype"],
           "n_targets": targets.shape[0], "seconds": seconds, "statuses": result.status_counts(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        own_peak = peak_rss_of_this_process()
        if own_peak is not None:
            out["peak_bytes"] = own_peak
    return out


def peak_rss_of_this_process() -> int | None:
    """Peak resident memory of this process image in bytes (Linux ``VmHWM``), or ``None`` where unavailable.

    Why not ``ru_maxrss``: Linux carries a process's maximum RSS across ``fork`` and ``exec``, so a worker forked
    from a parent holding several GB reports the parent's peak, not its own. ``VmHWM`` belongs to the address
    space, which ``exec`` replaces, so it counts this solver run alone.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------------- reporting
def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["problem"]
    lines = [
        f"# Solver benchmark: {report['arguments']['size']} ({report['space']} space)",
        "",
        f"{p['n_atoms']} atoms x {p['dim']} dims, {p['n_targets']} targets, coherence {p['coherence']}, "
        f"seed {report['planted']['seed']}. Machine: {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']} ({m['device_name']}), commit "
        f"{(m.get('commit') or 'unknown')[:10]}{' (dirty)' if m.get('dirty') else ''}. {report['created']}.",
        "",
        "| method | run | dtype | device | n | time (s) | ms/target | speed-up | objective gap vs ref (median / max) "
        "| rel. error | L0 | precision | recall | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['label']} | {r['dtype']} | {r['device']} | {r['n_targets']} | "
                         f"error: {r['error'][:80]} | | | | | | | | |")
            continue
        speed = "; ".join(f"{v['ratio']:.1f}x {short(k)}{'*' if v['extrapolated'] else ''}"
                          for k, v in r.get("speedups", {}).items()) or "-"
        ref = r.get("vs_reference")
        gap = f"{ref['gap_median']:.1e} / {ref['gap_max']:.1e} ({short(ref['reference'])}, n={ref['n_compared']})" if ref else "-"
        if ref and "identical_supports" in ref:
            gap += f", same support {100 * ref['identical_supports']:.0f}%"
        statuses = ", ".join(f"{k}:{v}" for k, v in (r.get("statuses") or {}).items())
        lines.append(
            f"| {r['method']} | {r['label']} | {r['dtype']} | {r['device']} | {r['n_targets']} | {fmt(r['seconds'])} | "
            f"{fmt(r['ms_per_target'])} | {speed} | {gap} | {fmt(r.get('rel_error_mean'))} | {fmt(r.get('l0_mean'))} | "
            f"{fmt(r.get('precision'))} | {fmt(r.get('recall'))} | {statuses} |")
    lines += ["", "`*` = baseline timed on a subset and extrapolated linearly to n.", "",
              "| baseline | targets timed | ms/target | setup (s) | total for all targets (s) | notes |",
              "|---|---|---|---|---|---|"]
    for b in report["baselines"]:
        notes = ", ".join(f"{k}={v}" for k, v in b["notes"].items())
        lines.append(f"| {b['name']} | {b['targets_timed']} | {b['ms_per_target']:.3g} | {b['setup_seconds']:.3g} | "
                     f"{b['extrapolated_seconds']:.3g}{' (extrapolated)' if b['extrapolated'] else ''} | {notes} |")
    lines += ["", "## Acceptance checks", ""]
    lines += [f"- **{c['status']}** ({c['check']}): {c['detail']}" for c in report["checks"]] or ["- not run"]
    return "\n".join(lines) + "\n"


def short(name: str) -> str:
    return (name.replace("sklearn ", "sk ").replace("orthogonal_mp_gram", "omp_gram")
            .replace("orthogonal_mp (no Gram)", "omp").replace("Lasso(positive=True) loop", "nn-lasso loop")
            .replace("cvxpy/CLARABEL ", "cvxpy "))


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"solvers-{report['arguments']['size']}-{report['space']}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(markdown(report))
    return json_path, md_path


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.solvers", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--n-targets", type=int, default=None, help="override the size's number of targets")
    p.add_argument("--main-targets", type=int, default=None,
                   help="solve only the first N targets in the main rows (checks still use their own sizes)")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                   help="package methods for the main rows (default: all for tiny/small; no cvxpy_* for medium/full)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype of the main rows")
    p.add_argument("--space", choices=["z", "residual"], default="z",
                   help="z: block-diagonal per-head problem; residual: mixed through a random W_O")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.02, help="L1 weight (targets are unit norm)")
    p.add_argument("--lasso-tol", type=float, default=1e-4, help="package lasso tol (relative duality gap)")
    p.add_argument("--nnls-tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=None, help="package max_iter (solver default if omitted)")
    p.add_argument("--n-nonzero", type=int, default=16, help="OMP budget for the main rows")
    p.add_argument("--eps", type=float, default=0.05, help="BPDN residual bound")
    p.add_argument("--check-tol", type=float, default=1e-8, help="package nn_lasso tol in check (a)")
    p.add_argument("--sklearn-tol", type=float, default=1e-6, help="scikit-learn Lasso tol (relative duality gap)")
    p.add_argument("--sklearn-max-iter", type=int, default=10000)
    p.add_argument("--n-sklearn", type=int, default=None, help="targets timed in the sklearn Lasso loops")
    p.add_argument("--n-omp-ref", type=int, default=None, help="targets timed in the sklearn OMP baselines")
    p.add_argument("--n-cvxpy", type=int, default=None, help="targets solved with cvxpy (and package cvxpy_*)")
    p.add_argument("--support-threshold", type=float, default=1e-6, help="|c| above this counts as selected")
    p.add_argument("--checks", nargs="*", choices=["a", "b", "c"], default=["a", "b", "c"],
                   help="acceptance checks to run (a: 2,048-target speed/accuracy, b: full-size CPU time and memory, "
                        "c: full-size GPU); '--checks' alone runs none")
    p.add_argument("--no-references", action="store_true", help="skip baselines (package timings only)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return {}
    report = Benchmark(args).run()
    json_path, md_path = write_report(report, args.out)
    report["paths"] = {"json": str(json_path), "markdown": str(md_path)}
    print(markdown(report))
    print(f"results: {json_path}\n         {md_path}")
    return report


if __name__ == "__main__":
    main()
