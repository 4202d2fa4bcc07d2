"""Reading checkpoint files safely and checking what they hold.

Nothing here unpickles arbitrary objects: JSON is parsed as JSON, safetensors files are read by the
safetensors library, and ``.pt`` state dicts go through ``torch.load(weights_only=True)``, whose restricted
unpickler refuses any global that is not a tensor building block. Every failure is re-raised as a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError, CheckpointNotFoundError
from ..errors import InputTypeError
from ..validation import FLOAT_DTYPES

# A SAELens SAE folder (legacy 1.4-2.1.3 and 6.x alike): the config, the weights and optional log10 firing frequencies.
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
SAE_DIR_FILES = (CFG_NAME, WEIGHTS_NAME, SPARSITY_NAME)

# dtype names as SAELens configs write them: 6.x writes "float32", 1.x/2.x write str(torch.float32).
DTYPE_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
DTYPE_NAMES.update({str(d): d for d in FLOAT_DTYPES})


class DeadEncoderWarning(UserWarning):
    """An SAE's encoder ``W_enc`` is all zero: its features do not depend on the input."""


def as_path(source: Any, name: str = "source", *, references: bool = False) -> Path:
    """``source`` as a ``Path`` if it is a ``str`` or ``os.PathLike``; anything else (a number, a list, an SAE) is
    refused by type here rather than failing inside ``pathlib`` with a message that names neither. ``references``:
    the caller also takes hub reference strings (the message says so)."""
    if not isinstance(source, (str, os.PathLike)):
        accepted = "a path (str or os.PathLike)" + (" or a hub reference string" if references else "")
        raise InputTypeError(f"{name} must be {accepted}, got {type(source).__name__} {source!r}")
    return Path(source)


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
    layout = {key: (tuple(value.shape), value.dtype) for key, value in tensors.items()}
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    check_sae_layout(layout, path, expected=expected, optional=optional, dtype=dtype,
                     sizes=f"d_in={d_in}, d_sae={d_sae}")
    for key in layout:
        if not bool(torch.isfinite(tensors[key]).all()):
            raise CheckpointError(f"{path}: {key} contains NaN or Inf entries")
    warn_if_encoder_zero(tensors["W_enc"], tensors["b_enc"], path)


def check_sae_layout(
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    path: Path | str,
    *,
    expected: Mapping[str, tuple[int, ...]],
    optional: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype | None,
    sizes: str,
    architecture: str = "standard ReLU",
) -> None:
    """Check the keys, shapes and dtypes of a weights file (``layout``: key -> (shape, dtype), e.g. from
    :func:`read_safetensors_layout`, which reads only the header): the ``expected`` keys present with their shapes,
    no key outside ``expected`` and ``optional``, floating dtypes that agree with each other and with ``dtype`` (the
    config's). ``sizes`` names the config's sizes in messages."""
    allowed = {**expected, **(optional or {})}
    missing = [k for k in expected if k not in layout]
    if missing:
        raise CheckpointError(f"{path} is missing the keys {missing} (it holds {sorted(layout)})")
    unexpected = sorted(k for k in layout if k not in allowed)
    if unexpected:
        raise CheckpointError(
            f"{path} holds unexpected keys {unexpected}: not a {architecture} SAE (another architecture?)"
        )
    for key, shape in allowed.items():
        if key not in layout:
            continue
        got, got_dtype = layout[key]
        if got != shape:
            raise CheckpointError(f"{path}: {key} has shape {got}, expected {shape} (config: {sizes})")
        if got_dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {key} has dtype {got_dtype}, expected a floating-point dtype")
    first_key = next(iter(expected))
    first = layout[first_key][1]
    for key in expected:
        if layout[key][1] != first:
            raise CheckpointError(f"{path}: {key} is {layout[key][1]} but {first_key} is {first}")
    if dtype is not None and first != dtype:
        raise CheckpointError(f"{path}: weights are {first} but the config declares {dtype}")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_layout(path: str | Path, what: str = "weights") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``key -> (shape, dtype)`` of a ``.safetensors`` file from its header alone (no tensor data is read)."""
    from safetensors import safe_open

    path = require_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {key: (tuple(part.get_shape()), _SAFETENSORS_DTYPES.get(part.get_dtype(), part.get_dtype()))
                    for key, part in slices.items()}
    except Exception as err:  # safetensors raises its own SafetensorError / OSError on a short or foreign file
        raise CheckpointError(f"{what} {path} is not a readable safetensors file: {err}") from err


def warn_if_encoder_zero(W_enc: Tensor, b_enc: Tensor, where: Any) -> bool:
    """Warn (:class:`DeadEncoderWarning`) when ``W_enc`` is all zero: every activation is then
    ``relu(b_enc)`` whatever the input, so features with ``b_enc <= 0`` never fire and the others are constant
    (an L0 of 0, or a constant one, is then no property of the data). A valid file, so not refused: an
    untrained or wiped checkpoint. Returns whether it warned."""
    from ..decomposition import caller_stacklevel

    if bool((W_enc != 0).any()):
        return False
    always_on = int((b_enc > 0).sum())
    warnings.warn(
        f"{where}: W_enc is all zero, so no feature depends on the input: every activation is relu(b_enc) "
        f"({always_on} of {b_enc.shape[0]} features constantly on, the rest never fire); an untrained or "
        "zeroed checkpoint?",
        DeadEncoderWarning,
        stacklevel=caller_stacklevel(),
    )
    return True


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


def config_kwargs(cfg: Mapping[str, Any], key: str, path: Path | str, what: str | None = None) -> dict[str, Any] | None:
    """An optional JSON-object config entry (keyword arguments, e.g. ``model_from_pretrained_kwargs``); ``None``
    when absent or null."""
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what or key} must be a JSON object (keyword arguments) or absent, "
                              f"got {value!r}")
    return dict(value)


def layer_from_hook(hook_name: str) -> int | None:
    """The layer index in a TransformerLens hook name (``blocks.3.attn.hook_z`` -> 3), or ``None``."""
    parts = hook_name.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def sae_dir_of(path: str | Path) -> Path:
    """The SAE folder ``path`` names: its parent when ``path`` is one of the folder's files (``cfg.json``,
    ``sae_weights.safetensors``, ``sparsity.safetensors``), else ``path`` itself."""
    path = as_path(path, "path")
    if path.name in SAE_DIR_FILES and path.is_file():
        return path.parent
    return path


def is_sae_dir(path: Path) -> bool:
    """A folder holding ``cfg.json`` and ``sae_weights.safetensors``."""
    return (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def parse_dtype(name: Any, path: Path | str, key: str = "dtype") -> torch.dtype:
    """The floating dtype a config names (``"float32"`` or ``"torch.float32"``, ...)."""
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"{path}: {key} must be one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


def read_sparsity(path: Path, d_sae: int, what: str, *, device: str | torch.device = "cpu") -> Tensor | None:
    """The ``(d_sae,)`` floating ``sparsity`` tensor (log10 firing frequencies) of ``path``, or ``None`` when the
    file does not exist (it is optional in every SAELens layout)."""
    if not path.exists():
        return None
    value = read_safetensors(path, what, device=device).get("sparsity")
    if value is None or tuple(value.shape) != (d_sae,) or value.dtype not in FLOAT_DTYPES:
        got = None if value is None else f"{value.dtype} {tuple(value.shape)}"
        raise CheckpointError(f"{path} must hold a floating 'sparsity' tensor of shape ({d_sae},), got {got}")
    if not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{path}: sparsity contains NaN or Inf entries")
    return value


def resolve_layer(declared: Any, hook_name: str | None, where: Path | str, key: str) -> int | None:
    """The layer from the config entry ``key`` (``declared``) or, when absent, from the hook name.

    Both present and different is an error naming the file; a known hook whose layer cannot be told is an error;
    an unknown hook without a declared layer gives ``None`` (the layer is unknown)."""
    derived = None if hook_name is None else layer_from_hook(hook_name)
    if declared is None:
        if hook_name is not None and derived is None:
            raise CheckpointError(f"{where}: cannot tell the layer: no {key!r} and the hook {hook_name!r} names none")
        return derived
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
        raise CheckpointError(f"{where}: {key} must be a non-negative int, got {declared!r}")
    if derived is not None and derived != declared:
        raise CheckpointError(f"{where}: {key} is {declared} but the hook {hook_name!r} is in layer {derived}")
    return declared


def resolve_head(head_index: Any, hook_name: str | None, where: Path | str, key: str) -> int | str | None:
    """The SAE's head from a config's head index: the index itself; for ``null``, ``"concatenated"`` on a
    ``hook_z`` hook (all heads' ``z`` flattened), ``"none"`` on a hook without a head axis, and ``None``
    (unknown) when the hook is unknown too."""
    from .sae import CONCATENATED, NO_HEAD

    if head_index is None:
        if hook_name is None:
            return None
        return CONCATENATED if "hook_z" in hook_name else NO_HEAD
    if isinstance(head_index, int) and not isinstance(head_index, bool) and head_index >= 0:
        return head_index
    raise CheckpointError(f"{where}: {key} must be null or a head index, got {head_index!r}")


def optional_str(cfg: Mapping[str, Any], key: str, path: Path | str, what: str | None = None) -> str | None:
    """An optional non-empty string config entry (``None`` when absent or null)."""
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{path}: {what or key} must be a non-empty string or absent, got {value!r}")
    return value


_ATTN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern", "hook_attn_scores", "hook_result")


def canonical_hook(hook_name: str) -> str:
    """TransformerLens's attention-hook alias resolved: ``blocks.L.hook_z`` is ``blocks.L.attn.hook_z``
    (SAELens release ids use the short form, Kissane's and SAELens's configs the long one)."""
    parts = hook_name.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _ATTN_HOOKS:
        return f"blocks.{parts[1]}.attn.{parts[2]}"
    return hook_name
