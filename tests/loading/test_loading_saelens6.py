"""SAELens 6.x directories and pretrained releases, checked against sae_lens's own forward pass."""

import json

import pytest
import torch

from sparsedecomp.loading import (
    CONCATENATED,
    CheckpointError,
    UnsupportedCheckpointError,
    detect_format,
    from_saelens,
    load_saelens6,
    load_saelens_pretrained,
    load_sae,
    save_kissane,
    save_saelens6,
)

N_HEADS, D_HEAD = 4, 8


def lens_load(path):
    from sae_lens import SAE as LensSAE

    return LensSAE.load_from_disk(str(path))


def test_concatenated_hook_z_sae_matches_sae_lens_on_head_major_input(tmp_path, make_sae):
    original = make_sae(d_in=N_HEADS * D_HEAD, d_sae=40, head=CONCATENATED, seed=7)
    save_saelens6(original, tmp_path / "cat")
    cfg = json.loads((tmp_path / "cat" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["reshape_activations"] == "hook_z"
    assert cfg["metadata"]["hook_name"] == "blocks.1.attn.hook_z" and cfg["metadata"]["hook_head_index"] is None
    assert detect_format(tmp_path / "cat") == "saelens6"
    sae = load_sae(tmp_path / "cat")
    assert sae.head == CONCATENATED and sae.provenance["reshape_activations"] == "hook_z"
    lens = lens_load(tmp_path / "cat")
    z = torch.randn(3, 5, N_HEADS, D_HEAD)  # [batch, pos, n_heads, d_head]
    with torch.no_grad():
        expected_acts = lens.encode(z)
        expected_out = lens.decode(expected_acts)  # back to [..., n_heads, d_head]
    flat = z.flatten(-2)  # head-major: head h owns columns h*d_head:(h+1)*d_head
    torch.testing.assert_close(sae.encode(flat), expected_acts)
    torch.testing.assert_close(sae.decode(sae.encode(flat)), expected_out.flatten(-2))
    torch.testing.assert_close(sae.forward(flat), original.forward(flat))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_per_head_sae_with_the_hook_z_trap(tmp_path, make_sae, apply_b_dec):
    original = make_sae(head=3, apply_b_dec_to_input=apply_b_dec, seed=8)
    save_saelens6(original, tmp_path / "h3", reshape_activations="hook_z")
    sae = load_saelens6(tmp_path / "h3")
    assert sae.head == 3 and sae.apply_b_dec_to_input is apply_b_dec and "reshape_note" in sae.provenance
    lens = lens_load(tmp_path / "h3")
    x = torch.randn(6, D_HEAD)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(48\) must match the size of tensor b \(8\)"):
        lens.encode(x)  # [6, d_head] is flattened to [48] as if 6 were the head axis
    lens.turn_off_forward_pass_hook_z_reshaping()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), lens.encode(x))
        torch.testing.assert_close(sae.forward(x), lens.decode(lens.encode(x)))


def test_from_saelens_copies_a_lens_object(tmp_path, make_sae):
    original = make_sae(head=1, seed=9)
    save_saelens6(original, tmp_path / "h1", sparsity=torch.full((24,), -2.0))
    lens = lens_load(tmp_path / "h1")
    sae = from_saelens(lens)
    torch.testing.assert_close(sae.W_enc, original.W_enc)
    sae.W_enc.zero_()
    assert lens.W_enc.abs().sum() > 0  # a copy, not a view
    loaded = load_saelens6(tmp_path / "h1")
    torch.testing.assert_close(loaded.log_sparsity, torch.full((24,), -2.0))


def test_expected_average_only_in_needs_an_input_scale(tmp_path, make_sae):
    save_saelens6(make_sae(), tmp_path / "n", normalize_activations="expected_average_only_in")
    assert load_saelens6(tmp_path / "n").needs_input_scale


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda c: c.update(normalize_activations="layer_norm"), UnsupportedCheckpointError, "input-dependent"),
        (lambda c: c.update(dtype="float16"), CheckpointError, r"weights are torch.float32 but the config declares torch.float16"),
        (lambda c: c.update(d_sae=25), CheckpointError, r"sae_weights\.safetensors: W_enc has shape \(8, 24\), expected \(8, 25\)"),
        (lambda c: c["metadata"].update(hook_name=3), CheckpointError, r"cfg\.json: metadata.hook_name must be a non-empty string"),
        (lambda c: c["metadata"].update(hook_layer=0), CheckpointError, r"cfg\.json: metadata.hook_layer is 0 but the hook 'blocks.1.attn.hook_z' is in layer 1"),
        (lambda c: c.update(apply_b_dec_to_input="yes"), CheckpointError, r"cfg\.json: apply_b_dec_to_input must be a bool"),
    ],
)
def test_config_problems_name_the_file(tmp_path, make_sae, edit, error, message):
    save_saelens6(make_sae(), tmp_path / "a")
    cfg_path = tmp_path / "a" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(error, match=message):
        load_saelens6(tmp_path / "a")


def test_truncated_and_missing_weights(tmp_path, make_sae):
    save_saelens6(make_sae(), tmp_path / "a")
    weights = tmp_path / "a" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors is not a readable safetensors file"):
        load_saelens6(tmp_path / "a")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors"):
        load_saelens6(tmp_path / "a")


def test_pretrained_kissane_release_reads_the_hub_cache_safely(tmp_path, make_sae, hf_cache):
    """`gpt2-small-hook-z-kk` is a Kissane .pt release: it goes through our weights_only loader."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()["gpt2-small-hook-z-kk"]
    path = lookup.saes_map["blocks.0.hook_z"]
    version = path[: -len(".pt")]
    original = make_sae(d_in=N_HEADS * D_HEAD, d_sae=40, head=CONCATENATED, layer=0, model_name="gpt2-small")
    pt, cfg = save_kissane(original, tmp_path / "src", version)
    hf_cache(lookup.repo_id, f"{version}.pt", pt)
    hf_cache(lookup.repo_id, f"{version}_cfg.json", cfg)
    sae = load_saelens_pretrained("gpt2-small-hook-z-kk", "blocks.0.hook_z")
    assert sae.provenance["release"] == "gpt2-small-hook-z-kk" and sae.provenance["format"] == "kissane"
    torch.testing.assert_close(sae.W_dec, original.W_dec)
    with pytest.raises(CheckpointError, match="not in release"):
        load_saelens_pretrained("gpt2-small-hook-z-kk", "blocks.99.hook_z")


def test_pretrained_saelens_repo_delegates_to_sae_lens(tmp_path, make_sae, hf_cache):
    original = make_sae(head=5, seed=11)
    folder = save_saelens6(original, tmp_path / "src" / "blocks.1.attn.hook_z.h5")
    for name in ("cfg.json", "sae_weights.safetensors"):
        hf_cache("someone/head-saes", f"blocks.1.attn.hook_z.h5/{name}", folder / name)
    sae = load_saelens_pretrained("someone/head-saes", "blocks.1.attn.hook_z.h5")
    assert sae.head == 5 and sae.provenance["release"] == "someone/head-saes"
    x = torch.randn(4, D_HEAD)
    torch.testing.assert_close(sae.forward(x), original.forward(x))
