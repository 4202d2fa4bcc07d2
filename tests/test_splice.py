"""Splice-in losses on a tiny random HookedTransformer."""

import pytest
import torch

from sparsedecomp.evaluation.splice import recovered_fraction, splice_losses, splice_losses_many


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16,
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    m = HookedTransformer(cfg)
    # Larger output weights so that ablating a head visibly changes the loss of a random model.
    with torch.no_grad():
        for block in m.blocks:
            block.attn.W_O.mul_(20)
    return m.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(1))


class Identity:
    def encode(self, x):
        return x

    def decode(self, f):
        return f


@pytest.mark.parametrize("head", [None, 2])
def test_identity_sae_recovers_everything_and_zero_sae_nothing(model, tokens, head):
    out = splice_losses_many(model, tokens, {"id": (head, Identity()), "zero": (head, torch.zeros_like)},
                             layer=1, batch_size=4)
    assert out["id"].spliced == pytest.approx(out["id"].clean, rel=1e-5)
    assert out["id"].recovered == pytest.approx(1.0, abs=1e-4)
    assert out["zero"].spliced == pytest.approx(out["zero"].zero_ablated, rel=1e-6)
    assert out["zero"].recovered == pytest.approx(0.0, abs=1e-4)
    assert out["id"].zero_ablated != pytest.approx(out["id"].clean, rel=1e-4)


def test_clean_loss_matches_model_loss(model, tokens):
    res = splice_losses(model, tokens, None, layer=1, head=0, batch_size=6)
    with torch.no_grad():
        expected = float(model(tokens, return_type="loss"))
    assert res.clean == pytest.approx(expected, rel=1e-5)
    assert res.spliced is None and res.recovered is None
    assert res.n_tokens == 6 * 15


def test_batching_does_not_change_losses(model, tokens):
    a = splice_losses(model, tokens, lambda x: 0.5 * x, layer=0, head=None, batch_size=1)
    b = splice_losses(model, tokens, lambda x: 0.5 * x, layer=0, head=None, batch_size=6)
    for field in ("clean", "zero_ablated", "spliced"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5)
    # Mean ablation uses the mean over all tokens, not per batch.
    assert a.mean_ablated == pytest.approx(b.mean_ablated, rel=1e-5)


def test_mean_ablation_matches_manual_hook(model, tokens):
    res = splice_losses(model, tokens, None, layer=1, head=3, batch_size=2)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    mean = cache["blocks.1.attn.hook_z"][:, :, 3].mean(dim=(0, 1))

    def hook(z, hook):
        z = z.clone()
        z[:, :, 3] = mean
        return z

    with torch.no_grad():
        expected = float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[("blocks.1.attn.hook_z", hook)]))
    assert res.mean_ablated == pytest.approx(expected, rel=1e-5)


def test_recovered_fraction_and_errors(model, tokens):
    assert recovered_fraction(clean=1.0, ablated=3.0, spliced=2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="undefined"):
        recovered_fraction(clean=1.0, ablated=1.0, spliced=1.0)
    with pytest.raises(ValueError, match="head"):
        splice_losses(model, tokens, None, layer=1, head=4)
    with pytest.raises(ValueError, match="layer"):
        splice_losses(model, tokens, None, layer=2)
    with pytest.raises(ValueError, match="tokens"):
        splice_losses(model, tokens[0], None, layer=1)
    with pytest.raises(TypeError, match="SAE"):
        splice_losses(model, tokens, 3, layer=1)


def test_per_context_losses_and_standard_errors(model):
    tokens = torch.randint(0, 50, (40, 16), generator=torch.Generator().manual_seed(2))
    res = splice_losses(model, tokens, lambda x: 0.7 * x, layer=1, head=1, batch_size=7)
    with torch.no_grad():
        per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert torch.allclose(res.clean_per_context, per_token.double().mean(dim=1), rtol=1e-5)
    assert res.clean == pytest.approx(float(res.clean_per_context.mean()), rel=1e-9)
    b = res.zero_per_context - res.clean_per_context
    assert res.ablation_effect == pytest.approx(float(b.mean()), rel=1e-6)
    assert res.ablation_effect_stderr == pytest.approx(float(b.std() / 40 ** 0.5), rel=1e-6)
    # The delta-method error of the ratio agrees with a leave-one-context-out jackknife (a different estimator).
    a = res.zero_per_context - res.spliced_per_context
    loo = torch.stack([(a.sum() - a[i]) / (b.sum() - b[i]) for i in range(40)])
    jackknife = float(((loo - loo.mean()).pow(2).sum() * 39 / 40).sqrt())
    assert res.recovered_stderr == pytest.approx(jackknife, rel=0.15)
    summary = res.summary()
    assert summary["n_contexts"] == 40 and summary["recovered_stderr"] == res.recovered_stderr
