"""Training batches of every head of a layer from one model forward per block of contexts, with an exact, resumable
position.

SAELens's single-SAE runner reads one hook per model pass; here one forward of the model (up to the layer, through
:class:`~sparsedecomp.activations.ActivationStream`) feeds every head. The contexts are cut into *blocks*: one epoch is
a seeded permutation of the contexts, cut into blocks of ``C = ceil(buffer_batches * batch_size / context_size)``
contexts; a block's ``C * context_size`` rows (every position, BOS included, as SAELens's activation store keeps them
by default) are shuffled with a generator seeded by ``(seed, epoch, block)`` and served as
``floor(C * context_size / batch_size)`` batches (the leftover rows, fewer than one batch, are dropped). Every head's
batch holds the same rows, so the heads see the same tokens in the same order, and an optional ``concat`` key serves
the heads' ``z`` side by side for a concatenated-z SAE trained in the same pass.

The stream's whole state is :attr:`HeadBatchStream.position`, the number of batches served: :meth:`seek` recomputes
the block a position falls in (one block's forwards, no more), so a run resumed from a checkpoint trains on exactly
the batches an uninterrupted run would have.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import Tensor

from ..activations import ActivationStream
from ..errors import InputError
from ..naming import CONCAT_NAME, head_name

_SEED_STRIDE = 1_000_003
"""Mixes (seed, epoch, block) into one generator seed; a prime larger than any block count."""


def block_contexts(buffer_batches: int, batch_size: int, context_size: int) -> int:
    """``C``: contexts per block, enough for ``buffer_batches`` batches of ``batch_size`` rows."""
    return math.ceil(buffer_batches * batch_size / context_size)


def contexts_for_steps(n_steps: int, *, buffer_batches: int, batch_size: int, context_size: int) -> int:
    """Contexts the stream reads for ``n_steps`` batches: the whole blocks that serve them (``floor(C * context_size
    / batch_size)`` batches each)."""
    per_block = block_contexts(buffer_batches, batch_size, context_size)
    batches_per_block = per_block * context_size // batch_size
    return math.ceil(n_steps / batches_per_block) * per_block


class HeadBatchStream(Iterator[dict[str, Tensor]]):
    """``{head_name(h): (batch_size, d_head)}`` float32 batches of ``blocks.{layer}.attn.hook_z`` (plus
    ``"concat": (batch_size, n_heads * d_head)`` with ``concat=True``, every head of the layer side by side), served
    forever (a new epoch, newly permuted, when the contexts run out). See the module docstring."""

    def __init__(self, model: Any, tokens: Any, *, layer: int, heads: tuple[int, ...], batch_size: int,
                 buffer_batches: int, seed: int, concat: bool = False, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.tokens = getattr(tokens, "tokens", tokens)
        if self.tokens.ndim != 2 or self.tokens.shape[0] < 1:
            raise InputError(f"tokens must be (n_contexts, context_size) with at least one context, got "
                             f"{tuple(self.tokens.shape)}")
        self.layer, self.heads, self.batch_size, self.seed = layer, heads, batch_size, seed
        self.concat, self.device = concat, device
        n_contexts, context_size = self.tokens.shape
        self.contexts_per_block = min(n_contexts, block_contexts(buffer_batches, batch_size, context_size))
        starts = range(0, n_contexts, self.contexts_per_block)
        self._blocks = [(s, min(s + self.contexts_per_block, n_contexts)) for s in starts]
        self._batches_in_block = [(end - start) * context_size // batch_size for start, end in self._blocks]
        if sum(self._batches_in_block) == 0:
            raise InputError(f"the tokens ({n_contexts} contexts of {context_size}) hold less than one batch of "
                             f"{batch_size} rows")
        self.position = 0
        self._loaded: tuple[int, int] | None = None
        self._rows: dict[str, Tensor] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches one pass over the contexts serves (rows short of a batch at a block's end are dropped)."""
        return sum(self._batches_in_block)

    def seek(self, position: int) -> None:
        """Serve batch ``position`` next (0 is the first batch of the first epoch)."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InputError(f"a stream position is a non-negative int, got {position!r}")
        self.position = position

    def __next__(self) -> dict[str, Tensor]:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        block = 0
        while index >= self._batches_in_block[block]:
            index -= self._batches_in_block[block]
            block += 1
        if self._loaded != (epoch, block):
            self._load(epoch, block)
        self.position += 1
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return {key: value[rows] for key, value in self._rows.items()}

    def _load(self, epoch: int, block: int) -> None:
        self._rows = {}  # the previous block's rows go before the next block's are made
        order = torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(self.seed * _SEED_STRIDE
                                                                                          + epoch))
        start, end = self._blocks[block]
        contexts = self.tokens[order[start:end]]
        z = torch.cat([batch.z.reshape(-1, batch.n_heads, batch.d_head).float()
                       for batch in ActivationStream(self.model, contexts, layer=self.layer, with_logits=False)])
        generator = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) * _SEED_STRIDE + block + 1)
        keep = torch.randperm(len(z), generator=generator)[: self._batches_in_block[block] * self.batch_size]
        z = z[keep].to(self.device)
        self._rows = {head_name(h): z[:, h].contiguous() for h in self.heads}
        if self.concat:
            self._rows[CONCAT_NAME] = z.reshape(len(z), -1)
        self._loaded = (epoch, block)
