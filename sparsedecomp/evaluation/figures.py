"""Plotly figures of the analyses in :mod:`sparsedecomp.evaluation.analyses`.

Every builder takes a result dataclass and returns a ``plotly.graph_objects.Figure`` drawn from the result alone
(histogram counts, precomputed box statistics, the bounded token sample), so a figure stays as light as its result.
:func:`figure_html` turns a figure into an HTML fragment without plotly.js: the report ships plotly.js once.
"""

from __future__ import annotations

from typing import Literal

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..naming import display_name
from ..errors import InputError, InputTypeError
from .analyses import (DecoderNormsReport, HeadOutputCosines, Histogram, MixedFeatureInterference,
                       OutputSubspaceCarry, RankReport, Summary)

TEMPLATE = "plotly_white"
UNIT_TITLES = {
    "training": "||W_dec[i]|| in training units (inputs as scaled in training, s * z)",
    "z": "||W_dec[i]|| in units of unscaled z (as the SAE reads it now)",
}


def _require(result: object, kind: type, name: str) -> None:
    if not isinstance(result, kind):
        raise InputTypeError(f"{name} must be a {kind.__name__}, got {type(result).__name__}")


def _histogram_bars(hist: Histogram, name: str) -> go.Bar:
    width = (hist.hi - hist.lo) / len(hist.counts)
    return go.Bar(x=hist.centers, y=hist.counts, width=width, name=name, opacity=0.6)


def _box(summary: Summary, name: str) -> go.Box:
    """A box from precomputed statistics (whiskers at min and max); one-element lists are plotly's format."""
    return go.Box(name=name, q1=[summary.q1], median=[summary.median], q3=[summary.q3], lowerfence=[summary.min],
                  upperfence=[summary.max], mean=[summary.mean], sd=[summary.std], boxmean="sd")


def _heads_heatmap(matrix, *, name: str, colorscale: str = "Viridis", zmin: float | None = None,
                   zmax: float | None = None, showscale: bool = True) -> go.Heatmap:
    n = len(matrix)
    labels = [f"head {h}" for h in range(n)]
    return go.Heatmap(z=[list(row) for row in matrix], x=labels, y=labels, name=name, colorscale=colorscale,
                      zmin=zmin, zmax=zmax, showscale=showscale, hoverongaps=False)


def decoder_norms_figure(report: DecoderNormsReport, *, units: Literal["training", "z"] = "training") -> go.Figure:
    """Histograms of decoder norms, one bar trace per SAE, in ``units`` (named in the x-axis title). In ``"z"``
    units, SAEs whose input scale is unknown have no trace and are named in the title."""
    _require(report, DecoderNormsReport, "report")
    if units not in UNIT_TITLES:
        raise InputError(f"units must be 'training' or 'z', got {units!r}")
    fig = go.Figure()
    skipped = []
    for item in report.saes:
        hist = item.histogram_training_units if units == "training" else item.histogram_z_units
        if hist is None:
            skipped.append(display_name(item.name))
            continue
        fig.add_trace(_histogram_bars(hist, display_name(item.name)))
    title = f"Decoder norms ({units} units)"
    if skipped:
        title += f"; input scale unknown, not shown: {', '.join(skipped)}"
    # Log counts: one SAE's many features (the concat SAE's) would otherwise flatten every other histogram.
    fig.update_layout(title=title, xaxis_title=UNIT_TITLES[units], yaxis_title="features (log scale)",
                      yaxis_type="log", barmode="overlay", template=TEMPLATE)
    return fig


def ranks_figure(report: RankReport) -> go.Figure:
    """Bars of each matrix's numerical rank beside its largest possible rank; the hover text gives the singular
    value gap ``sigma_r / sigma_{r+1}`` and the tolerance."""
    _require(report, RankReport, "report")
    names = [e.name for e in report.entries]
    hover = [f"{e.n_rows} x {e.n_cols}, rtol {e.rtol:.3g}, gap " + ("full rank" if e.gap is None else f"{e.gap:.3g}")
             for e in report.entries]
    fig = go.Figure([
        go.Bar(x=names, y=[e.rank for e in report.entries], name="numerical rank", hovertext=hover),
        go.Bar(x=names, y=[e.max_rank for e in report.entries], name="largest possible rank"),
    ])
    fig.update_layout(title="Ranks of the dictionaries", yaxis_title="rank", barmode="group", template=TEMPLATE)
    return fig


def head_output_cosine_figure(result: HeadOutputCosines) -> go.Figure:
    """The seed's line and box plots for every pair of heads: left, the cosine of the two heads' outputs at the
    first tokens (the bounded sample); right, a box per pair from the streamed statistics (quartiles estimated
    from the histogram, whiskers at the exact min and max)."""
    _require(result, HeadOutputCosines, "result")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                        subplot_titles=("First tokens (click a pair in the legend to add it)",
                                        "All tokens, one box per pair (quartiles from bins)"))
    for k, item in enumerate(result.pairs):
        name = f"heads {item.heads[0]}-{item.heads[1]}"
        # Every pair's line on one axis is unreadable: the first three are drawn, the others a click away.
        fig.add_trace(go.Scatter(y=list(item.sample), mode="lines", line={"width": 1}, name=name, legendgroup=name,
                                 visible=True if k < 3 else "legendonly"), row=1, col=1)
        fig.add_trace(_box(item.summary, name).update(x=[name], legendgroup=name, showlegend=False), row=1, col=2)
    fig.update_layout(title=f"Cosine between heads' outputs z_h W_O[h] ({result.n_tokens} tokens)",
                      template=TEMPLATE)
    fig.update_xaxes(title_text="token", row=1, col=1)
    fig.update_yaxes(title_text="cosine", row=1, col=1)
    return fig


def head_output_cosine_heatmap(result: HeadOutputCosines) -> go.Figure:
    """Mean cosine between every pair of heads' outputs over tokens (diagonal empty)."""
    _require(result, HeadOutputCosines, "result")
    fig = go.Figure(_heads_heatmap(result.mean_matrix(), name="mean cosine", colorscale="RdBu", zmin=-1, zmax=1))
    fig.update_layout(title="Mean cosine between heads' outputs", template=TEMPLATE)
    return fig


def output_subspace_carry_figure(result: OutputSubspaceCarry) -> go.Figure:
    """Heatmaps of the mean and max share of a head's mixed features ``d_j W_O[h]`` (rows) in the row space of
    another head's ``W_O[g]`` (columns)."""
    _require(result, OutputSubspaceCarry, "result")
    chance = sum(result.chance_fraction) / len(result.chance_fraction)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean over features", "max over features"))
    fig.add_trace(_heads_heatmap(result.mean_fraction, name="mean share", zmin=0, zmax=1), row=1, col=1)
    fig.add_trace(_heads_heatmap(result.max_fraction, name="max share", zmin=0, zmax=1, showscale=False),
                  row=1, col=2)
    fig.update_layout(title=f"Share of ||d_j W_O[h]||^2 in the row space of W_O[g] (chance about {chance:.3f})",
                      template=TEMPLATE)
    fig.update_yaxes(title_text="feature's head h", row=1, col=1)
    fig.update_xaxes(title_text="output subspace of head g")
    return fig


def mixed_feature_interference_figure(result: MixedFeatureInterference) -> go.Figure:
    """Heatmaps over pairs of heads (row: the features' head, column: the other head) of the median of
    ``max_j' |cos|`` and of the share of features above the threshold; the diagonal is the within-head baseline."""
    _require(result, MixedFeatureInterference, "result")
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "median over features of max |cos|", f"share of features with max |cos| > {result.threshold:g}"))
    fig.add_trace(_heads_heatmap(result.matrix("median"), name="median max |cos|", zmin=0, zmax=1), row=1, col=1)
    fig.add_trace(_heads_heatmap(result.matrix("fraction_above"), name="share above threshold", zmin=0, zmax=1,
                                 showscale=False), row=1, col=2)
    fig.update_layout(title="Interference between W_O-mixed features of heads", template=TEMPLATE)
    fig.update_yaxes(title_text="features of head h", row=1, col=1)
    fig.update_xaxes(title_text="nearest feature among head g")
    return fig


def mixed_feature_interference_boxes(result: MixedFeatureInterference) -> go.Figure:
    """One box per pair of heads of ``max_j' |cos(d_j W_O[h], d_j' W_O[g])|`` over features ``j`` of ``h``
    (exact quartiles, whiskers at min and max); the within-head baselines come first."""
    _require(result, MixedFeatureInterference, "result")
    ordered = sorted(result.pairs, key=lambda p: (not p.within_head, p.heads))
    fig = go.Figure([_box(p.summary, f"{p.heads[0]}->{p.heads[1]}" + (" (within)" if p.within_head else ""))
                     for p in ordered])
    fig.update_layout(title="max |cos| of each W_O-mixed feature against another head's features",
                      yaxis_title="max |cos|", showlegend=False, template=TEMPLATE)
    return fig


def figure_html(fig: go.Figure, *, div_id: str | None = None) -> str:
    """An HTML fragment (a ``div`` and its script) drawing ``fig`` with the page's own plotly.js. ``div_id`` names
    the ``div`` (plotly draws a random one otherwise, so the same report would differ from run to run)."""
    _require(fig, go.Figure, "fig")
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)
