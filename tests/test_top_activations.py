"""The streaming top-k accumulator: streaming equals one batch equals a brute-force ranking, ties go to the earlier
token, payloads follow their entries."""

import pytest
import torch

from sparsedecomp.activations import CollectZ, run_accumulators
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.evaluation.top_activations import SAETopActivations, TopKTracker
from sparsedecomp.loading.sae import SAE
from tests.test_attribution import tiny_model as make_tiny_model

CONTEXT, N_CONTEXTS, N_FEATURES, K = 5, 7, 9, 4


def _activations():
    """(contexts * positions, features) with many exact ties (one decimal) and many non-firing (<= 0) entries."""
    g = torch.Generator().manual_seed(0)
    acts = (torch.randn(N_CONTEXTS * CONTEXT, N_FEATURES, generator=g) * 2).round() / 2
    acts[:, 3] = 1.0  # every token tied
    acts[:, 4] = -1.0  # never fires
    acts[:2, 5] = 0.5  # fires on fewer tokens than k
    acts[2:, 5] = 0.0
    return acts


def _brute_force(acts, k):
    """Per feature, the (value, context, position) of the k largest positive entries, earliest token first on ties."""
    out = []
    for f in range(acts.shape[1]):
        entries = sorted((-float(v), t) for t, v in enumerate(acts[:, f]) if v > 0)[:k]
        out.append([(-v, t // CONTEXT, t % CONTEXT) for v, t in entries])
    return out


def _as_entries(result, f):
    keep = result.filled[f]
    return list(zip(result.values[f][keep].tolist(), result.context[f][keep].tolist(),
                    result.position[f][keep].tolist()))


def _token_payload(first_context):
    # The payload names the entry: (global token index, feature), so the test can see it follows its entry.
    def payload(features, tokens):
        global_token = (tokens + first_context * CONTEXT).float()
        return torch.stack([global_token, features[:, None].expand_as(tokens).float()], dim=2)

    return payload


def _stream(acts, context_splits, feature_splits):
    tracker = TopKTracker(N_FEATURES, K, payload_dim=2)
    for a, b in context_splits:
        for chunk in feature_splits:
            tracker.update(acts[a * CONTEXT : b * CONTEXT, chunk], first_context=a, context_size=CONTEXT,
                           features=chunk, payload=_token_payload(a))
    return tracker.compute()


def test_streaming_equals_one_batch_and_brute_force():
    acts = _activations()
    one = _stream(acts, [(0, N_CONTEXTS)], [slice(None)])
    many = _stream(acts, [(0, 3), (3, 4), (4, 7)], [slice(0, 2), slice(2, 7), slice(7, 9)])
    for name in ("values", "context", "position", "payload", "n_firing", "activation_sum"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), equal_nan=True, msg=name)
    expected = _brute_force(acts, K)
    for f in range(N_FEATURES):
        assert _as_entries(many, f) == expected[f], f
    # ties: feature 3 is 1.0 everywhere, so the first k tokens of the stream are kept
    assert many.context[3].tolist() == [0, 0, 0, 0] and many.position[3].tolist() == [0, 1, 2, 3]
    # a feature that never fires keeps nothing; one firing twice keeps two entries and two empty slots
    assert many.n_kept.tolist()[4:6] == [0, 2] and bool(torch.isnan(many.values[4]).all())
    assert many.context[5].tolist() == [0, 0, -1, -1]
    # counts and sums over every token
    assert many.n_firing.tolist() == (acts > 0).sum(0).tolist()
    torch.testing.assert_close(many.activation_sum, acts.double().sum(0))
    assert many.n_tokens == N_CONTEXTS * CONTEXT


def _stream_entries(acts, context_splits, feature_splits, shuffle=False):
    """As _stream, feeding each batch as its positive entries (update_entries) instead of the dense batch; the
    negative entries of _activations() are zeroed first (the entries API says the rest is 0)."""
    tracker = TopKTracker(N_FEATURES, K, payload_dim=2)
    acts = acts.clamp_min(0)
    for a, b in context_splits:
        for chunk in feature_splits:
            block = acts[a * CONTEXT : b * CONTEXT, chunk]
            token, column = block.nonzero(as_tuple=True)
            if shuffle:  # any order of the entries gives the same result
                perm = torch.randperm(len(token), generator=torch.Generator().manual_seed(a))
                token, column = token[perm], column[perm]
            tracker.update_entries(token, column, block[token, column], n_tokens=block.shape[0], first_context=a,
                                   context_size=CONTEXT, features=chunk, payload=_token_payload(a))
    return tracker.compute()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sparse_entries_give_exactly_the_dense_result(dtype, shuffle):
    acts = _activations().clamp_min(0).to(dtype)
    splits = ([(0, 3), (3, 4), (4, 7)], [slice(0, 2), slice(2, 7), slice(7, 9)])
    dense = _stream(acts, *splits)
    sparse = _stream_entries(acts, *splits, shuffle=shuffle)
    for name in ("values", "context", "position", "payload", "n_firing", "activation_sum"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), equal_nan=True, rtol=0, atol=0,
                                   msg=name)
    assert sparse.context[3].tolist() == [0, 0, 0, 0] and sparse.position[3].tolist() == [0, 1, 2, 3]  # ties
    expected = _brute_force(acts, K)
    assert all(_as_entries(sparse, f) == expected[f] for f in range(N_FEATURES))


def test_sparse_entries_are_refused_by_name():
    tracker = TopKTracker(N_FEATURES, K)
    token, column = torch.tensor([0, 1]), torch.tensor([0, 2])
    with pytest.raises(InputError, match="above min_value=0.0"):
        tracker.update_entries(token, column, torch.tensor([0.5, 0.0]), n_tokens=CONTEXT, first_context=0,
                               context_size=CONTEXT)
    with pytest.raises(InputTypeError, match="1-D tensors of one length"):
        tracker.update_entries(token, column[:1], torch.tensor([0.5]), n_tokens=CONTEXT, first_context=0,
                               context_size=CONTEXT)
    with pytest.raises(InputError, match="needs min_value >= 0"):
        TopKTracker(N_FEATURES, K, min_value=-1.0).update_entries(token, column, torch.tensor([0.5, 1.0]),
                                                                  n_tokens=CONTEXT, first_context=0,
                                                                  context_size=CONTEXT)


def test_payload_follows_its_entry():
    result = _stream(_activations(), [(0, 2), (2, 7)], [slice(None)])
    filled = result.filled
    token = result.context * CONTEXT + result.position
    torch.testing.assert_close(result.payload[..., 0][filled], token[filled].float())
    features = torch.arange(N_FEATURES)[:, None].expand(-1, K)
    torch.testing.assert_close(result.payload[..., 1][filled], features[filled].float())
    assert bool(torch.isnan(result.payload[~filled]).all())


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_model()


def test_sae_top_activations_streams_like_a_brute_force_encode(tiny_model):
    g = torch.Generator().manual_seed(3)
    sae = SAE(W_enc=torch.randn(32, 12, generator=g), b_enc=torch.randn(12, generator=g) * 0.1,
              W_dec=torch.randn(12, 32, generator=g), b_dec=torch.randn(32, generator=g) * 0.05,
              apply_b_dec_to_input=True, hook_name="blocks.1.attn.hook_z", layer=1, head="concatenated",
              model_name=None)
    tokens = torch.randint(0, 50, (11, 16), generator=g)
    many = run_accumulators(tiny_model, tokens, {"top": SAETopActivations(sae, 5, chunk_elements=100),
                                                 "z": CollectZ()}, layer=1, batch_size=3)
    one = run_accumulators(tiny_model, tokens, {"top": SAETopActivations(sae, 5)}, layer=1, batch_size=11)["top"]
    torch.testing.assert_close(many["top"].values, one.values, equal_nan=True)
    assert torch.equal(many["top"].context, one.context) and torch.equal(many["top"].position, one.position)
    acts = sae.encode(many["z"].reshape(-1, 32))
    top = acts.topk(5, dim=0)
    torch.testing.assert_close(one.values, top.values.T)
    # tokens tied in value (position 0 sees only its own token) may differ from topk's pick; the place must hold
    # the value
    torch.testing.assert_close(acts.gather(0, (one.context * 16 + one.position).T).T, one.values)


def test_bad_input_is_refused():
    tracker = TopKTracker(3, 2)
    with pytest.raises(InputError, match="no activations"):
        tracker.compute()
    with pytest.raises(InputError, match="feature columns"):
        tracker.update(torch.zeros(4, 2), first_context=0, context_size=2)
    with pytest.raises(InputError, match="whole contexts"):
        tracker.update(torch.zeros(3, 3), first_context=0, context_size=2)
    with pytest.raises(InputError, match="NaN"):
        tracker.update(torch.full((2, 3), float("nan")), first_context=0, context_size=2)
    with pytest.raises(InputError, match="payload"):
        tracker.update(torch.zeros(2, 3), first_context=0, context_size=2, payload=lambda f, t: t)
    with pytest.raises(InputTypeError, match="floating"):
        tracker.update(torch.zeros(2, 3, dtype=torch.long), first_context=0, context_size=2)
    with pytest.raises(InputTypeError, match="contiguous slice"):
        tracker.update(torch.zeros(2, 3), first_context=0, context_size=2, features=slice(0, 3, 2))
    with pytest.raises(InputError, match="k must be"):
        TopKTracker(3, 0)
    tracker.update(torch.ones(2, 1), first_context=0, context_size=2, features=slice(0, 1))
    with pytest.raises(InputError, match="different numbers of tokens"):
        tracker.compute()
    with pytest.raises(InputTypeError, match="SAE"):
        SAETopActivations(object())
