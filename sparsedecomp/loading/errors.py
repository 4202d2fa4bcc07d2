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
