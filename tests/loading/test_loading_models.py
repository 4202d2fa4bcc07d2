"""Model processing flags: explicit, recorded, and applied without mutating the caller's state dict."""

import inspect

import pytest
import torch

from sparsedecomp.loading import (
    CheckpointError,
    LoadedModel,
    ModelNotFoundError,
    ProcessingFlags,
    load_model,
    process_state_dict,
)


def tiny_config():
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=12, d_vocab=30, act_fn="gelu",
        normalization_type="LN", d_mlp=32, seed=0,
    )


def test_defaults_are_transformer_lens_from_pretrained_defaults():
    from transformer_lens import HookedTransformer

    signature = inspect.signature(HookedTransformer.from_pretrained)
    for name, value in ProcessingFlags().as_kwargs().items():
        assert signature.parameters[name].default == value, name
    assert not any(ProcessingFlags.none().as_kwargs().values())
    with pytest.raises(TypeError, match="fold_ln must be a bool"):
        ProcessingFlags(fold_ln=1)


def test_load_model_passes_every_flag_explicitly(monkeypatch):
    from transformer_lens import HookedTransformer

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return HookedTransformer(tiny_config())

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake_from_pretrained)
    flags = ProcessingFlags(fold_value_biases=False)
    loaded = load_model("gelu-2l", flags=flags)
    assert isinstance(loaded, LoadedModel) and loaded.flags is flags and loaded.name == "gelu-2l"
    for key, value in flags.as_kwargs().items():
        assert seen[key] is value
    assert seen["name"] == "gelu-2l" and seen["device"] == "cpu"
    with pytest.raises(ValueError, match="flags=ProcessingFlags"):
        load_model("gelu-2l", fold_ln=False)


def test_process_state_dict_copies_and_applies_the_flags():
    from transformer_lens import HookedTransformer

    source = HookedTransformer(tiny_config())
    with torch.no_grad():
        for block in source.blocks:
            block.attn.b_V.normal_()  # a non-zero value bias, so fold_value_biases visibly shifts z
    state = source.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    tokens = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))

    results = {}
    for flags in (ProcessingFlags(), ProcessingFlags(fold_value_biases=False), ProcessingFlags.none()):
        loaded = process_state_dict(HookedTransformer(tiny_config()), state, flags)
        assert loaded.flags == flags and loaded.describe().endswith(f"({flags.describe()})")
        logits, cache = loaded.model.run_with_cache(tokens)
        results[flags] = (logits.log_softmax(-1), cache["blocks.1.attn.hook_z"])
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)

    default, no_fold_v, none = results[ProcessingFlags()], results[ProcessingFlags(fold_value_biases=False)], results[ProcessingFlags.none()]
    # processing never changes the model's predictions ...
    torch.testing.assert_close(default[0], none[0], rtol=1e-4, atol=1e-4)
    # ... but fold_value_biases shifts hook_z by each head's (processed) value bias
    shift = no_fold_v[1] - default[1]
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, shift[:1, :1].expand_as(shift), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="flags must be ProcessingFlags"):
        process_state_dict(HookedTransformer(tiny_config()), state, {"fold_ln": True})


# -- local model folders and unknown names --------------------------------------------------------------------------
def write_folder(path, *, flags=None, config=None):
    """A model folder in the demo's layout: config.json (HookedTransformerConfig kwargs, processing flags) and the
    unprocessed state dict in model.safetensors."""
    import json

    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    cfg = tiny_config()
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_V.normal_()
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}
    save_file(state, str(path / "model.safetensors"))
    kwargs = config or {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 12, "d_vocab": 30,
                        "act_fn": "gelu", "normalization_type": "LN", "d_mlp": 32, "seed": 0, "model_name": "tiny"}
    meta = {"hooked_transformer_config": kwargs}
    if flags is not None:
        meta["processing_flags"] = flags.as_kwargs()
    (path / "config.json").write_text(json.dumps(meta))
    return model


def test_demo_model_folder_loads_like_the_demo_loads_it():
    from sparsedecomp.demo.layout import ARTIFACTS_DIR, MODEL_DIR
    from sparsedecomp.demo.model import load_model as demo_load_model

    folder = ARTIFACTS_DIR / MODEL_DIR
    loaded = load_model(str(folder))  # a string path, as the CLI's --model passes it
    reference, flags = demo_load_model(folder)
    assert loaded.flags == ProcessingFlags(**flags) and loaded.name == "sparsedecomp-demo-2l"
    assert loaded.source == str(folder) and str(folder) in loaded.describe()
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), reference(tokens))


def test_folder_flags_default_to_the_recorded_ones_and_a_mismatch_warns(tmp_path):
    source = write_folder(tmp_path / "m", flags=ProcessingFlags.none())
    loaded = load_model(tmp_path / "m")
    assert loaded.flags == ProcessingFlags.none() and loaded.name == "tiny"
    tokens = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens)
        _, expected = source.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], expected["blocks.1.attn.hook_z"])  # no processing
    with pytest.warns(UserWarning, match=r"records processing flags \(fold_ln=False.*loaded with \(fold_ln=True"):
        processed = load_model(tmp_path / "m", flags=ProcessingFlags())
    assert processed.flags == ProcessingFlags()
    write_folder(tmp_path / "unrecorded")
    assert load_model(tmp_path / "unrecorded").flags == ProcessingFlags()  # from_pretrained's defaults
    with pytest.raises(ValueError, match=r"\['checkpoint_index'\] only apply to hub models"):
        load_model(tmp_path / "m", checkpoint_index=3)


def test_bad_model_folders_name_the_problem(tmp_path):
    write_folder(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"n_layers": 2}')
    with pytest.raises(CheckpointError, match=r"config\.json has no 'hooked_transformer_config' object"):
        load_model(tmp_path / "m")
    write_folder(tmp_path / "small", config={"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 12,
                                             "d_vocab": 30, "act_fn": "gelu", "normalization_type": "LN", "d_mlp": 32})
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match .*config\.json: missing \[\], unexpected \['blocks\.1\."):
        load_model(tmp_path / "small")
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, message",
    [
        ("gelu2l", r"unknown model 'gelu2l': not a TransformerLens model name or alias; close matches: \['gelu-2l'"),
        ("./models/missing", r"not a TransformerLens model name or alias and no local model folder ./models/missing exists"),
        ("zzzz-not-a-model-zzzz", r"^unknown model 'zzzz-not-a-model-zzzz': not a TransformerLens model name or alias$"),
    ],
)
def test_unknown_names_get_a_short_error(name, message):
    with pytest.raises(ModelNotFoundError, match=message) as info:
        load_model(name)
    assert len(str(info.value)) < 300  # not TransformerLens's list of every supported model
