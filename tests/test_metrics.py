"""Metrics on cases small enough to compute by hand (expected values derived in each test)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsedecomp import BlockDictionary, Dictionary, Status
from sparsedecomp.decomposition import Decomposition
from sparsedecomp.evaluation import (
    cosine,
    decomposition_metrics,
    relative_squared_error,
    head_columns,
    head_mass_shares,
    heads_for_mass,
    l0,
    l1,
    relative_error,
    summarize,
    target_head_shares,
    top_k_mass_share,
)

from sparsedecomp.codes import Codes

F64 = torch.float64


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def make_decomposition(coefficients: torch.Tensor, dictionary: Dictionary, targets: torch.Tensor,
                       layout: str = "sparse") -> Decomposition:
    n = coefficients.shape[0]
    return Decomposition(
        codes=Codes.from_dense(coefficients, layout=layout),
        reconstruction=coefficients @ dictionary.atoms,
        targets=targets,
        objective=torch.zeros(n, dtype=F64),
        certificate=torch.zeros(n, dtype=F64),
        certificate_kind="exact",
        iterations=torch.zeros(n, dtype=torch.long),
        status=torch.full((n,), int(Status.CONVERGED)),
        solver="hand",
        dictionary=dictionary,
    )


def test_l0_and_l1():
    c = t([0.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0])
    assert l0(c).tolist() == [2, 0]
    assert l0(c, threshold=1.0).tolist() == [1, 0]  # only |-2| > 1
    assert l1(c).tolist() == [2.5, 0.0]


def test_reconstruction_metrics_on_a_3_4_5_triangle():
    # y = (3, 4), y_hat = (3, 0): residual (0, 4), ||y|| = 5, so error 4/5, FVU 16/25, cosine 9/(5*3) = 3/5.
    y, y_hat = t([3.0, 4.0]), t([3.0, 0.0])
    assert float(relative_error(y, y_hat)[0]) == pytest.approx(4 / 5)
    assert float(relative_squared_error(y, y_hat)[0]) == pytest.approx(16 / 25)
    assert float(cosine(y, y_hat)[0]) == pytest.approx(3 / 5)


def test_reconstruction_metrics_exact_and_opposite():
    y = t([1.0, 2.0, 2.0])
    assert float(relative_error(y, y)[0]) == 0.0
    assert float(cosine(y, y)[0]) == pytest.approx(1.0)
    # y_hat = -y: residual 2y, so error 2, FVU 4, cosine -1.
    assert float(relative_error(y, -y)[0]) == pytest.approx(2.0)
    assert float(relative_squared_error(y, -y)[0]) == pytest.approx(4.0)
    assert float(cosine(y, -y)[0]) == pytest.approx(-1.0)


def test_zero_target_conventions_never_nan():
    zero, other = t([0.0, 0.0]), t([1.0, 0.0])
    assert float(relative_error(zero, zero)[0]) == 0.0
    assert float(relative_squared_error(zero, zero)[0]) == 0.0
    assert float(cosine(zero, zero)[0]) == 1.0
    assert float(relative_error(zero, other)[0]) == math.inf
    assert float(relative_squared_error(zero, other)[0]) == math.inf
    assert float(cosine(zero, other)[0]) == 0.0
    assert float(cosine(other, zero)[0]) == 0.0
    assert float(relative_error(other, zero)[0]) == 1.0
    z = torch.zeros(1, 4, dtype=F64)
    assert float(top_k_mass_share(z, k=2)[0]) == 0.0
    assert head_mass_shares(z, torch.tensor([0, 0, 1, 1]), 2).tolist() == [[0.0, 0.0]]
    assert heads_for_mass(head_mass_shares(z, torch.tensor([0, 0, 1, 1]), 2)).tolist() == [0]
    assert target_head_shares(z, head_columns(4, 2)).tolist() == [[0.0, 0.0]]


def test_top_k_mass_share():
    # |c| = (4, 3, 2, 1): total 10, top-1 4/10, top-2 7/10, k beyond the length takes everything.
    c = t([1.0, -4.0, 2.0, 3.0])
    assert float(top_k_mass_share(c, k=1)[0]) == pytest.approx(4 / 10)
    assert float(top_k_mass_share(c, k=2)[0]) == pytest.approx(7 / 10)
    assert float(top_k_mass_share(c, k=10)[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k"):
        top_k_mass_share(c, k=0)


def test_head_mass_shares_and_heads_needed():
    head = torch.tensor([0, 0, 1, 2, 2])
    # Head masses: h0 = 1 + 2 = 3, h1 = 5, h2 = |-1| + 1 = 2; total 10.
    c = t([1.0, 2.0, 5.0, -1.0, 1.0])
    shares = head_mass_shares(c, head, 3)
    torch.testing.assert_close(shares, t([3 / 10, 5 / 10, 2 / 10]))
    assert float(shares.sum()) == pytest.approx(1.0)
    # Sorted shares 0.5, 0.3, 0.2: cumulative 0.5, 0.8, 1.0.
    assert heads_for_mass(shares, fraction=0.5).tolist() == [1]
    assert heads_for_mass(shares, fraction=0.8).tolist() == [2]
    assert heads_for_mass(shares, fraction=0.9).tolist() == [3]
    # Exact boundary despite rounding: shares (0.9, 0.1) reach 0.9 with one head.
    assert heads_for_mass(t([0.1, 0.9]), fraction=0.9).tolist() == [1]
    with pytest.raises(ValueError, match="fraction"):
        heads_for_mass(shares, fraction=1.5)
    with pytest.raises(ValueError, match="head"):
        head_mass_shares(c, torch.tensor([0, 1]), 2)


def test_head_shares_sum_to_one_on_random_codes():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(20, 30, generator=g, dtype=F64)
    head = torch.randint(0, 4, (30,), generator=g)
    torch.testing.assert_close(head_mass_shares(c, head, 4).sum(dim=1), torch.ones(20, dtype=F64))
    y = torch.randn(20, 12, generator=g, dtype=F64)
    torch.testing.assert_close(target_head_shares(y, head_columns(12, 3)).sum(dim=1), torch.ones(20, dtype=F64))


def test_target_head_shares_squared_norms():
    # y = (1, 2 | 2, 0 | 0, 0): block squared norms 5, 4, 0 out of 9.
    y = t([1.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(target_head_shares(y, head_columns(6, 2)), t([5 / 9, 4 / 9, 0.0]))
    with pytest.raises(ValueError, match="d_head"):
        head_columns(6, 4)


def test_summarize_quantiles_and_nonfinite():
    values = torch.arange(11, dtype=F64)  # 0..10: mean 5, median 5, p10 1, p90 9 (linear interpolation)
    s = summarize(torch.cat([values, torch.tensor([math.inf, math.nan], dtype=F64)]))
    assert s == {"mean": 5.0, "median": 5.0, "p10": pytest.approx(1.0), "p90": pytest.approx(9.0), "n_nonfinite": 2}
    assert summarize(torch.tensor([math.nan], dtype=F64))["mean"] is None


@pytest.fixture
def block_case():
    """Two heads with d_head = 2 and two features each (identity blocks, so atoms are unit basis vectors)."""
    blocks = [torch.eye(2, dtype=F64), 2.0 * torch.eye(2, dtype=F64)]
    dictionary = BlockDictionary.from_blocks(blocks, normalize=True)
    # Target 0 = (3, 0 | 0, 1), coded exactly; target 1 is zero, coded by zero.
    targets = t([3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    coefficients = t([3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    return dictionary, targets, coefficients


def test_decomposition_metrics_block_case(block_case):
    dictionary, targets, coefficients = block_case
    m = decomposition_metrics(make_decomposition(coefficients, dictionary, targets), top_k=1)
    assert m.l0.tolist() == [2, 0]
    assert m.l1.tolist() == [4.0, 0.0]
    assert m.relative_error.tolist() == [0.0, 0.0]
    assert m.cosine.tolist() == pytest.approx([1.0, 1.0])
    # Coefficient mass: head 0 holds 3 of 4, head 1 holds 1 of 4; target energy: 9 of 10 and 1 of 10.
    torch.testing.assert_close(m.head_mass_share, t([3 / 4, 1 / 4], [0.0, 0.0]))
    torch.testing.assert_close(m.target_head_share, t([9 / 10, 1 / 10], [0.0, 0.0]))
    assert m.heads_for_mass.tolist() == [2, 0]  # 0.75 < 0.9, so both heads are needed
    assert m.top_k_mass_share.tolist() == pytest.approx([3 / 4, 0.0])
    for name in ("l1", "relative_error", "cosine", "relative_squared_error", "top_k_mass_share"):
        assert not bool(torch.isnan(getattr(m, name)).any()), name


def test_feature_units_divide_by_decoder_norms(block_case):
    dictionary, targets, coefficients = block_case
    # Head 1's decoder rows have norm 2, so its feature activation is the coefficient / 2: mass 3 and 1/2.
    m = decomposition_metrics(make_decomposition(coefficients, dictionary, targets), feature_units=True)
    assert m.l1.tolist() == [3.5, 0.0]
    torch.testing.assert_close(m.head_mass_share[0], t(3 / 3.5, 0.5 / 3.5))


def test_summary_is_typed_and_json_ready(block_case):
    dictionary, targets, coefficients = block_case
    m = decomposition_metrics(make_decomposition(coefficients, dictionary, targets), mass_fraction=0.7)
    summary = m.summarize()
    assert summary.n_targets == 2 and summary.settings.mass_fraction == 0.7
    assert summary.status_counts == {"CONVERGED": 2}
    assert summary.metrics["l1"].mean == pytest.approx((4.0 + 0.0) / 2)
    # The mean head shares average only targets with mass, so they sum to 1.
    assert summary.head_mass_share_mean == pytest.approx((3 / 4, 1 / 4))
    assert summary.target_head_share_mean == pytest.approx((9 / 10, 1 / 10))
    assert summary.metrics["heads_for_mass"].mean == pytest.approx((1 + 0) / 2)  # 0.75 >= 0.7: one head
    # The dict form is the same values under the same names, and strict JSON.
    parsed = json.loads(json.dumps(m.summary(), allow_nan=False))
    assert list(parsed) == ["solver", "n_targets", "settings", "status_counts", "metrics", "head_mass_share_mean",
                            "target_head_share_mean"]
    assert parsed["metrics"]["l1"]["mean"] == summary.metrics["l1"].mean
    assert parsed["head_mass_share_mean"] == list(summary.head_mass_share_mean)


def test_dense_dictionary_needs_explicit_d_head():
    atoms = torch.eye(4, dtype=F64)
    dictionary = Dictionary.from_atoms(atoms)
    targets = t([1.0, 1.0, 1.0, 1.0])
    d = make_decomposition(targets.clone(), dictionary, targets)
    m = decomposition_metrics(d)
    assert m.head_mass_share is None and m.heads_for_mass is None and m.target_head_share is None
    assert m.summarize().head_mass_share_mean is None
    m2 = decomposition_metrics(d, d_head=2)
    torch.testing.assert_close(m2.target_head_share, t([0.5, 0.5]))


def test_bad_settings_raise(block_case):
    dictionary, targets, coefficients = block_case
    d = make_decomposition(coefficients, dictionary, targets)
    with pytest.raises(ValueError, match="threshold"):
        decomposition_metrics(d, threshold=-1.0)
    with pytest.raises(ValueError, match="d_head"):
        decomposition_metrics(d, d_head=3)
    with pytest.raises(TypeError, match="Decomposition"):
        decomposition_metrics(coefficients)


def test_nan_code_rows_give_nan_shares_not_made_up_numbers():
    from sparsedecomp.evaluation.metrics import head_mass_shares, top_k_mass_share

    codes = torch.tensor([[1.0, 0.0, 3.0, 0.0], [float("nan")] * 4], dtype=F64)
    head = torch.tensor([0, 0, 1, 1])
    shares = head_mass_shares(codes, head, 2)
    assert shares[0].tolist() == [0.25, 0.75] and bool(torch.isnan(shares[1]).all())
    top = top_k_mass_share(codes, k=1)
    assert float(top[0]) == 0.75 and math.isnan(float(top[1]))
