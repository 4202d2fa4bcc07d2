"""A fake dashboard site in the layout of docs/dashboards.md, written from synthetic feature records through the
package's templates and assets: the front end's tests open it without running any model.

The world: a concat SAE of ``n_concat`` features over ``len(HEADS)`` heads, and one per-head SAE per head of
``n_head_features`` features. Each concat feature's decomposition (two solver settings) uses per-head features, and
each per-head record lists the concat features that use it (``used_by``, the inverse of those links). Some strings
are hostile on purpose (:data:`HOSTILE_TOKENS`: markup, a script end tag, a ``javascript:`` href) and one feature's
logits span a degenerate range.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import plotly.offline

from sparsedecomp.rendering import render

HEADS = (0, 1)
SETTINGS = ("omp k=3", "lasso a=0.05")
HOSTILE_TOKENS = ("</script><script>window.SD_PWNED=1</script>", "<img src=x onerror=\"window.SD_PWNED=2\">",
                  "<!--", "&amp;", " the", "\n", "\u00e9t\u00e9")
HOSTILE_HREF = "javascript:window.SD_PWNED=3"
DEGENERATE_FEATURE = 3  # its logit histogram spans 1e-9
INDEX_COLUMNS = ["feature", "density", "max_activation", "top_tokens", "top_head:weight", "top_head:dfa",
                 "l0:omp k=3", "cosine:omp k=3"]


@dataclass
class FixtureSite:
    """The written site: its folder and every record by (sae, feature)."""

    root: Path
    records: dict[tuple[str, int], dict] = field(default_factory=dict)

    def page(self, sae: str, feature: int) -> Path:
        return self.root / sae / "f" / f"{feature}.html"


def example(rng: random.Random, *, value: float, n_heads: int, window: int, with_dfa: bool) -> dict:
    """One EXAMPLE: a window whose ranked token (``focus``) has activation ``value``; DFA by head whose sum plus the
    bias terms is the pre-activation ``value``."""
    focus = window - 5 if window > 5 else window - 1
    tokens = [rng.choice(HOSTILE_TOKENS) if rng.random() < 0.3 else f" w{rng.randrange(500)}" for _ in range(window)]
    acts = [round(rng.random() * value, 4) if rng.random() < 0.4 else 0.0 for _ in range(window)]
    acts[focus] = value
    dfa = None
    if with_dfa:
        bias = {"encoder": -0.1, "decoder": 0.05}
        heads = [[0.0 if i > focus else rng.random() for i in range(window)] for _ in range(n_heads)]
        before = [round(0.02 * (h + 1), 4) for h in range(n_heads)]  # what the sources before the window carry
        total = sum(map(sum, heads))
        scale = (value - bias["encoder"] - bias["decoder"] - sum(before)) / total
        # stored as the pages store it: integers q with value q * unit, unit = max |value| / 1000
        unit = float(f"{max(map(max, heads)) * scale / 1000:.4g}")
        dfa = {"unit": unit, "heads": [[round(v * scale / unit) for v in row] for row in heads],
               "before_window": before, "bias": bias}
    left_out = [0] if rng.random() < 0.5 else []  # a BOS at the window's start, shown greyed
    for i in left_out:
        acts[i] = 0.0
    return {"context": rng.randrange(1000), "position": rng.randrange(5, 128), "value": value, "tokens": tokens,
            "acts": acts, "focus": focus, "left_out": left_out, "dfa": dfa}


def histogram(lo: float, hi: float, n_bins: int, rng: random.Random) -> dict:
    step = (hi - lo) / n_bins
    return {"edges": [lo + i * step for i in range(n_bins + 1)], "counts": [rng.randrange(1, 200) for _ in range(n_bins)]}


def feature_record(sae: str, feature: int, *, n_heads: int = len(HEADS), n_top: int = 5, n_groups: int = 3,
                   per_group: int = 2, window: int = 17, seed: int = 0) -> dict:
    """A synthetic record of docs/dashboards.md for ``sae`` ("concat" or "head_<h>"); links (decomposition,
    used_by, correlated) are left empty for :func:`write_fixture_site` to fill."""
    rng = random.Random(f"{seed}:{sae}:{feature}")
    concat = sae == "concat"
    max_act = round(1 + 9 * rng.random(), 4)
    top = [example(rng, value=round(max_act * (1 - 0.02 * k), 4), n_heads=n_heads if concat else 1, window=window,
                   with_dfa=True) for k in range(n_top)]
    bounds = [max_act * (g + 1) / (n_groups + 1) for g in range(n_groups + 1)]
    groups = [{"lo": round(bounds[g], 4), "hi": round(bounds[g + 1], 4),
               "examples": [example(rng, value=round(rng.uniform(bounds[g], bounds[g + 1]), 4),
                                    n_heads=n_heads if concat else 1, window=window, with_dfa=True)
                            for _ in range(per_group)]} for g in range(n_groups)]
    lo, hi = (0.1, 0.1 + 1e-9) if feature == DEGENERATE_FEATURE else (-2.0, 2.5)
    n_firing = rng.randrange(1, 5000)
    attribution = None
    if concat:
        shares = [rng.random() for _ in range(n_heads)]
        methods = {name: [round(s / sum(shares), 4) for s in shares] for name in ("weight", "weight_squared", "encoder")}
        dfa_share = list(reversed(methods["weight"]))
        methods["dfa"] = dfa_share
        methods[f"decomposition:{SETTINGS[0]}"] = methods["weight"]
        top_heads = {k: max(range(n_heads), key=v.__getitem__) for k, v in methods.items()}
        tv = round(0.5 * sum(abs(a - b) for a, b in zip(methods["weight"], dfa_share)), 4)
        attribution = {"methods": methods, "top_heads": top_heads,
                       "disagreement": {"total_variation": tv, "driving_head": top_heads["dfa"]}}
    return {
        "sae": sae, "feature": feature, "title": f"{sae} feature {feature}",
        "density": n_firing / 200_000, "n_firing": n_firing, "n_tokens": 200_000,
        "density_histogram": {"log10_edges": [-6 + 0.25 * i for i in range(25)],
                              "counts": [rng.randrange(40) for _ in range(24)], "n_dead": 3},
        "max_activation": max_act, "mean_firing_activation": round(max_act / 3, 4),
        "decoder_norm": {"sae_units": 1.0, "training_units": round(0.5 + rng.random(), 4)},
        "activation_histogram": histogram(0.0, max_act, 40, rng),
        "logits": {"top": [[rng.choice(HOSTILE_TOKENS), round(hi - 0.1 * k, 4)] for k in range(10)],
                   "bottom": [[f" b{k}", round(lo + 0.1 * k, 4)] for k in range(10)],
                   "histogram": histogram(lo, hi, 40, rng)},
        "examples": {"top": top, "quantiles": groups},
        "correlated": [], "attribution": attribution, "decomposition": [], "used_by": [],
    }


def link_records(records: dict[tuple[str, int], dict], n_concat: int, n_head_features: int) -> None:
    """Fill decomposition atoms, their inverse (used_by) and correlated features, each with a relative href."""
    for f in range(n_concat):
        rec = records[("concat", f)]
        for s, label in enumerate(SETTINGS):
            atoms = []
            for j in range(2 + s):
                head, hf = HEADS[(f + j) % len(HEADS)], (3 * f + j + s) % n_head_features
                coefficient = round(1.0 / (j + 1), 4)
                atoms.append({"head": head, "feature": hf, "coefficient": coefficient,
                              "href": f"../../head_{head}/f/{hf}.html"})
                records[(f"head_{head}", hf)]["used_by"].append(
                    {"label": label, "feature": f, "coefficient": coefficient, "href": f"../../concat/f/{f}.html"})
            rec["decomposition"].append({"label": label, "cosine": 0.9, "relative_error": 0.3, "l0": len(atoms),
                                         "atoms": atoms})
    for (sae, f), rec in records.items():
        n = n_concat if sae == "concat" else n_head_features
        rec["correlated"] = [{"feature": g, "cosine": round(0.9 - 0.1 * k, 3), "href": f"{g}.html"}
                             for k, g in enumerate(((f + 1) % n, (f + 7) % n))]
    records[("concat", 0)]["correlated"].append({"feature": 9999, "cosine": 0.1, "href": HOSTILE_HREF})


def index_row(rec: dict) -> list:
    """One row of features.js in INDEX_COLUMNS order."""
    att = rec["attribution"]
    omp = next((s for s in rec["decomposition"] if s["label"] == SETTINGS[0]), None)
    return [rec["feature"], rec["density"], rec["max_activation"], [t for t, _ in rec["logits"]["top"][:3]],
            att["top_heads"]["weight"] if att else None, att["top_heads"]["dfa"] if att else None,
            omp["l0"] if omp else None, omp["cosine"] if omp else None]


def write_assets(root: Path) -> None:
    """DIR/assets: the package's dashboard.js and dashboard.css, and the installed plotly's own script."""
    assets = root / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("dashboard.js", "dashboard.css"):
        with resources.as_file(resources.files("sparsedecomp.dashboards") / "assets" / name) as source:
            shutil.copyfile(source, assets / name)
    (assets / "plotly.min.js").write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")


def write_fixture_site(root: Path, *, n_concat: int = 150, n_head_features: int = 12) -> FixtureSite:
    """Write the site into ``root`` (created) and return it."""
    site = FixtureSite(root)
    saes = ["concat", *(f"head_{h}" for h in HEADS)]
    for sae in saes:
        for f in range(n_concat if sae == "concat" else n_head_features):
            site.records[(sae, f)] = feature_record(sae, f)
    link_records(site.records, n_concat, n_head_features)
    write_assets(root)
    for sae in saes:
        features = sorted(f for s, f in site.records if s == sae)
        (root / sae / "f").mkdir(parents=True, exist_ok=True)
        for f in features:
            rec = site.records[(sae, f)]
            site.page(sae, f).write_text(render("dashboard/feature.html.j2", record_json=json.dumps(rec),
                                                title=rec["title"], assets="../../assets", site_root="../.."),
                                         encoding="utf-8")
        data = {"sae": sae, "columns": INDEX_COLUMNS, "rows": [index_row(site.records[(sae, f)]) for f in features]}
        (root / sae / "features.js").write_text(f"window.SD_INDEX = {json.dumps(data)};\n", encoding="utf-8")
        (root / sae / "index.html").write_text(
            render("dashboard/index.html.j2", sae=sae, title=f"{sae}: features", assets="../assets", site_root="..",
                   data_src="features.js", n_features=len(features)), encoding="utf-8")
    (root / "index.html").write_text(render(
        "dashboard/site_index.html.j2", title="Fixture dashboards",
        saes=[{"name": sae, "href": f"{sae}/index.html", "n_features": n_concat if sae == "concat" else n_head_features,
               "description": HOSTILE_TOKENS[0] if sae == "concat" else f"per-head SAE of {sae}"} for sae in saes],
        analysis_href=None, context={"model": "fixture <b>model</b>", "tokens": "synthetic"}), encoding="utf-8")
    return site
