"""Evaluation of decompositions: pure per-target metric functions and their summary."""

from .metrics import (
    DecompositionMetrics,
    cosine,
    decomposition_metrics,
    relative_squared_error,
    head_columns,
    head_mass,
    head_mass_shares,
    heads_for_mass,
    l0,
    l1,
    relative_error,
    summarize,
    target_head_shares,
    top_k_mass_share,
)

__all__ = [
    "DecompositionMetrics",
    "cosine",
    "decomposition_metrics",
    "relative_squared_error",
    "head_columns",
    "head_mass",
    "head_mass_shares",
    "heads_for_mass",
    "l0",
    "l1",
    "relative_error",
    "summarize",
    "target_head_shares",
    "top_k_mass_share",
]
