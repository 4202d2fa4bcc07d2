"""One SAE per attention head of a layer, all trained from one activation stream with SAELens 6's own training code.

The package's input is a per-head SAE for every head; trained one SAELens run at a time, that costs one model pass per
head. Here every head is trained from the *same* forward passes: each batch of contexts runs the model once up to the
layer (:class:`~sparsedecomp.activations.ActivationStream`), its ``hook_z`` ``(tokens, n_heads, d_head)`` is split by
head, and the rows go through SAELens's multi-hook mixing buffer (``multi_hook_concat_split_iter``: one shuffle shared
by every head, so the heads see the same tokens in the same order) into SAELens's ``MultiSAETrainer``. That trainer
holds one ``SAETrainer`` per SAE (its optimiser, learning-rate and coefficient schedules, activation scaling, dead-feature
statistics), so each head's SAE is trained exactly as a single SAELens run would train it: SAELens's training SAE
classes, losses and initialisation, not a loop written here.

(SAELens's ``MultiSAETrainingRunner`` cannot do this in its first version: SAEs on one hook must share
``hook_head_index``. The trainer under it routes batches by key, and the keys here are one per head.)

Each head's SAE is written with SAELens's ``save_inference_model`` (BatchTopK as JumpReLU, as SAELens saves it) and
its metadata: ``hook_name`` the layer's ``hook_z``, ``hook_head_index`` the head, the model's name and its processing
as ``model_from_pretrained_kwargs`` (every flag written out), so both ``sae_lens.SAE.load_from_disk`` and
:func:`sparsedecomp.loading.load_head_saes` read the folders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..activations import ActivationStream, check_layer, hooked_transformer
from ..errors import InputError
from ..naming import head_name

ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk")
"""SAELens training architectures offered (the SAELens registry's names)."""


@dataclass(frozen=True)
class HeadTrainingSpec:
    """How each head's SAE is trained (one spec for every head).

    Attributes:
        architecture: one of :data:`ARCHITECTURES`.
        d_sae: features per head.
        training_tokens: tokens each SAE trains on (the same tokens for every head).
        batch_size: rows per training step.
        lr: Adam learning rate (SAELens's constant schedule, ``lr_end = lr / 10`` for its decay schedules).
        k: active features per token (``topk`` / ``batchtopk``).
        l1_coefficient: sparsity coefficient (``standard``; SAELens's default otherwise).
        normalize_activations: SAELens's ``"expected_average_only_in"`` (inputs scaled to norm ``sqrt(d_head)`` during
            training, folded into the weights at the end: Anthropic's April-2024 recipe) or ``"none"``.
        buffer_batches: training batches held in the mixing buffer (rows are shuffled across about this many).
        seed: seeds the SAEs' initialisation and the buffer's shuffles.
        extra: further keyword arguments of the SAELens training config (e.g. ``{"jumprelu_bandwidth": 0.05}``).
    """

    architecture: str
    d_sae: int
    training_tokens: int
    batch_size: int = 4096
    lr: float = 3e-4
    k: int | None = None
    l1_coefficient: float | None = None
    normalize_activations: str = "expected_average_only_in"
    buffer_batches: int = 16
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        for name in ("d_sae", "training_tokens", "batch_size", "buffer_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if self.architecture in ("topk", "batchtopk"):
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise InputError(f"a {self.architecture} SAE needs k in 1..d_sae={self.d_sae}, got k={self.k!r}")
        elif self.k is not None:
            raise InputError(f"k applies to topk / batchtopk SAEs, not to {self.architecture!r}")
        if self.training_tokens < self.batch_size:
            raise InputError(f"training_tokens={self.training_tokens} is less than one batch of {self.batch_size}")
        if self.normalize_activations not in ("expected_average_only_in", "none"):
            raise InputError("normalize_activations must be 'expected_average_only_in' or 'none', got "
                             f"{self.normalize_activations!r}")

    def training_config(self, d_in: int, metadata: Any) -> Any:
        """The SAELens training config of one head's SAE."""
        from sae_lens.registry import get_sae_training_class

        _, config_class = get_sae_training_class(self.architecture)
        options: dict[str, Any] = {"normalize_activations": self.normalize_activations, **dict(self.extra)}
        if self.k is not None:
            options["k"] = self.k
        if self.l1_coefficient is not None:
            options["l1_coefficient"] = self.l1_coefficient
        return config_class(d_in=d_in, d_sae=self.d_sae, metadata=metadata, **options)


def head_batches(model: Any, tokens: Any, *, layer: int, heads: tuple[int, ...], batch_size: int,
                 buffer_batches: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Training batches ``{head_name(h): (batch_size, d_head)}`` for every head of ``heads``, from one model forward per
    batch of contexts, shuffled together through SAELens's multi-hook mixing buffer (the same rows for every head).
    Cycles through ``tokens`` again if training asks for more rows than they hold."""
    from sae_lens.training.mixing_buffer import multi_hook_concat_split_iter

    keys = [head_name(h) for h in heads]

    def per_head() -> Iterator[dict[str, Tensor]]:
        while True:
            for batch in ActivationStream(model, tokens, layer=layer, with_logits=False):
                z = batch.z.reshape(-1, batch.n_heads, batch.d_head).float()
                yield {key: z[:, h] for key, h in zip(keys, heads)}

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the mixing buffer's torch.randperm draws from the global generator
    try:
        yield from multi_hook_concat_split_iter(buffer_batches * batch_size, batch_size, per_head(), keys)
    finally:
        torch.random.set_rng_state(generator_state)


def train_head_saes(model: Any, tokens: Any, *, layer: int, spec: HeadTrainingSpec,
                    heads: tuple[int, ...] | None = None, checkpoint_dir: str | Path | None = None,
                    n_checkpoints: int = 0, device: str = "cpu") -> dict[int, Any]:
    """Train one SAELens training SAE per head of ``heads`` (all of the layer's by default) on ``hook_z`` of ``layer``,
    in one pass (see the module docstring). Returns ``{head: TrainingSAE}`` with the input scaling folded in.

    ``checkpoint_dir``: where SAELens's trainer writes ``n_checkpoints`` checkpoints (one sub-folder per head each)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    hooked = hooked_transformer(model)
    cfg = hooked.cfg
    layer = check_layer(hooked, layer)
    heads = tuple(range(cfg.n_heads)) if heads is None else tuple(heads)
    missing = [h for h in heads if not 0 <= h < cfg.n_heads]
    if missing or not heads:
        raise InputError(f"heads {missing or list(heads)} do not exist: the model has heads 0..{cfg.n_heads - 1}")
    available = int(getattr(tokens, "tokens", tokens).numel())
    if available < spec.training_tokens:
        raise InputError(f"{spec.training_tokens:,} training tokens asked for but the tokens hold {available:,}: give "
                         "more tokens or fewer training tokens")
    hook_name = f"blocks.{layer}.attn.hook_z"
    training_class, _ = get_sae_training_class(spec.architecture)
    torch.manual_seed(spec.seed)  # the SAEs' initialisation
    saes = {head_name(h): training_class(spec.training_config(cfg.d_head, SAEMetadata(
        hook_name=hook_name, hook_head_index=h, model_name=cfg.model_name))) for h in heads}
    trainer_config = SAETrainerConfig(
        total_training_samples=spec.training_tokens, train_batch_size_samples=spec.batch_size, lr=spec.lr,
        lr_end=spec.lr / 10, device=device, n_checkpoints=n_checkpoints,
        checkpoint_path=None if checkpoint_dir is None else str(checkpoint_dir),
        n_batches_for_norm_estimate=max(1, min(100, spec.training_tokens // spec.batch_size)))
    batches = head_batches(model, tokens, layer=layer, heads=heads, batch_size=spec.batch_size,
                           buffer_batches=spec.buffer_batches, seed=spec.seed)
    trained = MultiSAETrainer(trainer_config, saes, {key: key for key in saes}, batches).fit()
    return {h: trained[head_name(h)] for h in heads}


def save_head_saes(saes: Mapping[int, Any], out: str | Path, *, processing: Mapping[str, bool] | None = None
                   ) -> dict[int, Path]:
    """Write each head's SAE as a SAELens 6 inference folder ``out/head_<h>`` (SAELens's ``save_inference_model``),
    recording ``processing`` (the model's processing flags, written out in full) as its ``model_from_pretrained_kwargs``.
    Returns ``{head: folder}``."""
    out = Path(out)
    folders = {}
    for h, sae in saes.items():
        if processing is not None:
            sae.cfg.metadata.model_from_pretrained_kwargs = dict(processing)
        folder = out / head_name(h)
        sae.save_inference_model(folder)
        folders[h] = folder
    return folders
