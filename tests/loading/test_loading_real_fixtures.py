"""Loaders on files the real libraries wrote (see fixtures/README.md): a SAELens 2.1.3 training tree with its
pickles, SAELens 6 folders saved by ``SAE.save_model`` (one bare), and gelu-2l-sized configs."""

import builtins
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsedecomp.loading import (
    CONCATENATED,
    HeadSAEs,
    HookUnknownError,
    InputScaleWarning,
    detect_format,
    load_head_saes,
    load_legacy_saelens,
    load_saelens6,
    load_sae,
    save_kissane,
    save_legacy_saelens,
    save_saelens6,
)

FIXTURES = Path(__file__).parent / "fixtures"
RUN = FIXTURES / "saelens_2_1_3" / "checkpoints" / "tiny0run"
CHECKPOINT = RUN / "final_256"
SAE_DIR = CHECKPOINT / "tiny-gelu-2l_blocks.1.attn.hook_z_16_"
PICKLES = (CHECKPOINT / "training_run_state.pkl", SAE_DIR / "ctx.safetensors")
HEAD3 = FIXTURES / "saelens6" / "head3"
BARE = FIXTURES / "saelens6" / "bare"


def lens_load(path):
    from sae_lens import SAE as LensSAE

    return LensSAE.load_from_disk(str(path))


# -- SAELens 2.1.3 ---------------------------------------------------------------------------------------------
def test_the_2_1_3_tree_is_what_sae_lens_2_1_3_writes():
    assert sorted(p.name for p in CHECKPOINT.iterdir()) == [
        "activation_store.safetensors", SAE_DIR.name, "training_run_state.pkl"]
    assert sorted(p.name for p in SAE_DIR.iterdir()) == [
        "cfg.json", "ctx.safetensors", "sae_weights.safetensors", "sparsity.safetensors"]
    cfg = json.loads((SAE_DIR / "cfg.json").read_text())
    assert cfg["sae_lens_version"] == "2.1.3" and cfg["normalize_activations"] is True
    for path in PICKLES:  # genuine pickles, despite one's name
        assert path.read_bytes()[:2] == b"\x80\x04"


@pytest.mark.parametrize("source", [RUN, CHECKPOINT, SAE_DIR, SAE_DIR / "cfg.json", SAE_DIR / "sae_weights.safetensors",
                                    SAE_DIR / "sparsity.safetensors"])
def test_2_1_3_checkpoint_loads_from_any_level_or_file(source):
    assert detect_format(source) == "saelens_legacy"
    sae = load_sae(source)
    assert (sae.head, sae.layer, sae.hook_name, sae.model_name) == (2, 1, "blocks.1.attn.hook_z", "tiny-gelu-2l")
    assert (sae.d_in, sae.d_sae, sae.apply_b_dec_to_input) == (8, 16, False)
    assert sae.needs_input_scale and sae.provenance["checkpoint"] == "final_256"
    torch.testing.assert_close(sae.log_sparsity, load_file(str(SAE_DIR / "sparsity.safetensors"))["sparsity"])
    assert load_legacy_saelens(source).provenance["source"] == str(SAE_DIR)


def test_2_1_3_forward_matches_its_formula_and_sae_lens_6():
    tensors = load_file(str(SAE_DIR / "sae_weights.safetensors"))
    sae = load_sae(RUN)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(0))
    acts = torch.relu(x @ tensors["W_enc"] + tensors["b_enc"])  # apply_b_dec_to_input is false in this run
    recon = (acts * tensors["scaling_factor"]) @ tensors["W_dec"] + tensors["b_dec"]
    with pytest.warns(InputScaleWarning, match="tiny0run"):
        torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.forward(x), recon)
    lens = lens_load(SAE_DIR)
    lens.turn_off_forward_pass_hook_z_reshaping()
    with torch.no_grad():
        torch.testing.assert_close(sae.forward(x), lens.decode(lens.encode(x)))
    # folding the scale the run trained with (recorded by the fixture script) gives the function it learned
    s = json.loads((FIXTURES / "saelens_2_1_3" / "WRITTEN_BY.json").read_text())["estimated_norm_scaling_factor"]
    folded = sae.with_input_scale(s)
    torch.testing.assert_close(folded.encode(x), torch.relu((s * x) @ tensors["W_enc"] + tensors["b_enc"]))


def test_2_1_3_pickles_are_never_opened(tmp_path, monkeypatch):
    """A copy of the real tree whose pickles would create a marker if unpickled; every unpickling entry point
    fails, and every file opened is recorded."""
    import safetensors

    copy = tmp_path / "checkpoints"
    shutil.copytree(RUN.parent, copy)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.mkdir, (marker,))

    for path in PICKLES:
        target = copy / path.relative_to(RUN.parent)
        target.write_bytes(pickle.dumps({"optimizer": Payload()}))

    opened = []
    real_open, real_io_open, real_safe_open = builtins.open, io.open, safetensors.safe_open

    def spy(real):
        def wrapper(file, *args, **kwargs):
            opened.append(str(file))
            return real(file, *args, **kwargs)
        return wrapper

    def forbidden(*args, **kwargs):
        raise AssertionError(f"something tried to unpickle {args[:1]}")

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(safetensors, "safe_open", spy(real_safe_open))
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    for source in (copy / "tiny0run", copy / "tiny0run" / "final_256" / SAE_DIR.name / "cfg.json"):
        sae = load_sae(source)
        assert sae.head == 2
    names = {Path(p).name for p in opened}
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"} <= names
    assert not names & {"training_run_state.pkl", "ctx.safetensors", "activation_store.safetensors"}
    assert not marker.exists()
    with pytest.raises(AssertionError, match="something tried to unpickle"):  # the trap is armed
        pickle.loads((copy / "tiny0run" / "final_256" / "training_run_state.pkl").read_bytes())
    assert not marker.exists()


# -- SAELens 6 save_model ----------------------------------------------------------------------------------------
def test_saelens6_head_folder_matches_sae_lens():
    assert detect_format(HEAD3) == "saelens6" and detect_format(HEAD3 / "cfg.json") == "saelens6"
    sae = load_sae(HEAD3 / "sae_weights.safetensors")
    assert (sae.head, sae.layer, sae.hook_name, sae.model_name) == (3, 1, "blocks.1.attn.hook_z", "tiny-gelu-2l")
    assert sae.provenance["reshape_activations"] == "hook_z" and not sae.needs_input_scale
    torch.testing.assert_close(sae.log_sparsity, load_file(str(HEAD3 / "sparsity.safetensors"))["sparsity"])
    lens = lens_load(HEAD3)
    lens.turn_off_forward_pass_hook_z_reshaping()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), lens.encode(x))
        torch.testing.assert_close(sae.forward(x), lens.decode(lens.encode(x)))


def test_installed_sae_lens_save_model_still_writes_what_we_read(tmp_path):
    """Guards against format drift in newer SAELens releases: save with the installed one, load, compare."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="gelu-2l", hook_name="blocks.0.attn.hook_z", hook_head_index=5)
    lens = StandardSAE(StandardSAEConfig(d_in=8, d_sae=12, apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        for name in ("b_enc", "b_dec"):
            getattr(lens, name).normal_()
    lens.save_model(tmp_path / "h5")
    sae = load_sae(tmp_path / "h5")
    assert (sae.head, sae.layer, sae.apply_b_dec_to_input) == (5, 0, False)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(sae.forward(x), lens.decode(lens.encode(x)))


def test_bare_standard_sae_loads_with_its_hook_unknown():
    sae = load_sae(BARE)
    assert (sae.hook_name, sae.layer, sae.head, sae.model_name) == (None, None, None, None)
    assert "with_hook" in sae.provenance["hook_note"]
    assert "<hook unknown>" in sae.describe()
    lens = lens_load(BARE)
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(sae.forward(x), lens.decode(lens.encode(x)))


def test_functions_that_need_the_hook_ask_for_it(tmp_path):
    sae = load_sae(BARE)
    with pytest.raises(HookUnknownError, match=r"writing a Kissane checkpoint needs the SAE's hook_name.*with_hook\("):
        save_kissane(sae, tmp_path, "v1")
    with pytest.raises(HookUnknownError, match=r"writing a legacy SAELens folder needs the SAE's hook_name"):
        save_legacy_saelens(sae, tmp_path, "run", 10)
    with pytest.raises(ValueError, match=r"does not record which head it reads .*with_hook\('blocks.<layer>.attn.hook_z', head=<h>\)"):
        HeadSAEs((sae,))
    with pytest.raises(HookUnknownError, match=r"does not record which hook and head it reads.*head=4"):
        load_head_saes({4: BARE})
    with pytest.raises(HookUnknownError, match=r"needs the SAE's hook_name"):
        sae.require_hook("decomposing")

    placed = sae.with_hook("blocks.1.attn.hook_z", head=4, model_name="gelu-2l")
    assert (placed.hook_name, placed.layer, placed.head, placed.model_name) == ("blocks.1.attn.hook_z", 1, 4, "gelu-2l")
    assert placed.transformations[-1].startswith("hook set by hand: blocks.1.attn.hook_z")
    assert placed.require_hook("decomposing") == ("blocks.1.attn.hook_z", 1)
    assert HeadSAEs((placed,)).heads == (4,)
    assert sae.with_hook("blocks.0.attn.hook_z").head == CONCATENATED
    pt, _ = save_kissane(placed, tmp_path, "v1")
    assert load_sae(pt).head == 4
    # written by our SAELens 6 writer it stays bare, and loads back the same
    again = load_saelens6(save_saelens6(sae, tmp_path / "bare"))
    assert again.hook_name is None and torch.equal(again.W_enc, sae.W_enc)
    with pytest.raises(ValueError, match="names no layer"):
        sae.with_hook("hook_embed")


# -- gelu-2l-sized configs ---------------------------------------------------------------------------------------
def test_gelu_2l_per_head_config_written_by_sae_lens_2_1_3(tmp_path):
    from safetensors.torch import save_file

    cfg = json.loads((FIXTURES / "configs" / "gelu-2l_saelens_2_1_3_head0_cfg.json").read_text())
    sae_dir = tmp_path / "rovi1lwe" / "final_983040000" / "gelu-2l_blocks.1.attn.hook_z_2048_"
    sae_dir.mkdir(parents=True)
    shutil.copyfile(FIXTURES / "configs" / "gelu-2l_saelens_2_1_3_head0_cfg.json", sae_dir / "cfg.json")
    g = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(64, 2048, generator=g), "b_enc": torch.zeros(2048),
               "W_dec": torch.randn(2048, 64, generator=g), "b_dec": torch.zeros(64), "scaling_factor": torch.ones(2048)}
    save_file(weights, str(sae_dir / "sae_weights.safetensors"))
    sae = load_sae(tmp_path / "rovi1lwe")
    assert (sae.model_name, sae.hook_name, sae.layer, sae.head) == ("gelu-2l", "blocks.1.attn.hook_z", 1, 0)
    assert (sae.d_in, sae.d_sae, sae.apply_b_dec_to_input, sae.needs_input_scale) == (64, 2048, False, True)
    assert sae.provenance["cfg"]["device"] == cfg["device"] == "cuda"  # recorded, never used
    assert sae.dtype == torch.float32


def test_seed_kissane_config(tmp_path):
    version = "gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78"
    shutil.copyfile(FIXTURES / "configs" / "gelu-2l_kissane_concat_z_v78_cfg.json", tmp_path / f"{version}_cfg.json")
    state = {"W_enc": torch.zeros(512, 16384), "W_dec": torch.zeros(16384, 512), "b_enc": torch.zeros(16384),
             "b_dec": torch.zeros(512)}
    torch.save(state, tmp_path / f"{version}.pt")
    sae = load_sae(tmp_path / f"{version}.pt")
    assert (sae.model_name, sae.hook_name, sae.layer, sae.head) == ("gelu-2l", "blocks.1.attn.hook_z", 1, CONCATENATED)
    assert (sae.d_in, sae.d_sae, sae.dtype, sae.apply_b_dec_to_input) == (512, 16384, torch.float32, True)
    assert sae.provenance["version"] == version and sae.provenance["cfg"]["l1_coeff"] == 2.0
