"""Reproducible uniform priorities for reservoir sampling: a counter-based hash of ``(seed, feature, token)``.

A uniform random sample without replacement of ``s`` items out of a stream is the ``s`` items with the largest
independent uniform priorities. Drawing the priority of item ``(f, t)`` from a sequential generator would make it
depend on how the stream was batched; hashing the item's coordinates instead gives every item the same priority
however the tokens arrive, so a streamed sample equals a one-batch sample bit for bit.

The hash is MurmurHash3's 32-bit finaliser ``fmix32`` applied in rounds
``h = fmix32(fmix32(fmix32(fmix32(seed) ^ f) ^ t_low) ^ t_high)`` (``t`` split into 32-bit words), computed in
int64 with every product kept below ``2**63`` (a 32x32-bit product is taken modulo ``2**32`` in two 16-bit halves),
so no integer overflow occurs on any device. The priority is ``((h >> 8) + 1) / 2**24``, uniform on
``{1, ..., 2**24} / 2**24`` and exact in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError, InputTypeError

_MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35
PRIORITY_LEVELS = 2**24


def _mul32(a: Tensor, c: int) -> Tensor:
    """``(a * c) mod 2**32`` for ``0 <= a < 2**32``: ``a * c_low + ((a * c_high) mod 2**16) * 2**16``, each term
    below ``2**49``."""
    low, high = c & 0xFFFF, c >> 16
    return (a * low + (((a * high) & 0xFFFF) << 16)) & _MASK32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's finaliser on int64 tensors holding 32-bit words (values in ``[0, 2**32)``)."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def check_seed(seed: object) -> int:
    """A seed for :func:`uniform_priorities`: an int in ``[0, 2**32)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputTypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= _MASK32:
        raise InputError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def feature_keys(seed: int, features: Tensor) -> Tensor:
    """The per-feature part of the hash, ``fmix32(fmix32(seed) ^ f)``, for ``features`` (int64, below ``2**32``);
    callers compute it once per feature and reuse it for every token."""
    seed_word = fmix32(torch.tensor(check_seed(seed), dtype=torch.long, device=features.device))
    return fmix32(seed_word ^ features.long())


def uniform_priorities(seed: int, features: Tensor, tokens: Tensor, *, dtype: torch.dtype = torch.float32,
                       keys: Tensor | None = None) -> Tensor:
    """Priorities in ``(0, 1]`` of the items ``(features[i], tokens[i])`` (int64 tensors of one shape; ``tokens``
    the global token index ``context * context_size + position``, non-negative). ``keys`` may give
    :func:`feature_keys` already computed for ``features``."""
    if features.shape != tokens.shape:
        raise InputError(f"features and tokens must have one shape, got {tuple(features.shape)} and "
                         f"{tuple(tokens.shape)}")
    h = feature_keys(seed, features) if keys is None else keys
    tokens = tokens.long()
    h = fmix32(h ^ (tokens & _MASK32))
    h = fmix32(h ^ (tokens >> 32))
    return ((h >> 8) + 1).to(dtype) / PRIORITY_LEVELS
