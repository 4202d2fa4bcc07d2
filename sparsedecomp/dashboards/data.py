"""Per-feature dashboard data for every feature of an SAE, from one pass of the activation stream.

:class:`FeatureDataAccumulator` is an :class:`~sparsedecomp.activations.Accumulator`. For each batch it encodes the
SAE's input a chunk of features at a time (:func:`~sparsedecomp.evaluation.top_activations.feature_chunks`), zeroes
the excluded tokens (BOS at position 0 and ``ignore_tokens``, by default) and feeds two
:class:`~sparsedecomp.evaluation.top_activations.TopKTracker`:

* the activations themselves: per feature the top-``k`` ``(context, position, value)``, the exact firing count
  ``n_f = #{t : a_f(t) > 0}`` and the sum ``sum_t a_f(t)``;
* reservoir priorities: every non-zero ``(f, t)`` gets a uniform priority ``u(f, t)`` hashed from ``(seed, f, t)``
  (:mod:`.sampling`) and the tracker keeps the ``sample_size`` largest per feature with the activation as payload.
  The items with the largest independent uniform priorities are a uniform random sample without replacement, and
  since ``u`` depends only on the item the sample is the same for any batching (ties in the 2**24 priority levels go
  to the earlier token, as every tie in the tracker).

All state lives on the SAE's device; the hot path has no loop over features, only over feature chunks.
:meth:`FeatureDataAccumulator.compute` returns :class:`FeatureData` (tensors, not a report), from which
:meth:`FeatureData.quantile_examples` draws examples from true quantiles of the non-zero activations and
:meth:`FeatureData.activation_histograms` bins them.

Density is ``n_f / N`` with ``N`` the tokens counted (excluded tokens are in neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from ..activations import ActivationBatch, check_merge, check_state, prefixed, split_state
from ..errors import InputError, InputTypeError
from ..evaluation.top_activations import (DEFAULT_CHUNK_ELEMENTS, TopActivations, TopKTracker, feature_chunks,
                                          nonzero_entries)
from ..loading.sae import CONCATENATED, SAE
from ..validation import check_bool, check_positive_int
from .histograms import RowHistograms, row_histograms
from .sampling import check_seed, feature_keys, uniform_priorities

DEFAULT_SAMPLE_SIZE = 256
DEFAULT_HISTOGRAM_BINS = 40


@dataclass(frozen=True, eq=False)
class QuantileExamples:
    """Examples from ``n_groups`` intervals of equal probability mass of each feature's non-zero activations.

    Attributes:
        bounds: ``(n_features, n_groups + 1)``: interval ``g`` is ``[bounds[:, g], bounds[:, g + 1])`` (the last one
            closed). Inner bounds are quantiles ``g / n_groups`` of the uniform sample of non-zero activations,
            ``bounds[:, 0]`` its minimum and ``bounds[:, -1]`` the exact maximum; NaN for a feature that never fires.
        values: ``(n_features, n_groups, per_group)`` activations of the examples, largest first within a group;
            NaN in empty slots.
        context, position: ``(n_features, n_groups, per_group)`` long where each example is (-1 in empty slots).
        n_candidates: ``(n_features, n_groups)`` sample members in each interval that are not top-k examples.
    """

    bounds: Tensor
    values: Tensor
    context: Tensor
    position: Tensor
    n_candidates: Tensor

    @property
    def filled(self) -> Tensor:
        return self.context >= 0


@dataclass(frozen=True, eq=False)
class FeatureData:
    """What :class:`FeatureDataAccumulator` gathered (CPU tensors, ``n_features = sae.d_sae``).

    Attributes:
        site: the head the SAE reads, or ``"concatenated"``.
        n_tokens: tokens counted (the denominator of the density): tokens seen less the excluded ones.
        n_tokens_seen: every token of the stream.
        context_size: tokens per context.
        exclude_bos, ignore_tokens: which tokens were left out (position 0; these token ids).
        seed: the seed of the reservoir priorities.
        n_firing: ``(n_features,)`` long, exact count of counted tokens with ``a_f > 0``.
        activation_sum: ``(n_features,)`` float64 ``sum_t a_f(t)`` over counted tokens.
        max_activation: ``(n_features,)`` exact maximum (0 for a feature that never fires).
        top: the top-``k`` activations (``values``, ``context``, ``position``).
        sample_values: ``(n_features, sample_size)`` a uniform sample without replacement of the non-zero
            activations (``min(sample_size, n_firing)`` entries, in priority order, i.e. random order; NaN after).
        sample_context, sample_position: ``(n_features, sample_size)`` long, where each sample member is (-1 after).
        quantile_groups, examples_per_group: defaults of :meth:`quantile_examples`.
    """

    site: int | str
    n_tokens: int
    n_tokens_seen: int
    context_size: int
    exclude_bos: bool
    ignore_tokens: tuple[int, ...]
    seed: int
    n_firing: Tensor
    activation_sum: Tensor
    max_activation: Tensor
    top: TopActivations
    sample_values: Tensor
    sample_context: Tensor
    sample_position: Tensor
    quantile_groups: int
    examples_per_group: int

    @property
    def n_features(self) -> int:
        return self.n_firing.shape[0]

    @property
    def density(self) -> Tensor:
        """``(n_features,)`` float64 ``n_firing / n_tokens``, in ``[0, 1]``."""
        return self.n_firing.double() / max(self.n_tokens, 1)

    @property
    def n_sampled(self) -> Tensor:
        """``(n_features,)`` sample members per feature, ``min(sample_size, n_firing)``."""
        return (self.sample_context >= 0).sum(dim=1)

    def mean_firing_activation(self) -> Tensor:
        """``(n_features,)`` float64 mean of the non-zero activations (NaN for a feature that never fires)."""
        return self.activation_sum / self.n_firing.double()

    def quantile_examples(self, n_groups: int | None = None, per_group: int | None = None) -> QuantileExamples:
        """Examples from ``n_groups`` (default :attr:`quantile_groups`) intervals of equal probability mass of the
        non-zero activations, ``per_group`` (default :attr:`examples_per_group`) each.

        The sample is uniform over the non-zero activations, so its quantiles estimate theirs. A sample member is
        a candidate for its interval unless it is one of the top-``k`` examples; the first ``per_group`` candidates
        in priority order (a uniform draw from the interval) are kept and shown largest first. Every example is a
        non-zero activation, intervals are disjoint and ordered, and no example repeats a top-``k`` one."""
        n_groups = check_positive_int(self.quantile_groups if n_groups is None else n_groups, "n_groups")
        per_group = check_positive_int(self.examples_per_group if per_group is None else per_group, "per_group")
        values = self.sample_values
        q = torch.linspace(0, 1, n_groups + 1, dtype=values.dtype)
        bounds = torch.nanquantile(values, q, dim=1).T.contiguous()  # (n_features, n_groups + 1)
        bounds[:, -1] = torch.where(self.n_firing > 0, self.max_activation.to(bounds.dtype), bounds[:, -1])
        group = (values[:, :, None] >= bounds[:, None, 1:-1]).sum(dim=2)  # (n_features, sample_size)
        candidate = (self.sample_context >= 0) & ~self._in_top()
        one_hot = torch.nn.functional.one_hot(group, n_groups).bool() & candidate[:, :, None]
        rank = one_hot.long().cumsum(dim=1).gather(2, group[:, :, None]).squeeze(2) - 1
        keep = candidate & (rank < per_group)
        slot = torch.where(keep, group * per_group + rank, torch.full_like(rank, n_groups * per_group))

        def place(source: Tensor, fill: float) -> Tensor:
            out = source.new_full((self.n_features, n_groups * per_group + 1), fill)
            out.scatter_(1, slot, torch.where(keep, source, torch.full_like(source, fill)))
            return out[:, :-1].reshape(self.n_features, n_groups, per_group)

        shown_values = place(values, float("nan"))
        context, position = place(self.sample_context, -1), place(self.sample_position, -1)
        order = shown_values.nan_to_num(float("-inf")).sort(dim=2, descending=True, stable=True).indices
        return QuantileExamples(bounds=bounds, values=shown_values.gather(2, order), context=context.gather(2, order),
                                position=position.gather(2, order), n_candidates=one_hot.sum(dim=1))

    def _in_top(self) -> Tensor:
        """``(n_features, sample_size)`` bool: sample members that are also top-``k`` examples (same token),
        compared a bounded number of features at a time."""
        key = self.sample_context * self.context_size + self.sample_position
        top_key = torch.where(self.top.filled, self.top.context * self.context_size + self.top.position,
                              torch.full_like(self.top.context, -2))
        out = torch.zeros_like(key, dtype=torch.bool)
        for chunk in feature_chunks(self.n_features, key.shape[1] * top_key.shape[1]):
            out[chunk] = (key[chunk, :, None] == top_key[chunk, None, :]).any(dim=2)
        return out

    def activation_histograms(self, n_bins: int = DEFAULT_HISTOGRAM_BINS) -> RowHistograms:
        """Histogram per feature of the sampled non-zero activations on ``[0, max_activation]`` in ``n_bins`` bins
        (one bin where the range is degenerate: a feature that never fires or whose maximum is tiny). Counts are
        of sample members; scale a row by ``n_firing / n_sampled`` for counts of tokens."""
        zero = torch.zeros_like(self.max_activation, dtype=torch.float64)
        return row_histograms(self.sample_values, zero, self.max_activation.double(), n_bins)


class FeatureDataAccumulator:
    """:class:`~sparsedecomp.activations.Accumulator` of :class:`FeatureData` for every feature of ``sae``.

    Args:
        sae: the SAE (its features are encoded on its device and dtype).
        site: the head whose ``z`` it reads (``batch.z_head(site)``) or ``"concatenated"``
            (``batch.z_concatenated()``); must agree with ``sae.head`` when that is known.
        top_k: top activations kept per feature.
        quantile_groups, examples_per_group: defaults of :meth:`FeatureData.quantile_examples`.
        sample_size: sample of non-zero activations kept per feature (at least ``quantile_groups *
            examples_per_group``).
        exclude_bos: leave out position 0 of every context (BOS) from every statistic; ``False`` counts position 0
            even when its id is in ``ignore_tokens``.
        ignore_tokens: token ids left out from every statistic (e.g. special tokens).
        seed: the reservoir priorities' seed.
        chunk_elements: activations (tokens x features) encoded at a time.

    Mergeable: the token counts add and both trackers merge (:meth:`TopKTracker.merge`). The priorities depend only
    on ``(seed, f, t)`` with ``t`` the global token index, so the merged sample is the one a single pass draws.
    """

    needs: tuple[str, ...] = ()

    def __init__(self, sae: SAE, site: int | str, *, top_k: int = 20, quantile_groups: int = 5,
                 examples_per_group: int = 5, sample_size: int = DEFAULT_SAMPLE_SIZE, exclude_bos: bool = True,
                 ignore_tokens: Iterable[int] = (), seed: int = 0,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        if not isinstance(sae, SAE):
            raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
        self.sae = sae
        self.site = _check_site(site, sae)
        self.top_k = check_positive_int(top_k, "top_k")
        self.quantile_groups = check_positive_int(quantile_groups, "quantile_groups")
        self.examples_per_group = check_positive_int(examples_per_group, "examples_per_group")
        self.sample_size = check_positive_int(sample_size, "sample_size")
        if self.sample_size < self.quantile_groups * self.examples_per_group:
            raise InputError(f"sample_size={sample_size} cannot fill {quantile_groups} quantile groups of "
                             f"{examples_per_group} examples: give at least {quantile_groups * examples_per_group}")
        self.exclude_bos = check_bool(exclude_bos, "exclude_bos")
        self.ignore_tokens = _check_token_ids(ignore_tokens)
        self.seed = check_seed(seed)
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
        self.top = TopKTracker(sae.d_sae, self.top_k)
        self.sample = TopKTracker(sae.d_sae, self.sample_size, payload_dim=1)
        self._keys = feature_keys(self.seed, torch.arange(sae.d_sae, device=sae.device))
        self._ignore = torch.tensor(self.ignore_tokens, dtype=torch.long, device=sae.device)
        self.reset()

    def reset(self) -> None:
        self.top.reset()
        self.sample.reset()
        self._n_counted = 0
        self._n_seen = 0
        self._context_size: int | None = None

    def sae_input(self, batch: ActivationBatch) -> Tensor:
        """The SAE's input rows ``(n_contexts * context_size, d_in)`` for ``batch``, on the SAE's device and dtype."""
        x = batch.z_head(self.site) if isinstance(self.site, int) else batch.z_concatenated()
        if x.shape[1] != self.sae.d_in:
            raise InputError(f"the SAE reads d_in={self.sae.d_in} but site {self.site!r} of the batch gives "
                             f"{x.shape[1]} columns (n_heads={batch.n_heads}, d_head={batch.d_head})")
        return x.to(device=self.sae.device, dtype=self.sae.dtype)

    def counted(self, tokens: Tensor) -> Tensor:
        """``(n_contexts * context_size,)`` bool: the tokens the statistics count (not excluded)."""
        return counted_tokens(tokens, exclude_bos=self.exclude_bos, ignore=self._ignore).reshape(-1)

    @torch.no_grad()
    def update(self, batch: ActivationBatch) -> None:
        if self._context_size is not None and batch.context_size != self._context_size:
            raise InputError(f"contexts of {batch.context_size} tokens after contexts of {self._context_size}: "
                             "feed one token set")
        self._context_size = batch.context_size
        x = self.sae_input(batch)
        centred = self.sae.centred(x)
        context = self.sae.encoding_context(centred)
        keep = self.counted(batch.tokens.to(self.sae.device))
        self._n_counted += int(keep.sum())
        self._n_seen += keep.numel()
        first_token = batch.first_context * batch.context_size
        for chunk in feature_chunks(self.sae.d_sae, x.shape[0], self.chunk_elements):
            acts = self.sae.encode_columns(centred, chunk, context)
            acts = acts.masked_fill_(~keep[:, None], 0.0)
            # Codes fire on a few entries in a thousand: both trackers take the non-zero entries, not the matrix.
            row, column, values = nonzero_entries(acts)
            where = dict(n_tokens=acts.shape[0], first_context=batch.first_context,
                         context_size=batch.context_size, features=chunk)
            self.top.update_entries(row, column, values, **where)
            priorities = uniform_priorities(self.seed, column + chunk.start, row + first_token, dtype=acts.dtype,
                                            keys=self._keys[chunk][column])
            self.sample.update_entries(row, column, priorities, **where, payload=lambda features, tokens: acts[
                tokens, (features - chunk.start)[:, None]][:, :, None])

    def compute(self) -> FeatureData:
        top = self.top.compute()
        sample = self.sample.compute()
        filled = sample.filled
        return FeatureData(
            site=self.site, n_tokens=self._n_counted, n_tokens_seen=self._n_seen, context_size=self._context_size,
            exclude_bos=self.exclude_bos, ignore_tokens=self.ignore_tokens, seed=self.seed, n_firing=top.n_firing,
            activation_sum=top.activation_sum, max_activation=top.values[:, 0].nan_to_num(0.0), top=top,
            sample_values=torch.where(filled, sample.payload[:, :, 0], torch.full_like(sample.values, float("nan"))),
            sample_context=sample.context, sample_position=sample.position, quantile_groups=self.quantile_groups,
            examples_per_group=self.examples_per_group,
        )


    # -- merging and saving --------------------------------------------------------------------------------------
    _PARTS = ("top", "sample")

    def _settings(self) -> dict[str, object]:
        # chunk_elements only bounds memory: parts encoded in other chunks merge
        return {"sae": self.sae.describe(), "site": self.site, "top_k": self.top_k,
                "quantile_groups": self.quantile_groups, "examples_per_group": self.examples_per_group,
                "sample_size": self.sample_size, "exclude_bos": self.exclude_bos,
                "ignore_tokens": list(self.ignore_tokens), "seed": self.seed}

    def merge(self, other: FeatureDataAccumulator) -> None:
        check_merge(self, other)
        if None not in (self._context_size, other._context_size) and self._context_size != other._context_size:
            raise InputError(f"cannot merge contexts of {other._context_size} tokens into contexts of "
                             f"{self._context_size}: feed one token set")
        self.top.merge(other.top)
        self.sample.merge(other.sample)
        self._n_counted += other._n_counted
        self._n_seen += other._n_seen
        self._context_size = self._context_size or other._context_size

    def state_dict(self) -> dict[str, object]:
        """Settings, ``n_counted``, ``n_seen``, ``context_size`` (0 before the first batch) and the trackers'
        states under ``top.`` and ``sample.``."""
        return {**self._settings(), "n_counted": self._n_counted, "n_seen": self._n_seen,
                "context_size": self._context_size or 0, **prefixed("top", self.top.state_dict()),
                **prefixed("sample", self.sample.state_dict())}

    def load_state_dict(self, state) -> None:
        own, parts = split_state(state, self._PARTS, self.sae.device)
        check_state(self, own, {}, {"n_counted": int, "n_seen": int, "context_size": int})
        for name in self._PARTS:
            getattr(self, name)._check_state(parts[name], f"{name}.")
        for name in self._PARTS:
            getattr(self, name).load_state_dict(parts[name])
        self._n_counted, self._n_seen = own["n_counted"], own["n_seen"]
        self._context_size = own["context_size"] or None


def counted_tokens(tokens: Tensor, *, exclude_bos: bool, ignore: Tensor) -> Tensor:
    """``tokens``' shape ``(n_contexts, context_size)``, bool: the tokens the statistics count (see
    :func:`left_out`)."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    return ~left_out(tokens, positions, exclude_bos=exclude_bos, ignore=ignore)


def left_out(token_ids: Tensor, positions: Tensor, *, exclude_bos: bool, ignore: Tensor) -> Tensor:
    """Bool, the shape of ``token_ids``: the tokens left out of every statistic, given their ids and positions in
    their contexts. A token whose id is in ``ignore`` is left out; position 0 is left out when ``exclude_bos`` and
    counted otherwise, whatever its id (BOS is usually also a special token, and keeping BOS means keeping
    position 0)."""
    ignored = torch.isin(token_ids, ignore.to(token_ids.device)) if ignore.numel() else \
        torch.zeros_like(token_ids, dtype=torch.bool)
    return torch.where(positions == 0, torch.tensor(exclude_bos, device=token_ids.device), ignored)


def _check_site(site: object, sae: SAE) -> int | str:
    if site != CONCATENATED and (isinstance(site, bool) or not isinstance(site, int) or site < 0):
        raise InputError(f"site must be a head index (int >= 0) or {CONCATENATED!r}, got {site!r}")
    if sae.head is not None and sae.head != site:
        raise InputError(f"site {site!r} does not match the SAE, which reads head={sae.head!r} ({sae.describe()})")
    return site


def _check_token_ids(ids: Iterable[int]) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InputTypeError(f"ignore_tokens must be an iterable of token ids, got {type(ids).__name__}")
    ids = tuple(ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise InputError(f"ignore_tokens must hold non-negative int token ids, got {bad[:5]}")
    return tuple(sorted(set(ids)))
