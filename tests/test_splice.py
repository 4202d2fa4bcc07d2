"""Splice-in losses and routing on a tiny random HookedTransformer (known answers)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsedecomp import make_solver
from sparsedecomp.activations import MeanAccumulator, run_accumulators
from sparsedecomp.dictionary import mix_targets
from sparsedecomp.errors import InputError
from sparsedecomp.jsonio import to_jsonable
from sparsedecomp.evaluation.routing import RoutedDecoder, route_decomposition, routing_error
from sparsedecomp.evaluation.splice import (SpliceAccumulator, mean_and_stderr, recovered_fraction,
                                            recovered_with_stderr, select_variants, splice_losses, splice_variants)
from sparsedecomp.loading import SAE, HeadSAEs
from sparsedecomp.jobs.solve import concat_targets

N_HEADS, D_HEAD, HOOK = 4, 8, "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=N_HEADS, d_head=D_HEAD, d_mlp=64, d_vocab=50,
                                  n_ctx=16, act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
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


class Zero(Identity):
    def decode(self, f):
        return torch.zeros_like(f)


def random_sae(d_in, d_sae, head, seed):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g) * 0.3
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=g) * 0.3, b_enc=torch.randn(d_sae, generator=g) * 0.1,
               W_dec=W_dec, b_dec=torch.randn(d_in, generator=g) * 0.1, apply_b_dec_to_input=False, hook_name=HOOK,
               layer=1, head=head, model_name="tiny")


@pytest.fixture(scope="module")
def saes():
    heads = HeadSAEs(tuple(random_sae(D_HEAD, 16, h, h) for h in range(N_HEADS)))
    return heads, random_sae(N_HEADS * D_HEAD, 48, "concatenated", 10)


def test_identity_sae_recovers_the_clean_loss_and_a_zero_sae_nothing(model, tokens):
    identity = splice_variants(N_HEADS, D_HEAD, head_saes={h: Identity() for h in range(N_HEADS)},
                               concat_sae=Identity())
    report = splice_losses(model, tokens, identity, layer=1, batch_size=4)
    clean = report["clean"]
    with torch.no_grad():
        assert clean.ce_loss == pytest.approx(float(model(tokens, return_type="loss")), rel=1e-5)
    assert clean.score is None and clean.score_baseline is None and clean.kl == 0
    for name in ("head_sae_2", "all_head_saes", "concat_sae"):
        r = report[name]
        assert r.ce_loss == pytest.approx(clean.ce_loss, abs=1e-6) and r.score == pytest.approx(1.0, abs=1e-5)
        assert r.kl == pytest.approx(0.0, abs=1e-6)
    assert report["head_sae_2"].score_baseline == "zero_head_2" and report["concat_sae"].score_baseline == "zero_layer"
    assert report["zero_layer"].ablation_effect > 0.1 and report["zero_layer"].score is None

    zero = splice_losses(model, tokens, splice_variants(N_HEADS, D_HEAD, head_saes={1: Zero()}, concat_sae=Zero(),
                                                        heads=[1]), layer=1)
    assert list(zero.results) == ["clean", "zero_head_1", "zero_layer", "head_sae_1", "concat_sae"]
    for name, baseline in (("head_sae_1", "zero_head_1"), ("concat_sae", "zero_layer")):
        assert zero[name].score == pytest.approx(0.0, abs=1e-6)
        assert zero[name].ce_loss == pytest.approx(zero[baseline].ce_loss, rel=1e-6)
        assert zero[name].kl == pytest.approx(zero[baseline].kl, rel=1e-5) and zero[name].kl > 0


def test_streaming_equals_one_batch_and_the_report_is_json(model, tokens, saes):
    heads, concat = saes
    mean_z = run_accumulators(model, tokens, {"m": MeanAccumulator()}, layer=1)["m"]
    variants = splice_variants(N_HEADS, D_HEAD, head_saes=heads, concat_sae=concat, mean_z=mean_z)
    one = splice_losses(model, tokens, variants, layer=1, batch_size=6)
    many = splice_losses(model, tokens, variants, layer=1, batch_size=2)
    assert one.n_contexts == many.n_contexts == 6 and one.n_tokens == 6 * 15
    for name in variants:
        for field in ("ce_loss", "ce_loss_stderr", "kl", "kl_stderr", "score", "score_stderr", "ablation_effect"):
            a, b = getattr(one[name], field), getattr(many[name], field)
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-5, abs=1e-7), (name, field)
    data = json.loads(json.dumps(to_jsonable(one)))
    assert data["results"]["mean_layer"]["score_baseline"] == "zero_layer" and data["hook_name"] == HOOK


def direct_per_context(model, tokens, hook=None):
    """Per-context mean CE and log-probs of the full model with an optional hook_z hook (no splice code)."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[] if hook is None else [(HOOK, hook)])[:, :-1]
    logp = logits.log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return ce.double().mean(1), logp


@pytest.mark.parametrize("chunk_bytes", [None, 16 * 5 * 80])
def test_losses_kl_and_standard_errors_match_a_direct_computation(model, chunk_bytes, monkeypatch):
    """With the default block, and with logits made a few vocabulary columns at a time (5 for 80 positions: the
    softmax sums carried over many blocks)."""
    if chunk_bytes is not None:
        import sparsedecomp.evaluation.splice as splice

        monkeypatch.setattr(splice, "LOSS_CHUNK_BYTES", chunk_bytes)
    tokens = torch.randint(0, 50, (12, 16), generator=torch.Generator().manual_seed(2))
    mean_z = torch.randn(N_HEADS, D_HEAD, dtype=torch.float64)
    variants = splice_variants(N_HEADS, D_HEAD, head_saes={1: lambda_sae(0.7)}, mean_z=mean_z, heads=[1])
    report = splice_losses(model, tokens, variants, layer=1, batch_size=5)

    def set_head(value):
        def hook(z, hook):
            z = z.clone()
            z[:, :, 1] = value(z[:, :, 1])
            return z
        return hook

    clean, logp_clean = direct_per_context(model, tokens)
    zero, _ = direct_per_context(model, tokens, set_head(torch.zeros_like))
    spliced, logp_spliced = direct_per_context(model, tokens, set_head(lambda z: 0.7 * z))
    mean, _ = direct_per_context(model, tokens, lambda z, hook: mean_z.float().expand_as(z).clone())
    kl = F.kl_div(logp_spliced, logp_clean, log_target=True, reduction="none").sum(-1).double().mean(1)

    r = report["head_sae_1"]
    n = 12
    assert r.ce_loss == pytest.approx(float(spliced.mean()), rel=1e-5)
    assert r.ce_loss_stderr == pytest.approx(float(spliced.std()) / math.sqrt(n), rel=1e-4)
    assert r.kl == pytest.approx(float(kl.mean()), rel=1e-3) and r.kl_stderr == pytest.approx(
        float(kl.std()) / math.sqrt(n), rel=1e-2)
    a, b = zero - spliced, zero - clean
    score = float(a.mean() / b.mean())
    assert r.score == pytest.approx(score, rel=1e-4)
    assert r.score_stderr == pytest.approx(float(((a - score * b).pow(2).sum() / (n * (n - 1))).sqrt() / b.mean().abs()),
                                           rel=1e-3)
    assert r.ablation_effect == pytest.approx(float(b.mean()), rel=1e-4)
    assert r.ablation_effect_stderr == pytest.approx(float(b.std()) / math.sqrt(n), rel=1e-3)
    assert report["mean_layer"].ce_loss == pytest.approx(float(mean.mean()), rel=1e-5)
    assert report["mean_layer"].score_baseline == "zero_layer" and report["mean_layer"].score is not None


def lambda_sae(factor):
    class Scaled(Identity):
        def decode(self, f):
            return factor * f
    return Scaled()


def test_stderr_formulas_on_known_numbers():
    # a = ablated - spliced = [1, 2, 0], b = ablated - clean = [2, 3, 1]: S = 1 / 2, residuals [0, 0.5, -0.5].
    score, stderr = recovered_with_stderr(clean=torch.tensor([1.0, 2, 3], dtype=torch.float64),
                                          ablated=torch.tensor([3.0, 5, 4], dtype=torch.float64),
                                          spliced=torch.tensor([2.0, 3, 4], dtype=torch.float64))
    assert score == pytest.approx(0.5) and stderr == pytest.approx(math.sqrt(0.5 / 6) / 2)
    assert mean_and_stderr(torch.tensor([1.0, 2, 3, 4])) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    assert mean_and_stderr(torch.tensor([7.0])) == (7.0, None)
    same = torch.tensor([1.0, 2.0])
    assert recovered_with_stderr(clean=same, ablated=same, spliced=same) == (None, None)
    assert recovered_fraction(clean=1.0, ablated=3.0, spliced=2.0) == pytest.approx(0.5)
    with pytest.raises(InputError, match="undefined"):
        recovered_fraction(clean=1.0, ablated=1.0, spliced=1.0)


def test_pinv_routing_splices_in_exactly_like_the_concat_sae(model, tokens, saes):
    heads, concat = saes
    dictionary = heads.dictionary(normalize=True)
    targets, _ = concat_targets(concat)
    pinv = route_decomposition(concat, make_solver("pinv").prepare(dictionary).solve(targets), dictionary,
                               label="pinv")
    omp = route_decomposition(concat, make_solver("nn_omp", n_nonzero=2, tol=0.01).prepare(dictionary).solve(targets),
                              dictionary, label="omp2")
    assert pinv.space == "z" and routing_error(pinv, concat) < 1e-5 and routing_error(omp, concat) > 0.05
    report = splice_losses(model, tokens, splice_variants(N_HEADS, D_HEAD, concat_sae=concat,
                                                          routed={"pinv": pinv, "omp2": omp}), layer=1)
    assert report["routed_pinv"].ce_loss == pytest.approx(report["concat_sae"].ce_loss, abs=1e-6)
    assert report["routed_pinv"].kl == pytest.approx(report["concat_sae"].kl, abs=1e-6)
    assert report["routed_omp2"].ce_loss != pytest.approx(report["concat_sae"].ce_loss, abs=1e-4)
    setting = report["routed_omp2"].setting
    assert setting["method"] == "nn_omp" and setting["params"]["n_nonzero"] == 2 and setting["space"] == "z"


def test_residual_routing_of_an_exact_decomposition_splices_in_like_the_concat_sae(model, tokens, saes):
    heads, concat = saes
    W_O = model.W_O[1].detach()  # (4, 8, 32): W_O_cat is 32 x 32 and invertible
    dictionary = heads.dictionary(normalize=True)
    mixed = mix_targets(concat_targets(concat)[0], W_O)
    unit = mixed / mixed.norm(dim=1, keepdim=True)
    decomposition = make_solver("pinv").prepare(dictionary.mix(W_O)).solve(unit)
    routed = route_decomposition(concat, decomposition, dictionary, label="res", W_O=W_O)
    assert routed.space == "residual" and routing_error(routed, concat, W_O=W_O) < 1e-4
    report = splice_losses(model, tokens, splice_variants(N_HEADS, D_HEAD, concat_sae=concat, routed={"res": routed}),
                           layer=1)
    assert report["routed_res"].ce_loss == pytest.approx(report["concat_sae"].ce_loss, abs=1e-5)
    with pytest.raises(InputError, match="residual space: pass W_O"):
        route_decomposition(concat, decomposition, dictionary, label="res")
    other = random_sae(N_HEADS * D_HEAD, 48, "concatenated", 11)
    with pytest.raises(InputError, match="not of this concat SAE's unit decoder rows"):
        route_decomposition(other, decomposition, dictionary, label="res", W_O=W_O)


def test_bad_input_is_refused_by_name(model, tokens, saes):
    heads, concat = saes
    with pytest.raises(InputError, match=r"unknown heads \[4\]"):
        splice_variants(N_HEADS, D_HEAD, heads=[4])
    with pytest.raises(InputError, match=r"mean_z must have shape .*\(4, 8\), got \(4, 7\)"):
        splice_variants(N_HEADS, D_HEAD, mean_z=torch.zeros(4, 7))
    narrow = RoutedDecoder(label="bad", method="pinv", setting={}, space="z", W_routed=torch.zeros(48, 16))
    with pytest.raises(InputError, match=r"routed\['bad'\] has W_routed of shape \(48, 16\)"):
        splice_variants(N_HEADS, D_HEAD, concat_sae=concat, routed={"bad": narrow})
    with pytest.raises(InputError, match="head 2 was asked for but head_saes has no SAE"):
        splice_variants(N_HEADS, D_HEAD, head_saes={0: heads[0]}, heads=[0, 2])
    with pytest.raises(InputError, match=r"head_saes\[0\] reads d_in=8 but its site is 32 wide"):
        splice_variants(1, 32, head_saes={0: heads[0]})
    variants = splice_variants(N_HEADS, D_HEAD, head_saes=heads)
    with pytest.raises(InputError, match="scored against 'zero_head_3', which is not among the variants"):
        SpliceAccumulator(model, {k: v for k, v in variants.items() if k != "zero_head_3"})
    with pytest.raises(InputError, match=r"replaces head 4 but the model has heads 0..3"):
        SpliceAccumulator(model, splice_variants(8, D_HEAD, heads=[4]))
    with pytest.raises(InputError, match="resid_pre"):
        run_accumulators(model, tokens, {"s": _NoResid(model, variants)}, layer=1)


class _NoResid(SpliceAccumulator):
    needs = ()


def test_select_variants_keeps_clean_and_baselines(saes):
    heads, concat = saes
    variants = splice_variants(N_HEADS, D_HEAD, head_saes=heads, concat_sae=concat)
    assert list(select_variants(variants, ["head_sae_3", "concat_sae"])) == [
        "clean", "zero_head_3", "zero_layer", "head_sae_3", "concat_sae"]
    with pytest.raises(InputError, match="unknown splice variants"):
        select_variants(variants, ["head_sae_9"])


def test_a_score_over_a_head_that_does_not_matter_is_marked_not_measurable(model, tokens):
    import copy

    silent = copy.deepcopy(model)
    with torch.no_grad():
        silent.blocks[1].attn.W_O[2] = 0  # head 2 writes nothing: zeroing it costs exactly nothing
    report = splice_losses(silent, tokens, splice_variants(N_HEADS, D_HEAD, head_saes={h: Zero() for h in (0, 2)},
                                                           heads=[0, 2]), layer=1)
    assert report["zero_head_2"].ablation_effect == 0.0
    assert report["head_sae_2"].score_measurable is False and report["head_sae_2"].score is None
    # head 0 matters; whether its score is a measurement follows the one rule, written out here: at least 0.01 nats
    # and 5 standard errors.
    zero0 = report["zero_head_0"]
    effect = zero0.ce_loss - report["clean"].ce_loss
    assert report["head_sae_0"].ablation_effect == pytest.approx(effect, abs=1e-9)
    stderr = report["head_sae_0"].ablation_effect_stderr
    assert report["head_sae_0"].score_measurable is (effect >= 0.01 and effect >= 5 * stderr)
    assert report["head_sae_0"].score == pytest.approx(0, abs=1e-6)
    assert report["clean"].score_measurable is None


@pytest.mark.parametrize("effect, stderr, measurable", [
    (0.05, 0.01, True), (0.05, 0.0101, False), (0.009, 0.0001, False), (0.01, 0.002, True), (0.5, None, False),
    (None, 0.1, False), (-0.2, 0.01, False)])
def test_the_one_measurable_rule(effect, stderr, measurable):
    from sparsedecomp.evaluation.splice import is_measurable

    assert is_measurable(effect, stderr) is measurable


def test_non_finite_logits_are_named(model, tokens):
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.unembed.W_U[0, 0] = float("nan")
    with pytest.raises(InputError, match="not finite"):
        splice_losses(broken, tokens, splice_variants(N_HEADS, D_HEAD, heads=[0]), layer=1)
