"""Reading checkpoint files safely and checking what they hold.

Nothing here unpickles arbitrary objects: JSON is parsed as JSON, safetensors files are read by the
safetensors library, and ``.pt`` state dicts go through ``torch.load(weights_only=True)``, whose restricted
unpickler refuses any global that is not a tensor building block. Every failure is re-raised as a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError, CheckpointNotFoundError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing regular file, else raise naming ``what`` it should be."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} must be a file, but {path} is a directory")
    return path


def read_json(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a JSON object from ``path``."""
    path = require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: str | Path, what: str = "weights", *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file (a truncated or foreign file raises naming the file)."""
    from safetensors import safe_open

    path = require_file(path, what)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError / OSError / RuntimeError
        raise CheckpointError(f"{what} {path} is not a readable safetensors file: {err}") from err


def read_torch_state_dict(path: str | Path, what: str = "state dict") -> dict[str, Tensor]:
    """A ``torch.save``-d dict of tensors, read with ``weights_only=True`` onto the CPU."""
    path = require_file(path, what)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, forbidden global, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{what} {path} could not be read as a tensor state dict with weights_only=True: {first_line}"
        ) from err
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{what} {path} must hold a dict of tensors, got {type(value).__name__}")
    bad = [str(k) for k, v in value.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{what} {path} holds non-tensor entries: {bad[:5]}")
    return dict(value)


def check_sae_tensors(
    tensors: Mapping[str, Tensor],
    path: Path | str,
    *,
    d_in: int,
    d_sae: int,
    dtype: torch.dtype | None,
    optional: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Check a standard SAE's weights: keys, shapes ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``,
    ``W_dec (d_sae, d_in)``, ``b_dec (d_in,)``, floating dtypes that agree with each other and with ``dtype``
    (the dtype the config declares, if any), and finite values."""
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    allowed = {**expected, **(optional or {})}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{path} is missing the keys {missing} (it holds {sorted(tensors)})")
    unexpected = sorted(k for k in tensors if k not in allowed)
    if unexpected:
        raise CheckpointError(
            f"{path} holds unexpected keys {unexpected}: not a standard ReLU SAE (another architecture?)"
        )
    for key, shape in allowed.items():
        if key not in tensors:
            continue
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected {shape} (config: d_in={d_in}, d_sae={d_sae})"
            )
        if value.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {key} has dtype {value.dtype}, expected a floating-point dtype")
    first = tensors["W_enc"].dtype
    for key in expected:
        if tensors[key].dtype != first:
            raise CheckpointError(f"{path}: {key} is {tensors[key].dtype} but W_enc is {first}")
    if dtype is not None and first != dtype:
        raise CheckpointError(f"{path}: weights are {first} but the config declares {dtype}")
    for key in allowed:
        if key in tensors and not bool(torch.isfinite(tensors[key]).all()):
            raise CheckpointError(f"{path}: {key} contains NaN or Inf entries")


def config_int(cfg: Mapping[str, Any], key: str, path: Path | str) -> int:
    """A required positive integer config entry."""
    if key not in cfg:
        raise CheckpointError(f"{path} lacks the required key {key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def config_str(cfg: Mapping[str, Any], key: str, path: Path | str) -> str:
    """A required non-empty string config entry."""
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{path} lacks a non-empty string {key!r} (got {value!r})")
    return value


def layer_from_hook(hook_name: str) -> int | None:
    """The layer index in a TransformerLens hook name (``blocks.3.attn.hook_z`` -> 3), or ``None``."""
    parts = hook_name.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None
