"""What every solver shares: input checks, chunking over targets, and assembling a :class:`Decomposition`.

A solver is an immutable object holding only its parameters. :meth:`Solver.prepare` checks a dictionary and does
the work that depends only on it once, returning a :class:`PreparedSolver`; its ``solve(targets)`` checks each
batch, solves chunks of at most ``chunk_size`` targets (:meth:`Solver.solve_chunk`) so that memory stays bounded,
and joins the chunks.
Tensors keep the dtype and device of the inputs.

Degenerate inputs are reported here, once per ``solve`` call and for every method: zero targets
(:class:`~sparsedecomp.validation.ZeroTargetWarning`: their code is zero by definition) and whatever a solver
judges from its chunks (:meth:`Solver.warn_degenerate`, e.g. the lasso's ``alpha >= alpha_max``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

import warnings

from ..codes import Codes
from ..decomposition import Decomposition, caller_stacklevel, concat_decompositions
from ..dictionary import Dictionary
from ..validation import ZeroTargetWarning, check_positive_int, check_targets, first_indices
from ..errors import InputError, InputTypeError


@dataclass(frozen=True)
class ChunkResult:
    """What every solver's :meth:`Solver.solve_chunk` returns for one chunk of targets (the one per-chunk result
    type; :class:`PreparedSolver` turns it into a :class:`~sparsedecomp.Decomposition`)."""

    codes: Codes
    objective: Tensor
    certificate: Tensor
    iterations: Tensor
    status: Tensor
    # (n,) each target's alpha_max (the smallest L1 weight with the zero code), from solvers that compute it anyway
    # (the lasso): what :meth:`Solver.warn_degenerate` judges an absolute alpha by.
    alpha_max: Tensor | None = None


@dataclass(frozen=True)
class Solver:
    """Base class: subclasses set ``name`` and ``certificate_kind`` and implement :meth:`solve_chunk`.

    Use: ``solver.prepare(dictionary)`` does the work that depends only on the dictionary once and returns a
    :class:`PreparedSolver`, whose ``solve(targets)`` can be called for any number of target batches;
    ``solver.solve(targets, dictionary)`` does both for a single batch.

    Attributes:
        chunk_size: most targets solved at once; bounds memory at about
            ``chunk_size * n_atoms`` floats per working array.
    """

    name: ClassVar[str] = "solver"
    certificate_kind: ClassVar[str] = "exact"

    chunk_size: int = 2048

    def __post_init__(self) -> None:
        self._check_int("chunk_size")

    def _check_int(self, name: str) -> None:
        """Check the positive-int parameter ``name`` and store it as a Python ``int`` (``np.int64(8)`` -> ``8``),
        so that ``params()`` records plain JSON-ready values (the dataclass is frozen, hence ``object.__setattr__``)."""
        object.__setattr__(self, name, check_positive_int(getattr(self, name), name))

    def params(self) -> dict[str, Any]:
        """The solver's parameters, as recorded in each :class:`Decomposition`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- what a subclass provides ------------------------------------------------------------------------------
    def precompute(self, dictionary: Dictionary) -> Any:
        """Work that depends only on the dictionary (Gram blocks, pseudoinverses, compiled programs), done once
        by :meth:`prepare` and handed to every :meth:`solve_chunk`."""
        return None

    def solve_chunk(self, targets: Tensor, dictionary: Dictionary, prepared: Any) -> ChunkResult:
        raise NotImplementedError

    def check_dictionary(self, dictionary: Dictionary) -> None:
        """Hook for solvers with extra requirements on the dictionary (raise ``InputError``)."""

    def warn_degenerate(self, targets: Tensor, alpha_max: Tensor | None) -> None:
        """Hook: warn (once per ``solve`` call) about targets whose answer this solver's parameters fix trivially;
        ``alpha_max`` is the chunks' :attr:`ChunkResult.alpha_max` joined, or ``None``."""

    # -- public entry points -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, dictionary: Dictionary | Tensor) -> "PreparedSolver":
        """Check ``dictionary`` and precompute what depends only on it; solve batches with the result's ``solve``."""
        dictionary = as_dictionary(dictionary)
        self.check_dictionary(dictionary)
        return PreparedSolver(self, dictionary, self.precompute(dictionary))

    def solve(self, targets: Tensor, dictionary: Dictionary | Tensor, *, progress: bool = False) -> Decomposition:
        """Decompose every row of ``targets`` (``(n_targets, d)``) into ``dictionary`` (``(n_atoms, d)``)."""
        return self.prepare(dictionary).solve(targets, progress=progress)


@dataclass(frozen=True, eq=False)
class PreparedSolver:
    """A solver bound to one dictionary with its dictionary-only work done: ``solve(targets)`` any number of
    batches without repeating it (what the pipeline, evaluation, dashboards and benchmarks use)."""

    solver: Solver
    dictionary: Dictionary
    precomputed: Any

    @torch.no_grad()
    def solve(self, targets: Tensor, *, progress: bool = False, desc: str | None = None) -> Decomposition:
        """Decompose every row of ``targets`` in chunks of ``solver.chunk_size``; ``progress`` shows a tqdm bar
        that advances per chunk solved. Emits one :class:`~sparsedecomp.ConvergenceWarning` for the whole batch
        if any target failed."""
        dictionary = self.dictionary
        targets = check_targets(targets, dictionary.dim)
        if targets.dtype != dictionary.dtype or targets.device != dictionary.device:
            raise InputError(
                f"targets are {targets.dtype} on {targets.device} but the dictionary is {dictionary.dtype} on "
                f"{dictionary.device}; move one with .to(...) so both match"
            )
        n = targets.shape[0]
        chunk_size = self.solver.chunk_size
        parts, alpha_max = [], []
        with _progress_bar(progress, n, desc or self.solver.name) as bar:
            for start in range(0, max(n, 1), chunk_size):
                chunk = targets[start : start + chunk_size]
                result = self.solver.solve_chunk(chunk, dictionary, self.precomputed)
                parts.append(self._to_decomposition(chunk, result))
                alpha_max.append(result.alpha_max)
                bar.update(chunk.shape[0])
        decomposition = concat_decompositions(parts)
        warn_zero_targets(targets, self.solver.name)
        self.solver.warn_degenerate(targets, None if any(a is None for a in alpha_max) else torch.cat(alpha_max))
        decomposition.warn_if_failed()
        return decomposition

    def _to_decomposition(self, targets: Tensor, result: ChunkResult) -> Decomposition:
        codes = result.codes.compact()
        return Decomposition(
            codes=codes,
            reconstruction=self.dictionary.reconstruct(codes),
            targets=targets,
            objective=result.objective,
            certificate=result.certificate,
            certificate_kind=self.solver.certificate_kind,
            iterations=result.iterations.to(torch.long),
            status=result.status.to(torch.long),
            solver=self.solver.name,
            params=self.solver.params(),
            dictionary=self.dictionary,
        )


def warn_zero_targets(targets: Tensor, solver: str) -> None:
    """One :class:`~sparsedecomp.validation.ZeroTargetWarning` naming how many rows of ``targets`` are all zero
    and the first of them: every method returns the zero code for them, which says nothing about the dictionary
    (often a dead feature, or a row whose normalisation overflowed to zero upstream)."""
    zero = ~(targets != 0).any(dim=1)
    n_zero = int(zero.sum())
    if n_zero == 0:
        return
    warnings.warn(
        f"{solver}: {n_zero} of {targets.shape[0]} targets are all zero (first rows {first_indices(zero)}); their "
        "code is zero by definition, not a decomposition: drop them, or check how they were made (a dead feature, "
        "a row that overflowed when normalised)",
        ZeroTargetWarning,
        stacklevel=caller_stacklevel(),
    )


def _progress_bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="target", disable=not enabled, leave=False)


def as_dictionary(dictionary: Dictionary | Tensor) -> Dictionary:
    """Accept a ready :class:`Dictionary` or a raw ``(n_atoms, d)`` tensor (used as is, not normalised)."""
    if isinstance(dictionary, Dictionary):
        return dictionary
    if isinstance(dictionary, Tensor):
        return Dictionary.from_atoms(dictionary, normalize=False)
    raise InputTypeError(f"dictionary must be a sparsedecomp.Dictionary or an (n_atoms, d) tensor, got {type(dictionary).__name__}")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a solver computes in: half precisions in float32 (Cholesky, triangular solves and the SVD need at
    least single precision), float32 and float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def full_status(n: int, status: int, device: torch.device) -> Tensor:
    return torch.full((n,), int(status), dtype=torch.long, device=device)
