"""Everything the evaluation layer measures, on one model, one token set and one layer's SAEs, in two passes.

:func:`evaluate` composes the evaluation modules; it computes nothing itself:

* from weights alone: decoder norms, ranks, how ``W_O`` carries a head's features into other heads' output
  subspaces, interference of ``W_O``-mixed features (:mod:`.analyses`); weight- and encoder-based head attribution
  and decomposition-based attribution (:mod:`.attribution`); each decomposition routed onto the per-head atoms
  (:mod:`.routing`), with its routing error (``pinv`` in ``z`` must route exactly: the built-in consistency check);
* **pass 1** over the tokens (the model up to the hooked layer, once per batch): SAE quality of every SAE
  (:mod:`.sae_quality`), the mean ``z`` (the mean-ablation value), per-token cosine between heads' outputs, each
  concat feature's top-activating tokens with the DFA by head there, and the faithfulness of every ``z``-space
  decomposition;
* **pass 2** (the model up to the hooked layer once per batch, then only the layers after it per variant): splice-in
  losses of every variant (:mod:`.splice`); SAELens's downstream keys of every SAE are filled in from them.

Two passes because mean ablation needs the mean over all tokens before any context is ablated.
Faithfulness is measured for ``z``-space decompositions only: the predictor weights each per-head feature's ``z``
contribution by its coefficient on a unit ``z`` atom, which a residual-space code does not give directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..activations import DEFAULT_MEMORY_BUDGET, MeanAccumulator, check_layer, hooked_transformer, run_accumulators
from ..decomposition import Decomposition
from ..errors import InputError, InputTypeError
from ..naming import CONCAT_NAME, head_of, head_variant
from ..loading.heads import HeadSAEs, check_compatible
from ..loading.sae import SAE
from .analyses import (DecoderNormsReport, HeadOutputCosineAccumulator, HeadOutputCosines, MixedFeatureInterference,
                       OutputSubspaceCarry, RankReport, decoder_norms, dictionary_ranks, mixed_feature_interference,
                       model_saes, output_subspace_carry)
from .attribution import AttributionReport, DFAAccumulator, HeadAttribution, head_attribution
from .metrics import l0
from .faithfulness import Faithfulness, FaithfulnessAccumulator, FaithfulnessReport
from .routing import RoutedDecoder, route_decomposition, routing_error
from .sae_quality import SAEQuality, sae_quality_accumulators, with_downstream
from .splice import SpliceResult, SpliceAccumulator, splice_variants

REPORT_FORMAT = "sparsedecomp-evaluation/1"
# Largest routing error (relative, max-abs) of an exact z-space pinv routing that still counts as exact.
EXACT_ROUTING_TOLERANCE = 1e-4
# Faithfulness asks how well the per-head features a decomposition *picks* predict the concat feature; a dense code
# (pinv, nnls: hundreds to thousands of atoms a feature) picks everything, and at gelu-2l size its codes alone take
# gigabytes. Settings above this mean L0 are listed as skipped, with the reason.
FAITHFULNESS_MAX_MEAN_L0 = 256


@dataclass(frozen=True)
class RoutingCheck:
    """How far a decomposition's routed decoder is from the concat SAE's own (``max |W_routed - W_dec| / max
    |W_dec|``, in the space it was solved in), and the solver's status counts."""

    label: str
    method: str
    space: str
    params: Mapping[str, Any]
    statuses: Mapping[str, int]
    routing_error: float
    exact_expected: bool
    """``pinv`` in ``z`` space with a full-rank block dictionary: routing must reproduce the concat SAE."""
    consistent: bool | None
    """For ``exact_expected``: whether ``routing_error <= EXACT_ROUTING_TOLERANCE``; else ``None``."""


@dataclass(frozen=True)
class AnalysesReport:
    """The research notebook's analyses (:mod:`.analyses`)."""

    decoder_norms: DecoderNormsReport
    ranks: RankReport
    head_output_cosines: HeadOutputCosines
    output_subspace_carry: OutputSubspaceCarry
    mixed_feature_interference: MixedFeatureInterference


@dataclass(frozen=True)
class EvaluationReport:
    """What ``report.json`` holds (keys documented in ``docs/evaluation.md``)."""

    format: str
    title: str
    context: Mapping[str, Any]
    tokens: Mapping[str, Any]
    hook_name: str
    n_heads: int
    d_head: int
    decompositions: Mapping[str, RoutingCheck]
    sae_quality: Mapping[str, SAEQuality]
    splice: Mapping[str, SpliceResult]
    attribution: AttributionReport
    faithfulness: Mapping[str, FaithfulnessReport]
    faithfulness_skipped: Mapping[str, str]
    analyses: AnalysesReport
    timings_s: Mapping[str, float]


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The report and the per-feature results behind it (for figures and dashboards; not JSON)."""

    report: EvaluationReport
    attribution: HeadAttribution
    faithfulness: Mapping[str, Faithfulness]
    routed: Mapping[str, RoutedDecoder]


def evaluate(model: Any, tokens: Any, head_saes: HeadSAEs, concat_sae: SAE, *,
             decompositions: Mapping[str, Decomposition] | None = None, title: str = "Evaluation",
             context: Mapping[str, Any] | None = None, top_k: int = 20, top_n: int = 20,
             memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = False,
             log: Callable[[str], None] = lambda message: None) -> Evaluation:
    """Evaluate ``head_saes`` and ``concat_sae`` (same layer's ``hook_z``) and the ``decompositions`` of the concat
    SAE's unit decoder rows into ``head_saes.dictionary(normalize=True)`` (``label -> Decomposition``; in ``z`` or
    the residual space) on ``model`` (processed as the SAEs' training model) and ``tokens`` (a ``TokenSet`` or a
    ``(n_contexts, context_size)`` tensor). See the module docstring for what is measured."""
    if not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
    if not isinstance(concat_sae, SAE):
        raise InputTypeError(f"concat_sae must be an SAE, got {type(concat_sae).__name__}")
    n_heads, d_head = check_compatible(concat_sae, head_saes)
    hooked = hooked_transformer(model)
    _, layer = concat_sae.require_hook("evaluating on a model")
    check_layer(hooked, layer)
    if (hooked.cfg.n_heads, hooked.cfg.d_head) != (n_heads, d_head):
        raise InputError(f"the model's layer has {hooked.cfg.n_heads} heads of width {hooked.cfg.d_head}; the SAEs read "
                         f"{n_heads} heads of width {d_head}")
    decompositions = dict(decompositions or {})
    timings: dict[str, float] = {}
    W_O = hooked.W_O[layer].detach()
    params = next(hooked.parameters())
    head_saes = head_saes.to(device=params.device)
    concat_sae = concat_sae.to(device=params.device)

    start = time.time()
    z_dictionary = head_saes.dictionary(normalize=True)
    routed, checks = {}, {}
    full_rank = z_dictionary.rank() == z_dictionary.dim
    for label, dec in decompositions.items():
        decoder = route_decomposition(concat_sae, dec, z_dictionary, label=label, W_O=W_O)
        error = routing_error(decoder, concat_sae, W_O=W_O)
        exact = dec.solver == "pinv" and decoder.space == "z" and full_rank
        checks[label] = RoutingCheck(label=label, method=dec.solver, space=decoder.space,
                                     params=dict(decoder.setting.get("params", {})),
                                     statuses=dict(decoder.setting.get("statuses", {})), routing_error=error,
                                     exact_expected=exact, consistent=(error <= EXACT_ROUTING_TOLERANCE) if exact else None)
        routed[label] = decoder
    timings["routing"] = time.time() - start

    start = time.time()
    analyses_weights = {
        "decoder_norms": decoder_norms(model_saes(head_saes, concat_sae)),
        "ranks": dictionary_ranks(head_saes, concat_sae, W_O),
        "output_subspace_carry": output_subspace_carry(head_saes, W_O),
        "mixed_feature_interference": mixed_feature_interference(head_saes, W_O),
    }
    timings["weight_analyses"] = time.time() - start
    log(f"weight analyses and routing done ({timings['weight_analyses'] + timings['routing']:.1f}s)")

    start = time.time()
    z_space, skipped = {}, {}
    for label, dec in decompositions.items():
        mean_l0 = float(l0(dec.codes).double().mean())
        if routed[label].space != "z":
            skipped[label] = "solved in the residual space (the predictor needs codes on unit z atoms)"
        elif mean_l0 > FAITHFULNESS_MAX_MEAN_L0:
            skipped[label] = (f"dense codes (mean L0 {mean_l0:.0f} > {FAITHFULNESS_MAX_MEAN_L0}): faithfulness asks how "
                              "well the per-head features a decomposition picks predict the feature")
        else:
            z_space[label] = dec
    quality = sae_quality_accumulators(head_saes, concat_sae)
    first_pass = {**{f"quality:{name}": acc for name, acc in quality.items()},
                  "mean_z": MeanAccumulator(),
                  "head_output_cosines": HeadOutputCosineAccumulator(W_O),
                  "dfa": DFAAccumulator(concat_sae, n_heads, k=top_k),
                  **{f"faithfulness:{label}": FaithfulnessAccumulator(concat_sae, head_saes, dec, label=label, k=top_k)
                     for label, dec in z_space.items()}}
    stats = run_accumulators(hooked, tokens, first_pass, layer=layer, memory_budget=memory_budget, progress=progress,
                             desc="statistics")
    timings["statistics_pass"] = time.time() - start
    log(f"statistics pass done ({timings['statistics_pass']:.1f}s)")

    start = time.time()
    variants = splice_variants(n_heads, d_head, head_saes=head_saes, concat_sae=concat_sae,
                               mean_z=stats["mean_z"].to(params.device, params.dtype), routed=routed)
    splice = run_accumulators(hooked, tokens, {"splice": SpliceAccumulator(hooked, variants)}, layer=layer,
                              memory_budget=memory_budget, progress=progress, desc="splice")["splice"]
    timings["splice_pass"] = time.time() - start
    log(f"splice pass done: {len(variants)} variants ({timings['splice_pass']:.1f}s)")

    start = time.time()
    sae_quality = {name: _with_splice(stats[f"quality:{name}"], name, splice) for name in quality}
    attribution = head_attribution(concat_sae, n_heads, dfa=stats["dfa"], decompositions=decompositions)
    faithfulness = {label: stats[f"faithfulness:{label}"] for label in z_space}
    token_info = tokens.describe() if hasattr(tokens, "describe") else {
        "source": "tensor", "n_contexts": int(tokens.shape[0]), "context_size": int(tokens.shape[1])}
    report = EvaluationReport(
        format=REPORT_FORMAT, title=title, context=dict(context or {}), tokens=token_info,
        hook_name=f"blocks.{layer}.attn.hook_z", n_heads=n_heads, d_head=d_head, decompositions=checks,
        sae_quality=sae_quality, splice=dict(splice.results), attribution=attribution.report(top_n=top_n),
        faithfulness={label: f.report() for label, f in faithfulness.items()}, faithfulness_skipped=skipped,
        analyses=AnalysesReport(head_output_cosines=stats["head_output_cosines"], **analyses_weights),
        timings_s={})
    timings["summaries"] = time.time() - start
    report = _with_timings(report, timings)
    return Evaluation(report=report, attribution=attribution, faithfulness=faithfulness, routed=routed)


def evaluate_head_saes(model: Any, tokens: Any, head_saes: HeadSAEs, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                       progress: bool = False) -> tuple[dict[str, SAEQuality], Any]:
    """SAELens ``run_evals``'s metrics of every per-head SAE on ``tokens``, downstream keys included: one statistics
    pass (:func:`~sparsedecomp.evaluation.sae_quality.sae_quality_accumulators`) and one splice pass (each head's SAE
    spliced in against zeroing that head). Returns ``({"head_<h>": SAEQuality}, SpliceReport)``."""
    if not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
    hooked = hooked_transformer(model)
    layer = check_layer(hooked, head_saes.layer)
    params = next(hooked.parameters())
    head_saes = head_saes.to(device=params.device)
    quality = sae_quality_accumulators(head_saes, None)
    stats = run_accumulators(hooked, tokens, quality, layer=layer, memory_budget=memory_budget, progress=progress,
                             desc="evals")
    variants = splice_variants(hooked.cfg.n_heads, hooked.cfg.d_head, head_saes=head_saes, heads=head_saes.heads)
    splice = run_accumulators(hooked, tokens, {"splice": SpliceAccumulator(hooked, variants)}, layer=layer,
                              memory_budget=memory_budget, progress=progress, desc="splice")["splice"]
    return {name: _with_splice(stats[name], name, splice) for name in quality}, splice


def _with_splice(quality: SAEQuality, name: str, splice) -> SAEQuality:
    """SAELens's downstream keys from the splice-in losses: a per-head SAE against zeroing its head, the concat SAE
    against zeroing the layer, both against the clean model."""
    if name == CONCAT_NAME:
        spliced, ablated = splice["concat_sae"], splice["zero_layer"]
    else:
        head = head_of(name)
        spliced, ablated = splice[head_variant("head_sae", head)], splice[head_variant("zero_head", head)]
    clean = splice["clean"]
    return with_downstream(quality, ce_loss_with_sae=spliced.ce_loss, ce_loss_without_sae=clean.ce_loss,
                           ce_loss_with_ablation=ablated.ce_loss, kl_div_with_sae=spliced.kl,
                           kl_div_with_ablation=ablated.kl)


def _with_timings(report: EvaluationReport, timings: Mapping[str, float]) -> EvaluationReport:
    from dataclasses import replace

    return replace(report, timings_s={name: round(value, 3) for name, value in timings.items()})


__all__ = ["AnalysesReport", "Evaluation", "EvaluationReport", "REPORT_FORMAT", "RoutingCheck", "evaluate",
           "evaluate_head_saes"]
