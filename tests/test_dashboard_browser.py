"""The dashboard pages as a reader sees them: the fixture site (tests/dashboard_fixture.py) opened from disk in
headless Chromium with the network blocked. No console message; every panel of a feature page filled; plotly draws
the figures; hostile tokens show as text; every link in the live DOM resolves to a file of the site; the feature
table shows one page of 100 rows and its search, sort, filters and paging (driven through the URL fragment, since
the helper cannot click) pick the rows Python picks from the same data."""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.browser import Element, chromium_or_skip, parse_dom, render, table_rows
from tests.dashboard_fixture import DEGENERATE_FEATURE, HOSTILE_TOKENS, INDEX_COLUMNS, write_fixture_site

pytestmark = pytest.mark.browser

PANELS = ("sd-header", "sd-density", "sd-activation-histogram", "sd-logit-histogram", "sd-logits", "sd-attribution",
          "sd-decomposition", "sd-used-by", "sd-correlated", "sd-examples", "sd-quantiles")


@dataclass(frozen=True)
class _WithFragment:
    """A page path plus a URL fragment, for tests.browser.render (which asks its page for resolve().as_uri())."""

    path: Path
    fragment: str

    def resolve(self):
        return self

    def as_uri(self) -> str:
        return f"{self.path.resolve().as_uri()}#{self.fragment}"

    def __str__(self) -> str:
        return self.as_uri()


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_or_skip()


@pytest.fixture(scope="module")
def site(chromium, tmp_path_factory):
    return write_fixture_site(tmp_path_factory.mktemp("site"))


def by_id(root: Element, element_id: str) -> Element:
    found = [e for e in root.iter() if e.attrs.get("id") == element_id]
    assert len(found) == 1, element_id
    return found[0]


def open_page(chromium, page: Path, fragment: str = "") -> Element:
    shown = render(chromium, _WithFragment(page, fragment) if fragment else page, script_time_ms=5000)
    assert shown.console == ()
    return parse_dom(shown.dom)


def assert_links_resolve(root: Element, page: Path) -> int:
    """Every a[href], script[src] and link[href] of the DOM names an existing file of the site; returns how many."""
    n = 0
    for e in root.iter():
        ref = e.attrs.get("href") if e.tag in ("a", "link") else e.attrs.get("src") if e.tag == "script" else None
        if ref is None:
            continue
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", ref, re.I), ref
        target = ref.split("#")[0]
        assert target == "" or (page.parent / target).resolve().is_file(), (page, ref)
        n += 1
    return n


def shown_features(root: Element) -> list[int]:
    table = by_id(root, "sd-index")
    return [int(row[0]) for row in table_rows(table)[1:]]


def test_site_index_links_every_sae(chromium, site):
    root = open_page(chromium, site.root / "index.html")
    names = [row[0] for row in table_rows(by_id(root, "sd-saes").find_all("table")[0])[1:]]
    assert names == ["concat", "head_0", "head_1"]
    assert assert_links_resolve(root, site.root / "index.html") >= 5
    assert HOSTILE_TOKENS[0] in root.text()  # shown as text, not run


def test_feature_table_shows_one_page_of_100_rows(chromium, site):
    page = site.root / "concat" / "index.html"
    root = open_page(chromium, page)
    table = by_id(root, "sd-index")
    assert table_rows(table)[0] == INDEX_COLUMNS
    assert shown_features(root) == list(range(100))
    assert table.attrs["data-matching"] == "150"
    assert assert_links_resolve(root, page) >= 100
    assert by_id(root, "sd-status").text() == "rows 1–100 of 150 matching (150 features)"
    second = open_page(chromium, page, "page=2")
    assert shown_features(second) == list(range(100, 150))


def test_feature_table_sort_search_and_filters_pick_pythons_rows(chromium, site):
    page = site.root / "concat" / "index.html"
    records = {f: r for (sae, f), r in site.records.items() if sae == "concat"}
    by_density = sorted(records, key=lambda f: (-records[f]["density"], f))
    assert shown_features(open_page(chromium, page, "sort=density&dir=desc")) == by_density[:100]

    assert shown_features(open_page(chromium, page, "q=42")) == [42]
    token = "\u00e9t\u00e9"  # a top token of some features
    expected = [f for f, r in records.items() if any(token in t for t, _ in r["logits"]["top"][:3])]
    assert 0 < len(expected) < 100
    assert shown_features(open_page(chromium, page, "q=" + quote(token))) == expected

    lo, hi = 0.005, 0.02
    expected = [f for f, r in records.items()
                if lo <= r["density"] <= hi and r["attribution"]["top_heads"]["weight"] == 1]
    assert 0 < len(expected) < 100
    fragment = f"min.density={lo}&max.density={hi}&" + quote("eq.top_head:weight") + "=1&sort=feature&dir=asc"
    assert shown_features(open_page(chromium, page, fragment)) == expected


@pytest.mark.parametrize("sae, feature", [("concat", 0), ("concat", DEGENERATE_FEATURE), ("head_0", 1)])
def test_feature_page_fills_every_panel(chromium, site, sae, feature):
    page = site.page(sae, feature)
    root = open_page(chromium, page)
    record = site.records[(sae, feature)]
    for panel in PANELS:
        content = [c for c in by_id(root, panel).content if isinstance(c, Element) and c.tag != "h2"]
        assert content, panel  # a figure, a table, a list or a note saying why there is none
    figures = root.find_all("div", "js-plotly-plot")
    assert len(figures) == (4 if sae == "concat" else 3)
    # the density figure marks this feature's log10 density among the SAE's features
    density = by_id(root, "sd-density")
    shown = re.search(r"This feature: log10 density (-?[\d.]+)\. (\d+) features fired, (\d+) never did",
                      density.text())
    assert float(shown.group(1)) == pytest.approx(math.log10(record["density"]), abs=5e-3)
    assert [int(shown.group(2)), int(shown.group(3))] == [sum(record["density_histogram"]["counts"]), 3]
    assert any(layer.find_all("path") for layer in density.find_all("g", "shapelayer"))  # the line at this feature
    assert all(f.find_all("g", "trace") or f.find_all("g", "barlayer") for f in figures)
    # a degenerate logit range gets a few ticks, not a tick per step
    assert 2 <= len(figures[1].find_all("g", "xtick")) <= 12

    examples = record["examples"]
    n_examples = len(examples["top"]) + sum(len(g["examples"]) for g in examples["quantiles"])
    assert len(root.find_all("div", "example")) == n_examples
    shown = examples["top"] + [e for g in examples["quantiles"] for e in g["examples"]]
    greyed = root.find_all("span", "left-out")
    assert len(greyed) == sum(len(e["left_out"]) for e in shown) > 0
    assert all(s.attrs["title"].endswith(": left out of the statistics") for s in greyed)
    assert len(root.find_all("table", "dfa")) == n_examples  # DFA by head for every shown example
    dfa = root.find_all("table", "dfa")[0]
    assert len(table_rows(dfa)) == 1 + len(examples["top"][0]["dfa"]["heads"])
    # the integers are decoded (q * unit): heads plus biases read back as the pre-activation, the example's value
    bias_note = root.find_all("p", "bias")[0].text()
    pre = float(bias_note.rsplit("pre-activation ", 1)[1])
    assert pre == pytest.approx(examples["top"][0]["value"], rel=2e-2)
    focus = root.find_all("div", "example")[0].find_all("span", "focus")
    assert [s.attrs["title"].rsplit(": ", 1)[1] for s in focus] == [f"{examples['top'][0]['value']:.4g}"]

    # hostile tokens are text: no element they would have made, and they read back as written
    assert root.find_all("img") == [] and len(root.find_all("script")) == 3
    assert HOSTILE_TOKENS[0] in by_id(root, "sd-examples").text() + by_id(root, "sd-logits").text()
    assert assert_links_resolve(root, page) > 3
    if sae == "concat":
        atoms = [a for s in record["decomposition"] for a in s["atoms"]]
        links = by_id(root, "sd-decomposition").find_all("a")
        assert [a.attrs["href"] for a in links] == [a["href"] for a in atoms]
        assert [row[0] for row in table_rows(by_id(root, "sd-attribution").find_all("table")[0])[1:]] == \
            list(record["attribution"]["methods"])
    else:
        links = by_id(root, "sd-used-by").find_all("a")
        assert [a.attrs["href"] for a in links] == [u["href"] for u in record["used_by"]] != []
    if (sae, feature) == ("concat", 0):  # its last correlated href is javascript: shown as text, not a link
        correlated = by_id(root, "sd-correlated")
        assert len(correlated.find_all("a")) == len(record["correlated"]) - 1
        assert "#9999" in correlated.text()


def test_feature_header_shows_the_record(chromium, site):
    """The page's script reads the record Python wrote: the header's numbers are the record's."""
    record = site.records[("concat", 7)]
    root = open_page(chromium, site.page("concat", 7))
    header = {row[0]: row[1] for row in table_rows(by_id(root, "sd-header").find_all("table")[0])}
    assert f"({record['n_firing']} of 200000 tokens)" in header["density"]
    assert header["max activation"] == f"{record['max_activation']:.3g}"
    assert by_id(root, "sd-sae-link").text() == "concat"
