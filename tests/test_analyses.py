"""The notebook's analyses: decoder norms in both unit systems, ranks, head-output cosines, W_O carry, mixed-feature
interference, and their figures. Known answers on constructed weights and a tiny random model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsedecomp.activations import ActivationBatch, run_accumulators
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.evaluation import figures
from sparsedecomp.evaluation.analyses import (HeadOutputCosineAccumulator, decoder_norms, dictionary_ranks,
                                              head_pairs, histogram_quantile, mixed_feature_interference, model_saes,
                                              output_subspace_carry)
from sparsedecomp.jsonio import to_jsonable
from sparsedecomp.loading.heads import HeadSAEs
from sparsedecomp.loading.sae import SAE


def make_sae(W_dec: torch.Tensor, *, head=0, provenance=None) -> SAE:
    d_sae, d_in = W_dec.shape
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(d_sae)), b_enc=torch.zeros(d_sae),
               W_dec=W_dec, b_dec=torch.zeros(d_in), apply_b_dec_to_input=False, hook_name="blocks.1.attn.hook_z",
               layer=1, head=head, model_name="tiny", provenance=dict(provenance or {}))


def low_rank(n: int, d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)).float()


def orthogonal_W_O(n_heads: int, d_head: int, seed: int = 0) -> torch.Tensor:
    """Heads write to mutually orthogonal subspaces: rows of one orthogonal matrix, d_head per head."""
    q, _ = torch.linalg.qr(torch.randn(n_heads * d_head, n_heads * d_head, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q.T.reshape(n_heads, d_head, n_heads * d_head).float()


@pytest.fixture(scope="module")
def head_saes():
    g = torch.Generator().manual_seed(3)
    return HeadSAEs(tuple(make_sae(torch.randn(24, 8, generator=g), head=h) for h in range(4)))


# -- 1. decoder norms ---------------------------------------------------------------------------------------------
def test_norms_in_training_units_survive_folding_and_z_units_are_the_folded_weights():
    W = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    raw = make_sae(W, provenance={"needs_input_scale": True})
    folded = raw.with_input_scale(2.5)
    plain = make_sae(W, head="concatenated")
    report = decoder_norms({"raw": raw, "folded": folded, "plain": plain}, n_bins=10)
    by_name = {item.name: item for item in report.saes}
    expected = W.double().norm(dim=1)

    assert by_name["raw"].scale_status == "not_folded" and by_name["raw"].input_scale is None
    assert by_name["raw"].norms_z_units is None and by_name["raw"].histogram_z_units is None
    assert by_name["folded"].scale_status == "folded" and by_name["folded"].input_scale == pytest.approx(2.5)
    assert by_name["plain"].scale_status == "none_recorded"
    for name in ("raw", "folded", "plain"):
        summary = by_name[name].norms_training_units
        assert summary.mean == pytest.approx(float(expected.mean()), rel=1e-6)
        assert summary.max == pytest.approx(float(expected.max()), rel=1e-6)
        assert summary.median == pytest.approx(float(expected.quantile(0.5)), rel=1e-6)
        assert sum(by_name[name].histogram_training_units.counts) == 40
    assert by_name["folded"].norms_z_units.mean == pytest.approx(float(expected.mean()) / 2.5, rel=1e-6)
    assert by_name["plain"].norms_z_units.mean == pytest.approx(float(expected.mean()), rel=1e-6)
    # one set of bins per unit system, so the traces of a figure are comparable
    assert by_name["raw"].histogram_training_units.hi == by_name["plain"].histogram_training_units.hi
    assert by_name["folded"].histogram_z_units.hi == pytest.approx(float(expected.max()), rel=1e-6)
    json.dumps(to_jsonable(report))


def test_model_saes_names_heads_and_concat(head_saes):
    concat = make_sae(torch.randn(10, 32), head="concatenated")
    assert list(model_saes(head_saes, concat)) == ["head_0", "head_1", "head_2", "head_3", "concat"]


# -- 2. ranks -----------------------------------------------------------------------------------------------------
def test_ranks_of_constructed_low_rank_dictionaries():
    heads = HeadSAEs((make_sae(low_rank(30, 8, 3, seed=1), head=0), make_sae(low_rank(30, 8, 5, seed=2), head=1)))
    concat = make_sae(low_rank(50, 16, 7, seed=3), head="concatenated")
    W_O = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(4))
    W_O[1] = low_rank(8, 20, 2, seed=5)  # head 1 writes a 2-dimensional subspace
    report = dictionary_ranks(heads, concat, W_O)
    ranks = {e.name: e.rank for e in report.entries}
    assert ranks == {"head 0": 3, "head 1": 5, "block (all heads)": 8, "concat": 7, "head 0 @ W_O": 3,
                     "head 1 @ W_O": 2, "all heads @ W_O": 5}
    d_head = 8  # a head's dictionary after W_O[h] (d_head x d_model) has rank at most d_head, not min(shape)
    bounds = {"mixed head": d_head, "mixed": 2 * d_head}
    for entry in report.entries:
        assert entry.max_rank == min(entry.n_rows, entry.n_cols, bounds.get(entry.kind, entry.n_rows))
        assert entry.gap > 1e5  # constructed ranks are clear-cut
        assert entry.sigma_first_dropped < entry.rtol < entry.sigma_last_kept
    block = torch.block_diag(*(F.normalize(sae.W_dec.double(), dim=1) for sae in heads))
    assert report.entries[2].rank == int(torch.linalg.matrix_rank(block, rtol=report.entries[2].rtol))
    head0 = report.entries[0]
    assert head0.rank == int(torch.linalg.matrix_rank(heads[0].W_dec.double(), rtol=head0.rtol))


def test_full_rank_has_no_gap_and_rtol_decides_a_borderline_rank():
    heads = HeadSAEs((make_sae(torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), head=0),))
    full = dictionary_ranks(heads).entries[0]
    assert full.rank == 3 and full.gap is None and full.sigma_first_dropped is None
    # the third atom leaves the plane of the first two by only 1e-3: sigma_3 / sigma_max is about 7e-4
    nearly_flat = HeadSAEs((make_sae(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 1e-3]]), head=0),))
    coarse = dictionary_ranks(nearly_flat, rtol=1e-2).entries[0]
    fine = dictionary_ranks(nearly_flat, rtol=1e-5).entries[0]
    assert (coarse.rank, fine.rank) == (2, 3)
    assert coarse.sigma_first_dropped == pytest.approx(fine.sigma_last_kept) and coarse.gap > 100


# -- 3. head-output cosines ---------------------------------------------------------------------------------------
@torch.no_grad()
def direct_cosines(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"]
    out = torch.einsum("bphd,hdm->bphm", z, model.W_O[1]).reshape(-1, model.cfg.n_heads, model.cfg.d_model)
    return {(h, g): F.cosine_similarity(out[:, h].double(), out[:, g].double(), dim=-1)
            for h, g in head_pairs(model.cfg.n_heads)}


def test_head_output_cosines_stream_equal_one_batch_and_the_direct_computation(tiny_model, tokens):
    W_O = tiny_model.W_O[1].detach()
    many = run_accumulators(tiny_model, tokens, {"c": HeadOutputCosineAccumulator(W_O, sample_tokens=20,
                                                                                   chunk_tokens=7)},
                            layer=1, batch_size=3)["c"]
    one = run_accumulators(tiny_model, tokens, {"c": HeadOutputCosineAccumulator(W_O, sample_tokens=20)},
                           layer=1, batch_size=11)["c"]
    assert one.n_tokens == many.n_tokens == 11 * 16
    direct = direct_cosines(tiny_model, tokens)
    assert [p.heads for p in one.pairs] == list(direct)
    for a, b in zip(one.pairs, many.pairs):
        assert a.histogram == b.histogram and a.n_excluded == b.n_excluded == 0
        for field in ("count", "mean", "std", "min", "max", "q1", "median", "q3"):
            assert getattr(a.summary, field) == pytest.approx(getattr(b.summary, field), abs=1e-12)
        assert a.sample == pytest.approx(b.sample, abs=2e-6)
        exact = direct[a.heads]
        assert a.summary.mean == pytest.approx(float(exact.mean()), abs=1e-6)
        assert a.summary.std == pytest.approx(float(exact.std(correction=0)), abs=1e-6)
        assert a.summary.min == pytest.approx(float(exact.min()), abs=1e-6)
        assert a.summary.max == pytest.approx(float(exact.max()), abs=1e-6)
        assert a.sample == pytest.approx(exact[:20].tolist(), abs=2e-6)
        width = 2.0 / len(a.histogram.counts)
        assert abs(a.summary.median - float(exact.quantile(0.5))) <= width
        assert abs(a.summary.q3 - float(exact.quantile(0.75))) <= width
    json.dumps(to_jsonable(one))
    assert one.mean_matrix()[0][1] == one.mean_matrix()[1][0] == one.pair(1, 0).summary.mean


def test_tokens_where_a_head_writes_nothing_are_excluded_and_counted():
    W_O = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1))
    z[0, :3, 0] = 0.0  # head 0 silent at three tokens
    acc = HeadOutputCosineAccumulator(W_O, sample_tokens=4)
    acc.update(ActivationBatch(tokens=torch.zeros(2, 5, dtype=torch.long), z=z, first_context=0, layer=0))
    result = acc.compute()
    assert result.pair(0, 1).n_excluded == result.pair(0, 2).n_excluded == 3
    assert result.pair(1, 2).n_excluded == 0 and result.pair(0, 1).summary.count == 7
    assert result.pair(0, 1).sample[:3] == (None, None, None) and result.pair(1, 2).sample[0] is not None
    assert math.isfinite(result.pair(0, 1).summary.mean)


def test_histogram_quantile_interpolates_inside_the_bin():
    counts = torch.tensor([0, 4, 0, 0])  # four values in [0.5, 1.0) of [0, 2]
    assert histogram_quantile(counts, 0.0, 2.0, 0.5, vmin=0.5, vmax=1.0) == pytest.approx(0.75)
    assert histogram_quantile(torch.zeros(4), 0.0, 2.0, 0.5, vmin=0.0, vmax=1.0) != 0.0  # NaN when empty


# -- 4. W_O carry -------------------------------------------------------------------------------------------------
def test_carry_of_orthogonal_head_subspaces_is_identity(head_saes):
    result = output_subspace_carry(head_saes, orthogonal_W_O(4, 8))
    torch.testing.assert_close(torch.tensor(result.mean_fraction, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(result.max_fraction, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert result.W_O_ranks == (8, 8, 8, 8) and result.chance_fraction == (0.25,) * 4
    assert result.n_features == (24,) * 4 and result.n_null_features == (0,) * 4


def test_carry_of_a_shared_subspace_is_one_and_null_features_are_counted():
    W_O = orthogonal_W_O(2, 4)
    W_O[1] = 2.0 * W_O[0]  # head 1 writes exactly where head 0 writes
    W_O[0, 3] = 0.0  # head 0 sends its last z coordinate nowhere
    W_dec0 = torch.eye(4)  # feature 3 of head 0 lies in W_O[0]'s null space
    heads = HeadSAEs((make_sae(W_dec0, head=0), make_sae(torch.eye(4), head=1)))
    result = output_subspace_carry(heads, W_O)
    assert result.n_null_features == (1, 0) and result.W_O_ranks == (3, 4)
    assert result.mean_fraction[0][1] == pytest.approx(1.0)
    # head 1's features: three of four lie in head 0's 3-dimensional row space
    assert result.mean_fraction[1][0] == pytest.approx(0.75)
    assert result.max_fraction[1][0] == pytest.approx(1.0)


# -- 5. mixed-feature interference --------------------------------------------------------------------------------
def test_mixed_interference_known_answers(head_saes):
    orthogonal = mixed_feature_interference(head_saes, orthogonal_W_O(4, 8), chunk_features=5)
    for pair in orthogonal.pairs:
        if pair.within_head:
            W = F.normalize(head_saes[pair.heads[0]].W_dec.double(), dim=1)  # W_O[h] is an isometry here
            cos = (W @ W.T).abs().fill_diagonal_(0)
            assert pair.summary.mean == pytest.approx(float(cos.amax(1).mean()), abs=1e-5)
            assert pair.summary.max == pytest.approx(float(cos.max()), abs=1e-5)
        else:
            assert pair.summary.max < 1e-5 and pair.fraction_above == 0.0
        assert sum(pair.histogram.counts) == 24
    assert len(orthogonal.pairs) == 16 and orthogonal.matrix("max")[1][2] < 1e-5

    W_O = orthogonal_W_O(2, 4)
    W_O[1] = W_O[0]
    shared = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    heads = HeadSAEs((make_sae(shared, head=0), make_sae(shared.flip(0), head=1)))
    copied = mixed_feature_interference(heads, W_O)
    assert copied.pair(0, 1).summary.min == pytest.approx(1.0, abs=1e-6)
    assert copied.pair(0, 1).fraction_above == 1.0
    assert copied.pair(0, 0).summary.max < 1.0 - 1e-4  # a feature is not compared with itself
    json.dumps(to_jsonable(copied))


# -- 6. figures ---------------------------------------------------------------------------------------------------
def test_figures_hold_the_expected_traces(tiny_model, tokens, head_saes):
    W_O = tiny_model.W_O[1].detach()
    raw = make_sae(torch.randn(10, 32), head="concatenated", provenance={"needs_input_scale": True})
    norms = decoder_norms(model_saes(head_saes, raw))
    training = figures.decoder_norms_figure(norms)
    assert [t.name for t in training.data] == ["head 0", "head 1", "head 2", "head 3", "concat"]
    assert "training units" in training.layout.xaxis.title.text
    z_units = figures.decoder_norms_figure(norms, units="z")
    assert len(z_units.data) == 4 and "concat" in z_units.layout.title.text
    assert "unscaled z" in z_units.layout.xaxis.title.text

    ranks = figures.ranks_figure(dictionary_ranks(head_saes, raw, W_O))
    assert [t.type for t in ranks.data] == ["bar", "bar"] and len(ranks.data[0].x) == 4 + 1 + 1 + 4 + 1

    cosines = run_accumulators(tiny_model, tokens, {"c": HeadOutputCosineAccumulator(W_O, sample_tokens=16)},
                               layer=1)["c"]
    lines_and_boxes = figures.head_output_cosine_figure(cosines)
    assert [t.type for t in lines_and_boxes.data] == ["scatter", "box"] * 6
    assert lines_and_boxes.data[0].name == "heads 0-1" and len(lines_and_boxes.data[0].y) == 16
    assert lines_and_boxes.data[1].median[0] == cosines.pair(0, 1).summary.median
    heatmap = figures.head_output_cosine_heatmap(cosines)
    assert heatmap.data[0].type == "heatmap" and heatmap.data[0].z[0][0] is None

    carry = figures.output_subspace_carry_figure(output_subspace_carry(head_saes, W_O))
    assert [t.type for t in carry.data] == ["heatmap", "heatmap"]
    interference = mixed_feature_interference(head_saes, W_O)
    assert len(figures.mixed_feature_interference_figure(interference).data) == 2
    boxes = figures.mixed_feature_interference_boxes(interference)
    assert len(boxes.data) == 16 and boxes.data[0].name == "0->0 (within)"

    html = figures.figure_html(lines_and_boxes)
    assert html.startswith("<div") and "Plotly.newPlot" in html and "plotly.js v" not in html


# -- 7. bad input -------------------------------------------------------------------------------------------------
def test_bad_input_is_refused(head_saes):
    with pytest.raises(InputError, match="W_O must have shape"):
        output_subspace_carry(head_saes, torch.randn(3, 8, 16))
    with pytest.raises(InputError, match="W_O must have shape"):
        dictionary_ranks(head_saes, W_O=torch.randn(4, 6, 16))
    with pytest.raises(InputError, match="NaN"):
        mixed_feature_interference(head_saes, torch.full((4, 8, 16), math.nan))
    with pytest.raises(InputError, match="threshold"):
        mixed_feature_interference(head_saes, torch.randn(4, 8, 16), threshold=1.5)
    with pytest.raises(InputTypeError, match="head_saes must be HeadSAEs"):
        output_subspace_carry([head_saes[0]], torch.randn(1, 8, 16))
    with pytest.raises(InputError, match="heads 0..3"):
        dictionary_ranks(HeadSAEs((head_saes[1], head_saes[3])))
    with pytest.raises(InputError, match="rtol"):
        dictionary_ranks(head_saes, rtol=0.0)
    with pytest.raises(InputError, match="n_bins"):
        decoder_norms({"a": head_saes[0]}, n_bins=0)
    with pytest.raises(InputTypeError, match=r"saes\['a'\] must be a sparsedecomp SAE"):
        decoder_norms({"a": head_saes[0].W_dec})
    with pytest.raises(InputError, match="at least 2"):
        HeadOutputCosineAccumulator(torch.randn(1, 8, 16))
    acc = HeadOutputCosineAccumulator(torch.randn(4, 8, 16))
    with pytest.raises(InputError, match="no tokens were seen"):
        acc.compute()
    with pytest.raises(InputError, match="W_O must be this layer's"):
        acc.update(ActivationBatch(tokens=torch.zeros(1, 3, dtype=torch.long), z=torch.randn(1, 3, 4, 6),
                                   first_context=0, layer=0))
    with pytest.raises(InputError, match="sample_tokens"):
        HeadOutputCosineAccumulator(torch.randn(4, 8, 16), sample_tokens=-1)
    with pytest.raises(InputError, match="units"):
        figures.decoder_norms_figure(decoder_norms({"a": head_saes[0]}), units="raw")
    with pytest.raises(InputTypeError, match="HeadOutputCosines"):
        figures.head_output_cosine_figure(decoder_norms({"a": head_saes[0]}))
