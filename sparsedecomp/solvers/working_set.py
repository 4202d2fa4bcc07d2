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
3. *Inner solve* on the working set only: gather its ``k`` atoms, form the small ``k x k`` Gram matrix, and solve
   the restricted problem exactly by batched active-set (feature-sign / Lawson--Hanson) steps
   (:mod:`.active_set`): atoms enter with the sign of their correlation, a Newton step on the active set
   (``O(s^3)`` for ``s`` active atoms) moves to the pattern's minimiser or to the first sign change, which drops
   that atom. Every step is a batched tensor operation over all subproblems (no Python loop over coordinates) and
   lowers the objective; the restricted problem is solved when no atom of the working set violates and the last
   Newton steps on the final pattern (iterative refinement) no longer move it.

Tol monotonicity (exact arithmetic; float64 in practice): the steps never depend on ``tol``, so the run with the
tighter tol repeats the looser run step for step until the looser one stops, and from there every step can only
lower the objective (accepted steps and the carried-over support are monotone). Within the same ``max_iter`` a
tighter tol therefore never ends with a higher objective.

If no step of a round lowers a target's objective (no atom violates beyond rounding and the pattern is solved, or
every step failed) but its global certificate still fails, the next round first refines its pattern (a Newton step
on it alone, then the usual steps); unless that round halves the certificate, the target is then at the working
dtype's rounding floor (a warm start's first round refines its given pattern the same way).
Below float64 it is then finished by a float64 solve, warm-started from its code with the budget it has left; the
finished code comes back rounded to the working dtype and is certified as such (in float64), and is kept only if it
is certified or lowers the objective. In float64 the target is given up (``MAX_ITER`` with fewer than ``max_iter``
steps). ``iterations`` counts inner active-set steps (at least one per round); a target stops with
``converged = False`` once it has used ``max_iter`` of them.

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
from .active_set import RIDGE, entering_signs, newton_step

GAP = "gap"
KKT = "kkt"
# Rounds in a row in which no inner step lowered the objective after which an uncertified target is at the rounding
# floor of the working dtype (e.g. tol far below float32 precision). After the first, the next round refines the
# target's pattern (a Newton step on it even when no atom violates); after the second, nothing is left to try.
MAX_STALLS = 2
# Atoms a subproblem adds to its active set in its first inner step of a round (the batch doubles after each full
# step and falls back to one after a failed one; see :func:`_solve_restricted`).
FIRST_ENTER = 4
# Newton steps on an unchanged active set after the last atom entered or left (see :func:`_solve_restricted`).
REFINE = 1
# An atom enters only if its violation exceeds this many times q's rounding level (see :func:`_solve_restricted`).
MARGIN = 1.0
# The inner solver's per-subproblem arrays are compacted once fewer than this fraction of them are open.
COMPACT = 0.75
# Inner steps between two exact recomputations of q = A (y - c A); in between, q follows c through the Gram matrix.
EXACT_EVERY = 8
# Floats of Gram matrices and atoms per chunk of the inner solve: 16 MiB in float32 on a CPU (about its L2/L3
# share: every inner step passes over them); 1 GiB on a GPU, where one large batch keeps the kernels busy.
INNER_FLOATS = 2**22
INNER_FLOATS_GPU = 2**28


@dataclass(frozen=True)
class _Restricted:
    """Everything the inner solver needs on the live subproblems (those with a non-empty working set)."""

    atoms: Tensor  # (L, k, p) working-set atoms, zero on padded slots
    targets: Tensor  # (L, p) each subproblem's share of its target
    gram: Tensor  # (L, k, k)
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
    min_growth: int = 8,
    start: tuple[Tensor, Tensor, Tensor] | None = None,
) -> ChunkResult:
    """Solve every row of ``targets`` (``(n, d)``); ``alpha`` is ``(n,)`` (a fraction of each target's
    ``alpha_max`` when ``alpha_is_fraction_of_max``). ``certificate`` is :data:`GAP` or :data:`KKT`. The codes
    come back sparse (row-padded), everything in the targets' dtype. ``start = (W, c, iterations)`` warm-starts
    every target from the working-set code ``c`` on atoms ``W`` (``(G, n, k)``) with ``iterations`` (``(n,)``)
    already spent of its ``max_iter``."""
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
    iterations = torch.zeros(n, dtype=torch.long, device=device) if start is None else start[2].clone()
    converged = torch.ones(n, dtype=torch.bool, device=device)
    at_floor = torch.zeros(n, dtype=torch.bool, device=device)  # stopped by rounding, not by the budget

    active = (alpha_top > alpha).nonzero().squeeze(1)
    W = torch.zeros(n_groups, active.numel(), 0, dtype=torch.long, device=device)
    c = Y.new_zeros(n_groups, active.numel(), 0)
    if start is not None:
        W, c = start[0][:, active], start[1][:, active].to(work)
    stalls = torch.zeros(active.numel(), dtype=torch.long, device=device)
    # A warm start comes from another precision or problem: its first round refines the given pattern too.
    warm = torch.full((active.numel(),), start is not None, dtype=torch.bool, device=device)
    last_cert = torch.full((active.numel(),), float("inf"), dtype=Y.dtype, device=device)

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
        # A round after a stall that halved the certificate made real progress: the target is not at the floor.
        stalls = torch.where(cert < 0.5 * last_cert, torch.zeros_like(stalls), stalls)
        last_cert = cert
        done = passed | (iterations[active] >= max_iter) | (stalls >= MAX_STALLS) | ~torch.isfinite(cert)
        if bool(done.any()):
            rows = active[done]
            certificate_out[rows] = cert[done]
            objective[rows] = obj[done]
            converged[rows] = passed[done]
            at_floor[rows] = ~passed[done] & (stalls[done] >= MAX_STALLS) & (iterations[rows] < max_iter)
            pieces.append(_finished_codes(rows, global_index, W[:, done], c[:, done]))
            keep = ~done
            active, W, c, corr, a = active[keep], W[:, keep], c[:, keep], corr[:, keep], a[keep]
            stalls, warm, last_cert = stalls[keep], warm[keep], last_cert[keep]
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
        W, c, valid = _compact(torch.cat([W, index], dim=2), torch.cat([c, torch.zeros_like(values)], dim=2),
                               torch.cat([support, violating], dim=2))

        # 3. Inner solve on the working sets.
        # In chunks of subproblems whose Gram matrices and atoms fit INNER_FLOATS: every inner step passes over
        # them, and on a CPU a batch far larger than the cache makes each step memory-bound.
        live = valid.reshape(-1, valid.shape[2]).any(dim=1).nonzero().squeeze(1)
        budget = INNER_FLOATS_GPU if device.type == "cuda" else INNER_FLOATS
        per_chunk = max(1, budget // max(1, W.shape[2] * (W.shape[2] + atoms.shape[2])))
        steps, moves = torch.zeros_like(active), torch.zeros_like(active)
        for chunk in live.split(per_chunk):
            c, chunk_steps, chunk_moves = _solve_restricted(
                _gather(atoms, Y[:, active], W, valid, a, chunk), c, valid, max_iter - iterations[active],
                (stalls > 0) | warm, nonnegative=nonnegative)
            steps, moves = torch.maximum(steps, chunk_steps), torch.maximum(moves, chunk_moves)
        # A target always pays at least one step per round, so max_iter bounds the number of rounds too.
        iterations[active] += steps.clamp_min(1)
        # Not certified, yet no step lowered the objective (no atom violates beyond rounding, the pattern is
        # solved, or every step failed): the target may be at the working dtype's rounding floor. Its next round
        # refines the pattern first; that round counts too whatever it moves (its moves can be rounding noise)
        # unless it halves the certificate (checked at the next global check).
        stalls = torch.where((moves == 0) | (stalls > 0), stalls + 1, torch.zeros_like(stalls))
        warm = torch.zeros_like(warm)

    codes = _assemble_codes(pieces, n, n_atoms, Y)
    if recheck is not None and bool(at_floor.any()):
        # Targets stuck at the working dtype's rounding floor are finished in float64, warm-started from their
        # code with the budget each has left; the finished code comes back in the working dtype, so it is
        # certified as rounded (in float64), and kept only where it is certified or lowers the objective.
        rows = at_floor.nonzero().squeeze(1)
        W0, c0 = _grouped(codes.indices[rows], codes.values[rows], stacked)
        finished = solve_working_set(
            targets[rows].to(torch.float64), stacked, n_atoms, alpha_asked[rows], nonnegative=nonnegative,
            certificate=certificate, tol=tol, max_iter=max_iter, alpha_is_fraction_of_max=alpha_is_fraction_of_max,
            min_growth=min_growth, start=(W0, c0.to(torch.float64), iterations[rows]),
        )
        W_f, c_f = _grouped(finished.codes.indices, finished.codes.values.to(work), stacked)
        every = torch.ones_like(rows, dtype=torch.bool)
        passed, cert, obj = recheck(rows, every, certificate_out[rows], objective[rows], W_f, c_f, tol)
        _, cert0, obj0 = recheck(rows, every, certificate_out[rows], objective[rows], W0, c0, tol)
        better = passed | (obj < obj0)
        certificate_out[rows] = torch.where(better, cert, cert0)
        objective[rows] = torch.where(better, obj, obj0)
        converged[rows] = passed & better
        iterations[rows] = torch.where(better, finished.iterations, iterations[rows])
        taken = better.nonzero().squeeze(1)
        codes = _assemble_codes([(torch.arange(n, device=device), codes.indices, codes.values),
                                 (rows[taken], finished.codes.indices[taken], finished.codes.values[taken].to(work))],
                                n, n_atoms, Y)
    status = torch.where(converged, int(Status.CONVERGED), int(Status.MAX_ITER))
    status = torch.where(torch.isfinite(certificate_out), status, int(Status.NUMERICAL_ERROR))
    dtype = targets.dtype
    return ChunkResult(
        codes=codes.to(dtype=dtype),
        objective=objective.to(dtype),
        certificate=certificate_out.to(dtype),
        iterations=iterations,
        status=status,
        alpha_max=alpha_top,  # in the working dtype: a half-precision alpha_max could overflow
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
    solved further and ends ``MAX_ITER`` if it never passes.
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


def _grouped(indices: Tensor, values: Tensor, stacked: StackedBlocks) -> tuple[Tensor, Tensor]:
    """Row-padded codes in the dictionary's atom indices (``(t, w)``) as working-set codes ``(W, c)``
    (``(G, t, w)``: each group's local atom indices, and the values of the atoms in that group, 0 elsewhere)."""
    n_groups, m = stacked.atom_index.shape
    atom_index = stacked.atom_index.to(indices.device)
    real = atom_index >= 0
    group_of = torch.zeros(int(atom_index.max()) + 1, dtype=torch.long, device=indices.device)
    local_of = torch.zeros_like(group_of)
    group_of[atom_index[real]] = torch.arange(n_groups, device=indices.device)[:, None].expand(n_groups, m)[real]
    local_of[atom_index[real]] = torch.arange(m, device=indices.device)[None, :].expand(n_groups, m)[real]
    mine = group_of[indices][None] == torch.arange(n_groups, device=indices.device)[:, None, None]
    W = torch.where(mine, local_of[indices][None], 0)
    return W, torch.where(mine, values[None], torch.zeros((), dtype=values.dtype, device=values.device))


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


def _gather(atoms: Tensor, Y: Tensor, W: Tensor, valid: Tensor, alpha: Tensor, live: Tensor
            ) -> tuple[_Restricted, Tensor]:
    """The restricted problems of the subproblems ``live`` (flat indices into ``(G * t)``), and ``live``."""
    n_groups, t, k = W.shape
    flat_valid = valid.reshape(-1, k)
    group = live // t
    owner = live % t
    A = atoms[group[:, None], W.reshape(-1, k)[live]] * flat_valid[live, :, None]
    y = Y.reshape(-1, Y.shape[2])[live]
    return _Restricted(
        atoms=A,
        targets=y,
        gram=torch.bmm(A, A.transpose(1, 2)),
        alpha=alpha[owner],
        owner=owner,
    ), live


def _solve_restricted(
    gathered: tuple[_Restricted, Tensor], c: Tensor, valid: Tensor, budget: Tensor, refine: Tensor, *,
    nonnegative: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Active-set steps (:mod:`.active_set`) on every live subproblem until it is at the minimiser of its sign
    pattern with no violating atom in its working set (the restricted problem is solved), a step makes no progress
    (rounding), or its target's step ``budget`` is spent. Subproblems of the targets ``refine`` (``(t,)``) start
    with a Newton step on their current pattern (iterative refinement) even when nothing enters. Returns codes
    ``(G, t, k)``, the steps each target took and the steps in which it moved (lowered its objective), both
    ``(t,)``."""
    P, live = gathered
    n_groups, t, k = c.shape
    flat_c = c.reshape(-1, k).clone()
    steps = torch.zeros(t, dtype=torch.long, device=c.device)
    moves = torch.zeros_like(steps)
    if live.numel() == 0:
        return c, steps, moves
    diag = P.gram.diagonal(dim1=1, dim2=2)
    eps = torch.finfo(c.dtype).eps
    dim = P.atoms.shape[2]
    # Per-subproblem arrays, compacted to the open subproblems now and then (``where``: their rows of ``live``).
    s = {
        "where": torch.arange(live.numel(), device=c.device),
        "gram": P.gram, "atoms": P.atoms, "y": P.targets, "alpha": P.alpha, "owner": P.owner,
        "c": flat_c[live], "usable": valid.reshape(-1, k)[live] & (diag > 0),
        "ridge": RIDGE * eps * diag.amax(dim=1), "atom_norm": diag.amax(dim=1).sqrt(), "y_norm": P.targets.norm(dim=1),
        "n_enter": torch.full_like(P.owner, FIRST_ENTER),
        # Rows to refine take a pure Newton step on their pattern first (as blocked rows: nothing enters), and its
        # failure does not stop them ("first").
        "blocked": refine[P.owner].clone(),
        "first": refine[P.owner].clone(),
        # Consecutive Newton steps on an unchanged active set (iterative refinement: in float32 one solve of an
        # ill-conditioned G_SS leaves the pattern's minimiser inexact, and q is recomputed before the next).
        "refined": torch.where(refine[P.owner], 0, REFINE),
    }
    rows = torch.arange(live.numel(), device=c.device)  # the open subproblems, as positions in ``s``
    n_steps = 0
    while rows.numel() > 0:
        if rows.numel() < COMPACT * s["where"].numel():
            flat_c[live[s["where"]]] = s["c"]
            s = {name: value[rows] for name, value in s.items()}
            rows = torch.arange(rows.numel(), device=c.device)
        if n_steps % EXACT_EVERY == 0:
            # Exact q = A (y - c A) on every stored row (no cancellation against b = A y).
            residual = s["y"] - torch.bmm(s["c"][:, None, :], s["atoms"]).squeeze(1)
            s["q_ref"] = torch.bmm(s["atoms"], residual[:, :, None]).squeeze(2)
            s["c_ref"] = s["c"].clone()
            q = s["q_ref"][rows]
        else:
            # q moved by the change of c since the exact one: one pass over the Gram matrices, and an error of order
            # eps times that (small) change rather than eps * ||b||.
            q = (s["q_ref"] - torch.bmm((s["c"] - s["c_ref"])[:, None, :], s["gram"]).squeeze(1))[rows]
        n_steps += 1
        c_r, owner, blocked = s["c"][rows], s["owner"][rows], s["blocked"][rows]
        # At most as many active atoms as dimensions (then one at a time, as Lawson--Hanson): a larger active set
        # is linearly dependent, its Newton step a ridge step that only wastes steps.
        room = (dim - (c_r != 0).sum(dim=1)).clamp_min(1)
        enter = torch.where(blocked, torch.zeros_like(owner), torch.minimum(s["n_enter"][rows], room))
        # q's rounding level, eps (|a| ||y|| + |a|^2 ||c||_1) (|a| the largest atom norm; the second term bounds the
        # error of the products with c): an atom whose violation is below it never enters (it would add noise).
        norm = s["atom_norm"][rows]
        margin = MARGIN * eps * norm * (s["y_norm"][rows] + norm * c_r.abs().sum(dim=1))
        sign = entering_signs(q, c_r, s["usable"][rows], s["alpha"][rows], enter, margin,
                              nonnegative=nonnegative)
        entering = (sign != c_r.sign()).any(dim=1)
        # Rows not blocked, adding nothing and refined are at their pattern's minimiser with nothing to add: their
        # restricted problem is solved.
        go = (blocked | entering | (s["refined"][rows] < REFINE)) & (steps[owner] < budget[owner])
        rows, q, c_r, sign, entering, owner = rows[go], q[go], c_r[go], sign[go], entering[go], owner[go]
        if rows.numel() == 0:
            break
        new, moved, now_blocked = newton_step(s["gram"], rows, q, c_r, sign, s["alpha"][rows], s["ridge"][rows])
        s["c"][rows] = new
        touched = torch.zeros(t, dtype=torch.bool, device=c.device)
        touched[owner] = True
        steps += touched
        progressed = torch.zeros_like(touched)
        progressed[owner[moved]] = True
        moves += progressed
        # A batch of entering atoms that failed is retried as one (which always makes progress in exact
        # arithmetic); a row that cannot move even so is at its rounding floor and stops. A full step doubles the
        # next batch.
        tried = s["n_enter"][rows]
        stuck = ~moved & ((tried == 1) | ~entering) & ~s["first"][rows]
        s["first"][rows] = False
        s["n_enter"][rows] = torch.where(moved, torch.where(now_blocked, tried, (2 * tried).clamp(max=k)),
                                         torch.ones_like(tried))
        s["refined"][rows] = torch.where(entering | now_blocked, 0, s["refined"][rows] + 1)
        s["blocked"][rows] = now_blocked
        rows = rows[~stuck]
    flat_c[live[s["where"]]] = s["c"]
    return flat_c.reshape(n_groups, t, k), steps, moves

