"""Planted worlds: the truth they claim holds, they survive a round trip through the package's loaders, a real solver
recovers a well-separated world exactly, and recovery scores give the known answers on hand-made codes."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from sparsedecomp import Codes, decompose
from sparsedecomp.demo import planted as planted_module
from sparsedecomp.demo.planted import (
    MixedProblem,
    PlantedConfig,
    PlantedTruth,
    PlantedWorld,
    build_planted_world,
    load_planted_world,
    make_planted,
    score_recovery,
    write_planted_world,
)
from sparsedecomp.errors import InputError
from sparsedecomp.loading import CONCATENATED, check_compatible, load_sae
from sparsedecomp.outputs import read_manifest

# A world a solver must solve exactly: at most as many atoms per head as dimensions, spread far from the cluster
# centres (nearly independent directions), weights within a factor of about two, and no noise.
SEPARATED = PlantedConfig(n_heads=4, n_features=6, d_head=16, n_targets=40, min_atoms=2, max_atoms=5, min_heads=1,
                          max_heads=3, cluster_size=1, spread=(2.0, 3.0), weight_sigma=0.2, noise=0.0, seed=0)


@pytest.fixture(scope="module")
def tiny_world() -> PlantedWorld:
    return build_planted_world("tiny", seed=4)


@pytest.fixture(scope="module")
def written(tiny_world, tmp_path_factory):
    return write_planted_world(tiny_world, tmp_path_factory.mktemp("planted") / "world")


# -- what is planted -------------------------------------------------------------------------------------------------
def test_world_saes_are_the_planted_atoms_and_targets(tiny_world):
    c = tiny_world.config
    assert (c.n_heads, c.n_features, c.d_head, c.n_targets) == (8, 64, 8, 48) and c.seed == 4
    assert tiny_world.head_saes.heads == tuple(range(8))
    for h, sae in tiny_world.head_saes.items():
        assert (sae.head, sae.layer, sae.hook_name) == (h, 1, "blocks.1.attn.hook_z")
        assert (sae.d_in, sae.d_sae) == (8, 64)
        # The encoder is the decoder's pseudo-transpose: a lone feature f * d_i reads back f on feature i.
        torch.testing.assert_close((sae.W_dec @ sae.W_enc).diagonal(), torch.ones(64))
        torch.testing.assert_close(sae.encode(2.5 * sae.W_dec[7])[7], torch.tensor(2.5))
    concat = tiny_world.concat_sae
    assert (concat.head, concat.d_in, concat.d_sae, concat.hook_name) == (CONCATENATED, 64, 48, "blocks.1.attn.hook_z")
    torch.testing.assert_close(concat.W_dec.norm(dim=1), torch.ones(48))
    assert check_compatible(concat, tiny_world.head_saes) == (8, 8)
    # targets = planted code on the unit atoms + the noise part, to float32 rounding.
    truth, dictionary = tiny_world.truth, tiny_world.dictionary
    torch.testing.assert_close(truth.coefficients() @ dictionary.atoms + truth.noise, tiny_world.targets,
                               atol=2e-6, rtol=0)
    noise = truth.noise.norm(dim=1) / (tiny_world.targets - truth.noise).norm(dim=1)
    assert 0.002 < float(noise.mean()) < 0.02  # config.noise = 0.01 relative to the clean part
    assert torch.equal(truth.atom_head, dictionary.head)
    valid = truth.support >= 0
    assert bool((truth.weights[valid] > 0).all()) and int(valid.sum(dim=1).min()) >= 4
    # In each head SAE's own units the planted coefficient is weight / decoder norm.
    feature = truth.feature_weights(dictionary.scales)
    slot = valid.nonzero()[0]
    atom = int(truth.support[slot[0], slot[1]])
    expected = truth.weights[slot[0], slot[1]] / tiny_world.head_saes[atom // 64].W_dec[atom % 64].norm()
    torch.testing.assert_close(feature[slot[0], slot[1]], expected)


def test_world_is_the_benchmarks_planted_problem(tiny_world):
    problem = make_planted(tiny_world.config)
    assert torch.equal(problem.targets, tiny_world.targets)
    assert torch.equal(problem.support, tiny_world.truth.support)
    assert torch.equal(problem.weights, tiny_world.truth.weights)
    for block, sae in zip(problem.blocks, tiny_world.head_saes):
        assert torch.equal(block, sae.W_dec)
    torch.testing.assert_close(tiny_world.dictionary.atoms, problem.dictionary.atoms)
    # The benchmarks' module is a re-export of the package's, not a copy.
    import benchmarks.planted

    assert benchmarks.planted.make_planted is make_planted and benchmarks.planted.PlantedConfig is PlantedConfig


def test_build_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b = build_planted_world("tiny", seed=11), build_planted_world(PlantedConfig.for_size("tiny", seed=11))
    c = build_planted_world("tiny", seed=12)
    for x, y in [(a.concat_sae.W_dec, b.concat_sae.W_dec), (a.truth.weights, b.truth.weights),
                 (a.truth.noise, b.truth.noise), *((s.W_dec, t.W_dec) for s, t in zip(a.head_saes, b.head_saes)),
                 *((s.W_enc, t.W_enc) for s, t in zip(a.head_saes, b.head_saes))]:
        assert torch.equal(x, y)
    assert torch.equal(a.truth.support, b.truth.support)
    assert not torch.equal(a.truth.support, c.truth.support)
    assert not torch.allclose(a.head_saes[0].W_dec, c.head_saes[0].W_dec)
    assert not torch.allclose(a.concat_sae.W_dec, c.concat_sae.W_dec)


def test_mixed_world_keeps_the_planted_code():
    world = build_planted_world(replace(SEPARATED, noise=0.0), dtype=torch.float64)
    mixed = world.mixed(d_model=48)
    assert isinstance(mixed, MixedProblem) and mixed.dictionary.dim == 48
    torch.testing.assert_close(mixed.coefficients() @ mixed.dictionary.atoms, mixed.targets)
    score = score_recovery(mixed.coefficients(), mixed)
    assert (score.support_recall, score.support_precision, score.coefficient_error) == (1.0, 1.0, 0.0)


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


# -- on disk ---------------------------------------------------------------------------------------------------------
def test_written_world_loads_back_with_identical_weights(tiny_world, written):
    loaded = load_planted_world(written)
    assert loaded.config == tiny_world.config and loaded.layer == 1
    for h in range(8):
        for name in ("W_dec", "W_enc", "b_enc", "b_dec"):
            assert torch.equal(getattr(loaded.head_saes[h], name), getattr(tiny_world.head_saes[h], name))
        assert loaded.head_saes[h].head == h and loaded.head_saes[h].provenance["format"] == "saelens6"
    assert torch.equal(loaded.concat_sae.W_dec, tiny_world.concat_sae.W_dec)
    assert torch.equal(loaded.concat_sae.W_enc, tiny_world.concat_sae.W_enc)
    assert loaded.concat_sae.head == CONCATENATED
    for name in ("support", "weights", "noise", "atom_head"):
        assert torch.equal(getattr(loaded.truth, name), getattr(tiny_world.truth, name))
    assert torch.equal(loaded.dictionary.atoms, tiny_world.dictionary.atoms)
    # The folders are what the jobs read: the package loader picks SAELens 6 for both kinds.
    assert torch.equal(load_sae(written / "concat").W_dec, tiny_world.concat_sae.W_dec)
    manifest = read_manifest(written)
    assert manifest["command"] == "planted-world" and manifest["complete"] is True
    assert {"planted.json", "truth.safetensors", "concat/cfg.json", "heads/head_7/sae_weights.safetensors"} <= set(
        manifest["files"])
    meta = json.loads((written / "planted.json").read_text())
    assert meta["config"]["seed"] == 4 and meta["heads"]["3"] == "heads/head_3"


def test_sae_lens_reads_a_written_head_folder(tiny_world, written):
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(written / "heads" / "head_2"))
    assert lens.cfg.metadata.hook_name == "blocks.1.attn.hook_z" and lens.cfg.metadata.hook_head_index == 2
    assert torch.equal(lens.W_dec.detach(), tiny_world.head_saes[2].W_dec)
    z = tiny_world.head_saes[2].W_dec[:5] * 1.5
    torch.testing.assert_close(lens.encode(z).detach(), tiny_world.head_saes[2].encode(z))


def test_rewriting_a_world_folder_replaces_it(tmp_path):
    out = tmp_path / "w"
    write_planted_world(build_planted_world("tiny", seed=1), out)
    write_planted_world(build_planted_world("tiny", seed=2), out)
    loaded = load_planted_world(out)
    assert loaded.config.seed == 2
    assert torch.equal(loaded.concat_sae.W_dec, build_planted_world("tiny", seed=2).concat_sae.W_dec)


def test_command_line_builds_and_writes_a_world(tmp_path, capsys):
    assert planted_module.main(["--out", str(tmp_path / "cli"), "--size", "tiny", "--seed", "3"]) == 0
    assert "built in" in capsys.readouterr().out
    loaded = load_planted_world(tmp_path / "cli")
    assert loaded.config == PlantedConfig.for_size("tiny", seed=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert planted_module.main(["--out", str(tmp_path / "foreign"), "--size", "tiny"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


# -- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"n_heads": 0}, r"n_heads must be a positive int, got 0"),
    ({"min_atoms": 6, "max_atoms": 5}, r"min_atoms \(6\) must not exceed max_atoms \(5\)"),
    ({"min_heads": 3, "max_heads": 2}, r"min_heads \(3\) must not exceed max_heads \(2\)"),
    ({"max_atoms": 100}, r"max_atoms \(100\) exceeds n_features \(64\)"),
    ({"noise": -0.1}, r"must be non-negative"),
    ({"spread": (1.0, 0.5)}, r"spread must be a pair"),
    ({"seed": -1}, r"seed must be a non-negative int"),
])
def test_bad_configs_are_refused_by_name(overrides, message):
    with pytest.raises(InputError, match=message):
        PlantedConfig.for_size("tiny", **overrides)


def test_bad_build_arguments_are_refused():
    with pytest.raises(InputError, match=r"unknown size 'huge'"):
        build_planted_world("huge")
    with pytest.raises(InputError, match=r"layer must be a non-negative int"):
        build_planted_world("tiny", layer=-1)


def test_an_inconsistent_world_is_refused(tiny_world):
    with pytest.raises(InputError, match=r"not a consistent planted world: .*expected d_in=16, d_sae=256"):
        replace(tiny_world, config=PlantedConfig.for_size("small", seed=4))
    with pytest.raises(InputError, match=r"reads layer 1, expected 2"):
        replace(tiny_world, layer=2)


def test_writing_into_someone_elses_folder_is_refused(tiny_world, tmp_path):
    (tmp_path / "theirs.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"is not empty and holds no manifest.json"):
        write_planted_world(tiny_world, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.txt"]


def test_loading_a_folder_that_is_not_a_planted_world_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"is not a planted world \(it holds no manifest.json\)"):
        load_planted_world(tmp_path)
    with pytest.raises(InputError, match=r"is not a folder"):
        load_planted_world(tmp_path / "missing")


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
    with pytest.raises(InputError, match=r"names an atom twice"):
        PlantedTruth(support=torch.tensor([[1, 1]]), weights=torch.ones(1, 2), noise=torch.zeros(1, 4),
                     atom_head=torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"needs at least one atom; rows \[1\]"):
        PlantedTruth(support=torch.tensor([[1], [-1]]), weights=torch.tensor([[1.0], [0.0]]), noise=torch.zeros(2, 4),
                     atom_head=torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"atoms 0\.\.3"):
        PlantedTruth(support=torch.tensor([[4]]), weights=torch.ones(1, 1), noise=torch.zeros(1, 4),
                     atom_head=torch.zeros(4, dtype=torch.long))
