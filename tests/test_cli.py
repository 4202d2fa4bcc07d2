"""The command line: the demo end to end, `decompose` on fixture checkpoints, and clear errors."""

import json
from markupsafe import escape as html_escape

import pytest
import torch

from sparsedecomp.cli import main
from sparsedecomp.decomposition_report import read_report
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
    summary = read_report(out / "summary.json")
    assert summary.n_targets == D_SAE_CAT and summary.n_heads == N_HEADS
    assert summary.ranks.block_dictionary == N_HEADS * D_HEAD
    assert summary.targets.decoder_already_unit_norm is False
    z = summary.results["z"]
    # The block dictionary has full rank, so least squares reconstructs every target exactly.
    assert z.metrics.metrics["cosine"].mean == pytest.approx(1.0, abs=1e-4)
    feat = z.features[3]
    target = checkpoints["concat_sae"].W_dec[3]
    shares = (target.view(N_HEADS, D_HEAD).pow(2).sum(1) / target.pow(2).sum()).tolist()
    assert feat.weight_head_shares == pytest.approx(shares, abs=1e-3)
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
    summary = read_report(out / "summary.json")
    assert summary.method == "nn_omp" and summary.params == {"n_nonzero": 16, "tol": 0.01}
    for rec in summary.results["z"].features:
        assert rec.l0 <= 16
        assert all(a.coefficient >= 0 for a in rec.atoms)
    assert (out / "codes_z.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--head-index-map", "0,1"], "--head-index-map"),
        (["--head-index-map", "1,0,2,3"], "head"),
        (["--space", "residual"], "W_O"),
        (["--method", "pinv", "--n-nonzero", "3"], "got unexpected [--n-nonzero]"),
        (["--method", "nn_omp", "--n-nonzero", "0"], "--n-nonzero must be >= 1"),
        (["--method", "nn_lasso"], "--method nn_lasso needs --alpha"),
        (["--method", "cvxpy_bpdn"], "needs --eps"),
        (["--alpha-absolute", "--method", "lasso"], "--alpha-absolute needs --alpha"),
        (["--tokens", "tokens.pt"], "--tokens needs --model"),
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


def test_output_folder_checks(checkpoints, tmp_path, capsys):
    base = ["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"], "--no-progress"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert main([*base, "--out", str(a_file)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main([*base, "--out", ""]) == 2
    assert "output folder is empty" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([*base, "--out", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_decompose_outputs_are_strict_json_with_manifest_and_codes(checkpoints, tmp_path):
    from sparsedecomp.codes_file import read_codes_file

    out = tmp_path / "out"
    assert main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                 "--method", "nn_omp", "--n-nonzero", "5", "--out", str(out), "--no-progress"]) == 0

    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name}")

    json.loads((out / "summary.json").read_text(), parse_constant=no_constants)
    summary = read_report(out / "summary.json")
    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=no_constants)
    assert manifest["complete"] is True
    assert set(manifest["files"]) == {"summary.json", "index.html", "codes_z.safetensors"}
    for name in manifest["files"]:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    z = summary.results["z"]
    assert set(summary.status_legend) >= {"CONVERGED", "BUDGET_REACHED", "MAX_ITER"}
    stored = read_codes_file(out / "codes_z.safetensors")
    assert stored.metadata["layout"] == "sparse" and stored.tensors["indices"].dtype == torch.int32
    assert stored.codes.width == 5
    for rec in z.features[:10]:
        i = rec.feature
        assert rec.status == stored.status[i].name
        assert rec.certificate == pytest.approx(float(stored.tensors["certificate"][i]), rel=1e-6, abs=1e-12)
        # Every non-zero of the code is listed, as stored.
        dense = stored.codes.rows(slice(i, i + 1)).to_dense()[0]
        assert rec.n_atoms_listed == rec.l0 == int((dense != 0).sum())
        for atom in rec.atoms:
            j = atom.head * D_SAE_HEAD + atom.feature
            assert atom.coefficient == pytest.approx(float(dense[j]), rel=1e-6)


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pinv_codes_are_stored_dense(checkpoints, tmp_path):
    from sparsedecomp.codes_file import read_codes_file

    out = tmp_path / "out"
    assert main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                 "--method", "pinv", "--out", str(out), "--no-progress"]) == 0
    stored = read_codes_file(out / "codes_z.safetensors")
    assert stored.metadata["layout"] == "dense" and "indices" not in stored.tensors
    assert stored.codes.values.shape == (D_SAE_CAT, N_HEADS * D_SAE_HEAD)


def test_a_bug_keeps_its_traceback(checkpoints, tmp_path, monkeypatch):
    """Only input errors become one-line messages; an internal KeyError or TypeError propagates."""
    import sparsedecomp.jobs.decompose

    def broken(*args, **kwargs):
        raise KeyError("internal bug")

    monkeypatch.setattr(sparsedecomp.jobs.decompose, "run_decomposition", broken)
    with pytest.raises(KeyError, match="internal bug"):
        main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
              "--out", str(tmp_path / "o"), "--no-progress"])


def test_tokens_are_checked_before_the_model_loads(tmp_path, capsys):
    code = main(["decompose", "--concat-sae", "x", "--head-saes", "y", "--model", "no-such-model",
                 "--tokens", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--tokens: no tokens file at" in capsys.readouterr().err


def test_parser_names_match_the_library():
    from sparsedecomp import SOLVERS, cli
    from sparsedecomp.jobs import decompose, solve

    assert set(cli.METHODS) == set(SOLVERS)
    assert cli.SPACES == decompose.SPACES and cli.DEFAULT_METHOD == solve.DEFAULT_METHOD


def test_help_is_fast_and_module_entry_point_works():
    """`--help` parses without importing torch; `python -m sparsedecomp` is the same command."""
    import subprocess
    import sys

    code = ("import sys\nfrom sparsedecomp.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "sparsedecomp", "decompose", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--concat-sae" in run.stdout and "nnls" in run.stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--eval-contexts", "8", "--no-dashboards"]) == 0
    summary = read_report(out / "summary.json")
    z = summary.results["z"]
    assert summary.n_targets == len(z.features) == 2048
    assert summary.ranks.block_dictionary == 256
    m = z.metrics.metrics
    assert m["l0"].mean <= 16
    # The summary's cosines are those of the stored codes, reconstructed independently here.
    from sparsedecomp.codes_file import read_codes_file
    from sparsedecomp.demo import load_demo_world

    world = load_demo_world()
    dictionary = world.head_saes.dictionary(normalize=True)
    stored = read_codes_file(out / "codes_z.safetensors")
    targets = world.concat_sae.W_dec / world.concat_sae.W_dec.norm(dim=1, keepdim=True)
    cosines = torch.nn.functional.cosine_similarity(stored.codes.to_dense() @ dictionary.atoms, targets)
    summary_cosines = torch.tensor([rec.cosine for rec in z.features])
    torch.testing.assert_close(summary_cosines, cosines.float(), atol=1e-4, rtol=0)
    assert m["cosine"].mean == pytest.approx(float(cosines.mean()), abs=1e-4)
    html = (out / "index.html").read_text()
    assert "<script" not in html and "Space: z" in html
    assert json.loads((out / "manifest.json").read_text())["command"] == "demo"
    # The default budget explains little on this world, and the page says so where the numbers are.
    assert "explains little" in z.verdict and "explains little" in html
    for line in summary.context.values():
        assert html_escape(str(line).split(";")[0]) in html
    assert f"Open {out / 'index.html'}" in capsys.readouterr().out
    # ... and the evaluation report of the same world beside it, on the held-out tokens asked for.
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["tokens"]["n_contexts"] == 8 and report["tokens"]["kind"] == "demo"
    assert report["decompositions"]["pinv"]["consistent"] is True
    assert {"concat_sae", "routed_pinv", "all_head_saes", "mean_layer"} <= set(report["splice"])
    assert json.loads((out / "evaluation" / "manifest.json").read_text())["command"] == "demo"
    top = json.loads((out / "manifest.json").read_text())
    assert top["complete"] is True and set(top["parts"]) == {"evaluation"}
    assert '<a href="evaluation/report.html">' in html and "dashboards/index.html" not in html


def test_the_demo_front_page_links_what_the_run_wrote(tmp_path, capsys):
    """A quick demo (a few features, no evaluation, no dashboards): its front page links nothing it did not write,
    its manifest is complete, and the run ends naming the page to open."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--no-evaluate", "--no-dashboards",
                 "--features", "0-31"]) == 0
    html = (out / "index.html").read_text()
    assert "In this folder" not in html and "evaluation/report.html" not in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["parts"] == {} and manifest["command"] == "demo"
    assert set(manifest["files"]) == {"summary.json", "index.html", "codes_z.safetensors"}
    assert f"Open {out / 'index.html'}" in capsys.readouterr().out


def test_decompose_on_local_demo_artifacts_with_a_local_model_then_rerun_in_place(tmp_path):
    """`--model` takes a local model folder (the demo's), so local artifacts get the residual view (SAELens 6 head
    folders need no input scale: none is estimated); a `--space z` rerun into the same folder leaves no residual codes
    behind."""
    from sparsedecomp.demo import ARTIFACTS_DIR
    from sparsedecomp.demo.world import head_sae_sources

    heads = [str(p) for p in head_sae_sources().values()]
    base = ["decompose", "--concat-sae", str(ARTIFACTS_DIR / "saes" / "concat"), "--head-saes", *heads,
            "--n-nonzero", "4", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*base, "--model", str(ARTIFACTS_DIR / "model"), "--tokens",
                 str(ARTIFACTS_DIR / "heldout_tokens.safetensors"), "--space", "both"]) == 0
    out = tmp_path / "out"
    summary = read_report(out / "summary.json")
    assert summary.spaces == ("z", "residual") and (out / "codes_residual.safetensors").is_file()
    assert "head_scale_estimate" not in summary.context
    from sparsedecomp.codes_file import read_codes_file

    # The residual codes carry the norms their targets were divided by, as the summary states them.
    stored = read_codes_file(out / "codes_residual.safetensors")
    norms = [rec.residual_norm for rec in summary.results["residual"].features[:5]]
    assert stored.tensors["target_norm"][:5].tolist() == pytest.approx(norms, rel=1e-6)
    assert main(base) == 0
    summary = read_report(out / "summary.json")
    assert summary.spaces == ("z",) and not (out / "codes_residual.safetensors").exists()
    assert set(json.loads((out / "manifest.json").read_text())["files"]) == {
        "summary.json", "index.html", "codes_z.safetensors"}


@pytest.fixture(scope="module")
def demo_sources():
    from sparsedecomp.demo import ARTIFACTS_DIR
    from sparsedecomp.demo.world import head_sae_sources

    heads = [str(p) for p in head_sae_sources().values()]
    return ARTIFACTS_DIR, ["--concat-sae", str(ARTIFACTS_DIR / "saes" / "concat"), "--head-saes", *heads]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"tokens": torch.full((2, 8), 5000)}, "ids up to 5000 but the model's vocabulary has 2048"),
        ({"tokens": torch.rand(2, 8)}, "token ids must be integers"),
        ({"tokens": torch.zeros(0, 8, dtype=torch.long)}, "at least one context"),
        ({"tokens": torch.zeros(3, dtype=torch.long)}, "found shape (3,)"),
        ({"tokens": -torch.ones(2, 8, dtype=torch.long)}, "negative token ids"),
        (b"not a safetensors file", "is not a valid safetensors file"),
    ],
)
def test_bad_token_files_are_named(demo_sources, tmp_path, capsys, content, message):
    from safetensors.torch import save_file

    artifacts, sources = demo_sources
    path = tmp_path / "tokens.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content * 4)
    else:
        save_file(content, str(path))
    code = main(["decompose", *sources, "--model", str(artifacts / "model"), "--tokens", str(path),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--tokens" in err and message in err and "Traceback" not in err


def test_a_pickle_given_as_tokens_is_never_unpickled(demo_sources, tmp_path, capsys):
    import pickle

    artifacts, sources = demo_sources
    path = tmp_path / "tokens.pt"
    path.write_bytes(pickle.dumps({"tokens": [[1, 2, 3]]}))
    code = main(["decompose", *sources, "--model", str(artifacts / "model"), "--tokens", str(path),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "never does" in err and "weights_only" not in err


def test_a_model_other_than_the_saes_is_refused(demo_sources, tmp_path, capsys):
    import shutil

    artifacts, sources = demo_sources
    other = tmp_path / "other-model"
    shutil.copytree(artifacts / "model", other)
    config = json.loads((other / "config.json").read_text())
    config["hooked_transformer_config"]["model_name"] = "some-other-model"
    (other / "config.json").write_text(json.dumps(config))
    code = main(["decompose", *sources, "--model", str(other), "--space", "residual", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "'some-other-model' is not the one the SAEs were trained on" in err
    assert not (tmp_path / "o").exists()


def test_lasso_codes_record_each_targets_l1_weight(checkpoints, tmp_path):
    from sparsedecomp.codes_file import read_codes_file
    from sparsedecomp.optimality import alpha_max

    out = tmp_path / "out"
    assert main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                 "--method", "nn_lasso", "--alpha", "0.1", "--out", str(out), "--no-progress"]) == 0
    summary = read_report(out / "summary.json")
    assert "max_j (t . d_j)_+" in summary.alpha_meaning
    stored = read_codes_file(out / "codes_z.safetensors")
    concat = checkpoints["concat_sae"]
    targets = concat.W_dec / concat.W_dec.norm(dim=1, keepdim=True)
    from sparsedecomp.loading import load_head_saes

    dictionary = load_head_saes(checkpoints["runs"]).dictionary(normalize=True)
    expected = 0.1 * alpha_max(targets, dictionary, nonnegative=True)
    torch.testing.assert_close(stored.tensors["l1_weight"], expected.float(), rtol=1e-5, atol=1e-7)


def test_a_feature_selection_is_decomposed_and_named(checkpoints, tmp_path, capsys):
    from sparsedecomp.codes_file import read_codes_file

    out = tmp_path / "out"
    assert main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                 "--method", "pinv", "--features", "3-5,30", "--out", str(out), "--no-progress"]) == 0
    summary = read_report(out / "summary.json")
    assert summary.n_targets == 4 and summary.n_concat_features == D_SAE_CAT
    assert summary.features_selected == (3, 4, 5, 30)
    records = summary.results["z"].features
    assert [rec.feature for rec in records] == [3, 4, 5, 30]
    target = checkpoints["concat_sae"].W_dec[30]
    shares = (target.view(N_HEADS, D_HEAD).pow(2).sum(1) / target.pow(2).sum()).tolist()
    assert records[3].weight_head_shares == pytest.approx(shares, abs=1e-3)  # feature 30's, not row 3's
    assert read_codes_file(out / "codes_z.safetensors").tensors["feature_index"].tolist() == [3, 4, 5, 30]
    for spec, message in [("5-3", "runs backwards"), ("a", "not an index"), ("0,99", "out of range"),
                          ("1,1", "repeats")]:
        assert main(["decompose", "--concat-sae", checkpoints["concat"], "--head-saes", *checkpoints["runs"],
                     "--features", spec, "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
