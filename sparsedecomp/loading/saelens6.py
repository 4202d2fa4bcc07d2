"""SAELens 6.x SAE folders and SAELens's own SAE objects, for every inference architecture this package represents.

A 6.x directory holds ``cfg.json`` (``d_in, d_sae, dtype, apply_b_dec_to_input, normalize_activations,
reshape_activations, architecture`` and a ``metadata`` block with ``model_name, hook_name, hook_head_index, ...``),
``sae_weights.safetensors`` and optionally ``sparsity.safetensors``. Folders are read by SAELens itself
(``sae_lens.SAE.load_from_disk``: safetensors and JSON, nothing unpickled) after the config and the weights file's
header are checked here, so a bad file is refused by name before SAELens fails deep inside; the SAELens object is
then converted by :func:`from_saelens`.

Architectures (:data:`SUPPORTED_ARCHITECTURES`; see :mod:`~sparsedecomp.loading.activation_rules` for the maths):
``standard`` (ReLU), ``jumprelu`` (also what SAELens's BatchTopK and Matryoshka BatchTopK trainers save for
inference), ``topk`` (with ``rescale_acts_by_decoder_norm`` the decoder norms are folded into the encoder, as
SAELens's own ``fold_W_dec_norm`` does, which leaves ``encode`` unchanged) and ``gated``. Transcoders, temporal,
matching-pursuit and AbsTopK SAEs are refused by name (:data:`UNREPRESENTABLE`).

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

from .activation_rules import ActivationRule, Gated, JumpReLU, ReLU, TopK
from .errors import CheckpointError, UnsupportedCheckpointError
from .files import (
    CFG_NAME,
    DTYPE_NAMES,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    check_sae_layout,
    config_int,
    config_kwargs,
    optional_str,
    parse_dtype,
    read_json,
    read_safetensors,
    read_safetensors_layout,
    read_sparsity,
    resolve_head,
    resolve_layer,
    sae_dir_of,
    warn_if_encoder_zero,
)
from .sae import CONCATENATED, SAE
from ..errors import InputError, InputTypeError

SUPPORTED_ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
UNREPRESENTABLE = {
    "transcoder": "a transcoder (it reads one hook and writes another, so its decoder rows do not live in the space "
                  "it reads)",
    "skip_transcoder": "a skip transcoder (it reads one hook and writes another, plus a linear skip path)",
    "jumprelu_transcoder": "a JumpReLU transcoder (it reads one hook and writes another)",
    "jumprelu_skip_transcoder": "a JumpReLU skip transcoder (it reads one hook and writes another)",
    "temporal": "a temporal SAE (its code at a token depends on earlier tokens, not on the token's activation alone)",
    "matching_pursuit": "a matching-pursuit SAE (its encoder is an iterative pursuit, not one linear map and a rule)",
    "abstopk": "an AbsTopK SAE (it keeps the k largest |pre-activations| with their signs: activations can be "
               "negative)",
    "batchtopk": "a BatchTopK *training* checkpoint (its k is per batch, not per token): save it for inference "
                 "with SAELens's save_inference_model, which writes it as a JumpReLU SAE",
    "matryoshka_batchtopk": "a Matryoshka BatchTopK *training* checkpoint: save it for inference with SAELens's "
                            "save_inference_model, which writes it as a JumpReLU SAE",
}
"""Architectures refused, with what each is (why its features are not rows of a decoder read back in the same space
through one linear encoder and a per-token firing rule)."""

# The weights of each architecture as SAELens saves them (beyond W_dec (d_sae, d_in) and b_dec (d_in,)).
_ENCODER_KEYS = {
    "standard": {"W_enc": "io", "b_enc": "s"},
    "topk": {"W_enc": "io", "b_enc": "s"},
    "jumprelu": {"W_enc": "io", "b_enc": "s", "threshold": "s"},
    "gated": {"W_enc": "io", "b_gate": "s", "b_mag": "s", "r_mag": "s"},
}


def is_saelens6_cfg(cfg: Mapping[str, Any]) -> bool:
    """6.x configs carry ``architecture`` and a ``metadata`` block."""
    return "architecture" in cfg or isinstance(cfg.get("metadata"), dict)


def load_saelens6(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens 6.x SAE directory (the folder or its ``cfg.json`` / ``sae_weights.safetensors``) of any
    supported architecture, through ``sae_lens.SAE.load_from_disk``.

    A folder saved from a bare SAELens SAE (no ``metadata.hook_name`` / ``model_name``) loads with the hook,
    layer, head and model unknown (``None``); give them with ``SAE.with_hook(...)`` where they are needed."""
    from sae_lens import SAE as LensSAE

    path = sae_dir_of(path)
    cfg_path, weights_path = path / CFG_NAME, path / WEIGHTS_NAME
    cfg = read_json(cfg_path, "SAELens config")
    if not is_saelens6_cfg(cfg):
        raise CheckpointError(f"{cfg_path} is not a SAELens 6 config (no 'architecture' and no 'metadata' block)")
    architecture = cfg.get("architecture", "standard")
    _check_architecture(architecture, cfg_path)
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: metadata must be a JSON object, got {type(meta).__name__}")
    d_in = config_int(cfg, "d_in", cfg_path)
    d_sae = config_int(cfg, "d_sae", cfg_path)
    dtype = parse_dtype(cfg.get("dtype", "float32"), cfg_path)
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise CheckpointError(f"{cfg_path}: apply_b_dec_to_input must be a bool, got {apply_b_dec!r}")
    _check_normalization(cfg.get("normalize_activations", "none"), cfg_path)
    # The header is checked here (keys, shapes, dtypes: no data read) so that a bad file is named before SAELens
    # reads it; SAELens then reads the data itself.
    shapes = {"io": (d_in, d_sae), "s": (d_sae,)}
    expected = {k: shapes[kind] for k, kind in _ENCODER_KEYS[architecture].items()}
    expected.update({"W_dec": (d_sae, d_in), "b_dec": (d_in,)})
    check_sae_layout(read_safetensors_layout(weights_path, "SAELens weights"), weights_path, expected=expected,
                     dtype=dtype, sizes=f"d_in={d_in}, d_sae={d_sae}", architecture=architecture)
    try:
        lens_sae = LensSAE.load_from_disk(str(path), device=str(device))
    except Exception as err:  # SAELens raises ValueError / RuntimeError / SafetensorError; name the file
        read_safetensors(weights_path, "SAELens weights")  # a truncated file is named as such
        raise CheckpointError(f"SAELens could not load {path}: {_first_line(err)}") from err
    log_sparsity = read_sparsity(path / SPARSITY_NAME, d_sae, "SAELens sparsity", device=device)
    files = [str(cfg_path), str(weights_path)] + ([str(path / SPARSITY_NAME)] if log_sparsity is not None else [])
    return from_saelens(lens_sae, provenance={"format": "saelens6", "source": str(path), "files": files},
                        log_sparsity=log_sparsity, copy=False, where=cfg_path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _model_kwargs(cfg: Mapping[str, Any], meta: Mapping[str, Any], where: Any) -> dict[str, Any] | None:
    """``model_from_pretrained_kwargs`` from the ``metadata`` block (SAELens 6) or the top level (SAELens 3-5), with
    every processing flag made explicit (``None`` when none is recorded).

    SAELens loads the model it trains on with ``HookedTransformer.from_pretrained_no_processing(**kwargs)``
    (``sae_lens.load_model``; SAELens's own warning says to load it so for inference), so a flag the kwargs do not
    name is *off*, not ``from_pretrained``'s default: ``{}`` means the unprocessed model. Written out in full, the
    kwargs mean the same whichever loader reads them."""
    from .models import ProcessingFlags

    if meta.get("model_from_pretrained_kwargs") is not None:
        recorded = config_kwargs(meta, "model_from_pretrained_kwargs", where, "metadata.model_from_pretrained_kwargs")
    else:
        recorded = config_kwargs(cfg, "model_from_pretrained_kwargs", where)
    return None if recorded is None else {**ProcessingFlags.none().as_kwargs(), **recorded}


def _check_architecture(architecture: Any, where: Any) -> None:
    if architecture in SUPPORTED_ARCHITECTURES:
        return
    if architecture in UNREPRESENTABLE:
        raise UnsupportedCheckpointError(f"{where}: architecture {architecture!r} is {UNREPRESENTABLE[architecture]}; "
                                         f"this package represents {list(SUPPORTED_ARCHITECTURES)}")
    raise UnsupportedCheckpointError(
        f"{where}: architecture {architecture!r} is not supported (only {list(SUPPORTED_ARCHITECTURES)}: SAEs whose "
        "features are rows of W_dec, read through one linear encoder and a per-token firing rule)"
    )


def _check_normalization(normalize: Any, where: Any) -> None:
    if normalize not in ("none", "expected_average_only_in", None):
        raise UnsupportedCheckpointError(
            f"{where}: normalize_activations={normalize!r} is an input-dependent transform that a fixed linear "
            "SAE cannot represent"
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
    activation: ActivationRule,
) -> SAE:
    """The :class:`SAE` from a SAELens 6 config's pieces; unknown hook / model stay ``None``."""
    _check_normalization(normalize, where)
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
            activation=activation,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err


def from_saelens(sae_lens_sae: Any, *, provenance: Mapping[str, Any] | None = None,
                 log_sparsity: Tensor | None = None, copy: bool = True, where: Any = None) -> SAE:
    """Convert a ``sae_lens.SAE`` of a supported architecture into a :class:`SAE` with the same ``encode``; the
    original is not modified (``copy=False`` shares its tensors: for an object the caller drops)."""
    cfg = sae_lens_sae.cfg
    architecture = cfg.architecture()
    meta = cfg.metadata.to_dict() if hasattr(cfg.metadata, "to_dict") else dict(cfg.metadata)
    where = where or f"sae_lens SAE {type(sae_lens_sae).__name__} ({meta.get('hook_name')})"
    _check_architecture(architecture, where)
    take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    extra = getattr(sae_lens_sae, "finetuning_scaling_factor", None)
    if isinstance(extra, Tensor):
        raise UnsupportedCheckpointError(f"{where}: has a finetuning_scaling_factor; fold it before converting")
    W_dec, b_dec = take(sae_lens_sae.W_dec), take(sae_lens_sae.b_dec)
    notes: list[str] = []
    activation: ActivationRule
    if architecture == "gated":
        # SAELens's GatedSAE.encode: gate (x' @ W_enc + b_gate > 0) times relu(x' @ (W_enc * exp(r_mag)) + b_mag).
        W_gate, r_mag = take(sae_lens_sae.W_enc), take(sae_lens_sae.r_mag)
        W_enc, b_enc = W_gate * r_mag.exp(), take(sae_lens_sae.b_mag)
        activation = Gated(W_gate, take(sae_lens_sae.b_gate), r_mag)
    else:
        W_enc, b_enc = take(sae_lens_sae.W_enc), take(sae_lens_sae.b_enc)
        if architecture == "jumprelu":
            activation = JumpReLU(take(sae_lens_sae.threshold))
        elif architecture == "topk":
            activation = TopK(int(cfg.k))
            if getattr(cfg, "rescale_acts_by_decoder_norm", False):
                # encode = topk((x' @ W_enc + b_enc) * n) with n = ||W_dec rows||, decode = f @ (W_dec / n) + b_dec:
                # folding n into the encoder (as SAELens's fold_W_dec_norm) gives the same encode and decode.
                norms = sae_lens_sae.W_dec.detach().norm(dim=-1).clamp(min=1e-8)
                W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
                notes.append("folded decoder norms into the encoder (rescale_acts_by_decoder_norm)")
        else:
            activation = ReLU()
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg_dict = cfg.to_dict()
    if all(bool(torch.isfinite(w).all()) for w in weights.values()):  # NaN / Inf are refused by name in _build
        warn_if_encoder_zero(weights["W_enc"], weights["b_enc"], where)
    sae = _build(
        weights=weights,
        apply_b_dec=bool(cfg.apply_b_dec_to_input),
        normalize=cfg.normalize_activations,
        reshape=cfg.reshape_activations,
        meta=meta,
        where=where,
        provenance={"format": "saelens6", "cfg": cfg_dict, "architecture": architecture,
                    "model_from_pretrained_kwargs": _model_kwargs(cfg_dict, meta, where), **dict(provenance or {})},
        log_sparsity=log_sparsity,
        activation=activation,
    )
    return sae._derive(notes[0]) if notes else sae


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
    ``sparsity.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads, with the architecture of its firing rule
    (``standard``, ``jumprelu``, ``topk`` or ``gated``). Returns the directory.

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
        })
        if sae.model_from_pretrained_kwargs is not None:  # unknown stays unknown (SAELens reads {} as unprocessed)
            meta["model_from_pretrained_kwargs"] = sae.model_from_pretrained_kwargs
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
    weights = {k: getattr(sae, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    rule = sae.activation
    if isinstance(rule, JumpReLU):
        cfg["architecture"], weights["threshold"] = "jumprelu", rule.threshold
    elif isinstance(rule, TopK):
        cfg.update(architecture="topk", k=rule.k, rescale_acts_by_decoder_norm=False)
    elif isinstance(rule, Gated):  # SAELens's names: W_enc is the gate's, the magnitude path is W_enc * exp(r_mag)
        cfg["architecture"] = "gated"
        weights = {"W_enc": rule.W_gate, "b_gate": rule.b_gate, "r_mag": rule.r_mag, "b_mag": sae.b_enc,
                   "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / WEIGHTS_NAME))
    (directory / CFG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    sparsity = sae.log_sparsity if sparsity is None else sparsity
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().cpu().float().contiguous()}, str(directory / SPARSITY_NAME))
    return directory
