"""TransformerLens models with explicit, recorded weight-processing flags.

Processing changes ``hook_z``: ``fold_value_biases`` moves each head's value bias into ``b_O``, shifting ``z`` by a
constant per head. SAEs must read ``z`` from a model processed exactly as during their training (Kissane's and
SAELens 2.x's SAEs: the ``from_pretrained`` defaults), so the flags travel with the model.

A model comes from the Hugging Face hub by TransformerLens name (``gelu-2l``) or from a local model folder:

    config.json        {"hooked_transformer_config": {HookedTransformerConfig keyword arguments},
                        "processing_flags": {fold_ln, center_writing_weights, ...}  (optional: how to load it),
                        ... anything else}
    model.safetensors  the *unprocessed* HookedTransformer state dict (any floating dtype)

(the layout of the demo model, ``sparsedecomp/demo/artifacts/model``).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from .errors import CheckpointError, ModelNotFoundError
from .files import read_json, read_safetensors
from ..errors import InputError, InputTypeError
from ..validation import check_device

MODEL_CONFIG_NAME = "config.json"
MODEL_WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class ProcessingFlags:
    """``HookedTransformer`` weight processing; defaults are those of ``HookedTransformer.from_pretrained``."""

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True
    refactor_factored_attn_matrices: bool = False

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, bool):
                raise InputTypeError(f"ProcessingFlags.{name} must be a bool, got {value!r}")

    @classmethod
    def none(cls) -> "ProcessingFlags":
        """No processing (``from_pretrained_no_processing``)."""
        return cls(False, False, False, False, False)

    def as_kwargs(self) -> dict[str, bool]:
        return asdict(self)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A ``HookedTransformer`` with the name it was loaded under, the processing applied to its weights and where
    it came from (``source``: the hub name, or the local folder)."""

    model: Any
    flags: ProcessingFlags
    name: str
    source: str | None = None

    def describe(self) -> str:
        where = f" from {self.source}" if self.source and self.source != self.name else ""
        return f"{self.name}{where} ({self.flags.describe()})"


def load_model(
    name: str | Path,
    *,
    flags: ProcessingFlags | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """A TransformerLens model with its weight processing explicit and recorded.

    ``name`` is a local model folder (see the module docstring; e.g. the demo's ``sparsedecomp/demo/artifacts/model``)
    or a TransformerLens model name or alias (``gelu-2l``), loaded with ``HookedTransformer.from_pretrained`` with
    every processing flag passed explicitly (needs the Hugging Face hub or its cache; extra keyword arguments go to
    ``from_pretrained``). ``flags`` defaults to the folder's recorded ``processing_flags`` (else the
    ``from_pretrained`` defaults, ``ProcessingFlags()``); explicit flags that differ from the recorded
    ones are used, with a warning. An unknown name raises :class:`ModelNotFoundError` naming a few close matches.
    """
    if flags is not None:
        _check_flags(flags)
    check_device(device)  # refuse a device this machine lacks before anything loads
    folder = Path(name)
    if isinstance(name, Path) or folder.is_dir():
        if from_pretrained_kwargs:
            raise InputError(f"{sorted(from_pretrained_kwargs)} only apply to hub models, not to the folder {folder}")
        return _load_model_folder(folder, flags=flags, device=device, dtype=dtype)
    if not isinstance(name, str) or not name:
        raise InputTypeError(f"name must be a model name or a model folder, got {name!r}")
    from transformer_lens import HookedTransformer

    _check_model_name(name)
    flags = ProcessingFlags() if flags is None else flags
    overlap = sorted(set(from_pretrained_kwargs) & set(flags.as_kwargs()))
    if overlap:
        raise InputError(f"pass processing flags through flags=ProcessingFlags(...), not as {overlap}")
    model = HookedTransformer.from_pretrained(
        name, device=device, dtype=dtype, **flags.as_kwargs(), **from_pretrained_kwargs
    )
    model.eval()
    return LoadedModel(model=model, flags=flags, name=name, source=name)


def _check_model_name(name: str) -> None:
    """Raise :class:`ModelNotFoundError` (with at most five close matches, not TransformerLens's list of every
    supported model) unless ``name`` is a TransformerLens model name or alias."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    known = make_model_alias_map()
    if name.lower() in known:
        return
    close = difflib.get_close_matches(name.lower(), list(known), n=5, cutoff=0.6)
    hint = f"; close matches: {close}" if close else ""
    looks_like_path = any(sep in name for sep in ("/", "\\")) or name.startswith((".", "~"))
    folder = f" and no local model folder {name} exists" if looks_like_path else ""
    raise ModelNotFoundError(f"unknown model {name!r}: not a TransformerLens model name or alias{folder}{hint}")


def _load_model_folder(
    folder: Path, *, flags: ProcessingFlags | None, device: str | torch.device, dtype: str | torch.dtype
) -> LoadedModel:
    """Build the ``HookedTransformer`` from ``config.json`` and load ``model.safetensors`` with the flags."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder not found: {folder}")
    config_path = folder / MODEL_CONFIG_NAME
    meta = read_json(config_path, "model config")
    kwargs = meta.get("hooked_transformer_config")
    if not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{config_path} has no 'hooked_transformer_config' object: a local model folder holds {MODEL_CONFIG_NAME} "
            f"with the HookedTransformerConfig keyword arguments (and optional 'processing_flags') and "
            f"{MODEL_WEIGHTS_NAME} with the unprocessed HookedTransformer state dict"
        )
    recorded = meta.get("processing_flags")
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{config_path}: processing_flags must be an object, got {recorded!r}")
        try:
            recorded = ProcessingFlags(**recorded)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{config_path}: processing_flags: {err}") from err
    if flags is None:
        flags = recorded if recorded is not None else ProcessingFlags()
    elif recorded is not None and flags != recorded:
        warnings.warn(
            f"{folder} records processing flags ({recorded.describe()}) but it is loaded with ({flags.describe()}): "
            "SAEs trained on the recorded processing read a different hook_z",
            UserWarning,
            stacklevel=3,
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    try:
        config = HookedTransformerConfig(**{**kwargs, "device": str(device), "dtype": dtype})
    except (TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"{config_path}: hooked_transformer_config is not a valid HookedTransformerConfig: {err}") from err
    state = read_safetensors(folder / MODEL_WEIGHTS_NAME, "model weights")
    model = HookedTransformer(config)
    expected = {k for k in model.state_dict() if not k.endswith((".IGNORE", ".mask"))}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / MODEL_WEIGHTS_NAME} does not match {config_path}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    state = {key: value.to(dtype) for key, value in state.items()}
    name = kwargs.get("model_name") or folder.name
    loaded = process_state_dict(model, state, flags, name=name)
    return LoadedModel(model=loaded.model, flags=flags, name=name, source=str(folder))


def process_state_dict(
    model: Any,
    state_dict: Mapping[str, torch.Tensor],
    flags: ProcessingFlags = ProcessingFlags(),
    *,
    name: str | None = None,
) -> LoadedModel:
    """Load ``state_dict`` (HookedTransformer layout, unprocessed) into ``model`` with ``flags`` applied via
    ``model.load_and_process_state_dict``. That method mutates the dict it gets, so it receives a copy of
    ``state_dict`` (tensors cloned): the caller's dict and tensors are left untouched."""
    _check_flags(flags)
    if not hasattr(model, "load_and_process_state_dict"):
        raise InputTypeError(f"model must be a HookedTransformer, got {type(model).__name__}")
    copy = {key: value.detach().clone() for key, value in state_dict.items()}
    model.load_and_process_state_dict(copy, **flags.as_kwargs())
    model.eval()
    return LoadedModel(model=model, flags=flags, name=name or getattr(model.cfg, "model_name", "model"))


def _check_flags(flags: object) -> None:
    if not isinstance(flags, ProcessingFlags):
        raise InputTypeError(f"flags must be ProcessingFlags, got {type(flags).__name__}")
