"""A self-contained HTML page (plain HTML and CSS, no scripts, nothing fetched) for a decomposition summary."""

from __future__ import annotations

import html
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.2em .45em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l{text-align:left}
.bar{display:inline-block;height:.7em;background:#4a7bd1;vertical-align:middle}
.verdict{background:#fff6e0;border-left:4px solid #d1a04a;padding:.4em .7em}
.bar.w{background:#d18a4a}.muted{color:#777}.atom{white-space:nowrap}
details{margin:.2em 0}summary{cursor:pointer}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def _shares_cell(shares: list[float] | None, css: str = "") -> str:
    if shares is None:
        return "<td class='muted'>–</td>"
    order = sorted(range(len(shares)), key=lambda h: -shares[h])[:3]
    parts = [f"<span class='atom'>h{h} <span class='bar {css}' style='width:{40 * shares[h]:.0f}px'></span> "
             f"{shares[h]:.2f}</span>" for h in order if shares[h] > 0]
    return "<td class='l'>" + "<br>".join(parts) + "</td>"


def _metrics_table(metrics: dict) -> str:
    rows = []
    for name, stats in metrics["metrics"].items():
        rows.append(f"<tr><td class='l'>{_e(name)}</td>" + "".join(
            f"<td>{_fmt(stats.get(k))}</td>" for k in ("mean", "median", "p10", "p90", "n_nonfinite")) + "</tr>")
    return ("<table><tr><th>metric</th><th>mean</th><th>median</th><th>p10</th><th>p90</th><th>non-finite</th></tr>"
            + "".join(rows) + "</table>")


def _head_share_table(summary: dict, result: dict) -> str:
    n = summary["n_heads"]
    weight = summary["weight_head_share_mean"]
    dec = result["metrics"].get("head_mass_share_mean")
    head_row = "".join(f"<th>h{h}</th>" for h in range(n))
    w_row = "".join(f"<td>{weight[h]:.3f}</td>" for h in range(n))
    d_row = "".join(f"<td>{dec[h]:.3f}</td>" for h in range(n)) if dec else f"<td colspan={n}>–</td>"
    return (f"<table><tr><th></th>{head_row}</tr><tr><td class='l'>decoder-weight share (seed: ||t_h||²)</td>{w_row}"
            f"</tr><tr><td class='l'>decomposition mass share</td>{d_row}</tr></table>")


def _feature_rows(features: list[dict], max_features: int) -> str:
    rows = []
    for rec in features[:max_features]:
        atoms = " ".join(
            f"<span class='atom'>h{a['head']}:f{a['feature']} <b>{a['coefficient']:.3f}</b>"
            f"<span class='muted'> ({a['activation_units']:.3g})</span></span><br>" for a in rec["atoms"])
        rows.append(
            f"<tr><td>{rec['feature']}</td><td>{rec['l0']}</td><td>{_fmt(rec['cosine'])}</td>"
            f"<td>{_fmt(rec['relative_error'])}</td><td class='l'>{_e(rec['status'])}</td>"
            f"{_shares_cell(rec['decomposition_head_shares'])}"
            f"{_shares_cell(rec['weight_head_shares'], 'w')}<td class='l'>{atoms or '–'}</td></tr>")
    return "".join(rows)


def render_summary_html(summary: dict, *, max_features: int = 2048) -> str:
    """The page: settings and context, ranks, dataset-level metrics and head shares per space, then one row per
    concat feature (top heads by coefficient mass and by decoder weight, top per-head features with weights)."""
    ctx = "".join(f"<tr><td class='l'>{_e(k)}</td><td class='l'>{_e(v)}</td></tr>"
                  for k, v in summary.get("context", {}).items())
    ranks = summary["ranks"]
    head_ranks = ", ".join(f"h{h}: {r}" for h, r in ranks["head_dictionaries"].items())
    sizes = summary["dictionary_sizes"]
    sizes_text = (f"{next(iter(sizes.values()))} features each" if len(set(sizes.values())) == 1
                  else ", ".join(f"h{h}: {n}" for h, n in sizes.items()))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(summary['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(summary['title'])}</h1>",
        f"<p>{summary['n_targets']} concat-SAE features decomposed into {summary['n_heads']} per-head dictionaries "
        f"({_e(sizes_text)}, d_head = {summary['d_head']}) with <b>{_e(summary['method'])}</b> "
        f"({_e(', '.join(f'{k}={v}' for k, v in summary['params'].items()))}); targets are unit-norm decoder rows "
        f"(already unit norm: {_e(summary['targets']['decoder_already_unit_norm'])}). "
        f"Atoms are unit per-head feature directions; a coefficient in parentheses is the per-head feature's "
        f"activation in its own SAE's units.</p>",
        f"<h2>Context</h2><table>{ctx}</table>" if ctx else "",
        "<h2>Ranks</h2><table>",
        f"<tr><td class='l'>per-head dictionaries</td><td class='l'>{_e(head_ranks)}</td></tr>",
        f"<tr><td class='l'>block dictionary (concatenated z)</td><td>{ranks['block_dictionary']}</td></tr>",
        f"<tr><td class='l'>concat SAE decoder</td><td>{ranks['concat_decoder']}</td></tr>",
        (f"<tr><td class='l'>dictionary mixed through W_O</td><td>{ranks['mixed_dictionary']}</td></tr>"
         if "mixed_dictionary" in ranks else ""),
        "</table>",
    ]
    for space, result in summary["results"].items():
        metrics = result["metrics"]
        agree = result.get("agreement_weight_vs_decomposition") or {}
        legend = summary.get("status_legend", {})
        parts += [
            f"<h2>Space: {_e(space)}</h2>",
            f"<p class='verdict'>{_e(result.get('verdict', ''))}</p>",
            "<p>Statuses: " + "; ".join(
                f"<b>{_e(k)}</b> ({_e(legend.get(k, {}).get('meaning', ''))}): {v}"
                for k, v in metrics['status_counts'].items()) + ".</p>",
            "<p>Top head by decoder weight equals top head by "
            f"coefficient mass for {100 * agree.get('top_head_agreement', float('nan')):.1f}% of features "
            f"(mean total-variation distance {agree.get('mean_total_variation', float('nan')):.3f}).</p>",
            _metrics_table(metrics),
            _head_share_table(summary, result),
        ]
        n = len(result["features"])
        shown = min(n, max_features)
        parts += [
            f"<details{' open' if space == summary['spaces'][0] else ''}><summary>Features ({shown} of {n} shown)"
            "</summary><table><tr><th>feature</th><th>L0</th><th>cosine</th><th>rel. error</th><th>status</th>"
            "<th>top heads (coefficient mass)</th><th>top heads (decoder weight)</th>"
            "<th>top per-head features: head:feature coefficient (activation units)</th></tr>",
            _feature_rows(result["features"], max_features),
            "</table></details>",
        ]
    parts.append(f"<p class='muted'>Generated by sparsedecomp in {summary.get('elapsed_s', '?')} s.</p></body></html>")
    return "\n".join(parts)
