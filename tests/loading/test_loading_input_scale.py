"""InputScaleWarning: an SAE still needing its unsaved input scale says so, once, on every path that runs it."""

import warnings

import pytest
import torch

from sparsedecomp.evaluation.splice import splice_losses, splice_variants
from sparsedecomp.loading import (
    HeadSAEs,
    InputScaleWarning,
    SAE,
    estimate_input_scale,
    warn_if_input_scale_missing,
)

FIX = r"estimate_head_scales_from_model\(model, token_batches, layer=L\) then .*fold_head_scales\(head_saes, scales\)"


def unscaled(make_sae, head=0, seed=0) -> SAE:
    """An SAE as a legacy checkpoint with normalize_activations=true loads: its scale is not folded in."""
    sae = make_sae(head=head, seed=seed)
    return SAE(**{f: getattr(sae, f) for f in ("W_enc", "b_enc", "W_dec", "b_dec", "apply_b_dec_to_input", "hook_name",
                                               "layer", "head", "model_name")},
               provenance={"needs_input_scale": True, "source": f"checkpoints/run{head}"})


def input_scale_warnings(record):
    return [w for w in record if issubclass(w.category, InputScaleWarning)]


@pytest.mark.parametrize("path", ["encode", "forward", "decode", "call"])
def test_every_forward_path_warns_once_per_sae_and_names_the_fix(make_sae, path):
    sae = unscaled(make_sae)
    run = {
        "encode": lambda: sae.encode(torch.randn(3, 8)),
        "forward": lambda: sae.forward(torch.randn(3, 8)),
        "decode": lambda: sae.decode(torch.rand(3, 24)),
        "call": lambda: sae(torch.randn(3, 8)),
    }[path]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run()
        run()
        sae.encode(torch.randn(2, 8))
    found = input_scale_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert "checkpoints/run0" in message and "never saved" in message
    for name in ("estimate_head_scales_from_model", "fold_head_scales", "with_input_scale", "estimate_input_scale"):
        assert name in message
    assert found[0].filename == __file__  # points at the caller, not at sparsedecomp's internals
    # a new SAE object (any transformation) warns again; a folded one never does
    with pytest.warns(InputScaleWarning, match=FIX):
        sae.to(dtype=torch.float64).encode(torch.randn(2, 8))
    folded = sae.with_input_scale(estimate_input_scale(torch.randn(50, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded.forward(torch.randn(2, 8))


def test_sae_that_needs_no_scale_never_warns(make_sae):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_sae().forward(torch.randn(4, 8))
        assert not warn_if_input_scale_missing(make_sae())
        assert not warn_if_input_scale_missing(lambda x: x)


def test_reconstruct_concatenated_warns_once_naming_the_heads(make_sae):
    saes = [unscaled(make_sae, head=0), make_sae(head=1, seed=1), unscaled(make_sae, head=2, seed=2)]
    heads = HeadSAEs(tuple(saes))
    z = torch.randn(4, 24)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        heads.reconstruct_concatenated(z)
        heads.reconstruct_concatenated(z)
        saes[2].encode(z[:, 16:])  # already warned about through the HeadSAEs
    found = input_scale_warnings(record)
    assert len(found) == 1
    assert "heads [0, 2]" in str(found[0].message) and "fold_head_scales" in str(found[0].message)


@pytest.fixture(scope="module")
def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=3, d_head=8, d_mlp=64, d_vocab=50, n_ctx=12,
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    return HookedTransformer(cfg).eval()


def test_splices_warn_before_running(tiny_model, make_sae):
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.warns(InputScaleWarning, match=r"checkpoints/run1\) was trained on .*never saved.*" + FIX) as record:
        splice_losses(tiny_model, tokens, splice_variants(3, 8, head_saes={1: unscaled(make_sae, head=1)}), layer=1)
    assert record[0].filename == __file__
    heads = HeadSAEs(tuple(unscaled(make_sae, head=h, seed=h) for h in range(3)))
    with pytest.warns(InputScaleWarning, match=r"heads \[0, 1, 2\]"):
        splice_losses(tiny_model, tokens, splice_variants(3, 8, head_saes=heads), layer=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splice_losses(tiny_model, tokens, splice_variants(3, 8, head_saes={0: make_sae(head=0)}), layer=1)


@pytest.fixture(scope="module")
def demo_world():
    from sparsedecomp.demo import load_demo_world

    return load_demo_world()


def test_demo_world_trained_with_saelens_scaling_needs_no_scale_and_is_silent(demo_world):
    world = demo_world
    assert world.head_saes.heads_needing_input_scale == ()
    tokens = world.heldout_tokens[:2]
    cfg = world.model.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splice_losses(world.model, tokens, splice_variants(cfg.n_heads, cfg.d_head, head_saes=world.head_saes,
                                                           concat_sae=world.concat_sae, heads=[0]), layer=world.layer)
        world.head_saes[3].forward(torch.randn(2, world.head_saes.d_head))
        world.concat_sae.encode(torch.randn(2, world.concat_sae.d_in))


def test_a_head_warned_about_on_its_own_is_not_named_again(make_sae):
    saes = (unscaled(make_sae, head=0), unscaled(make_sae, head=1, seed=1))
    with pytest.warns(InputScaleWarning, match=r"head=1 "):
        saes[1].encode(torch.randn(2, 8))
    with pytest.warns(InputScaleWarning, match=r"heads \[0\] ") as record:
        HeadSAEs(saes).reconstruct_concatenated(torch.randn(2, 16))
    assert len(input_scale_warnings(record)) == 1
