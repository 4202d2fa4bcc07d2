"""Legacy SAELens (1.4 - 2.1.3) training checkpoints, as loaded by the seed notebook.

Layout::

    checkpoints/<wandb_id>/final_<n_tokens>/          (or <n_tokens>/ for intermediate checkpoints)
        training_run_state.pkl                        pickle: never opened here
        activation_store.safetensors                  buffer state: not needed
        <sae_name>/                                   f"{model_name}_{hook_point}_{d_sae}_"
            cfg.json
            sae_weights.safetensors                   W_enc, b_enc, W_dec, b_dec, scaling_factor
            sparsity.safetensors                      {"sparsity": log10(firing frequency + 1e-10)}
            ctx.safetensors                           a pickle despite its name: never opened here

Maths: ``encode(x) = relu((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)``,
``decode(f) = (f * scaling_factor) @ W_dec + b_dec``; the scaling factor is folded into ``W_dec`` at load.

With ``normalize_activations: true`` the SAE was trained on ``s * x`` with ``s = sqrt(d_in) / E||x||``, and ``s``
was never saved: the loaded SAE says ``needs_input_scale`` until a re-estimated scale is folded in
(``sparsedecomp.loading.scaling``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError, CheckpointNotFoundError
from .files import (
    CFG_NAME,
    DTYPE_NAMES,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    check_sae_tensors,
    config_int,
    config_str,
    is_sae_dir,
    parse_dtype,
    read_json,
    read_safetensors,
    read_sparsity,
    resolve_head,
    resolve_layer,
    sae_dir_of,
)
from .sae import SAE, fold_legacy_scaling_factor
from ..errors import InputError, InputTypeError

# Files a legacy tree holds that must never be read (both are pickles).
NEVER_OPEN = ("training_run_state.pkl", "ctx.safetensors")
DEFAULT_SAE_LENS_VERSION = "2.1.3"

_CHECKPOINT = re.compile(r"^(final_)?(\d+)$")


def is_legacy_cfg(cfg: Mapping[str, Any]) -> bool:
    """Legacy (< 3.0) configs name the hook ``hook_point`` and have no ``architecture`` / ``metadata``."""
    return "hook_point" in cfg and "architecture" not in cfg and "metadata" not in cfg


def list_checkpoints(run_dir: str | Path) -> list[tuple[bool, int, Path]]:
    """The checkpoint folders of a run as ``(is_final, n_tokens, path)``, in the order they were written."""
    run_dir = Path(run_dir)
    found = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if child.is_dir() and match:
            found.append((match.group(1) is not None, int(match.group(2)), child))
    return sorted(found, key=lambda t: (t[1], t[0]))


def choose_checkpoint(run_dir: str | Path) -> tuple[Path, str]:
    """The final checkpoint of a run: the ``final_<n>`` folder with the largest ``n`` if there is one, else the
    ``<n>`` folder with the largest ``n``. Returns the folder and a sentence saying which and why."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointNotFoundError(f"{run_dir} holds no checkpoint folders named final_<n_tokens> or <n_tokens>")
    finals = [c for c in checkpoints if c[0]]
    chosen = max(finals or checkpoints, key=lambda c: c[1])
    names = [c[2].name for c in checkpoints]
    rule = "the final_ checkpoint with most tokens" if finals else "no final_ checkpoint; the one with most tokens"
    return chosen[2], f"chose {chosen[2].name} ({rule}) among {names}"


def find_legacy_sae_dir(path: str | Path, *, sae_name: str | None = None) -> tuple[Path, str | None]:
    """Resolve ``path`` (the SAE folder or its ``cfg.json`` / ``sae_weights.safetensors``, a checkpoint folder, or
    the run folder ``<wandb_id>/``) to the SAE folder.

    Returns the folder and, when a checkpoint had to be chosen, a sentence saying which. Only directory names
    are inspected here; no file is opened.
    """
    path = sae_dir_of(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"legacy SAELens checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} must be a directory (the SAE folder, a checkpoint folder or a run folder) or the SAE folder's "
            f"{CFG_NAME} / {WEIGHTS_NAME}"
        )
    if is_sae_dir(path):
        return path, None
    choice = None
    checkpoint = path
    if not _sae_children(path) and list_checkpoints(path):
        checkpoint, choice = choose_checkpoint(path)
    children = _sae_children(checkpoint)
    if sae_name is not None:
        if not is_sae_dir(checkpoint / sae_name):
            raise CheckpointNotFoundError(
                f"{checkpoint} has no SAE folder {sae_name!r} (it has {[c.name for c in children]})"
            )
        return checkpoint / sae_name, choice
    if not children:
        raise CheckpointError(
            f"{checkpoint} is not a legacy SAELens SAE folder, checkpoint folder or run folder "
            f"(no {CFG_NAME} + {WEIGHTS_NAME}, no <sae_name>/ sub-folder, no final_<n>/ checkpoints)"
        )
    if len(children) > 1:
        raise CheckpointError(f"{checkpoint} holds several SAEs {[c.name for c in children]}: pass sae_name=")
    return children[0], choice


def _sae_children(path: Path) -> list[Path]:
    return sorted(c for c in path.iterdir() if c.is_dir() and is_sae_dir(c))


def load_legacy_saelens(
    path: str | Path,
    *,
    sae_name: str | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """Load a legacy SAELens SAE from its folder or any parent (see :func:`find_legacy_sae_dir`).

    Reads only ``cfg.json``, ``sae_weights.safetensors`` and, if present, ``sparsity.safetensors``.
    """
    sae_dir, choice = find_legacy_sae_dir(path, sae_name=sae_name)
    cfg_path, weights_path = sae_dir / CFG_NAME, sae_dir / WEIGHTS_NAME
    cfg = read_json(cfg_path, "legacy SAELens config")
    if not is_legacy_cfg(cfg):
        raise CheckpointError(
            f"{cfg_path} is not a legacy (SAELens < 3) config: it has no 'hook_point' key or has "
            "'architecture'/'metadata' (load it with the saelens6 loader)"
        )
    hook_name = config_str(cfg, "hook_point", cfg_path)
    d_in = config_int(cfg, "d_in", cfg_path)
    if "d_sae" in cfg and cfg["d_sae"] is not None:
        d_sae = config_int(cfg, "d_sae", cfg_path)
    else:
        d_sae = d_in * config_int(cfg, "expansion_factor", cfg_path)
    dtype = None if cfg.get("dtype") is None else parse_dtype(cfg["dtype"], cfg_path)
    layer = resolve_layer(cfg.get("hook_point_layer"), hook_name, cfg_path, "hook_point_layer")
    head = resolve_head(cfg.get("hook_point_head_index"), hook_name, cfg_path, "hook_point_head_index")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise CheckpointError(f"{cfg_path}: apply_b_dec_to_input must be a bool, got {apply_b_dec!r}")
    normalize = cfg.get("normalize_activations", False)
    needs_scale = normalize is True or normalize == "expected_average_only_in"
    if normalize not in (True, False, None, "none", "expected_average_only_in"):
        raise CheckpointError(f"{cfg_path}: unsupported normalize_activations {normalize!r}")

    tensors = read_safetensors(weights_path, "legacy SAELens weights", device=device)
    check_sae_tensors(tensors, weights_path, d_in=d_in, d_sae=d_sae, dtype=dtype, optional={"scaling_factor": (d_sae,)})
    W_dec, note = tensors["W_dec"], None
    if "scaling_factor" in tensors:
        W_dec, note = fold_legacy_scaling_factor(W_dec, tensors["scaling_factor"])

    log_sparsity = read_sparsity(sae_dir / SPARSITY_NAME, d_sae, "legacy SAELens sparsity", device=device)
    provenance: dict[str, Any] = {
        "format": "saelens_legacy",
        "source": str(sae_dir),
        "files": [str(cfg_path), str(weights_path)] + ([str(sae_dir / SPARSITY_NAME)] if log_sparsity is not None else []),
        "checkpoint": sae_dir.parent.name,
        "checkpoint_choice": choice,
        "run": sae_dir.parent.parent.name,
        "sae_name": sae_dir.name,
        "cfg": cfg,
        "normalize_activations": normalize,
        "needs_input_scale": needs_scale,
    }
    if needs_scale:
        provenance["input_scale_note"] = (
            "trained on inputs scaled by s = sqrt(d_in) / E||x||; s was not saved. Re-estimate it on the same "
            "model, data, context size and BOS setting (sparsedecomp.loading.scaling) and fold it before use."
        )
    return SAE(
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=W_dec,
        b_dec=tensors["b_dec"],
        apply_b_dec_to_input=apply_b_dec,
        hook_name=hook_name,
        layer=layer,
        head=head,
        model_name=config_str(cfg, "model_name", cfg_path),
        provenance=provenance,
        transformations=(note,) if note else (),
        log_sparsity=log_sparsity,
    )


def legacy_sae_name(sae: SAE) -> str:
    """SAELens 2.x's folder name ``f"{model_name}_{hook_point}_{d_sae}_"`` (``/`` in the model name becomes ``_``)."""
    hook_name, _ = sae.require_hook("writing a legacy SAELens folder")
    return f"{(sae.model_name or 'unknown').replace('/', '_')}_{hook_name}_{sae.d_sae}_"


def save_legacy_saelens(
    sae: SAE,
    root: str | Path,
    wandb_id: str,
    n_tokens: int,
    *,
    cfg_extra: Mapping[str, Any] | None = None,
    sparsity: Tensor | None = None,
    final: bool = True,
) -> Path:
    """Write ``sae`` as ``root/<wandb_id>/final_<n_tokens>/<sae_name>/`` (``<n_tokens>/`` if ``final=False``)
    with ``cfg.json``, ``sae_weights.safetensors`` (incl. an all-ones ``scaling_factor``) and, if ``sparsity``
    (or ``sae.log_sparsity``) is given, ``sparsity.safetensors``. Returns the SAE folder.

    ``normalize_activations`` defaults to ``sae.needs_input_scale``; pass ``cfg_extra={"normalize_activations":
    True}`` for weights trained on scaled inputs. Pickled training state is not written.
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise InputError(f"n_tokens must be a non-negative int, got {n_tokens!r}")
    if not isinstance(wandb_id, str) or not wandb_id or "/" in wandb_id:
        raise InputError(f"wandb_id must be a non-empty folder name, got {wandb_id!r}")
    clash = sorted(set(cfg_extra or {}) & {"d_in", "d_sae", "dtype", "hook_point"})
    if clash:
        raise InputError(f"cfg_extra may not override {clash}: they are determined by the SAE")
    hook_name, layer = sae.require_hook("writing a legacy SAELens folder")
    if sae.model_name is None:
        raise InputError("the legacy SAELens format records model_name; this SAE's is unknown")
    dtype_name = str(sae.dtype)
    if dtype_name not in DTYPE_NAMES:
        raise InputError(f"cannot write dtype {sae.dtype} in the legacy format")
    checkpoint = Path(root) / wandb_id / (f"final_{n_tokens}" if final else str(n_tokens))
    sae_dir = checkpoint / legacy_sae_name(sae)
    sae_dir.mkdir(parents=True, exist_ok=True)
    head_index = sae.head if isinstance(sae.head, int) else None
    cfg: dict[str, Any] = {
        "model_name": sae.model_name,
        "hook_point": hook_name,
        "hook_point_layer": layer,
        "hook_point_head_index": head_index,
        "dataset_path": "NeelNanda/c4-code-tokenized-2b",
        "is_dataset_tokenized": True,
        "context_size": 1024,
        "use_cached_activations": False,
        "cached_activations_path": None,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "b_dec_init_method": "zeros",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "activation_fn": "relu",
        "normalize_sae_decoder": False,
        "noise_scale": 0.0,
        "from_pretrained_path": None,
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "decoder_orthogonal_init": False,
        "decoder_heuristic_init": True,
        "init_encoder_as_decoder_transpose": True,
        "n_batches_in_buffer": 64,
        "training_tokens": n_tokens,
        "finetuning_tokens": 0,
        "store_batch_size_prompts": 16,
        "train_batch_size_tokens": 4096,
        "normalize_activations": bool(sae.needs_input_scale),
        "device": "cpu",
        "act_store_device": "cpu",
        "seed": 42,
        "dtype": dtype_name,
        "prepend_bos": True,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "mse_loss_normalization": None,
        "l1_coefficient": 5.0,
        "lp_norm": 1.0,
        "scale_sparsity_penalty_by_decoder_norm": True,
        "l1_warm_up_steps": 0,
        "lr": 5e-5,
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": 0,
        "lr_end": 5e-6,
        "lr_decay_steps": 0,
        "n_restart_cycles": 1,
        "finetuning_method": None,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "dead_feature_window": 1000,
        "dead_feature_threshold": 1e-8,
        "n_eval_batches": 10,
        "eval_batch_size_prompts": None,
        "log_to_wandb": True,
        "wandb_project": "sparsedecomp",
        "run_name": wandb_id,
        "n_checkpoints": 0,
        "checkpoint_path": str(Path("checkpoints") / wandb_id),
        "verbose": True,
        "model_kwargs": {},
        "model_from_pretrained_kwargs": {},
        "sae_lens_version": DEFAULT_SAE_LENS_VERSION,
        "sae_lens_training_version": DEFAULT_SAE_LENS_VERSION,
        "tokens_per_buffer": 64 * 16 * 1024,
    }
    cfg.update(dict(cfg_extra or {}))
    if not isinstance(cfg["normalize_activations"], bool):
        raise InputError(f"legacy normalize_activations is a bool, got {cfg['normalize_activations']!r}")
    weights = {
        "W_enc": sae.W_enc,
        "b_enc": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
        "scaling_factor": torch.ones(sae.d_sae, dtype=sae.dtype),
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(sae_dir / WEIGHTS_NAME))
    (sae_dir / CFG_NAME).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    sparsity = sae.log_sparsity if sparsity is None else sparsity
    if sparsity is not None:
        if not isinstance(sparsity, Tensor) or tuple(sparsity.shape) != (sae.d_sae,):
            raise InputError(f"sparsity must be a ({sae.d_sae},) tensor of log10 firing frequencies")
        save_file({"sparsity": sparsity.detach().cpu().float().contiguous()}, str(sae_dir / SPARSITY_NAME))
    return sae_dir
