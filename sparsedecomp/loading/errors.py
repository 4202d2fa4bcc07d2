"""Errors raised by the loaders; every message names the file (or repository path) and the problem."""

from __future__ import annotations

from ..errors import InputError


class CheckpointError(InputError):
    """A checkpoint exists but cannot be used: wrong format, truncated, missing keys, bad shapes or dtypes."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file or directory a checkpoint needs is absent (also a ``FileNotFoundError``)."""


class UnsupportedCheckpointError(CheckpointError):
    """A well-formed checkpoint whose architecture or settings this package cannot represent faithfully
    (e.g. TopK / JumpReLU activations, run-time layer-norm of the input)."""


class HookUnknownError(InputError):
    """An operation needs the hook an SAE reads (``hook_name`` / ``layer``) but its checkpoint does not record it
    (a SAELens SAE saved without metadata); ``SAE.with_hook(...)`` supplies it."""


class ModelNotFoundError(InputError):
    """A model name that is neither a TransformerLens model name or alias nor an existing local model folder."""
