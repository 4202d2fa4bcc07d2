"""The result of decomposing a batch of targets: one frozen :class:`Decomposition`.

Every solver returns the same type whatever its flags, with per-target diagnostics so that no answer is silently
wrong: the objective value, an optimality certificate (duality gap or KKT violation, relative to ``||y||^2`` or
``||y||``), the iteration count and a :class:`Status`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Mapping

import torch
from torch import Tensor

from .dictionary import Dictionary


class Status(IntEnum):
    """Why a solver stopped on one target. ``CONVERGED`` and ``BUDGET_REACHED`` are normal endings."""

    CONVERGED = 0
    """The certificate met the tolerance, or the solver is exact (pseudoinverse, reference solvers)."""
    BUDGET_REACHED = 1
    """OMP used its ``n_nonzero`` atoms before reaching ``tol`` (normal: the budget is the question asked)."""
    MAX_ITER = 2
    """An iterative solver stopped at ``max_iter`` with its certificate above ``tol``."""
    NO_PROGRESS = 3
    """A greedy solver found no atom that improves the fit (e.g. no positive correlation left for ``nn_omp``)."""
    NUMERICAL_ERROR = 4
    """Non-finite values appeared, or the reference solver did not report an optimal status."""

    @property
    def is_failure(self) -> bool:
        return self in (Status.MAX_ITER, Status.NUMERICAL_ERROR)


# Names of the optimality certificates a solver may report (see :mod:`sparsedecomp.optimality`).
DUALITY_GAP = "relative_duality_gap"
KKT_VIOLATION = "relative_kkt_violation"
EXACT = "exact"


@dataclass(frozen=True, eq=False)
class Decomposition:
    """Codes for a batch of targets on one dictionary, with per-target diagnostics.

    Attributes:
        coefficients: ``(n_targets, n_atoms)``; ``reconstruction = coefficients @ dictionary.atoms``.
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

    coefficients: Tensor
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
        return self.coefficients.shape[0]

    def statuses(self) -> list[Status]:
        return [Status(int(s)) for s in self.status.tolist()]

    def status_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.status.cpu(), minlength=len(Status))
        return {s.name: int(counts[s]) for s in Status if int(counts[s]) > 0}

    @property
    def converged(self) -> Tensor:
        """``(n_targets,)`` bool: the solver ended normally on this target."""
        return (self.status != Status.MAX_ITER) & (self.status != Status.NUMERICAL_ERROR)

    def feature_coefficients(self) -> Tensor:
        """Coefficients in each per-head SAE's own feature units (undoing atom normalisation)."""
        if self.dictionary is None:
            return self.coefficients
        return self.dictionary.to_feature_units(self.coefficients)

    def support(self, row: int, *, threshold: float = 0.0) -> Tensor:
        """Indices of atoms with ``|coefficient| > threshold`` for target ``row``, largest first."""
        c = self.coefficients[row]
        idx = (c.abs() > threshold).nonzero().squeeze(1)
        return idx[c[idx].abs().argsort(descending=True)]

    def warn_if_failed(self) -> None:
        """Emit one summary warning if any target did not converge (never one warning per target)."""
        failed = ~self.converged
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
            stacklevel=3,
        )


class ConvergenceWarning(UserWarning):
    """Some targets of a decomposition did not meet the solver's tolerance."""


def concat_decompositions(parts: list[Decomposition]) -> Decomposition:
    """Join decompositions of consecutive target chunks made by the same solver on the same dictionary."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return Decomposition(
        coefficients=cat("coefficients"),
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
