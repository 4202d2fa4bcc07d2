"""Per-target metrics of a decomposition, and their summary.

Notation: target ``y`` (``(n, d)``), reconstruction ``y_hat = c D`` (``(n, d)``), code ``c`` (``(n, n_atoms)``),
``head[i]`` the head owning atom ``i``. Every function below is pure, batched over targets and returns one value
(or one row) per target:

* sparsity: ``l0 = #{i : |c_i| > threshold}``, ``l1 = sum_i |c_i|``, ``top_k_mass_share`` = the ``k`` largest
  ``|c_i|`` over ``sum_i |c_i|``;
* reconstruction: ``relative_error = ||y - y_hat|| / ||y||``, ``cosine(y, y_hat)``,
  ``relative_squared_error = ||y - y_hat||^2 / ||y||^2`` (the square of the relative error: a target is one
  direction, not a sample of a distribution, so nothing is centred; it is *not* an SAE's fraction of variance
  unexplained over tokens, which :mod:`sparsedecomp.evaluation` reports as ``explained_variance``);
* head attribution: ``head_mass_shares[h] = sum_{head[i] = h} |c_i| / sum_i |c_i|`` (decomposition-based),
  ``heads_for_mass`` = fewest heads whose shares reach ``fraction`` of the mass, and the seed notebook's
  weight-based ``target_head_shares[h] = ||y[h-block]||^2 / ||y||^2`` (needs the target's head blocks).

0/0 conventions, so that a zero target never yields NaN:

* a zero target reconstructed by zero: relative (squared) error 0, cosine 1 (the two are identical);
  a zero target reconstructed by something non-zero: relative (squared) error ``inf``, cosine 0;
  a non-zero target reconstructed by zero: cosine 0 (relative errors are 1, no special case);
* a zero code has no mass to attribute: every mass share (per head, top-k) is 0 and ``heads_for_mass`` is 0, so
  per-head shares sum to 1 for a non-zero code and to 0 for a zero code; likewise ``target_head_shares`` of a
  zero target are all 0.

NaN inputs (e.g. the NaN codes of a reference solver's failed rows) give NaN metrics for those rows only (``l0``, an
integer count, counts only the entries known to exceed the threshold; the row's status says it failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..codes import Codes
from ..decomposition import Decomposition, count_statuses
from ..validation import check_positive, check_positive_int
from ..errors import InputError, InputTypeError
from ..jsonio import to_jsonable

SCALAR_METRICS = ("l0", "l1", "relative_error", "cosine", "relative_squared_error", "top_k_mass_share")


# -- pure metric functions ---------------------------------------------------------------------------------------
def l0(coefficients: Tensor | Codes, *, threshold: float = 0.0) -> Tensor:
    """``#{i : |c_i| > threshold}`` per target, as a long tensor (dense tensor or :class:`Codes`)."""
    return (_values(coefficients).abs() > threshold).sum(dim=1)


def l1(coefficients: Tensor | Codes) -> Tensor:
    """``sum_i |c_i|`` per target."""
    return _values(coefficients).abs().sum(dim=1)


def relative_error(targets: Tensor, reconstruction: Tensor) -> Tensor:
    """``||y - y_hat|| / ||y||`` per target (0 for 0/0, ``inf`` for a zero target reconstructed by non-zero)."""
    return _safe_ratio((targets - reconstruction).norm(dim=1), targets.norm(dim=1), zero_over_zero=0.0)


def relative_squared_error(targets: Tensor, reconstruction: Tensor) -> Tensor:
    """``||y - y_hat||^2 / ||y||^2`` per target (same 0/0 conventions as :func:`relative_error`)."""
    return _safe_ratio((targets - reconstruction).pow(2).sum(dim=1), targets.pow(2).sum(dim=1), zero_over_zero=0.0)


def cosine(targets: Tensor, reconstruction: Tensor) -> Tensor:
    """``y . y_hat / (||y|| ||y_hat||)`` per target; 1 when both are zero, 0 when exactly one is."""
    y_norm = targets.norm(dim=1)
    r_norm = reconstruction.norm(dim=1)
    dot = (targets * reconstruction).sum(dim=1)
    both = (y_norm > 0) & (r_norm > 0)
    value = dot / (y_norm * r_norm).clamp_min(torch.finfo(dot.dtype).tiny)
    # Rounding can push |cos| a hair above 1 for parallel vectors.
    value = torch.where(both, value.clamp(-1.0, 1.0), torch.zeros_like(value))
    return torch.where((y_norm == 0) & (r_norm == 0), torch.ones_like(value), value)


def top_k_mass_share(coefficients: Tensor | Codes, *, k: int) -> Tensor:
    """Share of ``sum_i |c_i|`` held by the ``k`` largest ``|c_i|`` per target (0 for a zero code)."""
    k = check_positive_int(k, "k")
    mass = _values(coefficients).abs()
    top = mass.topk(min(k, mass.shape[1]), dim=1).values.sum(dim=1)
    return _safe_ratio(top, mass.sum(dim=1), zero_over_zero=0.0)


def head_mass(coefficients: Tensor | Codes, head: Tensor, n_heads: int) -> Tensor:
    """``(n, n_heads)``: ``sum_{head[i] = h} |c_i|`` per target and head."""
    codes = coefficients if isinstance(coefficients, Codes) else Codes.dense(coefficients)
    if head.shape != (codes.n_atoms,):
        raise InputError(f"head must have shape ({codes.n_atoms},) to label every atom, got {tuple(head.shape)}")
    return codes.group_sums(head, n_heads)


def head_mass_shares(coefficients: Tensor | Codes, head: Tensor, n_heads: int) -> Tensor:
    """``(n, n_heads)``: each head's share of the coefficient mass ``sum_i |c_i|`` (rows sum to 1, or to 0 for a
    zero code)."""
    mass = head_mass(coefficients, head, n_heads)
    return _safe_ratio(mass, mass.sum(dim=1, keepdim=True), zero_over_zero=0.0)


def heads_for_mass(shares: Tensor, *, fraction: float = 0.9) -> Tensor:
    """Fewest heads whose shares (``(n, n_heads)``, rows summing to 1 or 0) add up to at least ``fraction`` of
    the row's total, per target; 0 for a row without mass (and for a row of NaN shares, whose status already
    says the solve failed)."""
    check_positive(fraction, "fraction")
    if fraction > 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction}")
    ordered = shares.sort(dim=1, descending=True).values
    cumulative = ordered.cumsum(dim=1)
    total = cumulative[:, -1:]
    # A few ulps of slack so that shares of exactly [0.9, 0.1] need one head for fraction 0.9 despite rounding.
    slack = 1 - 8 * torch.finfo(shares.dtype).eps
    reached = cumulative >= fraction * total * slack
    needed = (~reached).sum(dim=1) + 1
    return torch.where(total.squeeze(1) > 0, needed, torch.zeros_like(needed))


def target_head_shares(targets: Tensor, columns: Sequence[tuple[int, int]]) -> Tensor:
    """``(n, n_heads)``: ``||y[a_h:b_h]||^2 / ||y||^2`` for head blocks ``columns[h] = (a_h, b_h)`` (the seed's
    squared-norm share; rows sum to 1 when the blocks tile the columns, 0 for a zero target)."""
    blocks = torch.stack([targets[:, a:b].pow(2).sum(dim=1) for a, b in columns], dim=1)
    return _safe_ratio(blocks, targets.pow(2).sum(dim=1, keepdim=True), zero_over_zero=0.0)


def head_columns(dim: int, d_head: int) -> tuple[tuple[int, int], ...]:
    """Consecutive head blocks ``(h*d_head, (h+1)*d_head)`` tiling ``dim`` columns."""
    d_head = check_positive_int(d_head, "d_head")
    if dim % d_head != 0:
        raise InputError(f"targets have {dim} columns, which is not a multiple of d_head={d_head}")
    return tuple((h * d_head, (h + 1) * d_head) for h in range(dim // d_head))


@dataclass(frozen=True)
class ValueSummary:
    """Mean, median, 10th and 90th percentiles of the finite entries of a per-target metric (``None`` when no
    entry is finite), and how many entries were not finite."""

    mean: float | None
    median: float | None
    p10: float | None
    p90: float | None
    n_nonfinite: int

    @classmethod
    def of(cls, values: Tensor) -> "ValueSummary":
        values = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        finite = values[torch.isfinite(values)]
        n_nonfinite = int(values.numel() - finite.numel())
        if finite.numel() == 0:
            return cls(None, None, None, None, n_nonfinite)
        q = torch.quantile(finite, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
        return cls(float(finite.mean()), float(q[0]), float(q[1]), float(q[2]), n_nonfinite)


def summarize(values: Tensor) -> dict[str, float | int | None]:
    """:meth:`ValueSummary.of` as a JSON-ready dict (``mean``, ``median``, ``p10``, ``p90``, ``n_nonfinite``)."""
    return to_jsonable(ValueSummary.of(values))


def _values(coefficients: Tensor | Codes) -> Tensor:
    """The stored entries of a code: sums, counts and maxima of ``|c|`` over them equal those over the dense
    row, since a sparse row's other entries (and its padding) are zero."""
    return coefficients.values if isinstance(coefficients, Codes) else coefficients


def _safe_ratio(numerator: Tensor, denominator: Tensor, *, zero_over_zero: float) -> Tensor:
    """``numerator / denominator`` with ``0/0 = zero_over_zero`` and ``x/0 = inf`` for ``x > 0``."""
    ratio = numerator / denominator.clamp_min(torch.finfo(numerator.dtype).tiny)
    at_zero = torch.where(numerator == 0, torch.full_like(ratio, zero_over_zero), torch.full_like(ratio, float("inf")))
    result = torch.where(denominator > 0, ratio, at_zero)
    # NaN in, NaN out (the comparisons above would turn a NaN denominator into a made-up 0 or inf).
    unknown = torch.isnan(numerator) | torch.isnan(denominator)
    return torch.where(unknown, torch.full_like(result, float("nan")), result)


# -- the dataclass ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DecompositionMetrics:
    """Per-target metrics of one :class:`~sparsedecomp.Decomposition` (see the module docstring).

    Attributes:
        l0: ``(n,)`` long. l1, relative_error, cosine, relative_squared_error, top_k_mass_share: ``(n,)``.
        head_mass_share: ``(n, n_heads)``, or ``None`` when the dictionary has no head labels.
        heads_for_mass: ``(n,)`` long, or ``None`` likewise.
        target_head_share: ``(n, n_heads)``, or ``None`` when the targets' head blocks are unknown.
        status: ``(n,)`` the solver's status codes (metrics of failed rows are not hidden, but can be masked).
        threshold, mass_fraction, top_k, feature_units: the settings used.
        solver: the registry name of the method.
    """

    l0: Tensor
    l1: Tensor
    relative_error: Tensor
    cosine: Tensor
    relative_squared_error: Tensor
    top_k_mass_share: Tensor
    head_mass_share: Tensor | None
    heads_for_mass: Tensor | None
    target_head_share: Tensor | None
    status: Tensor
    threshold: float
    mass_fraction: float
    top_k: int
    feature_units: bool
    solver: str

    @property
    def n_targets(self) -> int:
        return self.l0.shape[0]

    def summarize(self) -> "MetricsSummary":
        """Settings, status counts, a :class:`ValueSummary` of every scalar metric (and of ``heads_for_mass``
        when the dictionary has head labels), and the mean per-head shares (averaged over targets with non-zero
        mass / non-zero norm, so each mean sums to 1; ``None`` if unavailable)."""
        scalars = {name: ValueSummary.of(getattr(self, name)) for name in SCALAR_METRICS}
        if self.heads_for_mass is not None:
            scalars["heads_for_mass"] = ValueSummary.of(self.heads_for_mass)
        return MetricsSummary(
            solver=self.solver,
            n_targets=self.n_targets,
            settings=MetricsSettings(threshold=self.threshold, mass_fraction=self.mass_fraction, top_k=self.top_k,
                                     feature_units=self.feature_units),
            status_counts=count_statuses(self.status),
            metrics=scalars,
            head_mass_share_mean=_mean_share(self.head_mass_share),
            target_head_share_mean=_mean_share(self.target_head_share),
        )

    def summary(self) -> dict[str, Any]:
        """:meth:`summarize` as a JSON-ready dict (the same keys, nested)."""
        return to_jsonable(self.summarize())


@dataclass(frozen=True)
class MetricsSettings:
    """The settings :func:`decomposition_metrics` measured with."""

    threshold: float
    mass_fraction: float
    top_k: int
    feature_units: bool


@dataclass(frozen=True)
class MetricsSummary:
    """Dataset-level summary of a :class:`DecompositionMetrics` (JSON-ready; see
    :mod:`sparsedecomp.jsonio`).

    Attributes:
        solver, n_targets, settings: what was measured and how.
        status_counts: targets per solver status name.
        metrics: a :class:`ValueSummary` per metric name (:data:`SCALAR_METRICS`, then ``heads_for_mass`` when
            the dictionary has head labels).
        head_mass_share_mean, target_head_share_mean: mean per-head shares, ``None`` when unavailable.
    """

    solver: str
    n_targets: int
    settings: MetricsSettings
    status_counts: Mapping[str, int]
    metrics: Mapping[str, ValueSummary]
    head_mass_share_mean: tuple[float, ...] | None
    target_head_share_mean: tuple[float, ...] | None


def decomposition_metrics(
    decomposition: Decomposition,
    *,
    threshold: float = 0.0,
    mass_fraction: float = 0.9,
    top_k: int = 5,
    d_head: int | None = None,
    feature_units: bool = False,
) -> DecompositionMetrics:
    """All metrics of ``decomposition``, per target.

    Args:
        threshold: ``l0`` counts ``|c_i| > threshold``.
        mass_fraction: ``heads_for_mass`` counts the heads needed to reach this share of the coefficient mass.
        top_k: ``top_k_mass_share`` sums the ``top_k`` largest ``|c_i|``.
        d_head: width of the targets' head blocks, for ``target_head_share`` when the dictionary is not
            block-diagonal (e.g. a Kissane concat-``z`` feature decomposed into a dense dictionary). A
            block-diagonal dictionary supplies its own blocks; ``d_head`` must then agree with them.
        feature_units: measure sparsity and mass on the SAE feature activations
            (:meth:`~sparsedecomp.Decomposition.feature_coefficients`) instead of the code on the (normalised)
            atoms. Reconstruction metrics do not depend on this.
    """
    check_positive(threshold, "threshold", allow_zero=True)
    top_k = check_positive_int(top_k, "top_k")
    if not isinstance(decomposition, Decomposition):
        raise InputTypeError(f"decomposition must be a sparsedecomp.Decomposition, got {type(decomposition).__name__}")
    dictionary = decomposition.dictionary
    coefficients = decomposition.feature_codes() if feature_units else decomposition.codes
    targets, reconstruction = decomposition.targets, decomposition.reconstruction

    shares = needed = None
    if dictionary is not None and dictionary.head is not None:
        shares = head_mass_shares(coefficients, dictionary.head, dictionary.n_heads)
        needed = heads_for_mass(shares, fraction=mass_fraction)
    else:
        # Validate the setting even when it cannot be used, so a typo is not silently ignored.
        check_positive(mass_fraction, "mass_fraction")

    columns = None
    if dictionary is not None and dictionary.block_columns is not None:
        columns = dictionary.block_columns
        if d_head is not None and any(b - a != d_head for a, b in columns):
            raise InputError(f"d_head={d_head} disagrees with the block-diagonal dictionary's blocks {columns[:2]}...")
    elif d_head is not None:
        columns = head_columns(targets.shape[1], d_head)

    return DecompositionMetrics(
        l0=l0(coefficients, threshold=threshold),
        l1=l1(coefficients),
        relative_error=relative_error(targets, reconstruction),
        cosine=cosine(targets, reconstruction),
        relative_squared_error=relative_squared_error(targets, reconstruction),
        top_k_mass_share=top_k_mass_share(coefficients, k=top_k),
        head_mass_share=shares,
        heads_for_mass=needed,
        target_head_share=None if columns is None else target_head_shares(targets, columns),
        status=decomposition.status,
        threshold=float(threshold),
        mass_fraction=float(mass_fraction),
        top_k=top_k,
        feature_units=feature_units,
        solver=decomposition.solver,
    )


def _mean_share(shares: Tensor | None) -> tuple[float, ...] | None:
    if shares is None:
        return None
    shares = shares.detach().to(device="cpu", dtype=torch.float64)
    keep = torch.isfinite(shares).all(dim=1) & (shares.sum(dim=1) > 0)
    if not bool(keep.any()):
        return (0.0,) * shares.shape[1]
    return tuple(float(v) for v in shares[keep].mean(dim=0))
