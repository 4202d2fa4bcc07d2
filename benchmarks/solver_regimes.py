"""The lasso, nn_lasso and NNLS on the demo world's real dictionaries, in every regime of issue 10, against the
per-target libraries at matched objective, in one process.

Run from the repository root::

    python -m benchmarks.solver_regimes                        # 256 targets, 32 per library, both spaces
    python -m benchmarks.solver_regimes --compare-with /tmp/sd_base/sparsedecomp   # also an older copy, same run

Regimes: ``space`` in ``z`` (block-diagonal per-head dictionary, the pipeline's default) and ``mixed`` (the same
atoms through the layer's ``W_O``, targets mixed and renormalised exactly as :mod:`sparsedecomp.jobs.solve` does);
``lasso`` and ``nn_lasso`` at ``alpha`` = 1 %, 5 % and 20 % of each target's ``alpha_max``; ``nnls``. Targets are
a seeded random subset of the concat SAE's unit decoder rows.

For each regime: the package's ms/target (solver prepared once, one warm-up, best of ``--repeats`` timed solves
of ``--n-targets``), the fraction of targets that end ``MAX_ITER``, and each library's ms/target on the first
``--n-ref`` of the same targets (float64; scikit-learn ``Lasso``, celer and skglm when installed (the ``bench``
extra), ``scipy.optimize.nnls``). ``rel.obj`` is ``(P_package - P_library) / P_library`` (NNLS: over
``0.5 ||y||^2``, as its optimum can be 0) averaged over the shared targets, the package's objective evaluated in float64 from its code: a negative value means the package
found the lower objective; a library above ``--match`` is flagged (its speed is then not at matched objective).
``ratio`` is the package's ms/target over the fastest library's (< 1: the package is faster). Everything is timed
in this one process, interleaved, so ratios hold on a loaded machine; ``uptime``'s load is printed with the table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

import sparsedecomp
from sparsedecomp.optimality import alpha_max as alpha_max_of

FRACTIONS = (0.01, 0.05, 0.2)


@dataclass
class Row:
    space: str
    method: str
    fraction: float | None
    package_ms: dict[str, float] = field(default_factory=dict)  # copy name -> ms/target
    max_iter: dict[str, float] = field(default_factory=dict)  # copy name -> fraction of targets at MAX_ITER
    objective: dict[str, np.ndarray] = field(default_factory=dict)  # copy name -> float64 objectives (n_ref)
    library_ms: dict[str, float] = field(default_factory=dict)
    library_objective: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.method if self.fraction is None else f"{self.method} {self.fraction:g}"


def load_copy(path: str, name: str) -> ModuleType:
    """Import another checkout's ``sparsedecomp`` package (its folder) under ``name``, beside this one (the
    package imports itself relatively, so the two never mix)."""
    folder = Path(path)
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def demo_problems(n_targets: int, seed: int, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor, list]]:
    """``space -> (targets, atoms, blocks)``: unit targets and atoms as the pipeline builds them; ``blocks`` are
    the per-head decoders (``z``) so that each package copy builds its own dictionary from the same numbers."""
    from sparsedecomp.demo import load_demo_world
    from sparsedecomp.dictionary import mix_targets
    from sparsedecomp.jobs.solve import concat_targets

    world = load_demo_world()
    dictionary = world.head_saes.dictionary(normalize=True)
    targets, _ = concat_targets(world.concat_sae)
    pick = torch.randperm(targets.shape[0], generator=torch.Generator().manual_seed(seed))[:n_targets]
    targets = targets[pick].to(dictionary.dtype)
    W_O = world.W_O.to(dictionary.dtype)
    mixed = mix_targets(targets, W_O)
    mixed = mixed / mixed.norm(dim=1, keepdim=True)
    blocks = [dictionary.block(h).to(dtype) for h in range(dictionary.n_heads)]
    return {
        "z": (targets.to(dtype), dictionary.atoms.to(dtype), blocks),
        "mixed": (mixed.to(dtype), dictionary.mix(W_O).atoms.to(dtype), []),
    }


def package_dictionary(package: ModuleType, atoms: torch.Tensor, blocks: list):
    dictionary = importlib.import_module(f"{package.__name__}.dictionary")
    if blocks:
        return dictionary.BlockDictionary.from_blocks(blocks, normalize=False)
    return dictionary.Dictionary.from_atoms(atoms, normalize=False)


def package_solver(package: ModuleType, method: str, fraction: float | None, tol: float | None):
    extra = {} if tol is None else {"tol": tol}
    solvers = importlib.import_module(f"{package.__name__}.solvers")
    if method == "nnls":
        return solvers.NNLS(**extra)
    return solvers.Lasso(alpha=fraction, alpha_is_fraction_of_max=True, nonnegative=method == "nn_lasso",
                                 **extra)


def objective64(targets: np.ndarray, codes: np.ndarray, atoms: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    residual = targets - codes @ atoms
    return 0.5 * (residual**2).sum(1) + alpha * np.abs(codes).sum(1)


def library_solvers(method: str) -> dict[str, callable]:
    """Name -> ``fit(X (d, n_atoms), y, alpha) -> code`` for every installed per-target library of ``method``."""
    if method == "nnls":
        from scipy.optimize import nnls

        return {"scipy nnls": lambda X, y, a: nnls(X, y, maxiter=50 * X.shape[1])[0]}
    positive = method == "nn_lasso"
    from sklearn.linear_model import Lasso as SkLasso

    # Each library minimises (1 / (2 d)) ||y - X w||^2 + a ||w||_1, so a = alpha / d.
    d_scaled = {}
    d_scaled["scikit-learn"] = lambda X, y, a: SkLasso(alpha=a / X.shape[0], positive=positive, fit_intercept=False,
                                                      tol=TOL, max_iter=100_000).fit(X, y).coef_
    try:
        from celer import Lasso as CelerLasso

        d_scaled["celer"] = lambda X, y, a: CelerLasso(alpha=a / X.shape[0], positive=positive, fit_intercept=False,
                                                      tol=TOL, max_iter=1000).fit(X, y).coef_
    except ImportError:
        pass
    try:
        from skglm import Lasso as SkglmLasso

        d_scaled["skglm"] = lambda X, y, a: SkglmLasso(alpha=a / X.shape[0], positive=positive, fit_intercept=False,
                                                      tol=TOL, max_iter=1000).fit(X, y).coef_
    except ImportError:
        pass
    return d_scaled


TOL = 1e-6  # the libraries' tol (relative duality gap for scikit-learn and celer; skglm: its KKT criterion)


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    copies = {"package": sparsedecomp}
    if args.compare_with:
        copies = {"before": load_copy(args.compare_with, "sparsedecomp_before"), "after": sparsedecomp}
    problems = demo_problems(args.n_targets, args.seed, dtype)
    rows = []
    for space in args.spaces:
        targets, atoms, blocks = problems[space]
        y64, atoms64 = targets[: args.n_ref].double(), atoms.double()
        X = np.asfortranarray(atoms64.numpy().T)
        for method in args.methods:
            for fraction in (None,) if method == "nnls" else args.fractions:
                row = Row(space, method, fraction)
                if method == "nnls":
                    alpha = np.zeros(args.n_ref)
                else:
                    alpha = fraction * alpha_max_of(y64, atoms64, nonnegative=method == "nn_lasso").numpy()
                prepared = {name: package_solver(pkg, method, fraction, args.tol).prepare(
                    package_dictionary(pkg, atoms, blocks)) for name, pkg in copies.items()}
                libraries = library_solvers(method)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for solver in prepared.values():
                        solver.solve(targets[:8])  # warm-up
                    for fit in libraries.values():
                        fit(X, y64[0].numpy(), alpha[0])  # warm-up (skglm compiles with numba on first use)
                    for _ in range(args.repeats):
                        for name, solver in prepared.items():
                            start = time.perf_counter()
                            dec = solver.solve(targets)
                            ms = 1e3 * (time.perf_counter() - start) / targets.shape[0]
                            row.package_ms[name] = min(row.package_ms.get(name, np.inf), ms)
                            row.max_iter[name] = float((dec.status == int(sparsedecomp.Status.MAX_ITER)).double().mean())
                            codes = dec.coefficients[: args.n_ref].double().numpy()
                            row.objective[name] = objective64(y64.numpy(), codes, atoms64.numpy(), alpha)
                        for name, fit in libraries.items():
                            codes = np.zeros((args.n_ref, atoms.shape[0]))
                            start = time.perf_counter()
                            for i, y in enumerate(y64.numpy()):
                                codes[i] = fit(X, y, alpha[i])
                            ms = 1e3 * (time.perf_counter() - start) / args.n_ref
                            row.library_ms[name] = min(row.library_ms.get(name, np.inf), ms)
                            row.library_objective[name] = objective64(y64.numpy(), codes, atoms64.numpy(), alpha)
                rows.append(row)
                print(format_row(row, args.match), flush=True)
    return rows


def format_row(row: Row, match: float) -> str:
    """One table row; the ratio is against the fastest library whose objective matches the package's (a library
    that stopped more than ``match`` above is left out of it, and flagged)."""
    cells = [f"{row.space:5s} {row.name:13s}"]
    newest = row.objective[list(row.objective)[-1]]  # the last copy timed (this checkout)
    for name, ms in row.package_ms.items():
        cells.append(f"{name}: {ms:7.2f} ms {100 * row.max_iter[name]:5.1f}% MAX_ITER")
    matched = {}
    for name, ms in row.library_ms.items():
        # NNLS's optimum can be ~0 (an exact fit), so its difference is relative to 0.5 ||y||^2 = 0.5 (unit targets).
        scale = 0.5 if row.method == "nnls" else row.library_objective[name]
        rel = float(np.mean((newest - row.library_objective[name]) / scale))
        if rel >= -match:
            matched[name] = ms
        flag = "" if rel >= -match else " (objective not matched)"
        cells.append(f"{name}: {ms:7.2f} ms rel.obj {rel:+.1e}{flag}")
    if matched:
        best = min(matched, key=matched.get)
        for name, ms in row.package_ms.items():
            cells.append(f"ratio {name}/{best}: {ms / matched[best]:.2f}")
    return " | ".join(cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-targets", type=int, default=256)
    p.add_argument("--n-ref", type=int, default=32, help="targets each per-target library solves")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--tol", type=float, default=None, help="package tol (default: each solver's default)")
    p.add_argument("--spaces", nargs="+", choices=["z", "mixed"], default=["z", "mixed"])
    p.add_argument("--methods", nargs="+", choices=["lasso", "nn_lasso", "nnls"], default=["lasso", "nn_lasso", "nnls"])
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    p.add_argument("--match", type=float, default=1e-4,
                   help="a library whose objective is lower than the package's by more than this is flagged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compare-with", default=None,
                   help="another checkout's sparsedecomp folder, timed beside this one (before/after)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"load: {os.getloadavg()}  torch threads {args.threads}  dtype {args.dtype}", flush=True)
    run(args)
    print(f"load: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
