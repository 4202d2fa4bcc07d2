"""What every solver shares: input checks, chunking over targets, and assembling a :class:`Decomposition`.

A solver is an immutable object holding only its parameters. ``solve(targets, dictionary)`` checks the inputs
once, does the work that depends only on the dictionary once (:meth:`Solver.prepare`), then solves chunks of at
most ``chunk_size`` targets (:meth:`Solver.solve_chunk`) so that memory stays bounded, and joins the chunks.
Tensors keep the dtype and device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..decomposition import Decomposition, concat_decompositions
from ..dictionary import Dictionary
from ..validation import check_positive_int, check_targets
from ..errors import InputError, InputTypeError


@dataclass(frozen=True)
class ChunkResult:
    """What :meth:`Solver.solve_chunk` returns for one chunk of targets."""

    coefficients: Tensor
    objective: Tensor
    certificate: Tensor
    iterations: Tensor
    status: Tensor


@dataclass(frozen=True)
class Solver:
    """Base class: subclasses set ``name`` and ``certificate_kind`` and implement :meth:`solve_chunk`.

    Attributes:
        chunk_size: most targets solved at once; bounds memory at about
            ``chunk_size * n_atoms`` floats per working array.
    """

    name: ClassVar[str] = "solver"
    certificate_kind: ClassVar[str] = "exact"

    chunk_size: int = 2048

    def __post_init__(self) -> None:
        check_positive_int(self.chunk_size, "chunk_size")

    def params(self) -> dict[str, Any]:
        """The solver's parameters, as recorded in each :class:`Decomposition`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def prepare(self, dictionary: Dictionary) -> Any:
        """Work that depends only on the dictionary (Gram blocks, Lipschitz constants), reused for every chunk."""
        return None

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: Any) -> ChunkResult:
        raise NotImplementedError

    def check_dictionary(self, dictionary: Dictionary) -> None:
        """Hook for solvers with extra requirements on the dictionary (raise ``ValueError``)."""

    @torch.no_grad()
    def solve(self, targets: Tensor, dictionary: Dictionary | Tensor) -> Decomposition:
        """Decompose every row of ``targets`` (``(n_targets, d)``) into ``dictionary`` (``(n_atoms, d)``)."""
        dictionary = as_dictionary(dictionary)
        targets = check_targets(targets, dictionary.dim)
        if targets.dtype != dictionary.dtype or targets.device != dictionary.device:
            raise InputError(
                f"targets are {targets.dtype} on {targets.device} but the dictionary is {dictionary.dtype} on "
                f"{dictionary.device}; move one with .to(...) so both match"
            )
        self.check_dictionary(dictionary)
        prepared = self.prepare(dictionary)
        parts = []
        for start in range(0, max(targets.shape[0], 1), self.chunk_size):
            chunk = targets[start : start + self.chunk_size]
            result = self.solve_chunk(chunk, dictionary, prepared)
            parts.append(self._to_decomposition(chunk, dictionary, result))
        decomposition = concat_decompositions(parts)
        decomposition.warn_if_failed()
        return decomposition

    def _to_decomposition(self, targets: Tensor, dictionary: Dictionary, result: ChunkResult) -> Decomposition:
        coefficients = result.coefficients
        return Decomposition(
            coefficients=coefficients,
            reconstruction=dictionary.reconstruct(coefficients),
            targets=targets,
            objective=result.objective,
            certificate=result.certificate,
            certificate_kind=self.certificate_kind,
            iterations=result.iterations.to(torch.long),
            status=result.status.to(torch.long),
            solver=self.name,
            params=self.params(),
            dictionary=dictionary,
        )


def as_dictionary(dictionary: Dictionary | Tensor) -> Dictionary:
    """Accept a ready :class:`Dictionary` or a raw ``(n_atoms, d)`` tensor (used as is, not normalised)."""
    if isinstance(dictionary, Dictionary):
        return dictionary
    if isinstance(dictionary, Tensor):
        return Dictionary.from_atoms(dictionary, normalize=False)
    raise InputTypeError(f"dictionary must be a sparsedecomp.Dictionary or an (n_atoms, d) tensor, got {type(dictionary).__name__}")


def full_status(n: int, status: int, device: torch.device) -> Tensor:
    return torch.full((n,), int(status), dtype=torch.long, device=device)
