"""Quality bars of the demo world, computed on held-out tokens (used by the build report and the tests).

* model: held-out cross-entropy at least :data:`MIN_CE_GAP_NATS` below a unigram model's;
* every SAE (eight heads and the concat SAE): mean L0 in :data:`L0_RANGE`, at most :data:`MAX_DEAD_FRACTION` of
  features that never fire on the held-out tokens, and splice-in score ``(L_zero - L_sae) / (L_zero - L_clean)`` at
  least :data:`MIN_SPLICE_SCORE` (per-head SAE: that head's ``z`` zeroed / spliced; concat SAE: the whole layer's);
  reported beside them, not a bar: all per-head SAEs spliced in at once, scored against zeroing the whole layer;
* every site an SAE is spliced into matters: zeroing it costs at least :data:`MIN_ABLATION_EFFECT_NATS` and at least
  :data:`MIN_ABLATION_EFFECT_STDERRS` standard errors (over contexts). Otherwise the splice score's denominator is
  noise and the score says nothing about the SAE.

Reported beside the bars: each SAE's ``mse`` and ``explained_variance`` on all held-out tokens, with SAELens 6's
names and formulas (``sae_lens.evals``): ``mse = E||x - x_hat||^2`` (sum over dimensions, mean over tokens) and
``explained_variance = 1 - mse / (E||x||^2 - ||E x||^2)``, the denominator centred on the mean over all tokens.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from ..activations import MeanAccumulator, run_accumulators
from ..evaluation.sae_quality import sae_quality_accumulators
from ..naming import CONCAT_NAME, display_name, head_name, head_variant
from ..evaluation.splice import (MEASURABLE_NATS, MEASURABLE_STDERRS, SpliceReport, is_measurable, splice_losses,
                                 splice_variants)

L0_RANGE = (5.0, 60.0)
MAX_DEAD_FRACTION = 0.2
MIN_SPLICE_SCORE = 0.7
MIN_CE_GAP_NATS = 1.0
# The statistical bar makes the score's denominator a measurement; the absolute floor keeps out sites that are
# measurably but practically unused. For scale: zeroing the demo model's whole layer-1 attention costs ~0.5 nats
# (an even split would give each head ~0.07); in the seed notebook, zeroing one gelu-2l layer-1 head cost 0.17 nats
# (3.700 -> 3.873 on its batch).
# The package's one "measurable" rule (sparsedecomp.evaluation.splice.is_measurable) is the bar.
MIN_ABLATION_EFFECT_NATS = MEASURABLE_NATS
MIN_ABLATION_EFFECT_STDERRS = MEASURABLE_STDERRS


def unigram_cross_entropy(train_tokens: Tensor | None, eval_tokens: Tensor, vocab_size: int) -> float:
    """Cross-entropy of the add-one-smoothed unigram model of ``train_tokens`` on the predicted positions of
    ``eval_tokens``; with ``train_tokens=None`` the unigram is fitted on ``eval_tokens`` itself (its entropy: a
    lower bound for every unigram model on these tokens)."""
    targets = eval_tokens[:, 1:].reshape(-1)
    source = targets if train_tokens is None else train_tokens[:, 1:].reshape(-1)
    counts = torch.bincount(source, minlength=vocab_size).double()
    if train_tokens is not None:
        counts += 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[targets].mean())


def sae_statistics(world, tokens: Tensor, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Mean L0, dead fraction, ``mse`` and ``explained_variance`` of every SAE on all positions of ``tokens``, from
    the streamed SAELens metrics (:mod:`sparsedecomp.evaluation.sae_quality`), keyed by SAE name (``head_<h>``,
    ``concat``: :mod:`sparsedecomp.naming`)."""
    accumulators = sae_quality_accumulators(world.head_saes, world.concat_sae)
    results = run_accumulators(world.model, tokens, accumulators, layer=world.layer, batch_size=batch_size)
    return {name: {"l0": q.l0, "dead_fraction": q.dead_fraction, "mse": q.mse,
                                              "explained_variance": q.explained_variance, "n_tokens": q.n_tokens}
            for name, q in results.items()}


def evaluate_world(world, *, n_splice_sequences: int | None = None, batch_size: int = 32,
                   train_tokens: Tensor | None = None, include_mean: bool = True) -> dict[str, Any]:
    """All quality numbers and whether each bar passes. L0 and dead fractions use every held-out context;
    splice-in losses use ``n_splice_sequences`` evenly spaced contexts (all if ``None``); ``include_mean=False`` skips the
    whole-layer mean-ablation loss (not part of any bar) and the pass that computes the mean."""
    heldout = world.heldout_tokens
    splice_tokens = heldout
    if n_splice_sequences is not None and n_splice_sequences < len(heldout):
        # Evenly spaced contexts cover every held-out document, not just the first ones.
        splice_tokens = heldout[torch.linspace(0, len(heldout) - 1, n_splice_sequences).round().long()]
    stats = sae_statistics(world, heldout, batch_size)
    cfg = world.model.cfg
    # The mean-ablation value is the mean z over the same tokens, from a pass of its own (splice_variants says why).
    mean_z = (run_accumulators(world.model, splice_tokens, {"mean": MeanAccumulator()}, layer=world.layer,
                               batch_size=batch_size)["mean"] if include_mean else None)
    # all_head_saes is the seed notebook's open question: every per-head SAE spliced in at once vs the concat SAE
    # (same denominator, zeroing the whole layer).
    variants = splice_variants(cfg.n_heads, cfg.d_head, head_saes=world.head_saes, concat_sae=world.concat_sae,
                               mean_z=mean_z)
    report = splice_losses(world.model, splice_tokens, variants, layer=world.layer, batch_size=batch_size)
    names = {**{head_name(h): head_variant("head_sae", h) for h in world.head_saes.heads}, CONCAT_NAME: "concat_sae",
             "all_heads": "all_head_saes"}
    losses = {key: _splice_summary(report, name) for key, name in names.items()}

    clean = report["clean"].ce_loss
    vocab = world.model.cfg.d_vocab
    unigram_heldout = unigram_cross_entropy(None, splice_tokens, vocab)
    unigram_train = None if train_tokens is None else unigram_cross_entropy(train_tokens, splice_tokens, vocab)
    baseline = unigram_heldout if unigram_train is None else min(unigram_heldout, unigram_train)
    model = {"heldout_cross_entropy": clean, "unigram_cross_entropy_train_fit": unigram_train,
             "unigram_entropy_heldout_fit": unigram_heldout, "uniform_cross_entropy": math.log(vocab),
             "passes": clean <= baseline - MIN_CE_GAP_NATS}
    saes = {}
    for name, s in stats.items():
        splice = losses[name]
        passes = {
            "l0": L0_RANGE[0] <= s["l0"] <= L0_RANGE[1],
            "dead_fraction": s["dead_fraction"] <= MAX_DEAD_FRACTION,
            "splice": splice["recovered"] >= MIN_SPLICE_SCORE,
            "ablation_effect": _measurable(splice),
        }
        saes[name] = {**s, "splice": splice, "passes": passes}
    all_heads = losses["all_heads"]
    summary = {
        "model_ce": round(clean, 4),
        "unigram_ce": round(baseline, 4),
        **{name: {"l0": round(v["l0"], 2), "dead": round(v["dead_fraction"], 4),
                  "splice": round(v["splice"]["recovered"], 4),
                  "splice_stderr": _round(v["splice"]["recovered_stderr"], 4),
                  "ablation_effect": round(v["splice"]["ablation_effect"], 4),
                  "explained_variance": round(v["explained_variance"], 4)}
           for name, v in saes.items()},
        "all_heads": {"splice": round(all_heads["recovered"], 4),
                      "splice_stderr": _round(all_heads["recovered_stderr"], 4)},
        "all_pass": model["passes"] and all(all(v["passes"].values()) for v in saes.values()),
    }
    bars = {"l0_range": L0_RANGE, "max_dead_fraction": MAX_DEAD_FRACTION, "min_splice_score": MIN_SPLICE_SCORE,
            "min_ce_gap_nats": MIN_CE_GAP_NATS, "min_ablation_effect_nats": MIN_ABLATION_EFFECT_NATS,
            "min_ablation_effect_stderrs": MIN_ABLATION_EFFECT_STDERRS}
    return {"bars": bars, "splice_contexts": int(len(splice_tokens)), "model": model, "saes": saes,
            "all_heads_spliced": all_heads, "summary": summary}


def _splice_summary(report: SpliceReport, name: str) -> dict[str, Any]:
    """Variant ``name``'s splice-in numbers under the names the build report has always used (``recovered`` is the
    score, ``zero_ablated`` its baseline's loss; ``mean_ablated`` for whole-layer variants when measured)."""
    r = report[name]
    mean = report.results.get("mean_layer") if r.head is None else None
    return {"hook_name": report.hook_name, "head": r.head, "clean": report["clean"].ce_loss,
            "zero_ablated": report[r.score_baseline].ce_loss, "mean_ablated": None if mean is None else mean.ce_loss,
            "spliced": r.ce_loss, "recovered": r.score, "recovered_stderr": r.score_stderr,
            "ablation_effect": r.ablation_effect, "ablation_effect_stderr": r.ablation_effect_stderr,
            "kl": r.kl, "kl_stderr": r.kl_stderr, "n_contexts": r.n_contexts, "n_tokens": r.n_tokens}


def _measurable(splice: dict) -> bool:
    """Zeroing the site costs at least the absolute and the statistical minimum (see the module docstring)."""
    return is_measurable(splice["ablation_effect"], splice["ablation_effect_stderr"])


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _summary_explained_variance(s: dict) -> float:
    # Reports written before the rename store the same over-tokens quantity as a fraction unexplained, "fvu".
    return s["explained_variance"] if "explained_variance" in s else 1.0 - s["fvu"]


def _label(name: str) -> str:
    """An SAE key in words (``head 3``, ``concat``); reports built before the naming scheme keyed heads ``head3``."""
    legacy = re.fullmatch(r"head(\d+)", name)
    return f"head {legacy.group(1)}" if legacy else display_name(name)


def describe_summary(summary: dict) -> dict[str, str]:
    """One readable line for the model and each SAE of a quality ``summary`` (as :func:`evaluate_world` returns it
    and the build report stores it, also a report from before ``fvu`` became ``explained_variance``), for summary
    pages and logs."""
    lines = {"model (held-out)": f"cross-entropy {summary['model_ce']:.3f} nats (unigram {summary['unigram_ce']:.3f})"}
    for name, s in summary.items():
        if not isinstance(s, dict) or "l0" not in s:
            continue
        stderr = "" if s.get("splice_stderr") is None else f" ± {s['splice_stderr']:.3f}"
        cost = "" if s.get("ablation_effect") is None else f"; zeroing it costs {s['ablation_effect']:.3f} nats"
        lines[f"{_label(name)} SAE (held-out)"] = (f"L0 {s['l0']:.1f}, dead {100 * s['dead']:.1f}%, explained variance "
                                            f"{_summary_explained_variance(s):.3f}, splice-in score "
                                            f"{s['splice']:.3f}{stderr}{cost}")
    if "all_heads" in summary:
        s = summary["all_heads"]
        stderr = "" if s.get("splice_stderr") is None else f" ± {s['splice_stderr']:.3f}"
        lines["all head SAEs at once (held-out)"] = (f"splice-in score {s['splice']:.3f}{stderr} against zeroing the "
                                                     "whole layer (compare the concat SAE's)")
    return lines
