"""The demo's SAEs, all trained in one pass over layer ``hook_z`` by SAELens's trainer (:mod:`sparsedecomp.training`).

* **Per-head SAEs**: one BatchTopK SAE per head (``k`` active features per token, saved for inference as JumpReLU with
  the threshold SAELens learns), inputs scaled to norm ``sqrt(d_head)`` while training and the scale folded in: the
  folders ``sparsedecomp train-heads`` writes.
* **Concatenated-z SAE**: a SAELens ``standard`` ReLU SAE on all heads' ``z`` side by side, loss
  ``||x - x_hat||^2 + l1 * sum_i f_i ||W_dec[i]||``, with decoder rows then folded to unit norm
  (``f_i ||W_dec[i]||`` and ``W_dec[i] / ||W_dec[i]||``, which leaves the reconstruction unchanged), so that it has
  the shape of Kissane et al.'s SAEs and ships in their file pair.

Both read the same rows in the same order, from one model forward per block of contexts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..training import HeadTrainingSpec, train_layer_saes


def demo_training_specs(cfg) -> tuple[HeadTrainingSpec, HeadTrainingSpec]:
    """The per-head and the concat SAEs' SAELens training settings of a :class:`~sparsedecomp.demo.config.DemoConfig`."""
    steps = -(-cfg.sae_training_tokens // cfg.sae_batch_size)
    shared = dict(training_tokens=cfg.sae_training_tokens, batch_size=cfg.sae_batch_size, lr=cfg.sae_lr,
                  lr_decay_steps=int(cfg.sae_lr_decay_fraction * steps), buffer_batches=cfg.sae_buffer_batches,
                  dead_feature_window=cfg.sae_dead_feature_window, seed=cfg.seed)
    heads = HeadTrainingSpec(cfg.head_architecture, d_sae=cfg.head_expansion * cfg.d_head, k=cfg.head_k, **shared)
    concat = HeadTrainingSpec("standard", d_sae=cfg.concat_d_sae, l1_coefficient=cfg.concat_l1_coefficient, **shared)
    return heads, concat


def train_demo_saes(model: Any, tokens: Tensor, cfg, *, progress: bool = True) -> tuple[dict[str, Any], list[dict]]:
    """Every head's SAE and the concat SAE of ``cfg.sae_layer``, trained in one pass on ``tokens`` (the training
    documents' contexts): ``({"head_<h>": ..., "concat": ...}, history)``."""
    heads, concat = demo_training_specs(cfg)
    return train_layer_saes(model, tokens, layer=cfg.sae_layer, spec=heads, concat=concat, progress=progress,
                            metadata={"context_size": cfg.n_ctx, "prepend_bos": True,
                                      "dataset_path": "sparsedecomp.demo corpus (pydoc topics + stdlib source)"})


@torch.no_grad()
def kissane_concat_sae(trained: Any, *, hook_name: str, layer: int, model_name: str):
    """The trained concat SAE as the package's :class:`~sparsedecomp.loading.SAE`, decoder rows folded to unit norm."""
    from ..loading import SAE

    norms = trained.W_dec.norm(dim=1)
    return SAE(W_enc=(trained.W_enc * norms).detach().clone(), b_enc=(trained.b_enc * norms).detach().clone(),
               W_dec=(trained.W_dec / norms[:, None]).detach().clone(), b_dec=trained.b_dec.detach().clone(),
               apply_b_dec_to_input=bool(trained.cfg.apply_b_dec_to_input), hook_name=hook_name, layer=layer,
               head="concatenated", model_name=model_name)
