"""Minimum-norm least squares through the pseudoinverse (the seed notebook's decomposition).

Objective: ``min ||c||_2`` over all minimisers of ``0.5 ||y - c D||^2``; solution ``c = y D^+``.
For a block-diagonal dictionary the pseudoinverse is block-diagonal too, ``D^+ = diag(D_h^+)``, so each head's
share ``y_h`` is solved against that head's ``(n_h, d_head)`` decoder only: exact, and ``n_heads`` times cheaper.
The code is dense (every feature gets a small weight), which is why the sparse solvers exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..codes import Codes
from ..decomposition import EXACT, Status
from ..dictionary import Dictionary, StackedBlocks
from ..optimality import least_squares_objective
from .base import ChunkResult, Solver, full_status, working_dtype


@dataclass(frozen=True)
class Pseudoinverse(Solver):
    """``c = y D^+`` per target; exact, so the certificate is 0 and the status ``CONVERGED``.

    Attributes:
        rtol: relative cut-off for small singular values (``torch.linalg.pinv``'s ``rtol``); ``None`` uses
            torch's default ``max(n, d) * eps``.
    """

    name: ClassVar[str] = "pinv"
    certificate_kind: ClassVar[str] = EXACT

    rtol: float | None = None

    def precompute(self, dictionary: Dictionary) -> tuple[StackedBlocks, Tensor]:
        stacked = dictionary.stacked()
        # (groups, atoms, dims) -> (groups, dims, atoms); padded zero atoms get zero weight (minimum norm). Half
        # precisions are solved in float32 (torch has no half-precision SVD), like every other solver.
        return stacked, torch.linalg.pinv(stacked.atoms.to(working_dtype(dictionary.dtype)), rtol=self.rtol)

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: tuple[StackedBlocks, Tensor]) -> ChunkResult:
        stacked, pinv = prepared
        work = targets.to(pinv.dtype)
        grouped = torch.einsum("ngp,gpm->ngm", stacked.split_targets(work), pinv)
        coefficients = stacked.scatter_coefficients(grouped, dictionary.n_atoms)
        n = targets.shape[0]
        # As every solver: the objective of the working-precision solution, computed in that precision, then
        # everything rounded to the targets' dtype (a bfloat16 residual keeps about 2 significant digits).
        objective = least_squares_objective(work, coefficients, dictionary.atoms.to(pinv.dtype))
        return ChunkResult(
            codes=Codes.dense(coefficients.to(targets.dtype)),
            objective=objective.to(targets.dtype),
            certificate=targets.new_zeros(n),
            iterations=torch.zeros(n, dtype=torch.long, device=targets.device),
            status=full_status(n, Status.CONVERGED, targets.device),
        )
