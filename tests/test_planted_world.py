"""Planted worlds: the truth they claim holds, they survive a round trip through the package's loaders, the command
line writes one, and bad configurations, worlds, truths and folders are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sparsedecomp.demo import planted_world as planted_world_module
from sparsedecomp.demo.planted import MixedProblem, PlantedConfig, make_planted
from sparsedecomp.demo.planted_world import (
    PlantedTruth,
    PlantedWorld,
    build_planted_world,
    load_planted_world,
    write_planted_world,
)
from sparsedecomp.demo.recovery import score_recovery
from sparsedecomp.errors import InputError
from sparsedecomp.loading import CONCATENATED, check_compatible, load_sae
from sparsedecomp.outputs import read_manifest

# A well-separated, noiseless world (as in test_planted_recovery.py): at most as many atoms per head as dimensions.
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
    assert planted_world_module.main(["--out", str(tmp_path / "cli"), "--size", "tiny", "--seed", "3"]) == 0
    assert "built in" in capsys.readouterr().out
    loaded = load_planted_world(tmp_path / "cli")
    assert loaded.config == PlantedConfig.for_size("tiny", seed=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert planted_world_module.main(["--out", str(tmp_path / "foreign"), "--size", "tiny"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"

def test_the_old_command_name_still_writes_a_world(tmp_path):
    # python -m sparsedecomp.demo.planted (the generator's module) hands over to planted_world's command line.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "sparsedecomp.demo.planted", "--out",
                           str(tmp_path / "old"), "--size", "tiny", "--seed", "2"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "built in" in done.stdout and "Warning" not in done.stderr
    assert load_planted_world(tmp_path / "old").config == PlantedConfig.for_size("tiny", seed=2)


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


def test_bad_truths_are_refused_by_name():
    with pytest.raises(InputError, match=r"names an atom twice"):
        PlantedTruth(support=torch.tensor([[1, 1]]), weights=torch.ones(1, 2), noise=torch.zeros(1, 4),
                     atom_head=torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"needs at least one atom; rows \[1\]"):
        PlantedTruth(support=torch.tensor([[1], [-1]]), weights=torch.tensor([[1.0], [0.0]]), noise=torch.zeros(2, 4),
                     atom_head=torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"atoms 0\.\.3"):
        PlantedTruth(support=torch.tensor([[4]]), weights=torch.ones(1, 1), noise=torch.zeros(1, 4),
                     atom_head=torch.zeros(4, dtype=torch.long))
