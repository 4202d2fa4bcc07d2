"""The dashboard templates and assets without a browser: the fixture site (tests/dashboard_fixture.py) renders,
every record survives its trip through a feature page byte for byte (a token "</script>" cannot end the JSON
element), hostile strings are escaped, nothing points off the site, and a feature page with 45 examples stays
under 300 KB."""

import json
import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from sparsedecomp.rendering import render
from tests.dashboard_fixture import HEADS, HOSTILE_TOKENS, feature_record, write_fixture_site

RECORD_ELEMENT = re.compile(r'<script id="sd-feature" type="application/json">(.*?)</script>', re.S)
PAGE_LIMIT_BYTES = 300_000


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_fixture_site(tmp_path_factory.mktemp("site"))


class _Refs(HTMLParser):
    """Every href and src of a static page, and every script element's opening."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.refs += [v for k, v in attrs if k in ("href", "src") and v is not None]


def refs_of(html: str) -> _Refs:
    parser = _Refs()
    parser.feed(html)
    return parser


def feature_page(record: dict) -> str:
    return render("dashboard/feature.html.j2", record_json=json.dumps(record), title=record["title"],
                  assets="../../assets", site_root="../..")


def test_every_record_comes_back_unchanged_from_its_page(site):
    for (sae, feature), record in site.records.items():
        html = site.page(sae, feature).read_text(encoding="utf-8")
        embedded = RECORD_ELEMENT.findall(html)
        assert len(embedded) == 1
        assert json.loads(embedded[0]) == record
        assert refs_of(html).scripts == 3  # the record, plotly, dashboard.js: no token opened another


def test_script_end_tags_in_tokens_cannot_leave_the_record_element():
    record = feature_record("concat", 1)
    record["title"] = "</script><script>alert(1)</script><!--"
    record["examples"]["top"][0]["tokens"] = ["</SCRIPT >", "<script>", "<!--", "-->"]
    html = feature_page(record)
    body = RECORD_ELEMENT.search(html).group(1)
    assert "<" not in body  # written \u003c: the HTML parser sees no tag, comment or end tag inside
    assert json.loads(body) == record
    assert "<title>&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;!--</title>" in html


def test_site_index_and_sae_index_escape_their_text(site):
    front = (site.root / "index.html").read_text(encoding="utf-8")
    assert HOSTILE_TOKENS[0] not in front and "&lt;/script&gt;&lt;script&gt;" in front
    assert "fixture &lt;b&gt;model&lt;/b&gt;" in front
    index = render("dashboard/index.html.j2", sae='x"><script>1</script>', title="<i>t</i>", assets="../assets",
                   site_root="..", data_src="features.js", n_features=3)
    assert "<i>t</i>" not in index and "&lt;i&gt;t&lt;/i&gt;" in index
    assert refs_of(index).scripts == 2  # features.js and dashboard.js only
    assert 'data-sae="x&#34;&gt;&lt;script&gt;1&lt;/script&gt;"' in index


def test_site_index_lists_the_saes_and_the_analysis_page():
    html = render("dashboard/site_index.html.j2", title="t", analysis_href="evaluation/report.html", context={},
                  saes=[{"name": "concat", "href": "concat/index.html", "n_features": 7, "description": "d"}])
    assert refs_of(html).refs == ["assets/dashboard.css", "concat/index.html", "evaluation/report.html",
                                  "assets/dashboard.js"]
    assert "No evaluation report" in render("dashboard/site_index.html.j2", title="t", analysis_href=None,
                                            context={}, saes=[])


def test_every_static_reference_stays_on_the_site_and_resolves(site):
    pages = [site.root / "index.html", *site.root.glob("*/index.html"), *site.root.glob("*/f/*.html")]
    assert len(pages) == 1 + 3 + 150 + 2 * 12
    for page in pages:
        for ref in refs_of(page.read_text(encoding="utf-8")).refs:
            assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", ref), (page, ref)
            assert (page.parent / ref).resolve().is_file(), (page, ref)


def test_record_links_resolve_and_back_links_invert_the_decompositions(site):
    forward = {(f"head_{a['head']}", a["feature"], s["label"], f)
               for (sae, f), r in site.records.items() if sae == "concat" for s in r["decomposition"]
               for a in s["atoms"]}
    backward = {(sae, f, u["label"], u["feature"])
                for (sae, f), r in site.records.items() if sae != "concat" for u in r["used_by"]}
    assert forward == backward and len(forward) > 100
    for (sae, f), record in site.records.items():
        hrefs = [a["href"] for s in record["decomposition"] for a in s["atoms"]]
        hrefs += [u["href"] for u in record["used_by"]] + [c["href"] for c in record["correlated"]]
        for href in hrefs:
            if not href.startswith("javascript:"):
                assert (site.page(sae, f).parent / href).resolve().is_file(), (sae, f, href)


NETWORK = r"(?:https?:|wss?:)?//"
FETCHES = {
    # an HTML attribute a browser loads or follows: src=, href=, srcset=, poster=, data=, action=
    "attribute": re.compile(r"\b(?:src|href|srcset|poster|data|action|formaction)\s*=\s*[\"']?\s*" + NETWORK, re.I),
    # a string literal holding an absolute URL, wherever the script uses it (fetch("..."), import("..."), el.src = ...)
    "string": re.compile(r"[\"'`]\s*" + NETWORK + r"[\w.-]", re.I),
    "import or fetch": re.compile(r"\b(?:import|fetch|importScripts|Worker|EventSource|WebSocket|sendBeacon)\s*\(\s*"
                                  r"[\"'`]?\s*" + NETWORK, re.I),
    "ES module import": re.compile(r"\b(?:import|export)\b[^;\n]*\bfrom\s*[\"']\s*" + NETWORK, re.I),
    "CSS url() or @import": re.compile(r"(?:\burl\(|@import)\s*[\"']?\s*" + NETWORK, re.I),
}


def network_fetches(text: str) -> list[tuple[str, str]]:
    """``(kind, the text around it)`` of every network address in ``text`` that a browser would fetch."""
    return [(kind, text[max(0, m.start() - 20) : m.end() + 30]) for kind, pattern in FETCHES.items()
            for m in pattern.finditer(text)]


def test_the_network_check_finds_each_kind_of_fetch():
    for text in ('<script src="https://cdn.example.org/plotly.js"></script>', "<link href=//fonts.example.com/a.css>",
                 'fetch("https://example.org/data.json")', "import('https://esm.sh/x')", "el.src = 'http://x.io/a.png'",
                 'import {a} from "https://esm.sh/a";', "body { background: url(https://x.io/a.png) }",
                 '@import "//fonts.example.com/b.css";', "new WebSocket(`wss://x.io/s`)"):
        assert network_fetches(text), text
    # comments and relative references are not fetches
    assert not network_fetches('// see http://example.org\n<script src="../assets/dashboard.js"></script> a.href = "#x"')


def packaged_files(monkeypatch) -> set[Path]:
    """The package-data files a wheel of the package holds: setuptools' build_py (what bdist_wheel copies) configured
    from pyproject.toml, as the real build configures it. Only the declared package-data is counted
    (include_package_data off: the MANIFEST-based extras would need egg_info, which writes into the tree)."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    dist = apply_configuration(Distribution(), root / "pyproject.toml")
    dist.include_package_data = False
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    return {(root / src / name).resolve() for _, src, _, names in build_py.data_files for name in names}


def test_assets_and_templates_ship_with_the_package_and_fetch_nothing_from_the_network(monkeypatch):
    package = resources.files("sparsedecomp")
    assets = resources.files("sparsedecomp.dashboards") / "assets"
    asset_files = sorted((p for p in assets.iterdir() if p.is_file()), key=lambda p: p.name)
    assert [p.name for p in asset_files] == ["dashboard.css", "dashboard.js"]
    templates = sorted((p for p in (package / "templates" / "dashboard").iterdir() if p.is_file()), key=lambda p: p.name)
    assert {p.name for p in templates} >= {"_frame.html.j2", "feature.html.j2", "index.html.j2", "site_index.html.j2"}
    shipped = packaged_files(monkeypatch)
    for item in [*asset_files, *templates]:
        with resources.as_file(item) as path:
            assert Path(path).resolve() in shipped, f"{item.name} is not in the wheel's package data"
        text = item.read_text(encoding="utf-8")
        assert not network_fetches(text), (item.name, network_fetches(text))
        if item.name.endswith(".js"):
            # data reach the DOM as text only: no HTML parsing of strings, no code from strings
            assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(", text)


def test_feature_page_with_45_examples_of_8_heads_is_under_300_kb(capsys):
    record = feature_record("concat", 5, n_heads=8, n_top=20, n_groups=5, per_group=5, window=17)
    n_examples = len(record["examples"]["top"]) + sum(len(g["examples"]) for g in record["examples"]["quantiles"])
    assert n_examples == 45
    size = len(feature_page(record).encode("utf-8"))
    with capsys.disabled():
        print(f"\nfeature page, 45 examples x 17 tokens, DFA 8 heads: {size / 1000:.1f} kB")
    assert size < PAGE_LIMIT_BYTES
    assert len(HEADS) == 2  # the fixture site's world: its concat records carry 2-head attribution arrays
