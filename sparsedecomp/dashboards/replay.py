"""One forward pass for the whole dashboard when the layer's attention activations fit in memory.

The dashboard needs the model three times over: the streamed statistics, then the activations at the shown
examples' windows and their DFA by source (which need ``v`` and the attention pattern). Which contexts hold shown
examples is known only after the first pass, so by default the later two run the model again over those contexts.
When every context's ``z``, ``v`` and pattern fit in ``cache_budget`` bytes (:func:`cache_bytes`), the first pass
keeps its batches instead (:class:`KeepBatches`) and the later steps replay them (:func:`batches_over`): the same
numbers from one forward pass.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from ..activations import ActivationBatch, ActivationStream

DEFAULT_CACHE_BUDGET = 512 * 2**20
"""Bytes the kept batches may take (``z``, ``v`` and the pattern of every context): 512 MiB."""

REPLAYED = ("v", "pattern")


def cache_bytes(cfg: Any, n_contexts: int, context_size: int) -> int:
    """Bytes of ``z``, ``v`` (``context_size x n_heads x d_head`` each) and the pattern (``n_heads x
    context_size^2``) of ``n_contexts`` contexts in float32."""
    per_context = 2 * context_size * cfg.n_heads * cfg.d_head + cfg.n_heads * context_size * context_size
    return 4 * n_contexts * per_context


class KeepBatches:
    """:class:`~sparsedecomp.activations.Accumulator` that keeps every batch of the pass (with ``v`` and the
    pattern) for :func:`batches_over` to replay."""

    needs = REPLAYED

    def __init__(self) -> None:
        self.batches: list[ActivationBatch] = []

    def update(self, batch: ActivationBatch) -> None:
        self.batches.append(batch)

    def compute(self) -> tuple[ActivationBatch, ...]:
        return tuple(self.batches)


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
