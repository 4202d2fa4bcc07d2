"""`sparsedecomp dashboard` end to end on the offline stand-in (real on-disk layouts): the site, its Neuronpedia
export, and its analysis page from `--evaluate` or from an earlier `--evaluation` run."""

import json
import re

import pytest

from benchmarks.standins import TINY, write_standin
from sparsedecomp.cli import main

HEAD_D_SAE, CONCAT_D_SAE = 48, 128


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("standin"), config=TINY, head_d_sae=HEAD_D_SAE,
                         concat_d_sae=CONCAT_D_SAE, n_rows=6, record_local_dataset=True)


def command(standin, out, *extra):
    return ["dashboard", "--concat-sae", str(standin.concat_dir), "--concat-version", standin.concat_version,
            "--head-saes", *map(str, standin.head_runs), "--model", str(standin.model_dir), "--bos-token-id", "0",
            "--n-contexts", "4", "--methods", "pinv", "nn_omp:n_nonzero=4", "--no-progress", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def evaluated_site(standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "site"
    assert main(command(standin, out, "--evaluate", "--eval-contexts", "2")) == 0
    return out


def analysis_link(site):
    match = re.search(r'<section id="sd-analysis">.*?</section>', (site / "index.html").read_text(), re.S)
    links = re.findall(r'href="([^"]+)"', match.group(0))
    return links


def test_dashboard_writes_every_page_the_export_and_an_evaluated_analysis_page(evaluated_site):
    site = evaluated_site
    n_heads = TINY["n_heads"]
    assert len(list((site / "concat" / "f").glob("*.html"))) == CONCAT_D_SAE
    assert all(len(list((site / f"head_{h}" / "f").glob("*.html"))) == HEAD_D_SAE for h in range(n_heads))
    export = json.loads((site / "neuronpedia" / "concat.json").read_text())
    assert len(export["features"]) == CONCAT_D_SAE
    # the analysis page is the evaluation of the first --eval-contexts contexts, linked from the front page
    assert analysis_link(site) == ["evaluation/report.html"]
    report = json.loads((site / "evaluation" / "report.json").read_text())
    assert report["tokens"]["n_contexts"] == 2
    assert set(report["decompositions"]) == {"pinv", "nn_omp_n_nonzero4"}
    assert (site / "evaluation" / "plotly.min.js").is_file()
    # the pages link the decompositions the report routed
    page = (site / "concat" / "f" / "0.html").read_text()
    record = json.loads(re.search(r'<script id="sd-feature" type="application/json">(.*?)</script>', page,
                                  re.S).group(1))
    assert [p["label"] for p in record["decomposition"]] == ["pinv", "nn_omp_n_nonzero4"]


def test_an_earlier_evaluation_is_copied_in_as_the_analysis_page(standin, evaluated_site, tmp_path):
    earlier = evaluated_site / "evaluation"
    out = tmp_path / "site"
    assert main(command(standin, out, "--evaluation", str(earlier), "--no-neuronpedia")) == 0
    assert analysis_link(out) == ["evaluation/report.html"]
    for name in ("report.json", "report.html", "plotly.min.js"):
        assert (out / "evaluation" / name).read_bytes() == (earlier / name).read_bytes()
    manifest = json.loads((out / "evaluation" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["copied_from"]["report.json"] == \
        str((earlier / "report.json").resolve())
    assert not (out / "neuronpedia").exists()


def test_without_an_evaluation_the_site_says_so(standin, tmp_path):
    out = tmp_path / "site"
    assert main(command(standin, out, "--no-neuronpedia")) == 0
    assert analysis_link(out) == [] and "No evaluation report" in (out / "index.html").read_text()


def test_a_folder_that_is_not_a_matching_evaluation_is_refused_by_name(standin, evaluated_site, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(command(standin, tmp_path / "a", "--evaluation", str(empty))) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert main(command(standin, tmp_path / "b", "--evaluation", str(tmp_path / "nowhere"))) == 2
    assert "--evaluation: no folder" in capsys.readouterr().err
    # a finished run of another command (the dashboards site itself) is not an evaluation
    assert main(command(standin, tmp_path / "c", "--evaluation", str(evaluated_site))) == 2
    assert "is not an evaluation run: it lacks report.json" in capsys.readouterr().err
    # a report of another hook
    other = tmp_path / "other"
    other.mkdir()
    for name in ("manifest.json", "report.html", "plotly.min.js"):
        (other / name).write_bytes((evaluated_site / "evaluation" / name).read_bytes())
    report = json.loads((evaluated_site / "evaluation" / "report.json").read_text())
    (other / "report.json").write_text(json.dumps({**report, "hook_name": "blocks.0.attn.hook_z"}))
    assert main(command(standin, tmp_path / "d", "--evaluation", str(other))) == 2
    assert "evaluates {'hook_name': 'blocks.0.attn.hook_z'" in capsys.readouterr().err
    assert not (tmp_path / "d" / "index.html").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(command(standin, tmp_path / "e", "--evaluate", "--evaluation", str(other)))
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_ignored_tokens_never_rank_and_the_front_page_says_what_was_left_out(standin, tmp_path, capsys):
    out = tmp_path / "site"
    assert main(command(standin, out, "--ignore-tokens", "5, 7", "--no-neuronpedia")) == 0
    focus_tokens = set()
    for page in (out / "concat" / "f").glob("*.html"):
        record = json.loads(re.search(r'<script id="sd-feature" type="application/json">(.*?)</script>',
                                      page.read_text(), re.S).group(1))
        examples = record["examples"]["top"] + [e for g in record["examples"]["quantiles"] for e in g["examples"]]
        focus_tokens |= {e["tokens"][e["focus"]] for e in examples}
    assert focus_tokens and not focus_tokens & {"<5>", "<7>"}
    assert "position 0 (BOS), &#39;&lt;5&gt;&#39; (id 5), &#39;&lt;7&gt;&#39; (id 7)" in (out / "index.html").read_text()
    assert main(command(standin, tmp_path / "a", "--ignore-tokens", "5,x")) == 2
    assert "--ignore-tokens: 'x' is not a non-negative integer" in capsys.readouterr().err
    assert main(command(standin, tmp_path / "b", "--ignore-tokens", str(TINY["d_vocab"]))) == 2
    assert f"not in the model's vocabulary (d_vocab={TINY['d_vocab']})" in capsys.readouterr().err


def test_special_token_ids_of_both_tokenizer_kinds():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from sparsedecomp.loading.models import special_token_ids
    from sparsedecomp.demo.layout import ARTIFACTS_DIR, TOKENIZER_FILE

    raw = Tokenizer.from_file(str(ARTIFACTS_DIR / TOKENIZER_FILE))
    bos, eot = raw.token_to_id("<|bos|>"), raw.token_to_id("<|endoftext|>")
    assert special_token_ids(raw) == tuple(sorted({bos, eot}))
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|endoftext|>")
    assert special_token_ids(fast) == tuple(sorted({bos, eot}))
    assert special_token_ids(None) == ()
