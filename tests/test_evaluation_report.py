"""The evaluation report end to end, on an offline gelu-2l-shaped stand-in in the real on-disk layouts: the
documented keys, the command line, the built-in consistency check and the self-contained page."""

import json
import re
from pathlib import Path

import doc_keys
import pytest
import torch

from benchmarks.standins import TINY, write_standin
from sparsedecomp.cli import main
from sparsedecomp.evaluation.evaluate import EvaluationReport
from sparsedecomp.jsonio import key_paths

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def documented_keys() -> list[str]:
    return doc_keys.documented_keys(DOCS, "report.json")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("standin"), config=TINY, head_d_sae=48, concat_d_sae=128, n_rows=6,
                         record_local_dataset=True)


@pytest.fixture(scope="module")
def evaluated(standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    code = main(["evaluate", "--concat-sae", str(standin.concat_dir), "--concat-version", standin.concat_version,
                 "--head-saes", *map(str, standin.head_runs), "--model", str(standin.model_dir),
                 "--n-contexts", "4", "--bos-token-id", "0",  # the dataset the SAEs' configs record
                 "--methods", "pinv", "nn_omp:n_nonzero=4", "nn_lasso:alpha=0.3@residual",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_documented_keys_are_the_reports_keys_in_order():
    assert documented_keys() == list(key_paths(EvaluationReport))


def test_written_report_has_exactly_the_documented_keys(evaluated):
    documented = set(documented_keys())
    data = json.loads((evaluated / "report.json").read_text())
    found = doc_keys.file_key_paths(data, documented)
    assert found <= documented, sorted(found - documented)
    # every documented key is written by this run (a z-space sparse setting gives faithfulness, pinv a skipped one)
    assert found == documented, sorted(documented - found)


def test_report_holds_every_splice_variant_and_passes_the_consistency_check(evaluated, standin):
    data = json.loads((evaluated / "report.json").read_text())
    heads = range(8)
    expected = ["clean", *[f"zero_head_{h}" for h in heads], "zero_layer", "mean_layer",
                *[f"head_sae_{h}" for h in heads], "all_head_saes", "concat_sae", "routed_pinv",
                "routed_nn_omp_n_nonzero4", "routed_nn_lasso_alpha0.3_residual"]
    assert list(data["splice"]) == expected
    splice = data["splice"]
    assert data["decompositions"]["pinv"]["consistent"] is True
    assert splice["routed_pinv"]["ce_loss"] == pytest.approx(splice["concat_sae"]["ce_loss"], abs=1e-5)
    assert splice["routed_nn_lasso_alpha0.3_residual"]["setting"]["params"]["alpha"] == 0.3
    assert data["decompositions"]["nn_lasso_alpha0.3_residual"]["space"] == "residual"
    # SAELens's downstream keys come from the splice-in losses of the same run
    q = data["sae_quality"]["head_3"]
    assert q["ce_loss_with_sae"] == splice["head_sae_3"]["ce_loss"]
    assert q["ce_loss_with_ablation"] == splice["zero_head_3"]["ce_loss"]
    assert data["sae_quality"]["concat"]["ce_loss_with_ablation"] == splice["zero_layer"]["ce_loss"]
    assert set(data["faithfulness"]) == {"nn_omp_n_nonzero4"}
    assert set(data["faithfulness_skipped"]) == {"pinv", "nn_lasso_alpha0.3_residual"}
    assert data["tokens"]["starts_with_bos"] is True and data["tokens"]["context_size"] == TINY["n_ctx"]
    assert "head_scale_estimate" in data["context"]
    assert data["tokens"]["dataset"] == str(standin.dataset_dir)


def test_page_is_self_contained_with_plotly_beside_it(evaluated):
    page = (evaluated / "report.html").read_text()
    assert '<script src="plotly.min.js"></script>' in page
    assert (evaluated / "plotly.min.js").stat().st_size > 1_000_000
    assert not re.search(r"""(src|href)=["']https?:""", page)
    assert page.count('class="plotly-graph-div"') == 11
    manifest = json.loads((evaluated / "manifest.json").read_text())
    assert manifest["complete"] and set(manifest["files"]) == {"report.json", "report.html", "plotly.min.js"}


def test_bad_settings_and_token_sources_are_refused_before_loading(standin, tmp_path, capsys):
    base = ["evaluate", "--concat-sae", str(standin.concat_dir), "--head-saes", str(standin.head_runs[0]),
            "--model", str(standin.model_dir), "--out", str(tmp_path / "o")]
    assert main([*base, "--tokens", str(tmp_path / "missing.safetensors")]) == 2
    assert "--tokens: no tokens file at" in capsys.readouterr().err
    assert main([*base, "--dataset", "x", "--methods", "nn_omp:n_nonzero=abc"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main([*base, "--dataset", "x", "--methods", "omp:bogus=1"]) == 2
    assert "--methods omp_bogus1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused by the parser, as every command refuses it
        main([*base, "--dataset", "x", "--n-contexts", "0"])
    assert stop.value.code == 2
    assert "argument --n-contexts: must be a positive integer, got 0" in capsys.readouterr().err


def _base(standin, out):
    return ["evaluate", "--concat-sae", str(standin.concat_dir), "--concat-version", standin.concat_version,
            "--head-saes", *map(str, standin.head_runs), "--model", str(standin.model_dir), "--out", str(out),
            "--no-progress", "--methods", "pinv"]


def test_token_sources_are_refused_by_name_before_anything_runs(standin, tmp_path, capsys):
    from safetensors.torch import save_file

    long = tmp_path / "long.safetensors"
    save_file({"tokens": torch.zeros(2, TINY["n_ctx"] + 1, dtype=torch.long)}, str(long))
    assert main([*_base(standin, tmp_path / "a"), "--tokens", str(long)]) == 2
    assert "n_ctx=64" in capsys.readouterr().err
    short = tmp_path / "short.safetensors"
    save_file({"tokens": torch.zeros(2, 8, dtype=torch.long)}, str(short))
    assert main([*_base(standin, tmp_path / "b"), "--tokens", str(short), "--skip-contexts", "1"]) == 2
    assert "--skip-contexts only apply to --dataset" in capsys.readouterr().err
    assert main([*_base(standin, tmp_path / "c"), "--dataset", str(standin.dataset_dir), "--context-size", "65",
                 "--bos-token-id", "0"]) == 2
    assert "longer than the model's n_ctx=64" in capsys.readouterr().err
    assert main([*_base(standin, tmp_path / "d"), "--dataset", str(standin.dataset_dir)]) == 2
    assert "--bos-token-id" in capsys.readouterr().err  # the stand-in model has no tokenizer to name BOS


def test_a_tokens_file_records_its_bos(standin, tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(1, TINY["d_vocab"], (3, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    path = tmp_path / "t.safetensors"
    save_file({"tokens": ids}, str(path))
    out = tmp_path / "e"
    assert main([*_base(standin, out), "--tokens", str(path), "--bos-token-id", "0"]) == 0
    tokens = json.loads((out / "report.json").read_text())["tokens"]
    assert tokens["bos_token_id"] == 0 and tokens["starts_with_bos"] is True and tokens["n_contexts"] == 3


def test_a_model_of_another_shape_is_refused_before_decomposing(standin, tmp_path, capsys):
    import shutil

    other = tmp_path / "model"
    shutil.copytree(standin.model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["hooked_transformer_config"].update(n_heads=4, d_head=16)
    (other / "config.json").write_text(json.dumps(config))
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from safetensors.torch import save_file

    model = HookedTransformer(HookedTransformerConfig(**config["hooked_transformer_config"]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))},
              str(other / "model.safetensors"))
    args = _base(standin, tmp_path / "f")
    args[args.index("--model") + 1] = str(other)
    assert main([*args, "--dataset", str(standin.dataset_dir), "--bos-token-id", "0"]) == 2
    assert "d_head=16 but the SAEs read heads of width 8" in capsys.readouterr().err


@pytest.mark.gpu
def test_evaluate_on_cuda_matches_cpu(standin, evaluated, tmp_path):
    out = tmp_path / "cuda"
    assert main([*_base(standin, out)[:-2], "--methods", "pinv", "nn_omp:n_nonzero=4",
                 "nn_lasso:alpha=0.3@residual", "--n-contexts", "4", "--bos-token-id", "0", "--device", "cuda"]) == 0
    on_gpu = json.loads((out / "report.json").read_text())["splice"]
    on_cpu = json.loads((evaluated / "report.json").read_text())["splice"]
    for name, result in on_cpu.items():
        assert on_gpu[name]["ce_loss"] == pytest.approx(result["ce_loss"], abs=1e-3), name
