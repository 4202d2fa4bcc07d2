"""Re-estimating the unsaved legacy input scale and folding it."""

import math

import pytest
import torch

from sparsedecomp.activations import Accumulator, ActivationBatch, ActivationStream
from sparsedecomp.loading import (
    HeadSAEs,
    HeadNormAccumulator,
    InputScaleWarning,
    LoadedModel,
    ProcessingFlags,
    estimate_head_scales,
    estimate_head_scales_from_model,
    estimate_input_scale,
    fold_head_scales,
    load_head_saes,
    save_legacy_saelens,
)

N_HEADS, D_HEAD = 3, 8


def planted_z(mean_norms, *, batch=4, pos=6, seed=0):
    """z with ||z[b, p, h]|| drawn around mean_norms[h]: norms r * (1 + e) with E[e] = 0 exactly per head."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, pos, len(mean_norms), D_HEAD, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    e = torch.rand(batch, pos, len(mean_norms), generator=g) - 0.5
    e = e - e.mean(dim=(0, 1), keepdim=True)  # exact zero mean per head
    return u * (torch.tensor(mean_norms) * (1 + e))[..., None]


def test_planted_scales_are_recovered_from_batches():
    norms = [2.0, 5.0, 0.5]
    batches = [planted_z(norms, seed=s) for s in range(3)]
    est = estimate_head_scales(batches)
    for h, r in enumerate(norms):
        assert est.mean_norms[h] == pytest.approx(r, rel=1e-6)
        assert est[h] == pytest.approx(math.sqrt(D_HEAD) / r, rel=1e-6)
    assert est.n_vectors == 3 * 4 * 6 and est.d_head == D_HEAD
    one_shot = estimate_head_scales(torch.cat(batches))
    assert one_shot.scales == pytest.approx(est.scales)


def test_exclude_bos_drops_position_zero():
    z = planted_z([1.0, 1.0, 1.0])
    z[:, 0] *= 100.0  # a huge BOS position
    with_bos = estimate_head_scales(z)
    without = estimate_head_scales(z, exclude_bos=True, heads=[0, 2])
    assert with_bos[0] < 0.5 * math.sqrt(D_HEAD)
    assert set(without.scales) == {0, 2}
    manual = z[:, 1:, 0].norm(dim=-1).mean()
    assert without[0] == pytest.approx(math.sqrt(D_HEAD) / float(manual), rel=1e-6)


def test_bad_activations_are_named():
    with pytest.raises(ValueError, match="z must have 4 dimensions"):
        estimate_head_scales(torch.randn(5, 8))
    with pytest.raises(ValueError, match="no activations were seen"):
        estimate_head_scales([])
    acc = HeadNormAccumulator()
    acc.update(torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="share \\(n_heads, d_head\\)"):
        acc.update(torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="heads \\[7\\] are not in range"):
        estimate_head_scales(torch.randn(1, 2, 3, 8), heads=[7])


def test_estimate_input_scale_for_flat_vectors():
    x = torch.randn(50, 16)
    expected = 4.0 / float(x.norm(dim=1).mean())
    assert estimate_input_scale([x[:20], x[20:]]) == pytest.approx(expected, rel=1e-6)


@pytest.fixture
def trained_on_scaled_inputs(tmp_path, make_sae):
    """Per-head legacy SAEs with normalize_activations=True, i.e. weights in scaled-input units."""
    for h in range(N_HEADS):
        save_legacy_saelens(make_sae(head=h, seed=10 + h), tmp_path, f"run{h}", 100, cfg_extra={"normalize_activations": True})
    return load_head_saes({h: f"run{h}" for h in range(N_HEADS)}, root=tmp_path, n_heads=N_HEADS)


def test_fold_is_function_preserving_and_recorded(trained_on_scaled_inputs):
    heads = trained_on_scaled_inputs
    norms = [2.0, 5.0, 0.5]
    est = estimate_head_scales(planted_z(norms))
    folded = fold_head_scales(heads, est)
    assert folded.heads_needing_input_scale == ()
    z = planted_z(norms, seed=5)
    for h in range(N_HEADS):
        s = math.sqrt(D_HEAD) / norms[h]
        raw, new = heads[h], folded[h]
        x = z[:, :, h]
        # the folded SAE on raw z behaves as the original on s * z (what it was trained on); the original warns
        # (once) that it still needs its scale
        with pytest.warns(InputScaleWarning, match=rf"head={h} .* was trained on inputs multiplied by an input scale"):
            expected = raw.encode(s * x)
        torch.testing.assert_close(new.encode(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new.forward(x), raw.forward(s * x) / s, rtol=1e-4, atol=1e-5)
        assert new.provenance["input_scale"] == pytest.approx(s, rel=1e-6)
        assert new.provenance["input_scale_source"] == est.description
        assert new.transformations[-1].startswith(f"folded input scale s={s:.6g}")
    # folded decoders are the originals divided by s_h
    torch.testing.assert_close(folded[1].W_dec, heads[1].W_dec / (math.sqrt(D_HEAD) / 5.0), rtol=1e-5, atol=1e-6)


def test_fold_refuses_missing_scales_and_unneeded_folds(trained_on_scaled_inputs, make_sae):
    with pytest.raises(ValueError, match=r"no scale given for heads \[2\]"):
        fold_head_scales(trained_on_scaled_inputs, {0: 1.0, 1: 1.0})
    plain = HeadSAEs((make_sae(head=0),))
    with pytest.raises(ValueError, match=r"heads \[0\] do not need an input scale"):
        fold_head_scales(plain, {0: 2.0})
    forced = fold_head_scales(plain, {0: 2.0}, force=True)
    assert forced[0].provenance["input_scale"] == 2.0
    once = fold_head_scales(trained_on_scaled_inputs, {h: 1.5 for h in range(N_HEADS)})
    with pytest.raises(ValueError, match="already folded"):
        fold_head_scales(once, {h: 1.5 for h in range(N_HEADS)})


def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=N_HEADS, d_head=D_HEAD, n_ctx=12, d_vocab=30, act_fn="gelu",
        normalization_type="LN", d_mlp=32, seed=0,
    )
    return HookedTransformer(cfg)


def test_estimate_from_a_model_matches_its_cached_hook_z():
    model = tiny_model()
    tokens = [torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    est = estimate_head_scales_from_model(LoadedModel(model, ProcessingFlags(), "tiny"), tokens, layer=1, exclude_bos=True)
    # the stream one context at a time, fed to the accumulator by hand
    acc = HeadNormAccumulator(exclude_bos=True)
    for t in tokens:
        for batch in ActivationStream(model, t, layer=1, batch_size=1):
            acc.update(batch)
    manual = math.sqrt(D_HEAD) / acc.compute()
    assert [est[h] for h in range(N_HEADS)] == pytest.approx(manual.tolist(), rel=1e-6)
    assert est.n_vectors == 2 * 2 * 9
    assert "fold_value_biases=True" in est.description and "exclude_bos=True" in est.description
    with pytest.raises(TypeError, match="must hold integer token ids"):
        estimate_head_scales_from_model(model, [torch.randn(2, 3)], layer=1)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        estimate_head_scales_from_model(model, tokens, layer=2)


def test_head_norm_accumulator_takes_a_batch_or_raw_z():
    z = planted_z([1.0, 2.0, 3.0])
    from_batch, from_z = HeadNormAccumulator(), HeadNormAccumulator()
    from_batch.update(ActivationBatch(tokens=torch.zeros(4, 6, dtype=torch.long), z=z, first_context=0, layer=1))
    from_z.update(z)
    assert isinstance(from_batch, Accumulator) and from_batch.needs == ()
    torch.testing.assert_close(from_batch.compute(), from_z.mean_norms())
    torch.testing.assert_close(from_batch.compute(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
