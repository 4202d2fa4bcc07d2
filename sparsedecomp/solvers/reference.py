"""Exact reference solvers on cvxpy + Clarabel (interior point), for checking the fast solvers on small problems.

Every problem is solved in float64 whatever the input dtype (the answer comes back in the input's dtype and
device), with one pinned solver (Clarabel) at tightened tolerances (:data:`CLARABEL_SETTINGS`). The cvxpy problem
is built once per dictionary in :meth:`~sparsedecomp.solvers.base.Solver.precompute`, with the target as a
``cp.Parameter`` (DPP), so cvxpy canonicalises once and every target only pays for the solve.

Each target ``y`` is solved in unit scale, ``u = y / ||y||``, and the code scaled back, ``c = ||y|| b``. The three
problems are homogeneous under that change (the lasso weight becomes ``alpha / ||y||``), so Clarabel's absolute
tolerances mean the same thing for every target. A zero target gets the zero code without a solve: it is optimal
for all three problems.

Nothing is returned silently. A row is ``Status.NUMERICAL_ERROR`` when cvxpy/Clarabel reports anything but
``optimal`` (``optimal_inaccurate``, also after one retry at Clarabel's default tolerances, keeps its code but is
flagged; ``infeasible``, ``unbounded`` or a solver error give NaN coefficients and objective and an infinite
certificate), or when the solver-independent certificate computed afterwards from the returned code exceeds
``tol``.

An interior-point code whose objective is accurate to ``tol`` has a gradient accurate only to about ``sqrt(tol)``,
which the NNLS KKT certificate would see; the lasso and NNLS codes are therefore polished by Newton steps on
their support (:func:`polish`), kept only where that improves the certificate.

Interior-point codes are never exactly sparse (off-support entries are about ``1e-12`` of the largest), so entries
with ``|b_j| <= zero_tol * max(max_j |b_j|, 1 / max_j ||d_j||)`` (``b`` the unit-scale code) are set to exactly 0
before the certificate is computed: if that changed the optimum it would show in the certificate. Negative
round-off in non-negative codes is clipped the same way.

These solvers loop over targets in Python (tens of milliseconds per target); use them on problems of hundreds of
atoms at most.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from ..codes import Codes
from ..decomposition import DUALITY_GAP, KKT_VIOLATION, Status
from ..dictionary import Dictionary
from ..optimality import (
    alpha_max,
    lasso_duality_gap,
    lasso_objective,
    least_squares_objective,
    bpdn_certificate,
    nonnegative_kkt_violation,
)
from ..validation import check_bool, check_lasso_alpha, check_positive
from .base import ChunkResult, Solver

if TYPE_CHECKING:  # cvxpy takes about a second to import: only the reference solvers pay for it, when used.
    import cvxpy as cp

CLARABEL_SETTINGS: dict[str, Any] = {
    "tol_gap_abs": 1e-10,
    "tol_gap_rel": 1e-10,
    "tol_feas": 1e-10,
    "tol_infeas_abs": 1e-10,
    "tol_infeas_rel": 1e-10,
    "tol_ktratio": 1e-8,
    "max_iter": 500,
}
"""Clarabel options: tolerances two orders tighter than its defaults (``1e-8``; ``1e-6`` for the KKT ratio)."""

CLARABEL_FALLBACK_SETTINGS: dict[str, Any] = {
    "tol_gap_abs": 1e-8,
    "tol_gap_rel": 1e-8,
    "tol_feas": 1e-8,
    "tol_infeas_abs": 1e-8,
    "tol_infeas_rel": 1e-8,
    "tol_ktratio": 1e-6,
    "max_iter": 500,
}
"""Clarabel's own default tolerances, tried once when the tight ones end in ``optimal_inaccurate`` (degenerate
problems, e.g. an exact fit with a non-unique code, stall just short of ``1e-10``). Every key is given because
cvxpy's cached Clarabel solver keeps settings from the previous solve. If this solve is not ``optimal`` either,
the row is flagged."""


@dataclass(frozen=True)
class ReferenceProgram:
    """A cvxpy problem built for one dictionary, reused for every target.

    Attributes:
        problem: the parametrised problem.
        target: ``cp.Parameter`` of shape ``(d,)`` holding the unit-norm target ``u = y / ||y||``.
        code: ``cp.Variable`` of shape ``(n_atoms,)``, the unit-scale code ``b``.
        weight: ``cp.Parameter`` holding ``alpha / ||y||`` (lasso only), else ``None``.
        dual_source: a second-order-cone constraint whose dual vector gives a dual point (BPDN only), else ``None``.
        atoms: the dictionary's atoms as a float64 CPU tensor, for the certificates.
        code_scale: ``1 / max_j ||d_j||``, the size of a unit-scale code entry that moves the reconstruction by
            as much as the (unit) target; the floor of the dust threshold.
    """

    problem: cp.Problem
    target: cp.Parameter
    code: cp.Variable
    weight: cp.Parameter | None
    dual_source: cp.SOC | None
    atoms: Tensor
    code_scale: float


@dataclass(frozen=True, kw_only=True)
class CvxpyReference(Solver):
    """Shared loop of the reference solvers; subclasses give the problem, objective and certificate.

    Attributes:
        tol: largest certificate accepted as ``CONVERGED``; a row above it is ``NUMERICAL_ERROR`` even if
            Clarabel reported ``optimal``.
        zero_tol: relative size below which code entries are set to exactly 0 (see the module docstring).
    """

    tol: float = 1e-6
    zero_tol: float = 1e-9
    # Targets are solved one at a time in Python, so chunks cost nothing in speed; small ones let a progress bar
    # (which advances per chunk) move every few seconds instead of every half hour.
    chunk_size: int = 16

    nonnegative_code: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.tol, "tol")
        check_positive(self.zero_tol, "zero_tol", allow_zero=True)

    # -- what a subclass provides ----------------------------------------------------------------------------------
    def build(
        self, atoms: np.ndarray, target: cp.Parameter, code: cp.Variable
    ) -> tuple[cp.Problem, cp.Parameter | None, cp.SOC | None]:
        """The problem in unit scale on ``atoms`` (``(n_atoms, d)`` float64), its lasso weight parameter and the
        cone constraint whose dual vector is a dual point (see :class:`CvxpyBPDN`)."""
        raise NotImplementedError

    def objective(self, targets: Tensor, coefficients: Tensor, atoms: Tensor) -> Tensor:
        raise NotImplementedError

    def certificate(self, targets: Tensor, coefficients: Tensor, atoms: Tensor, duals: Tensor) -> Tensor:
        """Per-target certificate; ``duals`` (``(n, d)``, NaN where unavailable) are the solver's dual points."""
        raise NotImplementedError

    def l1_weights(self, targets: Tensor, atoms: Tensor) -> Tensor | None:
        """``(n,)`` float64 L1 weight of each target's problem (0 for NNLS; the lasso's ``alpha``, or its fraction
        of the target's ``alpha_max``), also used by :func:`polish`; ``None`` where neither applies (BPDN)."""
        return None

    # -- the shared work -------------------------------------------------------------------------------------------
    def precompute(self, dictionary: Dictionary) -> ReferenceProgram:
        import cvxpy as cp

        atoms = dictionary.atoms.detach().to(device="cpu", dtype=torch.float64)
        target = cp.Parameter(dictionary.dim)
        code = cp.Variable(dictionary.n_atoms)
        matrix = atoms.numpy()
        if dictionary.is_block_diagonal:
            # Mostly zeros: a sparse constant lets Clarabel factor one small system per head instead of one
            # dense (n_atoms x d) system, which is what makes full-size (16,384-atom) references feasible.
            matrix = scipy.sparse.csr_array(matrix)
        problem, weight, dual_source = self.build(matrix, target, code)
        if not problem.is_dcp(dpp=True):
            # A programming error, not a user error: without DPP every solve would re-canonicalise.
            raise RuntimeError(f"{self.name}: the reference problem is not DPP-compliant")
        return ReferenceProgram(
            problem=problem,
            target=target,
            code=code,
            weight=weight,
            dual_source=dual_source,
            atoms=atoms,
            code_scale=1.0 / float(atoms.norm(dim=1).max()),
        )

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: ReferenceProgram) -> ChunkResult:
        atoms = prepared.atoms
        y = targets.detach().to(device="cpu", dtype=torch.float64)
        n = y.shape[0]
        codes = torch.zeros(n, dictionary.n_atoms, dtype=torch.float64)
        duals = torch.full((n, dictionary.dim), float("nan"), dtype=torch.float64)
        iterations = torch.zeros(n, dtype=torch.long)
        solved = torch.ones(n, dtype=torch.bool)  # False: the solver gave no code at all
        flagged = torch.zeros(n, dtype=torch.bool)  # True: not reported optimal
        norms = y.norm(dim=1)
        weights = self.l1_weights(y, atoms)
        for i in range(n):
            norm = float(norms[i])
            if norm == 0.0:
                continue
            # 0.5||s u - s b D||^2 + w ||s b||_1 = s^2 (0.5||u - b D||^2 + (w / s) ||b||_1): unit scale, weight w / s.
            unit_weight = 0.0 if weights is None else float(weights[i]) / norm
            code, dual, n_iter, ok = self._solve_one(prepared, (y[i] / norm).numpy(), unit_weight)
            iterations[i] = n_iter
            if code is None:
                solved[i] = False
                flagged[i] = True
                continue
            flagged[i] = not ok
            codes[i] = norm * self._clean(torch.from_numpy(code), prepared.code_scale)
            if dual is not None:
                duals[i] = torch.from_numpy(dual)

        certificate = self.certificate(y, codes, atoms, duals)
        # Polish only what the interior point left uncertified: polishing costs a k x k solve per row.
        rough = ~(certificate <= self.tol)
        if weights is not None and bool(rough.any()):
            polished = polish(y, codes, atoms, weights, rows=rough)
            polished_certificate = self.certificate(y, polished, atoms, duals)
            better = polished_certificate < certificate
            codes = torch.where(better[:, None], polished, codes)
            certificate = torch.where(better, polished_certificate, certificate)
        objective = self.objective(y, codes, atoms)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        codes = torch.where(solved[:, None], codes, nan)
        objective = torch.where(solved, objective, nan)
        certificate = torch.where(solved, certificate, torch.tensor(float("inf"), dtype=torch.float64))
        failed = flagged | ~(certificate <= self.tol)
        status = torch.where(failed, int(Status.NUMERICAL_ERROR), int(Status.CONVERGED))

        def back(t: Tensor) -> Tensor:
            return t.to(device=targets.device, dtype=targets.dtype if t.is_floating_point() else t.dtype)

        return ChunkResult(
            codes=Codes.from_dense(back(codes)),
            objective=back(objective),
            certificate=back(certificate),
            iterations=back(iterations),
            status=back(status),
        )

    def _solve_one(
        self, program: ReferenceProgram, unit_target: np.ndarray, unit_weight: float
    ) -> tuple[np.ndarray | None, np.ndarray | None, int, bool]:
        """Solve for one unit-norm target: (unit-scale code or None, dual point or None, iterations, reported
        optimal)."""
        import cvxpy as cp

        program.target.value = unit_target
        if program.weight is not None:
            program.weight.value = unit_weight
        n_iter = 0
        for settings in (CLARABEL_SETTINGS, CLARABEL_FALLBACK_SETTINGS):
            try:
                with warnings.catch_warnings():
                    # cvxpy warns "Solution may be inaccurate"; the row is flagged through its status instead.
                    warnings.simplefilter("ignore")
                    program.problem.solve(solver=cp.CLARABEL, **settings)
            except cp.SolverError:
                return None, None, n_iter, False
            stats = program.problem.solver_stats
            n_iter += int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0
            if program.problem.status != cp.OPTIMAL_INACCURATE:
                break
        value = program.code.value
        if program.problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or value is None:
            return None, None, n_iter, False
        value = np.asarray(value, dtype=np.float64)
        if not np.isfinite(value).all():
            return None, None, n_iter, False
        dual = None
        if program.dual_source is not None and program.dual_source.dual_value is not None:
            # cvxpy's SOC dual is (lambda, w) with ||w|| <= lambda; the BPDN dual point is z = -w. A dual point is
            # scale-free (y = ||y|| u leaves z . d_j <= 1 unchanged), so it serves the unscaled target as is.
            dual = -np.asarray(program.dual_source.dual_value[1], dtype=np.float64).reshape(-1)
        return value, dual, n_iter, program.problem.status == cp.OPTIMAL

    def _clean(self, code: Tensor, code_scale: float) -> Tensor:
        if self.nonnegative_code:
            code = code.clamp_min(0)
        # Relative to the largest entry, but never below the size of a code that reconstructs a unit target:
        # when the exact answer is the zero code, every entry is dust.
        largest = max(float(code.abs().max()), code_scale)
        return torch.where(code.abs() <= self.zero_tol * largest, torch.zeros_like(code), code)


@dataclass(frozen=True, kw_only=True)
class CvxpyLasso(CvxpyReference):
    """Reference lasso: ``min_c 0.5 ||y - c D||^2 + alpha ||c||_1`` (with ``c >= 0`` when ``nonnegative``).

    Certificate: :func:`~sparsedecomp.optimality.lasso_duality_gap`, relative to ``||y||^2``.

    Attributes:
        alpha: the L1 weight (> 0), in the units of ``y . d_j``; ``alpha >= alpha_max(y)`` gives the zero code.
        nonnegative: constrain the code to ``c >= 0``.
        alpha_is_fraction_of_max: read ``alpha`` as a fraction of each target's own
            :func:`~sparsedecomp.optimality.alpha_max`, as :class:`~sparsedecomp.solvers.proximal.Lasso` does.
    """

    certificate_kind: ClassVar[str] = DUALITY_GAP

    alpha: float
    nonnegative: bool = False
    alpha_is_fraction_of_max: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lasso_alpha(self.alpha, self.alpha_is_fraction_of_max)
        check_bool(self.nonnegative, "nonnegative")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "cvxpy_nn_lasso" if self.nonnegative else "cvxpy_lasso"

    @property
    def nonnegative_code(self) -> bool:  # type: ignore[override]
        return self.nonnegative

    def build(
        self, atoms: np.ndarray, target: cp.Parameter, code: cp.Variable
    ) -> tuple[cp.Problem, cp.Parameter, None]:
        import cvxpy as cp

        weight = cp.Parameter(nonneg=True)
        fit = 0.5 * cp.sum_squares(target - code @ atoms)
        if self.nonnegative:
            return cp.Problem(cp.Minimize(fit + weight * cp.sum(code)), [code >= 0]), weight, None
        return cp.Problem(cp.Minimize(fit + weight * cp.norm1(code))), weight, None

    def l1_weights(self, targets: Tensor, atoms: Tensor) -> Tensor:
        if self.alpha_is_fraction_of_max:
            return self.alpha * alpha_max(targets, atoms, nonnegative=self.nonnegative)
        return torch.full((targets.shape[0],), float(self.alpha), dtype=targets.dtype, device=targets.device)

    def objective(self, targets: Tensor, coefficients: Tensor, atoms: Tensor) -> Tensor:
        return lasso_objective(targets, coefficients, atoms, self.l1_weights(targets, atoms))

    def certificate(self, targets: Tensor, coefficients: Tensor, atoms: Tensor, duals: Tensor) -> Tensor:
        return lasso_duality_gap(targets, coefficients, atoms, self.l1_weights(targets, atoms),
                                 nonnegative=self.nonnegative)


@dataclass(frozen=True, kw_only=True)
class CvxpyNNLS(CvxpyReference):
    """Reference non-negative least squares: ``min_c 0.5 ||y - c D||^2`` s.t. ``c >= 0``.

    Certificate: :func:`~sparsedecomp.optimality.nonnegative_kkt_violation`, relative to
    ``||y|| * max_j ||d_j||``. With more atoms than dimensions the optimal code need not be unique (the
    residual and objective are); this returns whichever optimum Clarabel reaches.
    """

    name: ClassVar[str] = "cvxpy_nnls"
    certificate_kind: ClassVar[str] = KKT_VIOLATION

    def build(self, atoms: np.ndarray, target: cp.Parameter, code: cp.Variable) -> tuple[cp.Problem, None, None]:
        import cvxpy as cp

        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(target - code @ atoms)), [code >= 0]), None, None

    def l1_weights(self, targets: Tensor, atoms: Tensor) -> Tensor:
        return targets.new_zeros(targets.shape[0])

    def objective(self, targets: Tensor, coefficients: Tensor, atoms: Tensor) -> Tensor:
        return least_squares_objective(targets, coefficients, atoms)

    def certificate(self, targets: Tensor, coefficients: Tensor, atoms: Tensor, duals: Tensor) -> Tensor:
        return nonnegative_kkt_violation(targets, coefficients, atoms)


@dataclass(frozen=True, kw_only=True)
class CvxpyBPDN(CvxpyReference):
    """Reference non-negative basis-pursuit denoising:
    ``min_c ||c||_1`` s.t. ``||y - c D||_2 <= eps * ||y||`` and ``c >= 0``.

    ``eps`` is *relative to* ``||y||``: the same ``eps`` asks every target for the same relative error, and
    ``eps >= 1`` makes the zero code optimal. ``eps = 0`` is exact basis pursuit (``y = c D``). With ``c >= 0``
    the problem can be infeasible (a target outside the cone of the atoms, farther than ``eps ||y||``); such rows
    are ``NUMERICAL_ERROR`` with NaN codes.

    Certificate (kind ``relative_duality_gap``): the larger of

    * the relative duality gap ``(P - D) / P`` (0 when ``P = 0``), ``P = sum(c)``. The dual problem is
      ``max_z z . y - eps ||y|| ||z||`` s.t. ``z . d_j <= 1`` for all ``j``. Any ``z`` scaled into that set,
      ``z / max(1, max_j z . d_j)``, gives a lower bound ``D`` on the optimum; ``D`` is the best of ``z = 0``,
      ``z`` parallel to the residual ``r = y - c D`` (optimal at the exact solution, by the KKT conditions) and
      Clarabel's own dual vector. The residual direction alone is only accurate to about the square root of the
      solver's tolerance (near the cone's boundary the direction of ``r`` is ill-determined), so the solver's
      dual is used too; it is checked, not trusted: it is made feasible and its value computed here;
    * the relative constraint violation ``max(||r|| - eps ||y||, 0) / ||y||`` (weak duality needs a feasible
      code, so this is reported too).

    Both are dimensionless and zero exactly at the optimum. A residual with ``max_j (r . d_j) <= 0`` but
    ``r . y > eps ||y|| ||r||`` proves the problem infeasible; the certificate is then infinite.

    Attributes:
        eps: relative residual bound (>= 0).
    """

    name: ClassVar[str] = "cvxpy_bpdn"
    certificate_kind: ClassVar[str] = DUALITY_GAP

    eps: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.eps, "eps", allow_zero=True)

    def build(self, atoms: np.ndarray, target: cp.Parameter, code: cp.Variable) -> tuple[cp.Problem, None, cp.SOC]:
        import cvxpy as cp

        # In unit scale the bound is ||u - b D|| <= eps: no parameter needed beyond the target. An explicit cone
        # constraint (rather than `norm(...) <= eps`) exposes the dual vector, not just its norm.
        cone = cp.SOC(cp.Constant(float(self.eps)), target - code @ atoms)
        return cp.Problem(cp.Minimize(cp.sum(code)), [code >= 0, cone]), None, cone

    def objective(self, targets: Tensor, coefficients: Tensor, atoms: Tensor) -> Tensor:
        return coefficients.abs().sum(dim=1)

    def certificate(self, targets: Tensor, coefficients: Tensor, atoms: Tensor, duals: Tensor) -> Tensor:
        return bpdn_certificate(targets, coefficients, atoms, self.eps, duals=duals)


# Largest support, in multiples of the dimension, that :func:`polish` will try (see there).
POLISH_MAX_SUPPORT_PER_DIM = 4


def polish(targets: Tensor, coefficients: Tensor, atoms: Tensor, alpha: float | Tensor, *,
           rows: Tensor | None = None) -> Tensor:
    """Newton steps on the support of each code, keeping its signs: the minimum-norm ``delta`` on the support
    ``S`` (signs ``s``) that solves the stationarity conditions ``(y - (c + delta) D) D_S^T = alpha s``, i.e.
    ``delta_S (D_S D_S^T) = r D_S^T - alpha s``. Entries the step would push through zero leave the support
    (they were interior-point dust on atoms the optimum does not use) and the step is recomputed.

    Why: an interior-point solution with objective accurate to ``tol`` has a gradient accurate only to about
    ``sqrt(tol)`` (the NNLS KKT certificate sees about ``1e-5``); on the right support one linear solve restores
    the gradient to rounding. The caller keeps the polished code only where its certificate is better. ``alpha`` is
    one L1 weight or one per target (``(n,)``).

    Only ``rows`` (a boolean mask; all by default) are polished, and only codes with at most
    ``POLISH_MAX_SUPPORT_PER_DIM * d`` non-zeros: each round costs ``O(k^3)``, and interior-point NNLS codes on
    an overcomplete dictionary can keep all ``n_atoms`` atoms (16,384 at full size). Moderate dust above ``d``
    is fine: the rounds drop it until the support is a vertex.
    """
    out = coefficients.clone()
    alphas = alpha if isinstance(alpha, Tensor) else torch.full((coefficients.shape[0],), float(alpha))
    for i in range(coefficients.shape[0]):
        if rows is not None and not bool(rows[i]):
            continue
        support = (coefficients[i] != 0).nonzero().squeeze(1)
        if support.numel() > POLISH_MAX_SUPPORT_PER_DIM * atoms.shape[1]:
            continue
        signs = coefficients[i, support].sign()
        while support.numel() > 0:
            sub = atoms[support]
            current = torch.zeros_like(coefficients[i])
            current[support] = coefficients[i, support]
            rhs = sub @ (targets[i] - current @ atoms) - float(alphas[i]) * signs
            delta = torch.linalg.lstsq(sub @ sub.T, rhs[:, None], driver="gelsd").solution[:, 0]
            step = coefficients[i, support] + delta
            keep = step * signs > 0
            if bool(keep.all()):
                out[i] = 0
                out[i, support] = step
                break
            support, signs = support[keep], signs[keep]
    return out
