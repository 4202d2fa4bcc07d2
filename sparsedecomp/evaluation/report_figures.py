"""Plotly figures of the evaluation report's own results: splice-in scores, feature densities, attribution agreement.

Each builder reads a JSON-ready report dataclass (no tensors), like :mod:`sparsedecomp.evaluation.figures`.
"""

from __future__ import annotations

from typing import Mapping

import plotly.graph_objects as go

from .attribution import AttributionReport
from .figures import TEMPLATE
from .sae_quality import SAEQuality
from .splice import SpliceResult


def splice_scores_figure(splice: Mapping[str, SpliceResult]) -> go.Figure:
    """Loss recovered ``(L_zero - L) / (L_zero - L_clean)`` of every scored variant, with one standard error."""
    scored = [r for r in splice.values() if r.score is not None]
    fig = go.Figure(go.Bar(
        x=[r.name for r in scored], y=[r.score for r in scored],
        error_y={"type": "data", "array": [r.score_stderr or 0.0 for r in scored], "visible": True},
        hovertext=[f"{r.description}; against {r.score_baseline}; CE {r.ce_loss:.4f}, KL {r.kl:.4f}" for r in scored],
        marker_color=["#bbbbbb" if r.score_measurable is False else "#d18a4a" if r.name.startswith("routed_")
                      else "#4a7bd1" for r in scored]))
    fig.update_layout(template=TEMPLATE, title="Splice-in loss recovered (± 1 s.e. over contexts)",
                      yaxis_title="(L_zero − L) / (L_zero − L_clean)", xaxis_tickangle=-45, height=420)
    return fig


def splice_losses_figure(splice: Mapping[str, SpliceResult]) -> go.Figure:
    """Cross-entropy and KL to the clean model of every variant, with one standard error."""
    results = list(splice.values())
    fig = go.Figure()
    fig.add_bar(name="cross-entropy (nats)", x=[r.name for r in results], y=[r.ce_loss for r in results],
                error_y={"type": "data", "array": [r.ce_loss_stderr or 0.0 for r in results]})
    fig.add_bar(name="KL to clean (nats)", x=[r.name for r in results], y=[r.kl for r in results],
                error_y={"type": "data", "array": [r.kl_stderr or 0.0 for r in results]}, yaxis="y2")
    fig.update_layout(template=TEMPLATE, title="Splice-in cross-entropy and KL", barmode="group", height=420,
                      xaxis_tickangle=-45, yaxis={"title": "cross-entropy"},
                      yaxis2={"title": "KL", "overlaying": "y", "side": "right", "tickformat": ".2f",
                              "rangemode": "tozero"}, margin={"r": 80})
    return fig


def feature_density_figure(quality: Mapping[str, SAEQuality]) -> go.Figure:
    """log10 feature-density histogram of every SAE (features that fired; dead ones are counted apart)."""
    fig = go.Figure()
    for name, q in quality.items():
        edges = q.log10_density_bin_edges
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        fig.add_scatter(x=centers, y=list(q.log10_density_counts), mode="lines+markers",
                        name=f"{name} (dead {100 * q.dead_fraction:.1f}%)")
    fig.update_layout(template=TEMPLATE, title="Feature density (log10 of the fraction of tokens a feature fires on)",
                      xaxis_title="log10 feature density", yaxis_title="features", height=420)
    return fig


def attribution_agreement_figure(report: AttributionReport) -> go.Figure:
    """Top-head match between every pair of attribution methods, as a heatmap."""
    methods = list(report.methods)
    matrix = [[1.0 if a == b else None for b in methods] for a in methods]
    for key, agreement in report.agreement.items():
        a, _, b = key.partition("_vs_")
        if a in methods and b in methods:
            i, j = methods.index(a), methods.index(b)
            matrix[i][j] = matrix[j][i] = agreement.top_head_match
    fig = go.Figure(go.Heatmap(z=matrix, x=methods, y=methods, zmin=0, zmax=1, colorscale="Viridis",
                               hoverongaps=False))
    fig.update_layout(template=TEMPLATE, title="Head attribution: top-head agreement between methods", height=460)
    return fig
