"""TransformerLens models with explicit, recorded weight-processing flags.

Processing changes ``hook_z``: ``fold_value_biases`` moves each head's value bias into ``b_O``, shifting ``z`` by a
constant per head. SAEs must read ``z`` from a model processed exactly as during their training (Kissane's and
SAELens 2.x's SAEs: the ``from_pretrained`` defaults), so the flags travel with the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from ..errors import InputError, InputTypeError


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
    """A ``HookedTransformer`` with the name it was loaded under and the processing applied to its weights."""

    model: Any
    flags: ProcessingFlags
    name: str

    def describe(self) -> str:
        return f"{self.name} ({self.flags.describe()})"


def load_model(
    name: str,
    *,
    flags: ProcessingFlags = ProcessingFlags(),
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """``HookedTransformer.from_pretrained(name, **flags)`` with every processing flag passed explicitly
    (needs the Hugging Face hub or its cache). Extra keyword arguments go to ``from_pretrained``."""
    from transformer_lens import HookedTransformer

    _check_flags(flags)
    overlap = sorted(set(from_pretrained_kwargs) & set(flags.as_kwargs()))
    if overlap:
        raise InputError(f"pass processing flags through flags=ProcessingFlags(...), not as {overlap}")
    model = HookedTransformer.from_pretrained(
        name, device=device, dtype=dtype, **flags.as_kwargs(), **from_pretrained_kwargs
    )
    model.eval()
    return LoadedModel(model=model, flags=flags, name=name)


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
