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

A run folder usually holds several checkpoints (intermediate ``<n>/`` and ``final_<n>/``, ``n`` the training tokens
seen): ``step=`` picks one (``n``, or ``"final"``); without it the final one is taken, with a
:class:`CheckpointChoiceWarning` naming the others. The step used is in ``provenance["step"]``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError, CheckpointNotFoundError, UnsupportedCheckpointError
from .files import (
    CFG_NAME,
    DTYPE_NAMES,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    check_sae_tensors,
    config_int,
    config_kwargs,
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
from ..validation import first_indices

# Files a legacy tree holds that must never be read (both are pickles).
NEVER_OPEN = ("training_run_state.pkl", "ctx.safetensors")
DEFAULT_SAE_LENS_VERSION = "2.1.3"

_CHECKPOINT = re.compile(r"^(final_)?(\d+)$")
FINAL = "final"
# Activation functions as legacy configs name them (``activation_fn``; ``activation_fn_str`` from SAELens 3): only
# ReLU is the standard SAE that :class:`SAE` represents.
_ACTIVATION_KEYS = ("activation_fn", "activation_fn_str")


class CheckpointChoiceWarning(UserWarning):
    """A legacy run folder holds several checkpoint steps and none was asked for: the final one was taken."""


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


def choose_checkpoint(run_dir: str | Path, step: int | str | None = None) -> tuple[Path, str]:
    """The checkpoint of a run at ``step`` (see :func:`step_matches`), or without one the final checkpoint: the
    ``final_<n>`` folder with the largest ``n`` if there is one, else the ``<n>`` folder with the largest ``n``.
    Returns the folder and a sentence saying which and why.

    A step that is not there is refused, listing the steps present. Without a step, a run with several
    checkpoints gets a :class:`CheckpointChoiceWarning` naming them and the one taken (the seed loaded an
    intermediate checkpoint of runs that also hold a final one)."""
    from ..decomposition import caller_stacklevel

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointNotFoundError(f"{run_dir} holds no checkpoint folders named final_<n_tokens> or <n_tokens>")
    names = [c[2].name for c in checkpoints]
    if step is not None:
        matches = [c for c in checkpoints if step_matches(step, c[0], c[1])]
        if not matches:
            raise CheckpointNotFoundError(f"{run_dir} has no checkpoint step {step!r}; steps present: {names} (pass "
                                          f"step=<n_tokens> of one of them, or {FINAL!r})")
        if len(matches) > 1 and step != FINAL:
            raise CheckpointError(f"step {step!r} matches several checkpoints of {run_dir}: "
                                  f"{[c[2].name for c in matches]}; pass the folder name")
        chosen = max(matches, key=lambda c: c[1])
        return chosen[2], f"chose {chosen[2].name} (step={step!r} asked for) among {names}"
    finals = [c for c in checkpoints if c[0]]
    chosen = max(finals or checkpoints, key=lambda c: c[1])
    rule = "the final_ checkpoint with most tokens" if finals else "no final_ checkpoint; the one with most tokens"
    if len(checkpoints) > 1:
        warnings.warn(
            f"{run_dir} holds {len(checkpoints)} checkpoint steps {names}; loaded {chosen[2].name} ({rule}): pass "
            f"step=<n_tokens> (e.g. {checkpoints[0][1]}) or step={FINAL!r} to choose",
            CheckpointChoiceWarning,
            stacklevel=caller_stacklevel(),
        )
    return chosen[2], f"chose {chosen[2].name} ({rule}) among {names}"


def step_matches(step: int | str, is_final: bool, n_tokens: int) -> bool:
    """Whether the checkpoint folder ``final_<n_tokens>`` (``is_final``) or ``<n_tokens>`` is the one ``step``
    names: ``"final"`` names every ``final_<n>``, an ``int`` (or its digits) the folders of that many tokens, a
    folder name itself that folder."""
    if step == FINAL:
        return is_final
    if isinstance(step, str):
        match = _CHECKPOINT.match(step)
        if match is None:
            raise InputError(f"step must be a checkpoint's number of training tokens, {FINAL!r}, or a checkpoint "
                             f"folder name (<n> / final_<n>), got {step!r}")
        if match.group(1) is not None:  # a folder name final_<n>: that folder only
            return is_final and int(match.group(2)) == n_tokens
        step = int(match.group(2))
    if isinstance(step, bool) or not isinstance(step, int):
        raise InputTypeError(f"step must be an int (training tokens), {FINAL!r} or a folder name, got "
                             f"{type(step).__name__}")
    return n_tokens == step


def _checkpoint_of(sae_dir: Path) -> tuple[bool, int] | None:
    """``(is_final, n_tokens)`` of the checkpoint folder holding ``sae_dir``, or ``None`` when its name is not one."""
    match = _CHECKPOINT.match(sae_dir.parent.name)
    return None if match is None else (match.group(1) is not None, int(match.group(2)))


def find_legacy_sae_dir(
    path: str | Path, *, sae_name: str | None = None, step: int | str | None = None
) -> tuple[Path, str | None]:
    """Resolve ``path`` (the SAE folder or its ``cfg.json`` / ``sae_weights.safetensors``, a checkpoint folder, or
    the run folder ``<wandb_id>/``) to the SAE folder; ``step`` picks the checkpoint of a run folder (see
    :func:`choose_checkpoint`) and must match the checkpoint of a folder below it.

    Returns the folder and, when a checkpoint had to be chosen, a sentence saying which. Only directory names
    are inspected here; no file is opened.
    """
    sae_dir, choice = _find_legacy_sae_dir(path, sae_name=sae_name, step=step)
    if step is not None and choice is None:
        # Given a folder below the run folder: the step asked for must be the one it is in.
        found = _checkpoint_of(sae_dir)
        if found is None or not step_matches(step, *found):
            raise CheckpointError(f"step={step!r} was asked for, but {sae_dir} is in the checkpoint folder "
                                  f"{sae_dir.parent.name!r}; pass the run folder, or drop step=")
    return sae_dir, choice


def _find_legacy_sae_dir(path: str | Path, *, sae_name: str | None, step: int | str | None) -> tuple[Path, str | None]:
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
        checkpoint, choice = choose_checkpoint(path, step)
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
    step: int | str | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """Load a legacy SAELens SAE from its folder or any parent (see :func:`find_legacy_sae_dir`; ``step`` picks
    the checkpoint of a run folder: its number of training tokens, or ``"final"``).

    Reads only ``cfg.json``, ``sae_weights.safetensors`` and, if present, ``sparsity.safetensors``. Only ReLU SAEs
    are read (another ``activation_fn`` is refused), and every per-feature ``scaling_factor`` must be finite and
    positive. ``provenance["step"]`` is the checkpoint's number of training tokens (``None`` when the folder is not
    named ``<n>`` / ``final_<n>``) and ``provenance["final"]`` whether it is a ``final_`` one.
    """
    sae_dir, choice = find_legacy_sae_dir(path, sae_name=sae_name, step=step)
    cfg_path, weights_path = sae_dir / CFG_NAME, sae_dir / WEIGHTS_NAME
    cfg = read_json(cfg_path, "legacy SAELens config")
    if not is_legacy_cfg(cfg):
        raise CheckpointError(
            f"{cfg_path} is not a legacy (SAELens < 3) config: it has no 'hook_point' key or has "
            "'architecture'/'metadata' (load it with the saelens6 loader)"
        )
    _check_activation(cfg, cfg_path)
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
        _check_scaling_factor(tensors["scaling_factor"], weights_path)
        W_dec, note = fold_legacy_scaling_factor(W_dec, tensors["scaling_factor"])

    log_sparsity = read_sparsity(sae_dir / SPARSITY_NAME, d_sae, "legacy SAELens sparsity", device=device)
    found = _checkpoint_of(sae_dir)
    provenance: dict[str, Any] = {
        "format": "saelens_legacy",
        "source": str(sae_dir),
        "files": [str(cfg_path), str(weights_path)] + ([str(sae_dir / SPARSITY_NAME)] if log_sparsity is not None else []),
        "checkpoint": sae_dir.parent.name,
        "checkpoint_choice": choice,
        "step": None if found is None else found[1],
        "final": None if found is None else found[0],
        "model_from_pretrained_kwargs": config_kwargs(cfg, "model_from_pretrained_kwargs", cfg_path),
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


def _check_activation(cfg: Mapping[str, Any], cfg_path: Path) -> None:
    """Refuse a config whose activation function is not ReLU (``activation_fn: topk`` with
    ``activation_fn_kwargs: {k: ...}``, ``tanh-relu``, ...): read as a ReLU SAE its codes would be silently
    wrong. An absent entry is ReLU (SAELens 1.x wrote none)."""
    for key in _ACTIVATION_KEYS:
        name = cfg.get(key)
        if name not in (None, "relu"):
            kwargs = cfg.get("activation_fn_kwargs") or {}
            detail = f" (activation_fn_kwargs {kwargs})" if kwargs else ""
            raise UnsupportedCheckpointError(
                f"{cfg_path}: {key} {name!r}{detail}; only ReLU (standard) SAEs are supported by this loader"
            )


def _check_scaling_factor(scaling_factor: Tensor, path: Path) -> None:
    """Refuse per-feature factors that are zero or negative (finiteness is checked with every tensor): decode
    multiplies each feature by its factor, so such a feature is silenced or flipped, which SAELens never writes
    (it initialises the factor to one)."""
    bad = scaling_factor <= 0
    if bool(bad.any()):
        raise CheckpointError(
            f"{path}: scaling_factor has {int(bad.sum())} of {scaling_factor.shape[0]} entries <= 0 (first features "
            f"{first_indices(bad)}, min {float(scaling_factor.min()):.4g}); legacy decode multiplies each feature "
            "by it, so it must be positive"
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
    if sae.activation.kind != "relu":
        raise InputError(f"legacy SAELens checkpoints store ReLU SAEs; this SAE is {sae.activation.describe()}: "
                         "write it with save_saelens6")
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
