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
    fig.update_layout(template=TEMPLATE, title="Splice-in loss recovered (± 1 s.e. over contexts; grey: denominator "
                      "not measurable)", yaxis_title="(L_zero − L) / (L_zero − L_clean)", xaxis_tickangle=-45,
                      height=420)
    # Scores over a denominator that is noise can be anything: keep the axis on the range that means something
    # (the bars and error bars beyond it are cut, the table has the numbers).
    measurable = [r.score for r in scored if r.score_measurable is not False]
    if measurable:
        fig.update_yaxes(range=[min(-0.1, min(measurable) - 0.1), max(1.1, max(measurable) + 0.1)])
    return fig


def splice_losses_figure(splice: Mapping[str, SpliceResult]) -> go.Figure:
    """Cross-entropy and KL to the clean model of every variant, with one standard error."""
    from plotly.subplots import make_subplots

    results = list(splice.values())
    names = [r.name for r in results]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=("cross-entropy (nats per token)", "KL to the clean model (nats per token)"))
    fig.add_bar(x=names, y=[r.ce_loss for r in results], name="cross-entropy", row=1, col=1,
                error_y={"type": "data", "array": [r.ce_loss_stderr or 0.0 for r in results]})
    fig.add_bar(x=names, y=[r.kl for r in results], name="KL", row=2, col=1,
                error_y={"type": "data", "array": [r.kl_stderr or 0.0 for r in results]})
    clean = splice.get("clean")
    if clean is not None:
        fig.update_yaxes(range=[0.95 * min(r.ce_loss for r in results), 1.02 * max(r.ce_loss for r in results)],
                         row=1, col=1)
    fig.update_layout(template=TEMPLATE, title="Splice-in cross-entropy and KL (± 1 s.e.)", height=560,
                      showlegend=False)
    fig.update_xaxes(tickangle=-45, row=2, col=1)
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
