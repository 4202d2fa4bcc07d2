"""The evaluation report page: ``templates/evaluation.html.j2`` filled with an :class:`Evaluation`'s report and
its plotly figures (fragments without plotly.js; the page loads plotly.js once, from a file beside it)."""

from __future__ import annotations

from .evaluate import Evaluation
from .figures import (decoder_norms_figure, figure_html, head_output_cosine_figure, head_output_cosine_heatmap,
                      mixed_feature_interference_figure, output_subspace_carry_figure, ranks_figure)
from .report_figures import (attribution_agreement_figure, feature_density_figure, splice_losses_figure,
                             splice_scores_figure)
from ..errors import InputTypeError

QUALITY_COLUMNS = ("l0", "l1", "explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_ratio",
                   "dead_fraction", "dense_fraction", "ce_loss_score", "kl_div_score")


def render_evaluation_page(evaluation: Evaluation, *, plotly_src: str = "plotly.min.js") -> str:
    """The page's HTML. ``plotly_src`` is where the page loads plotly.js from (a path relative to the page)."""
    from ..rendering import render

    if not isinstance(evaluation, Evaluation):
        raise InputTypeError(f"expected an Evaluation, got {type(evaluation).__name__}")
    report = evaluation.report
    analyses = report.analyses
    figures = {
        "splice_scores": splice_scores_figure(report.splice),
        "splice_losses": splice_losses_figure(report.splice),
        "feature_density": feature_density_figure(report.sae_quality),
        "attribution_agreement": attribution_agreement_figure(report.attribution),
        "decoder_norms_training": decoder_norms_figure(analyses.decoder_norms, units="training"),
        "decoder_norms_z": decoder_norms_figure(analyses.decoder_norms, units="z"),
        "ranks": ranks_figure(analyses.ranks),
        "head_output_cosines": head_output_cosine_figure(analyses.head_output_cosines),
        "head_output_cosine_heatmap": head_output_cosine_heatmap(analyses.head_output_cosines),
        "output_subspace_carry": output_subspace_carry_figure(analyses.output_subspace_carry),
        "mixed_feature_interference": mixed_feature_interference_figure(analyses.mixed_feature_interference),
    }
    return render("evaluation.html.j2", report=report, plotly_src=plotly_src, quality_columns=QUALITY_COLUMNS,
                  figures={name: figure_html(fig, div_id=f"sd-figure-{name.replace('_', '-')}")
                           for name, fig in figures.items()})
