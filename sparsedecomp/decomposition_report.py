"""The report of one decomposition run (``summary.json``): frozen dataclasses of JSON-ready values.

:func:`~sparsedecomp.jobs.decompose.run_decomposition` builds a :class:`DecompositionReport`; ``summary.json`` is its
:meth:`~DecompositionReport.to_dict`, and :func:`read_report` reads the file back into the same dataclasses. The
JSON keys are a stable interface for users: every key is listed, with its meaning, in ``docs/outputs.md`` (a test
checks the list against these dataclasses). Keys that only some runs have (the residual space's) are left out,
not written as ``null``, when absent (:data:`~sparsedecomp.jsonio.OMIT_IF_NONE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError
from .jsonio import OMIT_IF_NONE, to_jsonable
from .evaluation.metrics import MetricsSummary
from .jsonio import from_jsonable


@dataclass(frozen=True)
class AtomRecord:
    """One non-zero of a feature's code: the unit per-head feature direction ``(head, feature)``, its coefficient,
    and that coefficient over ``||W_dec_head[feature]||``, the per-head feature's activation in its SAE's units."""

    head: int
    feature: int
    coefficient: float
    activation_units: float


@dataclass(frozen=True)
class FeatureRecord:
    """One concat feature's decomposition in one space.

    ``atoms`` lists the code's non-zeros, largest ``|coefficient|`` first, at most
    :data:`~sparsedecomp.jobs.decompose.MAX_LISTED_ATOMS` (``n_atoms_listed < l0`` says the list was cut; the codes file
    has them all). ``residual_norm`` is ``||t @ W_O_cat||`` in the residual space (``None`` in ``z``).
    """

    feature: int
    status: str
    certificate: float
    objective: float
    iterations: int
    l0: int
    relative_error: float
    cosine: float
    weight_head_shares: tuple[float, ...]
    decomposition_head_shares: tuple[float, ...] | None
    n_atoms_listed: int
    atoms: tuple[AtomRecord, ...]
    residual_norm: float | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class ShareAgreement:
    """How often the top head by decoder-weight share is the top head by coefficient mass, and the mean total
    variation distance ``0.5 * sum_h |w_h - d_h|`` between the two share vectors (over codes with mass)."""

    top_head_agreement: float
    mean_total_variation: float


@dataclass(frozen=True)
class SpaceResult:
    """The decomposition in one space (``z`` or ``residual``)."""

    metrics: MetricsSummary
    certificate_kind: str
    verdict: str
    agreement_weight_vs_decomposition: ShareAgreement | None
    codes_file: str
    codes_layout: str
    features: tuple[FeatureRecord, ...]


@dataclass(frozen=True)
class NormRange:
    min: float
    mean: float
    max: float


@dataclass(frozen=True)
class TargetsNote:
    """The concat decoder rows before they were made unit norm (and, in the residual space, their norms through
    ``W_O``, by which the residual targets were divided)."""

    decoder_already_unit_norm: bool
    norm_min: float
    norm_mean: float
    norm_max: float
    zero_rows: int
    unit_norm_in_every_space: bool = True
    residual_norm: NormRange | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class Ranks:
    """Numerical ranks: per head (keyed by head index as a string), of the block dictionary in concatenated ``z``,
    of the concat decoder, and of the dictionary mixed through ``W_O`` (residual space only)."""

    head_dictionaries: Mapping[str, int]
    block_dictionary: int
    concat_decoder: int
    mixed_dictionary: int | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class StatusMeaning:
    code: int
    meaning: str


@dataclass(frozen=True)
class DecompositionReport:
    """Everything ``summary.json`` says about a run: settings and context, the dictionaries and targets, and one
    :class:`SpaceResult` per space (see ``docs/outputs.md`` for every key)."""

    title: str
    context: Mapping[str, Any]
    method: str
    params: Mapping[str, Any]
    alpha_meaning: str | None
    spaces: tuple[str, ...]
    n_targets: int
    n_concat_features: int
    features_selected: tuple[int, ...] | None
    n_heads: int
    d_head: int
    dictionary_sizes: Mapping[str, int]
    targets: TargetsNote
    ranks: Ranks
    weight_head_share_mean: tuple[float, ...]
    status_legend: Mapping[str, StatusMeaning]
    results: Mapping[str, SpaceResult]
    timings_s: Mapping[str, float]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to ``summary.json``."""
        return to_jsonable(self, path="summary")


def read_report(path: str | Path) -> DecompositionReport:
    """A ``summary.json`` read back into a :class:`DecompositionReport`; a file that is missing, not JSON or not
    of this layout is refused by name (:class:`~sparsedecomp.errors.InputError`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no summary file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a JSON file ({err})") from None
    return from_jsonable(DecompositionReport, data, path=path.name)
