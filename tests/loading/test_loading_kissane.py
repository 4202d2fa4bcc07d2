"""Kissane concat-z checkpoints: {version}.pt + {version}_cfg.json, locally and through the hub cache."""

import json

import pytest
import torch

from sparsedecomp.loading import (
    CONCATENATED,
    CheckpointError,
    CheckpointNotFoundError,
    detect_format,
    load_kissane,
    load_sae,
    save_kissane,
)

NESTED = "concat-z-gelu-21-l1-lr-sweep-3/gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78"
N_HEADS, D_HEAD = 4, 8


@pytest.fixture
def concat_sae(make_sae):
    return make_sae(d_in=N_HEADS * D_HEAD, d_sae=48, head=CONCATENATED, layer=1, seed=3)


def kissane_reference(state, x):
    """Kissane et al.'s AutoEncoder forward, written from the raw state dict."""
    acts = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    return acts, acts @ state["W_dec"] + state["b_dec"]


def test_nested_version_round_trip_matches_the_original_formula(tmp_path, concat_sae):
    pt, cfg = save_kissane(concat_sae, tmp_path, NESTED, cfg_extra={"l1_coeff": 2.0, "seed": 49})
    assert pt == tmp_path / f"{NESTED}.pt" and cfg == tmp_path / f"{NESTED}_cfg.json"
    written = json.loads(cfg.read_text())
    for key in ("act_size", "dict_size", "act_name", "layer", "model_name", "head", "enc_dtype", "seed", "l1_coeff"):
        assert key in written
    assert (written["act_size"], written["dict_size"], written["head"], written["enc_dtype"]) == (32, 48, "cat", "fp32")
    state = torch.load(pt, map_location="cpu", weights_only=True)
    assert sorted(state) == ["W_dec", "W_enc", "b_dec", "b_enc"]

    sae = load_sae(tmp_path, version=NESTED)
    assert detect_format(tmp_path, version=NESTED) == "kissane"
    assert sae.head == CONCATENATED and sae.layer == 1 and sae.hook_name == "blocks.1.attn.hook_z"
    assert sae.model_name == "gelu-2l" and sae.apply_b_dec_to_input
    assert sae.provenance["format"] == "kissane" and sae.provenance["cfg"]["l1_coeff"] == 2.0
    x = torch.randn(10, 32)
    acts, recon = kissane_reference(state, x)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.forward(x), recon)
    torch.testing.assert_close(sae.forward(x), concat_sae.forward(x))


def test_pt_file_cfg_file_and_single_pair_directory_all_load(tmp_path, concat_sae):
    pt, cfg = save_kissane(concat_sae, tmp_path / "run", "gelu-2l_L1_Hcat_z_v1")
    for source in (pt, cfg, tmp_path / "run"):
        sae = load_kissane(source)
        torch.testing.assert_close(sae.W_dec, concat_sae.W_dec)
    save_kissane(concat_sae, tmp_path / "run", "gelu-2l_L1_Hcat_z_v2")
    with pytest.raises(CheckpointError, match="holds 2 Kissane checkpoints"):
        load_kissane(tmp_path / "run")


def test_minimal_old_config_without_optional_keys(tmp_path, concat_sae):
    pt, cfg = save_kissane(concat_sae, tmp_path, "old_v5")
    cfg.write_text(json.dumps({"act_size": 32, "dict_size": 48, "act_name": "blocks.1.attn.hook_z", "model_name": "gelu-2l"}))
    sae = load_kissane(tmp_path, version="old_v5")
    assert sae.layer == 1 and sae.head == CONCATENATED
    # model_name may also come from the version name grammar
    cfg.write_text(json.dumps({"act_size": 32, "dict_size": 48, "act_name": "blocks.0.attn.hook_z"}))
    pt.rename(tmp_path / "gpt2-small_L0_Hcat_z_v9.pt")
    cfg.rename(tmp_path / "gpt2-small_L0_Hcat_z_v9_cfg.json")
    assert load_kissane(tmp_path / "gpt2-small_L0_Hcat_z_v9.pt").model_name == "gpt2-small"


def test_apply_b_dec_false_is_written_in_the_equivalent_form(tmp_path, make_sae):
    sae = make_sae(d_in=32, d_sae=40, head=CONCATENATED, apply_b_dec_to_input=False, seed=5)
    save_kissane(sae, tmp_path, "v1")
    loaded = load_kissane(tmp_path, version="v1")
    x = torch.randn(9, 32)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.forward(x), sae.forward(x), rtol=1e-5, atol=1e-5)


def test_fp16_checkpoint_keeps_its_dtype(tmp_path, make_sae):
    sae = make_sae(d_in=32, d_sae=40, head=CONCATENATED, dtype=torch.float16)
    save_kissane(sae, tmp_path, "half")
    loaded = load_kissane(tmp_path, version="half")
    assert loaded.dtype == torch.float16 and json.loads((tmp_path / "half_cfg.json").read_text())["enc_dtype"] == "fp16"


def test_hub_download_through_a_local_hub_cache(tmp_path, concat_sae, hf_cache):
    pt, cfg = save_kissane(concat_sae, tmp_path / "src", NESTED)
    repo = "ckkissane/tinystories-1M-SAES"
    hf_cache(repo, f"{NESTED}.pt", pt)
    hf_cache(repo, f"{NESTED}_cfg.json", cfg)
    sae = load_kissane(version=NESTED)  # default repo, default (patched) cache, offline
    assert sae.provenance["repo_id"] == repo and sae.provenance["source"].startswith("hf://")
    assert str(hf_cache.cache) in sae.provenance["files"][0]
    torch.testing.assert_close(sae.W_enc, concat_sae.W_enc)
    again = load_sae(version=NESTED, repo_id=repo)
    torch.testing.assert_close(again.b_dec, concat_sae.b_dec)
    with pytest.raises(CheckpointNotFoundError, match="no_such_version.pt"):
        load_kissane(version="no_such_version")


def test_hub_download_uses_hf_hub_download(monkeypatch, tmp_path, concat_sae):
    import huggingface_hub

    pt, cfg = save_kissane(concat_sae, tmp_path, NESTED)
    calls = []

    def fake(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    load_kissane(version=NESTED, repo_id="someone/repo")
    assert calls == [("someone/repo", f"{NESTED}.pt"), ("someone/repo", f"{NESTED}_cfg.json")]


# -- bad files ---------------------------------------------------------------------------------------------------
@pytest.fixture
def pair(tmp_path, concat_sae):
    pt, cfg = save_kissane(concat_sae, tmp_path, "v1")
    return pt, cfg


def test_missing_pt_is_a_file_not_found_naming_it(pair):
    pt, cfg = pair
    pt.unlink()
    with pytest.raises(FileNotFoundError, match="v1.pt"):
        load_kissane(cfg)
    with pytest.raises(CheckpointNotFoundError):
        load_kissane(pt.parent / "nothing_here")


def test_truncated_pt_names_the_file(pair):
    pt, _ = pair
    pt.write_bytes(pt.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"v1\.pt could not be read"):
        load_kissane(pt)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_are_never_executed(pair, tmp_path, poison):
    pt, _ = pair
    marker = tmp_path / "pwned"
    poison(pt, marker)  # a plain pickle stream
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_kissane(pt)
    poison(pt, marker, torch_format=True)  # torch.save zip archive holding the payload
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_kissane(pt)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(act_size=31), r"v1\.pt: W_enc has shape \(32, 48\), expected \(31, 48\)"),
        (lambda c: c.update(enc_dtype="fp16"), r"v1\.pt: weights are torch.float32 but the config declares torch.float16"),
        (lambda c: c.update(enc_dtype="fp8"), r"v1_cfg\.json: enc_dtype must be one of"),
        (lambda c: c.pop("dict_size"), r"v1_cfg\.json lacks the required key 'dict_size'"),
        (lambda c: c.update(head="seven", concat_heads=False), r"v1_cfg\.json: head must be"),
        (lambda c: c.update(head=3), r"v1_cfg\.json: concat_heads is true but head is 3"),
    ],
)
def test_config_problems_name_the_file(pair, edit, message):
    pt, cfg_path = pair
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_kissane(pt)


def test_invalid_json_names_the_file(pair):
    pt, cfg = pair
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"v1_cfg\.json is not valid JSON"):
        load_kissane(pt)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("b_dec"), r"missing the keys \['b_dec'\]"),
        (lambda s: s.update(threshold=torch.zeros(48)), r"unexpected keys \['threshold'\]"),
        (lambda s: s.update(W_dec=s["W_dec"].T.contiguous()), r"W_dec has shape \(32, 48\), expected \(48, 32\)"),
        (lambda s: s.update(b_enc=torch.zeros(48, dtype=torch.long)), r"b_enc has dtype torch.int64"),
        (lambda s: s.update(b_enc=s["b_enc"].double()), r"b_enc is torch.float64 but W_enc is torch.float32"),
        (lambda s: s["W_enc"].__setitem__((0, 0), float("inf")), r"W_enc contains NaN or Inf"),
    ],
)
def test_state_dict_problems_name_the_file(pair, edit, message):
    pt, _ = pair
    state = torch.load(pt, weights_only=True)
    edit(state)
    torch.save(state, pt)
    with pytest.raises(CheckpointError, match=r"v1\.pt.*" + message):
        load_kissane(pt)


def test_non_dict_payload_is_rejected(pair):
    pt, _ = pair
    torch.save([torch.zeros(3)], pt)
    with pytest.raises(CheckpointError, match=r"v1\.pt must hold a dict of tensors"):
        load_kissane(pt)


def test_save_refuses_structural_overrides(tmp_path, concat_sae):
    with pytest.raises(ValueError, match="act_size"):
        save_kissane(concat_sae, tmp_path, "v", cfg_extra={"act_size": 3})
