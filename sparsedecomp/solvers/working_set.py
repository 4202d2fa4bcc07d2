"""Working-set solver for the (non-negative) lasso and NNLS on a block-separable dictionary.

Problem, for each target ``y`` (row of ``targets``) with its own weight ``alpha >= 0``::

    min_c  0.5 ||y - c D||^2 + alpha ||c||_1        (c >= 0 when non-negative; alpha = 0, c >= 0 is NNLS)

The dictionary comes as :class:`~sparsedecomp.dictionary.StackedBlocks`: ``G`` groups of ``m`` atoms in ``p``
dimensions, each group owning its own target columns. Both terms separate over groups, so every (target, group)
pair is an independent subproblem (``G`` = number of heads in ``z`` space, 1 for a dense or W_O-mixed dictionary).
Padded atoms are zero: their correlation is 0, so they are never selected.

Working set (as in celer / blitz): the optimal code is sparse, so most atoms never matter. Repeat

1. *Global check*, one pass over all atoms: residual ``r = y - c D`` and correlations ``g = r D^T`` (two batched
   products, ``4 n m p G`` flops), giving the certificate (duality gap relative to ``||y||^2``, or the relative KKT
   violation) of every target; targets within ``tol`` are finished.
2. *Grow*: each unfinished subproblem keeps its support and adds its most violating atoms
   (``|g_j| > alpha``, or ``g_j > alpha`` when non-negative), up to ``max(min_growth, support size)``, so its
   working set at most doubles per round while it is too small.
3. *Inner solve* on the working set only: gather its ``k`` atoms, form the small ``k x k`` Gram matrix, and run
   coordinate descent plus up to ``NEWTON_STEPS`` sign-pattern Newton steps per check (:mod:`.coordinate_descent`)
   until the restricted certificate is below ``max(tol, cert) / 2``, ``cert`` the target's global certificate at
   the start of the round (celer's relative inner tolerance). Cost per epoch is ``O(k^2)`` per subproblem instead
   of ``O(m p)``; a Newton step costs ``O(s^3)`` for a support of ``s`` atoms.

Tol monotonicity (exact arithmetic; float64 in practice): while a target's certificate is above both of two tols,
its inner tolerances under either are the same ``cert / 2``, so the run with the tighter tol repeats the looser run
step for step until the looser one stops, and from there every step can only lower the objective (coordinate
descent, accepted Newton steps and the carried-over support are all monotone). Within the same ``max_iter`` a
tighter tol therefore never ends with a higher objective.

If the inner solve met its tolerance but the global certificate still fails with no violating atom left (rounding),
that target's inner tolerance is tightened tenfold; after ``MAX_STALLS`` such rounds in a row the target is given up (its certificate is at the dtype's rounding floor). ``iterations`` counts coordinate-descent epochs over the working
set; a target stops with ``converged = False`` once it has used ``max_iter`` of them.

Half-precision inputs are solved in float32; float32 and float64 are kept as they are. Below float64 a target
is ``CONVERGED`` only if its certificate recomputed in float64 (:class:`_Float64Check`) is at most ``tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..codes import Codes, pack_rows
from ..decomposition import Status
from ..dictionary import StackedBlocks
from ..optimality import lasso_gap_from_parts
from .base import ChunkResult, working_dtype
from .coordinate_descent import coordinate_descent_epoch, newton_step

GAP = "gap"
KKT = "kkt"
# Rounds in a row without a violating atom after which an uncertified target is given up: its certificate is then
# stuck at the rounding floor of the working dtype (e.g. tol far below float32 precision).
MAX_STALLS = 3
# Sign-pattern Newton steps per check of the inner solve (:func:`_newton_steps`).
NEWTON_STEPS = 8
# A round's inner solve stops once its restricted certificate is below this fraction of the target's global
# certificate at the start of the round (or below tol / 2). Must be >= 1/2 for the tol monotonicity (module doc).
INNER_FRACTION = 0.5


@dataclass(frozen=True)
class _Restricted:
    """Everything the inner solver needs on the live subproblems (those with a non-empty working set)."""

    atoms: Tensor  # (L, k, p) working-set atoms, zero on padded slots
    targets: Tensor  # (L, p) each subproblem's share of its target
    gram: Tensor  # (L, k, k)
    b: Tensor  # (L, k) = atoms @ targets
    alpha: Tensor  # (L,)
    owner: Tensor  # (L,) position of the subproblem's target among the active targets


def solve_working_set(
    targets: Tensor,
    stacked: StackedBlocks,
    n_atoms: int,
    alpha: Tensor,
    *,
    nonnegative: bool,
    certificate: str,
    tol: float,
    max_iter: int,
    alpha_is_fraction_of_max: bool = False,
    check_every: int = 5,
    min_growth: int = 8,
) -> ChunkResult:
    """Solve every row of ``targets`` (``(n, d)``); ``alpha`` is ``(n,)`` (a fraction of each target's
    ``alpha_max`` when ``alpha_is_fraction_of_max``). ``certificate`` is :data:`GAP` or :data:`KKT`. The codes
    come back sparse (row-padded), everything in the targets' dtype."""
    work = working_dtype(targets.dtype)
    device = targets.device
    atoms = stacked.atoms.to(work)  # (G, m, p)
    atoms_t = atoms.transpose(1, 2)
    n_groups, m, _ = atoms.shape
    n = targets.shape[0]
    Y = stacked.split_targets(targets.to(work)).transpose(0, 1).contiguous()  # (G, n, p)
    corr0 = torch.bmm(Y, atoms_t)  # (G, n, m)
    alpha_top = (corr0 if nonnegative else corr0.abs()).amax(dim=(0, 2)).clamp_min(0)
    alpha_asked = alpha.to(torch.float64)
    alpha = alpha.to(work) * alpha_top if alpha_is_fraction_of_max else alpha.to(work)
    # Below float64 a certificate that passes is recomputed in float64 before the target counts as CONVERGED.
    recheck = None if work == torch.float64 else _Float64Check(
        stacked.split_targets(targets.to(torch.float64)).transpose(0, 1), stacked.atoms.to(torch.float64), alpha_asked,
        alpha_is_fraction_of_max=alpha_is_fraction_of_max, nonnegative=nonnegative, certificate=certificate,
    )
    y2 = Y.pow(2).sum(dim=(0, 2))
    atom_scale = atoms.norm(dim=2).max()
    global_index = stacked.atom_index.to(device)

    # Targets with alpha >= alpha_max (zero targets included) are solved exactly by the zero code.
    pieces: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, atoms, values) of targets as they finish
    objective = 0.5 * y2
    certificate_out = Y.new_zeros(n)
    iterations = torch.zeros(n, dtype=torch.long, device=device)
    converged = torch.ones(n, dtype=torch.bool, device=device)

    active = (alpha_top > alpha).nonzero().squeeze(1)
    W = torch.zeros(n_groups, active.numel(), 0, dtype=torch.long, device=device)
    c = Y.new_zeros(n_groups, active.numel(), 0)
    tighten = Y.new_ones(active.numel())  # 0.1 per stall: the factor on each target's inner tolerance
    stalls = torch.zeros(active.numel(), dtype=torch.long, device=device)

    while active.numel() > 0:
        # 1. Global check of every active target against all atoms.
        empty = W.shape[2] == 0
        dense, r, corr = _residual_and_correlations(Y[:, active], corr0[:, active] if empty else None, atoms, W, c)
        a = alpha[active]
        cert, obj = _certificate(r, corr, dense, W, c, a, y2[active], atom_scale,
                                 nonnegative=nonnegative, certificate=certificate)
        passed = cert <= tol
        if recheck is not None and bool(passed.any()):
            passed, cert, obj = recheck(active, passed, cert, obj, W, c, tol)
        done = passed | (iterations[active] >= max_iter) | (stalls >= MAX_STALLS) | ~torch.isfinite(cert)
        if bool(done.any()):
            rows = active[done]
            certificate_out[rows] = cert[done]
            objective[rows] = obj[done]
            converged[rows] = passed[done]
            pieces.append(_finished_codes(rows, global_index, W[:, done], c[:, done]))
            keep = ~done
            active, W, c, corr, a = active[keep], W[:, keep], c[:, keep], corr[:, keep], a[keep]
            tighten, stalls, cert = tighten[keep], stalls[keep], cert[keep]
            dense = None if dense is None else dense[:, keep]
        if active.numel() == 0:
            break

        # 2. Grow: keep the support, add the most violating atoms outside it.
        score = corr if nonnegative else corr.abs()
        if dense is not None:
            score = score.masked_fill(dense != 0, float("-inf"))
        support = c != 0
        # Each subproblem adds up to max(min_growth, its support size) atoms, so its working set at most doubles;
        # atoms that ended at zero leave the working set (they come back if they violate again).
        growth = support.sum(dim=2).clamp_min(min_growth)
        values, index = score.topk(min(m, int(growth.max())), dim=2)
        rank = torch.arange(values.shape[2], device=device)
        violating = (values > a[None, :, None]) & (rank < growth[:, :, None])
        # No violator left but not certified: the inner solve was not accurate enough for this target.
        stalled = ~violating.any(dim=2).any(dim=0)
        tighten = torch.where(stalled, 0.1 * tighten, tighten)
        # Relative inner tolerance (as celer's): a round only needs to halve the certificate while it is far
        # above tol, so early rounds on small working sets are cheap; and a tighter tol follows the looser run
        # until that one stops, so it never ends higher within the same budget (module doc).
        inner_tol = tighten * torch.clamp(INNER_FRACTION * cert, min=0.5 * tol)
        stalls = torch.where(stalled, stalls + 1, torch.zeros_like(stalls))
        W, c, valid = _compact(torch.cat([W, index], dim=2), torch.cat([c, torch.zeros_like(values)], dim=2),
                               torch.cat([support, violating], dim=2))

        # 3. Inner solve on the working sets.
        problem = _gather(atoms, Y[:, active], W, valid, a)
        c, epochs = _solve_restricted(
            problem, c, valid, inner_tol, max_iter - iterations[active], y2[active], atom_scale,
            nonnegative=nonnegative, certificate=certificate, check_every=check_every,
        )
        # A target always pays at least one epoch per round, so max_iter bounds the number of rounds too.
        iterations[active] += epochs.clamp_min(1)

    status = torch.where(converged, int(Status.CONVERGED), int(Status.MAX_ITER))
    status = torch.where(torch.isfinite(certificate_out), status, int(Status.NUMERICAL_ERROR))
    dtype = targets.dtype
    return ChunkResult(
        codes=_assemble_codes(pieces, n, n_atoms, Y).to(dtype=dtype),
        objective=objective.to(dtype),
        certificate=certificate_out.to(dtype),
        iterations=iterations,
        status=status,
    )


def _residual_and_correlations(Y: Tensor, corr_y: Tensor | None, atoms: Tensor, W: Tensor, c: Tensor):
    """The dense code (``None`` while every working set is empty), residual ``r = y - c D`` and correlations
    ``g = r D^T`` of targets ``Y`` (``(G, t, p)``) for the codes ``c`` on atoms ``W``; ``corr_y = Y D^T`` is
    needed (and returned as ``g``) only while the working sets are empty."""
    if W.shape[2] == 0:
        return None, Y, corr_y
    dense = Y.new_zeros(W.shape[0], W.shape[1], atoms.shape[1]).scatter_add_(2, W, c)
    r = Y - torch.bmm(dense, atoms)
    return dense, r, torch.bmm(r, atoms.transpose(1, 2))


def _certificate(r, corr, dense, W, c, alpha, y2, atom_scale, *, nonnegative: bool, certificate: str):
    """The certificate (:data:`GAP` or :data:`KKT`) and objective of every target from its residual parts."""
    if certificate == GAP:
        return _gap(r, corr, W, c, alpha, y2, nonnegative)
    return _kkt(r, corr, dense, alpha, y2, atom_scale)


class _Float64Check:
    """Conservative certification below float64: a target whose working-precision certificate is at most ``tol``
    is ``CONVERGED`` only if the certificate of its code, recomputed in float64 from the same float32 values of
    targets and atoms and the ``alpha`` asked for (``alpha * alpha_max(y)`` in float64 when it is a fraction), is
    at most ``tol`` too.

    Why: a float32 certificate carries rounding errors of order ``eps_32 * ||y||^2`` (residual, correlations,
    ``alpha_max``), which a ``tol`` near float32's resolution does not dominate; such rows were reported
    ``CONVERGED`` with a float64 gap 1-2 % above ``tol``. A target that fails the recheck stays active: it is
    solved further (its inner tolerance is tightened when no atom violates) and ends ``MAX_ITER`` if it never passes.
    The cost is one float64 residual and correlation product for the targets that pass, about once per target.
    """

    def __init__(self, Y: Tensor, atoms: Tensor, alpha: Tensor, *, alpha_is_fraction_of_max: bool,
                 nonnegative: bool, certificate: str) -> None:
        self.Y, self.atoms, self.alpha = Y, atoms, alpha  # (G, n, p), (G, m, p), (n,) float64
        self.fraction, self.nonnegative, self.certificate = alpha_is_fraction_of_max, nonnegative, certificate
        self.atom_scale = atoms.norm(dim=2).max()

    def __call__(self, active: Tensor, passed: Tensor, cert: Tensor, obj: Tensor, W: Tensor, c: Tensor, tol: float):
        """``passed``, ``cert`` and ``obj`` of the active targets with the passing ones recomputed in float64."""
        idx = passed.nonzero().squeeze(1)
        rows = active[idx]
        Y = self.Y[:, rows]
        corr_y = torch.bmm(Y, self.atoms.transpose(1, 2)) if self.fraction or W.shape[2] == 0 else None
        alpha = self.alpha[rows]
        if self.fraction:
            alpha = alpha * (corr_y if self.nonnegative else corr_y.abs()).amax(dim=(0, 2)).clamp_min(0)
        c64 = c[:, idx].to(torch.float64)
        dense, r, corr = _residual_and_correlations(Y, corr_y, self.atoms, W[:, idx], c64)
        cert64, obj64 = _certificate(r, corr, dense, W[:, idx], c64, alpha, Y.pow(2).sum(dim=(0, 2)),
                                     self.atom_scale, nonnegative=self.nonnegative, certificate=self.certificate)
        passed, cert, obj = passed.clone(), cert.clone(), obj.clone()
        passed[idx] = cert64 <= tol  # compared in float64: rounding cert64 first could let it pass
        cert[idx], obj[idx] = cert64.to(cert.dtype), obj64.to(obj.dtype)
        return passed, cert, obj


def _gap(r: Tensor, corr: Tensor, W: Tensor, c: Tensor, alpha: Tensor, y2: Tensor, nonnegative: bool):
    """Relative duality gap and lasso objective from stacked residuals ``r`` (``(G, t, p)``), correlations ``corr``
    (``(G, t, m)``) and the working-set codes ``c`` on atoms ``W`` (``(G, t, k)``); see :func:`_stable_gap`."""
    worst = corr.amax(dim=(0, 2)).clamp_min(0) if nonnegative else corr.abs().amax(dim=(0, 2))
    r2 = r.pow(2).sum(dim=(0, 2))
    l1 = c.abs().sum(dim=(0, 2))
    cq = torch.zeros_like(l1) if W.shape[2] == 0 else (c * corr.gather(2, W)).sum(dim=(0, 2))
    return _stable_gap(worst, r2, l1, cq, alpha) / y2.clamp_min(torch.finfo(y2.dtype).tiny), 0.5 * r2 + alpha * l1


def _stable_gap(worst: Tensor, r2: Tensor, l1: Tensor, cq: Tensor, alpha: Tensor) -> Tensor:
    """:func:`sparsedecomp.optimality.lasso_gap_from_parts` (the cancellation-free gap) on per-target sums."""
    return lasso_gap_from_parts(worst=worst, residual_sq=r2, l1=l1, code_dot_corr=cq, alpha=alpha)


def _kkt(r: Tensor, corr: Tensor, dense: Tensor | None, alpha: Tensor, y2: Tensor, atom_scale: Tensor):
    """Relative KKT violation of ``min 0.5 ||y - cD||^2 + alpha sum(c)``, ``c >= 0`` (as
    :func:`sparsedecomp.optimality.nonnegative_kkt_violation`), and the objective."""
    g = corr - alpha[None, :, None]
    if dense is None:
        violation = g.clamp_min(0)
        l1 = torch.zeros_like(alpha)
    else:
        violation = torch.where(dense > 0, g.abs(), g.clamp_min(0))
        l1 = dense.sum(dim=(0, 2))
    rel = violation.amax(dim=(0, 2)) / (y2.sqrt() * atom_scale).clamp_min(torch.finfo(y2.dtype).tiny)
    return rel, 0.5 * r.pow(2).sum(dim=(0, 2)) + alpha * l1


def _finished_codes(rows: Tensor, global_index: Tensor, W: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Working-set codes ``c`` on atoms ``W`` (``(G, t, k)``) of the finished targets ``rows`` as
    ``(rows, atoms (t, G*k), values (t, G*k))`` in the dictionary's atom indices (zero values are padding)."""
    if W.shape[2] == 0:
        empty = torch.zeros(rows.numel(), 0, dtype=torch.long, device=rows.device)
        return rows, empty, c.new_zeros(rows.numel(), 0)
    groups = torch.arange(W.shape[0], device=W.device)[:, None, None]
    atom = global_index[groups, W]  # (G, t, k)
    t = W.shape[1]
    return rows, atom.permute(1, 0, 2).reshape(t, -1), c.permute(1, 0, 2).reshape(t, -1)


def _assemble_codes(pieces: list[tuple[Tensor, Tensor, Tensor]], n: int, n_atoms: int, like: Tensor) -> Codes:
    """Row-padded codes of all ``n`` targets from the pieces written as targets finished (rows never written
    keep the zero code), each row's non-zeros moved to the front and the width cut to the largest count."""
    width = max([int((v != 0).sum(dim=1).max()) for _, _, v in pieces if v.numel() > 0] + [0])
    indices = torch.zeros(n, width, dtype=torch.long, device=like.device)
    values = like.new_zeros(n, width)
    for rows, atoms, vals in pieces:
        if width == 0:
            break
        indices[rows], values[rows] = pack_rows(atoms, vals, width)
    return Codes.sparse(indices, values, n_atoms)


def _compact(W: Tensor, c: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Move kept slots to the front of each working set and drop trailing all-empty slots."""
    order = torch.argsort(keep.to(torch.int8), dim=2, descending=True, stable=True)
    width = int(keep.sum(dim=2).max()) if keep.numel() else 0
    order = order[:, :, :width]
    valid = keep.gather(2, order)
    W = torch.where(valid, W.gather(2, order), torch.zeros((), dtype=W.dtype, device=W.device))
    c = torch.where(valid, c.gather(2, order), torch.zeros((), dtype=c.dtype, device=c.device))
    return W, c, valid


def _gather(atoms: Tensor, Y: Tensor, W: Tensor, valid: Tensor, alpha: Tensor) -> tuple[_Restricted, Tensor]:
    """The restricted problems of the live (non-empty) subproblems, and their flat indices into ``(G * t)``."""
    n_groups, t, k = W.shape
    flat_valid = valid.reshape(-1, k)
    live = flat_valid.any(dim=1).nonzero().squeeze(1)
    # Largest working sets first, so coordinate descent can skip padding (see coordinate_descent_epoch).
    live = live[torch.argsort(flat_valid[live].sum(dim=1), descending=True, stable=True)]
    group = live // t
    owner = live % t
    A = atoms[group[:, None], W.reshape(-1, k)[live]] * flat_valid[live, :, None]
    y = Y.reshape(-1, Y.shape[2])[live]
    return _Restricted(
        atoms=A,
        targets=y,
        gram=torch.bmm(A, A.transpose(1, 2)),
        b=torch.bmm(A, y[:, :, None]).squeeze(2),
        alpha=alpha[owner],
        owner=owner,
    ), live


def _solve_restricted(
    gathered: tuple[_Restricted, Tensor],
    c: Tensor,
    valid: Tensor,
    inner_tol: Tensor,
    budget: Tensor,
    y2: Tensor,
    atom_scale: Tensor,
    *,
    nonnegative: bool,
    certificate: str,
    check_every: int,
) -> tuple[Tensor, Tensor]:
    """Coordinate descent + Newton steps on every live subproblem until its target's restricted certificate is
    below ``inner_tol``, its restricted objective stops decreasing, or the target's epoch ``budget`` is spent.
    Returns codes ``(G, t, k)`` and epochs ``(t,)``."""
    P, live = gathered
    n_groups, t, k = c.shape
    flat_c = c.reshape(-1, k).clone()
    epochs = torch.zeros(t, dtype=torch.long, device=c.device)
    if live.numel() == 0:
        return c, epochs
    # Working copies shrink to the still-open subproblems; ``where`` maps them back to rows of ``live``.
    where = torch.arange(live.numel(), device=c.device)
    gram, b, A, y, alpha, owner = P.gram, P.b, P.atoms, P.targets, P.alpha, P.owner
    cw = flat_c[live]
    diag = gram.diagonal(dim1=1, dim2=2)
    usable = valid.reshape(-1, k)[live] & (diag > 0)
    inv_diag = torch.where(usable, 1.0 / torch.where(usable, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    threshold = alpha[:, None] * inv_diag
    size = usable.sum(dim=1)
    q = b - torch.bmm(cw[:, None, :], gram).squeeze(1)
    best = torch.full((t,), float("inf"), dtype=c.dtype, device=c.device)
    steps = torch.arange(k, device=c.device)
    while True:
        n_epochs = max(1, min(check_every, int((budget - epochs)[owner].min())))
        sizes = (size[None, :] > steps[:, None]).sum(dim=1).tolist()
        for _ in range(n_epochs):
            coordinate_descent_epoch(gram, q, cw, inv_diag, threshold, sizes, nonnegative=nonnegative)
        cw, q = _newton_steps(gram, q, cw, alpha, max_support=2 * A.shape[2])
        # Exact residual and correlations (no drift from the incremental updates of q).
        r = y - torch.bmm(cw[:, None, :], A).squeeze(1)
        q = torch.bmm(A, r[:, :, None]).squeeze(2)
        flat_c[live[where]] = cw
        touched = torch.zeros(t, dtype=torch.bool, device=c.device)
        touched[owner] = True
        epochs += n_epochs * touched

        if certificate == GAP:
            crit = _restricted_gap(r, q, cw, alpha, owner, t, y2, nonnegative)
        else:
            crit = _restricted_kkt(q, cw, alpha, owner, t, y2, atom_scale)
        # The restricted objective (0.5 ||r||^2 + alpha ||c||_1, monotone in exact arithmetic) no longer
        # decreases: the inner problem is solved to rounding precision.
        value = 0.5 * r.pow(2).sum(dim=1) + alpha * cw.abs().sum(dim=1)
        value = torch.zeros(t, dtype=c.dtype, device=c.device).index_add_(0, owner, value)
        stagnant = value >= best
        best = torch.minimum(best, value)
        finished = (crit <= inner_tol) | (epochs >= budget) | stagnant | ~torch.isfinite(crit)
        keep = ~finished[owner]
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            where, gram, b, A, y, alpha, owner = where[keep], gram[keep], b[keep], A[keep], y[keep], alpha[keep], owner[keep]
            cw, q, inv_diag, threshold, size = cw[keep], q[keep], inv_diag[keep], threshold[keep], size[keep]
    return flat_c.reshape(n_groups, t, k), epochs


def _newton_steps(gram: Tensor, q: Tensor, c: Tensor, alpha: Tensor, max_support: int) -> tuple[Tensor, Tensor]:
    """Up to :data:`NEWTON_STEPS` sign-pattern Newton steps per subproblem; after the first, only the rows whose
    last step zeroed coordinates take another (a full step already reached its pattern's minimiser).

    Each step removes at least one coordinate from a blocked row's support, so a few steps turn what would be
    many coordinate-descent epochs of a shrinking support into exact moves. Rows whose support has more than
    ``max_support`` atoms (the atoms' dimension: ``G_SS`` is then singular and its ``O(s^3)`` factorisation only
    gives a ridge step towards a dense code) are left to coordinate descent."""
    rows = ((c != 0).sum(dim=1) <= max_support).nonzero().squeeze(1)
    everyone = rows.numel() == c.shape[0]
    for _ in range(NEWTON_STEPS):
        if rows.numel() == 0:
            break
        if everyone:  # the first step on every row: no copy of the Gram matrices
            c, q, blocked = newton_step(gram, q, c, alpha)
            rows, everyone = blocked.nonzero().squeeze(1), False
            continue
        c_rows, q_rows, blocked = newton_step(gram[rows], q[rows], c[rows], alpha[rows])
        c, q = c.index_copy(0, rows, c_rows), q.index_copy(0, rows, q_rows)
        rows = rows[blocked]
    return c, q


def _restricted_gap(r, q, c, alpha, owner, t, y2, nonnegative):
    """Relative duality gap of each target's problem restricted to its working sets (one dual scaling per target,
    as in the global gap)."""
    score = q if nonnegative else q.abs()

    def per_target(values: Tensor, reduce: str) -> Tensor:
        return torch.zeros(t, dtype=r.dtype, device=r.device).scatter_reduce(0, owner, values, reduce)

    worst = per_target(score.amax(dim=1).clamp_min(0), "amax")
    r2 = per_target(r.pow(2).sum(dim=1), "sum")
    l1 = per_target(c.abs().sum(dim=1), "sum")
    cq = per_target((c * q).sum(dim=1), "sum")
    a_t = per_target(alpha, "amax")
    rel = _stable_gap(worst, r2, l1, cq, a_t) / y2.clamp_min(torch.finfo(r.dtype).tiny)
    # Targets with no live subproblem here are not open; +inf keeps them from counting as finished.
    present = torch.zeros(t, dtype=torch.bool, device=r.device)
    present[owner] = True
    return torch.where(present, rel, torch.full_like(rel, float("inf")))


def _restricted_kkt(q, c, alpha, owner, t, y2, atom_scale):
    """Relative KKT violation of each target's non-negative problem restricted to its working sets."""
    g = q - alpha[:, None]
    violation = torch.where(c > 0, g.abs(), g.clamp_min(0)).amax(dim=1)
    worst = torch.zeros(t, dtype=q.dtype, device=q.device).scatter_reduce(0, owner, violation, "amax")
    present = torch.zeros(t, dtype=torch.bool, device=q.device)
    present[owner] = True
    rel = worst / (y2.sqrt() * atom_scale).clamp_min(torch.finfo(q.dtype).tiny)
    return torch.where(present, rel, torch.full_like(rel, float("inf")))
