"""Mergeable accumulators (reset / merge / state_dict / load_state_dict) on the tiny model of conftest.

For every accumulator the stream's batches are split into parts (uneven halves, one part empty, interleaved
batches, three parts), each part accumulated apart and the parts merged, in both orders and both groupings: the
result equals one pass over the whole stream, exactly for counts, maxima, top-k entries and kept values, to float
rounding for sums. The parts are left unchanged by being merged; reset then re-feeding gives the one-pass result;
the state survives safetensors (tensors) plus JSON (the rest) and loads into a fresh accumulator; mismatched
settings and bad states are refused by name."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from sparsedecomp.activations import Accumulator, ActivationBatch, ActivationStream, CollectZ, MeanAccumulator
from sparsedecomp.dashboards.data import FeatureDataAccumulator
from sparsedecomp.dashboards.replay import KeepBatches
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.evaluation.analyses import HeadOutputCosineAccumulator
from sparsedecomp.evaluation.attribution import DFAAccumulator
from sparsedecomp.evaluation.faithfulness import FaithfulnessAccumulator
from sparsedecomp.evaluation.sae_quality import SAEQualityAccumulator
from sparsedecomp.evaluation.splice import SpliceAccumulator, select_variants, splice_variants
from sparsedecomp.evaluation.top_activations import SAETopActivations, TopKTracker
from sparsedecomp.loading.scaling import HeadNormAccumulator
from tests.test_attribution import block_world, identity_decomposition, make_sae

N_HEADS, D_HEAD, CONTEXT, LAYER = 4, 8, 16, 1  # conftest's tiny_model; its tokens are 11 contexts
EVERYTHING = tuple(range(6))  # batches of 2, 2, 2, 2, 2 and 1 contexts
SPLITS = {
    "uneven": ((0, 1, 2, 3), (4, 5)),
    "first empty": ((), EVERYTHING),  # merged the other way round too: the second part empty
    "interleaved": ((0, 2, 4), (1, 3, 5)),
    "three, first empty": ((), (0, 1, 2), (3, 4, 5)),
    "three": ((0,), (1, 2, 3, 4), (5,)),
}


@pytest.fixture(scope="module")
def batches(tiny_model, tokens):
    """The tokens' batches of 2 contexts, with every extra activation (splice-in losses need ``resid_pre``)."""
    batches = tuple(ActivationStream(tiny_model, tokens, layer=LAYER, include=("resid_pre", "v", "pattern"),
                                     batch_size=2))
    assert len(batches) == len(EVERYTHING)
    return batches


@pytest.fixture(scope="module")
def world():
    head_saes, concat = block_world()
    return head_saes, concat, identity_decomposition(head_saes, concat)


def sparse_sae(d_in, d_sae, head, seed):
    """Random weights; negative encoder biases, so that features fire on some tokens only."""
    g = torch.Generator().manual_seed(seed)
    return make_sae(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in), torch.randn(d_sae, d_in, generator=g),
                    0.3 * torch.randn(d_sae, generator=g) - 0.4, 0.1 * torch.randn(d_in, generator=g), head)


# -- comparing results -----------------------------------------------------------------------------------------------
def assert_same(got, want, exact=(), path="result"):
    """``got`` equals ``want``: integers, booleans and strings exactly, floats exactly where the last name of their
    path is in ``exact`` (``"*"``: everywhere) and to float rounding elsewhere (NaN equals NaN)."""
    name = path.rsplit(".", 1)[-1].split("[")[0]
    is_exact = "*" in exact or name in exact
    if dataclasses.is_dataclass(want):
        assert type(got) is type(want), path
        for field in dataclasses.fields(want):
            assert_same(getattr(got, field.name), getattr(want, field.name), exact, f"{path}.{field.name}")
    elif isinstance(want, Tensor):
        assert isinstance(got, Tensor) and got.shape == want.shape and got.dtype == want.dtype, path
        if is_exact or not want.is_floating_point():
            assert torch.equal(torch.nan_to_num(got, nan=1234.5), torch.nan_to_num(want, nan=1234.5)) and \
                torch.equal(got.isnan(), want.isnan()), path
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True, msg=path)
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float), path
        if math.isnan(want) or is_exact:
            assert (math.isnan(got) and math.isnan(want)) or got == want, (path, got, want)
        else:
            assert got == pytest.approx(want, rel=1e-10, abs=1e-12), path
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping) and list(got) == list(want), path
        for key in want:
            assert_same(got[key], want[key], exact, f"{path}[{key!r}]")
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, exact, f"{path}[{i}]")
    else:
        assert got == want, (path, got, want)


TOP = ("values", "context", "position", "payload")  # top-k entries: kept values, exactly


def roundtrip(state):
    """``state`` through ``safetensors`` (its tensors) and JSON (the rest), keys sorted."""
    assert all(isinstance(key, str) for key in state)
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    plain = {key: value for key, value in state.items() if not isinstance(value, Tensor)}
    return dict(sorted({**json.loads(json.dumps(plain)), **safetensors_load(safetensors_save(tensors))}.items()))


def copy_of(make, acc):
    fresh = make()
    fresh.load_state_dict(acc.state_dict())
    return fresh


def check_contract(make, batches, feed=None, exact=(), splits=tuple(SPLITS)):
    """The merge contract of the accumulators ``make()`` builds, on ``batches`` (each fed with ``feed(acc, batch)``,
    by default ``acc.update(batch)``) and the ``splits`` of :data:`SPLITS`; returns the one-pass result."""
    def run(indices, acc=None):
        acc = make() if acc is None else acc
        for i in indices:
            (feed or type(acc).update)(acc, batches[i])
        return acc

    whole = run(EVERYTHING)
    assert feed is not None or isinstance(whole, Accumulator)
    expected = whole.compute()
    merged = None
    for split in splits:
        parts = [run(i) for i in SPLITS[split]]
        before = [roundtrip(part.state_dict()) for part in parts]
        forward = copy_of(make, parts[0])
        for part in parts[1:]:
            forward.merge(part)
        assert_same(forward.compute(), expected, exact, f"{split}, in order")
        merged = merged or forward
        backward = copy_of(make, parts[-1])
        for part in reversed(parts[:-1]):
            backward.merge(part)
        assert_same(backward.compute(), expected, exact, f"{split}, reversed")
        if len(parts) == 3:  # a + (b + c), the other grouping
            tail = copy_of(make, parts[1])
            tail.merge(parts[2])
            grouped = copy_of(make, parts[0])
            grouped.merge(tail)
            assert_same(grouped.compute(), expected, exact, f"{split}, grouped")
        # merging copies: no part changed, even after the merged accumulator went on merging in place
        for part, state in zip(parts, before):
            assert_same(roundtrip(part.state_dict()), state, "*", f"{split}, part state")

    # merged into a fresh accumulator, which goes on with the rest of the stream (in place): the one-pass result,
    # and the part merged in is left alone
    first, rest = SPLITS["uneven"]
    part = run(first)
    before = roundtrip(part.state_dict())
    going_on = make()
    going_on.merge(part)
    assert_same(run(rest, going_on).compute(), expected, exact, "merged, then fed")
    assert_same(roundtrip(part.state_dict()), before, "*", "part merged into an accumulator fed later")

    # reset: the fresh state; then the same stream gives the one-pass result (also after a merge)
    fresh = roundtrip(make().state_dict())
    whole.reset()
    assert_same(roundtrip(whole.state_dict()), fresh, "*", "state after reset")
    assert_same(run(EVERYTHING, whole).compute(), expected, exact, "reset")
    merged.reset()
    assert_same(roundtrip(merged.state_dict()), fresh, "*", "state after a merge and reset")
    assert_same(run(EVERYTHING, merged).compute(), expected, exact, "reset after merge")

    # the state through safetensors + JSON into a fresh accumulator; an empty accumulator's state too
    loaded = make()
    loaded.load_state_dict(roundtrip(whole.state_dict()))
    assert_same(loaded.compute(), expected, exact, "loaded state")
    empty = make()
    empty.load_state_dict(roundtrip(make().state_dict()))
    assert_same(run(EVERYTHING, empty).compute(), expected, exact, "loaded empty state, then fed")

    # bad states, refused by name
    state = roundtrip(whole.state_dict())
    with pytest.raises(InputError, match=r"unknown keys \['bogus'\]"):
        make().load_state_dict({**state, "bogus": 1})
    plain = next(key for key, value in state.items() if not isinstance(value, Tensor))
    with pytest.raises(InputError, match=rf"missing keys \[{re.escape(repr(plain))}\]"):
        make().load_state_dict({key: value for key, value in state.items() if key != plain})
    tensor = next(key for key, value in state.items() if isinstance(value, Tensor))
    with pytest.raises(InputError, match=rf"{re.escape(repr(tensor))} has shape"):
        make().load_state_dict({**state, tensor: state[tensor][None]})
    with pytest.raises(InputTypeError, match="cannot merge a"):
        make().merge(_Other())
    return expected


class _Other:
    """Not an accumulator of any class under test."""


def refuses(make, other, match):
    """Merging ``other`` (other settings), or loading its state, is refused naming ``match``."""
    with pytest.raises(InputError, match=match):
        make().merge(other)
    with pytest.raises(InputError, match=match):
        make().load_state_dict(roundtrip(other.state_dict()))


# -- activations.py --------------------------------------------------------------------------------------------------
def test_mean_accumulator(batches):
    mean = check_contract(lambda: MeanAccumulator(exclude_bos=True), batches)
    assert mean.shape == (N_HEADS, D_HEAD)
    refuses(lambda: MeanAccumulator(exclude_bos=True), MeanAccumulator(), r"exclude_bos=True here, False in the")
    mine, other = MeanAccumulator(), MeanAccumulator()
    mine.update(batches[0])
    other.update(dataclasses.replace(batches[0], z=batches[0].z[:, :, :3]))
    with pytest.raises(InputError, match=r"\(n_heads, d_head\) = \(3, 8\) into \(4, 8\)"):
        mine.merge(other)


def test_collect_z(batches):
    z = check_contract(CollectZ, batches, exact="*")
    assert torch.equal(z, torch.cat([b.z.reshape(-1, N_HEADS, D_HEAD) for b in batches]))
    mine, other = CollectZ(), CollectZ()
    mine.update(batches[0])
    other.update(dataclasses.replace(batches[1], z=batches[1].z[:, :, :, :5]))
    with pytest.raises(InputError, match=r"\(n_heads, d_head\) = \(4, 5\) into \(4, 8\)"):
        mine.merge(other)


# -- loading/scaling.py ----------------------------------------------------------------------------------------------
def test_head_norm_accumulator(batches):
    norms = check_contract(lambda: HeadNormAccumulator(exclude_bos=True), batches)
    assert norms.shape == (N_HEADS,)
    refuses(lambda: HeadNormAccumulator(exclude_bos=True), HeadNormAccumulator(), "exclude_bos=True here")
    mine, other = HeadNormAccumulator(), HeadNormAccumulator()
    mine.update(batches[0])
    other.update(batches[0].z[:, :, :2])
    with pytest.raises(InputError, match=r"\(2, 8\) into \(4, 8\)"):
        mine.merge(other)


# -- evaluation/top_activations.py -----------------------------------------------------------------------------------
def quantized_activations(batch):
    """``(tokens, 12)`` activations rounded to halves: many ties, so that tie-breaking across merges is tested."""
    W = torch.randn(N_HEADS * D_HEAD, 12, generator=torch.Generator().manual_seed(3))
    return (batch.z_concatenated().double() @ W.double() * 2).round().relu() / 2


def feed_tracker(tracker, batch):
    acts = quantized_activations(batch)
    x = batch.z_concatenated()
    for features in (slice(0, 5), slice(5, 12)):  # two column chunks, as callers feed them
        tracker.update(acts[:, features], first_context=batch.first_context, context_size=batch.context_size,
                       features=features, payload=lambda f, t: torch.stack(
                           [x[t, 0].double(), f[:, None].expand_as(t).double()], dim=2))


def test_top_k_tracker_merges_ties_like_one_pass(batches):
    make = lambda: TopKTracker(12, 4, payload_dim=2, min_value=0.5)  # noqa: E731
    top = check_contract(make, batches, feed=feed_tracker, exact=TOP)
    filled = top.filled
    # many ties at the kept values, among entries of different batches: they go to the earlier token
    ties = [(f, v) for f in range(12) for v in set(top.values[f][filled[f]].tolist())
            if int((top.values[f] == v).sum()) > 1]
    assert len(ties) >= 5
    key = top.context * CONTEXT + top.position
    for f, v in ties:
        at = key[f][top.values[f] == v]
        assert bool((at[1:] > at[:-1]).all())
    assert len(set(top.context[filled].tolist())) >= 4 and bool((top.n_kept == 4).any())
    refuses(make, TopKTracker(12, 3, payload_dim=2, min_value=0.5), r"k=4 here, 3 in the")
    refuses(make, TopKTracker(12, 4, min_value=0.5), r"payload_dim=2 here, 0 in the")
    with pytest.raises(InputError, match=r"has \['values'\] but not"):
        tracker = make()
        feed_tracker(tracker, batches[0])
        make().load_state_dict({k: v for k, v in tracker.state_dict().items() if k in ("values", "n_features", "k",
                                                                                    "payload_dim", "min_value")})


def test_sae_top_activations(batches):
    sae = sparse_sae(N_HEADS * D_HEAD, 12, "concatenated", 0)
    make = lambda: SAETopActivations(sae, 3, chunk_elements=50)  # noqa: E731
    top = check_contract(make, batches, exact=TOP)
    assert int((top.n_kept == 3).sum()) >= 6 and int(top.n_tokens) == 11 * CONTEXT
    refuses(make, SAETopActivations(sparse_sae(N_HEADS * D_HEAD, 10, "concatenated", 1), 3), "sae=.*d_sae=12")
    refuses(make, SAETopActivations(sae, 2), r"k=3 here, 2 in the")


# -- evaluation/attribution.py ---------------------------------------------------------------------------------------
def test_dfa_accumulator(batches, world):
    _, concat, _ = world
    make = lambda: DFAAccumulator(concat, N_HEADS, k=3, chunk_elements=60)  # noqa: E731
    dfa = check_contract(make, batches, exact=(*TOP, "decoder", "encoder"))
    assert dfa.top.payload.shape == (concat.d_sae, 3, N_HEADS) and bool(dfa.top.filled.any())
    refuses(make, DFAAccumulator(concat, N_HEADS, k=4), r"k=3 here, 4 in the")
    full = make()
    full.update(batches[0])
    state = roundtrip(full.state_dict())
    with pytest.raises(InputError, match=r"'top\.tracker\.values' has shape \(24, 2\) \(torch.float32\); expected "
                                         r"\(24, 3\)"):
        make().load_state_dict({**state, "top.tracker.values": state["top.tracker.values"][:, :2]})


# -- evaluation/analyses.py ------------------------------------------------------------------------------------------
def test_head_output_cosine_accumulator(tiny_model, batches):
    W_O = tiny_model.W_O[LAYER].detach()
    # 40 sampled tokens: parts of the first three batches (15 tokens each without BOS)
    make = lambda: HeadOutputCosineAccumulator(W_O, n_bins=20, sample_tokens=40, exclude_bos=True,  # noqa: E731
                                               chunk_tokens=10)
    cosines = check_contract(make, batches, exact=("sample", "min", "max", "count"))
    assert len(cosines.pairs[0].sample) == 40 and cosines.n_tokens == 11 * (CONTEXT - 1)
    refuses(make, HeadOutputCosineAccumulator(W_O, n_bins=10, sample_tokens=40, exclude_bos=True), r"n_bins=20 here")
    refuses(make, HeadOutputCosineAccumulator(W_O[:3], n_bins=20, sample_tokens=40, exclude_bos=True), "W_O_shape")


# -- evaluation/faithfulness.py --------------------------------------------------------------------------------------
def test_faithfulness_accumulator(batches, world):
    head_saes, concat, decomposition = world
    make = lambda: FaithfulnessAccumulator(concat, head_saes, decomposition, label="identity",  # noqa: E731
                                           k=3, chunk_elements=200, token_elements=24 * 32)
    faithfulness = check_contract(make, batches, exact=(*TOP, "head_entropy_bits"))
    assert bool(torch.isfinite(faithfulness.correlation).any())
    refuses(make, FaithfulnessAccumulator(concat, head_saes, decomposition, label="other", k=3), "label=")
    refuses(make, FaithfulnessAccumulator(concat, head_saes, decomposition, label="identity", k=2), r"k=3 here")


# -- evaluation/splice.py --------------------------------------------------------------------------------------------
def test_splice_accumulator(tiny_model, batches, world):
    head_saes, concat, _ = world
    # clean, zero_head_1 and head_sae_1 scored against it; concat_sae and zero_layer for the mismatch below
    every = splice_variants(N_HEADS, D_HEAD, head_saes=head_saes, concat_sae=concat, heads=[1])
    variants = select_variants(every, ["head_sae_1"])
    make = lambda: SpliceAccumulator(tiny_model, variants)  # noqa: E731
    # the costliest accumulator (two reruns of the model a batch): fewer splits, still an empty part, interleaved
    # batches, three parts
    # The per-context values are merged in context order, so the means and standard errors are those of one pass
    # exactly, not only to rounding.
    report = check_contract(make, batches, splits=("first empty", "interleaved", "three"), exact="*")
    assert report.n_contexts == 11 and report["head_sae_1"].score is not None
    odd, even = make(), make()
    for i in EVERYTHING:
        (odd if i % 2 else even).update(batches[i])
    odd.merge(even)
    assert odd.state_dict()["context"].tolist() == list(range(11))
    refuses(make, SpliceAccumulator(tiny_model, select_variants(every, ["concat_sae"])), "variants=")
    other_layer, mine = make(), make()
    mine.update(batches[0])
    other_layer.update(dataclasses.replace(batches[1], layer=0))
    with pytest.raises(InputError, match=r"at blocks\.0\.attn\.hook_z .* into ones at blocks\.1\.attn\.hook_z"):
        mine.merge(other_layer)


# -- evaluation/sae_quality.py ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", [2, "concatenated"])
def test_sae_quality_accumulator(batches, site):
    d_in = D_HEAD if site == 2 else N_HEADS * D_HEAD
    sae = sparse_sae(d_in, 10, site, 4)
    make = lambda: SAEQualityAccumulator(sae, site, exclude_bos=True, ignore_tokens=[3, 7])  # noqa: E731
    quality = check_contract(make, batches)
    assert quality.n_contexts == 11 and 0 < quality.l0 < 10
    refuses(make, SAEQualityAccumulator(sae, site, ignore_tokens=[3, 7]), "exclude_bos=True here")
    refuses(make, SAEQualityAccumulator(sae, site, exclude_bos=True), r"ignore_tokens=\[3, 7\] here, \[\] in the")


# -- dashboards/replay.py --------------------------------------------------------------------------------------------
def test_keep_batches(tiny_model, tokens, batches):
    kept = check_contract(KeepBatches, batches, exact="*")
    assert [b.first_context for b in kept] == [0, 2, 4, 6, 8, 10] and kept[0].pattern is not None
    layer_0 = KeepBatches()
    layer_0.update(next(iter(ActivationStream(tiny_model, tokens[:1], layer=0))))
    mine = KeepBatches()
    mine.update(batches[0])
    with pytest.raises(InputError, match="batches of layer 0, .* into batches of layer 1"):
        mine.merge(layer_0)


# -- dashboards/data.py ----------------------------------------------------------------------------------------------
def test_feature_data_accumulator(batches):
    sae = sparse_sae(N_HEADS * D_HEAD, 12, "concatenated", 5)
    # a sample of 6 of each feature's non-zero activations: the reservoir keeps a few from every part
    make = lambda: FeatureDataAccumulator(sae, "concatenated", top_k=3, quantile_groups=2,  # noqa: E731
                                          examples_per_group=2, sample_size=6, ignore_tokens=[5], seed=7,
                                          chunk_elements=100)
    data = check_contract(make, batches, exact=(*TOP, "max_activation", "sample_values", "sample_context",
                                                "sample_position"))
    assert int((data.n_sampled == 6).sum()) >= 6 and data.n_tokens == 11 * (CONTEXT - 1) - int(
        (torch.cat([b.tokens[:, 1:] for b in batches]) == 5).sum())
    assert len(set(data.sample_context[data.sample_context >= 0].tolist())) >= 6
    refuses(make, FeatureDataAccumulator(sae, "concatenated", top_k=3, quantile_groups=2, examples_per_group=2,
                                         sample_size=6, ignore_tokens=[5], seed=8), r"seed=7 here, 8 in the")
    other = FeatureDataAccumulator(sae, "concatenated", top_k=3, quantile_groups=2, examples_per_group=2,
                                   sample_size=6, ignore_tokens=[5], seed=7)
    other.update(ActivationBatch(tokens=batches[0].tokens[:, :8], z=batches[0].z[:, :8], first_context=20, layer=1))
    mine = make()
    mine.update(batches[0])
    with pytest.raises(InputError, match="contexts of 8 tokens into contexts of 16"):
        mine.merge(other)
