"""Token windows around examples: for an example at ``(context, position)``, the token ids at positions
``position - left, ..., position + right`` of that context, gathered for every example at once (padding
:data:`PAD` where the window runs past the context's ends or the example slot is empty)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..activations import check_tokens
from ..errors import InputError, InputTypeError

PAD = -1
DEFAULT_LEFT, DEFAULT_RIGHT = 12, 4


@dataclass(frozen=True, eq=False)
class ExampleWindows:
    """``token_ids`` ``(*examples, left + 1 + right)`` long (:data:`PAD` outside the context or for an empty
    example slot); the example's own token is column ``left``; ``positions`` are the window's positions in the
    context (``position - left + i``)."""

    token_ids: Tensor
    positions: Tensor
    left: int
    right: int

    @property
    def valid(self) -> Tensor:
        return self.token_ids != PAD


def example_windows(tokens: Any, context: Tensor, position: Tensor, *, left: int = DEFAULT_LEFT,
                    right: int = DEFAULT_RIGHT) -> ExampleWindows:
    """:class:`ExampleWindows` of the examples ``(context, position)`` (long tensors of one shape, -1 marking an
    empty slot as in :class:`~sparsedecomp.evaluation.top_activations.TopActivations`) in ``tokens``
    (``(n_contexts, context_size)`` or a :class:`~sparsedecomp.loading.tokens.TokenSet`)."""
    tokens = check_tokens(getattr(tokens, "tokens", tokens))
    for name, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a non-negative int, got {value!r}")
    for name, value in (("context", context), ("position", position)):
        if not isinstance(value, Tensor) or value.is_floating_point() or value.dtype == torch.bool:
            raise InputTypeError(f"{name} must be an integer tensor, got {getattr(value, 'dtype', type(value))}")
    if context.shape != position.shape:
        raise InputError(f"context and position must have one shape, got {tuple(context.shape)} and "
                         f"{tuple(position.shape)}")
    n_contexts, size = tokens.shape
    empty = (context < 0) | (position < 0)
    if bool(((context >= n_contexts) | (position >= size))[~empty].any()):
        raise InputError(f"examples point outside the tokens ({n_contexts} contexts of {size})")
    context, position = context.to(tokens.device).long(), position.to(tokens.device).long()
    positions = position[..., None] + torch.arange(-left, right + 1, device=tokens.device)
    inside = (positions >= 0) & (positions < size) & ~empty.to(tokens.device)[..., None]
    gathered = tokens[context.clamp_min(0)[..., None], positions.clamp(0, size - 1)]
    return ExampleWindows(token_ids=gathered.masked_fill(~inside, PAD), positions=positions, left=left, right=right)
