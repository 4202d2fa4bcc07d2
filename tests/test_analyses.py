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
HEAD_RANKS = (3, 5, 8, 2)
CONCAT_RANK = 6
FOLD_SCALE = 2.5


def bar_heights_by_bin(values, centers, width):
    """How many of ``values`` fall in each bar of a histogram drawn with these centers and width (``[e_k,
    e_k+1)``, the last bar closed), counted one value at a time."""
    lo = centers[0] - width / 2
    counts = [0] * len(centers)
    for v in values:
        k = math.floor((v - lo) / width + 1e-9)
        if k == len(centers):  # the top edge belongs to the last bar
            k -= 1
        assert 0 <= k < len(centers), (v, lo, width)
        counts[k] += 1
    return counts


def unit(rows):
    return rows / rows.norm(dim=1, keepdim=True)


def test_figures_plot_the_numbers_of_the_weights_and_activations(tiny_model, tokens):
    """Each figure's data against a computation from the raw tensors: decoder norms binned one at a time, ranks from
    torch.linalg.matrix_rank, head-output cosines from run_with_cache, row-space shares from a QR basis, nearest
    mixed features by brute force, quartiles from the statistics module."""
    import statistics

    W_O = tiny_model.W_O[1].detach()
    decoders = [low_rank(24, 8, r, seed=10 + h) for h, r in enumerate(HEAD_RANKS)]
    # head 0 was trained on s * z and has its scale folded (W_dec / s now); the others read z as they are
    head_saes = HeadSAEs((make_sae(decoders[0], head=0, provenance={"needs_input_scale": True})
                          .with_input_scale(FOLD_SCALE),
                          *(make_sae(W, head=h) for h, W in enumerate(decoders) if h)))
    concat_W = low_rank(10, 32, CONCAT_RANK, seed=20)
    raw = make_sae(concat_W, head="concatenated", provenance={"needs_input_scale": True})

    # decoder norms: bar heights are the norms binned; training units undo the fold, z units are the weights now
    norms = decoder_norms(model_saes(head_saes, raw))
    training_norms = {f"head {h}": W.double().norm(dim=1).tolist() for h, W in enumerate(decoders)}
    training_norms["concat"] = concat_W.double().norm(dim=1).tolist()
    z_norms = {name: [v / FOLD_SCALE for v in values] if name == "head 0" else values
               for name, values in training_norms.items() if name != "concat"}
    for units, expected in (("training", training_norms), ("z", z_norms)):
        fig = figures.decoder_norms_figure(norms, units=units)
        assert [t.name for t in fig.data] == list(expected)
        top = max(max(v) for v in expected.values())
        for trace in fig.data:
            centers, width = list(trace.x), trace.width
            assert centers[0] - width / 2 == pytest.approx(0.0, abs=1e-12)  # bins from 0 to the largest norm
            assert centers[-1] + width / 2 == pytest.approx(top, rel=1e-6)
            assert list(trace.y) == bar_heights_by_bin(expected[trace.name], centers, width), (units, trace.name)
    assert "training units" in figures.decoder_norms_figure(norms).layout.xaxis.title.text
    z_fig = figures.decoder_norms_figure(norms, units="z")
    assert "unscaled z" in z_fig.layout.xaxis.title.text and "concat" in z_fig.layout.title.text

    # ranks: bars are torch.linalg.matrix_rank of each dictionary (float32 weights: rounding is below 1e-4)
    def rank(M):
        return int(torch.linalg.matrix_rank(M.double(), rtol=1e-4))

    mixed = [W.double() @ W_O[h].double() for h, W in enumerate(decoders)]
    expected_ranks = {**{f"head {h}": rank(W) for h, W in enumerate(decoders)},
                      "block (all heads)": rank(torch.block_diag(*decoders)), "concat": rank(concat_W),
                      **{f"head {h} @ W_O": rank(M) for h, M in enumerate(mixed)}, "all heads @ W_O": rank(torch.cat(mixed))}
    largest = {**{f"head {h}": 8 for h in range(4)}, "block (all heads)": 32, "concat": 10,
               **{f"head {h} @ W_O": 8 for h in range(4)}, "all heads @ W_O": 32}
    assert [expected_ranks[f"head {h}"] for h in range(4)] == list(HEAD_RANKS)  # the construction, not rounding
    assert expected_ranks["block (all heads)"] == sum(HEAD_RANKS) and expected_ranks["concat"] == CONCAT_RANK
    ranks = figures.ranks_figure(dictionary_ranks(head_saes, raw, W_O))
    assert list(ranks.data[0].x) == list(expected_ranks) == list(ranks.data[1].x)
    assert list(ranks.data[0].y) == list(expected_ranks.values())
    assert list(ranks.data[1].y) == list(largest.values())

    # head-output cosines: z from TransformerLens's cache, each head's output z_h W_O[h], contexts then positions
    cosines = run_accumulators(tiny_model, tokens, {"c": HeadOutputCosineAccumulator(W_O, sample_tokens=16)},
                               layer=1)["c"]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"].double().reshape(-1, 4, 8)
    outputs = [z[:, h] @ W_O[h].double() for h in range(4)]
    cos = {(h, g): F.cosine_similarity(outputs[h], outputs[g], dim=1) for h in range(4) for g in range(h + 1, 4)}
    heatmap = figures.head_output_cosine_heatmap(cosines).data[0]
    for h in range(4):
        for g in range(4):
            if h == g:
                assert heatmap.z[h][g] is None
            else:
                assert heatmap.z[h][g] == pytest.approx(float(cos[min(h, g), max(h, g)].mean()), abs=1e-6)
    lines_and_boxes = figures.head_output_cosine_figure(cosines)
    assert [t.type for t in lines_and_boxes.data] == ["scatter", "box"] * 6
    for (h, g), line, box in zip(cos, lines_and_boxes.data[0::2], lines_and_boxes.data[1::2]):
        values = cos[h, g]
        assert line.name == f"heads {h}-{g}" == box.x[0]
        assert list(line.y) == pytest.approx(values[:16].tolist(), abs=1e-6)  # the first tokens, rounded to 1e-6
        assert (box.lowerfence[0], box.upperfence[0], box.mean[0], box.sd[0]) == pytest.approx(
            (float(values.min()), float(values.max()), float(values.mean()), float(values.std(correction=0))),
            abs=1e-6)
        # quartiles come from 200 bins on [-1, 1]: within one bin (0.01) of the exact ones
        exact = statistics.quantiles(values.tolist(), n=4, method="inclusive")
        assert [box.q1[0], box.median[0], box.q3[0]] == pytest.approx(exact, abs=0.01)

    # output-subspace carry: the share of ||d_j W_O[h]||^2 in the row space of W_O[g] (orthonormal basis by QR)
    bases = [torch.linalg.qr(W_O[g].double().T).Q for g in range(4)]
    share = [[(mixed[h] @ bases[g]).pow(2).sum(1) / mixed[h].pow(2).sum(1) for g in range(4)] for h in range(4)]
    carry = figures.output_subspace_carry_figure(output_subspace_carry(head_saes, W_O))
    assert [t.type for t in carry.data] == ["heatmap", "heatmap"]
    for trace, reduce in zip(carry.data, (torch.mean, torch.amax)):
        expected = [[float(reduce(share[h][g])) for g in range(4)] for h in range(4)]
        assert [list(row) for row in trace.z] == [pytest.approx(row, abs=1e-6) for row in expected]  # float32 weights
        assert all(trace.z[h][h] == pytest.approx(1.0, abs=1e-9) for h in range(4))

    # interference: m_j = max over the other head's features (another feature of the same head on the diagonal)
    interference = mixed_feature_interference(head_saes, W_O)
    nearest = {}
    for h in range(4):
        for g in range(4):
            c = (unit(mixed[h]) @ unit(mixed[g]).T).abs()
            if h == g:
                c.fill_diagonal_(-1.0)
            nearest[h, g] = c.amax(dim=1).tolist()
    median, above = figures.mixed_feature_interference_figure(interference).data
    for h in range(4):
        for g in range(4):
            assert median.z[h][g] == pytest.approx(statistics.median(nearest[h, g]), abs=1e-5)
            assert above.z[h][g] == pytest.approx(sum(m > 0.5 for m in nearest[h, g]) / 24, abs=1e-9)
    boxes = figures.mixed_feature_interference_boxes(interference)
    assert len(boxes.data) == 16 and [b.name for b in boxes.data[:4]] == [f"{h}->{h} (within)" for h in range(4)]
    for box in boxes.data:
        h, g = (int(v) for v in box.name.split(" ")[0].split("->"))
        m = nearest[h, g]
        q1, med, q3 = statistics.quantiles(m, n=4, method="inclusive")
        assert (box.lowerfence[0], box.q1[0], box.median[0], box.q3[0], box.upperfence[0], box.mean[0]) == \
            pytest.approx((min(m), q1, med, q3, max(m), statistics.fmean(m)), abs=1e-5), box.name

    html = figures.figure_html(lines_and_boxes)
    assert html.startswith("<div") and "Plotly.newPlot" in html and "plotly.js v" not in html


def test_report_figures_plot_splice_losses_densities_and_attribution(tokens):
    """The evaluation report's own figures (report_figures.py) against TransformerLens runs with hand-written hooks
    and the SAEs' raw tensors."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sparsedecomp.evaluation import report_figures
    from sparsedecomp.evaluation.attribution import head_attribution
    from sparsedecomp.evaluation.sae_quality import SAEQualityAccumulator
    from sparsedecomp.evaluation.splice import splice_losses, splice_variants

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu",
                                  d_mlp=64, normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # larger output weights: ablating a head visibly changes the loss of a random model
        for block in model.blocks:
            block.attn.W_O.mul_(20)
    g = torch.Generator().manual_seed(5)
    saes = {h: SAE(W_enc=torch.randn(8, 16, generator=g) * 0.4, b_enc=torch.randn(16, generator=g) * 0.5 - 0.5,
                   W_dec=torch.randn(16, 8, generator=g) * 0.4, b_dec=torch.randn(8, generator=g) * 0.1,
                   apply_b_dec_to_input=False, hook_name="blocks.1.attn.hook_z", layer=1, head=h, model_name="tiny")
            for h in (0, 1)}

    # splice-in: per-context CE and KL(clean || variant) over the predicted positions, from run_with_hooks
    def replace(h, how):
        def hook(z, hook):
            x = z[:, :, h, :]
            if how == "zero":
                z[:, :, h, :] = 0.0
            else:
                sae = saes[h]
                z[:, :, h, :] = torch.relu(x @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec
            return z
        return hook

    hooks = {"clean": [], "zero_head_0": [("blocks.1.attn.hook_z", replace(0, "zero"))],
             "zero_head_1": [("blocks.1.attn.hook_z", replace(1, "zero"))],
             "zero_layer": [("blocks.1.attn.hook_z", lambda z, hook: torch.zeros_like(z))],
             "head_sae_0": [("blocks.1.attn.hook_z", replace(0, "sae"))],
             "head_sae_1": [("blocks.1.attn.hook_z", replace(1, "sae"))]}
    with torch.no_grad():
        logp = {name: model.run_with_hooks(tokens, fwd_hooks=fwd).double().log_softmax(-1)[:, :-1]
                for name, fwd in hooks.items()}
    target = tokens[:, 1:, None]
    ce = {name: -lp.gather(-1, target)[..., 0].mean(1) for name, lp in logp.items()}  # per context
    kl = {name: (logp["clean"].exp() * (logp["clean"] - lp)).sum(-1).mean(1) for name, lp in logp.items()}
    report = splice_losses(model, tokens, splice_variants(4, 8, head_saes=saes, heads=[0, 1]), layer=1)
    losses = report_figures.splice_losses_figure(report.results)
    assert list(losses.data[0].x) == list(hooks)
    assert list(losses.data[0].y) == pytest.approx([float(ce[n].mean()) for n in hooks], rel=1e-5)
    assert list(losses.data[0].error_y.array) == pytest.approx(
        [float(ce[n].std(correction=1)) / math.sqrt(len(tokens)) for n in hooks], rel=1e-3, abs=1e-7)
    assert list(losses.data[1].y) == pytest.approx([float(kl[n].mean()) for n in hooks], rel=1e-4, abs=1e-6)
    scores = report_figures.splice_scores_figure(report.results)
    assert list(scores.data[0].x) == ["head_sae_0", "head_sae_1"]
    expected = [float((ce[f"zero_head_{h}"].mean() - ce[f"head_sae_{h}"].mean())
                      / (ce[f"zero_head_{h}"].mean() - ce["clean"].mean())) for h in (0, 1)]
    assert list(scores.data[0].y) == pytest.approx(expected, rel=1e-4)
    # grey where the ablation's cost is not a measurement: under 0.01 nats or under 5 standard errors (over contexts)
    effects = [ce[f"zero_head_{h}"] - ce["clean"] for h in (0, 1)]
    measurable = [float(b.mean()) >= max(0.01, 5 * float(b.std(correction=1)) / math.sqrt(len(b))) for b in effects]
    assert list(scores.data[0].marker.color) == ["#4a7bd1" if m else "#bbbbbb" for m in measurable]

    # feature density: log10 of the fraction of tokens each feature fires on, binned on the figure's edges
    quality = run_accumulators(model, tokens, {"q": SAEQualityAccumulator(saes[0], 0)}, layer=1)["q"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    z0 = cache["blocks.1.attn.hook_z"][:, :, 0].reshape(-1, 8)
    density = (torch.relu(z0 @ saes[0].W_enc + saes[0].b_enc) > 0).double().mean(0)
    edges = list(quality.log10_density_bin_edges)
    counts = [0] * (len(edges) - 1)
    for d in density.tolist():
        if d > 0:
            x = math.log10(d)
            counts[max([0] + [k for k in range(len(counts)) if edges[k] <= x])] += 1
    (trace,) = report_figures.feature_density_figure({"head 0": quality}).data
    assert list(trace.y) == counts and sum(counts) > 0
    assert list(trace.x) == pytest.approx([(a + b) / 2 for a, b in zip(edges, edges[1:])])
    assert trace.name == f"head 0 (dead {100 * float((density == 0).double().mean()):.1f}%)"

    # attribution agreement: the share of features whose top head (largest block norm) two methods agree on
    concat = make_sae(torch.randn(40, 32, generator=g), head="concatenated")
    methods = {"weight": concat.W_dec, "weight_squared": concat.W_dec, "encoder": concat.W_enc.T,
               "encoder_squared": concat.W_enc.T}
    top = {m: rows.reshape(40, 4, 8).norm(dim=2).argmax(1) for m, rows in methods.items()}
    (heat,) = report_figures.attribution_agreement_figure(head_attribution(concat, 4).report()).data
    assert list(heat.x) == list(methods)
    for i, a in enumerate(methods):
        for j, b in enumerate(methods):
            assert heat.z[i][j] == pytest.approx(float((top[a] == top[b]).double().mean()))
    assert min(min(row) for row in heat.z) < 1  # the encoder and decoder disagree somewhere


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
