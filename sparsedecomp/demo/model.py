"""The demo transformer: gelu-2l's architecture scaled down, trained from scratch, saved in fp16.

The checkpoint holds the *unprocessed* HookedTransformer state dict (as a hub checkpoint would); loading builds a
``HookedTransformer`` from the recorded config and applies the recorded TransformerLens weight-processing flags
(fold_ln, center_writing_weights, center_unembed, fold_value_biases), which change ``hook_z`` (value biases move
into ``b_O``). SAEs are trained on the model exactly as :func:`load_model` returns it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_config_dict(cfg) -> dict:
    """``HookedTransformerConfig`` keyword arguments for a :class:`~sparsedecomp.demo.config.DemoConfig`."""
    return {
        "model_name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.vocab_size,
        "n_ctx": cfg.n_ctx,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "attn_only": False,
        "original_architecture": "GPT2LMHeadModel",
        "default_prepend_bos": True,
        "seed": cfg.seed,
    }


def build_model(config_kwargs: dict):
    """A freshly initialised ``HookedTransformer`` (no tokenizer attached: training contexts are token ids; the
    saved folder carries the tokenizer, attached on load)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**config_kwargs, device="cpu"))


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def repeat_half(batch: Tensor) -> Tensor:
    """``[BOS] + x + x`` (truncated to ``n_ctx``) with ``x`` the first half of each context's text: a copy of real
    text within the context, the signal that makes a 2-layer model grow induction heads quickly."""
    n_ctx = batch.shape[1]
    half = n_ctx // 2
    x = batch[:, 1 : 1 + half]
    return torch.cat([batch[:, :1], x, x[:, : n_ctx - 1 - half]], dim=1)


def train_model(model, tokens: Tensor, *, steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float,
                seed: int, repeat_fraction: float = 0.0, log: Callable[[str], None] = print) -> list[float]:
    """AdamW on next-token cross-entropy over shuffled ``tokens`` contexts (epochs re-shuffle). Returns losses.

    A ``repeat_fraction`` of every batch is replaced by :func:`repeat_half` copies of its contexts, so that the
    layer-1 heads (the ones the SAEs read) learn in-context copying within a CPU-sized training budget.
    """
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )
    order = torch.randperm(len(tokens), generator=gen)
    cursor, losses, start = 0, [], time.time()
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(tokens), generator=gen), 0
        batch = tokens[order[cursor : cursor + batch_size]]
        cursor += batch_size
        n_rep = int(round(repeat_fraction * batch_size))
        if n_rep:
            batch = torch.cat([repeat_half(batch[:n_rep]), batch[n_rep:]])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, lr)
        with torch.enable_grad():
            loss = model(batch, return_type="loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"  model step {step + 1}/{steps} loss {recent:.3f} ({time.time() - start:.0f}s)")
    model.eval()
    return losses


def save_model(model, directory: Path, config_kwargs: dict, processing_flags: dict, extra: dict | None = None) -> None:
    """Write the unprocessed state dict in fp16 (``model.safetensors``) and ``config.json`` (the
    ``HookedTransformerConfig`` kwargs, the processing flags to load with, and ``extra``)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith((".IGNORE", ".mask"))}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "dtype": "float16"})
    meta = {"hooked_transformer_config": config_kwargs, "processing_flags": processing_flags,
            "weights_dtype": "float16", **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_model_config(directory: Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_model(directory: Path, tokenizer: Path | None = None):
    """``(model, processing_flags)``: the fp16 checkpoint cast to fp32, processed with the recorded flags (through
    :func:`sparsedecomp.loading.load_model`, which reads any local model folder in this layout and attaches the
    tokenizer in it, or ``tokenizer``)."""
    from ..loading import load_model as load_model_folder

    loaded = load_model_folder(Path(directory), flags=None, tokenizer=tokenizer)
    loaded.model.eval()
    return loaded.model, loaded.flags.as_kwargs()
