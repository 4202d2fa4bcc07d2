"""The (non-negative) lasso and non-negative least squares, batched over targets and exact about head structure.

Objectives, per target ``y`` (a row of ``targets``) and code ``c`` (a row of ``coefficients``)::

    lasso:     min_c 0.5 ||y - c D||^2 + alpha ||c||_1                   (registry: "lasso")
    nn_lasso:  min_c 0.5 ||y - c D||^2 + alpha ||c||_1   s.t. c >= 0     (registry: "nn_lasso")
    nnls:      min_c 0.5 ||y - c D||^2                   s.t. c >= 0     (registry: "nnls")

scikit-learn's ``Lasso`` minimises ``(1 / (2 d)) ||y - X w||^2 + a ||w||_1`` with ``X = D^T``, so its ``a`` is
``alpha / d`` here.

Block structure is used exactly: in ``z`` space every head owns its own columns, so the problem splits into one
independent subproblem per (target, head) on that head's ``(n_h, d_head)`` decoder (``Dictionary.stacked``); a
dense or W_O-mixed dictionary is a single group. The algorithm is a working-set method
(:mod:`.working_set`): a global optimality check against all atoms with two batched products, then batched
active-set (feature-sign) Newton steps (:mod:`.active_set`) on a small Gram matrix of the atoms that can be
active. It never forms the ``n_atoms x n_atoms`` Gram matrix.

Certificates (:mod:`sparsedecomp.optimality`): the lasso reports the duality gap relative to ``||y||^2``; NNLS
(which has no bounded dual scaling) the KKT violation relative to ``||y|| max_j ||d_j||``. A target is
``CONVERGED`` when its certificate is at most ``tol``, ``MAX_ITER`` otherwise. NNLS solutions are not unique when
atoms outnumber dimensions; the objective is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..decomposition import DUALITY_GAP, KKT_VIOLATION, caller_stacklevel
from ..dictionary import Dictionary, StackedBlocks
from ..validation import AlphaAboveMaxWarning, check_bool, check_lasso_alpha, check_positive, first_indices
from .base import ChunkResult, Solver
from .working_set import GAP, KKT, solve_working_set

# The smallest number of atoms a working set grows by per round: it only trades overhead against work, never the
# answer.
MIN_GROWTH = 8


@dataclass(frozen=True, kw_only=True)
class Lasso(Solver):
    """``min_c 0.5 ||y - c D||^2 + alpha ||c||_1`` per target (``c >= 0`` when ``nonnegative``).

    Attributes:
        alpha: the L1 weight, > 0 (in the units of ``0.5 ||y - c D||^2``; scikit-learn's ``alpha`` is
            ``alpha / d``). Targets with ``alpha >= alpha_max(y)`` get the zero code exactly.
        nonnegative: constrain ``c >= 0`` (the registry's ``nn_lasso``).
        alpha_is_fraction_of_max: read ``alpha`` as a fraction of each target's own
            :func:`~sparsedecomp.optimality.alpha_max` (the effective weight is ``alpha * alpha_max(y)``, and
            ``objective`` and ``certificate`` use it).
        tol: stop a target when its duality gap relative to ``||y||^2`` is at most ``tol``.
        max_iter: most inner active-set steps per target (each adds or drops atoms; at least one per round).
        chunk_size: targets solved at once (memory is about ``chunk_size * n_atoms`` floats for a few arrays).
    """

    certificate_kind: ClassVar[str] = DUALITY_GAP

    alpha: float
    nonnegative: bool = False
    alpha_is_fraction_of_max: bool = False
    tol: float = 1e-6
    max_iter: int = 1000
    chunk_size: int = 2048

    @property
    def name(self) -> str:  # type: ignore[override]
        return "nn_lasso" if self.nonnegative else "lasso"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lasso_alpha(self.alpha, self.alpha_is_fraction_of_max)
        check_bool(self.nonnegative, "nonnegative")
        check_positive(self.tol, "tol")
        self._check_int("max_iter")

    def precompute(self, dictionary: Dictionary) -> StackedBlocks:
        return dictionary.stacked()

    def warn_degenerate(self, targets: Tensor, alpha_max: Tensor | None) -> None:
        """One :class:`~sparsedecomp.validation.AlphaAboveMaxWarning` when an absolute ``alpha`` is at least the
        ``alpha_max`` of some non-zero targets: their code is exactly zero (the solver did not have to look), which
        for every target usually means an absolute weight given where a fraction was meant. A fraction of each
        target's own ``alpha_max`` is below it by construction (``alpha <= 1``; 1 is asked for knowingly)."""
        if self.alpha_is_fraction_of_max or alpha_max is None or alpha_max.numel() == 0:
            return
        # The solver's own test, in its working dtype: a target is solved by the zero code iff alpha_max <= alpha.
        zeroed = (alpha_max <= torch.tensor(self.alpha, dtype=alpha_max.dtype)) & (targets != 0).any(dim=1)
        n_zeroed = int(zeroed.sum())
        if n_zeroed == 0:
            return
        warnings.warn(
            f"{self.name}: alpha={self.alpha:g} (absolute) is >= alpha_max for {n_zeroed} of {targets.shape[0]} "
            f"targets (first rows {first_indices(zeroed)}; the batch's largest alpha_max is "
            f"{float(alpha_max.max()):.4g}), so their code is exactly zero; to give alpha as a fraction of each "
            "target's alpha_max set alpha_is_fraction_of_max=True",
            AlphaAboveMaxWarning,
            stacklevel=caller_stacklevel(),
        )

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: StackedBlocks) -> ChunkResult:
        # float64: the weight asked for, not its half-precision rounding (solve_working_set rounds it to the working
        # dtype, float32 at least).
        alpha = torch.full((targets.shape[0],), float(self.alpha), dtype=torch.float64, device=targets.device)
        return solve_working_set(
            targets, prepared, dictionary.n_atoms, alpha,
            nonnegative=self.nonnegative, certificate=GAP, tol=self.tol, max_iter=self.max_iter,
            alpha_is_fraction_of_max=self.alpha_is_fraction_of_max, min_growth=MIN_GROWTH,
        )


@dataclass(frozen=True, kw_only=True)
class NNLS(Solver):
    """``min_c 0.5 ||y - c D||^2`` subject to ``c >= 0``, per target.

    Attributes:
        tol: stop a target when its KKT violation relative to ``||y|| max_j ||d_j||`` is at most ``tol``
            (the default is reachable in float32; tighten it for float64 work).
        max_iter: most inner active-set steps per target (each adds or drops atoms; at least one per round).
        chunk_size: targets solved at once.
    """

    name: ClassVar[str] = "nnls"
    certificate_kind: ClassVar[str] = KKT_VIOLATION

    tol: float = 1e-5
    max_iter: int = 1000
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.tol, "tol")
        self._check_int("max_iter")

    def precompute(self, dictionary: Dictionary) -> StackedBlocks:
        return dictionary.stacked()

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: StackedBlocks) -> ChunkResult:
        alpha = targets.new_zeros(targets.shape[0])
        return solve_working_set(
            targets, prepared, dictionary.n_atoms, alpha,
            nonnegative=True, certificate=KKT, tol=self.tol, max_iter=self.max_iter,
            min_growth=MIN_GROWTH,
        )
