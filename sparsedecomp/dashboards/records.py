"""Feature records (docs/dashboards.md, "The feature record") and index rows from :class:`~.gather.DashboardData`.

Tensors become plain lists once per SAE (``tolist``), then each record is assembled from those lists: linear in the
number of features and examples, no tensor work per feature. Floats are rounded to :data:`DIGITS` significant
digits (a page stays small); NaN becomes ``None``. Hrefs are relative to the feature page (``<sae>/f/<n>.html``).

Decomposition links: every non-zero entry ``(f, j, c)`` of a decomposition's codes in the per-head SAEs' own units
(:meth:`~sparsedecomp.decomposition.Decomposition.feature_codes`) links concat feature ``f`` to feature
``dictionary.feature[j]`` of head ``dictionary.head[j]`` with coefficient ``c``; the per-head page lists the same
entry as a back-link (``used_by``), so one is the exact inverse of the other. Explained fraction ``1 -
relative_error^2``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..evaluation.attribution import DFA, WEIGHT
from ..evaluation.metrics import cosine, l0, relative_error
from ..naming import CONCAT_NAME, head_name
from .gather import DashboardData, GatheredSAE
from .data import left_out
from .histograms import density_histogram

DIGITS = 4


def feature_href(sae: str, feature: int, *, from_sae: str) -> str:
    """The href of ``sae``'s feature page from a page of ``from_sae``'s features."""
    return f"{feature}.html" if sae == from_sae else f"../../{sae}/f/{feature}.html"


def r(value: float) -> float | None:
    """``value`` to :data:`DIGITS` significant digits; ``None`` for NaN / infinite."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{DIGITS}g}")


def round_significant(values: Tensor, digits: int = DIGITS) -> Tensor:
    """``values`` rounded to ``digits`` significant digits, elementwise in float64 (what :func:`r` does to one value,
    for whole tensors at once: pages hold hundreds of thousands of numbers). A power of ten at most ``1e22`` is an
    exact double, so ``round(x * 10^k) / 10^k`` is the double nearest the rounded decimal."""
    x = values.double()
    places = digits - 1 - torch.floor(torch.log10(x.abs().clamp_min(1e-300)))
    up, down = torch.pow(10.0, places.clamp_min(0)), torch.pow(10.0, (-places).clamp_min(0))
    rounded = torch.where(places >= 0, torch.round(x * up) / up, torch.round(x / down) * down)
    return torch.where(x == 0, x, rounded)


def _rl(values: Sequence[float], digits: int = DIGITS) -> list:
    return [None if v is None or not math.isfinite(v) else float(f"{v:.{digits}g}") for v in values]


DFA_LEVELS = 1000
"""DFA tables are the bulk of a page (heads x window source positions per example). Each example's table is stored
as integers ``q`` with ``value = q * unit`` and ``unit = max |value| / DFA_LEVELS`` (rounded to :data:`DIGITS`
digits): three digits at the example's largest term, every term within ``unit / 2``, and the many negligible terms
(later positions, other heads) written as ``0``. This is what the heatmap shows, at about a third of the bytes of
rounded floats."""


MAX_LINKED_ATOMS = 32
"""Per concat feature and setting, the largest coefficients linked (a dense ``pinv`` code has thousands); the
panel says how many atoms the code has in all, and the back-links are the inverse of exactly these links."""


def decomposition_links(data: DashboardData, *, max_atoms: int = MAX_LINKED_ATOMS
                        ) -> dict[str, list[tuple[int, int, int, float]]]:
    """``label -> [(concat_feature, head, head_feature, coefficient)]``: per concat feature its ``max_atoms``
    largest ``|coefficient|`` non-zero code entries, largest first."""
    links = {}
    for label, decomposition in data.decompositions.items():
        row, atom, value = decomposition.feature_codes().nonzero_entries()
        dictionary = decomposition.dictionary
        order = torch.argsort(value.abs(), descending=True, stable=True)
        order = order[torch.argsort(row[order], stable=True)]
        # rank of each entry within its feature (entries are grouped by feature, largest first)
        sorted_rows = row[order]
        starts = torch.searchsorted(sorted_rows, sorted_rows, right=False)
        order = order[(torch.arange(len(order)) - starts) < max_atoms]
        head, feature = dictionary.head[atom[order]].tolist(), dictionary.feature[atom[order]].tolist()
        links[label] = list(zip(row[order].tolist(), head, feature, value[order].tolist()))
    return links


def decomposition_quality(data: DashboardData) -> dict[str, dict[str, list]]:
    """``label -> {"cosine", "relative_error", "l0"}`` per concat feature."""
    out = {}
    for label, d in data.decompositions.items():
        out[label] = {"cosine": cosine(d.targets, d.reconstruction).tolist(),
                      "relative_error": relative_error(d.targets, d.reconstruction).tolist(),
                      "l0": l0(d.codes).tolist()}
    return out


def group_links(links: dict[str, list[tuple[int, int, int, float]]]) -> dict[str, dict]:
    """``links`` grouped once for page building: ``label -> {"by_feature": {f: [(h, j, c)]}, "by_atom": {(h, j):
    [(f, c)]}}`` (the back-links of a per-head feature are the entries that name it)."""
    grouped = {}
    for label, entries in links.items():
        by_feature: dict[int, list] = defaultdict(list)
        by_atom: dict[tuple[int, int], list] = defaultdict(list)
        for f, h, j, c in entries:
            by_feature[f].append((h, j, c))
            by_atom[(h, j)].append((f, c))
        grouped[label] = {"by_feature": by_feature, "by_atom": by_atom}
    return grouped


def sae_records(data: DashboardData, name: str, token_str: Callable[[int], str], *,
                links: dict | None = None, quality: dict | None = None,
                features: range | None = None) -> list[dict[str, Any]]:
    """The feature records of SAE ``name`` (see the module docstring), for ``features`` (a range; default all).
    Pages are written a batch at a time, so only one batch's records are ever held. ``links`` is
    :func:`group_links` of :func:`decomposition_links` (computed here when not given)."""
    g = data.saes[name]
    links = group_links(decomposition_links(data)) if links is None else links
    quality = decomposition_quality(data) if quality is None else quality
    features = range(g.sae.d_sae) if features is None else features
    sl = slice(features.start, features.stop)
    d = g.data
    density, n_firing = d.density[sl].tolist(), d.n_firing[sl].tolist()
    max_act, mean_act = d.max_activation[sl].tolist(), d.mean_firing_activation()[sl].tolist()
    norms = g.sae.W_dec[sl].norm(dim=1).tolist()
    scale = g.sae.provenance.get("input_scale")
    hist = g.activation_histograms
    # The histogram bins a uniform sample of the non-zero activations: scaled by n_firing / n_sampled, its counts
    # estimate tokens (exact where the sample holds them all).
    n_sampled = d.n_sampled[sl]
    scale_up = d.n_firing[sl].double() / n_sampled.clamp_min(1).double()
    hist_counts = torch.round(hist.counts[sl].double() * scale_up[:, None]).long().tolist()
    hist_lo, hist_hi, hist_bins = hist.lo[sl].tolist(), hist.hi[sl].tolist(), hist.n_bins[sl].tolist()
    n_sampled = n_sampled.tolist()
    lg = g.logits
    top_ids, top_v = lg.top_ids[sl].tolist(), lg.top_values[sl].tolist()
    bot_ids, bot_v = lg.bottom_ids[sl].tolist(), lg.bottom_values[sl].tolist()
    lh = lg.histogram
    lh_lo, lh_hi, lh_bins, lh_counts = lh.lo[sl].tolist(), lh.hi[sl].tolist(), lh.n_bins[sl].tolist(), lh.counts[sl].tolist()
    corr_i, corr_c = g.correlated.indices[sl].tolist(), g.correlated.cosine[sl].tolist()
    bounds = g.quantiles.bounds[sl].tolist()
    examples = _examples(g, token_str, sl)
    attribution = _attribution(data, sl) if name == CONCAT_NAME else None
    head = None if name == CONCAT_NAME else int(name.split("_")[1])
    k = g.examples.group.tolist().count(-1)
    densities = density_histogram(d.density, max(d.n_tokens, 1))  # the same for every page of the SAE
    density_figure = {"log10_edges": _rl(densities.log10_edges.tolist()), "counts": densities.counts.tolist(),
                      "n_dead": densities.n_dead}
    records = []
    for i, f in enumerate(features):
        shown = examples[i]
        groups = []
        if n_firing[i] > 0:
            b = bounds[i]
            for q in range(len(b) - 1):
                groups.append({"lo": r(b[q]), "hi": r(b[q + 1]),
                               "examples": [e for e in shown[k:] if e["_group"] == q]})
        for e in shown:
            e.pop("_group", None)
        panel, used_by = [], []
        for label, grouped in links.items():
            if head is None:
                atoms = [{"head": h, "feature": j, "coefficient": r(c), "href": feature_href(head_name(h), j, from_sae=name)}
                         for h, j, c in grouped["by_feature"].get(f, [])]
                q = quality[label]
                panel.append({"label": label, "cosine": r(q["cosine"][f]), "relative_error": r(q["relative_error"][f]),
                              "l0": int(q["l0"][f]), "n_atoms_listed": len(atoms), "atoms": atoms})
            else:
                used_by += [{"label": label, "feature": cf, "coefficient": r(c),
                             "href": feature_href(CONCAT_NAME, cf, from_sae=name)}
                            for cf, c in grouped["by_atom"].get((head, f), [])]
        records.append({
            "sae": name, "feature": f, "title": f"{name.replace('_', ' ')} feature {f}",
            "density": r(density[i]), "n_firing": n_firing[i], "n_tokens": d.n_tokens,
            "max_activation": r(max_act[i]), "mean_firing_activation": r(mean_act[i]),
            # the DFA splits the pre-activation, which is linear in z; the rule says when it becomes an activation
            "firing_rule": g.sae.activation.describe_feature(f),
            "density_histogram": density_figure,
            # training units: the norm before an input scale was folded in (the same when none was)
            "decoder_norm": {"sae_units": r(norms[i]), "training_units": r(norms[i] * (scale or 1.0))},
            "activation_histogram": {**_histogram(hist_lo[i], hist_hi[i], hist_bins[i], hist_counts[i]),
                                     "sample_size": n_sampled[i]},
            "logits": {"top": [[token_str(t), r(v)] for t, v in zip(top_ids[i], top_v[i])],
                       "bottom": [[token_str(t), r(v)] for t, v in zip(bot_ids[i], bot_v[i])],
                       "histogram": _histogram(lh_lo[i], lh_hi[i], lh_bins[i], lh_counts[i])},
            "examples": {"top": shown[:k], "quantiles": groups},
            "correlated": [{"feature": j, "cosine": r(c), "href": feature_href(name, j, from_sae=name)}
                           for j, c in zip(corr_i[i], corr_c[i])],
            "attribution": None if attribution is None else attribution[i],
            "decomposition": panel,
            "used_by": used_by,
        })
    return records


def _histogram(lo: float, hi: float, n_bins: int, counts: list[int]) -> dict[str, list]:
    step = (hi - lo) / n_bins if math.isfinite(lo) and math.isfinite(hi) else 0.0
    return {"edges": [r(lo + i * step) for i in range(n_bins + 1)], "counts": counts[:n_bins]}


def _examples(g: GatheredSAE, token_str: Callable[[int], str], sl: slice) -> list[list[dict[str, Any]]]:
    """Per feature of ``sl``, its shown examples as EXAMPLE dicts (filled slots only; ``_group`` marks the group)."""
    ex = g.examples
    ctx, pos, val = ex.context[sl].tolist(), ex.position[sl].tolist(), ex.value[sl].tolist()
    group = ex.group.tolist()
    ids = g.windows.token_ids[sl].tolist()
    # Tokens left out of the statistics (BOS, special tokens) are shown, greyed, with no activation.
    excluded = left_out(g.windows.token_ids[sl], g.windows.positions[sl], exclude_bos=g.data.exclude_bos,
                        ignore=torch.tensor(g.data.ignore_tokens, dtype=torch.long)) & g.windows.valid[sl]
    excluded_at = excluded.tolist()
    # Rounded as tensors, not number by number: these two are most of a page's numbers.
    acts = round_significant(g.window_acts[sl].masked_fill(excluded, 0.0)).tolist()
    dfa_units, dfa = (None, None) if g.dfa is None else quantize_dfa(g.dfa[sl].transpose(2, 3))  # (n, e, heads, W)
    before = None if g.dfa_before_window is None else round_significant(g.dfa_before_window[sl]).tolist()
    bias_enc, bias_dec = g.dfa_bias_encoder[sl].tolist(), g.dfa_bias_decoder[sl].tolist()
    left = g.windows.left
    out = []
    for f in range(len(ctx)):
        row = []
        for e in range(len(ctx[f])):
            if ctx[f][e] < 0:
                continue
            window = ids[f][e]
            first = next(i for i, t in enumerate(window) if t >= 0)
            last = max(i for i, t in enumerate(window) if t >= 0) + 1
            item = {"context": ctx[f][e], "position": pos[f][e], "value": r(val[f][e]),
                    "tokens": [token_str(t) for t in window[first:last]], "acts": acts[f][e][first:last],
                    "left_out": [i for i, x in enumerate(excluded_at[f][e][first:last]) if x],
                    "focus": left - first,
                    "dfa": None if dfa is None else {"unit": dfa_units[f][e],
                                                     "heads": [h[first:last] for h in dfa[f][e]],
                                                     "before_window": before[f][e],
                                                     "bias": {"encoder": r(bias_enc[f]), "decoder": r(bias_dec[f])}},
                    "_group": group[e]}
            row.append(item)
        out.append(row)
    return out


def quantize_dfa(dfa: Tensor, levels: int = DFA_LEVELS) -> tuple[list, list]:
    """``(units, q)`` as lists: per example (all dims but the last two) ``unit = max |dfa| / levels`` rounded to
    :data:`DIGITS` significant digits, and ``q = round(dfa / unit)`` as integers (all ``0`` where the example's DFA
    is all zero, with unit ``0``), so that ``|dfa - q * unit| <= unit / 2`` term by term."""
    x = dfa.double()
    unit = round_significant(x.abs().amax(dim=(-2, -1)) / levels)
    q = torch.where(unit[..., None, None] > 0, torch.round(x / unit.clamp_min(1e-300)[..., None, None]), 0.0)
    return unit.tolist(), q.to(torch.int64).tolist()


def dfa_values(dfa: dict[str, Any]) -> list[list[float]]:
    """The DFA table of an EXAMPLE record (its ``"dfa"``) as floats, ``q * unit`` (to :data:`DIGITS` digits)."""
    unit = dfa["unit"]
    return [[float(f"{q * unit:.{DIGITS}g}") for q in row] for row in dfa["heads"]]


def _attribution(data: DashboardData, sl: slice) -> list[dict[str, Any]]:
    a = data.attribution
    shares = {m: a.shares[m][sl].tolist() for m in a.methods if not m.endswith("_squared") or m == "weight_squared"}
    top = {m: a.top_head(m)[sl].tolist() for m in shares}
    tv = driving = None
    if DFA in a.shares:
        act, wt = a.shares[DFA][sl], a.shares[WEIGHT][sl]
        tv = (0.5 * (act - wt).abs().sum(dim=1)).tolist()
        driving = (act - wt).nan_to_num(float("-inf")).argmax(dim=1).tolist()
    out = []
    for f in range(len(next(iter(shares.values())))):
        methods = {m: (None if any(math.isnan(v) for v in s[f]) else _rl(s[f])) for m, s in shares.items()}
        methods.setdefault(DFA, None)
        out.append({"methods": methods, "top_heads": {m: t[f] for m, t in top.items()},
                    "disagreement": None if tv is None or not math.isfinite(tv[f]) else
                    {"total_variation": r(tv[f]), "driving_head": driving[f]}})
    return out


def index_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"sae", "columns", "rows"}`` of the SAE's index (``window.SD_INDEX``): one row per record."""
    name = records[0]["sae"]
    columns = ["feature", "density", "max_activation", "mean_firing_activation", "top_tokens"]
    methods = list(records[0]["attribution"]["top_heads"]) if records[0]["attribution"] else []
    labels = [p["label"] for p in records[0]["decomposition"]]
    columns += [f"top_head:{m}" for m in methods]
    columns += [c for label in labels for c in (f"l0:{label}", f"explained:{label}")]
    if name != CONCAT_NAME:
        columns.append("n_used_by")
    rows = []
    for rec in records:
        tokens = list(dict.fromkeys(e["tokens"][e["focus"]] for e in rec["examples"]["top"]))[:3]
        row = [rec["feature"], rec["density"], rec["max_activation"], rec["mean_firing_activation"], tokens]
        row += [rec["attribution"]["top_heads"][m] for m in methods]
        for p in rec["decomposition"]:
            err = p["relative_error"]
            row += [p["l0"], None if err is None else r(1 - err * err)]
        if name != CONCAT_NAME:
            row.append(len(rec["used_by"]))
        rows.append(row)
    return {"sae": name, "columns": columns, "rows": rows}
