"""Faithfulness of a decomposition on tiny models: a concat SAE that is exactly the stacked per-head SAEs is predicted
perfectly under the identity decomposition; a halved code gives the explained variance worked out by hand; features
that never fire and failed codes are marked, not invented."""

from dataclasses import replace

import pytest
import torch

from sparsedecomp.activations import CollectZ, run_accumulators
from sparsedecomp.codes import Codes
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.evaluation.faithfulness import FaithfulnessAccumulator, faithfulness_many
from sparsedecomp.jsonio import to_jsonable
from tests.test_attribution import block_world, identity_decomposition, make_sae, tiny_model, tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _with_values(decomposition, values):
    return replace(decomposition, codes=Codes(values, decomposition.codes.indices, decomposition.codes.n_atoms))


def test_stacked_per_head_saes_are_predicted_exactly(model):
    head_saes, concat = block_world()
    decomposition = identity_decomposition(head_saes, concat)
    many = run_accumulators(model, tokens(), {"f": FaithfulnessAccumulator(
        concat, head_saes, decomposition, label="identity", k=4, chunk_elements=40, token_elements=24 * 32)},
        layer=1, batch_size=3)["f"]
    one = run_accumulators(model, tokens(), {"f": FaithfulnessAccumulator(concat, head_saes, decomposition, k=4)},
                           layer=1, batch_size=11)["f"]
    fires = many.n_firing > 0
    assert int(fires.sum()) >= concat.d_sae - 2
    torch.testing.assert_close(many.correlation[fires], torch.ones(int(fires.sum()), dtype=torch.float64))
    torch.testing.assert_close(many.explained_variance[fires], torch.ones(int(fires.sum()), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert bool((many.top_overlap[fires] == 1).all())
    assert bool((many.head_entropy_bits == 0).all()) and bool((many.heads_for_mass == 1).all())
    # streaming (3 contexts a batch, sub-batches of one context, chunks of features) equals one batch
    for name in ("correlation", "explained_variance", "top_overlap"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), equal_nan=True)
    report = many.report(n_worst=3)
    assert report.label == "identity" and one.label == "nn_omp"
    assert report.n_never_fire == int((~fires).sum()) == report.n_correlation_undefined
    assert report.correlation["mean"] == pytest.approx(1.0) and len(report.worst) == 3
    to_jsonable(report)


def test_halved_code_explained_variance_by_hand(model):
    head_saes, concat = block_world()
    decomposition = identity_decomposition(head_saes, concat)
    halved = _with_values(decomposition, decomposition.codes.values * 0.5)
    failed_values = decomposition.codes.values.clone()
    failed_values[1] = float("nan")
    failed = _with_values(decomposition, failed_values)
    out = run_accumulators(model, tokens(), {**faithfulness_many(concat, head_saes, {"half": halved, "fail": failed}),
                                              "z": CollectZ()}, layer=1, batch_size=4)
    y = concat.encode(out["z"].reshape(-1, concat.d_in)).double() * concat.W_dec.norm(dim=1).double()
    expected = 1 - (0.5 * y).pow(2).mean(0) / y.var(0, correction=0)
    half = out["faithfulness:half"]
    fires = half.n_firing > 0
    torch.testing.assert_close(half.explained_variance[fires], expected[fires], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(half.correlation[fires], torch.ones(int(fires.sum()), dtype=torch.float64))
    fail = out["faithfulness:fail"]
    assert bool(torch.isnan(fail.correlation[1])) and fail.report().n_failed_codes == 1
    assert int(torch.isfinite(fail.correlation).sum()) == int(fires.sum()) - int(fires[1])


def test_feature_that_never_fires_is_marked(model):
    head_saes, concat = block_world()
    b_enc = concat.b_enc.clone()
    b_enc[0] = -1e3
    dead = make_sae(concat.W_enc, concat.W_dec, b_enc, concat.b_dec, "concatenated")
    result = run_accumulators(model, tokens(), {"f": FaithfulnessAccumulator(
        dead, head_saes, identity_decomposition(head_saes, dead))}, layer=1, batch_size=11)["f"]
    assert int(result.n_firing[0]) == 0
    for name in ("correlation", "explained_variance", "top_overlap"):
        assert bool(torch.isnan(getattr(result, name)[0])), name
    assert result.report().n_never_fire >= 1


def test_bad_input_is_refused():
    head_saes, concat = block_world()
    decomposition = identity_decomposition(head_saes, concat)
    with pytest.raises(InputTypeError, match="Decomposition"):
        FaithfulnessAccumulator(concat, head_saes, "codes")
    with pytest.raises(InputError, match="targets"):
        FaithfulnessAccumulator(concat, head_saes, decomposition.rows(slice(0, 5)))
    with pytest.raises(InputError, match="head and feature"):
        FaithfulnessAccumulator(concat, head_saes, replace(decomposition, dictionary=None))
    other_heads, _ = block_world(seed=3)
    narrow = replace(decomposition, dictionary=other_heads.map(
        lambda s: make_sae(s.W_enc[:, :4], s.W_dec[:4], s.b_enc[:4], s.b_dec, s.head)).dictionary())
    with pytest.raises(InputError, match="block dictionary"):
        FaithfulnessAccumulator(concat, head_saes, narrow)
    with pytest.raises(InputError, match="do not match"):
        FaithfulnessAccumulator(make_sae(concat.W_enc[:8], concat.W_dec[:, :8], concat.b_enc, concat.b_dec[:8],
                                         "concatenated"), head_saes, decomposition)
    with pytest.raises(InputError, match="k must be"):
        FaithfulnessAccumulator(concat, head_saes, decomposition, k=0)
