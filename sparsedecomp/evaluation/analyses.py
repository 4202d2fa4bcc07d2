"""The research notebook's analyses of per-head SAEs, the concat SAE and ``W_O``, as JSON-ready results.

Notation: head ``h`` has ``z_h`` (``d_head``), its SAE decoder ``W_dec_h`` (``(n_h, d_head)``, rows ``d_j``) and
output projection ``W_O[h]`` (``(d_head, d_model)``); the concat SAE decoder is ``(n_concat, n_heads * d_head)``.

1. :func:`decoder_norms`: ``||W_dec[i]||`` per SAE, in training units and in units of unscaled ``z`` (see
   :class:`DecoderNorms` for which is which), summary statistics and fixed-bin histograms.
2. :func:`dictionary_ranks`: numerical ranks of each head's dictionary, the block dictionary, the concat decoder and
   (given ``W_O``) the mixed dictionaries ``W_dec_h @ W_O[h]`` (rank ``<= d_head``) and ``[W_dec_h @ W_O[h]]_h``,
   each with the singular-value gap around the rank so that a borderline rank is visible.
3. :class:`HeadOutputCosineAccumulator`: per token, ``cos(z_h W_O[h], z_g W_O[g])`` for every pair of heads ``h < g``
   (streamed: exact moments, fixed-bin histogram, the first tokens' values).
4. :func:`output_subspace_carry`: for a feature of head ``h``, ``u = d_j W_O[h]``; the share of ``||u||^2`` in the
   row space of ``W_O[g]``, ``||P_g u||^2 / ||u||^2``, averaged (and maximised) over the features of ``h``.
5. :func:`mixed_feature_interference`: for heads ``h, g``, the distribution over features ``j`` of ``h`` of
   ``max_j' |cos(d_j W_O[h], d_j' W_O[g])|`` (``j' != j`` within one head: the baseline).

Weight analyses (1, 2, 4, 5) read weights only; 3 is an :class:`~sparsedecomp.activations.Accumulator` fed by the
activation stream. :mod:`sparsedecomp.evaluation.figures` draws every result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from ..activations import ActivationBatch, check_merge, check_state, snapshot
from ..dictionary import check_W_O
from ..naming import CONCAT_NAME, head_name
from ..errors import InputError, InputTypeError
from ..loading.heads import HeadSAEs
from ..loading.sae import SAE
from ..validation import check_positive_int, check_tensor

# -- shared result pieces ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Counts of values in ``len(counts)`` equal bins on ``[lo, hi]`` (a bin holds ``edges[k] <= v < edges[k+1]``,
    the last one also ``v == hi``); ``below`` / ``above`` count values outside."""

    lo: float
    hi: float
    counts: tuple[int, ...]
    below: int = 0
    above: int = 0

    @property
    def edges(self) -> tuple[float, ...]:
        return tuple(float(e) for e in uniform_edges(self.lo, self.hi, len(self.counts)))

    @property
    def centers(self) -> tuple[float, ...]:
        width = (self.hi - self.lo) / len(self.counts)
        return tuple(self.lo + (k + 0.5) * width for k in range(len(self.counts)))

    @property
    def total(self) -> int:
        return sum(self.counts) + self.below + self.above


@dataclass(frozen=True)
class Summary:
    """Statistics of a set of values. ``std`` is the population standard deviation. Quartiles are exact, or, when
    ``quartiles_from_bins``, estimated from a fixed-bin histogram by linear interpolation inside the bin (error at
    most one bin width); ``mean``, ``std``, ``min`` and ``max`` are always exact. All NaN when ``count`` is 0."""

    count: int
    mean: float
    std: float
    min: float
    q1: float
    median: float
    q3: float
    max: float
    quartiles_from_bins: bool = False


def uniform_edges(lo: float, hi: float, n_bins: int) -> Tensor:
    """``n_bins + 1`` equally spaced float64 bin edges from ``lo`` to ``hi``."""
    return torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)


def bin_counts(values: Tensor, lo: float, hi: float, n_bins: int) -> tuple[Tensor, int, int]:
    """``(counts (n_bins,) long, below, above)`` of ``values`` in ``n_bins`` equal bins on ``[lo, hi]`` (``hi``
    falls in the last bin). Works on any device; counts are exact integers (``bincount``)."""
    values = values.reshape(-1).double()
    inside = (values >= lo) & (values <= hi)
    index = ((values[inside] - lo) * (n_bins / (hi - lo))).long().clamp_(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    return counts, int((values < lo).sum()), int((values > hi).sum())


def summarize_values(values: Tensor) -> Summary:
    """Exact :class:`Summary` of a 1-d tensor (computed in float64)."""
    values = values.reshape(-1).double()
    if values.numel() == 0:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan, nan)
    q1, median, q3 = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=values.device))
    return Summary(count=values.numel(), mean=float(values.mean()), std=float(values.std(correction=0)),
                   min=float(values.min()), q1=float(q1), median=float(median), q3=float(q3), max=float(values.max()))


def histogram_quantile(counts: Tensor, lo: float, hi: float, q: float, *, vmin: float, vmax: float) -> float:
    """The ``q``-quantile of values binned as ``counts`` on ``[lo, hi]``, by linear interpolation inside the bin
    where the cumulative count reaches ``q * total`` (clamped to the exact ``[vmin, vmax]``). NaN when empty."""
    counts = counts.double().cpu()
    total = float(counts.sum())
    if total == 0:
        return math.nan
    cumulative = torch.cumsum(counts, 0)
    target = q * total
    k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=len(counts) - 1))
    before = float(cumulative[k - 1]) if k > 0 else 0.0
    inside = float(counts[k])
    width = (hi - lo) / len(counts)
    fraction = (target - before) / inside if inside > 0 else 0.0
    return min(max(lo + (k + fraction) * width, vmin), vmax)


def _histogram(counts: Tensor, lo: float, hi: float, below: int = 0, above: int = 0) -> Histogram:
    return Histogram(lo=float(lo), hi=float(hi), counts=tuple(int(c) for c in counts.cpu()), below=below,
                     above=above)


def histogram(values: Tensor, lo: float, hi: float, n_bins: int) -> Histogram:
    """:class:`Histogram` of ``values`` in ``n_bins`` equal bins on ``[lo, hi]``."""
    counts, below, above = bin_counts(values, lo, hi, n_bins)
    return _histogram(counts, lo, hi, below, above)


def _check_rtol(rtol: float | None) -> float | None:
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < 1:
        raise InputError(f"rtol must be a number in (0, 1) or None (the dtype's default), got {rtol!r}")
    return float(rtol)


def _check_head_saes(head_saes: object) -> HeadSAEs:
    if not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
    if head_saes.heads != tuple(range(len(head_saes))):
        raise InputError(f"the analyses need SAEs for heads 0..{max(head_saes.heads)}; have heads {list(head_saes.heads)}")
    return head_saes


def _unit_rows(matrix: Tensor) -> Tensor:
    """Rows scaled to unit norm; zero rows (dead features) stay zero."""
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


# -- 1. decoder norms -------------------------------------------------------------------------------------------

ScaleStatus = Literal["folded", "not_folded", "none_recorded"]


@dataclass(frozen=True)
class DecoderNorms:
    """``||W_dec[i]||`` of one SAE in two unit systems.

    * ``norms_training_units``: the norms in the units of the inputs the SAE was *trained* on. For a legacy SAELens
      SAE with ``normalize_activations`` that is ``s * z`` (``s = sqrt(d_in) / E||z||``), the units of the seed's
      "average norm: 2.05". Folding ``s`` (``SAE.with_input_scale``) divides ``W_dec`` by ``s``, so these are the
      current norms times the recorded ``input_scale``.
    * ``norms_z_units``: the norms in units of unscaled ``z``, as the SAE reads its input now (the current
      ``W_dec``). ``None`` when the SAE still needs an input scale that is unknown.

    ``scale_status``: ``"folded"`` (``input_scale`` recorded and folded in), ``"not_folded"`` (trained on scaled
    inputs, the scale is unknown and not folded: only training units are known, and they are the current norms) or
    ``"none_recorded"`` (the SAE reads unscaled ``z`` and records no input scale, so both unit systems are taken to
    coincide: true for checkpoints trained on raw ``z`` such as Kissane's; a scale folded by another tool before
    loading would not be visible here).
    """

    name: str
    head: int | str | None
    d_sae: int
    d_in: int
    scale_status: ScaleStatus
    input_scale: float | None
    n_zero_rows: int
    norms_training_units: Summary
    histogram_training_units: Histogram
    norms_z_units: Summary | None
    histogram_z_units: Histogram | None


@dataclass(frozen=True)
class DecoderNormsReport:
    """:class:`DecoderNorms` per SAE; within a unit system all histograms share the same bins."""

    saes: tuple[DecoderNorms, ...]
    n_bins: int


def model_saes(head_saes: HeadSAEs | None = None, concat_sae: SAE | None = None) -> dict[str, SAE]:
    """``{"head_0": ..., "head_1": ..., "concat": ...}``: the SAEs to analyse, keyed by the package's SAE names
    (:mod:`sparsedecomp.naming`; figures show them in words)."""
    named: dict[str, SAE] = {}
    if head_saes is not None:
        if not isinstance(head_saes, HeadSAEs):
            raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
        named.update({head_name(h): sae for h, sae in head_saes.items()})
    if concat_sae is not None:
        if not isinstance(concat_sae, SAE):
            raise InputTypeError(f"concat_sae must be a sparsedecomp SAE, got {type(concat_sae).__name__}")
        named[CONCAT_NAME] = concat_sae
    if not named:
        raise InputError("give head_saes and/or concat_sae")
    return named


def scale_status(sae: SAE) -> tuple[ScaleStatus, float | None]:
    """``(status, input_scale)`` of an SAE as :class:`DecoderNorms` defines them."""
    if sae.needs_input_scale:
        return "not_folded", None
    recorded = sae.provenance.get("input_scale")
    if recorded is None:
        return "none_recorded", None
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not math.isfinite(recorded) or recorded <= 0:
        raise InputError(f"{sae.describe()} records input_scale={recorded!r}, which is not a positive number")
    return "folded", float(recorded)


def decoder_norms(saes: Mapping[str, SAE], *, n_bins: int = 50) -> DecoderNormsReport:
    """Decoder row norms of every SAE in ``saes`` (e.g. :func:`model_saes`), see :class:`DecoderNorms`.

    Bins are ``n_bins`` equal bins from 0 to the largest norm over all SAEs in that unit system."""
    n_bins = check_positive_int(n_bins, "n_bins")
    if not isinstance(saes, Mapping) or not saes:
        raise InputError("saes must be a non-empty mapping name -> SAE (see model_saes)")
    rows = []
    for name, sae in saes.items():
        if not isinstance(sae, SAE):
            raise InputTypeError(f"saes[{name!r}] must be a sparsedecomp SAE, got {type(sae).__name__}")
        status, s = scale_status(sae)
        current = sae.W_dec.detach().double().norm(dim=1).cpu()
        training = current * s if status == "folded" else current
        z_units = None if status == "not_folded" else current
        rows.append((name, sae, status, s, training, z_units))

    def shared_hi(values: Sequence[Tensor]) -> float:
        top = max(float(v.max()) for v in values)
        return top if top > 0 else 1.0

    hi_training = shared_hi([r[4] for r in rows])
    known_z = [r[5] for r in rows if r[5] is not None]
    hi_z = shared_hi(known_z) if known_z else 1.0
    results = []
    for name, sae, status, s, training, z_units in rows:
        z_summary = z_hist = None
        if z_units is not None:
            z_summary = summarize_values(z_units)
            z_hist = histogram(z_units, 0.0, hi_z, n_bins)
        results.append(DecoderNorms(
            name=name, head=sae.head, d_sae=sae.d_sae, d_in=sae.d_in, scale_status=status, input_scale=s,
            n_zero_rows=int((training == 0).sum()), norms_training_units=summarize_values(training),
            histogram_training_units=histogram(training, 0.0, hi_training, n_bins),
            norms_z_units=z_summary, histogram_z_units=z_hist,
        ))
    return DecoderNormsReport(saes=tuple(results), n_bins=n_bins)


# -- 2. ranks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixRank:
    """Numerical rank of an ``(n_rows, n_cols)`` matrix whose rows are unit-normalised atoms (row scaling does not
    change the rank, and it makes the tolerance independent of SAE units).

    ``rank`` is ``torch.linalg.matrix_rank(A, rtol=rtol)`` in float64: the number of singular values
    ``sigma_k > rtol * sigma_max`` (counted from one ``svdvals``). ``sigma_last_kept`` / ``sigma_first_dropped`` are ``sigma_rank`` and
    ``sigma_{rank+1}`` relative to ``sigma_max``; ``gap = sigma_rank / sigma_{rank+1}`` (``None`` at full rank). A
    gap of many orders of magnitude means a clear rank; a gap near 1 means the rank depends on ``rtol``.
    """

    name: str
    kind: Literal["head", "block", "concat", "mixed head", "mixed"]
    n_rows: int
    n_cols: int
    rank: int
    max_rank: int
    """The largest rank the matrix can have: ``min(n_rows, n_cols)``, at most ``d_head`` per head after ``W_O``."""
    rtol: float
    sigma_max: float
    sigma_last_kept: float | None
    sigma_first_dropped: float | None
    gap: float | None


@dataclass(frozen=True)
class RankReport:
    entries: tuple[MatrixRank, ...]


def default_rtol(shape: tuple[int, int], dtype: torch.dtype) -> float:
    """``max(n_rows, n_cols) * eps(dtype)``: torch's own default for ``matrix_rank`` at the weights' precision."""
    return max(shape) * torch.finfo(dtype).eps


def matrix_rank(matrix: Tensor, *, name: str, kind: str, rtol: float | None = None,
                source_dtype: torch.dtype | None = None, bound: int | None = None) -> MatrixRank:
    """:class:`MatrixRank` of ``matrix`` (rows normalised first). ``rtol`` defaults to :func:`default_rtol` for
    ``source_dtype`` (the dtype the weights were stored in; default ``matrix.dtype``)."""
    check_tensor(matrix, name, ndim=2)
    sigma = torch.linalg.svdvals(_unit_rows(matrix.detach().double())).cpu()
    return rank_from_singular_values(sigma, tuple(matrix.shape), name=name, kind=kind, rtol=rtol,
                                     source_dtype=source_dtype or matrix.dtype, bound=bound)


def rank_from_singular_values(sigma: Tensor, shape: tuple[int, int], *, name: str, kind: str,
                              rtol: float | None = None, source_dtype: torch.dtype = torch.float32,
                              bound: int | None = None) -> MatrixRank:
    """:class:`MatrixRank` from the singular values ``sigma`` of a ``shape`` matrix (any order); ``bound`` caps
    ``max_rank`` below ``min(shape)`` when the matrix is a product through a narrower one (``W_dec_h @ W_O[h]``:
    at most ``d_head``)."""
    rtol = _check_rtol(rtol)
    if rtol is None:
        rtol = default_rtol(shape, source_dtype)
    sigma = sigma.double().sort(descending=True).values
    top = float(sigma[0]) if sigma.numel() else 0.0
    # torch.linalg.matrix_rank(A, rtol=rtol)'s own rule, on singular values we need anyway (one SVD, not two)
    rank = int((sigma > rtol * top).sum())
    kept = float(sigma[rank - 1]) / top if rank > 0 else None
    dropped = float(sigma[rank]) / top if rank < sigma.numel() and top > 0 else None
    gap = None
    if kept is not None and dropped is not None:
        gap = kept / dropped if dropped > 0 else math.inf
    max_rank = min(shape) if bound is None else min(min(shape), bound)
    return MatrixRank(name=name, kind=kind, n_rows=shape[0], n_cols=shape[1], rank=rank, max_rank=max_rank,
                      rtol=rtol, sigma_max=top, sigma_last_kept=kept, sigma_first_dropped=dropped, gap=gap)


def dictionary_ranks(head_saes: HeadSAEs, concat_sae: SAE | None = None, W_O: Tensor | None = None, *,
                     rtol: float | None = None) -> RankReport:
    """Ranks of each head's dictionary, the block dictionary (all heads lifted into concatenated ``z``; its rank is
    the sum of the heads'), the concat decoder, and with ``W_O`` (``(n_heads, d_head, d_model)``) each head's mixed
    dictionary ``W_dec_h @ W_O[h]`` (at most ``d_head``, the seed's TODO) and the whole mixed dictionary.

    ``rtol=None`` uses :func:`default_rtol` of each matrix's shape at the decoders' dtype."""
    head_saes = _check_head_saes(head_saes)
    n_heads, d_head = len(head_saes), head_saes.d_head
    dtype = head_saes.saes[0].dtype
    decoders = [_unit_rows(sae.W_dec.detach().double()) for sae in head_saes]
    sigmas = [torch.linalg.svdvals(W).cpu() for W in decoders]
    entries = [rank_from_singular_values(sigma, tuple(W.shape), name=f"head {h}", kind="head", rtol=rtol,
                                         source_dtype=dtype) for h, (W, sigma) in enumerate(zip(decoders, sigmas))]
    # A block-diagonal matrix's singular values are its blocks' together (no 16,384 x 512 SVD needed).
    block_shape = (sum(W.shape[0] for W in decoders), n_heads * d_head)
    missing = min(block_shape) - sum(len(sigma) for sigma in sigmas)  # heads with fewer features than d_head
    block_sigma = torch.cat(sigmas + [torch.zeros(max(missing, 0), dtype=torch.float64)])
    entries.append(rank_from_singular_values(block_sigma, block_shape, name="block (all heads)", kind="block",
                                             rtol=rtol, source_dtype=dtype))
    if concat_sae is not None:
        if not isinstance(concat_sae, SAE):
            raise InputTypeError(f"concat_sae must be a sparsedecomp SAE, got {type(concat_sae).__name__}")
        entries.append(matrix_rank(concat_sae.W_dec, name="concat", kind="concat", rtol=rtol))
    if W_O is not None:
        W_O = check_W_O(W_O, n_heads, d_head).detach().double().to(decoders[0].device)
        mixed = [W @ W_O[h] for h, W in enumerate(decoders)]
        entries += [matrix_rank(M, name=f"head {h} @ W_O", kind="mixed head", rtol=rtol, source_dtype=dtype,
                                bound=d_head) for h, M in enumerate(mixed)]
        entries.append(matrix_rank(torch.cat(mixed), name="all heads @ W_O", kind="mixed", rtol=rtol,
                                   source_dtype=dtype, bound=n_heads * d_head))
    return RankReport(entries=tuple(entries))


# -- 3. interference between heads' outputs on tokens -----------------------------------------------------------


def head_pairs(n_heads: int) -> tuple[tuple[int, int], ...]:
    """Every pair ``(h, g)`` with ``h < g``, in row-major order."""
    return tuple((h, g) for h in range(n_heads) for g in range(h + 1, n_heads))


def pairwise_head_output_cosine(z: Tensor, W_O: Tensor) -> tuple[Tensor, Tensor]:
    """Per token, ``cos(u_h, u_g)`` with ``u_h = z_h @ W_O[h]`` for every pair of :func:`head_pairs`.

    ``z``: ``(n_tokens, n_heads, d_head)``; returns ``(cosine, valid)``, both ``(n_tokens, n_pairs)``, computed in
    float64; ``valid`` is False (and ``cosine`` 0) where either head's output is exactly zero."""
    u = torch.einsum("nhd,hdm->nhm", z.double(), W_O.double())
    norms = u.norm(dim=2)
    dots = torch.einsum("nhm,ngm->nhg", u, u)
    first, second = torch.triu_indices(W_O.shape[0], W_O.shape[0], 1, device=z.device)
    norm_product = norms[:, first] * norms[:, second]
    valid = norm_product > 0
    cosine = (dots[:, first, second] / norm_product.clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1.0, 1.0)
    return torch.where(valid, cosine, torch.zeros_like(cosine)), valid


@dataclass(frozen=True)
class PairCosine:
    """The cosine between heads ``heads[0]`` and ``heads[1]``'s outputs over tokens.

    ``summary``: exact count, mean, std, min and max; quartiles estimated from ``histogram``. ``n_excluded``: tokens
    where either output is exactly zero (left out of every statistic). ``sample``: the cosine at the stream's first
    tokens (contexts, then positions), rounded to 1e-6 (it is for plotting), ``None`` at excluded tokens."""

    heads: tuple[int, int]
    summary: Summary
    n_excluded: int
    histogram: Histogram
    sample: tuple[float | None, ...]


@dataclass(frozen=True)
class HeadOutputCosines:
    """:class:`PairCosine` for every pair ``h < g`` of :func:`head_pairs`."""

    n_heads: int
    n_tokens: int
    exclude_bos: bool
    pairs: tuple[PairCosine, ...]

    def pair(self, h: int, g: int) -> PairCosine:
        key = (min(h, g), max(h, g))
        for item in self.pairs:
            if item.heads == key:
                return item
        raise InputError(f"no pair of heads {key}: heads run 0..{self.n_heads - 1} and must differ")

    def mean_matrix(self) -> tuple[tuple[float | None, ...], ...]:
        """``(n_heads, n_heads)`` symmetric mean cosines, ``None`` on the diagonal."""
        grid: list[list[float | None]] = [[None] * self.n_heads for _ in range(self.n_heads)]
        for item in self.pairs:
            h, g = item.heads
            grid[h][g] = grid[g][h] = item.summary.mean
        return tuple(tuple(row) for row in grid)


class HeadOutputCosineAccumulator:
    """Streams :func:`pairwise_head_output_cosine` over an activation stream (``needs = ()``).

    Per pair it keeps, in float64 and exactly, the count, sum, sum of squares, min and max of the cosine, integer
    counts in ``n_bins`` equal bins on ``[-1, 1]`` (quartiles are estimated from them), and the cosine at the first
    ``sample_tokens`` tokens. Memory: ``O(n_pairs * (n_bins + sample_tokens))`` plus one chunk of outputs
    (``chunk_tokens * n_heads * d_model`` doubles). Streaming gives the same result as one batch.

    Mergeable: counts, sums and bins add, minima and maxima combine; each sampled token keeps its global index in
    the stream (``first_context`` times the positions kept per context, plus its row), and a merge keeps the first
    ``sample_tokens`` of both samples by that index, which are the first tokens of the union of the parts.
    """

    needs: tuple[str, ...] = ()

    def __init__(self, W_O: Tensor, *, n_bins: int = 200, sample_tokens: int = 512, exclude_bos: bool = False,
                 chunk_tokens: int = 1024) -> None:
        check_tensor(W_O, "W_O", ndim=3)
        if W_O.shape[0] < 2:
            raise InputError(f"W_O has {W_O.shape[0]} head(s); comparing heads' outputs needs at least 2")
        self.W_O = W_O.detach()
        self.n_bins = check_positive_int(n_bins, "n_bins")
        if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 0:
            raise InputError(f"sample_tokens must be an int >= 0, got {sample_tokens!r}")
        self.sample_tokens = sample_tokens
        if not isinstance(exclude_bos, bool):
            raise InputTypeError(f"exclude_bos must be a bool, got {type(exclude_bos).__name__}")
        self.exclude_bos = exclude_bos
        self.chunk_tokens = check_positive_int(chunk_tokens, "chunk_tokens")
        self.pairs = head_pairs(W_O.shape[0])
        self.reset()

    def reset(self) -> None:
        n_pairs = len(self.pairs)
        self._count = torch.zeros(n_pairs, dtype=torch.long)
        self._sum = torch.zeros(n_pairs, dtype=torch.float64)
        self._sum_sq = torch.zeros(n_pairs, dtype=torch.float64)
        self._min = torch.full((n_pairs,), math.inf, dtype=torch.float64)
        self._max = torch.full((n_pairs,), -math.inf, dtype=torch.float64)
        self._bins = torch.zeros(n_pairs * self.n_bins, dtype=torch.long)
        self._sample: list[Tensor] = []
        self._sample_index: list[Tensor] = []  # the sampled tokens' indices in the stream
        self._n_sampled = 0
        self._n_tokens = 0

    def update(self, batch: ActivationBatch) -> None:
        z = batch.z[:, 1:] if self.exclude_bos else batch.z
        n_heads, d_head = self.W_O.shape[:2]
        if z.shape[2:] != (n_heads, d_head):
            raise InputError(f"the batch's z has (n_heads, d_head) = {tuple(z.shape[2:])} but W_O "
                             f"{tuple(self.W_O.shape)} expects ({n_heads}, {d_head}): W_O must be this layer's")
        W_O = self.W_O.to(z.device)
        first_token = batch.first_context * z.shape[1]
        for chunk in z.reshape(-1, n_heads, d_head).split(self.chunk_tokens):
            self._update_chunk(*pairwise_head_output_cosine(chunk, W_O), first_token)
            first_token += chunk.shape[0]

    def _update_chunk(self, cosine: Tensor, valid: Tensor, first_token: int = 0) -> None:
        n_pairs = len(self.pairs)
        self._n_tokens += cosine.shape[0]
        if self._n_sampled < self.sample_tokens:
            take = min(self.sample_tokens - self._n_sampled, cosine.shape[0])
            part = torch.where(valid[:take], cosine[:take], torch.full_like(cosine[:take], math.nan))
            self._sample.append(part.cpu())
            self._sample_index.append(torch.arange(first_token, first_token + take))
            self._n_sampled += take
        self._count += valid.sum(0).cpu()
        kept = torch.where(valid, cosine, torch.zeros_like(cosine))
        self._sum += kept.sum(0).cpu()
        self._sum_sq += kept.pow(2).sum(0).cpu()
        self._min = torch.minimum(self._min, torch.where(valid, cosine, math.inf).amin(0).cpu())
        self._max = torch.maximum(self._max, torch.where(valid, cosine, -math.inf).amax(0).cpu())
        index = ((cosine + 1.0) * (self.n_bins / 2.0)).long().clamp_(0, self.n_bins - 1)
        index = index + torch.arange(n_pairs, device=index.device) * self.n_bins
        self._bins += torch.bincount(index[valid], minlength=n_pairs * self.n_bins).cpu()

    def compute(self) -> HeadOutputCosines:
        if self._n_tokens == 0:
            raise InputError("no tokens were seen: the head-output cosines are undefined")
        bins = self._bins.reshape(len(self.pairs), self.n_bins)
        sample = torch.cat(self._sample) if self._sample else torch.empty(0, len(self.pairs), dtype=torch.float64)
        pairs = []
        for p, heads in enumerate(self.pairs):
            count = int(self._count[p])
            if count:
                mean = float(self._sum[p]) / count
                variance = max(float(self._sum_sq[p]) / count - mean**2, 0.0)
                lo, hi = float(self._min[p]), float(self._max[p])
                q1, median, q3 = (histogram_quantile(bins[p], -1.0, 1.0, q, vmin=lo, vmax=hi) for q in (0.25, 0.5, 0.75))
                summary = Summary(count, mean, math.sqrt(variance), lo, q1, median, q3, hi, quartiles_from_bins=True)
            else:
                nan = math.nan
                summary = Summary(0, nan, nan, nan, nan, nan, nan, nan, quartiles_from_bins=True)
            values = tuple(None if math.isnan(v) else round(v, 6) for v in sample[:, p].tolist())
            pairs.append(PairCosine(heads=heads, summary=summary, n_excluded=self._n_tokens - count,
                                    histogram=_histogram(bins[p], -1.0, 1.0), sample=values))
        return HeadOutputCosines(n_heads=self.W_O.shape[0], n_tokens=self._n_tokens, exclude_bos=self.exclude_bos,
                                 pairs=tuple(pairs))

    # -- merging and saving --------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, object]:
        # chunk_tokens only bounds memory: parts chunked differently merge
        return {"W_O_shape": list(self.W_O.shape), "n_bins": self.n_bins, "sample_tokens": self.sample_tokens,
                "exclude_bos": self.exclude_bos}

    def _sample_tensors(self) -> tuple[Tensor, Tensor]:
        n_pairs = len(self.pairs)
        if not self._sample:
            return torch.empty(0, n_pairs, dtype=torch.float64), torch.empty(0, dtype=torch.long)
        return torch.cat(self._sample), torch.cat(self._sample_index)

    def merge(self, other: HeadOutputCosineAccumulator) -> None:
        check_merge(self, other)
        self._count += other._count
        self._sum += other._sum
        self._sum_sq += other._sum_sq
        self._min = torch.minimum(self._min, other._min)
        self._max = torch.maximum(self._max, other._max)
        self._bins += other._bins
        self._n_tokens += other._n_tokens
        if other._n_sampled:
            (mine, mine_index), (theirs, their_index) = self._sample_tensors(), other._sample_tensors()
            index = torch.cat([mine_index, their_index])
            order = index.sort(stable=True).indices[: self.sample_tokens]
            self._sample, self._sample_index = [torch.cat([mine, theirs])[order]], [index[order]]
            self._n_sampled = len(order)

    def state_dict(self) -> dict[str, object]:
        sample, sample_index = self._sample_tensors()
        return {**self._settings(), "n_tokens": self._n_tokens, "count": snapshot(self._count),
                "sum": snapshot(self._sum), "sum_sq": snapshot(self._sum_sq), "min": snapshot(self._min),
                "max": snapshot(self._max), "bins": snapshot(self._bins), "sample": snapshot(sample),
                "sample_index": snapshot(sample_index)}

    def load_state_dict(self, state) -> None:
        n_pairs = len(self.pairs)
        pair = (n_pairs, torch.float64)
        check_state(self, state, {"count": (n_pairs, torch.long), "sum": pair, "sum_sq": pair, "min": pair,
                                  "max": pair, "bins": (n_pairs * self.n_bins, torch.long),
                                  "sample": ("n_sampled", n_pairs, torch.float64),
                                  "sample_index": ("n_sampled", torch.long)}, {"n_tokens": int})
        if state["sample"].shape[0] > self.sample_tokens:
            raise InputError(f"the HeadOutputCosineAccumulator state's 'sample' has {state['sample'].shape[0]} "
                             f"tokens, more than sample_tokens={self.sample_tokens}")
        for name in ("count", "sum", "sum_sq", "min", "max", "bins"):
            setattr(self, f"_{name}", state[name].cpu().clone())
        self._n_tokens = state["n_tokens"]
        self._n_sampled = state["sample"].shape[0]
        self._sample = [state["sample"].cpu().clone()] if self._n_sampled else []
        self._sample_index = [state["sample_index"].cpu().clone()] if self._n_sampled else []


# -- 4. how W_O carries a head's feature into other heads' output subspaces -------------------------------------


@dataclass(frozen=True)
class OutputSubspaceCarry:
    """``fraction[h][g]``: for features ``d_j`` of head ``h`` with ``u_j = d_j W_O[h] != 0``, the share
    ``||P_g u_j||^2 / ||u_j||^2`` of ``u_j`` in the row space of ``W_O[g]`` (``P_g`` its orthogonal projector, from
    the SVD of ``W_O[g]`` keeping singular values above ``rtol * sigma_max``), averaged (``mean_fraction``) and
    maximised (``max_fraction``) over ``j``. The diagonal is 1. ``chance_fraction[g] = rank(W_O[g]) / d_model`` is
    the expected share of a random direction, the baseline for the off-diagonal entries. ``n_null_features[h]``:
    features of ``h`` that ``W_O[h]`` maps to exactly 0 (left out)."""

    n_heads: int
    d_model: int
    mean_fraction: tuple[tuple[float, ...], ...]
    max_fraction: tuple[tuple[float, ...], ...]
    W_O_ranks: tuple[int, ...]
    chance_fraction: tuple[float, ...]
    n_features: tuple[int, ...]
    n_null_features: tuple[int, ...]
    rtol: float


def _decoders_and_W_O(head_saes: HeadSAEs, W_O: Tensor) -> tuple[list[Tensor], Tensor]:
    head_saes = _check_head_saes(head_saes)
    W_O = check_W_O(W_O, len(head_saes), head_saes.d_head)
    device = head_saes.saes[0].device
    return [sae.W_dec.detach() for sae in head_saes], W_O.detach().to(device)


def row_space_basis(matrix: Tensor, *, rtol: float) -> Tensor:
    """``(n_cols, r)`` orthonormal basis of the row space of ``matrix`` (right singular vectors with
    ``sigma > rtol * sigma_max``)."""
    _, sigma, Vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = sigma > rtol * sigma[0] if sigma.numel() and sigma[0] > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    return Vh[keep].T


def output_subspace_carry(head_saes: HeadSAEs, W_O: Tensor, *, rtol: float | None = None) -> OutputSubspaceCarry:
    """:class:`OutputSubspaceCarry` of every head's features (computed in float64; ``rtol`` defaults to
    ``max(d_head, d_model) * eps(W_O.dtype)``)."""
    decoders, W_O = _decoders_and_W_O(head_saes, W_O)
    rtol = _check_rtol(rtol)
    if rtol is None:
        rtol = default_rtol(tuple(W_O.shape[1:]), W_O.dtype)
    W = W_O.double()
    n_heads, _, d_model = W.shape
    bases = [row_space_basis(W[g], rtol=rtol) for g in range(n_heads)]
    stacked = torch.cat(bases, dim=1)
    sizes = [b.shape[1] for b in bases]
    mean_rows, max_rows, n_features, n_null = [], [], [], []
    for h, decoder in enumerate(decoders):
        u = decoder.double() @ W[h]
        squared = u.pow(2).sum(1)
        live = squared > 0
        coords = (u[live] @ stacked).pow(2)
        fractions = torch.stack([part.sum(1) for part in coords.split(sizes, dim=1)], dim=1) / squared[live, None]
        n_features.append(int(live.sum()))
        n_null.append(int((~live).sum()))
        if fractions.shape[0]:
            mean_rows.append(tuple(float(v) for v in fractions.mean(0)))
            max_rows.append(tuple(float(v) for v in fractions.amax(0)))
        else:
            mean_rows.append((math.nan,) * n_heads)
            max_rows.append((math.nan,) * n_heads)
    return OutputSubspaceCarry(n_heads=n_heads, d_model=d_model, mean_fraction=tuple(mean_rows),
                               max_fraction=tuple(max_rows), W_O_ranks=tuple(sizes),
                               chance_fraction=tuple(r / d_model for r in sizes), n_features=tuple(n_features),
                               n_null_features=tuple(n_null), rtol=rtol)


# -- 5. cosine interference between W_O-mixed features of different heads ---------------------------------------


@dataclass(frozen=True)
class MixedPairInterference:
    """For features ``j`` of head ``heads[0]``: ``m_j = max_j' |cos(d_j W_O[h], d_j' W_O[g])|`` over features
    ``j'`` of ``g = heads[1]`` (``j' != j`` when ``h == g``: the within-head baseline). ``summary`` is exact over
    the features; ``fraction_above`` is the share of them with ``m_j > threshold``."""

    heads: tuple[int, int]
    within_head: bool
    summary: Summary
    fraction_above: float
    histogram: Histogram


@dataclass(frozen=True)
class MixedFeatureInterference:
    """:class:`MixedPairInterference` for every ordered pair of heads (``n_heads ** 2``, row-major, the diagonal is
    the within-head baseline). Features that ``W_O`` maps to zero are left out (``n_null_features`` per head)."""

    n_heads: int
    threshold: float
    pairs: tuple[MixedPairInterference, ...]
    n_null_features: tuple[int, ...]

    def pair(self, h: int, g: int) -> MixedPairInterference:
        for item in self.pairs:
            if item.heads == (h, g):
                return item
        raise InputError(f"no pair of heads ({h}, {g}): heads run 0..{self.n_heads - 1}")

    def matrix(self, statistic: Literal["mean", "median", "max", "fraction_above"] = "median"
               ) -> tuple[tuple[float, ...], ...]:
        """``(n_heads, n_heads)``: ``statistic`` of ``m_j`` for features of row head ``h`` against column head."""
        if statistic not in ("mean", "median", "max", "fraction_above"):
            raise InputError(f"statistic must be 'mean', 'median', 'max' or 'fraction_above', got {statistic!r}")
        value = (lambda p: p.fraction_above) if statistic == "fraction_above" else (
            lambda p: getattr(p.summary, statistic))
        grid = {p.heads: value(p) for p in self.pairs}
        return tuple(tuple(grid[(h, g)] for g in range(self.n_heads)) for h in range(self.n_heads))


def mixed_feature_interference(head_saes: HeadSAEs, W_O: Tensor, *, threshold: float = 0.5, n_bins: int = 50,
                               chunk_features: int = 1024) -> MixedFeatureInterference:
    """:class:`MixedFeatureInterference`: cosines of unit ``d_j W_O[h]`` against all heads' unit mixed features,
    ``chunk_features`` rows at a time (``chunk_features * total_features`` floats in memory), in the decoders'
    dtype (float32 cosines are accurate to about 1e-6, ample for a maximum)."""
    decoders, W_O = _decoders_and_W_O(head_saes, W_O)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise InputError(f"threshold must be a number in [0, 1), got {threshold!r}")
    n_bins = check_positive_int(n_bins, "n_bins")
    chunk_features = check_positive_int(chunk_features, "chunk_features")
    mixed, n_null = [], []
    for h, decoder in enumerate(decoders):
        u = decoder @ W_O[h].to(decoder.dtype)
        live = u.norm(dim=1) > 0
        n_null.append(int((~live).sum()))
        mixed.append(_unit_rows(u[live]))
    all_units = torch.cat(mixed)
    sizes = [m.shape[0] for m in mixed]
    offsets = [sum(sizes[:h]) for h in range(len(sizes))]
    pairs = []
    for h, units in enumerate(mixed):
        best = torch.zeros(units.shape[0], len(mixed), dtype=units.dtype, device=units.device)
        for start in range(0, units.shape[0], chunk_features):
            cos = (units[start:start + chunk_features] @ all_units.T).abs()
            rows = torch.arange(cos.shape[0], device=cos.device)
            cos[rows, offsets[h] + start + rows] = -1.0  # a feature is not its own neighbour
            best[start:start + cos.shape[0]] = torch.stack(
                [part.amax(1) if part.shape[1] else torch.full_like(part[:, 0], math.nan)
                 for part in cos.split(sizes, dim=1)], dim=1)
        for g in range(len(mixed)):
            values = best[:, g].double().cpu()
            values = values[values >= 0]  # a head with a single feature has no within-head neighbour (-1)
            pairs.append(MixedPairInterference(
                heads=(h, g), within_head=h == g, summary=summarize_values(values),
                fraction_above=float((values > threshold).double().mean()) if values.numel() else math.nan,
                histogram=histogram(values, 0.0, 1.0, n_bins)))
    return MixedFeatureInterference(n_heads=len(mixed), threshold=float(threshold), pairs=tuple(pairs),
                                    n_null_features=tuple(n_null))
