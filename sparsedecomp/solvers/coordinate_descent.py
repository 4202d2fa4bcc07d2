"""Batched solvers for many small L1 problems given by their Gram matrices (the inner solver of the working set).

Each of ``S`` subproblems is ``min_c f(c) = 0.5 c G c - b . c + alpha ||c||_1`` (``c >= 0`` when non-negative)
over ``k`` padded coordinates, where ``G = A A^T`` is the Gram matrix of the working-set atoms ``A`` and
``b = A y``; ``f`` equals the lasso objective ``0.5 ||y - c A||^2 + alpha ||c||_1`` up to the constant
``0.5 ||y||^2``. ``alpha = 0`` with ``c >= 0`` is NNLS. Padded coordinates have ``G_jj = 0`` and stay at zero.

Two steps, both monotone in ``f``:

* :func:`coordinate_descent_epoch` -- one cyclic sweep of exact coordinate minimisation
  ``c_j <- S_{alpha / G_jj}(c_j + q_j / G_jj)`` with ``q = b - c G`` kept up to date; linear convergence and
  robust to coherent atoms, where proximal gradient needs many more iterations.
* :func:`newton_step` -- once the sign pattern of the support is right, the minimiser solves
  ``G_SS c_S = b_S - alpha sign(c_S)`` exactly. We solve that system (batched Cholesky) and move towards its
  solution only as far as the signs allow (the objective is the same quadratic until a sign flips, so the move
  cannot increase ``f``); a step that fails (singular ``G_SS``) or does not decrease ``f`` is dropped. This turns
  the slow tail of coordinate descent into a finite number of steps once the support is identified.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Ridge added to G_SS in the Newton step, in units of machine epsilon times the largest diagonal entry.
RIDGE = 100.0


def coordinate_descent_epoch(
    gram: Tensor, q: Tensor, c: Tensor, inv_diag: Tensor, threshold: Tensor, sizes: list[int], *, nonnegative: bool
) -> None:
    """One cyclic sweep over the coordinates of every subproblem, in place on ``c`` and ``q = b - c G``.

    ``inv_diag`` is ``1 / G_jj`` (0 on padded coordinates) and ``threshold`` is ``alpha / G_jj`` (0 padded),
    both ``(S, k)``. Subproblems must be sorted by decreasing working-set size with their valid coordinates
    first; ``sizes[j]`` is the number of subproblems that have a coordinate ``j``, so coordinate ``j`` is only
    updated on that prefix (padding costs nothing when sizes differ).
    """
    for j, rows in enumerate(sizes):
        if rows == 0:
            break
        old = c[:rows, j]
        z = old + q[:rows, j] * inv_diag[:rows, j]
        if nonnegative:
            new = (z - threshold[:rows, j]).clamp_min(0)
        else:
            new = z.sign() * (z.abs() - threshold[:rows, j]).clamp_min(0)
        delta = new - old
        c[:rows, j] = new
        # G is symmetric, so row j (contiguous) serves as column j.
        q[:rows].addcmul_(delta[:, None], gram[:rows, j, :], value=-1)


def newton_step(gram: Tensor, q: Tensor, c: Tensor, alpha: Tensor) -> Tensor:
    """Move each subproblem's code towards the exact minimiser for its current sign pattern (see module doc).

    ``q = b - c G`` must be current. Returns the new ``(S, k)`` codes; rows where the step fails or would not
    decrease ``f`` are unchanged. Coordinates outside the current support stay zero, so sign constraints hold.
    """
    support = c != 0
    sign = c.sign()
    on = support.to(gram.dtype)
    # Off-support coordinates get an identity row so that the system stays square and well posed.
    system = gram * (on[:, :, None] * on[:, None, :])
    # A tiny ridge keeps the factorisation defined when the support has more atoms than dimensions (NNLS, or a
    # degenerate lasso): the step then approximates the minimum-norm solution; q lies in the range of G, so the
    # ridge barely changes it. The acceptance test below keeps every step safe whatever the conditioning.
    ridge = RIDGE * torch.finfo(gram.dtype).eps * gram.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True)
    system.diagonal(dim1=1, dim2=2).add_(1 - on + ridge * on)
    # G (c + d) = b - alpha sign on the support  <=>  G_SS d_S = q_S - alpha sign_S.
    rhs = (q - alpha[:, None] * sign) * on
    factor, info = torch.linalg.cholesky_ex(system)
    direction = torch.cholesky_solve(rhs[:, :, None], factor).squeeze(2) * on
    solution = c + direction

    # Largest step t in [0, 1] along the direction before a support coordinate changes sign.
    crossing = support & (solution * sign <= 0)
    step_to_zero = torch.where(crossing, c / (-direction).where(crossing, torch.ones_like(c)),
                               torch.full_like(c, float("inf")))
    t = step_to_zero.min(dim=1).values.clamp(max=1.0)
    step = t[:, None] * direction
    new = c + step
    # The coordinate that reaches zero first is set to exactly zero (rounding must not leave a tiny wrong sign).
    new = torch.where((crossing & (step_to_zero <= t[:, None])) | (new * sign < 0), torch.zeros_like(new), new)
    step = new - c

    # f(c + s) - f(c) = -s.q + 0.5 s G s + alpha (||c + s||_1 - ||c||_1); accept only a decrease.
    change = (-(step * q).sum(dim=1) + 0.5 * (torch.bmm(step[:, None, :], gram).squeeze(1) * step).sum(dim=1)
              + alpha * (new.abs().sum(dim=1) - c.abs().sum(dim=1)))
    accept = (info == 0) & torch.isfinite(new).all(dim=1) & (change <= 0)
    return torch.where(accept[:, None], new, c)
