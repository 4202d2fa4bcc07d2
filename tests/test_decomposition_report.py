"""The decomposition run's typed report: summary.json's keys are exactly the documented ones, the file reads back
into the same dataclasses, and the page escapes what it shows and fetches nothing."""

import dataclasses
import json
import warnings
from pathlib import Path

import doc_keys
import pytest
import torch

from sparsedecomp.decomposition_page import render_decomposition_page, top_heads
from sparsedecomp.decomposition_report import DecompositionReport, read_report
from sparsedecomp.errors import InputError
from sparsedecomp.loading import SAE, HeadSAEs
from sparsedecomp.jobs.decompose import run_decomposition
from sparsedecomp.jsonio import key_paths

N_HEADS, D_HEAD, D_SAE_HEAD, D_SAE_CAT, D_MODEL = 3, 4, 6, 10, 8
DOCS = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
# The keys only a run with the residual space writes.
RESIDUAL_ONLY = {"targets.residual_norm", "targets.residual_norm.min", "targets.residual_norm.mean",
                 "targets.residual_norm.max", "ranks.mixed_dictionary", "results.*.features[].residual_norm"}


def _sae(d_in, d_sae, head, seed):
    g = torch.Generator().manual_seed(seed)
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=g), b_enc=torch.zeros(d_sae),
               W_dec=torch.randn(d_sae, d_in, generator=g), b_dec=torch.zeros(d_in), apply_b_dec_to_input=False,
               hook_name="blocks.0.attn.hook_z", layer=0, head=head, model_name="tiny")


def _run(out, *, space="both", **kwargs):
    heads = HeadSAEs(tuple(_sae(D_HEAD, D_SAE_HEAD, h, h) for h in range(N_HEADS)))
    concat = _sae(N_HEADS * D_HEAD, D_SAE_CAT, "concatenated", 99)
    W_O = torch.randn(N_HEADS, D_HEAD, D_MODEL, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the in-memory SAEs record no input scale
        return run_decomposition(concat, heads, out_dir=out, space=space, W_O=W_O, progress=False, log=lambda _: None,
                                 context={"model": "tiny"}, params={"n_nonzero": 4}, **kwargs)


def documented_keys() -> list[str]:
    """The key paths in docs/outputs.md's summary.json table (first column, in backticks)."""
    return doc_keys.documented_keys(DOCS, "summary.json")


file_key_paths = doc_keys.file_key_paths


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("both") / "out")


def test_the_documented_keys_are_the_reports_keys_in_order():
    assert documented_keys() == list(key_paths(DecompositionReport))


def test_summary_json_has_exactly_the_documented_keys(both, tmp_path):
    documented = set(documented_keys())
    data = json.loads(both.summary_path.read_text())
    assert file_key_paths(data, documented) == documented
    z_only = _run(tmp_path / "z", space="z")
    assert file_key_paths(json.loads(z_only.summary_path.read_text()), documented) == documented - RESIDUAL_ONLY


def test_the_file_reads_back_into_the_report(both):
    report = both.summary
    assert read_report(both.summary_path) == report
    assert json.loads(both.summary_path.read_text()) == report.to_dict()
    assert report.spaces == ("z", "residual") and report.n_targets == D_SAE_CAT
    residual = report.results["residual"]
    assert residual.features[0].residual_norm > 0 and report.results["z"].features[0].residual_norm is None
    assert report.ranks.mixed_dictionary == D_MODEL  # 3 heads x 6 unit atoms through a generic W_O span R^8
    # Each record names its decoder-weight shares, which sum to 1 for every (non-zero) concat feature.
    assert all(sum(rec.weight_head_shares) == pytest.approx(1, abs=1e-3) for rec in residual.features)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), "unknown keys ['extra']"),
        (lambda d: d.pop("ranks"), "lacks the keys ['ranks']"),
        (lambda d: d["results"]["z"]["features"][0].update(l0="3"), "summary.json.results.z.features[0].l0 must be"),
        (lambda d: d.update(spaces="z"), "spaces must be a list"),
    ],
)
def test_a_summary_of_another_layout_is_refused_by_name(both, tmp_path, edit, message):
    data = json.loads(both.summary_path.read_text())
    edit(data)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        read_report(path)
    assert message in str(err.value)


def test_the_page_escapes_what_it_shows_and_fetches_nothing(tmp_path):
    hostile = "<script>alert('x')</script>"
    result = _run(tmp_path / "out", space="z", title=f"title {hostile}")
    report = dataclasses.replace(result.summary, context={"source": hostile, "url": "http://example.org/x"})
    page = render_decomposition_page(report)
    assert "<script" not in page.lower()
    assert "title &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page
    assert "<script" not in result.html_path.read_text().lower()


def test_the_page_shows_every_feature_up_to_the_limit(both):
    page = render_decomposition_page(both.summary, max_features=4)
    assert page.count("Features (4 of 10 shown)") == 2
    assert "dictionary mixed through W_O" in page
    # The first feature's first atom, with its coefficient as the page rounds it.
    atom = both.summary.results["z"].features[0].atoms[0]
    assert f"h{atom.head}:f{atom.feature} <b>{atom.coefficient:.3f}</b>" in page


def test_a_run_without_code_mass_says_so_instead_of_a_percentage(both):
    z = dataclasses.replace(both.summary.results["z"], agreement_weight_vs_decomposition=None)
    page = render_decomposition_page(dataclasses.replace(both.summary, results={"z": z}))
    assert "cannot be compared" in page and "nan" not in page


def test_top_heads_are_the_largest_non_zero_shares():
    assert top_heads([0.1, 0.5, 0.0, 0.4]) == [(1, 0.5), (3, 0.4), (0, 0.1)]
    assert top_heads([0.0, 1.0, 0.0]) == [(1, 1.0)]
