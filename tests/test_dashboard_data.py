"""Dashboard data on a tiny model: exact counts and densities, streaming equals one batch (the random sample too),
the sample is the reservoir's top priorities, quantile examples are ordered, disjoint and non-zero, every example's
value is the activation where it points, BOS and ignored tokens are left out, histograms are guarded, logits and
correlated features equal a dense computation, and DFA by source and head plus the bias terms is the
pre-activation."""

import copy

import pytest
import torch

from sparsedecomp.activations import CollectZ, run_accumulators
from sparsedecomp.dashboards.data import FeatureDataAccumulator
from sparsedecomp.dashboards.histograms import row_histograms
from sparsedecomp.dashboards.sampling import uniform_priorities
from sparsedecomp.dashboards.source_dfa import dfa_by_source
from sparsedecomp.dashboards.weights import correlated_features, feature_logits
from sparsedecomp.dashboards.windows import PAD, example_windows
from sparsedecomp.errors import InputError, InputTypeError
from tests.test_attribution import make_sae

N_HEADS, D_HEAD, CONTEXT, LAYER = 4, 8, 16, 1
NEVER, CONSTANT = 0, 1  # feature roles in every test SAE


@pytest.fixture(scope="module")
def z(tiny_model, tokens):
    """``(n_contexts, context, n_heads, d_head)`` layer-1 z of the session tokens."""
    return run_accumulators(tiny_model, tokens, {"z": CollectZ()}, layer=LAYER)["z"].reshape(
        tokens.shape[0], CONTEXT, N_HEADS, D_HEAD)


def sparse_sae(x, head, d_sae=12, seed=0):
    """A random SAE on inputs ``x`` (rows) whose features fire on about a third of the rows; feature ``NEVER`` never
    fires and feature ``CONSTANT`` is 1 everywhere."""
    g = torch.Generator().manual_seed(seed)
    d_in = x.shape[1]
    W_enc = torch.randn(d_in, d_sae, generator=g)
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    b_enc = -torch.quantile((x - b_dec) @ W_enc, 0.67, dim=0)
    W_enc[:, CONSTANT] = 0
    b_enc[CONSTANT], b_enc[NEVER] = 1.0, -1e6
    return make_sae(W_enc, torch.randn(d_sae, d_in, generator=g), b_enc, b_dec, head)


@pytest.fixture(scope="module")
def concat(z):
    return sparse_sae(z.reshape(-1, N_HEADS * D_HEAD), "concatenated")


@pytest.fixture(scope="module")
def head2(z):
    return sparse_sae(z[:, :, 2].reshape(-1, D_HEAD), 2, d_sae=10, seed=1)


def sae_input(z, site):
    return z.reshape(z.shape[0], CONTEXT, -1) if site == "concatenated" else z[:, :, site]


def gather(model, tokens, sae, site, batch_size=4, **options):
    options = {"top_k": 3, "quantile_groups": 4, "examples_per_group": 3, "sample_size": 32, **options}
    acc = FeatureDataAccumulator(sae, site, **options)
    return run_accumulators(model, tokens, {"data": acc}, layer=LAYER, batch_size=batch_size)["data"]


@pytest.mark.parametrize("which", ["concat", "head2"])
def test_counts_density_max_and_sum_are_exact(tiny_model, tokens, z, which, request):
    sae = request.getfixturevalue(which)
    data = gather(tiny_model, tokens, sae, sae.head)
    acts = sae.encode(sae_input(z, sae.head))[:, 1:]  # BOS left out by default
    flat = acts.reshape(-1, sae.d_sae)
    assert data.n_tokens == tokens.shape[0] * (CONTEXT - 1) and data.n_tokens_seen == tokens.numel()
    assert data.n_firing.tolist() == (flat > 0).sum(0).tolist()
    torch.testing.assert_close(data.density, (flat > 0).double().mean(0))
    assert bool(((data.density >= 0) & (data.density <= 1)).all())
    torch.testing.assert_close(data.max_activation, flat.max(0).values)
    torch.testing.assert_close(data.activation_sum, flat.double().sum(0))
    assert data.n_firing[NEVER] == 0 and data.max_activation[NEVER] == 0 and data.density[CONSTANT] == 1
    assert 0 < data.n_firing[2] < data.n_tokens


def _fields(data):
    return {"n_firing": data.n_firing, "activation_sum": data.activation_sum, "max": data.max_activation,
            "top_values": data.top.values, "top_context": data.top.context, "top_position": data.top.position,
            "sample_values": data.sample_values, "sample_context": data.sample_context,
            "sample_position": data.sample_position}


def test_streaming_equals_one_batch_for_every_field(tiny_model, tokens, concat):
    one = gather(tiny_model, tokens, concat, "concatenated", batch_size=tokens.shape[0], seed=7)
    many = gather(tiny_model, tokens, concat, "concatenated", batch_size=2, seed=7, chunk_elements=100)
    for name, value in _fields(one).items():
        # indices exactly; values up to float32 rounding (the model's batched matmuls and the sums' order differ;
        # the float64 sums add float32 activations, so their tolerance is float32's too)
        exact = not value.is_floating_point()
        torch.testing.assert_close(_fields(many)[name], value, equal_nan=True, msg=name,
                                   **({"rtol": 0, "atol": 0} if exact else {"rtol": 1.3e-6, "atol": 1e-5}))
    other_seed = gather(tiny_model, tokens, concat, "concatenated", seed=8)
    assert not torch.equal(other_seed.sample_context, one.sample_context)  # the seed matters


def test_sample_is_the_top_priorities_of_the_non_zero_activations(tiny_model, tokens, z, concat):
    data = gather(tiny_model, tokens, concat, "concatenated", seed=3)
    acts = concat.encode(sae_input(z, "concatenated"))
    acts[:, 0] = 0  # BOS
    flat = acts.reshape(-1, concat.d_sae)
    token, feature = flat.nonzero(as_tuple=True)
    priority = uniform_priorities(3, feature, token)
    sample_size = data.sample_values.shape[1]
    for f in range(concat.d_sae):
        mine = feature == f
        order = priority[mine].sort(descending=True, stable=True).indices[:sample_size]
        expected = sorted(token[mine][order].tolist())
        kept = data.sample_context[f] >= 0
        got = (data.sample_context[f][kept] * CONTEXT + data.sample_position[f][kept]).tolist()
        assert sorted(got) == expected, f
        assert len(got) == min(sample_size, int(data.n_firing[f]))
    assert data.n_firing[2] > sample_size == data.n_sampled[2]  # the reservoir did choose
    # every member's value is the activation where it points, and non-zero
    kept = data.sample_context >= 0
    f_index = torch.arange(concat.d_sae)[:, None].expand_as(kept)[kept]
    recomputed = acts[data.sample_context[kept], data.sample_position[kept], f_index]
    torch.testing.assert_close(data.sample_values[kept], recomputed)
    assert bool((data.sample_values[kept] > 0).all())


def test_quantile_examples_are_ordered_disjoint_non_zero_and_true(tiny_model, tokens, z, concat):
    data = gather(tiny_model, tokens, concat, "concatenated")
    groups = data.quantile_examples()
    acts = concat.encode(sae_input(z, "concatenated"))
    assert groups.values.shape == (concat.d_sae, 4, 3)
    filled = groups.filled
    assert bool(filled[2:].any(dim=2).all())  # every firing feature has examples in every group
    assert not bool(filled[NEVER].any()) and bool(torch.isnan(groups.bounds[NEVER]).all())
    for f in range(2, concat.d_sae):
        lower, upper = groups.bounds[f, :-1], groups.bounds[f, 1:]
        assert bool((lower <= upper).all())
        for g in range(4):
            values = groups.values[f, g][filled[f, g]]
            assert bool((values > 0).all())
            assert bool((values >= lower[g]).all()) and bool((values <= upper[g]).all())
            assert g == 3 or bool((values < upper[g]).all())  # half-open intervals: disjoint
            assert values.tolist() == sorted(values.tolist(), reverse=True)
        tokens_shown = set(zip(groups.context[f][filled[f]].tolist(), groups.position[f][filled[f]].tolist()))
        assert len(tokens_shown) == int(filled[f].sum())  # no token twice
        top = set(zip(data.top.context[f][data.top.filled[f]].tolist(),
                      data.top.position[f][data.top.filled[f]].tolist()))
        assert not tokens_shown & top
        assert groups.bounds[f, -1] == data.max_activation[f]
    # each example's value is the activation at its (context, position)
    f_index = torch.arange(concat.d_sae)[:, None, None].expand_as(filled)[filled]
    recomputed = acts[groups.context[filled], groups.position[filled], f_index]
    torch.testing.assert_close(groups.values[filled], recomputed)
    top_filled = data.top.filled
    f_top = torch.arange(concat.d_sae)[:, None].expand_as(top_filled)[top_filled]
    torch.testing.assert_close(data.top.values[top_filled],
                               acts[data.top.context[top_filled], data.top.position[top_filled], f_top])


def test_bos_excluded_by_default_and_ignored_tokens_configurable(tiny_model, tokens, concat):
    default = gather(tiny_model, tokens, concat, "concatenated")
    for context, position in ((default.top.context, default.top.position),
                              (default.sample_context, default.sample_position)):
        assert not bool((position[context >= 0] == 0).any())
    assert default.exclude_bos and default.ignore_tokens == ()
    with_bos = gather(tiny_model, tokens, concat, "concatenated", exclude_bos=False)
    assert with_bos.n_tokens == tokens.numel() and not with_bos.exclude_bos
    assert with_bos.n_firing[CONSTANT] == tokens.numel()
    assert with_bos.top.position[CONSTANT].tolist() == [0, 1, 2]  # ties go to the earliest tokens: BOS first
    ignored = int(tokens[0, 3])
    without = gather(tiny_model, tokens, concat, "concatenated", ignore_tokens=[ignored])
    n_ignored = int((tokens[:, 1:] == ignored).sum())
    assert without.ignore_tokens == (ignored,) and without.n_tokens == default.n_tokens - n_ignored
    assert int(without.n_firing[CONSTANT]) == without.n_tokens
    shown = without.sample_context >= 0
    assert not bool((tokens[without.sample_context[shown], without.sample_position[shown]] == ignored).any())
    # keeping BOS counts position 0 even when the BOS id is also among the ignored (special) tokens
    bos = int(tokens[0, 0])
    kept = gather(tiny_model, tokens, concat, "concatenated", exclude_bos=False, ignore_tokens=[bos])
    n_bos_later = int((tokens[:, 1:] == bos).sum())
    assert kept.n_tokens == tokens.numel() - n_bos_later
    assert kept.top.position[CONSTANT].tolist()[0] == 0


def test_activation_histograms_guard_degenerate_ranges(tiny_model, tokens, concat):
    data = gather(tiny_model, tokens, concat, "concatenated")
    hist = data.activation_histograms(n_bins=7)
    assert hist.n_bins[NEVER] == 1 and int(hist.counts[NEVER].sum()) == 0 and hist.hi[NEVER] == 0
    assert hist.n_bins[2] == 7 and int(hist.counts[2].sum()) == int(data.n_sampled[2])
    assert hist.counts.sum(1).tolist() == data.n_sampled.tolist()
    # a tiny or constant range gets one bin, never a list of ticks
    values = torch.tensor([[1e-14, 2e-14], [0.3, 0.3], [0.0, 0.5]])
    guarded = row_histograms(values, torch.zeros(3), values.max(1).values, 10)
    assert guarded.n_bins.tolist() == [1, 10, 10] and guarded.row_counts(0).tolist() == [2]
    constant = row_histograms(values[1:2], values[1:2, 0], values[1:2, 1], 10)
    assert constant.n_bins.tolist() == [1] and constant.row_counts(0).tolist() == [2]


def test_feature_logits_equal_a_dense_computation(tiny_model, concat, head2):
    W_O, W_U = tiny_model.W_O[LAYER].detach(), tiny_model.W_U.detach()
    for sae, projection in ((concat, W_O), (head2, W_O[2])):
        rows = sae.W_dec.clone()
        rows[CONSTANT] = 0  # a zero output direction: every logit 0, a degenerate range
        result = feature_logits(rows, projection, W_U, k=4, n_bins=6, chunk_elements=3 * W_U.shape[1])
        dense = rows @ projection.reshape(-1, W_U.shape[0]) @ W_U
        top, bottom = dense.topk(4, dim=1), dense.topk(4, dim=1, largest=False)
        torch.testing.assert_close(result.top_values, top.values)
        torch.testing.assert_close(result.bottom_values, bottom.values)
        live = torch.arange(sae.d_sae) != CONSTANT
        assert torch.equal(result.top_ids[live], top.indices[live])
        assert torch.equal(result.bottom_ids[live], bottom.indices[live])
        assert result.histogram.counts.sum(1).tolist() == [W_U.shape[1]] * sae.d_sae
        assert result.histogram.n_bins[CONSTANT] == 1 and bool((result.histogram.n_bins[live] == 6).all())
        torch.testing.assert_close(result.histogram.lo, dense.min(1).values.double())
        expected = torch.stack([torch.histc(dense[f].double(), 6, float(dense[f].min()), float(dense[f].max()))
                                for f in range(sae.d_sae) if live[f]]).long()
        assert torch.equal(result.histogram.counts[live], expected)


def test_correlated_features_equal_a_dense_computation(concat):
    result = correlated_features(concat.W_dec, k=3, chunk_elements=5 * concat.d_sae)
    unit = concat.W_dec / concat.W_dec.norm(dim=1, keepdim=True)
    cosine = (unit @ unit.T).fill_diagonal_(float("-inf"))
    top = cosine.topk(3, dim=1)
    torch.testing.assert_close(result.cosine, top.values)
    assert torch.equal(result.indices, top.indices)
    assert not bool((result.indices == torch.arange(concat.d_sae)[:, None]).any())


def test_example_windows_gather_with_padding(tokens):
    context = torch.tensor([[0, 3], [10, -1]])
    position = torch.tensor([[0, 7], [15, -1]])
    windows = example_windows(tokens, context, position, left=2, right=1)
    assert windows.token_ids.shape == (2, 2, 4)
    for i in range(2):
        for j in range(2):
            for w in range(4):
                c, p = int(context[i, j]), int(position[i, j]) - 2 + w
                inside = c >= 0 and 0 <= p < CONTEXT
                assert int(windows.token_ids[i, j, w]) == (int(tokens[c, p]) if inside else PAD)
    assert windows.token_ids[0, 1, 2] == tokens[3, 7]  # column `left` is the example's token


@pytest.mark.parametrize("which", ["concat", "head2"])
def test_dfa_by_source_and_head_plus_bias_is_the_pre_activation(tiny_model, tokens, z, which, request):
    sae = request.getfixturevalue(which)
    contexts = torch.tensor([0, 5, 5, 9, 0])
    positions = torch.tensor([3, 15, 0, 8, 12])
    features = torch.tensor([2, 4, 3, 2, 5])
    result = dfa_by_source(tiny_model, sae, tokens[contexts], positions, features, layer=LAYER, batch_size=2,
                           chunk_elements=300)
    x = sae_input(z, sae.head)[contexts, positions]
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[torch.arange(5), features]
    torch.testing.assert_close(result.pre_activation(), pre, atol=1e-5, rtol=1e-5)
    # with every source computed, each head's total is its sum over sources (the totals come from z instead)
    torch.testing.assert_close(result.head_totals, result.values.sum(dim=1), atol=1e-5, rtol=1e-5)
    assert result.values.shape == (5, CONTEXT, N_HEADS if sae.head == "concatenated" else 1)
    after = torch.arange(CONTEXT)[None, :] > positions[:, None]
    assert bool((result.values[after] == 0).all())  # causal: no source after the destination
    assert bool((result.values[~after] != 0).any())


def test_dfa_for_chosen_sources_equals_the_full_computation_there(tiny_model, tokens, concat):
    contexts, positions, features = torch.tensor([0, 5, 9]), torch.tensor([3, 15, 8]), torch.tensor([2, 4, 5])
    full = dfa_by_source(tiny_model, concat, tokens[contexts], positions, features, layer=LAYER)
    sources = torch.tensor([[-1, 0, 1, 2, 3], [11, 12, 13, 14, 15], [6, 7, 8, 9, CONTEXT]])  # padding on both ends
    part = dfa_by_source(tiny_model, concat, tokens[contexts], positions, features, layer=LAYER, sources=sources,
                         chunk_elements=100)
    inside = (sources >= 0) & (sources < CONTEXT)
    expected = full.values.gather(1, sources.clamp(0, CONTEXT - 1)[:, :, None].expand(-1, -1, N_HEADS))
    torch.testing.assert_close(part.values, expected * inside[:, :, None])
    assert bool((part.values[~inside] == 0).all())
    # a window's part plus what its outside carries is the whole, per head
    torch.testing.assert_close(part.head_totals, full.head_totals)
    torch.testing.assert_close(part.values.sum(dim=1) + part.outside_sources(), full.values.sum(dim=1))
    assert bool((part.outside_sources()[0].abs() < 1e-6).all())  # the first window holds every source up to 3
    assert bool((part.outside_sources()[1].abs() > 1e-6).any())  # the second leaves out sources 0..10


def test_bad_input_is_refused_by_name(tiny_model, tokens, concat, head2):
    with pytest.raises(InputError, match="site"):
        FeatureDataAccumulator(head2, 3)
    with pytest.raises(InputError, match="site"):
        FeatureDataAccumulator(concat, "heads")
    with pytest.raises(InputError, match="sample_size"):
        FeatureDataAccumulator(concat, "concatenated", sample_size=10)
    with pytest.raises(InputError, match="ignore_tokens"):
        FeatureDataAccumulator(concat, "concatenated", ignore_tokens=[-1])
    with pytest.raises(InputTypeError, match="exclude_bos"):
        FeatureDataAccumulator(concat, "concatenated", exclude_bos=1)
    with pytest.raises(InputTypeError, match="seed"):
        FeatureDataAccumulator(concat, "concatenated", seed=1.5)
    with pytest.raises(InputError, match="W_U"):
        feature_logits(concat.W_dec, tiny_model.W_O[LAYER].detach(), tiny_model.W_U.detach().T)
    with pytest.raises(InputError, match="W_O"):
        feature_logits(concat.W_dec, tiny_model.W_O[LAYER, 0].detach(), tiny_model.W_U.detach())
    with pytest.raises(InputError, match="k=12"):
        correlated_features(concat.W_dec, k=12)
    with pytest.raises(InputError, match="one shape"):
        example_windows(tokens, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(InputError, match="outside"):
        example_windows(tokens, torch.tensor([11]), torch.tensor([0]))
    with pytest.raises(InputError, match="positions"):
        dfa_by_source(tiny_model, concat, tokens[:1], torch.tensor([16]), torch.tensor([0]), layer=LAYER)
    unknown = make_sae(concat.W_enc, concat.W_dec, concat.b_enc, concat.b_dec, None)
    with pytest.raises(InputError, match="which head"):
        dfa_by_source(tiny_model, unknown, tokens[:1], torch.tensor([1]), torch.tensor([0]), layer=LAYER)
    poisoned = copy.deepcopy(tiny_model)  # NaN reaches the SAE through the model's z (an SAE refuses NaN weights)
    with torch.no_grad():
        poisoned.blocks[LAYER].attn.W_V[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="activations contain NaN"):
        gather(poisoned, tokens, concat, "concatenated")
