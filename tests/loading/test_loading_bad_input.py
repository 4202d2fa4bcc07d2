"""Bad and degenerate checkpoints and arguments to the loaders (the catalogue of bad inputs, defects 6-11): each is
refused by name or warned about, never loaded as something it is not."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsedecomp
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.loading import (
    CheckpointChoiceWarning,
    CheckpointError,
    CheckpointNotFoundError,
    DeadEncoderWarning,
    HeadSAEs,
    UnsupportedCheckpointError,
    find_legacy_sae_dir,
    load_head_saes,
    load_legacy_saelens,
    load_sae,
    save_kissane,
    save_legacy_saelens,
    save_saelens6,
)

SEED_STEP = 983044096  # the intermediate checkpoint the seed notebook loaded
FINAL = 983048192
EARLY = 491522048


@pytest.fixture
def run(tmp_path, make_sae):
    """checkpoints/run0/{491522048, 983044096, final_983048192}/<sae_name>/, one SAE per step (head 2)."""
    root = tmp_path / "checkpoints"
    saes = {step: make_sae(head=2, seed=i) for i, step in enumerate((EARLY, SEED_STEP, FINAL))}
    kwargs = {"model_from_pretrained_kwargs": {"center_writing_weights": False}}
    save_legacy_saelens(saes[EARLY], root, "run0", EARLY, final=False, cfg_extra=kwargs)
    save_legacy_saelens(saes[SEED_STEP], root, "run0", SEED_STEP, final=False, cfg_extra=kwargs)
    save_legacy_saelens(saes[FINAL], root, "run0", FINAL, cfg_extra=kwargs)
    return root / "run0", saes


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- 6. a source that is not a path ----------------------------------------------------------------------------
def test_a_source_that_is_not_a_path_is_refused_by_type():
    with pytest.raises(InputTypeError, match=r"source must be a path \(str or os\.PathLike\) or a hub reference "
                                             r"string, got int 3"):
        sparsedecomp.load_sae(3)
    with pytest.raises(InputTypeError, match=r"sources\[0\] must be a path .* got int 3"):
        load_head_saes([3])
    with pytest.raises(InputTypeError, match=r"sources\[5\] must be a path .* got float 1\.5"):
        load_head_saes({5: 1.5})
    with pytest.raises(InputTypeError, match=r"path must be a path \(str or os\.PathLike\), got int 3"):
        load_legacy_saelens(3)


# -- 7. the meta device -------------------------------------------------------------------------------------
def test_the_meta_device_is_refused_for_saes_and_loading(run, make_sae):
    sae = make_sae()
    with pytest.raises(InputError, match=r"device 'meta' holds no data"):
        sae.to(device="meta")
    with pytest.raises(InputError, match=r"device 'meta' holds no data"):
        HeadSAEs((sae,)).to(device="meta")
    with pytest.raises(InputError, match=r"device 'meta' holds no data"):
        load_sae(run[0], device="meta")
    with pytest.raises(InputError, match="W_enc is on the meta device"):
        replace(sae, W_enc=sae.W_enc.to("meta"))


# -- 8. a legacy SAE with another activation function -----------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"activation_fn": "topk", "activation_fn_kwargs": {"k": 8}},
     r"cfg\.json: activation_fn 'topk' \(activation_fn_kwargs \{'k': 8\}\); only ReLU \(standard\) SAEs are "
     r"supported by this loader"),
    ({"activation_fn_str": "tanh-relu"}, r"cfg\.json: activation_fn_str 'tanh-relu'; only ReLU"),
])
def test_a_legacy_sae_that_is_not_relu_is_refused(tmp_path, make_sae, extra, message):
    sae_dir = save_legacy_saelens(make_sae(), tmp_path, "r", 100, cfg_extra=extra)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        load_sae(sae_dir)


def test_a_legacy_relu_sae_and_one_without_the_entry_load(tmp_path, make_sae):
    sae_dir = save_legacy_saelens(make_sae(), tmp_path, "r", 100)
    assert json.loads((sae_dir / "cfg.json").read_text())["activation_fn"] == "relu"
    load_sae(sae_dir)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    del cfg["activation_fn"]  # SAELens 1.x wrote none: ReLU
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    load_sae(sae_dir)


# -- 9. a legacy scaling_factor that is not positive -----------------------------------------------------
@pytest.mark.parametrize("value, message", [
    (-0.5, r"sae_weights\.safetensors: scaling_factor has 1 of 24 entries <= 0 \(first features \[3\], min -0\.5\)"),
    (0.0, r"sae_weights\.safetensors: scaling_factor has 1 of 24 entries <= 0 \(first features \[3\], min 0\)"),
    (float("inf"), r"sae_weights\.safetensors: scaling_factor contains NaN or Inf entries"),
])
def test_a_legacy_scaling_factor_that_is_not_finite_and_positive_is_refused(tmp_path, make_sae, value, message):
    sae_dir = save_legacy_saelens(make_sae(), tmp_path, "r", 100)
    tensors = load_file(str(sae_dir / "sae_weights.safetensors"))
    tensors["scaling_factor"][3] = value
    save_file(tensors, str(sae_dir / "sae_weights.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_sae(sae_dir)


# -- 10. an all-zero encoder, and non-finite weights ----------------------------------------------------
def _zero_encoder(make_sae, **kwargs):
    sae = make_sae(**kwargs)
    b_enc = torch.full_like(sae.b_enc, -0.1)
    b_enc[:2] = 0.3  # two features constantly on, whatever the input
    return replace(sae, W_enc=torch.zeros_like(sae.W_enc), b_enc=b_enc)


@pytest.mark.parametrize("fmt", ["saelens_legacy", "saelens6", "kissane"])
def test_an_all_zero_encoder_is_warned_about_at_load(tmp_path, make_sae, fmt):
    if fmt == "kissane":
        sae = _zero_encoder(make_sae, d_in=16, head="concatenated")
        source = save_kissane(sae, tmp_path, "cat_v1")[0]
    else:
        sae = _zero_encoder(make_sae)
        source = (save_legacy_saelens(sae, tmp_path, "r", 100) if fmt == "saelens_legacy"
                  else save_saelens6(sae, tmp_path / "s6"))
    with pytest.warns(DeadEncoderWarning, match=r"W_enc is all zero, so no feature depends on the input: every "
                                                r"activation is relu\(b_enc\) \(2 of 24 features constantly on"):
        load_sae(source)


def test_a_trained_encoder_gives_no_warning(tmp_path, make_sae):
    sae_dir = save_legacy_saelens(make_sae(), tmp_path, "r", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadEncoderWarning)
        load_sae(sae_dir)


@pytest.mark.parametrize("key", ["W_enc", "W_dec", "b_enc"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, make_sae, key):
    sae_dir = save_legacy_saelens(make_sae(), tmp_path, "r", 100)
    tensors = load_file(str(sae_dir / "sae_weights.safetensors"))
    tensors[key].view(-1)[1] = float("nan")
    save_file(tensors, str(sae_dir / "sae_weights.safetensors"))
    with pytest.raises(CheckpointError, match=rf"sae_weights\.safetensors: {key} contains NaN or Inf entries"):
        load_sae(sae_dir)


# -- 11. the checkpoint step of a legacy run folder ------------------------------------------------------
def test_a_run_with_several_steps_warns_naming_them_and_the_one_taken(run):
    run_dir, saes = run
    with pytest.warns(CheckpointChoiceWarning, match=rf"holds 3 checkpoint steps \['{EARLY}', '{SEED_STEP}', "
                                                     rf"'final_{FINAL}'\]; loaded final_{FINAL}") as caught:
        sae = load_sae(run_dir)
    assert len(caught) == 1 and caught[0].filename == __file__
    torch.testing.assert_close(sae.W_dec, saes[FINAL].W_dec)
    assert sae.provenance["step"] == FINAL and sae.provenance["final"] is True


@pytest.mark.parametrize("step, expected", [
    (SEED_STEP, SEED_STEP), (str(SEED_STEP), SEED_STEP), (EARLY, EARLY), ("final", FINAL),
    (f"final_{FINAL}", FINAL), (FINAL, FINAL),
])
def test_an_explicit_step_is_loaded_and_recorded_without_a_warning(run, step, expected):
    run_dir, saes = run
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointChoiceWarning)
        sae = load_sae(run_dir, step=step)
    torch.testing.assert_close(sae.W_dec, saes[expected].W_dec)
    assert sae.provenance["step"] == expected and sae.provenance["final"] is (expected == FINAL)
    assert f"step={step!r} asked for" in sae.provenance["checkpoint_choice"]


def test_an_absent_step_is_refused_listing_the_steps_present(run):
    with pytest.raises(CheckpointNotFoundError, match=rf"has no checkpoint step 123; steps present: \['{EARLY}', "
                                                      rf"'{SEED_STEP}', 'final_{FINAL}'\]"):
        load_sae(run[0], step=123)
    with pytest.raises(InputError, match="step must be a checkpoint's number of training tokens, 'final', or a "
                                         "checkpoint folder name"):
        load_sae(run[0], step="last")
    with pytest.raises(InputTypeError, match="step must be an int"):
        load_sae(run[0], step=1.5)


def test_a_step_that_contradicts_the_folder_given_is_refused(run):
    run_dir, _ = run
    sae_dir, _ = quietly(find_legacy_sae_dir, run_dir / str(SEED_STEP))
    assert load_sae(sae_dir, step=SEED_STEP).provenance["step"] == SEED_STEP
    with pytest.raises(CheckpointError, match=rf"step='final' was asked for, but .* is in the checkpoint folder "
                                              rf"'{SEED_STEP}'"):
        load_sae(sae_dir, step="final")


def test_a_single_step_run_gives_no_warning(tmp_path, make_sae):
    save_legacy_saelens(make_sae(), tmp_path, "r", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointChoiceWarning)
        assert load_sae(tmp_path / "r").provenance["step"] == 100


def test_load_head_saes_passes_the_step_to_every_head(tmp_path, make_sae):
    for head in (0, 1):
        for step, final in ((SEED_STEP, False), (FINAL, True)):
            save_legacy_saelens(make_sae(head=head, seed=head), tmp_path, f"run{head}", step, final=final)
    heads = load_head_saes({0: "run0", 1: "run1"}, root=tmp_path, step=SEED_STEP)
    assert [sae.provenance["step"] for sae in heads] == [SEED_STEP, SEED_STEP]
    with pytest.warns(CheckpointChoiceWarning):
        load_head_saes({0: "run0", 1: "run1"}, root=tmp_path)


def test_step_is_refused_for_formats_without_steps(tmp_path, make_sae):
    save_saelens6(make_sae(), tmp_path / "s6")
    with pytest.raises(InputError, match=r"step= only applies to legacy SAELens trees"):
        load_sae(tmp_path / "s6", step=100)


# -- model_from_pretrained_kwargs ---------------------------------------------------------------------------
def test_model_from_pretrained_kwargs_are_exposed_for_every_format(run, tmp_path, make_sae):
    legacy = load_sae(run[0], step="final")
    assert legacy.model_from_pretrained_kwargs == {"center_writing_weights": False}
    assert load_head_saes({2: run[0]}, step="final").model_from_pretrained_kwargs == {"center_writing_weights": False}
    # SAELens (3 onwards) trains on from_pretrained_no_processing(**kwargs): the flags it leaves out are off
    save_saelens6(make_sae(), tmp_path / "s6", metadata_extra={"model_from_pretrained_kwargs": {"fold_ln": True}})
    assert load_sae(tmp_path / "s6").model_from_pretrained_kwargs == {
        "fold_ln": True, "center_writing_weights": False, "center_unembed": False, "fold_value_biases": False,
        "refactor_factored_attn_matrices": False}
    save_saelens6(make_sae(), tmp_path / "s6b", metadata_extra={"model_from_pretrained_kwargs": {}})
    assert not any(load_sae(tmp_path / "s6b").model_from_pretrained_kwargs.values())  # {}: the unprocessed model
    assert load_sae(save_saelens6(make_sae(), tmp_path / "s6c")).model_from_pretrained_kwargs is None  # unknown
    pt, _ = save_kissane(make_sae(d_in=16, head="concatenated"), tmp_path, "cat_v1")
    assert load_sae(pt).model_from_pretrained_kwargs is None  # Kissane configs record none


def test_bad_model_from_pretrained_kwargs_are_refused_by_file(tmp_path, make_sae):
    sae_dir = save_legacy_saelens(make_sae(), tmp_path, "r", 100, cfg_extra={"model_from_pretrained_kwargs": [1]})
    with pytest.raises(CheckpointError, match=r"cfg\.json: model_from_pretrained_kwargs must be a JSON object"):
        load_sae(sae_dir)


def test_heads_recording_different_model_kwargs_are_refused(tmp_path, make_sae):
    for head, kwargs in ((0, {"fold_ln": False}), (1, {"fold_ln": True})):
        save_legacy_saelens(make_sae(head=head), tmp_path, f"run{head}", 100,
                            cfg_extra={"model_from_pretrained_kwargs": kwargs})
    heads = load_head_saes({0: "run0", 1: "run1"}, root=tmp_path)
    with pytest.raises(InputError, match="the per-head SAEs record different model_from_pretrained_kwargs"):
        heads.model_from_pretrained_kwargs
