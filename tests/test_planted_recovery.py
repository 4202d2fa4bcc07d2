"""Recovery scores: a real solver recovers a well-separated planted world exactly, noise costs it support and the
score says so, and scores give the known answers on hand-made codes."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from sparsedecomp import Codes, decompose
from sparsedecomp.demo.planted import PlantedConfig
from sparsedecomp.demo.planted_world import PlantedTruth, PlantedWorld, build_planted_world
from sparsedecomp.demo.recovery import score_recovery
from sparsedecomp.errors import InputError

# A world a solver must solve exactly: at most as many atoms per head as dimensions, spread far from the cluster
# centres (nearly independent directions), weights within a factor of about two, and no noise.
SEPARATED = PlantedConfig(n_heads=4, n_features=6, d_head=16, n_targets=40, min_atoms=2, max_atoms=5, min_heads=1,
                          max_heads=3, cluster_size=1, spread=(2.0, 3.0), weight_sigma=0.2, noise=0.0, seed=0)


@pytest.fixture(scope="module")
def tiny_world() -> PlantedWorld:
    return build_planted_world("tiny", seed=4)


# -- a real solver recovers a well-separated world -------------------------------------------------------------------
@pytest.mark.parametrize("method, params", [("nnls", {"tol": 1e-12}), ("nn_omp", {"n_nonzero": 5, "tol": 1e-10})])
def test_solver_recovers_a_noiseless_separated_world(method, params):
    world = build_planted_world(SEPARATED, dtype=torch.float64)
    assert float(world.truth.noise.abs().max()) == 0.0
    assert world.dictionary.coherence() < 0.8
    result = decompose(world.targets, world.dictionary, method=method, **params)
    score = score_recovery(result, world.truth)
    assert score.support_recall == 1.0 and score.support_precision == 1.0 and score.support_exact == 1.0
    assert score.head_recall == 1.0 and score.head_precision == 1.0
    assert score.coefficient_error_max < 1e-4
    assert score.planted_l0_mean == score.l0_mean > 2


def test_noise_costs_a_solver_support_and_the_score_says_so():
    noisy = build_planted_world(replace(SEPARATED, noise=0.3, seed=1), dtype=torch.float64)
    score = score_recovery(decompose(noisy.targets, noisy.dictionary, method="nnls", tol=1e-10), noisy)
    assert score.coefficient_error > 1e-3
    assert score.support_precision < 1.0 or score.support_recall < 1.0


# -- scoring on hand-made codes --------------------------------------------------------------------------------------
def hand_truth() -> PlantedTruth:
    """Three heads of four atoms; row 0 plants atoms 0 (head 0, weight 1) and 5 (head 1, weight 0.5), row 1 atom 9
    (head 2, weight 2)."""
    return PlantedTruth(support=torch.tensor([[0, 5], [9, -1]]), weights=torch.tensor([[1.0, 0.5], [2.0, 0.0]]),
                        noise=torch.zeros(2, 6), atom_head=torch.arange(12) // 4)


def code(*entries: tuple[int, float], row1: tuple[tuple[int, float], ...] = ((9, 2.0),)) -> torch.Tensor:
    """A dense (2, 12) code: row 0 from ``entries``, row 1 from ``row1`` (default: exactly the planted row 1)."""
    out = torch.zeros(2, 12)
    for row, items in ((0, entries), (1, row1)):
        for atom, value in items:
            out[row, atom] = value
    return out


NORM0 = math.sqrt(1.25)  # ||(1, 0.5)||


@pytest.mark.parametrize("entries, expected", [
    # perfect
    (((0, 1.0), (5, 0.5)), dict(support_recall=1, support_precision=1, support_exact=1, coefficient_error=0,
                                head_recall=1, head_precision=1, n_found=2)),
    # a missed atom (and with it head 1)
    (((0, 1.0),), dict(support_recall=0.5, support_precision=1, support_exact=0, coefficient_error=0.5 / NORM0,
                       head_recall=0.5, head_precision=1, n_found=1)),
    # an extra atom in a planted head
    (((0, 1.0), (5, 0.5), (1, 0.3)), dict(support_recall=1, support_precision=2 / 3, support_exact=0,
                                          coefficient_error=0.3 / NORM0, head_recall=1, head_precision=1, n_found=3)),
    # an extra atom in a head that is not planted
    (((0, 1.0), (5, 0.5), (10, 0.3)), dict(support_recall=1, support_precision=2 / 3, support_exact=0,
                                           coefficient_error=0.3 / NORM0, head_recall=1, head_precision=2 / 3,
                                           n_found=3)),
    # the right atoms with the wrong weights: twice the planted ones, then swapped
    (((0, 2.0), (5, 1.0)), dict(support_recall=1, support_precision=1, support_exact=1, coefficient_error=1.0,
                                head_recall=1, head_precision=1, n_found=2)),
    (((0, 0.5), (5, 1.0)), dict(support_recall=1, support_precision=1, support_exact=1,
                                coefficient_error=math.sqrt(0.5) / NORM0, head_recall=1, head_precision=1, n_found=2)),
    # a coefficient below 5 % of the row's largest is not a choice, but still costs coefficient error
    (((0, 1.0), (5, 0.5), (2, 0.04)), dict(support_recall=1, support_precision=1, support_exact=1,
                                           coefficient_error=0.04 / NORM0, head_recall=1, head_precision=1, n_found=2)),
    # nothing found
    ((), dict(support_recall=0, support_precision=0, support_exact=0, coefficient_error=1.0, head_recall=0,
              head_precision=0, n_found=0)),
])
def test_scores_of_hand_made_codes(entries, expected):
    score = score_recovery(code(*entries), hand_truth())
    for name, value in expected.items():
        assert float(getattr(score.per_target, name)[0]) == pytest.approx(value, abs=1e-6), name
    # Row 1 is always exact, and the aggregates are means over the two rows.
    assert float(score.per_target.coefficient_error[1]) == 0.0
    assert score.support_recall == pytest.approx((expected["support_recall"] + 1) / 2)
    assert score.support_precision == pytest.approx((expected["support_precision"] + 1) / 2)
    assert score.coefficient_error == pytest.approx(expected["coefficient_error"] / 2, abs=1e-6)
    assert score.head_precision == pytest.approx((expected["head_precision"] + 1) / 2)
    assert score.planted_l0_mean == 1.5 and score.l0_mean == (expected["n_found"] + 1) / 2


def test_threshold_is_relative_to_the_rows_largest_coefficient():
    codes = code((0, 1.0), (5, 0.5), (2, 0.04), row1=((9, 2.0), (1, 0.09)))
    assert score_recovery(codes, hand_truth()).support_precision == pytest.approx((1 + 1) / 2)  # 0.09 < 5 % of 2
    assert score_recovery(codes, hand_truth(), threshold=0.0).support_precision == pytest.approx((2 / 3 + 1 / 2) / 2)
    # A planted atom below the threshold is missed even when exact.
    assert score_recovery(code((0, 1.0), (5, 0.5)), hand_truth(), threshold=0.6).support_recall == pytest.approx(0.75)


def test_every_code_layout_scores_the_same(tiny_world):
    dense = tiny_world.truth.coefficients().clone()
    dense[:, 3] += 0.2  # an extra atom in head 0 of every row
    dense[0] *= 1.5
    as_dense = score_recovery(dense, tiny_world)
    as_sparse = score_recovery(Codes.from_dense(dense, layout="sparse"), tiny_world.truth)
    result = decompose(tiny_world.targets, tiny_world.dictionary, method="nnls")
    from_decomposition = score_recovery(result, tiny_world)
    assert as_sparse.to_dict() == as_dense.to_dict()
    assert as_dense.support_recall == 1.0 and as_dense.support_precision < 1.0
    assert from_decomposition.to_dict() == score_recovery(result.codes.to_dense(), tiny_world).to_dict()


def test_score_is_json_ready():
    data = score_recovery(code((0, 1.0)), hand_truth()).to_dict()
    assert "per_target" not in data and data["threshold"] == 0.05 and data["n_targets"] == 2
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert set(data) == {"threshold", "n_targets", "support_recall", "support_precision", "support_exact",
                         "coefficient_error", "coefficient_error_median", "coefficient_error_max", "head_recall",
                         "head_precision", "l0_mean", "planted_l0_mean"}


def test_scoring_bad_input_is_refused_by_name():
    truth = hand_truth()
    with pytest.raises(InputError, match=r"codes are 2 targets x 11 atoms but the truth is 2 targets x 12 atoms"):
        score_recovery(torch.zeros(2, 11), truth)
    with pytest.raises(InputError, match=r"threshold must be a number in \[0, 1\)"):
        score_recovery(code(), truth, threshold=1.5)
