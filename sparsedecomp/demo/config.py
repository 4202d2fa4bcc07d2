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
    # -- SAEs --------------------------------------------------------------------------------------------------
    sae_layer: int = 1
    sae_activation_sequences: int = 6000
    """Training sequences whose ``hook_z`` (all positions) the SAEs are trained on."""
    head_expansion: int = 8
    head_l1: tuple[float, ...] = (0.25, 0.5, 0.8, 0.35, 0.8, 0.8, 0.35, 0.8)
    """April-2024 lambda per head (inputs scaled to ``E||x|| = sqrt(d_head)``); used only when
    :attr:`head_l1_candidates` is empty (the shipped build calibrates instead)."""
    head_l1_candidates: tuple[float, ...] = (0.25, 0.35, 0.5, 0.7, 1.0)
    """If not empty, lambda per head is calibrated: a short batched run with every candidate, then per head the
    largest candidate whose L0 reaches :attr:`head_target_l0` (the smallest candidate if none does)."""
    head_target_l0: float = 30.0
    head_calibration_steps: int = 400
    head_lr: float = 1e-3
    head_steps: int = 2000
    head_batch_size: int = 2048
    concat_d_sae: int = 2048
    concat_l1: float = 2.0
    """Kissane L1 weight in normalised units: the raw coefficient is ``concat_l1 * E||x|| / sqrt(d_in)`` (the
    same trade-off as lambda on inputs scaled to ``E||x|| = sqrt(d_in)``); the raw value is saved in the cfg."""
    concat_lr: float = 1e-3
    concat_steps: int = 2000
    concat_batch_size: int = 1024
    concat_resample_steps: tuple[int, ...] = ()
    """Steps at which dead concat features are re-initialised (Kissane et al. resample too); empty: never."""
    concat_tied_init: bool = True
    """Start the concat encoder as the decoder's transpose. With independent Kaiming draws about half of the 2,048
    features never fired on held-out tokens (and resampling at 250-step intervals found none that never fired
    within an interval: they were rare, not dead); tied, under 1% are dead."""
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
            sae_activation_sequences=64,
            head_expansion=4,
            head_l1=(1.0,) * 4,
            head_l1_candidates=(0.5, 2.0),
            head_target_l0=5.0,
            head_calibration_steps=10,
            head_steps=20,
            head_batch_size=256,
            concat_d_sae=64,
            concat_steps=20,
            concat_batch_size=256,
            concat_resample_steps=(10,),
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
