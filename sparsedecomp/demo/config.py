"""Every setting of the demo build in one frozen dataclass, so a build is reproducible from its report.

``DemoConfig()`` is the shipped build; ``DemoConfig.tiny()`` is a seconds-long build for tests and development
(same code path, tiny corpus, model and step counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from ..errors import InputError


@dataclass(frozen=True)
class DemoConfig:
    """Settings of corpus, tokenizer, model and SAE training (all seeds fixed).

    Model: gelu-2l's architecture scaled down (2 layers, attention + MLP, GELU, LayerNorm, learned positional
    embeddings). SAEs read ``blocks.{sae_layer}.attn.hook_z`` of the model *as loaded* (fp16-rounded weights,
    processed with :attr:`processing_flags`).
    """

    seed: int = 0
    # -- corpus ------------------------------------------------------------------------------------------------
    code_char_budget: int | None = None
    """Characters of standard-library source taken (files in a fixed hash order) besides all pydoc topics (``None``:
    every file, about 7.9M characters on CPython 3.11). With a 3M-character budget and 900 steps, zeroing the whole
    layer-1 attention cost only 0.10-0.15 nats on held-out text and single heads 0.001-0.014; with all of it and
    3,000 steps, 0.54 and 0.015-0.10."""
    prose_char_budget: int | None = None
    """Characters of pydoc topics taken (``None``: all of them)."""
    heldout_every: int = 20
    """A document is held out when ``sha256(name) % heldout_every == 0`` (about 5% of documents)."""
    heldout_doc_chars: int | None = 8000
    """Each held-out document contributes at most its first this many characters (see ``Corpus.heldout_texts``)."""
    max_heldout_sequences: int = 1024
    # -- tokenizer ---------------------------------------------------------------------------------------------
    vocab_size: int = 2048
    # -- model -------------------------------------------------------------------------------------------------
    model_name: str = "sparsedecomp-demo-2l"
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 8
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 128
    model_batch_size: int = 16
    model_steps: int = 3000
    model_lr: float = 3e-3
    model_warmup_steps: int = 30
    model_weight_decay: float = 0.05
    model_repeat_fraction: float = 0.25
    """Share of each batch replaced by ``[BOS] + x + x`` copies of real contexts (see ``model.repeat_half``)."""
    processing_flags: dict = field(
        default_factory=lambda: {
            "fold_ln": True,
            "center_writing_weights": True,
            "center_unembed": True,
            "fold_value_biases": True,
            "refactor_factored_attn_matrices": False,
        }
    )
    # -- SAEs: every head and the concat SAE trained in one pass by sparsedecomp.training (SAELens's trainer) --------
    sae_layer: int = 1
    sae_training_tokens: int = 2_000_000
    """Tokens every SAE trains on (the same ones, from one activation stream over the training documents)."""
    sae_batch_size: int = 1024
    sae_lr: float = 1e-3
    sae_lr_decay_fraction: float = 0.2
    """The last this fraction of steps decays the learning rate linearly (SAELens's ``lr_decay_steps``)."""
    sae_buffer_batches: int = 64
    sae_dead_feature_window: int = 200
    """Steps without firing after which SAELens's BatchTopK loss revives a feature (its auxiliary loss)."""
    head_architecture: str = "batchtopk"
    head_expansion: int = 4
    head_k: int = 9
    """Active features per token of each head's BatchTopK SAE (saved for inference as JumpReLU, as SAELens saves
    it): at most 0.3 x d_head, as sparse as published attention SAEs are relative to their width."""
    concat_d_sae: int = 2048
    concat_l1_coefficient: float = 5.0
    """SAELens ``standard`` L1 coefficient of the concat SAE (a ReLU SAE, as Kissane et al.'s; inputs scaled to
    norm ``sqrt(d_in)`` while training and the scale folded in; decoder rows folded to unit norm when saved)."""
    # -- evaluation --------------------------------------------------------------------------------------------
    eval_sequences: int = 128
    eval_batch_size: int = 32

    @classmethod
    def tiny(cls) -> "DemoConfig":
        """A build that runs in seconds (for tests); quality bars do not apply to it."""
        return cls(
            code_char_budget=120_000,
            prose_char_budget=40_000,
            heldout_every=8,
            max_heldout_sequences=16,
            vocab_size=300,
            d_model=32,
            n_heads=4,
            d_head=8,
            d_mlp=64,
            n_ctx=32,
            model_batch_size=8,
            model_steps=20,
            model_warmup_steps=2,
            sae_training_tokens=4096,
            sae_batch_size=256,
            sae_buffer_batches=4,
            head_expansion=4,
            head_k=2,
            concat_d_sae=64,
            concat_l1_coefficient=1.0,
            eval_sequences=16,
            eval_batch_size=8,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DemoConfig":
        """The config a build report records (JSON lists back to tuples); unknown keys are an error, keys the
        report lacks (older builds) take today's defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown DemoConfig fields {unknown} (a report from another sparsedecomp version?)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
