"""Model processing flags: explicit, recorded, and applied without mutating the caller's state dict."""

import inspect

import pytest
import torch

from sparsedecomp.loading import LoadedModel, ProcessingFlags, load_model, process_state_dict


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
