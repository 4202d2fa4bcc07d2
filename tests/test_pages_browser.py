"""The two pages as a reader sees them: opened from disk in headless Chromium with the network blocked, after their
scripts ran. The evaluation report must draw every plotly figure from the plotly.min.js beside it and log nothing to
the console; its tables and the decomposition page's features table must hold their rows.

The pages come from one run of the demo world with few evaluation contexts (about 15 s). Without a browser these
tests skip with the reason, except under CI (CI=true), where they fail: see tests/browser.py.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from sparsedecomp.cli import main
from tests.browser import Element, chromium_or_skip, parse_dom, render, table_rows

pytestmark = pytest.mark.browser

N_FIGURES = 11  # the evaluation report's figures, one div.plotly-graph-div each


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_or_skip()


@pytest.fixture(scope="module")
def demo_out(chromium, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pages") / "demo"
    assert main(["demo", "--out", str(out), "--eval-contexts", "8", "--dashboard-contexts", "16", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def report(chromium, demo_out) -> tuple[Element, tuple[str, ...]]:
    page = render(chromium, demo_out / "evaluation" / "report.html")
    return parse_dom(page.dom), page.console


@pytest.fixture(scope="module")
def index(chromium, demo_out) -> tuple[Element, tuple[str, ...]]:
    page = render(chromium, demo_out / "index.html")
    return parse_dom(page.dom), page.console


def figures(root: Element) -> list[Element]:
    return root.find_all("div", "plotly-graph-div")


def undrawn(figure: Element) -> bool:
    """True unless plotly drew the figure: its svg.main-svg holding at least one trace (a heatmap's is ``g.hm``)."""
    drawn = [e for svg in figure.find_all("svg", "main-svg") for e in svg.iter() if e.classes & {"trace", "hm"}]
    return not drawn


def table_after(root: Element, heading: str) -> list[list[str]]:
    """The rows of the first table after the h2 whose text is `heading`."""
    seen = False
    for element in root.iter():
        if element.tag == "h2" and element.text() == heading:
            seen = True
        elif seen and element.tag == "table":
            return table_rows(element)
    raise AssertionError(f"no table after a heading {heading!r}")


def test_report_draws_every_figure(report):
    root, _ = report
    shown = figures(root)
    assert len(shown) == N_FIGURES
    titles = [" ".join(t.text() for t in f.find_all("text", "gtitle")) for f in shown]
    assert [t for f, t in zip(shown, titles) if undrawn(f)] == []
    assert all(titles), titles  # every figure shows its title


def test_report_logs_nothing_to_the_console(report):
    _, console = report
    assert console == ()


def test_report_tables_hold_every_splice_variant_and_setting(report, demo_out):
    root, _ = report
    data = json.loads((demo_out / "evaluation" / "report.json").read_text())
    splice = table_after(root, "Splice-in losses")
    assert splice[0][:3] == ["variant", "what", "cross-entropy"]
    variants = [row[0] for row in splice[1:]]
    assert variants == list(data["splice"])
    heads = [f"head_sae_{h}" for h in range(8)]
    assert {"clean", "zero_layer", "all_head_saes", "concat_sae", "routed_pinv", *heads} <= set(variants)
    assert all(len(row) == len(splice[0]) for row in splice)
    # each cross-entropy cell shows the value and its standard error
    assert all(re.fullmatch(r"\d+\.?\d* ± \S+", row[2]) for row in splice[1:]), [row[2] for row in splice[1:]]

    settings = table_after(root, "Decompositions routed onto the per-head atoms")
    assert [row[0] for row in settings[1:]] == list(data["decompositions"])
    assert settings[1][0] == "pinv" and settings[1][-1] == "passes (exact)"

    quality = table_after(root, "SAE quality (SAELens run_evals names)")
    assert [row[0] for row in quality[1:]] == [*(f"head_{h}" for h in range(8)), "concat"]


def test_report_without_plotly_js_draws_no_figure_and_says_why(chromium, demo_out, tmp_path):
    """The check above can fail: a copy of the report without plotly.min.js beside it draws nothing."""
    copy = tmp_path / "evaluation"
    shutil.copytree(demo_out / "evaluation", copy)
    (copy / "plotly.min.js").unlink()
    page = render(chromium, copy / "report.html")
    shown = figures(parse_dom(page.dom))
    assert len(shown) == N_FIGURES and all(undrawn(f) for f in shown)
    assert any("Plotly is not defined" in message for message in page.console), page.console


def test_index_shows_every_feature_row(index, demo_out):
    root, console = index
    assert console == ()
    assert root.find_all("script") == []  # the decomposition page is static
    summary = json.loads((demo_out / "summary.json").read_text())
    n = summary["n_concat_features"]
    assert [s.text() for s in root.find_all("summary")] == [f"Features ({n} of {n} shown)"]
    features = next(t for t in root.find_all("table") if table_rows(t)[0][0] == "feature")
    rows = table_rows(features)
    assert rows[0][:5] == ["feature", "L0", "cosine", "rel. error", "status"]
    assert [row[0] for row in rows[1:]] == [str(f) for f in range(n)]
    assert all(len(row) == len(rows[0]) for row in rows)
    n_nonzero = summary["params"]["n_nonzero"]
    assert all(1 <= int(row[1]) <= n_nonzero for row in rows[1:])
    # the atoms column lists head:feature coefficients a reader can follow to the per-head SAEs
    assert all(re.match(r"h\d:f\d+ ", row[-1]) for row in rows[1:])


PANELS = ("sd-header", "sd-density", "sd-activation-histogram", "sd-logit-histogram", "sd-logits", "sd-attribution",
          "sd-decomposition", "sd-used-by", "sd-correlated", "sd-examples", "sd-quantiles")


@pytest.mark.parametrize("page", ["index.html", "concat/index.html", "concat/f/99.html", "head_3/f/7.html"])
def test_the_demo_dashboards_render_with_every_panel_and_working_links(chromium, demo_out, page):
    """The real site the demo writes (not a fixture): no console message, every panel of a feature page present, and
    every link in the rendered page resolves to a file of the site."""
    site = demo_out / "dashboards"
    rendered = render(chromium, site / page)
    assert rendered.console == ()
    root = parse_dom(rendered.dom)
    ids = {e.attrs.get("id") for e in root.iter()}
    if "/f/" in page:
        assert set(PANELS) <= ids
        assert any(e.classes & {"trace", "hm"} for e in root.iter())  # plotly drew the histograms
    links = [e.attrs["href"] for e in root.find_all("a") if e.attrs.get("href")]
    assert links
    for href in links:
        target = (site / page).parent / href.split("#")[0]
        assert target.is_file(), href

