"""Recovery scores: how well a solver's codes recover the truth of a planted world (:func:`score_recovery`).

The truth is a :class:`~sparsedecomp.demo.planted_world.PlantedTruth` (or a
:class:`~sparsedecomp.demo.planted_world.PlantedWorld`, :class:`~sparsedecomp.demo.planted.PlantedProblem` or
:class:`~sparsedecomp.demo.planted.MixedProblem` standing for its truth). See ``docs/planted.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..codes import Codes
from ..decomposition import Decomposition
from ..errors import InputError, InputTypeError
from ..jsonio import to_jsonable
from .planted import MixedProblem, PlantedProblem, planted_dense
from .planted_world import PlantedTruth, PlantedWorld

DEFAULT_THRESHOLD = 0.05
"""An atom is *found* in a code row when ``|c_i| > DEFAULT_THRESHOLD * max_j |c_j|`` (see :func:`score_recovery`)."""


@dataclass(frozen=True, eq=False)
class RecoveryPerTarget:
    """Per-target recovery scores, ``(n_targets,)`` float64 tensors (see :func:`score_recovery` for the maths)."""

    support_recall: Tensor
    support_precision: Tensor
    support_exact: Tensor
    coefficient_error: Tensor
    head_recall: Tensor
    head_precision: Tensor
    n_found: Tensor
    n_planted: Tensor


@dataclass(frozen=True, eq=False)
class RecoveryScore:
    """How well codes recover a planted truth: means over targets (JSON-ready: :meth:`to_dict`), and the
    per-target values in ``per_target`` (left out of the JSON). See :func:`score_recovery` for the maths."""

    threshold: float
    n_targets: int
    support_recall: float
    support_precision: float
    support_exact: float
    coefficient_error: float
    coefficient_error_median: float
    coefficient_error_max: float
    head_recall: float
    head_precision: float
    l0_mean: float
    planted_l0_mean: float
    per_target: RecoveryPerTarget | None = field(default=None, metadata={"json": False})

    def to_dict(self) -> dict[str, Any]:
        """The aggregates as plain JSON types (:func:`sparsedecomp.jsonio.to_jsonable`)."""
        return to_jsonable(self)


def score_recovery(codes: Decomposition | Codes | Tensor, truth: PlantedTruth | PlantedWorld | PlantedProblem
                   | MixedProblem, *, threshold: float = DEFAULT_THRESHOLD) -> RecoveryScore:
    """Score codes against the planted truth.

    ``codes`` (a :class:`~sparsedecomp.Decomposition`, :class:`~sparsedecomp.Codes` or a dense ``(n_targets,
    n_atoms)`` tensor) must be on the truth's atoms: the unit atoms of the world's ``dictionary`` (what
    ``decompose(world.targets, world.dictionary, ...)`` returns), in the same order. For target row ``c`` with
    planted coefficients ``w`` (dense, ``w_j != 0`` exactly on the planted support ``P``):

    * **found** atoms ``F = {j : |c_j| > threshold * max_i |c_i|}`` (a row of zeros finds nothing), so small
      coefficients a solver leaves on the noise do not count as choices;
    * **support recall** ``|F & P| / |P|``; **support precision** ``|F & P| / |F|`` (0 when nothing is found);
      **support exact** 1 when ``F == P``;
    * **coefficient error** ``||c - w||_2 / ||w||_2`` on the raw code (every coefficient, thresholded or not; NaN for
      a non-finite code row);
    * **head recall / precision**: the same on the sets of heads that own an atom of ``F`` and of ``P``.

    A planted atom whose own weight is below ``threshold`` times the target's largest is hard to count as found:
    keep ``threshold`` below the smallest planted ratio (with the default ``weight_sigma = 0.5`` and at most 12
    atoms that ratio is rarely below 0.1; the default threshold is :data:`DEFAULT_THRESHOLD`).
    """
    truth = _as_truth(truth)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise InputError(f"threshold must be a number in [0, 1) (a fraction of each row's largest |coefficient|), "
                         f"got {threshold!r}")
    if isinstance(codes, Decomposition):
        codes = codes.codes
    if isinstance(codes, Tensor):
        if codes.ndim != 2 or not codes.is_floating_point():
            raise InputError(f"codes must be a floating (n_targets, n_atoms) tensor, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        codes = Codes.dense(codes)
    if not isinstance(codes, Codes):
        raise InputTypeError(f"codes must be a Decomposition, Codes or a dense tensor, got {type(codes).__name__}")
    if codes.shape != (truth.n_targets, truth.n_atoms):
        raise InputError(f"codes are {codes.shape[0]} targets x {codes.shape[1]} atoms but the truth is "
                         f"{truth.n_targets} targets x {truth.n_atoms} atoms: score the codes of the planted targets "
                         "on the planted dictionary")
    device = codes.device
    truth = truth.to(device)
    n_heads = truth.n_heads
    head_onehot = torch.nn.functional.one_hot(truth.atom_head, n_heads).double()
    chunk = max(1, 2**22 // truth.n_atoms)  # dense (chunk, n_atoms) float64 blocks of about 32 MB
    parts: dict[str, list[Tensor]] = {name: [] for name in RecoveryPerTarget.__dataclass_fields__}
    for start in range(0, truth.n_targets, chunk):
        rows = slice(start, start + chunk)
        part = truth.rows(rows)
        c = codes.rows(rows).to_dense().double()
        w = planted_dense(part.support, part.weights.double(), truth.n_atoms)
        planted = planted_dense(part.support, torch.ones_like(part.weights, dtype=torch.float64), truth.n_atoms) > 0
        magnitude = c.abs()
        peak = magnitude.nan_to_num(0.0).amax(dim=1, keepdim=True)
        found = magnitude > threshold * peak
        found &= peak > 0
        hits = (found & planted).sum(dim=1).double()
        n_found, n_planted = found.sum(dim=1).double(), planted.sum(dim=1).double()
        parts["support_recall"].append(hits / n_planted)
        parts["support_precision"].append(torch.where(n_found > 0, hits / n_found.clamp_min(1), 0.0))
        parts["support_exact"].append((found == planted).all(dim=1).double())
        parts["coefficient_error"].append((c - w).norm(dim=1) / w.norm(dim=1))
        found_heads, planted_heads = found.double() @ head_onehot > 0, planted.double() @ head_onehot > 0
        head_hits = (found_heads & planted_heads).sum(dim=1).double()
        n_found_heads = found_heads.sum(dim=1).double()
        parts["head_recall"].append(head_hits / planted_heads.sum(dim=1).double())
        parts["head_precision"].append(torch.where(n_found_heads > 0, head_hits / n_found_heads.clamp_min(1), 0.0))
        parts["n_found"].append(n_found)
        parts["n_planted"].append(n_planted)
    per_target = RecoveryPerTarget(**{name: torch.cat(values).cpu() for name, values in parts.items()})
    error = per_target.coefficient_error
    return RecoveryScore(
        threshold=float(threshold),
        n_targets=truth.n_targets,
        support_recall=float(per_target.support_recall.mean()),
        support_precision=float(per_target.support_precision.mean()),
        support_exact=float(per_target.support_exact.mean()),
        coefficient_error=float(error.mean()),
        coefficient_error_median=float(error.median()),
        coefficient_error_max=float(error.max()),
        head_recall=float(per_target.head_recall.mean()),
        head_precision=float(per_target.head_precision.mean()),
        l0_mean=float(per_target.n_found.mean()),
        planted_l0_mean=float(per_target.n_planted.mean()),
        per_target=per_target,
    )


def _as_truth(truth: Any) -> PlantedTruth:
    if isinstance(truth, PlantedTruth):
        return truth
    if isinstance(truth, PlantedWorld):
        return truth.truth
    if isinstance(truth, (PlantedProblem, MixedProblem)):
        return PlantedTruth.of(truth)
    raise InputTypeError(f"truth must be a PlantedTruth, PlantedWorld, PlantedProblem or MixedProblem, got "
                         f"{type(truth).__name__}")
