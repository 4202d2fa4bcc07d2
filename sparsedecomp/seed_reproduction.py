"""Reproducing the research notebook's numbers (the seed notebook the project started from) with the package, side by side with the seed's.

Two parts, one command each (``sparsedecomp reproduce-seed heads|kissane``):

* **heads** (gelu-2l layer 1, the per-head SAEs, e.g. the seed's head 0 run ``rovi1lwe``): next-token cross-entropy
  clean / with head ``h``'s ``z`` replaced by its SAE's reconstruction / with head ``h``'s ``z`` zeroed (the seed:
  3.699 / 3.778 / 3.873 on one 1,024-token context), on the first context of the SAEs' training dataset (as the
  seed's ``ActivationsStore.get_batch_tokens(batch_size=1)`` gave it) and on many contexts with standard errors;
  each with the SAE as loaded (the input scale not folded: the seed applied the SAE to raw ``hook_z``, so this is
  the seed's set-up) and with the input scale re-estimated on the same contexts and folded (the SAE as it was
  trained). Also each head SAE's mean decoder norm in raw (training) units (the seed: 2.0519 for head 0), its
  rank (64) and the rank of the block dictionary of all heads (512).
* **kissane** (the seed's Kissane et al. run ``..._v78``): the rank of its decoder (512) and feature 99's
  squared-norm share per head ``||W_dec[99, h-block]||^2`` (the seed: 0.09, 0.02, 0.18, 0.22, 0.01, 0.01, 0.00, 0.48).

Every number comes from the package's own loaders, activation stream and splice accumulator; the seed's numbers are
constants here only to be printed beside them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from .naming import head_name
from .errors import InputError

SEED_CE = {"clean": 3.699457883834839, "spliced": 3.7783544063568115, "zeroed": 3.8725802898406982}
SEED_HEAD = 0
SEED_MEAN_DECODER_NORM = 2.0519
SEED_HEAD_RANK = 64
SEED_BLOCK_RANK = 512
SEED_KISSANE_RANK = 512
SEED_FEATURE = 99
SEED_FEATURE_SHARES = (0.09, 0.02, 0.18, 0.22, 0.01, 0.01, 0.00, 0.48)
SEED_KISSANE_SOURCE = ("hf://ckkissane/tinystories-1M-SAES/concat-z-gelu-21-l1-lr-sweep-3/"
                       "gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78")
SEED_DATASET = "NeelNanda/c4-code-tokenized-2b"
"""The dataset gelu-2l was trained on, pre-tokenised, used when the SAEs' configs record none."""


@dataclass(frozen=True)
class CrossEntropies:
    """Clean / spliced / zeroed cross-entropy of one head on some contexts (nats per predicted token)."""

    n_contexts: int
    input_scale_folded: bool
    clean: float
    clean_stderr: float | None
    spliced: float
    spliced_stderr: float | None
    zeroed: float
    zeroed_stderr: float | None
    score: float | None
    score_stderr: float | None


@dataclass(frozen=True)
class HeadsReproduction:
    """The heads part (see the module docstring); ``seed`` holds the seed's numbers for comparison."""

    head: int
    tokens: Mapping[str, Any]
    input_scale: float | None
    one_context: Mapping[str, CrossEntropies]
    many_contexts: Mapping[str, CrossEntropies]
    seed_setup: str
    mean_decoder_norm_training_units: Mapping[str, float]
    head_ranks: Mapping[str, int]
    block_rank: int
    seed: Mapping[str, Any]
    checkpoint_steps: Mapping[str, Any] = field(default_factory=dict)
    """The checkpoint step each head's SAE was loaded from (legacy SAELens runs; ``None`` where not known)."""


@dataclass(frozen=True)
class KissaneReproduction:
    """The kissane part (see the module docstring)."""

    sae: str
    rank: int
    feature: int
    feature_norm: float
    squared_shares: tuple[float, ...]
    seed: Mapping[str, Any]


def reproduce_heads(model: Any, head_saes: Any, tokens: Any, *, head: int = SEED_HEAD,
                    progress: bool = False) -> HeadsReproduction:
    """The heads part on ``model`` (gelu-2l, processed as for the SAEs), ``head_saes`` as loaded (input scales not
    folded) and ``tokens`` (a ``TokenSet``: its first context is the one-context estimate, all of them the
    many-context one)."""
    from .activations import hooked_transformer
    from .evaluation.analyses import decoder_norms, dictionary_ranks, model_saes
    from .evaluation.splice import select_variants, splice_losses, splice_variants
    from .loading import estimate_head_scales_from_model
    from .loading.sae import InputScaleWarning

    if head not in head_saes.heads:
        raise InputError(f"head {head} has no SAE among heads {list(head_saes.heads)}")
    hooked = hooked_transformer(model)
    layer = head_saes.layer
    n_heads, d_head = hooked.cfg.n_heads, hooked.cfg.d_head
    raw = head_saes[head]
    scale = None
    folded_sae = raw
    if raw.needs_input_scale:
        scales = estimate_head_scales_from_model(model, list(tokens.tokens.split(8)), layer=layer, heads=[head])
        scale = scales[head]
        folded_sae = raw.with_input_scale(scale, reason=f"re-estimated: {scales.description}")
    one, many = {}, {}
    with warnings.catch_warnings():
        # The unfolded SAEs are deliberate here: splicing them is the seed's set-up, and their decoder norms in
        # training units are the seed's numbers.
        warnings.simplefilter("ignore", InputScaleWarning)
        # clean, zero_head_h and head_sae_h only (select_variants keeps the baselines): no whole-layer reruns.
        wanted = [f"head_sae_{head}"]
        variants = {"as_loaded": select_variants(splice_variants(n_heads, d_head, head_saes={head: raw},
                                                                 heads=[head]), wanted),
                    "input_scale_folded": select_variants(splice_variants(n_heads, d_head, head_saes={head: folded_sae},
                                                                          heads=[head]), wanted)}
        for name, chosen in variants.items():
            for out, subset in ((one, tokens.tokens[:1]), (many, tokens.tokens)):
                report = splice_losses(hooked, subset, chosen, layer=layer, progress=progress)
                out[name] = _cross_entropies(report, head, folded=name != "as_loaded")
        norms = decoder_norms(model_saes(head_saes, None))
        ranks = dictionary_ranks(head_saes)
    head_ranks = {e.name: e.rank for e in ranks.entries if e.kind == "head"}
    block = next(e.rank for e in ranks.entries if e.kind == "block")
    return HeadsReproduction(
        head=head, tokens=tokens.describe(), input_scale=scale, one_context=one, many_contexts=many,
        seed_setup=("as_loaded: the seed spliced the SAE's reconstruction of raw hook_z (SAELens 2.1.3's SAE without "
                    "its activation normalisation), on one context"),
        mean_decoder_norm_training_units={s.name: s.norms_training_units.mean for s in norms.saes},
        head_ranks=head_ranks, block_rank=block,
        checkpoint_steps={head_name(h): sae.provenance.get("step") for h, sae in head_saes.items()},
        seed={"head": SEED_HEAD, "cross_entropy_one_context": SEED_CE, "mean_decoder_norm_head_0": SEED_MEAN_DECODER_NORM,
              "head_rank": SEED_HEAD_RANK, "block_rank": SEED_BLOCK_RANK})


def _cross_entropies(report: Any, head: int, *, folded: bool) -> CrossEntropies:
    clean, spliced, zeroed = report["clean"], report[f"head_sae_{head}"], report[f"zero_head_{head}"]
    return CrossEntropies(n_contexts=report.n_contexts, input_scale_folded=folded, clean=clean.ce_loss,
                          clean_stderr=clean.ce_loss_stderr, spliced=spliced.ce_loss,
                          spliced_stderr=spliced.ce_loss_stderr, zeroed=zeroed.ce_loss,
                          zeroed_stderr=zeroed.ce_loss_stderr, score=spliced.score, score_stderr=spliced.score_stderr)


def reproduce_kissane(concat_sae: Any, *, feature: int = SEED_FEATURE, n_heads: int = 8) -> KissaneReproduction:
    """The kissane part on the concat SAE as loaded (``n_heads``: gelu-2l's 8 head blocks of its 512 inputs)."""
    import torch

    from .evaluation.analyses import matrix_rank
    from .evaluation.metrics import head_columns, target_head_shares

    if not 0 <= feature < concat_sae.d_sae:
        raise InputError(f"feature {feature} is out of range: the SAE has {concat_sae.d_sae} features")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or concat_sae.d_in % n_heads:
        raise InputError(f"n_heads must divide the concat SAE's {concat_sae.d_in} inputs, got {n_heads!r}")
    W_dec = concat_sae.W_dec.detach().double()
    d_head = concat_sae.d_in // n_heads
    shares = target_head_shares(W_dec[feature : feature + 1], head_columns(concat_sae.d_in, d_head))[0]
    rank = matrix_rank(W_dec, name="concat decoder", kind="concat", source_dtype=concat_sae.W_dec.dtype).rank
    return KissaneReproduction(sae=concat_sae.describe(), rank=rank, feature=feature,
                               feature_norm=float(torch.linalg.vector_norm(W_dec[feature])),
                               squared_shares=tuple(round(float(s), 6) for s in shares),
                               seed={"rank": SEED_KISSANE_RANK, "feature": SEED_FEATURE,
                                     "squared_shares": SEED_FEATURE_SHARES})
