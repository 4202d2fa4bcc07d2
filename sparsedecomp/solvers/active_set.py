"""Batched active-set steps for many small L1 problems given by their Gram matrices (the inner solver of the
working set).

Each of ``L`` subproblems is ``min_c f(c) = 0.5 c G c - b . c + alpha ||c||_1`` (``c >= 0`` when non-negative)
over ``k`` padded coordinates, where ``G = A A^T`` is the Gram matrix of the working-set atoms ``A`` and
``b = A y``; ``f`` equals the lasso objective ``0.5 ||y - c A||^2 + alpha ||c||_1`` up to the constant
``0.5 ||y||^2``. ``alpha = 0`` with ``c >= 0`` is NNLS.

The method is feature-sign search (Lee et al., 2007), which for NNLS is Lawson--Hanson, run on all subproblems
at once. With ``q = b - c G`` (minus the gradient of the smooth part) and an *active set* ``S`` with signs
``theta_S``, ``f`` equals the quadratic ``f_theta(c) = 0.5 c G c - b . c + alpha theta . c`` on the orthant of
``theta``, whose minimiser on ``S`` solves ``G_SS c_S = b_S - alpha theta_S``. A step:

1. *Enter* (:func:`entering_signs`): a subproblem at the minimiser of its current pattern adds its most violating
   zero coordinates (``|q_j| > alpha``; non-negative: ``q_j > alpha``) with ``theta_j = sign(q_j)``: moving
   along ``theta_j`` lowers ``f``.
2. *Newton* (:func:`newton_step`): solve the pattern's system (batched Cholesky of ``G_SS`` only, ``O(|S|^3)``),
   then search the projected path towards its solution (coordinates that would change sign held at zero) at its
   first sign changes and its end. Up to the first sign change ``f = f_theta``, which is convex, so that point
   cannot increase ``f`` (it drops the coordinate that reaches zero); later points can drop several at once. The
   best point is taken; a step that does not decrease ``f`` is rejected.

A subproblem whose last step stopped at a sign change (``blocked``) takes a Newton step on its smaller support
before anything enters. One entering coordinate from a pattern minimiser always moves in its sign's direction
(the Newton direction is ``G_SS^{-1} e_j (q_j - alpha theta_j)``, whose ``j``-th entry has the sign of
``theta_j``), so every step decreases ``f``; ``f`` takes finitely many pattern minima, hence finite termination
(exact arithmetic). Several coordinates may enter at once to save steps; a batch that fails falls back to one.

Every operation is a batched tensor operation over the subproblems: no Python loop over coordinates, so the same
code runs on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Ridge added to G_SS in the Newton step, in units of machine epsilon times the largest diagonal entry.
RIDGE = 100.0
# Breakpoints of the projected path (sign changes) at which a Newton step evaluates f, besides its end.
BREAKPOINTS = 8


def entering_signs(q: Tensor, c: Tensor, usable: Tensor, alpha: Tensor, n_enter: Tensor, margin: Tensor,
                   *, nonnegative: bool) -> Tensor:
    """The signs ``theta`` of each row's active set: the signs of its non-zero coordinates, plus up to
    ``n_enter[i]`` (``(R,)``, ``>= 0``) most violating zero coordinates with ``theta_j = sign(q_j)``.

    A zero coordinate violates when ``|q_j| - alpha`` (non-negative: ``q_j - alpha``) exceeds ``margin`` (``(R,)``,
    the rounding level of ``q``, so that noise never enters). ``usable`` marks the real (non-padded) coordinates.
    """
    sign = c.sign()
    score = (q if nonnegative else q.abs()) - alpha[:, None]
    score = score.masked_fill(~usable | (c != 0), float("-inf"))
    width = min(c.shape[1], int(n_enter.max())) if c.numel() else 0
    if width == 0:
        return sign
    values, index = score.topk(width, dim=1)
    rank = torch.arange(width, device=c.device)
    enter = (values > margin[:, None]) & (rank < n_enter[:, None])
    theta = q.gather(1, index).sign()
    # Positions not entering write back their current sign (topk may pick non-zero coordinates when few are free).
    return sign.scatter(1, index, torch.where(enter, theta, sign.gather(1, index)))


def newton_step(gram: Tensor, rows: Tensor, q: Tensor, c: Tensor, sign: Tensor, alpha: Tensor,
                ridge: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One feature-sign Newton step on the subproblems ``rows`` of ``gram`` (``(L, k, k)``), whose codes ``c``,
    ``q = b - c G`` and active-set signs ``sign`` (``(R, k)``; zero outside the active set), ``alpha`` and
    ``ridge`` (``(R,)``) are given. Returns the new codes, which rows ``moved`` (``f`` decreased; the others are
    unchanged) and which moved rows are ``blocked`` (stopped at a sign change, so the next step is a Newton step
    on the smaller support). Coordinates outside the active set stay zero, so sign constraints hold.

    Each row's active coordinates are moved to the front of an ``(R, s, s)`` system, ``s`` the largest active
    set, gathered straight from ``gram`` (no copy of the Gram matrices): ``O(s^3)`` per row, not ``O(k^3)``.
    """
    active = sign != 0
    n_rows, k = c.shape
    width = int(active.sum(dim=1).max()) if c.numel() else 0
    none = torch.zeros(n_rows, dtype=torch.bool, device=c.device)
    if width == 0:
        return c, none, none
    # Active coordinates first (stable), cut to the widest set: ``order[i, :width]`` holds row i's active set.
    order = torch.argsort(active.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
    on = active.gather(1, order).to(c.dtype)
    flat = (rows[:, None, None] * k + order[:, :, None]) * k + order[:, None, :]
    sub = gram.take(flat) * (on[:, :, None] * on[:, None, :])  # G_SS, zero on slots beyond a row's active set
    # Slots beyond a row's active set get an identity row so that the system stays square and well posed; a tiny
    # ridge keeps the factorisation defined when the active atoms are dependent (the step then approximates the
    # minimum-norm solution; the acceptance test below keeps every step safe whatever the conditioning).
    system = sub.clone()
    system.diagonal(dim1=1, dim2=2).add_(1 - on + ridge[:, None] * on)
    # G (c + d) = b - alpha theta on the active set  <=>  G_SS d_S = q_S - alpha theta_S.
    gradient = (q - alpha[:, None] * sign).gather(1, order) * on
    factor, info = torch.linalg.cholesky_ex(system)
    solved = torch.cholesky_solve(gradient[:, :, None], factor).squeeze(2) * on
    # The projected path x(t) = P(c + t d), d the Newton direction and P the projection onto the orthant of
    # ``sign`` (coordinates that would change sign are held at zero). Up to t_1, its first breakpoint (the first
    # sign change), f is the pattern's convex quadratic, so x(t_1) lowers f (dropping one coordinate); x(1) is the
    # pattern's minimiser with its sign-flipped coordinates zeroed, which can drop many at once but is not always a
    # descent step. f is evaluated at the first BREAKPOINTS breakpoints and at t = 1, and each row takes the best.
    c_s, sign_s = c.gather(1, order), sign.gather(1, order)
    end = c_s + solved
    crossing = (c_s != 0) & (end * sign_s <= 0)
    t_cross = torch.where(crossing, c_s / (-solved).where(crossing, torch.ones_like(c_s)), torch.full_like(c_s, 2.0))
    n_break = min(BREAKPOINTS, width)
    t = torch.cat([(-(-t_cross).topk(n_break, dim=1).values).clamp(max=1.0), torch.ones_like(c_s[:, :1])], dim=1)
    path = c_s[:, None, :] + t[:, :, None] * solved[:, None, :]  # (R, B, s)
    # A coordinate whose crossing is at or before t is exactly zero (rounding must not leave a tiny wrong sign).
    zero = (path * sign_s[:, None, :] <= 0) | (t_cross[:, None, :] <= t[:, :, None])
    path = torch.where(zero, torch.zeros_like(path), path) * on[:, None, :]
    steps = path - c_s[:, None, :]
    # f(x) - f(c) = -s . (q - alpha theta) + 0.5 s_S G_SS s_S inside the closed orthant (||x||_1 - ||c||_1 = theta.s);
    # in this form the small gains of the last steps are resolved without cancellation.
    change = -(steps * gradient[:, None, :]).sum(dim=2) + 0.5 * (torch.bmm(steps, sub) * steps).sum(dim=2)
    change = torch.where(torch.isfinite(change), change, torch.full_like(change, float("inf")))
    best_change, best = change.min(dim=1)
    chosen = path.gather(1, best[:, None, None].expand(n_rows, 1, width)).squeeze(1)
    moved = (info == 0) & (best_change < 0)
    new = torch.where(moved[:, None], c.scatter(1, order, chosen), c)
    # A step that left an active coordinate at zero is on a smaller support, whose own Newton step comes next; a
    # full step with no sign change reached the minimiser of its pattern.
    blocked = moved & ((new == 0) & active).any(dim=1)
    return new, moved, blocked

