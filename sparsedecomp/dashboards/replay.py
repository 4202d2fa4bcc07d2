"""One forward pass for the whole dashboard when the layer's attention activations fit in memory.

The dashboard needs the model three times over: the streamed statistics, then the activations at the shown
examples' windows and their DFA by source (which need ``v`` and the attention pattern). Which contexts hold shown
examples is known only after the first pass, so by default the later two run the model again over those contexts.
When every context's ``z``, ``v`` and pattern fit in ``cache_budget`` bytes (:func:`cache_bytes`), the first pass
keeps its batches instead (:class:`KeepBatches`) and the later steps replay them (:func:`batches_over`): the same
numbers from one forward pass.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..activations import EXTRAS, ActivationBatch, ActivationStream, check_merge, check_state, snapshot
from ..errors import InputError

DEFAULT_CACHE_BUDGET = 512 * 2**20
"""Bytes the kept batches may take (``z``, ``v`` and the pattern of every context): 512 MiB."""

REPLAYED = ("v", "pattern")


def cache_bytes(cfg: Any, n_contexts: int, context_size: int) -> int:
    """Bytes of ``z`` (``context_size x n_heads x d_head``), ``v`` (``context_size x n_key_value_heads x d_head``:
    fewer heads under grouped-query attention, unless TransformerLens is set to ungroup them) and the pattern
    (``n_heads x context_size^2``) of ``n_contexts`` contexts in float32."""
    ungrouped = getattr(cfg, "ungroup_grouped_query_attention", False)
    n_kv_heads = cfg.n_heads if ungrouped else getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    per_context = (context_size * (cfg.n_heads + n_kv_heads) * cfg.d_head
                   + cfg.n_heads * context_size * context_size)
    return 4 * n_contexts * per_context


class KeepBatches:
    """:class:`~sparsedecomp.activations.Accumulator` that keeps every batch of the pass (with ``v`` and the
    pattern) for :func:`batches_over` to replay.

    Mergeable: a merge puts the batches of both parts in ``first_context`` order (stably), the order of one pass.
    The state holds every batch's tensors (``batch.<i>.tokens``, ``batch.<i>.z``, and its extras when kept) and the
    lists ``first_context`` and ``layer``."""

    needs = REPLAYED

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches: list[ActivationBatch] = []

    def update(self, batch: ActivationBatch) -> None:
        self.batches.append(batch)

    def compute(self) -> tuple[ActivationBatch, ...]:
        return tuple(self.batches)

    def _settings(self) -> dict:
        return {}

    def merge(self, other: KeepBatches) -> None:
        check_merge(self, other)
        if self.batches and other.batches:
            mine, theirs = self.batches[0], other.batches[0]
            if (mine.layer, mine.context_size, mine.z.shape[2:]) != (theirs.layer, theirs.context_size,
                                                                     theirs.z.shape[2:]):
                raise InputError(f"cannot merge batches of layer {theirs.layer}, contexts of {theirs.context_size} "
                                 f"and z heads {tuple(theirs.z.shape[2:])} into batches of layer {mine.layer}, "
                                 f"contexts of {mine.context_size} and z heads {tuple(mine.z.shape[2:])}")
        # Batches are immutable: the merged list shares them with other.
        self.batches = sorted(self.batches + other.batches, key=lambda batch: batch.first_context)

    def state_dict(self) -> dict:
        state: dict = {"first_context": [b.first_context for b in self.batches],
                       "layer": [b.layer for b in self.batches]}
        for i, batch in enumerate(self.batches):
            for what in ("tokens", "z", *EXTRAS):
                value = getattr(batch, what)
                if value is not None:
                    state[f"batch.{i}.{what}"] = snapshot(value)
        return state

    def load_state_dict(self, state) -> None:
        first = state.get("first_context") if isinstance(state, Mapping) else None
        n = len(first) if isinstance(first, list) else 0
        tensors: dict[str, tuple] = {}
        for i in range(n):
            rows = f"contexts of batch {i}"
            tensors.update({f"batch.{i}.tokens": (rows, "pos", torch.long),
                            f"batch.{i}.z": (rows, "pos", "n_heads", "d_head"),
                            # v has the key/value heads: fewer than z's under grouped-query attention
                            f"batch.{i}.v": (rows, "pos", "n_kv_heads", "d_head"),
                            f"batch.{i}.pattern": (rows, "n_heads", "pos", "pos"),
                            f"batch.{i}.resid_pre": (rows, "pos", None)})
        optional = [name for name in tensors if name.rsplit(".", 1)[1] in EXTRAS]
        check_state(self, state, tensors, {"first_context": list, "layer": list}, optional=optional)
        layers = state["layer"]
        if len(layers) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in [*first, *layers]):
            raise InputError(f"the KeepBatches state's 'first_context' and 'layer' must list one int per batch, got "
                             f"{first[:5]!r} and {layers[:5]!r}")
        self.batches = [ActivationBatch(first_context=first[i], layer=layers[i],
                                        **{what: state[f"batch.{i}.{what}"].clone() for what in ("tokens", "z", *EXTRAS)
                                           if f"batch.{i}.{what}" in state})
                        for i in range(n)]


def batches_over(model: Any, tokens: Tensor, used: Tensor, *, layer: int, include: Sequence[str] = (),
                 batch_size: int | None = None,
                 kept: Sequence[ActivationBatch] | None = None) -> tuple[Tensor, Iterable[ActivationBatch]]:
    """``(lookup, batches)``: activation batches covering the contexts ``used`` (indices into ``tokens``) and
    ``lookup[c]``, the row of context ``c`` in the batches' numbering (``batch.first_context + i``; -1 for a context
    not covered). With ``kept`` (every context's batches from the first pass, holding ``include``) they are replayed
    and ``lookup`` is the identity; otherwise one :class:`~sparsedecomp.activations.ActivationStream` runs over the
    used contexts only."""
    n_contexts = tokens.shape[0]
    if kept is not None:
        return torch.arange(n_contexts), kept
    lookup = torch.full((n_contexts,), -1, dtype=torch.long)
    lookup[used] = torch.arange(used.numel())
    stream = ActivationStream(model, tokens[used], layer=layer, include=include, batch_size=batch_size,
                              with_logits=False)
    return lookup, stream
