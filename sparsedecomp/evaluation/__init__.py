"""The evaluation layer: decomposition metrics, SAE quality, splice-in losses, head attribution, faithfulness and
the research notebook's analyses, each an accumulator over the activation stream or a function of weights, with
typed, JSON-ready reports (:func:`evaluate` composes them all).

Names load on first use (PEP 562), so importing this package imports no plotly, transformer_lens or sae_lens.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AttributionReport": ".attribution",
    "cosine": ".metrics",
    "decoder_norms": ".analyses",
    "decomposition_metrics": ".metrics",
    "DecompositionMetrics": ".metrics",
    "DFAAccumulator": ".attribution",
    "dictionary_ranks": ".analyses",
    "evaluate": ".evaluate",
    "Evaluation": ".evaluate",
    "EvaluationReport": ".evaluate",
    "Faithfulness": ".faithfulness",
    "FaithfulnessAccumulator": ".faithfulness",
    "FaithfulnessReport": ".faithfulness",
    "head_attribution": ".attribution",
    "head_columns": ".metrics",
    "head_mass": ".metrics",
    "head_mass_shares": ".metrics",
    "HeadAttribution": ".attribution",
    "HeadOutputCosineAccumulator": ".analyses",
    "heads_for_mass": ".metrics",
    "l0": ".metrics",
    "l1": ".metrics",
    "mixed_feature_interference": ".analyses",
    "output_subspace_carry": ".analyses",
    "relative_error": ".metrics",
    "relative_squared_error": ".metrics",
    "route_decomposition": ".routing",
    "RoutedDecoder": ".routing",
    "routing_error": ".routing",
    "sae_quality_accumulators": ".sae_quality",
    "SAEQuality": ".sae_quality",
    "SAEQualityAccumulator": ".sae_quality",
    "SAETopActivations": ".top_activations",
    "select_variants": ".splice",
    "splice_losses": ".splice",
    "splice_variants": ".splice",
    "SpliceAccumulator": ".splice",
    "SpliceReport": ".splice",
    "SpliceResult": ".splice",
    "summarize": ".metrics",
    "target_head_shares": ".metrics",
    "to_jsonable": "..jsonio",
    "top_k_mass_share": ".metrics",
    "TopActivations": ".top_activations",
    "TopKTracker": ".top_activations",
    "with_downstream": ".sae_quality",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
