"""Orthogonal matching pursuit (``omp``) and non-negative OMP (``nn_omp``), batched over targets.

Problem (greedy, approximate): ``min_c 0.5 ||y - c D||^2`` subject to ``||c||_0 <= n_nonzero``, with ``c >= 0``
for ``nn_omp``. Starting from ``c = 0``, ``r = y`` and an empty support ``S``, each step

1. picks the unused atom with the largest normalised correlation ``|r . d_j| / ||d_j||`` (for ``nn_omp`` the
   largest positive ``r . d_j / ||d_j||``); with unit-norm atoms this is exactly scikit-learn's rule;
2. adds it to ``S`` and refits on the support: ``c_S = argmin ||y - c_S D_S||^2`` (least squares), or
   ``argmin_{c_S >= 0}`` (NNLS) for ``nn_omp``; ``r = y - c_S D_S``.

A target stops with ``CONVERGED`` once the fraction of variance unexplained ``||r||^2 / ||y||^2 <= tol``, or once
the fit is exact, ``||r|| <= 100 eps ||y||`` (the residual is zero to working precision; with or without ``tol``),
with ``BUDGET_REACHED`` when its ``n_nonzero`` atoms are used first, and with ``NO_PROGRESS`` when the residual is
not zero but no unused atom correlates with it (no positive correlation for ``nn_omp``) or the best atom lies
numerically in the span of the support (its Cholesky pivot vanishes).

Costs. The support least squares uses the Cholesky factor ``L L^T = D_S D_S^T`` extended by one row per step
(``w = L^{-1} D_S d_j``, pivot ``sqrt(||d_j||^2 - ||w||^2)``), so a step costs ``O(k^2)`` per target besides the
correlations. The correlations ``r D^T`` are computed per group of :meth:`Dictionary.stacked`: for the
block-diagonal ``z``-space dictionary each head's share of the residual meets only that head's atoms, which is
``n_heads`` times cheaper than a dense product; the budget stays global (the argmax runs over all heads). They
are formed for a block of targets at a time (at most ``_BLOCK_BYTES``) and reduced at once; no
``n_atoms x n_atoms`` Gram is ever formed. Besides the output code, the working state is
``O(chunk * k * (k + d_head))`` for ``k`` chosen atoms.

``nn_omp`` solves the NNLS on the support by Lawson--Hanson active-set steps warm-started from the previous
step's solution (usually one solve: the new atom's coefficient comes out positive and nothing else moves to 0).
Atoms whose coefficient drops to 0 stay in the support (and may come back) but are not counted as non-zeros.

Certificate (``relative_kkt_violation``): optimality of the coefficient solve on the chosen support,
``max_{j in S} |r . d_j|`` (normal equations; for ``nn_omp`` the NNLS KKT violation: ``|r . d_j|`` where
``c_j > 0`` and ``max(r . d_j, 0)`` where ``c_j = 0``), relative to ``||y|| * max_j ||d_j||``. It says the fit on
the support is exact, not that the support is the best one (OMP is greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..codes import Codes
from ..decomposition import KKT_VIOLATION, Status
from ..dictionary import Dictionary
from ..validation import check_bool, check_positive
from .base import ChunkResult, Solver, working_dtype
from ..errors import InputError

# Numerical thresholds, as multiples of the working dtype's machine epsilon.
# Stop (NO_PROGRESS) when the best normalised correlation is below this times ||y||: any further atom would fit
# rounding noise. A residual below this times ||y|| is an exact fit (CONVERGED).
_CORR_EPS = 100.0
# Stop (NO_PROGRESS) when the new atom's squared Cholesky pivot is below this times ||d_j||^2: the atom lies in
# the span of the support to working precision and the support Gram would be singular.
_PIVOT_EPS = 1000.0
# Lawson--Hanson adds a zero-coefficient support atom only if its gradient exceeds this times
# s * max||d|| * (||y|| + max||d|| * ||c||_1), the rounding error of the gradient b - G c on s atoms.
_NNLS_GRAD_EPS = 10.0
# Atoms per run in the two-level argmax of OMP._select.
_TILE = 64
# Most bytes of correlations formed at once in OMP._select (the whole chunk for the gelu-2l sizes in float32).
_BLOCK_BYTES = 2**29


@dataclass(frozen=True)
class _Prepared:
    """Dictionary-only data reused for every chunk (in the working dtype)."""

    atoms: Tensor  # (G, M, p) stacked atoms (padded slots are zero)
    unit_t: Tensor  # (G, p, M) atoms / ||atom||, transposed for the correlation product
    sq_norms: Tensor  # (G, M) ||atom||^2 (1 on padded slots, never selected)
    atom_index: Tensor  # (G, M) index into the dictionary, -1 on padded slots
    columns: tuple[tuple[int, int], ...]
    tile: int  # M is a multiple of it (see OMP._select)
    max_norm: float
    budget: int
    dtype: torch.dtype


@dataclass(frozen=True, kw_only=True)
class OMP(Solver):
    """Batched orthogonal matching pursuit; ``nonnegative=True`` gives non-negative OMP (see module docstring).

    Attributes:
        n_nonzero: most atoms per target (selection steps), counted across all heads; at most
            ``min(d, n_atoms)``. ``None`` means ``min(d, n_atoms)`` (then ``tol`` must be given).
        tol: stop a target once ``||y - c D||^2 / ||y||^2 <= tol`` (fraction of variance unexplained). An exact
            fit (``||y - c D|| <= 100 eps ||y||`` in the working dtype) is ``CONVERGED`` whatever ``tol``.
        nonnegative: select only positively correlated atoms and refit by NNLS (``c >= 0``).
        nnls_max_iter: most Lawson--Hanson least-squares solves per step for ``nn_omp`` (a target that needs
            more stops with ``MAX_ITER``, keeping its last feasible code; in practice 1-3 are used).
        chunk_size: targets solved at once; the output code (``chunk_size * n_atoms`` floats) dominates memory.
    """

    certificate_kind: ClassVar[str] = KKT_VIOLATION

    # Larger than the base default: per-step work is a few large ops plus many small ones whose cost does not
    # grow with the chunk, so bigger chunks are faster (the correlations are formed in blocks of at most
    # _BLOCK_BYTES, so memory stays bounded).
    chunk_size: int = 8192
    n_nonzero: int | None = None
    tol: float | None = None
    nonnegative: bool = False
    nnls_max_iter: int = 50

    @property
    def name(self) -> str:  # type: ignore[override]
        return "nn_omp" if self.nonnegative else "omp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_nonzero is None and self.tol is None:
            raise InputError("OMP needs a stopping rule: give n_nonzero (atoms per target), tol (fraction of "
                             "variance unexplained), or both")
        if self.n_nonzero is not None:
            self._check_int("n_nonzero")
        if self.tol is not None:
            check_positive(self.tol, "tol", allow_zero=True)
        check_bool(self.nonnegative, "nonnegative")
        self._check_int("nnls_max_iter")

    def check_dictionary(self, dictionary: Dictionary) -> None:
        limit = min(dictionary.dim, dictionary.n_atoms)
        if self.n_nonzero is not None and self.n_nonzero > limit:
            raise InputError(
                f"n_nonzero={self.n_nonzero} exceeds min(d, n_atoms) = min({dictionary.dim}, {dictionary.n_atoms}) "
                f"= {limit}: more atoms than that are linearly dependent"
            )

    def precompute(self, dictionary: Dictionary) -> _Prepared:
        dtype = working_dtype(dictionary.dtype)
        stacked = dictionary.stacked()
        atoms, real, atom_index = stacked.atoms.to(dtype), stacked.mask, stacked.atom_index
        size = atoms.shape[1]
        tile = min(_TILE, size)
        pad = -size % tile
        if pad:
            atoms = torch.nn.functional.pad(atoms, (0, 0, 0, pad))
            real = torch.nn.functional.pad(real, (0, pad))
            atom_index = torch.nn.functional.pad(atom_index, (0, pad), value=-1)
        norms = atoms.norm(dim=2)
        # Padded slots get a zero unit atom (correlation exactly 0, so never chosen over a real atom: selection
        # stops first when the best score is <= its threshold >= 0).
        unit = atoms / torch.where(real, norms, torch.ones_like(norms))[:, :, None]
        return _Prepared(
            atoms=atoms,
            unit_t=unit.transpose(1, 2).contiguous(),
            sq_norms=torch.where(real, norms.pow(2), torch.ones_like(norms)),
            atom_index=atom_index,
            columns=stacked.columns,
            tile=tile,
            max_norm=float(dictionary.atoms.to(dtype).norm(dim=1).max()),
            budget=self.n_nonzero if self.n_nonzero is not None else min(dictionary.dim, dictionary.n_atoms),
            dtype=dtype,
        )

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: _Prepared) -> ChunkResult:
        prep = prepared
        y = targets.to(prep.dtype)
        n = y.shape[0]
        out = _empty_result(n, prep.budget, dictionary.n_atoms, y)
        y_norm2 = y.pow(2).sum(dim=1)
        # Zero targets have the zero code; a tol >= 1 is met by the zero code of any target.
        start = (y_norm2 > 0) & ~torch.tensor(self.tol is not None and self.tol >= 1.0, device=y.device)
        out.status[~start] = Status.CONVERGED
        out.objective[~start] = 0.5 * y_norm2[~start]
        rows = start.nonzero().squeeze(1)
        if rows.numel() > 0:
            Y = torch.stack([y[rows, a:b] for a, b in prep.columns], dim=0)  # (G, n_active, p)
            state = _Active(Y, y_norm2[rows], rows, min(prep.budget, 32), self.nonnegative)
            # One correlation buffer for a block of targets, reused every step (see OMP._select).
            n_groups, _, size = prep.unit_t.shape
            block = min(rows.numel(), max(1, _BLOCK_BYTES // (n_groups * size * y.element_size())))
            workspace = y.new_empty(block * n_groups * size)
            self._run(state, prep, out, workspace)
        return ChunkResult(
            codes=out.codes.to(dtype=targets.dtype),
            objective=out.objective.to(targets.dtype),
            certificate=out.certificate.to(targets.dtype),
            iterations=out.iterations,
            status=out.status,
        )

    # -- the greedy loop -----------------------------------------------------------------------------------------
    def _run(self, st: "_Active", prep: _Prepared, out: ChunkResult, workspace: Tensor) -> None:
        eps = torch.finfo(prep.dtype).eps
        # An exact fit, ||r|| <= _CORR_EPS * eps * ||y|| (the residual is zero to working precision), is CONVERGED
        # with or without tol: it meets every tolerance the dtype can resolve. It bounds every normalised
        # correlation |r . d_j| / ||d_j|| <= ||r|| by the selection threshold, so another step could only stop
        # with NO_PROGRESS or add an atom fitted to rounding noise.
        fvu_tol = (_CORR_EPS * eps) ** 2 if self.tol is None else max(self.tol, (_CORR_EPS * eps) ** 2)
        for k in range(prep.budget):  # k atoms chosen so far, the same for every active target
            if k == st.capacity:
                st.grow(min(2 * st.capacity, prep.budget))
            group, member, best = self._select(st, prep, k, workspace)
            atom = prep.atoms[group, member]  # (n_active, p)
            atom_sq = prep.sq_norms[group, member]
            cross, w = _support_cross(st, k, group, atom)
            pivot_sq = atom_sq - w.pow(2).sum(dim=1)
            stop = (best <= _CORR_EPS * eps * st.y_norm2.sqrt()) | (pivot_sq <= _PIVOT_EPS * eps * atom_sq)
            if bool(stop.any()):
                _finish(out, st, stop, k, Status.NO_PROGRESS, prep, self.nonnegative)
                keep = ~stop
                st.keep(keep)
                group, member, atom, atom_sq, cross, w, pivot_sq = (
                    t[keep] for t in (group, member, atom, atom_sq, cross, w, pivot_sq)
                )
                if st.n == 0:
                    return
            st.add(k, group, member, prep.atom_index[group, member], atom, atom_sq, cross, w, pivot_sq.sqrt())
            s = k + 1
            if self.nonnegative:
                coef, solved = _nnls_on_support(st, s, prep.max_norm, self.nnls_max_iter)
            else:
                coef = _least_squares_on_support(st, k)
                solved = None
            st.coef[:, :s] = coef
            st.update_residual(s)
            r2 = st.R.pow(2).sum(dim=(0, 2))
            done = torch.zeros_like(r2, dtype=torch.bool)
            if solved is not None and not bool(solved.all()):
                failed = ~solved
                _finish(out, st, failed, s, Status.MAX_ITER, prep, self.nonnegative)
                done |= failed
            met = ~done & (r2 <= fvu_tol * st.y_norm2)
            if bool(met.any()):
                _finish(out, st, met, s, Status.CONVERGED, prep, self.nonnegative)
                done |= met
            if s == prep.budget:
                _finish(out, st, ~done, s, Status.BUDGET_REACHED, prep, self.nonnegative)
                return
            if bool(done.any()):
                st.keep(~done)
                if st.n == 0:
                    return

    def _select(self, st: "_Active", prep: _Prepared, k: int, workspace: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Best unused atom per active target: ``(group, member, normalised score)``.

        The correlations ``r D^T`` (the one big product of a step) are formed for a block of targets at a time
        into a buffer reused every step (a fresh allocation per step costs as much as the product: its pages
        are returned to the OS and faulted in again), so memory stays bounded for any chunk size.
        """
        n_groups, _, size = prep.unit_t.shape
        n_runs = size // prep.tile
        block = max(1, workspace.numel() // (n_groups * size))
        n = st.n
        best = st.R.new_empty(n)
        group = torch.empty(n, dtype=torch.long, device=best.device)
        member = torch.empty_like(group)
        for start in range(0, n, block):
            stop = min(n, start + block)
            m = stop - start
            local = torch.arange(m, device=best.device)
            corr = workspace[: n_groups * m * size].view(n_groups, m, size)
            torch.bmm(st.R[:, start:stop], prep.unit_t, out=corr)
            if k > 0:
                # Zero (not -inf) excludes chosen atoms: a score of 0 never passes the stopping threshold.
                corr[st.group[start:stop, :k], local[:, None], st.member[start:stop, :k]] = 0
            # Two-level argmax: value-only reductions over runs of `tile` atoms are much faster than reductions
            # that track indices; only the winning run of each target is searched for its index.
            runs = corr.view(n_groups, m, n_runs, prep.tile)
            peak = runs.amax(dim=3)
            if not self.nonnegative:
                peak = torch.maximum(peak, runs.amin(dim=3).neg_())
            top, where = peak.permute(1, 0, 2).reshape(m, -1).max(dim=1)  # first maximum, as scikit-learn
            g, run = where // n_runs, where % n_runs
            inside = runs[g, local, run]  # (m, tile)
            offset = (inside if self.nonnegative else inside.abs()).argmax(dim=1)
            best[start:stop] = top
            group[start:stop] = g
            member[start:stop] = run * prep.tile + offset
        return group, member, best


class _Active:
    """Support state of the targets still being extended; rows are dropped as targets finish."""

    _ROW_FIELDS = ("rows", "y_norm2", "chol", "gram", "b", "fwd", "coef", "group", "member", "atom", "vec")

    def __init__(self, Y: Tensor, y_norm2: Tensor, rows: Tensor, capacity: int, nonnegative: bool) -> None:
        _, n, p = Y.shape
        self.Y = Y  # (G, n, p): each group's share of each target
        self.R = Y.clone()  # residual, same layout
        self.y_norm2 = y_norm2
        self.rows = rows  # positions in the chunk
        self.capacity = capacity
        self.chol = Y.new_zeros(n, capacity, capacity)  # lower Cholesky factor of the support Gram
        self.gram = Y.new_zeros(n, capacity, capacity) if nonnegative else None  # support Gram (NNLS)
        self.b = Y.new_zeros(n, capacity)  # y . d_j on the support
        self.fwd = None if nonnegative else Y.new_zeros(n, capacity)  # L^{-1} b, grown one entry per step
        self.coef = Y.new_zeros(n, capacity)
        self.group = torch.zeros(n, capacity, dtype=torch.long, device=Y.device)
        self.member = torch.zeros_like(self.group)
        self.atom = torch.zeros_like(self.group)
        self.vec = Y.new_zeros(n, capacity, p)  # chosen atoms in their group's coordinates

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def keep(self, mask: Tensor) -> None:
        self.Y = self.Y[:, mask]
        self.R = self.R[:, mask]
        for name in self._ROW_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[mask])

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        for name in ("chol", "gram"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, torch.nn.functional.pad(value, (0, extra, 0, extra)))
        for name in ("b", "fwd", "coef", "group", "member", "atom"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, torch.nn.functional.pad(value, (0, extra)))
        self.vec = torch.nn.functional.pad(self.vec, (0, 0, 0, extra))
        self.capacity = capacity

    def add(self, k, group, member, atom_index, atom, atom_sq, cross, w, pivot) -> None:
        """Put the chosen atom in slot ``k`` and extend the Cholesky factor by one row."""
        rows = torch.arange(self.n, device=atom.device)
        self.chol[:, k, :k] = w
        self.chol[:, k, k] = pivot
        if self.gram is not None:
            self.gram[:, k, :k] = cross
            self.gram[:, :k, k] = cross
            self.gram[:, k, k] = atom_sq
        self.group[:, k] = group
        self.member[:, k] = member
        self.atom[:, k] = atom_index
        self.vec[:, k] = atom
        self.b[:, k] = (self.Y[group, rows] * atom).sum(dim=1)

    def update_residual(self, s: int) -> None:
        """``r = y - c_S D_S``, recomputed from the support (no drift from incremental updates)."""
        n_groups = self.Y.shape[0]
        # Each chosen atom lands in its own group: weight it by coefficient x one-hot(group).
        onehot = torch.nn.functional.one_hot(self.group[:, :s], n_groups).to(self.Y.dtype)  # (n, s, G)
        fitted = torch.bmm((onehot * self.coef[:, :s, None]).transpose(1, 2), self.vec[:, :s])  # (n, G, p)
        self.R = self.Y - fitted.transpose(0, 1)


def _support_cross(st: _Active, k: int, group: Tensor, atom: Tensor) -> tuple[Tensor, Tensor]:
    """Inner products ``D_S d_j`` of the new atom with the support (0 across groups) and ``w = L^{-1} D_S d_j``."""
    if k == 0:
        empty = atom.new_zeros(atom.shape[0], 0)
        return empty, empty
    dots = torch.bmm(st.vec[:, :k], atom[:, :, None]).squeeze(2)
    cross = torch.where(st.group[:, :k] == group[:, None], dots, torch.zeros_like(dots))
    w = torch.linalg.solve_triangular(st.chol[:, :k, :k], cross[:, :, None], upper=False).squeeze(2)
    return cross, w


def _least_squares_on_support(st: _Active, k: int) -> Tensor:
    """``c_S`` solving ``L L^T c = b``: one forward-substitution entry for the new row, then one back solve."""
    s = k + 1
    known = (st.chol[:, k, :k] * st.fwd[:, :k]).sum(dim=1)
    st.fwd[:, k] = (st.b[:, k] - known) / st.chol[:, k, k]
    upper = st.chol[:, :s, :s].transpose(1, 2)
    return torch.linalg.solve_triangular(upper, st.fwd[:, :s, None], upper=True).squeeze(2)


def _nnls_on_support(st: _Active, s: int, max_norm: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Lawson--Hanson NNLS ``min_{c >= 0} 0.5 c G c - b c`` on the ``s`` support atoms, batched over targets.

    Warm start: the previous step's solution (optimal on the old support) plus the new atom in the passive set.
    Returns the coefficients (never negative) and, per target, whether the KKT conditions were reached within
    ``max_iter`` least-squares solves.
    """
    gram, chol, b = st.gram[:, :s, :s], st.chol[:, :s, :s], st.b[:, :s]
    n = b.shape[0]
    x = st.coef[:, :s].clone()
    x[:, s - 1] = 0
    passive = x > 0
    passive[:, s - 1] = True
    inner = torch.ones(n, dtype=torch.bool, device=b.device)
    done = torch.zeros_like(inner)
    eps = torch.finfo(b.dtype).eps
    grad_tol = _NNLS_GRAD_EPS * eps * s * max_norm * (st.y_norm2.sqrt() + max_norm * st.coef[:, :s].sum(dim=1))
    for solves in range(max_iter + 1):
        outer = ~inner & ~done
        if bool(outer.any()):
            idx = outer.nonzero().squeeze(1)
            grad = b[idx] - torch.bmm(gram[idx], x[idx, :, None]).squeeze(2)  # -gradient of the objective
            candidate = ~passive[idx] & (grad > grad_tol[idx, None])
            score, j = torch.where(candidate, grad, torch.full_like(grad, -torch.inf)).max(dim=1)
            enter = candidate.any(dim=1)
            done[idx[~enter]] = True
            add = idx[enter]
            passive[add, j[enter]] = True
            inner[add] = True
        todo = (inner & ~done).nonzero().squeeze(1)
        if todo.numel() == 0 or solves == max_iter:
            break
        every = todo.numel() == n  # the usual first solve: skip the row gathers

        def take(t: Tensor) -> Tensor:
            return t if every else t[todo]

        P, xt = take(passive), take(x)
        z = _solve_passive(take(gram), take(chol), take(b), P)
        feasible = ((z > 0) | ~P).all(dim=1)
        # Infeasible: move from x towards z until the first passive coefficient reaches 0, drop it.
        blocking = P & (z <= 0)
        ratio = torch.where(blocking, xt / (xt - z).clamp_min(torch.finfo(b.dtype).tiny), torch.full_like(z, torch.inf))
        step, first = ratio.min(dim=1)
        step = step.clamp(0, 1)
        moved = xt + step[:, None] * (z - xt)
        still = P & (moved > 0)
        still[torch.arange(todo.numel(), device=b.device), first] = False
        moved = torch.where(still, moved, torch.zeros_like(moved))
        x[todo] = torch.where(feasible[:, None], torch.where(P, z, torch.zeros_like(z)), moved)
        passive[todo] = torch.where(feasible[:, None], P, still)
        inner[todo] = ~feasible
        # A feasible solve with every support atom passive satisfies KKT outright (no zero coefficients whose
        # gradient could be positive): no gradient check needed.
        done[todo] |= feasible & P.all(dim=1)
    return x, done


def _solve_passive(gram: Tensor, chol: Tensor, b: Tensor, passive: Tensor) -> Tensor:
    """Least squares restricted to the passive atoms, ``G_PP z_P = b_P``, ``z = 0`` elsewhere."""
    full = passive.all(dim=1)
    if bool(full.all()):
        return torch.cholesky_solve(b[:, :, None], chol).squeeze(2)
    z = torch.zeros_like(b)
    if bool(full.any()):
        # Whole support passive (the usual case): reuse the incremental Cholesky factor.
        z[full] = torch.cholesky_solve(b[full, :, None], chol[full]).squeeze(2)
    part = (~full).nonzero().squeeze(1)
    if part.numel() > 0:
        P = passive[part]
        both = P[:, :, None] & P[:, None, :]
        eye = torch.eye(b.shape[1], dtype=b.dtype, device=b.device).expand_as(both)
        # A principal submatrix of the positive-definite support Gram, padded with the identity.
        factor, _ = torch.linalg.cholesky_ex(torch.where(both, gram[part], eye))
        rhs = torch.where(P, b[part], torch.zeros_like(b[part]))
        z[part] = torch.where(P, torch.cholesky_solve(rhs[:, :, None], factor).squeeze(2), torch.zeros_like(rhs))
    return z


def _empty_result(n: int, budget: int, n_atoms: int, like: Tensor) -> ChunkResult:
    """A zero result for ``n`` targets with room for ``budget`` atoms each, filled in place by :func:`_finish`."""
    return ChunkResult(
        codes=Codes.sparse(torch.zeros(n, budget, dtype=torch.long, device=like.device), like.new_zeros(n, budget),
                           n_atoms),
        objective=like.new_zeros(n),
        certificate=like.new_zeros(n),
        iterations=torch.zeros(n, dtype=torch.long, device=like.device),
        status=torch.zeros(n, dtype=torch.long, device=like.device),
    )


def _finish(out: ChunkResult, st: _Active, mask: Tensor, s: int, status: Status, prep: _Prepared, nonnegative: bool) -> None:
    """Write the results of the masked active targets (``s`` atoms chosen) into ``out``'s tensors, in place."""
    rows = st.rows[mask]
    R = st.R[:, mask]
    out.objective[rows] = 0.5 * R.pow(2).sum(dim=(0, 2))
    out.iterations[rows] = s
    out.status[rows] = int(status)
    if s == 0:
        return
    coef = st.coef[mask, :s]
    # Atoms whose nn_omp coefficient dropped to 0 stay in their slot with value 0, i.e. as padding.
    out.codes.values[rows, :s] = coef
    out.codes.indices[rows, :s] = st.atom[mask, :s]
    local = torch.arange(rows.shape[0], device=rows.device)
    grad = (R[st.group[mask, :s], local[:, None]] * st.vec[mask, :s]).sum(dim=2)  # r . d_j on the support
    if nonnegative:
        violation = torch.where(coef > 0, grad.abs(), grad.clamp_min(0))
    else:
        violation = grad.abs()
    violation = violation.max(dim=1).values
    scale = st.y_norm2[mask].sqrt() * prep.max_norm
    out.certificate[rows] = torch.where(scale > 0, violation / scale.clamp_min(torch.finfo(scale.dtype).tiny), violation)
