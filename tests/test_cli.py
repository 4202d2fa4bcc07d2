"""The command line: the demo end to end, `decompose` on fixture checkpoints, and clear errors."""

import json

import pytest
import torch

from sparsedecomp.cli import main
from sparsedecomp.loading import SAE, save_kissane, save_legacy_saelens

N_HEADS, D_HEAD, D_SAE_HEAD, D_SAE_CAT = 4, 8, 24, 40


def _sae(d_in, d_sae, head, seed, apply_b_dec):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=g) * 0.1, b_enc=torch.zeros(d_sae), W_dec=W_dec,
               b_dec=torch.randn(d_in, generator=g) * 0.01, apply_b_dec_to_input=apply_b_dec,
               hook_name="blocks.1.attn.hook_z", layer=1, head=head, model_name="fixture-model")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    runs = []
    for h in range(N_HEADS):
        save_legacy_saelens(_sae(D_HEAD, D_SAE_HEAD, h, h, False), root / "checkpoints", f"run{h}", 1000)
        runs.append(str(root / "checkpoints" / f"run{h}"))
    concat = _sae(N_HEADS * D_HEAD, D_SAE_CAT, "concatenated", 99, True)
    version = f"fixture_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds{D_SAE_CAT}_bs4096_dc1.00e-07_rie0_nr0_v1"
    save_kissane(concat, root / "concat", version)
    return {"runs": runs, "concat": str(root / "concat"), "concat_sae": concat}


def test_decompose_pinv_on_fixture_checkpoints(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                 "--method", "pinv", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_targets"] == D_SAE_CAT and summary["n_heads"] == N_HEADS
    assert summary["ranks"]["block_dictionary"] == N_HEADS * D_HEAD
    assert summary["targets"]["decoder_already_unit_norm"] is False
    z = summary["results"]["z"]
    # The block dictionary has full rank, so least squares reconstructs every target exactly.
    assert z["metrics"]["metrics"]["cosine"]["mean"] == pytest.approx(1.0, abs=1e-4)
    feat = z["features"][3]
    target = checkpoints["concat_sae"].W_dec[3]
    shares = (target.view(N_HEADS, D_HEAD).pow(2).sum(1) / target.pow(2).sum()).tolist()
    assert feat["weight_head_shares"] == pytest.approx(shares, abs=1e-3)
    html = (out / "index.html").read_text()
    assert "<script" not in html and "http" not in html and "h0:f" in html
    assert "wrote" in capsys.readouterr().out


def test_decompose_default_method_with_head_index_map(checkpoints, tmp_path):
    out = tmp_path / "out"
    order = [2, 0, 3, 1]
    runs = [checkpoints["runs"][h] for h in order]
    code = main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *runs, "--head-index-map",
                 ",".join(map(str, order)), "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "nn_omp" and summary["params"] == {"n_nonzero": 16, "tol": 0.01}
    for rec in summary["results"]["z"]["features"]:
        assert rec["l0"] <= 16
        assert all(a["coefficient"] >= 0 for a in rec["atoms"])
    assert (out / "codes_z.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--head-index-map", "0,1"], "--head-index-map"),
        (["--head-index-map", "1,0,2,3"], "head"),
        (["--space", "residual"], "W_O"),
        (["--method", "pinv", "--n-nonzero", "3"], "n_nonzero"),
        (["--method", "nn_omp", "--n-nonzero", "0"], "n_nonzero"),
    ],
)
def test_bad_arguments_give_clear_errors(checkpoints, tmp_path, capsys, extra, message):
    code = main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                 "--out", str(tmp_path / "o"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and message in err and "Traceback" not in err


def test_missing_checkpoint_and_bad_method(tmp_path, capsys):
    code = main(["decompose", "--concat-sae", str(tmp_path / "nope"), "--head-saes", str(tmp_path / "x"),
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["decompose", "--concat-sae", "a", "--head-saes", "b", "--out", "o", "--method", "magic"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    from sparsedecomp.demo import ARTIFACTS_DIR
    from sparsedecomp.demo.layout import REPORT_FILE

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    z = summary["results"]["z"]
    assert summary["n_targets"] == len(z["features"]) == 2048
    assert summary["ranks"]["block_dictionary"] == 256
    m = z["metrics"]["metrics"]
    assert m["l0"]["mean"] <= 16
    assert m["cosine"]["mean"] > 0.6  # 16 unit atoms per 256-dim target: 0.83 on the shipped world
    html = (out / "index.html").read_text()
    assert "<script" not in html and "Space: z" in html
    # The page says how good the world's SAEs are (from the build report), each splice score with its error.
    report = json.loads((ARTIFACTS_DIR / REPORT_FILE).read_text())["quality"]["summary"]
    for name in [f"head{h}" for h in range(8)] + ["concat"]:
        line = summary["context"][f"{name} SAE (held-out)"]
        assert f"splice-in score {report[name]['splice']:.3f} ± {report[name]['splice_stderr']:.3f}" in line
        assert line.split(";")[0] in html
    assert "wrote" in capsys.readouterr().out
