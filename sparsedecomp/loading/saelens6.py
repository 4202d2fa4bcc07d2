"""SAELens 6.x directories and pretrained releases.

A 6.x directory holds ``cfg.json`` (``d_in, d_sae, dtype, apply_b_dec_to_input, normalize_activations,
reshape_activations, architecture`` and a ``metadata`` block with ``model_name, hook_name, hook_head_index, ...``),
``sae_weights.safetensors`` and optionally ``sparsity.safetensors``. Only the ``standard`` (ReLU) architecture
is represented; TopK, JumpReLU, gated, ... checkpoints are refused with :class:`UnsupportedCheckpointError`.

Pitfall (formats.md, pitfall 2): SAELens sets ``reshape_activations="hook_z"`` for any ``hook_z`` SAE, after
which its ``encode`` flattens the last two axes of the input and fails on one head's ``[N, d_head]`` vectors.
The SAE returned here never reshapes: it reads ``(..., d_in)`` vectors, with ``d_in = d_head`` for a per-head SAE
and ``d_in = n_heads * d_head`` (head-major) for a concatenated one. The original setting is kept in
``provenance["reshape_activations"]``.
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError, UnsupportedCheckpointError
from .files import (
    CFG_NAME,
    DTYPE_NAMES,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    check_sae_tensors,
    config_int,
    config_kwargs,
    optional_str,
    parse_dtype,
    read_json,
    read_safetensors,
    read_sparsity,
    resolve_head,
    resolve_layer,
    sae_dir_of,
    warn_if_encoder_zero,
)
from .sae import CONCATENATED, SAE
from ..errors import InputError, InputTypeError

SUPPORTED_ARCHITECTURES = ("standard",)


def is_saelens6_cfg(cfg: Mapping[str, Any]) -> bool:
    """6.x configs carry ``architecture`` and a ``metadata`` block."""
    return "architecture" in cfg or isinstance(cfg.get("metadata"), dict)


def load_saelens6(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens 6.x SAE directory (standard architecture; the folder or its ``cfg.json`` /
    ``sae_weights.safetensors``) without unpickling anything.

    A folder saved from a bare ``StandardSAE`` (no ``metadata.hook_name`` / ``model_name``) loads with the hook,
    layer, head and model unknown (``None``); give them with ``SAE.with_hook(...)`` where they are needed."""
    path = sae_dir_of(path)
    cfg_path, weights_path = path / CFG_NAME, path / WEIGHTS_NAME
    cfg = read_json(cfg_path, "SAELens config")
    if not is_saelens6_cfg(cfg):
        raise CheckpointError(f"{cfg_path} is not a SAELens 6 config (no 'architecture' and no 'metadata' block)")
    _check_architecture(cfg.get("architecture", "standard"), cfg_path)
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: metadata must be a JSON object, got {type(meta).__name__}")
    d_in = config_int(cfg, "d_in", cfg_path)
    d_sae = config_int(cfg, "d_sae", cfg_path)
    dtype = parse_dtype(cfg.get("dtype", "float32"), cfg_path)
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise CheckpointError(f"{cfg_path}: apply_b_dec_to_input must be a bool, got {apply_b_dec!r}")
    tensors = read_safetensors(weights_path, "SAELens weights", device=device)
    check_sae_tensors(tensors, weights_path, d_in=d_in, d_sae=d_sae, dtype=dtype)
    log_sparsity = read_sparsity(path / SPARSITY_NAME, d_sae, "SAELens sparsity", device=device)
    files = [str(cfg_path), str(weights_path)] + ([str(path / SPARSITY_NAME)] if log_sparsity is not None else [])
    return _build(
        weights={k: tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
        apply_b_dec=apply_b_dec,
        normalize=cfg.get("normalize_activations", "none"),
        reshape=cfg.get("reshape_activations", "none"),
        meta=meta,
        where=cfg_path,
        provenance={"format": "saelens6", "source": str(path), "files": files, "cfg": cfg,
                    "model_from_pretrained_kwargs": _model_kwargs(cfg, meta, cfg_path)},
        log_sparsity=log_sparsity,
    )


def _model_kwargs(cfg: Mapping[str, Any], meta: Mapping[str, Any], where: Any) -> dict[str, Any] | None:
    """``model_from_pretrained_kwargs`` from the ``metadata`` block (SAELens 6) or the top level (SAELens 3-5)."""
    if meta.get("model_from_pretrained_kwargs") is not None:
        return config_kwargs(meta, "model_from_pretrained_kwargs", where, "metadata.model_from_pretrained_kwargs")
    return config_kwargs(cfg, "model_from_pretrained_kwargs", where)


def _check_architecture(architecture: Any, where: Any) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"{where}: architecture {architecture!r} is not supported (only {list(SUPPORTED_ARCHITECTURES)}: a "
            "ReLU SAE whose features are rows of W_dec); TopK / JumpReLU / gated SAEs need their own loader"
        )


def _build(
    *,
    weights: Mapping[str, Tensor],
    apply_b_dec: bool,
    normalize: Any,
    reshape: Any,
    meta: Mapping[str, Any],
    where: Any,
    provenance: dict[str, Any],
    log_sparsity: Tensor | None,
) -> SAE:
    """The :class:`SAE` from a SAELens 6 config's pieces; unknown hook / model stay ``None``."""
    if normalize not in ("none", "expected_average_only_in", None):
        raise UnsupportedCheckpointError(
            f"{where}: normalize_activations={normalize!r} is an input-dependent transform that a fixed linear "
            "SAE cannot represent"
        )
    if reshape not in ("none", "hook_z", None):
        raise CheckpointError(f"{where}: unknown reshape_activations {reshape!r}")
    hook_name = optional_str(meta, "hook_name", where, "metadata.hook_name")
    model_name = optional_str(meta, "model_name", where, "metadata.model_name")
    layer = resolve_layer(meta.get("hook_layer"), hook_name, where, "metadata.hook_layer")
    head = resolve_head(meta.get("hook_head_index"), hook_name, where, "metadata.hook_head_index")
    needs_scale = normalize == "expected_average_only_in"
    provenance = {
        **provenance,
        "reshape_activations": reshape or "none",
        "normalize_activations": normalize or "none",
        "needs_input_scale": needs_scale,
    }
    if hook_name is None:
        provenance["hook_note"] = (
            "the checkpoint names no hook (saved without metadata): hook_name, layer and head are unknown; "
            "set them with SAE.with_hook(...)"
        )
    if reshape == "hook_z":
        provenance["reshape_note"] = (
            "SAELens would flatten (..., n_heads, d_head) inputs; this SAE reads (..., d_in) vectors directly"
            + (" (one head's z)" if isinstance(head, int) else " (z flattened head-major)")
        )
    try:
        return SAE(
            **weights,
            apply_b_dec_to_input=apply_b_dec,
            hook_name=hook_name,
            layer=layer,
            head=head,
            model_name=model_name,
            provenance=provenance,
            log_sparsity=log_sparsity,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err


def from_saelens(sae_lens_sae: Any, *, provenance: Mapping[str, Any] | None = None, log_sparsity: Tensor | None = None) -> SAE:
    """Copy a ``sae_lens.SAE`` (standard architecture) into a :class:`SAE`; the original is not modified."""
    cfg = sae_lens_sae.cfg
    architecture = cfg.architecture()
    _check_architecture(architecture, f"sae_lens SAE {type(sae_lens_sae).__name__}")
    meta = cfg.metadata.to_dict() if hasattr(cfg.metadata, "to_dict") else dict(cfg.metadata)
    weights = {k: getattr(sae_lens_sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    extra = getattr(sae_lens_sae, "finetuning_scaling_factor", None)
    if isinstance(extra, Tensor):
        raise UnsupportedCheckpointError("sae_lens SAE has a finetuning_scaling_factor; fold it before converting")
    where = f"sae_lens SAE ({meta.get('hook_name')})"
    cfg_dict = cfg.to_dict()
    if all(bool(torch.isfinite(w).all()) for w in weights.values()):  # NaN / Inf are refused by name in _build
        warn_if_encoder_zero(weights["W_enc"], weights["b_enc"], where)
    return _build(
        weights=weights,
        apply_b_dec=bool(cfg.apply_b_dec_to_input),
        normalize=cfg.normalize_activations,
        reshape=cfg.reshape_activations,
        meta=meta,
        where=where,
        provenance={"format": "saelens6", "cfg": cfg_dict,
                    "model_from_pretrained_kwargs": _model_kwargs(cfg_dict, meta, where), **dict(provenance or {})},
        log_sparsity=log_sparsity,
    )


def save_saelens6(
    sae: SAE,
    directory: str | Path,
    *,
    reshape_activations: str | None = None,
    normalize_activations: str | None = None,
    metadata_extra: Mapping[str, Any] | None = None,
    sparsity: Tensor | None = None,
) -> Path:
    """Write ``sae`` as a SAELens 6.x directory (``cfg.json``, ``sae_weights.safetensors``, optional
    ``sparsity.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads. Returns the directory.

    ``reshape_activations`` defaults to ``"hook_z"`` for a concatenated ``hook_z`` SAE (as SAELens writes it)
    and ``"none"`` otherwise; ``normalize_activations`` defaults to ``"expected_average_only_in"`` when the SAE
    still needs an input scale, else ``"none"``.
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
    names = {v: k for k, v in DTYPE_NAMES.items() if not k.startswith("torch.")}
    if reshape_activations is None:
        is_hook_z = sae.hook_name is not None and "hook_z" in sae.hook_name
        reshape_activations = "hook_z" if sae.head == CONCATENATED and is_hook_z else "none"
    if reshape_activations not in ("none", "hook_z"):
        raise InputError(f"reshape_activations must be 'none' or 'hook_z', got {reshape_activations!r}")
    if normalize_activations is None:
        normalize_activations = "expected_average_only_in" if sae.needs_input_scale else "none"
    try:
        version = importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        version = "6.0.0"
    meta: dict[str, Any] = {"sae_lens_version": version, "sae_lens_training_version": version}
    if sae.hook_name is not None:  # an SAE whose hook is unknown is written as a bare StandardSAE writes itself
        meta.update({
            "model_name": sae.model_name,
            "hook_name": sae.hook_name,
            "hook_head_index": sae.head if isinstance(sae.head, int) else None,
            "prepend_bos": True,
            "context_size": 128,
            "dataset_path": None,
            "model_from_pretrained_kwargs": {},
        })
    meta.update(dict(metadata_extra or {}))
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": names[sae.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": reshape_activations,
        "metadata": meta,
        "architecture": "standard",
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: getattr(sae, k).detach().cpu().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(weights, str(directory / WEIGHTS_NAME))
    (directory / CFG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    sparsity = sae.log_sparsity if sparsity is None else sparsity
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().cpu().float().contiguous()}, str(directory / SPARSITY_NAME))
    return directory
