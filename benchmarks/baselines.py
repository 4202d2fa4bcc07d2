"""Reference solvers the benchmark compares against: scikit-learn loops and cvxpy/Clarabel, per target, float64.

These are deliberately the plain, documented uses of each library (no block tricks), so that a speed-up measured
against them is a speed-up over what a user would otherwise write. Every function returns a :class:`Baseline`
holding the codes (``(m, n_atoms)`` float64 numpy, same convention as the package: ``y ~= code @ atoms``) and the
measured wall time of the ``m`` targets it solved.

Objectives (``D`` the ``(n_atoms, d)`` atoms, ``y`` one target):

* lasso: ``0.5 ||y - c D||^2 + alpha ||c||_1`` (``c >= 0`` when positive). scikit-learn's ``Lasso`` minimises
  ``(1 / (2 d)) ||y - X w||^2 + a ||w||_1`` with ``X = D^T``; multiplying by ``d`` gives ours with
  ``alpha = a d``, so it is fitted with ``a = alpha / d``. Its ``tol`` is a duality gap relative to ``||y||^2``,
  the same scale as the package's ``tol``.
* OMP: greedy selection of ``n_nonzero`` atoms with least-squares refits (``orthogonal_mp_gram`` on the Gram
  matrix ``D D^T``, and ``orthogonal_mp`` on ``D^T`` directly).
* NNLS: ``0.5 ||y - c D||^2`` with ``c >= 0``; BPDN: ``||c||_1`` subject to ``||y - c D||_2 <= eps``, ``c >= 0``
  (targets are unit-norm, so ``eps`` is also relative to ``||y||`` as in the package).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Baseline:
    """Codes and timing of one reference solver on ``n_solved`` targets."""

    name: str
    codes: np.ndarray
    seconds: float
    n_solved: int
    setup_seconds: float = 0.0
    notes: dict = field(default_factory=dict)

    @property
    def per_target(self) -> float:
        return self.seconds / max(self.n_solved, 1)

    def extrapolate(self, n_targets: int) -> float:
        """Total time for ``n_targets`` targets: one-off setup plus a linear per-target cost."""
        return self.setup_seconds + self.per_target * n_targets


def sklearn_lasso_loop(atoms: np.ndarray, targets: np.ndarray, *, alpha: float, positive: bool, tol: float,
                       max_iter: int = 1000) -> Baseline:
    """``sklearn.linear_model.Lasso(alpha=alpha/d, positive=..., fit_intercept=False)`` fitted once per target."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    d = atoms.shape[1]
    X = np.asfortranarray(atoms.T)
    model = Lasso(alpha=alpha / d, positive=positive, fit_intercept=False, tol=tol, max_iter=max_iter)
    codes = np.zeros((targets.shape[0], atoms.shape[0]))
    not_converged = 0
    start = time.perf_counter()
    for i, y in enumerate(targets):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X, y)
        not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        codes[i] = model.coef_
    seconds = time.perf_counter() - start
    name = "sklearn Lasso(positive=True) loop" if positive else "sklearn Lasso loop"
    return Baseline(name, codes, seconds, targets.shape[0],
                    notes={"tol": tol, "max_iter": max_iter, "not_converged": not_converged, "sklearn_alpha": alpha / d})


def sklearn_omp_gram(atoms: np.ndarray, targets: np.ndarray, *, n_nonzero: int) -> Baseline:
    """``sklearn.linear_model.orthogonal_mp_gram(D D^T, D y^T, n_nonzero_coefs=n_nonzero)`` on all targets at
    once. The Gram matrix is computed once (``setup_seconds``); scikit-learn copies it for every target."""
    from sklearn.linear_model import orthogonal_mp_gram

    start = time.perf_counter()
    gram = atoms @ atoms.T
    setup = time.perf_counter() - start
    start = time.perf_counter()
    Xy = atoms @ targets.T
    codes = orthogonal_mp_gram(gram, Xy, n_nonzero_coefs=n_nonzero)
    seconds = time.perf_counter() - start
    codes = np.asarray(codes).reshape(atoms.shape[0], -1).T
    return Baseline("sklearn orthogonal_mp_gram", np.ascontiguousarray(codes), seconds, targets.shape[0],
                    setup_seconds=setup, notes={"n_nonzero": n_nonzero, "gram_bytes": gram.nbytes})


def sklearn_omp(atoms: np.ndarray, targets: np.ndarray, *, n_nonzero: int) -> Baseline:
    """``sklearn.linear_model.orthogonal_mp(D^T, y^T, precompute=False)``: Cholesky OMP without a Gram matrix
    (a second, often faster, scikit-learn baseline when ``n_atoms`` is large)."""
    from sklearn.linear_model import orthogonal_mp

    start = time.perf_counter()
    codes = orthogonal_mp(np.asfortranarray(atoms.T), targets.T, n_nonzero_coefs=n_nonzero, precompute=False)
    seconds = time.perf_counter() - start
    codes = np.asarray(codes).reshape(atoms.shape[0], -1).T
    return Baseline("sklearn orthogonal_mp (no Gram)", np.ascontiguousarray(codes), seconds, targets.shape[0],
                    notes={"n_nonzero": n_nonzero})


def cvxpy_reference(atoms: np.ndarray, targets: np.ndarray, *, kind: str, alpha: float = 0.0, eps: float = 0.0,
                    solver: str = "CLARABEL") -> Baseline:
    """One cvxpy problem per target, compiled once with the target as a parameter and re-solved.

    ``kind`` is ``lasso``, ``nn_lasso``, ``nnls`` or ``bpdn``. The atom matrix is handed over sparse, so the
    block-diagonal zeros of a z-space dictionary are not stored (the same problem, a faster factorisation).
    ``setup_seconds`` is the first solve's extra cost (compilation); ``seconds`` covers all solves.
    """
    import cvxpy as cp
    import scipy.sparse as sp

    n_atoms, d = atoms.shape
    A = sp.csr_matrix(atoms.T) if np.count_nonzero(atoms) < 0.5 * atoms.size else atoms.T
    # BPDN is non-negative, as the package's cvxpy_bpdn: comparing against the signed problem would be unfair.
    c = cp.Variable(n_atoms, nonneg=kind in ("nn_lasso", "nnls", "bpdn"))
    y = cp.Parameter(d)
    fit = 0.5 * cp.sum_squares(A @ c - y)
    if kind in ("lasso", "nn_lasso"):
        problem = cp.Problem(cp.Minimize(fit + alpha * cp.norm1(c)))
    elif kind == "nnls":
        problem = cp.Problem(cp.Minimize(fit))
    elif kind == "bpdn":
        problem = cp.Problem(cp.Minimize(cp.norm1(c)), [cp.norm(A @ c - y, 2) <= eps])
    else:
        raise ValueError(f"unknown kind {kind!r}; choose lasso, nn_lasso, nnls or bpdn")
    codes = np.zeros((targets.shape[0], n_atoms))
    times, statuses = [], []
    for i, target in enumerate(targets):
        y.value = target
        start = time.perf_counter()
        try:
            problem.solve(solver=solver)
            status = problem.status
        except cp.error.SolverError as error:
            status = f"solver error: {error}"
        times.append(time.perf_counter() - start)
        statuses.append(status)
        if c.value is not None:
            codes[i] = c.value
    times = np.asarray(times)
    setup = float(times[0] - np.median(times[1:])) if len(times) > 1 else 0.0
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    return Baseline(f"cvxpy/{solver} {kind}", codes, float(times.sum()) - max(setup, 0.0), len(targets),
                    setup_seconds=max(setup, 0.0), notes={"statuses": counts, "alpha": alpha, "eps": eps})
