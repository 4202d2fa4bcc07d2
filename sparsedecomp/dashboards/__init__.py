"""Feature dashboards: the data every feature page shows, gathered for all features of an SAE in one streamed pass.

* :mod:`.data`: :class:`FeatureDataAccumulator` (per-feature counts, density, max, sum, top-k examples and a uniform
  sample of the non-zero activations, from one pass of the activation stream) and its :class:`FeatureData`, with
  examples from true quantiles of the non-zero activations and activation histograms;
* :mod:`.weights`: weight-only data, each feature's top / bottom logits with their histogram and its correlated
  features by decoder cosine;
* :mod:`.windows`: token windows around examples;
* :mod:`.source_dfa`: DFA by source position, split by head, for the shown examples only.

No HTML here: rendering reads these results.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CorrelatedFeatures": ".weights",
    "correlated_features": ".weights",
    "dfa_by_source": ".source_dfa",
    "dfa_by_source_many": ".source_dfa",
    "DashboardData": ".gather",
    "gather_dashboard_data": ".gather",
    "write_site": ".site",
    "ExampleWindows": ".windows",
    "example_windows": ".windows",
    "FeatureData": ".data",
    "FeatureDataAccumulator": ".data",
    "FeatureLogits": ".weights",
    "feature_logits": ".weights",
    "QuantileExamples": ".data",
    "RowHistograms": ".histograms",
    "row_histograms": ".histograms",
    "SourceDFA": ".source_dfa",
    "uniform_priorities": ".sampling",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
