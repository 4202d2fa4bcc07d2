"""Every layer that encodes applies the SAE's own firing rule (JumpReLU, TopK, gated as well as ReLU): the streaming
statistics (SAE quality, top activations, dashboard data, faithfulness' targets) equal a dense ``sae.encode`` of the
same activations, DFA by source and head plus the bias terms is still the pre-activation, and the dashboards state
the rule beside it."""

from dataclasses import replace

import pytest
import torch

from sparsedecomp.activations import CollectZ, run_accumulators
from sparsedecomp.dashboards.data import FeatureDataAccumulator
from sparsedecomp.dashboards.source_dfa import dfa_by_source
from sparsedecomp.evaluation.sae_quality import SAEQualityAccumulator
from sparsedecomp.evaluation.top_activations import SAETopActivations
from sparsedecomp.loading.activation_rules import Gated, JumpReLU, ReLU, TopK
from tests.test_dashboard_data import sparse_sae

N_HEADS, D_HEAD, CONTEXT, LAYER = 4, 8, 16, 1


@pytest.fixture(scope="module")
def z(tiny_model, tokens):
    return run_accumulators(tiny_model, tokens, {"z": CollectZ()}, layer=LAYER)["z"].reshape(
        tokens.shape[0], CONTEXT, N_HEADS, D_HEAD)


def with_rule(sae, rule: str, x):
    """``sae`` with the firing rule ``rule``, its parameters set so that some features fire and some do not on
    ``x`` (thresholds at each feature's median pre-activation; k of 3; a random gate)."""
    g = torch.Generator().manual_seed(3)
    pre = sae.centred(x) @ sae.W_enc + sae.b_enc
    if rule == "jumprelu":
        return replace(sae, activation=JumpReLU(pre.median(dim=0).values.clamp_min(0.0)))
    if rule == "topk":
        return replace(sae, activation=TopK(3))
    if rule == "gated":
        W_gate = torch.randn(sae.W_enc.shape, generator=g)
        return replace(sae, activation=Gated(W_gate, torch.zeros(sae.d_sae), torch.zeros(sae.d_sae)))
    return replace(sae, activation=ReLU())


RULES = ["relu", "jumprelu", "topk", "gated"]
SITES = ["concatenated", 2]


def site_input(z, site):
    return z.reshape(-1, N_HEADS * D_HEAD) if site == "concatenated" else z[:, :, site].reshape(-1, D_HEAD)


@pytest.fixture(scope="module", params=[(r, s) for r in RULES for s in SITES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, z):
    rule, site = request.param
    x = site_input(z, site)
    sae = with_rule(sparse_sae(x, site, d_sae=12 if site == "concatenated" else 10), rule, x)
    return sae, site, x


def test_streaming_statistics_apply_the_rule(tiny_model, tokens, case):
    sae, site, x = case
    dense = sae.encode(x)  # (n_tokens, d_sae), the reference
    assert bool((dense > 0).any()) and bool((dense == 0).any())
    out = run_accumulators(tiny_model, tokens, {
        "quality": SAEQualityAccumulator(sae, site, exclude_bos=False),
        "top": SAETopActivations(sae, k=3, chunk_elements=37),
        "data": FeatureDataAccumulator(sae, site, exclude_bos=False, top_k=3, quantile_groups=2,
                                       examples_per_group=2, sample_size=8, chunk_elements=37),
    }, layer=LAYER, batch_size=4)
    assert out["quality"].l0 == pytest.approx(float((dense > 0).sum(1).double().mean()), rel=1e-6)
    top = out["top"]
    torch.testing.assert_close(top.values[:, 0].nan_to_num(0.0), dense.max(0).values, rtol=1e-5, atol=1e-6)
    assert torch.equal(top.n_firing, (dense > 0).sum(0))
    data = out["data"]
    assert torch.equal(data.n_firing, (dense > 0).sum(0))
    torch.testing.assert_close(data.max_activation.to(dense.dtype), dense.max(0).values, rtol=1e-5, atol=1e-6)
    if isinstance(sae.activation, TopK):
        assert int((dense > 0).sum(1).max()) <= 3


def test_dfa_plus_bias_is_the_pre_activation_whatever_the_rule(tiny_model, tokens, z, case):
    sae, site, _ = case
    contexts, positions, features = torch.tensor([0, 5, 9]), torch.tensor([3, 15, 8]), torch.tensor([2, 4, 5])
    result = dfa_by_source(tiny_model, sae, tokens[contexts], positions, features, layer=LAYER)
    x = (z.reshape(z.shape[0], CONTEXT, -1) if site == "concatenated" else z[:, :, site])[contexts, positions]
    pre = sae.pre_activation(x)[torch.arange(3), features]
    torch.testing.assert_close(result.pre_activation(), pre, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule, words", [("relu", r"> 0 \(ReLU\)"), ("jumprelu", r"> [-0-9.e]+ \(JumpReLU threshold\)"),
                                         ("topk", r"among the token's 3 largest \(TopK\)"),
                                         ("gated", r"gate pre-activation .* > 0")])
def test_the_rule_is_described_per_feature(z, rule, words):
    x = site_input(z, "concatenated")
    sae = with_rule(sparse_sae(x, "concatenated"), rule, x)
    import re

    assert re.search(words, sae.activation.describe_feature(4))
    assert sae.activation.summary()["kind"] == rule
