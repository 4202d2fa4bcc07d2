"""Solver-independent objectives and optimality certificates, batched over targets.

All functions take ``targets`` ``y`` of shape ``(n, d)``, ``coefficients`` ``c`` of shape ``(n, n_atoms)`` and
``atoms`` ``D`` of shape ``(n_atoms, d)`` (a tensor or a :class:`~sparsedecomp.Dictionary`); residual ``r = y - c D``, correlations ``g = r D^T`` (the negative
gradient of the smooth part ``0.5 ||y - c D||^2``).

Lasso, ``P(c) = 0.5 ||y - c D||^2 + alpha ||c||_1`` (with ``c >= 0`` for the non-negative lasso).
Its dual is ``max_theta 0.5 ||y||^2 - 0.5 ||y - theta||^2`` subject to ``|theta D^T|_inf <= alpha``
(``max(theta D^T) <= alpha`` when non-negative). Scaling the residual into the dual feasible set,
``theta = r / max(1, ||g||_inf / alpha)`` (``max(g)_+`` when non-negative), gives the duality gap
``P(c) - D(theta) >= 0``, zero exactly at the optimum. We report it relative to ``||y||^2``.

NNLS (``alpha = 0``, ``c >= 0``) has no bounded dual scaling, so it is certified by the KKT conditions:
``c_j > 0 => g_j = 0`` and ``c_j = 0 => g_j <= 0``. The violation ``max_j`` of ``|g_j|`` on the support and
``max(g_j, 0)`` off it is reported relative to ``||y|| * max_j ||d_j||`` (dimensionless; zero at the optimum).
The same KKT form with ``alpha > 0`` (``c_j > 0 => g_j = alpha``, ``c_j = 0 => g_j <= alpha``) serves as a
second certificate for the non-negative lasso.

Non-negative basis-pursuit denoising (``min ||c||_1`` s.t. ``||y - c D|| <= eps ||y||``, ``c >= 0``) is certified by
:func:`bpdn_certificate`: the larger of its relative duality gap and its relative constraint violation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dictionary import Dictionary


def residual(targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary) -> Tensor:
    """``r = y - c D``."""
    atoms = _as_atoms(atoms)
    return targets - coefficients @ atoms


def least_squares_objective(targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary) -> Tensor:
    """``0.5 ||y - c D||^2`` per target."""
    atoms = _as_atoms(atoms)
    return 0.5 * residual(targets, coefficients, atoms).pow(2).sum(dim=1)


def lasso_objective(targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary, alpha: float | Tensor) -> Tensor:
    """``0.5 ||y - c D||^2 + alpha ||c||_1`` per target (``alpha`` a scalar or ``(n,)``)."""
    atoms = _as_atoms(atoms)
    return least_squares_objective(targets, coefficients, atoms) + _as_column(alpha, targets).squeeze(1) * coefficients.abs().sum(dim=1)


def alpha_max(targets: Tensor, atoms: Tensor | Dictionary, *, nonnegative: bool = False) -> Tensor:
    """Smallest ``alpha`` for which the (non-negative) lasso solution is zero, per target:
    ``max_j |y . d_j|`` (``max_j (y . d_j)_+`` when non-negative)."""
    atoms = _as_atoms(atoms)
    corr = targets @ atoms.T
    if nonnegative:
        return corr.max(dim=1).values.clamp_min(0)
    return corr.abs().max(dim=1).values


def lasso_duality_gap(
    targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary, alpha: float | Tensor, *, nonnegative: bool = False
) -> Tensor:
    """Duality gap of the (non-negative) lasso, relative to ``||y||^2`` (0 for a zero target and zero code).

    Infinite when a non-negative problem is handed a code with negative entries (it is then infeasible).
    """
    atoms = _as_atoms(atoms)
    r = residual(targets, coefficients, atoms)
    g = r @ atoms.T
    alpha_vec = _as_column(alpha, targets).squeeze(1).expand(targets.shape[0])
    worst = g.max(dim=1).values.clamp_min(0) if nonnegative else g.abs().max(dim=1).values
    gap = lasso_gap_from_parts(
        worst=worst,
        residual_sq=r.pow(2).sum(dim=1),
        l1=coefficients.abs().sum(dim=1),
        code_dot_corr=(coefficients * g).sum(dim=1),
        alpha=alpha_vec,
    )
    y2 = targets.pow(2).sum(dim=1)
    rel = torch.where(y2 > 0, gap / y2.clamp_min(torch.finfo(targets.dtype).tiny), gap)
    if nonnegative:
        rel = torch.where((coefficients < 0).any(dim=1), torch.full_like(rel, float("inf")), rel)
    return rel


def lasso_gap_from_parts(
    *, worst: Tensor, residual_sq: Tensor, l1: Tensor, code_dot_corr: Tensor, alpha: Tensor
) -> Tensor:
    """The lasso duality gap ``P(c) - D(s r)`` from per-target sums, in a form without cancellation.

    ``worst`` is ``||g||_inf`` (``max(g)_+`` when non-negative), ``residual_sq`` ``||r||^2``, ``l1`` ``||c||_1`` and
    ``code_dot_corr`` ``c . g``; the dual scaling is ``s = 1 / max(1, worst / alpha)``. Since
    ``r . y = ||r||^2 + c . g``, the textbook gap ``0.5 ||r||^2 + alpha ||c||_1 - s r.y + 0.5 s^2 ||r||^2`` equals
    ``0.5 (1 - s)^2 ||r||^2 + (alpha ||c||_1 - s c . g)``, a sum of two non-negative terms (``s |g_j| <= alpha``).
    The textbook form subtracts two numbers of size ``||y||^2``, which caps float32 at a relative gap of about
    ``1e-6``; this one does not.
    """
    scale = 1.0 / torch.maximum(torch.ones_like(worst), worst / alpha.clamp_min(torch.finfo(worst.dtype).tiny))
    return (0.5 * (1 - scale).pow(2) * residual_sq + (alpha * l1 - scale * code_dot_corr)).clamp_min(0)


def nonnegative_kkt_violation(
    targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary, alpha: float | Tensor = 0.0
) -> Tensor:
    """KKT violation of ``min 0.5||y - cD||^2 + alpha sum(c)`` s.t. ``c >= 0`` (NNLS when ``alpha = 0``),
    relative to ``||y|| * max_j ||d_j||``; infinite if ``c`` has negative entries."""
    atoms = _as_atoms(atoms)
    g = residual(targets, coefficients, atoms) @ atoms.T - _as_column(alpha, targets)
    on_support = coefficients > 0
    violation = torch.where(on_support, g.abs(), g.clamp_min(0)).max(dim=1).values
    scale = targets.norm(dim=1) * atoms.norm(dim=1).max()
    rel = torch.where(scale > 0, violation / scale.clamp_min(torch.finfo(targets.dtype).tiny), violation)
    return torch.where((coefficients < 0).any(dim=1), torch.full_like(rel, float("inf")), rel)


def least_squares_optimality(targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary) -> Tensor:
    """Normal-equation residual ``||(y - cD) D^T||_inf`` relative to ``||y|| * max_j ||d_j||`` (0 at a
    least-squares solution)."""
    atoms = _as_atoms(atoms)
    g = residual(targets, coefficients, atoms) @ atoms.T
    scale = targets.norm(dim=1) * atoms.norm(dim=1).max()
    violation = g.abs().max(dim=1).values
    return torch.where(scale > 0, violation / scale.clamp_min(torch.finfo(targets.dtype).tiny), violation)


def bpdn_certificate(
    targets: Tensor, coefficients: Tensor, atoms: Tensor | Dictionary, eps: float, *, duals: Tensor | None = None
) -> Tensor:
    """Certificate of non-negative BPDN, ``min ||c||_1`` s.t. ``||y - c D|| <= eps ||y||``, ``c >= 0``, per target.

    The larger of the relative duality gap ``(P - D) / P`` (``P = sum(c)``; the dual is
    ``max_z z . y - eps ||y|| ||z||`` s.t. ``z . d_j <= 1``, and ``D`` is the best of ``z = 0``, ``z`` parallel to
    the residual, and the given ``duals``, each scaled into the dual feasible set) and the relative constraint
    violation ``max(||r|| - eps ||y||, 0) / ||y||``. See :class:`~sparsedecomp.solvers.reference.CvxpyBPDN`.

    ``duals`` (``(n, d)``, optional; NaN rows ignored) are extra candidate dual points. Zero for a zero target
    with the zero code; infinite for a code with negative entries or a residual that proves infeasibility.
    """
    atoms = _as_atoms(atoms)
    tiny = torch.finfo(targets.dtype).tiny
    r = residual(targets, coefficients, atoms)
    y_norm = targets.norm(dim=1)
    r_norm = r.norm(dim=1)
    bound = eps * y_norm
    primal = coefficients.sum(dim=1)
    inf = torch.full_like(primal, float("inf"))

    # z = t r: the dual objective t (r . y - bound ||r||) is linear in t, so t = 1 / max_j (r . d_j) is best.
    numerator = (r * targets).sum(dim=1) - bound * r_norm
    worst = (r @ atoms.T).max(dim=1).values
    unbounded = (worst <= 0) & (numerator > 0)
    dual = torch.where(worst > 0, numerator / worst.clamp_min(tiny), torch.zeros_like(primal)).clamp_min(0)
    if duals is not None:
        usable = torch.isfinite(duals).all(dim=1)
        z = torch.where(usable[:, None], duals, torch.zeros_like(duals))
        z = z / (z @ atoms.T).max(dim=1).values.clamp_min(1)[:, None]
        dual = torch.maximum(dual, (z * targets).sum(dim=1) - bound * z.norm(dim=1))
    gap = (primal - dual).clamp_min(0)
    rel_gap = torch.where(primal > 0, gap / primal.clamp_min(tiny), gap)
    violation = (r_norm - bound).clamp_min(0)
    rel_violation = torch.where(y_norm > 0, violation / y_norm.clamp_min(tiny), violation)
    cert = torch.where(unbounded, inf, torch.maximum(rel_gap, rel_violation))
    return torch.where((coefficients < 0).any(dim=1), inf, cert)


def _as_atoms(atoms: Tensor | Dictionary) -> Tensor:
    """The ``(n_atoms, d)`` atom matrix of a :class:`~sparsedecomp.Dictionary` (or the tensor itself)."""
    return atoms.atoms if isinstance(atoms, Dictionary) else atoms


def _as_column(alpha: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(alpha, Tensor):
        return alpha.to(like).reshape(-1, 1)
    return torch.full((1, 1), float(alpha), dtype=like.dtype, device=like.device)
