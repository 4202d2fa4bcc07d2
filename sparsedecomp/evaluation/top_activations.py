"""Each feature's top-``k`` activations over a token stream, with where they happened: :class:`TopKTracker`.

For every feature ``f`` the tracker keeps the ``k`` largest activations ``a_f(t)`` seen so far among the tokens
with ``a_f(t) > min_value`` (a feature that fires on fewer than ``k`` tokens keeps fewer entries, the rest of its
slots stay empty: value NaN, context and position -1), each with its context index (``first_context + i`` of the
batch it came from) and position, plus an optional payload vector gathered at the kept token (e.g. the direct
feature attribution by head). It also counts, per feature, the tokens with ``a_f(t) > min_value`` and sums
``a_f(t)`` over every token (float64).

Batches are merged with :func:`torch.topk`-style selection; ties are broken towards the earlier token (smaller
context, then smaller position), so the result does not depend on how the tokens were split into batches provided
they arrive in stream order. Memory is ``O(n_features * k)`` plus one batch's activations, which callers feed a
column chunk (a slice of features) at a time.

Trackers that saw different parts of a stream merge (:meth:`TopKTracker.merge`): the counts and sums add, and each
feature keeps the ``k`` best of both lists ordered by value (descending), then context, then position. Contexts are
global (``first_context``), so that order is the one a single pass gives, whichever part is merged into which.

:class:`SAETopActivations` is the ready-made :class:`~sparsedecomp.activations.Accumulator` for an SAE's own
features (encoded a chunk of features at a time), the one feature dashboards and the DFA by head build on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..activations import ActivationBatch, check_merge, check_state, prefixed, snapshot, split_state
from ..errors import InputError, InputTypeError
from ..validation import check_positive_int

Payload = Callable[[Tensor, Tensor], Tensor]
"""``payload(features (m,), tokens (m, j)) -> (m, j, payload_dim)``: a vector for each candidate entry, where
``features`` are global feature indices and ``tokens`` row indices into the batch's activations."""

DEFAULT_CHUNK_ELEMENTS = 2**24
"""Activations (tokens x features) one chunk may hold: 64 MiB in float32."""


@dataclass(frozen=True, eq=False)
class TopActivations:
    """Each feature's top-``k`` activations (largest first) and where they happened.

    Attributes:
        values: ``(n_features, k)``; empty slots (fewer than ``k`` tokens above ``min_value``) are NaN.
        context: ``(n_features, k)`` long context index in the stream (-1 for an empty slot).
        position: ``(n_features, k)`` long position in the context (-1 for an empty slot).
        payload: ``(n_features, k, payload_dim)`` vectors gathered at the kept tokens (NaN for empty slots), or
            ``None``.
        n_firing: ``(n_features,)`` long: tokens with an activation above ``min_value``.
        activation_sum: ``(n_features,)`` float64: the sum of the activation over every token.
        n_tokens: tokens seen.
        min_value: only activations above this were kept and counted.
    """

    values: Tensor
    context: Tensor
    position: Tensor
    payload: Tensor | None
    n_firing: Tensor
    activation_sum: Tensor
    n_tokens: int
    min_value: float

    @property
    def n_features(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def filled(self) -> Tensor:
        """``(n_features, k)`` bool: the slots holding an entry."""
        return self.context >= 0

    @property
    def n_kept(self) -> Tensor:
        """``(n_features,)``: entries kept per feature (``min(k, n_firing)``)."""
        return self.filled.sum(dim=1)

    def mean_activation(self) -> Tensor:
        """``(n_features,)`` float64 mean activation over every token."""
        return self.activation_sum / max(self.n_tokens, 1)


class TopKTracker:
    """Streaming top-``k`` of many features (see the module docstring).

    Args:
        n_features: features tracked.
        k: entries kept per feature.
        payload_dim: width of the payload vectors, or ``None`` for none.
        min_value: only activations strictly above this are kept and counted (0 for ReLU features: a feature's
            top tokens are tokens where it fires).
    """

    def __init__(self, n_features: int, k: int, *, payload_dim: int | None = None, min_value: float = 0.0) -> None:
        self.n_features = check_positive_int(n_features, "n_features")
        self.k = check_positive_int(k, "k")
        self.payload_dim = None if payload_dim is None else check_positive_int(payload_dim, "payload_dim")
        self.min_value = float(min_value)
        self.reset()

    def reset(self) -> None:
        """Back to the state before the first batch (nothing allocated; device and dtype come with the next one)."""
        self._values: Tensor | None = None  # (n_features, k), -inf for empty slots
        self._context: Tensor | None = None
        self._position: Tensor | None = None
        self._payload: Tensor | None = None
        self._n_firing: Tensor | None = None
        self._sum: Tensor | None = None
        self._tokens_seen: Tensor | None = None  # (n_features,) tokens fed to each feature

    def _allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        n, k = self.n_features, self.k
        self._values = torch.full((n, k), float("-inf"), dtype=dtype, device=device)
        self._context = torch.full((n, k), -1, dtype=torch.long, device=device)
        self._position = torch.full((n, k), -1, dtype=torch.long, device=device)
        if self.payload_dim is not None:
            self._payload = torch.full((n, k, self.payload_dim), float("nan"), dtype=dtype, device=device)
        self._n_firing = torch.zeros(n, dtype=torch.long, device=device)
        self._sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._tokens_seen = torch.zeros(n, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, activations: Tensor, *, first_context: int, context_size: int, features: slice | None = None,
               payload: Payload | None = None) -> None:
        """Merge one batch: ``activations`` is ``(n_tokens, m)``, row ``r`` the token at context
        ``first_context + r // context_size``, position ``r % context_size``, for the features ``features``
        (a slice of ``range(n_features)`` of length ``m``; all features when ``None``). ``payload`` is called only
        for the batch's candidate entries (at most ``k`` per feature)."""
        if not isinstance(activations, Tensor) or not activations.is_floating_point() or activations.ndim != 2:
            raise InputTypeError("activations must be a floating (n_tokens, n_features) tensor, got "
                                 f"{getattr(activations, 'dtype', type(activations).__name__)} "
                                 f"{tuple(getattr(activations, 'shape', ()))}")
        start, stop = _feature_range(features, self.n_features)
        n_tokens, m = activations.shape
        if m != stop - start:
            raise InputError(f"activations have {m} feature columns but features {start}:{stop} name {stop - start}")
        context_size = check_positive_int(context_size, "context_size")
        if n_tokens % context_size != 0:
            raise InputError(f"{n_tokens} activation rows are not whole contexts of {context_size} tokens")
        if (payload is None) != (self.payload_dim is None):
            raise InputError("give a payload function exactly when the tracker was built with payload_dim")
        if torch.isnan(activations).any():
            raise InputError("activations contain NaN")
        if self._values is None:
            self._allocate(activations.device, activations.dtype)
        rows = slice(start, stop)
        self._tokens_seen[rows] += n_tokens

        self._n_firing[rows] += (activations > self.min_value).sum(dim=0)
        self._sum[rows] += activations.sum(dim=0, dtype=torch.float64)
        if n_tokens == 0:
            return
        token, value = _top_rows_earliest_first(activations, min(self.k, n_tokens), self.min_value)  # (m, j) each
        # Entries not above min_value only fill slots of a feature firing on fewer than j tokens: mark them empty.
        value = value.masked_fill(value <= self.min_value, float("-inf"))
        self._merge_candidates(rows, token, value, first_context, context_size, payload)

    @torch.no_grad()
    def update_entries(self, token: Tensor, column: Tensor, values: Tensor, *, n_tokens: int, first_context: int,
                       context_size: int, features: slice | None = None, payload: Payload | None = None) -> None:
        """:meth:`update` for a sparse batch given by its entries above ``min_value``: ``values[i]`` is the
        activation at row ``token[i]``, column ``column[i]`` of an ``(n_tokens, m)`` batch whose other entries are
        0 (so ``min_value`` must be at least 0). The result is exactly :meth:`update`'s on the dense batch, at a cost
        in the number of entries instead of ``n_tokens * m``: SAE codes fire on a few in a thousand entries.

        Per column the ``k`` largest entries (ties to the earlier row) come from one sort of the entries by the
        int64 key ``column * 2**31 + (2**31 - 1 - bits(value))``: for positive float32 values the IEEE bit pattern
        ``bits`` is increasing in the value, so the key orders by column, then value descending; the sort is
        stable, so entries given in row order keep the earlier row first among ties (other dtypes take two stable
        sorts to the same order). Entries not in row order are put in row order first."""
        if self.min_value < 0:
            raise InputError(f"update_entries needs min_value >= 0 (the entries not given are 0), got {self.min_value}")
        if not (isinstance(token, Tensor) and isinstance(column, Tensor) and isinstance(values, Tensor)) or \
                token.ndim != 1 or token.shape != column.shape or token.shape != values.shape or \
                not values.is_floating_point():
            raise InputTypeError("token, column and values must be 1-D tensors of one length (values floating), got "
                                 f"{[tuple(getattr(t, 'shape', ())) for t in (token, column, values)]}")
        start, stop = _feature_range(features, self.n_features)
        m = stop - start
        context_size = check_positive_int(context_size, "context_size")
        if n_tokens % context_size != 0:
            raise InputError(f"{n_tokens} activation rows are not whole contexts of {context_size} tokens")
        if (payload is None) != (self.payload_dim is None):
            raise InputError("give a payload function exactly when the tracker was built with payload_dim")
        if values.numel() and not bool((values > self.min_value).all()):
            raise InputError(f"every entry given must be above min_value={self.min_value} (NaN is not)")
        if self._values is None:
            self._allocate(values.device, values.dtype)
        rows = slice(start, stop)
        counts = torch.bincount(column, minlength=m)
        self._tokens_seen[rows] += n_tokens
        self._n_firing[rows] += counts
        self._sum[rows] += torch.zeros(m, dtype=torch.float64, device=values.device).index_add_(0, column,
                                                                                               values.double())
        if n_tokens == 0 or column.numel() == 0:
            return
        # Only the features with entries are merged, with as many candidate slots as the busiest one needs: a
        # sparse batch touches a fraction of the features, a few times each.
        j = min(self.k, n_tokens, int(counts.max()))
        present = counts.nonzero().squeeze(1)
        row_of = torch.full((m,), -1, dtype=torch.long, device=values.device)
        row_of[present] = torch.arange(len(present), device=values.device)
        if token.numel() > 1 and not bool((token[1:] >= token[:-1]).all()):  # ties go to the earlier row
            by_row = torch.sort(token, stable=True).indices
            token, column, values = token[by_row], column[by_row], values[by_row]
        if values.dtype == torch.float32:
            key = (column.long() << 31) | (0x7FFFFFFF - values.view(torch.int32).long())
            order = torch.sort(key, stable=True).indices
        else:
            by_value = torch.sort(values, descending=True, stable=True).indices
            order = by_value[torch.sort(column[by_value], stable=True).indices]
        sorted_column = column[order]
        rank = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_column, sorted_column)
        kept = order[rank < j]
        slot = row_of[column[kept]] * j + rank[rank < j]
        n = len(present)
        top_token = torch.zeros(n * j, dtype=torch.long, device=values.device).index_copy_(0, slot, token[kept].long())
        top_value = torch.full((n * j,), float("-inf"), dtype=values.dtype, device=values.device)
        top_value.index_copy_(0, slot, values[kept])
        self._merge_candidates(start + present, top_token.view(n, j), top_value.view(n, j), first_context,
                               context_size, payload)

    def _merge_candidates(self, rows: slice | Tensor, token: Tensor, value: Tensor, first_context: int,
                          context_size: int, payload: Payload | None) -> None:
        """Merge one batch's candidates, ``(m, j)`` rows into the batch and values (largest first, ``-inf`` in
        empty slots), with their payload, into the features ``rows`` (a slice, or a tensor of feature indices)."""
        context = first_context + torch.div(token, context_size, rounding_mode="floor")
        position = token % context_size
        extra = None
        if payload is not None:
            feature_index = rows if isinstance(rows, Tensor) else torch.arange(rows.start, rows.stop,
                                                                               device=token.device)
            extra = payload(feature_index, token)
            if extra.shape != (*token.shape, self.payload_dim):
                raise InputError(f"payload returned shape {tuple(extra.shape)}, expected {(*token.shape, self.payload_dim)}")
        self._merge(rows, value, context, position, extra)

    def _merge(self, rows: slice | Tensor, value: Tensor, context: Tensor, position: Tensor, extra: Tensor | None) -> None:
        """Keep the ``k`` best of the kept entries followed by the new ones. Both lists are ordered by value
        (descending) then token, and every kept token precedes every new one, so a stable descending sort of the
        concatenation breaks ties towards the earlier token."""
        values = torch.cat([self._values[rows], value.to(self._values.dtype)], dim=1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        new_values = values.gather(1, order)
        empty = new_values == float("-inf")
        minus_one = torch.full_like(order, -1)
        self._values[rows] = new_values
        self._context[rows] = torch.where(empty, minus_one, torch.cat([self._context[rows], context], 1).gather(1, order))
        self._position[rows] = torch.where(empty, minus_one,
                                           torch.cat([self._position[rows], position], 1).gather(1, order))
        if extra is not None:
            merged = torch.cat([self._payload[rows], extra.to(self._payload.dtype)], dim=1)
            gathered = merged.gather(1, order[:, :, None].expand(-1, -1, self.payload_dim))
            self._payload[rows] = gathered.masked_fill(empty[:, :, None], float("nan"))

    # -- merging and saving ---------------------------------------------------------------------------------------
    _STATE = ("values", "context", "position", "payload", "n_firing", "sum", "tokens_seen")

    def _settings(self) -> dict[str, int | float]:
        return {"n_features": self.n_features, "k": self.k, "payload_dim": self.payload_dim or 0,
                "min_value": self.min_value}

    @torch.no_grad()
    def merge(self, other: TopKTracker) -> None:
        """Fold in a tracker of the same settings that saw other tokens: counts, sums and tokens seen add; each
        feature keeps the ``k`` best entries of both, ordered by value (descending), then context, then position,
        which is the order of one pass over both parts (its ties go to the earlier token), whichever part is
        ``self``. Entries of ``other`` move to ``self``'s device and dtype, as a batch fed to ``self`` would."""
        check_merge(self, other)
        if other._values is None:
            return
        if self._values is None:
            for name in self._STATE:
                value = getattr(other, f"_{name}")
                setattr(self, f"_{name}", None if value is None else value.clone())
            return
        device = self._values.device
        self._tokens_seen += other._tokens_seen.to(device)
        self._n_firing += other._n_firing.to(device)
        self._sum += other._sum.to(device)
        values = torch.cat([self._values, other._values.to(device=device, dtype=self._values.dtype)], dim=1)
        context = torch.cat([self._context, other._context.to(device)], dim=1)
        position = torch.cat([self._position, other._position.to(device)], dim=1)
        # Sort by the last key first, each sort stable: value (descending), then context, then position.
        order = position.sort(dim=1, stable=True).indices
        order = order.gather(1, context.gather(1, order).sort(dim=1, stable=True).indices)
        order = order.gather(1, values.gather(1, order).sort(dim=1, descending=True, stable=True).indices)
        order = order[:, : self.k]
        self._values = values.gather(1, order)
        empty = self._values == float("-inf")
        minus_one = torch.full_like(order, -1)
        self._context = torch.where(empty, minus_one, context.gather(1, order))
        self._position = torch.where(empty, minus_one, position.gather(1, order))
        if self._payload is not None:
            payload = torch.cat([self._payload, other._payload.to(device=device, dtype=self._payload.dtype)], dim=1)
            gathered = payload.gather(1, order[:, :, None].expand(-1, -1, self.payload_dim))
            self._payload = gathered.masked_fill(empty[:, :, None], float("nan"))

    def state_dict(self) -> dict[str, Tensor | int | float]:
        """The settings and, once a batch was seen, the tensors (``values`` holds ``-inf`` in empty slots; the
        ``payload`` only with ``payload_dim``; ``payload_dim`` 0 stands for none)."""
        state: dict[str, Tensor | int | float] = dict(self._settings())
        if self._values is not None:
            for name in self._STATE:
                value = getattr(self, f"_{name}")
                if value is not None:
                    state[name] = snapshot(value)
        return state

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict` (on the device its tensors are on)."""
        self._check_state(state)
        for name in self._STATE:
            setattr(self, f"_{name}", state[name].clone() if name in state else None)

    def _check_state(self, state, prefix: str = "") -> None:
        """Refuse a state that :meth:`load_state_dict` cannot restore (keys named under ``prefix``)."""
        n, k = self.n_features, self.k
        tensors = {"values": (n, k), "context": (n, k, torch.long), "position": (n, k, torch.long),
                   "n_firing": (n, torch.long), "sum": (n, torch.float64), "tokens_seen": (n, torch.long)}
        if self.payload_dim is not None:
            tensors["payload"] = (n, k, self.payload_dim)
        check_state(self, state, tensors, optional=tensors, prefix=prefix)
        present = [prefix + name for name in tensors if name in state]
        if present and len(present) != len(tensors):
            raise InputError(f"the TopKTracker state has {present} but not "
                             f"{sorted(prefix + name for name in tensors if name not in state)}: give every tensor "
                             "(a tracker that saw tokens) or none (one that saw nothing)")
        if present and not (state["values"].is_floating_point()
                            and (self.payload_dim is None or state["payload"].dtype == state["values"].dtype)):
            raise InputError(f"the TopKTracker state's {prefix}values (and {prefix}payload) must be floating, of one "
                             "dtype")

    def compute(self) -> TopActivations:
        """The result, on the CPU."""
        if self._values is None:
            raise InputError("no activations were seen: nothing to rank")
        counts = self._tokens_seen.unique()
        if counts.numel() != 1:
            raise InputError(f"features saw different numbers of tokens {counts.tolist()[:5]}: feed every feature "
                             "the same tokens")
        n_tokens = int(counts[0])
        values = self._values.masked_fill(self._context < 0, float("nan"))
        return TopActivations(
            values=values.cpu(), context=self._context.cpu(), position=self._position.cpu(),
            payload=None if self._payload is None else self._payload.cpu(), n_firing=self._n_firing.cpu(),
            activation_sum=self._sum.cpu(), n_tokens=n_tokens, min_value=self.min_value,
        )


def _feature_range(features: slice | None, n_features: int) -> tuple[int, int]:
    if features is None:
        return 0, n_features
    if not isinstance(features, slice) or features.step not in (None, 1):
        raise InputTypeError(f"features must be a contiguous slice of feature indices, got {features!r}")
    start, stop, _ = features.indices(n_features)
    if stop <= start:
        raise InputError(f"features {features!r} selects no feature of {n_features}")
    return start, stop


def _top_rows_earliest_first(activations: Tensor, j: int, floor: float) -> tuple[Tensor, Tensor]:
    """``(tokens, values)``, each ``(m, j)``: per column of ``activations`` (``(n_tokens, m)``) the ``j`` largest
    entries, ordered by value (descending) then row; among rows tied at the ``j``-th value the earliest win.

    One ``torch.topk`` of ``j + 1`` rows finds them; only a column whose ``(j+1)``-th value equals its ``j``-th has a
    tie across the cut that ``topk`` may have broken either way, and only those columns are redone exactly: every
    entry above the ``j``-th value is taken and ties at it are filled in row order (a cumulative count). Ties at or
    below ``floor`` are left as they are: such entries are not kept."""
    n_tokens = activations.shape[0]
    top = activations.topk(min(j + 1, n_tokens), dim=0)
    values, token = top.values[:j].T, top.indices[:j].T  # (m, j)
    if n_tokens > j:
        crossing = ((top.values[j] == top.values[j - 1]) & (top.values[j] > floor)).nonzero().squeeze(1)
        if crossing.numel():
            cols = activations[:, crossing]
            kth = values[crossing, -1]
            above = cols > kth
            at_kth = cols == kth
            chosen = above | (at_kth & (at_kth.cumsum(dim=0) <= j - above.sum(dim=0)))
            # nonzero of the transpose runs over columns, then rows in order: j rows per column.
            token[crossing] = chosen.T.nonzero()[:, 1].reshape(crossing.numel(), j)
            values[crossing] = cols.T.gather(1, token[crossing])
    # Ties inside the kept rows: order by row, then (stably) by value.
    by_row = token.sort(dim=1).indices
    token, values = token.gather(1, by_row), values.gather(1, by_row)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return token.gather(1, order), values.gather(1, order)


def nonzero_entries(activations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(token, column, value)`` of the non-zero entries of a ``(n_tokens, m)`` code in row order, for
    :meth:`TopKTracker.update_entries`; NaN (non-zero, so among them) is refused."""
    token, column = activations.nonzero(as_tuple=True)
    values = activations[token, column]
    if torch.isnan(values).any():
        raise InputError("the SAE's activations contain NaN (NaN in its input or weights)")
    return token, column, values


def feature_chunks(n_features: int, n_tokens: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[slice]:
    """Contiguous feature slices so that ``n_tokens x`` chunk width stays within ``chunk_elements``."""
    width = max(1, chunk_elements // max(1, n_tokens))
    return [slice(s, min(s + width, n_features)) for s in range(0, n_features, width)]


class SAETopActivations:
    """:class:`~sparsedecomp.activations.Accumulator`: the top-``k`` activating tokens of every feature of an SAE
    on ``hook_z`` (a concatenated-``z`` SAE reads :meth:`ActivationBatch.z_concatenated`, a per-head SAE its head's
    ``z``), encoded ``chunk_elements`` activations at a time.

    ``payload(x, features, tokens) -> (m, j, payload_dim)`` may add a vector per kept entry, computed from the
    batch's SAE input ``x`` (``(n_tokens, d_in)``); :func:`sparsedecomp.evaluation.attribution` uses it for the
    direct feature attribution by head."""

    needs: tuple[str, ...] = ()

    def __init__(self, sae, k: int = 20, *, payload: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
                 payload_dim: int | None = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        from ..loading.sae import SAE

        if not isinstance(sae, SAE):
            raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
        self.sae = sae
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
        self.payload = payload
        self.tracker = TopKTracker(sae.d_sae, k, payload_dim=payload_dim)

    def reset(self) -> None:
        self.tracker.reset()

    def sae_input(self, batch: ActivationBatch) -> Tensor:
        """The SAE's input rows for ``batch``, in the SAE's dtype and device."""
        head = self.sae.head
        x = batch.z_head(head) if isinstance(head, int) else batch.z_concatenated()
        if x.shape[1] != self.sae.d_in:
            raise InputError(f"the SAE reads d_in={self.sae.d_in} but the batch gives {x.shape[1]} columns "
                             f"(head={head!r}, n_heads={batch.n_heads}, d_head={batch.d_head})")
        return x.to(device=self.sae.device, dtype=self.sae.dtype)

    @torch.no_grad()
    def update(self, batch: ActivationBatch) -> None:
        x = self.sae_input(batch)
        centred = self.sae.centred(x)
        context = self.sae.encoding_context(centred)
        for chunk in feature_chunks(self.sae.d_sae, x.shape[0], self.chunk_elements):
            acts = self.sae.encode_columns(centred, chunk, context)
            hook = None if self.payload is None else (lambda f, t: self.payload(x, f, t))
            self.tracker.update_entries(*nonzero_entries(acts), n_tokens=acts.shape[0],
                                        first_context=batch.first_context, context_size=batch.context_size,
                                        features=chunk, payload=hook)

    def compute(self) -> TopActivations:
        return self.tracker.compute()

    # -- merging and saving: the tracker's (see TopKTracker.merge), for the same SAE -------------------------------
    def _settings(self) -> dict[str, str]:
        return {"sae": self.sae.describe()}

    def merge(self, other: SAETopActivations) -> None:
        check_merge(self, other)
        self.tracker.merge(other.tracker)

    def state_dict(self) -> dict:
        return {**self._settings(), **prefixed("tracker", self.tracker.state_dict())}

    def load_state_dict(self, state) -> None:
        self._check_state(state)
        self.tracker.load_state_dict(split_state(state, ("tracker",), self.sae.device)[1]["tracker"])

    def _check_state(self, state, prefix: str = "") -> None:
        own, parts = split_state(state, ("tracker",))
        check_state(self, own, {}, prefix=prefix)
        self.tracker._check_state(parts["tracker"], prefix + "tracker.")
