"""The solver benchmark: planted problems keep their promises, baselines agree, and a tiny run writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.baselines import cvxpy_reference, sklearn_lasso_loop, sklearn_omp_gram
from benchmarks.planted import PlantedConfig, make_planted, mix_planted
from benchmarks.solvers import Benchmark, main, parse_args
from sparsedecomp.optimality import lasso_objective


@pytest.fixture(scope="module")
def problem():
    return make_planted(PlantedConfig.for_size("small", n_targets=200, seed=3), dtype=torch.float64)


def test_planted_dictionary_is_coherent_with_april_norms(problem):
    d = problem.dictionary
    assert d.is_block_diagonal and d.n_atoms == 8 * 256 and d.dim == 8 * 16
    torch.testing.assert_close(d.atoms.norm(dim=1), torch.ones(d.n_atoms, dtype=torch.float64))
    coherence = max(
        type(d).from_atoms(d.atoms[d.head_atoms(h)]).coherence() for h in range(d.n_heads)
    )
    assert 0.85 <= coherence < 0.999
    # Decoder norms: log-normal around 2 (April-2024 recipe), kept as the dictionary's scales.
    assert 1.9 <= float(d.scales.median()) <= 2.1
    assert float(d.scales.min()) > 1.0 and float(d.scales.max()) < 4.5
    raw_norms = torch.cat([b.norm(dim=1) for b in problem.blocks])
    torch.testing.assert_close(raw_norms, d.scales)


def test_planted_targets_are_unit_sparse_positive_mixes_over_several_heads(problem):
    valid = problem.support >= 0
    k = valid.sum(dim=1)
    assert int(k.min()) >= 4 and int(k.max()) <= 12
    assert bool((problem.weights[valid] > 0).all()) and bool((problem.weights[~valid] == 0).all())
    heads = problem.heads_used()
    assert int(heads.min()) >= 2 and int(heads.max()) <= 4 and len(set(heads.tolist())) == 3
    torch.testing.assert_close(problem.targets.norm(dim=1), torch.ones(problem.n_targets, dtype=torch.float64))
    # targets = planted code @ atoms + noise, with small noise.
    torch.testing.assert_close(problem.coefficients() @ problem.dictionary.atoms + problem.noise, problem.targets)
    assert float(problem.noise.norm(dim=1).max()) < 0.05
    # A support never repeats an atom.
    for row in problem.support[:50]:
        atoms = row[row >= 0].tolist()
        assert len(atoms) == len(set(atoms))


def test_planted_problems_are_reproducible_from_the_seed():
    a = make_planted(PlantedConfig.for_size("tiny", seed=5))
    b = make_planted(PlantedConfig.for_size("tiny", seed=5))
    c = make_planted(PlantedConfig.for_size("tiny", seed=6))
    assert torch.equal(a.targets, b.targets) and torch.equal(a.support, b.support)
    assert not torch.equal(a.targets, c.targets)


def test_mixed_problem_lifts_code_and_targets_through_W_O(problem):
    mixed = mix_planted(problem)
    assert mixed.W_O.shape == (8, 16, 128)
    assert not mixed.dictionary.is_block_diagonal and mixed.dictionary.space == "residual"
    torch.testing.assert_close(mixed.targets.norm(dim=1), torch.ones(problem.n_targets, dtype=torch.float64))
    # The planted code still explains the mixed targets up to the (mixed) noise.
    residual = (mixed.coefficients() @ mixed.dictionary.atoms - mixed.targets).norm(dim=1)
    assert float(residual.max()) < 0.1
    assert float(residual.max()) > 0  # the noise is mixed in too, not dropped


def test_sklearn_and_cvxpy_references_solve_the_same_lasso(problem):
    atoms = problem.dictionary.atoms.numpy()
    targets = problem.targets[:3].numpy()
    sk = sklearn_lasso_loop(atoms, targets, alpha=0.05, positive=True, tol=1e-10, max_iter=100000)
    cvx = cvxpy_reference(atoms, targets, kind="nn_lasso", alpha=0.05)
    y, D = torch.from_numpy(targets), torch.from_numpy(atoms)
    ours = lasso_objective(y, torch.from_numpy(sk.codes), D, 0.05)
    theirs = lasso_objective(y, torch.from_numpy(cvx.codes), D, 0.05)
    # The alpha / d scaling is right only if both references land on the same optimum.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert (sk.codes >= 0).all() and sk.extrapolate(30) == pytest.approx(sk.per_target * 30)


def test_sklearn_omp_gram_returns_the_budgeted_support(problem):
    b = sklearn_omp_gram(problem.dictionary.atoms.numpy(), problem.targets[:4].numpy(), n_nonzero=5)
    assert b.codes.shape == (4, problem.dictionary.n_atoms)
    assert ((b.codes != 0).sum(axis=1) == 5).all()


def test_tiny_benchmark_writes_json_and_markdown(tmp_path, capsys):
    report = main(["--size", "tiny", "--n-targets", "16", "--methods", "pinv", "omp", "--n-omp-ref", "8",
                   "--n-cvxpy", "2", "--checks", "b", "c", "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    printed = capsys.readouterr().out
    saved = json.loads(open(report["paths"]["json"]).read())
    md = open(report["paths"]["markdown"]).read()
    assert {"cpu_count", "torch", "torch_threads", "device_name", "commit"} <= set(saved["machine"])
    assert saved["arguments"]["seed"] == 0 and saved["planted"]["n_targets"] == 16
    assert saved["problem"]["coherence"] > 0.8
    rows = {r["method"]: r for r in saved["rows"]}
    assert set(rows) == {"pinv", "omp"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        for field in ("seconds", "ms_per_target", "objective_mean", "rel_error_mean", "l0_mean", "precision",
                      "recall", "statuses"):
            assert field in row
    assert rows["pinv"]["recall"] == pytest.approx(1.0)  # a dense code contains every planted atom
    assert 0 < rows["omp"]["l0_mean"] <= 16 + 1e-9  # the default OMP budget
    omp_ref = rows["omp"]["vs_reference"]
    assert omp_ref["reference"] == "sklearn orthogonal_mp_gram" and 0 <= omp_ref["identical_supports"] <= 1
    speed = rows["omp"]["speedups"]["sklearn orthogonal_mp_gram"]
    assert speed["extrapolated"] and speed["baseline_targets_timed"] == 8 and speed["ratio"] > 0
    assert {c["check"] for c in saved["checks"]} == {"b-omp", "b-nn_lasso", "c-omp", "c-nn_lasso"}
    assert all(c["status"] == "SKIP" for c in saved["checks"])  # tiny run: the acceptance sizes do not apply
    for text in (md, printed):
        assert "| method |" in text and "| omp | main |" in text and "## Acceptance checks" in text
        assert "**SKIP** (b-omp)" in text


def test_subprocess_worker_reports_its_own_peak_memory(tmp_path):
    bench = Benchmark(parse_args(["--size", "tiny", "--device", "cpu", "--quiet", "--out", str(tmp_path)]))
    out = bench.run_worker("pinv", {}, "cpu")
    assert "error" not in out, out
    assert out["n_targets"] == 48 and out["seconds"] > 0
    # A fresh Python process with torch imported holds tens of MB at least, and far less than 8 GB here.
    assert 20 * 2**20 < out["peak_bytes"] < 4 * 2**30
