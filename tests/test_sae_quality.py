"""SAE quality on streamed activations: SAELens's own evaluation as the reference, streaming equals one batch, known
answers (a perfect SAE, an SAE whose features never fire), the downstream scores and refused input."""

import math
import warnings

import pytest
import torch

import sparsedecomp.evaluation.sae_quality as sae_quality
from sparsedecomp.activations import ActivationBatch, CollectZ, run_accumulators
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.jsonio import to_jsonable
from sparsedecomp.evaluation.sae_quality import (LOG10_DENSITY_BIN_EDGES, SAEQuality, SAEQualityAccumulator,
                                                 sae_quality_accumulators, with_downstream)
from sparsedecomp.loading import HeadSAEs
from sparsedecomp.loading.sae import SAE

N_HEADS, D_HEAD, CTX, VOCAB, LAYER = 3, 8, 10, 30, 1
HOOK = f"blocks.{LAYER}.attn.hook_z"


@pytest.fixture(scope="module")
def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=N_HEADS, d_head=D_HEAD, n_ctx=12, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type="LN", d_mlp=32, seed=0)
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    tokens = torch.randint(1, VOCAB, (6, CTX), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0  # BOS
    tokens[1, 4] = tokens[3, 7] = 0  # the same special token inside contexts
    return tokens


def random_sae(d_in, d_sae, *, head, seed, apply_b_dec_to_input=True):
    """Random weights with a few features switched off (b_enc = -100) and some sparsity."""
    g = torch.Generator().manual_seed(seed)
    b_enc = 0.3 * torch.randn(d_sae, generator=g) - 0.2
    b_enc[:3] = -100.0
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in), b_enc=b_enc,
               W_dec=torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in), b_dec=0.1 * torch.randn(d_in, generator=g),
               apply_b_dec_to_input=apply_b_dec_to_input, hook_name=HOOK, layer=LAYER, head=head, model_name="tiny")


def saelens_metrics(model, tokens, sae, *, batch_prompts, ignore_tokens):
    """``sae_lens.evals.get_sparsity_and_variance_metrics`` on ``tokens`` (an offline ActivationsStore over a local
    datasets.Dataset), for a SAELens StandardSAE holding ``sae``'s weights."""
    import datasets
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    head = None if sae.head == "concatenated" else sae.head
    lens = StandardSAE(StandardSAEConfig(d_in=sae.d_in, d_sae=sae.d_sae, apply_b_dec_to_input=sae.apply_b_dec_to_input,
                                         metadata=SAEMetadata(model_name="tiny", hook_name=HOOK, hook_head_index=head)))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(lens, name).copy_(getattr(sae, name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small dataset, copy-constructed tensors: not what is tested
        store = ActivationsStore(model=model, dataset=datasets.Dataset.from_dict({"tokens": tokens.tolist()}),
                                 streaming=False, hook_name=HOOK, hook_head_index=head, context_size=tokens.shape[1],
                                 d_in=sae.d_in, n_batches_in_buffer=1, total_training_tokens=tokens.numel(),
                                 store_batch_size_prompts=batch_prompts, train_batch_size_tokens=tokens.numel(),
                                 prepend_bos=False, normalize_activations="none", device=torch.device("cpu"),
                                 dtype="float32")
        return get_sparsity_and_variance_metrics(
            lens, model, store, ActivationScaler(), n_batches=len(tokens) // batch_prompts, compute_l2_norms=True,
            compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=batch_prompts, model_kwargs={}, ignore_tokens=ignore_tokens)


@pytest.mark.parametrize("site", [1, "concatenated"])
def test_metrics_equal_saelens_evaluation(tiny_model, tokens, site):
    d_in = D_HEAD if site == 1 else N_HEADS * D_HEAD
    sae = random_sae(d_in, 40, head=site, seed=3, apply_b_dec_to_input=site == 1)
    acc = SAEQualityAccumulator(sae, site, ignore_tokens=(0,))
    ours = run_accumulators(tiny_model, tokens, {"sae": acc}, layer=LAYER, batch_size=3)["sae"]
    theirs, features = saelens_metrics(tiny_model, tokens, sae, batch_prompts=3, ignore_tokens=[0])

    assert ours.n_tokens == int((tokens != 0).sum()) == 6 * CTX - 8 and ours.ignore_tokens == (0,)
    for key in ("l0", "l1", "explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_norm_in",
                "l2_norm_out", "l2_ratio"):
        assert getattr(ours, key) == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(acc.feature_density(), torch.tensor(features["feature_density"], dtype=torch.float64))
    torch.testing.assert_close(acc.consistent_activation_heuristic(),
                               torch.tensor(features["consistent_activation_heuristic"], dtype=torch.float64),
                               equal_nan=True)
    assert ours.dead_fraction == pytest.approx(sum(d == 0 for d in features["feature_density"]) / 40)
    assert ours.dead_fraction >= 3 / 40  # the three switched-off features

    # relative_reconstruction_bias: the ratio over all tokens, i.e. SAELens's value on one batch of every context
    # (SAELens averages per-batch ratios instead, which depends on the batch size)
    one_batch, _ = saelens_metrics(tiny_model, tokens, sae, batch_prompts=6, ignore_tokens=[0])
    assert ours.relative_reconstruction_bias == pytest.approx(one_batch["relative_reconstruction_bias"], rel=1e-5)


def test_exclude_bos_equals_saelens_ignoring_a_bos_token(tiny_model, tokens):
    bos_only_at_0 = tokens.clone()
    bos_only_at_0[:, 1:][bos_only_at_0[:, 1:] == 0] = 5
    sae = random_sae(D_HEAD, 20, head=2, seed=4)
    ours = run_accumulators(tiny_model, bos_only_at_0, {"q": SAEQualityAccumulator(sae, 2, exclude_bos=True)},
                            layer=LAYER, batch_size=2)["q"]
    theirs, _ = saelens_metrics(tiny_model, bos_only_at_0, sae, batch_prompts=2, ignore_tokens=[0])
    assert ours.exclude_bos and ours.ignore_tokens == () and ours.n_tokens == 6 * (CTX - 1)
    for key in ("l0", "l1", "explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_ratio"):
        assert getattr(ours, key) == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    everything, _ = saelens_metrics(tiny_model, bos_only_at_0, sae, batch_prompts=2, ignore_tokens=None)
    assert ours.l2_norm_in != pytest.approx(everything["l2_norm_in"], rel=1e-4)  # position 0 does count there


def assert_same_report(a, b):
    """Two JSON reports equal; floats up to the float32 rounding of per-token values (matrix products of another
    shape round differently), far below any difference that matters."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == (pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value), key


def test_streaming_equals_one_batch_and_chunking_changes_nothing(tiny_model, tokens, monkeypatch):
    saes = {h: random_sae(D_HEAD, 24, head=h, seed=10 + h) for h in range(N_HEADS)}
    concat = random_sae(N_HEADS * D_HEAD, 64, head="concatenated", seed=20)

    def run(batch_size):
        accs = sae_quality_accumulators(HeadSAEs(tuple(saes.values())), concat, exclude_bos=True)
        return run_accumulators(tiny_model, tokens, accs, layer=LAYER, batch_size=batch_size), accs

    one, one_accs = run(6)
    many, _ = run(4)
    assert list(one) == ["head_0", "head_1", "head_2", "concat"]
    for name in one:
        a, b = to_jsonable(one[name]), to_jsonable(many[name])
        legacy = a.pop("explained_variance_legacy"), b.pop("explained_variance_legacy")
        # centred on each batch's own mean, as in SAELens: depends on the batch size; everything else does not
        assert legacy[0] != pytest.approx(legacy[1], rel=1e-4)
        assert_same_report(a, b)
    # one batch: the legacy value by hand, every token centred on the mean over all evaluated tokens
    z = run_accumulators(tiny_model, tokens, {"z": CollectZ()}, layer=LAYER)["z"].reshape(6, CTX, 24)[:, 1:]
    z = z.reshape(-1, 24)
    residual = (concat(z) - z).pow(2).sum(-1)
    legacy = 1 - residual / (z - z.mean(0)).pow(2).sum(-1)
    assert one["concat"].explained_variance_legacy == pytest.approx(float(legacy.double().mean()), rel=1e-5)
    # features computed a context at a time inside a batch: identical, including the legacy value
    monkeypatch.setattr(sae_quality, "_CHUNK_ELEMENTS", 1)
    chunked, _ = run(6)
    for name in one:
        assert_same_report(to_jsonable(chunked[name]), to_jsonable(one[name]))
    torch.testing.assert_close(one_accs["concat"].feature_density().sum() * one["concat"].n_tokens,
                               torch.tensor(one["concat"].l0 * one["concat"].n_tokens, dtype=torch.float64))


def identity_like_sae(d, *, head):
    """Features ``+e_j``, ``-e_j`` (x_hat = relu(x) - relu(-x) = x exactly), one feature that never fires and one
    that fires on every token with a zero decoder row."""
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye, torch.zeros(d, 2)], dim=1)
    b_enc = torch.cat([torch.zeros(2 * d), torch.tensor([-1.0, 1.0])])
    W_dec = torch.cat([eye, -eye, torch.ones(1, d), torch.zeros(1, d)])
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=torch.zeros(d), apply_b_dec_to_input=False,
               hook_name=HOOK, layer=LAYER, head=head, model_name="tiny")


def random_batches(n_batches, *, contexts=4, pos=CTX, seed=0):
    """Activation batches of standard normal z (every coordinate takes both signs)."""
    g = torch.Generator().manual_seed(seed)
    return [ActivationBatch(tokens=torch.randint(0, VOCAB, (contexts, pos), generator=g),
                            z=torch.randn(contexts, pos, N_HEADS, D_HEAD, generator=g), first_context=contexts * i,
                            layer=LAYER) for i in range(n_batches)]


def test_perfect_sae_and_never_firing_and_dense_features():
    sae = identity_like_sae(D_HEAD, head=0)
    acc = SAEQualityAccumulator(sae, 0)
    batches = random_batches(3)
    batches[0].z[0, 0, 0] = 1e-5  # ||x|| < 1e-4: SAELens's l2_ratio divides ||x_hat|| by 1 instead
    for batch in batches:
        acc.update(batch)
    q = acc.compute()
    assert q.mse == 0.0 and q.explained_variance == 1.0
    assert q.explained_variance_legacy == pytest.approx(1.0, abs=1e-12)
    n = q.n_tokens
    assert q.cossim == pytest.approx(1.0, rel=1e-6)
    assert q.l2_ratio == pytest.approx((n - 1 + 1e-5 * math.sqrt(D_HEAD)) / n, rel=1e-6)
    assert q.relative_reconstruction_bias == pytest.approx(1.0, rel=1e-6)
    assert q.l2_norm_out == pytest.approx(q.l2_norm_in, rel=1e-6)
    # every coordinate of z is non-zero: D_HEAD of the +-e_j features fire, plus the always-on one
    assert q.l0 == D_HEAD + 1
    density = acc.feature_density()
    assert density[-2] == 0.0 and density[-1] == 1.0
    assert q.dead_fraction == 1 / (2 * D_HEAD + 2) and q.dense_fraction >= 1 / (2 * D_HEAD + 2)
    assert q.dense_fraction == float((density > 0.1).double().mean())
    assert sum(q.log10_density_counts) == 2 * D_HEAD + 1 and q.log10_density_counts[-1] >= 1
    assert q.log10_density_bin_edges == LOG10_DENSITY_BIN_EDGES and len(q.log10_density_counts) == 20
    assert math.isnan(acc.consistent_activation_heuristic()[-2])


def test_sae_that_never_fires_has_known_answers():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, -2.0]])
    sae = SAE(W_enc=torch.ones(2, 3), b_enc=torch.full((3,), -100.0), W_dec=torch.ones(3, 2), b_dec=torch.zeros(2),
              apply_b_dec_to_input=False, hook_name=HOOK, layer=LAYER, head="concatenated", model_name="tiny")
    acc = SAEQualityAccumulator(sae, "concatenated")
    acc.update(ActivationBatch(tokens=torch.zeros(1, 3, dtype=torch.long), z=x.reshape(1, 3, 2, 1), first_context=0,
                               layer=LAYER))
    q = acc.compute()
    mean_sq = (1 + 25 + 4) / 3
    variance = mean_sq - ((4 / 3) ** 2 + (2 / 3) ** 2)  # E x = (4/3, 2/3)
    assert (q.l0, q.l1, q.l2_norm_out, q.dead_fraction, q.dense_fraction) == (0.0, 0.0, 0.0, 1.0, 0.0)
    assert q.mse == pytest.approx(mean_sq) and q.explained_variance == pytest.approx(1 - mean_sq / variance)
    assert q.l2_norm_in == pytest.approx((1 + 5 + 2) / 3) and q.l2_ratio == 0.0
    assert math.isnan(q.cossim) and to_jsonable(q)["cossim"] is None  # 0/0, as in SAELens
    assert q.log10_density_counts == (0,) * 20 and q.n_tokens == 3 and q.n_contexts == 1


def test_with_downstream_fills_saelens_scores():
    acc = SAEQualityAccumulator(identity_like_sae(2, head=0), 0)
    acc.update(ActivationBatch(tokens=torch.zeros(1, 4, dtype=torch.long), z=torch.randn(1, 4, 1, 2),
                               first_context=0, layer=LAYER))
    quality = acc.compute()
    assert quality.ce_loss_score is None and quality.kl_div_score is None
    full = with_downstream(quality, ce_loss_with_sae=3.0, ce_loss_without_sae=2.5, ce_loss_with_ablation=4.5,
                           kl_div_with_sae=0.1, kl_div_with_ablation=0.5)
    assert full.ce_loss_score == pytest.approx(0.75) and full.kl_div_score == pytest.approx(0.8)
    assert (full.ce_loss_with_sae, full.ce_loss_without_sae, full.ce_loss_with_ablation) == (3.0, 2.5, 4.5)
    assert full.l0 == quality.l0 and quality.ce_loss_score is None
    unscorable = with_downstream(quality, ce_loss_with_sae=3.0, ce_loss_without_sae=3.0, ce_loss_with_ablation=3.0,
                                 kl_div_with_sae=0.0, kl_div_with_ablation=0.0)
    assert to_jsonable(unscorable)["ce_loss_score"] is None and to_jsonable(unscorable)["kl_div_score"] is None
    losses = dict(ce_loss_with_sae=3.0, ce_loss_without_sae=2.5, ce_loss_with_ablation=4.5, kl_div_with_sae=0.1,
                  kl_div_with_ablation=0.5)
    with pytest.raises(InputError, match="ce_loss_with_sae must be a finite number"):
        with_downstream(quality, **{**losses, "ce_loss_with_sae": math.nan})
    with pytest.raises(InputError, match="kl_div_with_ablation is a KL divergence and cannot be negative"):
        with_downstream(quality, **{**losses, "kl_div_with_ablation": -0.1})
    with pytest.raises(InputTypeError, match="quality must be an SAEQuality"):
        with_downstream(to_jsonable(quality), **losses)


def test_result_is_json_ready_with_saelens_keys(tiny_model, tokens):
    q = run_accumulators(tiny_model, tokens, {"q": SAEQualityAccumulator(random_sae(D_HEAD, 16, head=1, seed=1), 1)},
                         layer=LAYER)["q"]
    data = to_jsonable(q)
    saelens_keys = {"l0", "l1", "explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_norm_in",
                    "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "ce_loss_score", "ce_loss_with_sae",
                    "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_score", "kl_div_with_sae",
                    "kl_div_with_ablation"}
    assert saelens_keys <= set(data) and data["site"] == 1 and data["n_tokens"] == tokens.numel()
    assert isinstance(q, SAEQuality)


def test_bad_input_is_refused(tiny_model, tokens):
    head_sae = random_sae(D_HEAD, 16, head=1, seed=1)
    with pytest.raises(InputTypeError, match="sae must be a sparsedecomp SAE"):
        SAEQualityAccumulator(head_sae.W_enc, 1)
    with pytest.raises(InputError, match="site must be a head index"):
        SAEQualityAccumulator(head_sae, "head 1")
    with pytest.raises(InputError, match=r"reads head=1 but is evaluated on site=2"):
        SAEQualityAccumulator(head_sae, 2)
    with pytest.raises(InputError, match="dense_threshold must be a fraction"):
        SAEQualityAccumulator(head_sae, 1, dense_threshold=1.5)
    with pytest.raises(InputError, match="ignore_tokens must be non-negative int token ids"):
        SAEQualityAccumulator(head_sae, 1, ignore_tokens=(-1,))
    with pytest.raises(InputError, match="give head_saes, concat_sae or both"):
        sae_quality_accumulators(None, None)
    with pytest.raises(InputTypeError, match="head_saes must be HeadSAEs"):
        sae_quality_accumulators([head_sae], None)
    wide = random_sae(2 * D_HEAD, 16, head=None, seed=2)
    with pytest.raises(InputError, match=r"reads d_in=16 but site 1 gives 8-dim inputs"):
        run_accumulators(tiny_model, tokens, {"q": SAEQualityAccumulator(wide, 1)}, layer=LAYER)
    with pytest.raises(InputError, match=r"site head 5 is not among the batch's 3 heads"):
        run_accumulators(tiny_model, tokens, {"q": SAEQualityAccumulator(random_sae(D_HEAD, 4, head=5, seed=0), 5)},
                         layer=LAYER)
    with pytest.raises(InputTypeError, match="update takes an ActivationBatch"):
        SAEQualityAccumulator(head_sae, 1).update(torch.randn(2, 3, 3, 8))
    with pytest.raises(InputError, match="no tokens were evaluated for site 1"):
        SAEQualityAccumulator(head_sae, 1).compute()
    everything_ignored = SAEQualityAccumulator(head_sae, 1, ignore_tokens=range(VOCAB))
    with pytest.raises(InputError, match=r"all left out by exclude_bos=False / ignore_tokens=\(0, 1"):
        run_accumulators(tiny_model, tokens, {"q": everything_ignored}, layer=LAYER)
    nan_z = torch.full((1, 2, N_HEADS, D_HEAD), math.nan)
    with pytest.raises(InputError, match="NaN"):
        SAEQualityAccumulator(head_sae, 1).update(ActivationBatch(tokens=torch.zeros(1, 2, dtype=torch.long), z=nan_z,
                                                                  first_context=0, layer=LAYER))


@pytest.mark.parametrize("site", [1, "concatenated"])
def test_downstream_losses_equal_saelens_get_recons_loss(tiny_model, tokens, site):
    """SAELens's own downstream evaluation (``sae_lens.evals.get_recons_loss``) and this package's splice accumulator
    give the same losses on the same tokens, and ``with_downstream`` then the same ``ce_loss_score``."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.evals import get_recons_loss
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler

    from sparsedecomp.evaluation.splice import splice_losses, splice_variants

    d_in = D_HEAD if site != "concatenated" else N_HEADS * D_HEAD
    sae = random_sae(d_in, 24, head=site, seed=7)
    head = None if site == "concatenated" else site
    lens = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=24, apply_b_dec_to_input=sae.apply_b_dec_to_input,
                                         metadata=SAEMetadata(model_name="tiny", hook_name=HOOK, hook_head_index=head)))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(lens, name).copy_(getattr(sae, name))
        theirs = get_recons_loss(lens, tiny_model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True)
    if head is None:
        variants = splice_variants(N_HEADS, D_HEAD, concat_sae=sae, heads=[])
        spliced, ablated = "concat_sae", "zero_layer"
    else:
        variants = splice_variants(N_HEADS, D_HEAD, head_saes={head: sae}, heads=[head])
        spliced, ablated = f"head_sae_{head}", f"zero_head_{head}"
    ours = splice_losses(tiny_model, tokens, variants, layer=LAYER, batch_size=4)
    assert ours[spliced].ce_loss == pytest.approx(float(theirs["ce_loss_with_sae"].mean()), rel=1e-5)
    assert ours[ablated].ce_loss == pytest.approx(float(theirs["ce_loss_with_ablation"].mean()), rel=1e-5)
    assert ours["clean"].ce_loss == pytest.approx(float(theirs["ce_loss_without_sae"].mean()), rel=1e-5)
    # SAELens averages KL over every position; the splice accumulator over the predicted ones (the last predicts
    # nothing), so compare on those.
    assert ours[spliced].kl == pytest.approx(float(theirs["kl_div_with_sae"][:, :-1].mean()), rel=1e-4, abs=1e-7)
    assert ours[ablated].kl == pytest.approx(float(theirs["kl_div_with_ablation"][:, :-1].mean()), rel=1e-4)
    quality = with_downstream(_quality_of(tiny_model, tokens, sae, site), ce_loss_with_sae=ours[spliced].ce_loss,
                              ce_loss_without_sae=ours["clean"].ce_loss, ce_loss_with_ablation=ours[ablated].ce_loss,
                              kl_div_with_sae=ours[spliced].kl, kl_div_with_ablation=ours[ablated].kl)
    with_sae, clean, ablation = (float(theirs[k].mean()) for k in ("ce_loss_with_sae", "ce_loss_without_sae",
                                                                   "ce_loss_with_ablation"))
    assert quality.ce_loss_score == pytest.approx((ablation - with_sae) / (ablation - clean), rel=1e-4)


def _quality_of(model, tokens, sae, site):
    return run_accumulators(model, tokens, {"q": SAEQualityAccumulator(sae, site)}, layer=LAYER)["q"]
