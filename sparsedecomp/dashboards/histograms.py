"""Histograms of many rows at once, each on its own range, with the range guarded against degeneracy.

Row ``i`` of ``values`` (NaN entries ignored) is binned into ``n_bins`` equal bins on ``[lo_i, hi_i]`` (a bin holds
``edge_k <= v < edge_{k+1}``, the last one also ``v == hi_i``). A range that is degenerate, ``hi_i - lo_i <=
max(MIN_RELATIVE_RANGE * max(|lo_i|, |hi_i|), MIN_ABSOLUTE_RANGE)`` (a constant feature, one that never fires, a
logit row of equal values), gets a single bin holding every value: the anchors instead emit one axis tick per
``0.3 / n`` step there, about 1 MB of ticks per feature. Every row is described by ``lo``, ``hi`` and its number of
bins, never by a list of ticks.

One ``bincount`` over ``row * n_bins + bin`` counts every row together: no loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..validation import check_positive_int

MIN_RELATIVE_RANGE = 1e-6
MIN_ABSOLUTE_RANGE = 1e-12


@dataclass(frozen=True, eq=False)
class RowHistograms:
    """One histogram per row.

    Attributes:
        lo, hi: ``(n_rows,)`` float64 range of each row's bins.
        counts: ``(n_rows, n_bins)`` long; a degenerate row uses only column 0.
        n_bins: ``(n_rows,)`` long, bins each row uses (``1`` for a degenerate range, else the common ``n_bins``).
    """

    lo: Tensor
    hi: Tensor
    counts: Tensor
    n_bins: Tensor

    @property
    def n_rows(self) -> int:
        return self.counts.shape[0]

    def edges(self, row: int) -> Tensor:
        """``(n_bins[row] + 1,)`` float64 bin edges of ``row``."""
        return torch.linspace(float(self.lo[row]), float(self.hi[row]), int(self.n_bins[row]) + 1,
                              dtype=torch.float64)

    def row_counts(self, row: int) -> Tensor:
        """``(n_bins[row],)`` the counts of ``row``'s bins."""
        return self.counts[row, : int(self.n_bins[row])]


def degenerate_range(lo: Tensor, hi: Tensor) -> Tensor:
    """``(n_rows,)`` bool: ranges too narrow (or empty, or not finite) for more than one bin."""
    scale = torch.maximum(lo.abs(), hi.abs())
    floor = torch.clamp_min(MIN_RELATIVE_RANGE * scale, MIN_ABSOLUTE_RANGE)
    return ~((hi - lo) > floor)  # NaN ranges compare False, so they count as degenerate


def row_histograms(values: Tensor, lo: Tensor, hi: Tensor, n_bins: int) -> RowHistograms:
    """:class:`RowHistograms` of ``values`` (``(n_rows, n)``, NaN ignored) on ``[lo, hi]`` per row (``(n_rows,)``
    each); values outside a row's range are clamped into its end bins (callers give ranges that hold every value)."""
    n_bins = check_positive_int(n_bins, "n_bins")
    if values.ndim != 2 or lo.shape != (values.shape[0],) or hi.shape != (values.shape[0],):
        raise InputError(f"values must be (n_rows, n) with lo and hi (n_rows,), got {tuple(values.shape)}, "
                         f"{tuple(lo.shape)} and {tuple(hi.shape)}")
    lo, hi = lo.double(), hi.double()
    single = degenerate_range(lo, hi)
    width = torch.where(single, torch.ones_like(hi), hi - lo)
    # in place where possible: a logit histogram bins n_features x d_vocab values
    position = (values.double() - lo[:, None]).mul_((n_bins / width)[:, None])
    index = position.nan_to_num_(0.0).floor_().clamp_(0, n_bins - 1).long()
    index.masked_fill_(single[:, None], 0)
    index += (torch.arange(values.shape[0], device=values.device) * n_bins)[:, None]  # row r's bins follow r - 1's
    missing = torch.isnan(values)
    flat = index[~missing] if bool(missing.any()) else index.reshape(-1)
    counts = torch.bincount(flat, minlength=values.shape[0] * n_bins).reshape(values.shape[0], n_bins)
    used = torch.where(single, 1, n_bins).long()
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, lo)
    return RowHistograms(lo=lo, hi=hi, counts=counts, n_bins=used)


DENSITY_BINS_PER_DECADE = 4


@dataclass(frozen=True, eq=False)
class DensityHistogram:
    """The SAE's features by firing density, on a log scale: what a feature page sets its own density against.

    Attributes:
        log10_edges: ``(n_bins + 1,)`` float64 bin edges of ``log10(density)``, from ``floor(log10(1 / n_tokens))``
            (the smallest non-zero density the tokens can show) to 0, :data:`DENSITY_BINS_PER_DECADE` per decade.
        counts: ``(n_bins,)`` long, features per bin (the last bin holds density 1).
        n_dead: features that never fired (density 0: no logarithm, counted apart).
    """

    log10_edges: Tensor
    counts: Tensor
    n_dead: int


def density_histogram(density: Tensor, n_tokens: int) -> DensityHistogram:
    """:class:`DensityHistogram` of ``density`` (``(n_features,)`` in ``[0, 1]``, firing counts over ``n_tokens``)."""
    n_tokens = check_positive_int(n_tokens, "n_tokens")
    if density.ndim != 1 or bool(((density < 0) | (density > 1) | torch.isnan(density)).any()):
        raise InputError(f"density must be a (n_features,) tensor of values in [0, 1], got shape "
                         f"{tuple(density.shape)}")
    lo = float(torch.floor(torch.log10(torch.tensor(1.0 / n_tokens, dtype=torch.float64))))
    n_bins = max(1, round(-lo * DENSITY_BINS_PER_DECADE))
    firing = density[density > 0].double()
    rows = row_histograms(torch.log10(firing)[None], torch.tensor([lo]), torch.tensor([0.0]), n_bins)
    return DensityHistogram(log10_edges=rows.edges(0), counts=rows.row_counts(0),
                            n_dead=int((density == 0).sum()))
