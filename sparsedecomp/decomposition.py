"""The result of decomposing a batch of targets: one frozen :class:`Decomposition`.

Every solver returns the same type whatever its flags, with per-target diagnostics so that no answer is silently
wrong: the objective value, an optimality certificate (duality gap or KKT violation, relative to ``||y||^2`` or
``||y||``), the iteration count and a :class:`Status`.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Mapping

import torch
from torch import Tensor

from .codes import Codes
from .dictionary import Dictionary


class Status(IntEnum):
    """Why a solver stopped on one target. ``CONVERGED`` and ``BUDGET_REACHED`` are normal endings."""

    CONVERGED = 0
    """The certificate met the tolerance, or the answer is exact (pseudoinverse, reference solvers, an OMP fit whose
    residual is zero to working precision)."""
    BUDGET_REACHED = 1
    """OMP used its ``n_nonzero`` atoms before reaching ``tol`` (normal: the budget is the question asked)."""
    MAX_ITER = 2
    """An iterative solver stopped with its certificate above ``tol``: at ``max_iter``, or earlier when no step of
    its method lowers the objective any more (usually a ``tol`` below what the working precision resolves)."""
    NO_PROGRESS = 3
    """A greedy solver found no atom that improves a fit that is not exact (e.g. no positive correlation left for
    ``nn_omp``)."""
    NUMERICAL_ERROR = 4
    """Non-finite values appeared, or the reference solver did not report an optimal status."""

    @property
    def is_failure(self) -> bool:
        return self in FAILURES


FAILURES = frozenset({Status.MAX_ITER, Status.NUMERICAL_ERROR})
"""The statuses that mean "this code is not the answer to the problem asked"; every other ending is normal."""

STATUS_LEGEND: dict[str, str] = {
    "CONVERGED": "the certificate met the tolerance, or the answer is exact (e.g. an OMP residual of zero)",
    "BUDGET_REACHED": "OMP used its n_nonzero atoms before reaching tol (normal: the budget is the question asked)",
    "MAX_ITER": "an iterative solver stopped with its certificate above tol: at max_iter, or earlier when no step "
                "lowers the objective any more (failure)",
    "NO_PROGRESS": "a greedy solver found no atom that improves the fit (e.g. no positive correlation left)",
    "NUMERICAL_ERROR": "non-finite values, or the reference solver did not reach an optimal status (failure)",
}
"""Each status name with its meaning, for reports written to disk (``Status`` members' docstrings say the same)."""


def count_statuses(status: Tensor) -> dict[str, int]:
    """``{status name: count}`` of a ``(n,)`` status tensor, for the statuses that occur (in enum order)."""
    counts = torch.bincount(status.detach().cpu().long(), minlength=len(Status))
    return {s.name: int(counts[s]) for s in Status if int(counts[s]) > 0}


def failed_mask(status: Tensor) -> Tensor:
    """``(n,)`` bool: the rows whose status is a failure (:data:`FAILURES`)."""
    failures = torch.tensor(sorted(int(s) for s in FAILURES), device=status.device)
    return torch.isin(status, failures)


# Names of the optimality certificates a solver may report (see :mod:`sparsedecomp.optimality`).
DUALITY_GAP = "relative_duality_gap"
KKT_VIOLATION = "relative_kkt_violation"
EXACT = "exact"


@dataclass(frozen=True, eq=False)
class Decomposition:
    """Codes for a batch of targets on one dictionary, with per-target diagnostics.

    Attributes:
        codes: the :class:`~sparsedecomp.codes.Codes` (dense or row-padded sparse; ``coefficients`` is the dense
            view); ``reconstruction = coefficients @ dictionary.atoms``.
        reconstruction: ``(n_targets, d)``.
        targets: ``(n_targets, d)``, the inputs, kept for metrics.
        objective: ``(n_targets,)`` the solver's objective at the returned code.
        certificate: ``(n_targets,)`` optimality certificate of kind ``certificate_kind`` (0 for exact solvers).
        certificate_kind: ``"relative_duality_gap"``, ``"relative_kkt_violation"`` or ``"exact"``.
        iterations: ``(n_targets,)`` long; iterations (or OMP steps) used.
        status: ``(n_targets,)`` long codes of :class:`Status`.
        solver: the registry name of the method.
        params: the parameters the solver ran with.
        dictionary: the dictionary decomposed into (for head attribution and feature units).
    """

    codes: Codes
    reconstruction: Tensor
    targets: Tensor
    objective: Tensor
    certificate: Tensor
    certificate_kind: str
    iterations: Tensor
    status: Tensor
    solver: str
    params: Mapping[str, Any] = field(default_factory=dict)
    dictionary: Dictionary | None = None

    @property
    def n_targets(self) -> int:
        return self.codes.n_targets

    @property
    def coefficients(self) -> Tensor:
        """``(n_targets, n_atoms)`` dense view of the codes (materialised on each access when sparse: prefer
        :attr:`codes` in loops and at scale)."""
        return self.codes.to_dense()

    def statuses(self) -> list[Status]:
        return [Status(int(s)) for s in self.status.tolist()]

    def status_counts(self) -> dict[str, int]:
        return count_statuses(self.status)

    @property
    def converged(self) -> Tensor:
        """``(n_targets,)`` bool: the solver ended normally on this target (its status is not in
        :data:`FAILURES`)."""
        return ~failed_mask(self.status)

    def feature_codes(self) -> Codes:
        """The codes in each per-head SAE's own feature units (undoing atom normalisation), same layout."""
        if self.dictionary is None:
            return self.codes
        return self.codes.scaled(1.0 / self.dictionary.scales)

    def feature_coefficients(self) -> Tensor:
        """Dense view of :meth:`feature_codes`."""
        return self.feature_codes().to_dense()

    def support(self, row: int, *, threshold: float = 0.0) -> Tensor:
        """Indices of atoms with ``|coefficient| > threshold`` for target ``row``, largest first."""
        return self.codes.row_support(row, threshold=threshold)[0]

    def rows(self, index: int | slice | Tensor) -> "Decomposition":
        """The decomposition of a subset of its targets (an ``int`` selects one and keeps every axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(
            self, codes=self.codes.rows(index), reconstruction=self.reconstruction[index],
            targets=self.targets[index], objective=self.objective[index], certificate=self.certificate[index],
            iterations=self.iterations[index], status=self.status[index],
        )

    def warn_if_failed(self) -> None:
        """Emit one summary warning if any target did not converge (never one warning per target), pointing at
        the first line of the caller's code outside this package."""
        failed = failed_mask(self.status)
        n_failed = int(failed.sum())
        if n_failed == 0:
            return
        rows = failed.nonzero().squeeze(1)[:5].tolist()
        warnings.warn(
            f"{self.solver}: {n_failed} of {self.n_targets} targets did not converge "
            f"({self.status_counts()}; first rows {rows}; worst {self.certificate_kind} "
            f"{float(self.certificate[failed].max()):.3g}). Raise max_iter or loosen tol; "
            "inspect Decomposition.status.",
            ConvergenceWarning,
            stacklevel=caller_stacklevel(),
        )


class ConvergenceWarning(UserWarning):
    """Some targets of a decomposition did not meet the solver's tolerance."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the first frame
    outside this package (and outside torch's decorator wrappers such as ``no_grad``)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("sparsedecomp", "torch"):
        frame = frame.f_back
        level += 1
    return level


def concat_decompositions(parts: list[Decomposition]) -> Decomposition:
    """Join decompositions of consecutive target chunks made by the same solver on the same dictionary."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return Decomposition(
        codes=Codes.cat([p.codes for p in parts]),
        reconstruction=cat("reconstruction"),
        targets=cat("targets"),
        objective=cat("objective"),
        certificate=cat("certificate"),
        certificate_kind=first.certificate_kind,
        iterations=cat("iterations"),
        status=cat("status"),
        solver=first.solver,
        params=first.params,
        dictionary=first.dictionary,
    )
