"""Legacy SAELens (1.4 - 2.1.3) training trees, with pickles that must never be opened."""

import builtins
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsedecomp.loading import (
    CheckpointError,
    CheckpointNotFoundError,
    InputScaleWarning,
    detect_format,
    find_legacy_sae_dir,
    load_legacy_saelens,
    load_sae,
    save_legacy_saelens,
)

SAE_NAME = "gelu-2l_blocks.1.attn.hook_z_24_"
FINAL = 983044096


@pytest.fixture
def tree(tmp_path, make_sae, poison):
    """checkpoints/run0/{491522048, final_983044096}/<sae_name>/ plus poisoned pickles everywhere they occur."""
    root = tmp_path / "checkpoints"
    early = make_sae(head=2, seed=1)
    final = make_sae(head=2, seed=2)
    marker = tmp_path / "pwned"
    save_legacy_saelens(early, root, "run0", 491522048, final=False, cfg_extra={"normalize_activations": True})
    sae_dir = save_legacy_saelens(
        final, root, "run0", FINAL, cfg_extra={"normalize_activations": True}, sparsity=torch.linspace(-6, -1, 24)
    )
    for ckpt in (root / "run0" / "491522048", root / "run0" / f"final_{FINAL}"):
        poison(ckpt / "training_run_state.pkl", marker)
        poison(ckpt / SAE_NAME / "ctx.safetensors", marker)
        save_file({"buffer": torch.zeros(3)}, str(ckpt / "activation_store.safetensors"))
    return {"root": root, "run": root / "run0", "sae_dir": sae_dir, "final": final, "early": early, "marker": marker}


def legacy_reference(tensors, cfg, x):
    """SAELens 2.x SparseAutoencoder forward, written from the raw files."""
    sae_in = x - tensors["b_dec"] * float(cfg["apply_b_dec_to_input"])
    acts = torch.relu(sae_in @ tensors["W_enc"] + tensors["b_enc"])
    return acts, (acts * tensors["scaling_factor"]) @ tensors["W_dec"] + tensors["b_dec"]


def test_layout_and_config_keys(tree):
    sae_dir = tree["sae_dir"]
    assert sae_dir == tree["run"] / f"final_{FINAL}" / SAE_NAME
    assert sorted(p.name for p in sae_dir.iterdir()) == ["cfg.json", "ctx.safetensors", "sae_weights.safetensors", "sparsity.safetensors"]
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    expected = {
        "model_name": "gelu-2l", "hook_point": "blocks.1.attn.hook_z", "hook_point_layer": 1, "hook_point_head_index": 2,
        "d_in": 8, "d_sae": 24, "expansion_factor": 3, "apply_b_dec_to_input": True, "normalize_sae_decoder": False,
        "scale_sparsity_penalty_by_decoder_norm": True, "decoder_heuristic_init": True,
        "init_encoder_as_decoder_transpose": True, "normalize_activations": True, "dtype": "torch.float32",
        "sae_lens_version": "2.1.3", "prepend_bos": True,
    }
    assert {k: cfg[k] for k in expected} == expected
    for key in ("context_size", "dataset_path", "device", "l1_coefficient", "lr"):
        assert key in cfg
    weights = load_file(str(sae_dir / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc", "scaling_factor"]
    assert torch.equal(weights["scaling_factor"], torch.ones(24))


@pytest.mark.parametrize("level", ["run", "checkpoint", "sae_dir"])
def test_any_parent_resolves_to_the_final_checkpoint(tree, level):
    source = {"run": tree["run"], "checkpoint": tree["run"] / f"final_{FINAL}", "sae_dir": tree["sae_dir"]}[level]
    assert detect_format(source) == "saelens_legacy"
    sae = load_sae(source)
    torch.testing.assert_close(sae.W_dec, tree["final"].W_dec)
    assert sae.head == 2 and sae.layer == 1 and sae.hook_name == "blocks.1.attn.hook_z"
    assert sae.provenance["checkpoint"] == f"final_{FINAL}"
    if level == "run":
        assert sae.provenance["checkpoint_choice"].startswith(f"chose final_{FINAL}")
        assert "491522048" in sae.provenance["checkpoint_choice"]
    assert not tree["marker"].exists()


def test_pickles_are_never_opened(tree, monkeypatch):
    """Record every file opened from Python or by safetensors, and make every unpickling entry point fail."""
    import safetensors

    opened = []
    real_open, real_io_open, real_safe_open = builtins.open, io.open, safetensors.safe_open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_io_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_io_open(file, *args, **kwargs)

    def spy_safe_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_safe_open(file, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_io_open)
    monkeypatch.setattr(safetensors, "safe_open", spy_safe_open)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    sae = load_legacy_saelens(tree["run"])
    assert sae.log_sparsity is not None
    names = {p.rsplit("/", 1)[-1] for p in opened}
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"} <= names
    assert not names & {"training_run_state.pkl", "ctx.safetensors", "activation_store.safetensors"}
    assert not tree["marker"].exists()


def test_encode_decode_match_the_legacy_formula_with_a_scaling_factor(tree):
    sae_dir = tree["sae_dir"]
    tensors = load_file(str(sae_dir / "sae_weights.safetensors"))
    tensors["scaling_factor"] = torch.linspace(0.5, 1.5, 24)
    save_file(tensors, str(sae_dir / "sae_weights.safetensors"))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    sae = load_legacy_saelens(sae_dir)
    x = torch.randn(11, 8)
    acts, recon = legacy_reference(tensors, cfg, x)
    with pytest.warns(InputScaleWarning, match="normalize_activations: true"):  # unscaled legacy SAE: it says so
        torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.forward(x), recon, rtol=1e-5, atol=1e-5)
    assert any("scaling_factor" in t for t in sae.transformations)


def test_apply_b_dec_false_and_sparsity(tmp_path, make_sae):
    original = make_sae(head=0, apply_b_dec_to_input=False, seed=4)
    sae_dir = save_legacy_saelens(original, tmp_path, "abc", 1000, sparsity=torch.full((24,), -3.0))
    sae = load_legacy_saelens(sae_dir)
    assert not sae.apply_b_dec_to_input and not sae.needs_input_scale
    assert sae.transformations == ()
    torch.testing.assert_close(sae.log_sparsity, torch.full((24,), -3.0))
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.forward(x), original.forward(x))


def test_normalize_activations_is_recorded_and_flagged(tree):
    sae = load_legacy_saelens(tree["run"])
    assert sae.provenance["normalize_activations"] is True
    assert sae.needs_input_scale and "input_scale_note" in sae.provenance
    assert not sae.with_input_scale(2.0).needs_input_scale


def test_sae_lens_reads_the_same_directory_once_hook_z_reshaping_is_off(tree):
    """formats.md pitfall 2: SAELens 6 loads the legacy folder but flattens [N, 64] input until told not to."""
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(tree["sae_dir"]))
    x = torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(48\) must match the size of tensor b \(8\)"):
        lens.encode(x)  # [6, 8] flattened to [48]
    lens.turn_off_forward_pass_hook_z_reshaping()
    ours = load_legacy_saelens(tree["sae_dir"])
    with torch.no_grad(), pytest.warns(InputScaleWarning):
        torch.testing.assert_close(ours.encode(x), lens.encode(x))
        torch.testing.assert_close(ours.decode(ours.encode(x)), lens.decode(lens.encode(x)))
    assert lens.cfg.normalize_activations == "expected_average_only_in"


def test_checkpoint_choice_rules(tmp_path, make_sae):
    sae = make_sae()
    save_legacy_saelens(sae, tmp_path, "r", 100, final=False)
    save_legacy_saelens(sae, tmp_path, "r", 300, final=False)
    save_legacy_saelens(sae, tmp_path, "r", 20, final=False)
    path, choice = find_legacy_sae_dir(tmp_path / "r")
    assert path.parent.name == "300" and "no final_ checkpoint" in choice
    save_legacy_saelens(sae, tmp_path, "r", 200)
    path, choice = find_legacy_sae_dir(tmp_path / "r")
    assert path.parent.name == "final_200"  # a final_ checkpoint wins over a later-numbered intermediate one


def test_several_saes_in_one_checkpoint_need_a_name(tmp_path, make_sae):
    a = save_legacy_saelens(make_sae(d_sae=24), tmp_path, "r", 10)
    save_legacy_saelens(make_sae(d_sae=32), tmp_path, "r", 10)
    with pytest.raises(CheckpointError, match="holds several SAEs"):
        load_legacy_saelens(tmp_path / "r")
    assert load_sae(tmp_path / "r", sae_name=a.name).d_sae == 24
    with pytest.raises(CheckpointNotFoundError, match="no SAE folder 'nope'"):
        load_legacy_saelens(tmp_path / "r", sae_name="nope")


# -- bad files ---------------------------------------------------------------------------------------------------
def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_legacy_saelens(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="empty_run is not a legacy SAELens"):
        load_legacy_saelens(tmp_path / "empty_run")


def test_truncated_weights_name_the_file(tree):
    path = tree["sae_dir"] / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors is not a readable safetensors file"):
        load_legacy_saelens(tree["run"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(d_in=9), r"sae_weights\.safetensors: W_enc has shape \(8, 24\), expected \(9, 24\)"),
        (lambda c: c.update(dtype="torch.float16"), r"weights are torch.float32 but the config declares torch.float16"),
        (lambda c: c.update(dtype="fp32"), r"cfg\.json: dtype must be one of"),
        (lambda c: c.pop("hook_point"), r"cfg\.json is not a legacy"),
        (lambda c: c.update(hook_point_head_index="2"), r"cfg\.json: hook_point_head_index must be"),
        (lambda c: c.update(normalize_activations="layer_norm"), r"cfg\.json: unsupported normalize_activations"),
    ],
)
def test_config_problems_name_the_file(tree, edit, message):
    cfg_path = tree["sae_dir"] / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_legacy_saelens(tree["sae_dir"])


def test_missing_key_and_bad_sparsity(tree):
    weights_path = tree["sae_dir"] / "sae_weights.safetensors"
    tensors = load_file(str(weights_path))
    save_file({"sparsity": torch.zeros(5)}, str(tree["sae_dir"] / "sparsity.safetensors"))
    with pytest.raises(CheckpointError, match=r"sparsity\.safetensors must hold a floating 'sparsity' tensor of shape \(24,\)"):
        load_legacy_saelens(tree["sae_dir"])
    del tensors["b_enc"]
    save_file(tensors, str(weights_path))
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors is missing the keys \['b_enc'\]"):
        load_legacy_saelens(tree["sae_dir"])


def test_save_validates_its_arguments(tmp_path, make_sae):
    sae = make_sae()
    with pytest.raises(ValueError, match="d_in"):
        save_legacy_saelens(sae, tmp_path, "r", 1, cfg_extra={"d_in": 3})
    with pytest.raises(ValueError, match="normalize_activations is a bool"):
        save_legacy_saelens(sae, tmp_path, "r", 1, cfg_extra={"normalize_activations": "expected_average_only_in"})
    with pytest.raises(ValueError, match="n_tokens"):
        save_legacy_saelens(sae, tmp_path, "r", -1)
