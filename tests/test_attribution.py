"""Head attribution four ways on tiny models: DFA plus biases is the pre-activation, shares sum to 1, a concat SAE
that is exactly the per-head SAEs stacked agrees with itself under every method, a one-head feature is found under
every method, and activation/weight disagreement is ranked."""

import pytest
import torch
from scipy.stats import spearmanr

import sparsedecomp
from sparsedecomp.activations import run_accumulators
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.evaluation.attribution import (DFA, DFAAccumulator, block_norm_shares, dfa_bias, dfa_by_head,
                                                 head_attribution, spearman, weight_shares)
from sparsedecomp.jsonio import to_jsonable
from sparsedecomp.loading.heads import HeadSAEs
from sparsedecomp.loading.sae import SAE

N_HEADS, D_HEAD, D_SAE, HOOK = 4, 8, 6, "blocks.1.attn.hook_z"


def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=D_HEAD, n_heads=N_HEADS, d_vocab=50,
                                  act_fn="gelu", d_mlp=64, normalization_type="LN")
    return HookedTransformer(cfg).eval()


def make_sae(W_enc, W_dec, b_enc, b_dec, head, apply_b_dec=True):
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, apply_b_dec_to_input=apply_b_dec,
               hook_name=HOOK, layer=1, head=head, model_name=None)


def block_world(seed=0):
    """Per-head SAEs, and a concat SAE that is exactly their block-diagonal stack (feature h*D_SAE + j = feature j
    of head h, same encoder and decoder); zero biases so that each feature fires on its head's term alone."""
    g = torch.Generator().manual_seed(seed)
    heads = []
    for h in range(N_HEADS):
        W_dec = torch.randn(D_SAE, D_HEAD, generator=g) * (1 + torch.rand(D_SAE, 1, generator=g))
        heads.append(make_sae(torch.randn(D_HEAD, D_SAE, generator=g), W_dec, torch.zeros(D_SAE),
                              torch.zeros(D_HEAD), h))
    concat = make_sae(torch.block_diag(*[s.W_enc for s in heads]), torch.block_diag(*[s.W_dec for s in heads]),
                      torch.zeros(N_HEADS * D_SAE), torch.zeros(N_HEADS * D_HEAD), "concatenated")
    return HeadSAEs(tuple(heads)), concat


def tokens(n=11, seed=1):
    return torch.randint(0, 50, (n, 16), generator=torch.Generator().manual_seed(seed))


def unit_decoder_rows(sae):
    return sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_dfa_by_head_plus_bias_terms_is_the_pre_activation(model):
    g = torch.Generator().manual_seed(2)
    d_in = N_HEADS * D_HEAD
    for apply_b_dec in (True, False):
        sae = make_sae(torch.randn(d_in, 10, generator=g), torch.randn(10, d_in, generator=g),
                       torch.randn(10, generator=g), torch.randn(d_in, generator=g), "concatenated", apply_b_dec)
        x = torch.randn(20, d_in, generator=g)
        bias = dfa_bias(sae)
        pre = ((x - sae.b_dec) if apply_b_dec else x) @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(dfa_by_head(sae, x, N_HEADS).sum(dim=2) + bias.decoder + bias.encoder, pre)
        # and on the streamed top tokens, where the feature fires so its activation is the pre-activation
        result = run_accumulators(model, tokens(), {"dfa": DFAAccumulator(sae, N_HEADS, k=3, chunk_elements=50)},
                                  layer=1, batch_size=4)["dfa"]
        filled = result.top.filled
        assert bool(filled.any())
        total = result.top.payload.sum(dim=2) + (bias.decoder + bias.encoder)[:, None]
        torch.testing.assert_close(total[filled], result.top.values[filled], atol=1e-5, rtol=1e-5)


def test_weight_shares_sum_to_one_with_known_values():
    W_dec = torch.zeros(3, N_HEADS * D_HEAD)
    W_dec[0, 0], W_dec[0, D_HEAD] = 3.0, 4.0  # head blocks of norms 3 and 4
    W_dec[1] = torch.randn(N_HEADS * D_HEAD, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block_norm_shares(W_dec, N_HEADS)[0], torch.tensor([3 / 7, 4 / 7, 0, 0]))
    torch.testing.assert_close(block_norm_shares(W_dec, N_HEADS, squared=True)[0], torch.tensor([9 / 25, 16 / 25, 0, 0]))
    _, concat = block_world()
    for name, shares in weight_shares(concat, N_HEADS).items():
        torch.testing.assert_close(shares.sum(dim=1), torch.ones(concat.d_sae), msg=name)
    assert bool(torch.isnan(block_norm_shares(W_dec, N_HEADS)[2]).all())  # a zero row has no attribution


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 3, (50, 6), generator=g).float()
    b = torch.randn(50, 6, generator=g)
    ours = spearman(a, b)
    for i in range(50):
        expected = spearmanr(a[i].numpy(), b[i].numpy()).statistic
        if a[i].unique().numel() == 1:
            assert torch.isnan(ours[i])
        else:
            assert abs(float(ours[i]) - expected) < 1e-9


def identity_decomposition(head_saes, concat):
    dictionary = head_saes.dictionary(normalize=True)
    return sparsedecomp.make_solver("nn_omp", n_nonzero=2, tol=1e-6).prepare(dictionary).solve(unit_decoder_rows(concat))


def test_block_diagonal_stack_agrees_under_every_method(model):
    head_saes, concat = block_world()
    dfa = run_accumulators(model, tokens(), {"dfa": DFAAccumulator(concat, N_HEADS, k=5)}, layer=1,
                           batch_size=4)["dfa"]
    decomposition = identity_decomposition(head_saes, concat)
    attribution = head_attribution(concat, N_HEADS, dfa=dfa, decompositions={"nn_omp": decomposition})
    true_head = torch.arange(concat.d_sae) // D_SAE
    fires = dfa.top.n_firing > 0
    assert int(fires.sum()) >= concat.d_sae - 2  # random weights: nearly every feature fires somewhere
    for method in attribution.methods:
        top = attribution.top_head(method)
        defined = fires if method == DFA else torch.ones_like(fires)
        assert torch.equal(top[defined], true_head[defined]), method
    report = attribution.report(top_n=5)
    assert len(report.agreement) == 15  # 6 methods, every pair
    for key, agreement in report.agreement.items():
        assert agreement.top_head_match == 1.0 and agreement.spearman_mean == pytest.approx(1.0), key
    assert report.n_undefined[DFA] == int((~fires).sum())
    assert all(d.total_variation == pytest.approx(0.0, abs=1e-6) for d in report.disagreement)
    to_jsonable(report)  # JSON-ready


def test_one_head_feature_and_disagreement_are_found(model):
    g = torch.Generator().manual_seed(5)
    d_in, n = N_HEADS * D_HEAD, 12
    W_enc, W_dec = torch.randn(d_in, n, generator=g), torch.randn(n, d_in, generator=g)
    b_enc = torch.zeros(n)
    block = lambda h: slice(h * D_HEAD, (h + 1) * D_HEAD)  # noqa: E731
    W_enc[:, 0], W_dec[0] = 0, 0  # feature 0: head 2 only, in both encoder and decoder
    W_enc[block(2), 0] = torch.randn(D_HEAD, generator=g)
    W_dec[0, block(2)] = torch.randn(D_HEAD, generator=g)
    W_enc[:, 1], W_dec[1] = 0, 0  # feature 1: driven by head 0, written by head 3 only
    W_enc[block(0), 1] = torch.randn(D_HEAD, generator=g)
    W_dec[1, block(3)] = torch.randn(D_HEAD, generator=g)
    b_enc[2] = -1e3  # feature 2 never fires
    concat = make_sae(W_enc, W_dec, b_enc, torch.zeros(d_in), "concatenated")
    head_saes, _ = block_world(seed=6)
    dfa = run_accumulators(model, tokens(), {"dfa": DFAAccumulator(concat, N_HEADS, k=5)}, layer=1,
                           batch_size=5)["dfa"]
    decomposition = sparsedecomp.make_solver("nn_omp", n_nonzero=4, tol=0.01).prepare(
        head_saes.dictionary(normalize=True)).solve(unit_decoder_rows(concat))
    attribution = head_attribution(concat, N_HEADS, dfa=dfa, decompositions={"omp4": decomposition})
    assert len(attribution.methods) == 6
    for method in attribution.methods:
        assert int(attribution.top_head(method)[0]) == 2, method
    report = attribution.report(top_n=3)
    first = report.disagreement[0]
    assert (first.feature, first.driving_head, first.total_variation) == (1, 0, 1.0)
    assert report.n_undefined[DFA] == 1 and bool(torch.isnan(attribution.shares[DFA][2]).all())
    assert 2 not in [d.feature for d in attribution.disagreement(top_n=12)]


def test_bad_input_is_refused():
    head_saes, concat = block_world()
    with pytest.raises(InputError, match="one head only"):
        weight_shares(head_saes[0], 1)
    with pytest.raises(InputError, match="not n_heads"):
        weight_shares(concat, 5)
    with pytest.raises(InputTypeError, match="SAE"):
        DFAAccumulator("sae", N_HEADS)
    with pytest.raises(InputError, match="shape"):
        dfa_by_head(concat, torch.zeros(3, 5), N_HEADS)
    plain = sparsedecomp.make_solver("nn_omp", n_nonzero=2).prepare(
        sparsedecomp.Dictionary.from_atoms(concat.W_dec, normalize=True)).solve(unit_decoder_rows(concat))
    with pytest.raises(InputError, match="head labels"):
        head_attribution(concat, N_HEADS, decompositions={"dense": plain})
    few = identity_decomposition(head_saes, concat).rows(slice(0, 3))
    with pytest.raises(InputError, match="one target per feature"):
        head_attribution(concat, N_HEADS, decompositions={"few": few})
    with pytest.raises(InputTypeError, match="DFAResult"):
        head_attribution(concat, N_HEADS, dfa=object())
    with pytest.raises(InputError, match="no head shares"):
        head_attribution(concat, N_HEADS).agreement("weight", DFA)
