"""Tests for batched OMP / non-negative OMP (sparsedecomp.solvers.omp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from sklearn.linear_model import orthogonal_mp_gram

from sparsedecomp.decomposition import KKT_VIOLATION, ConvergenceWarning, Status
from sparsedecomp.dictionary import BlockDictionary, Dictionary
from sparsedecomp.optimality import least_squares_objective, nonnegative_kkt_violation
from sparsedecomp.solvers import decompose, make_solver
from sparsedecomp.solvers.omp import OMP


def random_dictionary(n_atoms: int, d: int, seed: int, dtype=torch.float64) -> Dictionary:
    g = torch.Generator().manual_seed(seed)
    return Dictionary.from_atoms(torch.randn(n_atoms, d, generator=g, dtype=dtype), normalize=True)


def block_dictionary(n_heads: int, n_features: int, d_head: int, seed: int, dtype=torch.float64) -> BlockDictionary:
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(n_features, d_head, generator=g, dtype=dtype) for _ in range(n_heads)]
    return BlockDictionary.from_blocks(blocks, normalize=True)


def random_targets(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def sklearn_omp(atoms: torch.Tensor, targets: torch.Tensor, **kwargs) -> np.ndarray:
    A = atoms.double().numpy()
    Y = targets.double().numpy()
    coef = orthogonal_mp_gram(A @ A.T, A @ Y.T, **kwargs)
    return coef.reshape(A.shape[0], Y.shape[0]).T


def supports(coefficients) -> list[set[int]]:
    c = np.asarray(coefficients)
    return [set(np.flatnonzero(row).tolist()) for row in c]


# -- agreement with scikit-learn ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_nonzero", [1, 4, 12])
def test_omp_matches_sklearn_dense(n_nonzero):
    D = random_dictionary(80, 20, seed=0)
    Y = random_targets(9, 20, seed=1)
    dec = OMP(n_nonzero=n_nonzero).solve(Y, D)
    ref = sklearn_omp(D.atoms, Y, n_nonzero_coefs=n_nonzero)
    assert supports(dec.coefficients) == supports(ref)
    np.testing.assert_allclose(dec.coefficients.numpy(), ref, atol=1e-10)
    assert dec.statuses() == [Status.BUDGET_REACHED] * 9
    assert dec.iterations.tolist() == [n_nonzero] * 9


def test_omp_matches_sklearn_block_dictionary():
    D = block_dictionary(3, 30, 8, seed=2)
    Y = random_targets(10, 24, seed=3)
    dec = OMP(n_nonzero=7).solve(Y, D)
    ref = sklearn_omp(D.atoms, Y, n_nonzero_coefs=7)
    assert supports(dec.coefficients) == supports(ref)
    np.testing.assert_allclose(dec.coefficients.numpy(), ref, atol=1e-10)


def test_omp_matches_sklearn_with_tol():
    D = random_dictionary(60, 16, seed=4)
    Y = random_targets(8, 16, seed=5)
    tol = 0.05  # fraction of variance unexplained; scikit-learn's tol is the absolute squared residual
    dec = OMP(tol=tol).solve(Y, D)
    ref = np.stack([
        sklearn_omp(D.atoms, Y[i : i + 1], tol=tol * float(Y[i].pow(2).sum()), norms_squared=[float(Y[i].pow(2).sum())])[0]
        for i in range(Y.shape[0])
    ])
    assert supports(dec.coefficients) == supports(ref)
    np.testing.assert_allclose(dec.coefficients.numpy(), ref, atol=1e-10)
    assert dec.statuses() == [Status.CONVERGED] * 8


def test_mixed_dictionary_uses_normalised_correlations():
    """Residual-space atoms are not unit-norm: selection is by |r . d_j| / ||d_j||, i.e. scikit-learn on the
    normalised atoms, and coefficients refer to the original atoms."""
    g = torch.Generator().manual_seed(6)
    D = block_dictionary(2, 20, 6, seed=7)
    W_O = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    mixed = D.mix(W_O)
    Y = random_targets(7, 10, seed=8)
    dec = OMP(n_nonzero=5).solve(Y, mixed)
    norms = mixed.atoms.norm(dim=1)
    ref = sklearn_omp(mixed.atoms / norms[:, None], Y, n_nonzero_coefs=5) / norms.numpy()
    assert supports(dec.coefficients) == supports(ref)
    np.testing.assert_allclose(dec.coefficients.numpy(), ref, atol=1e-9)
    assert dec.solver == "omp"


# -- exactness -------------------------------------------------------------------------------------------------------
def test_full_budget_is_least_squares():
    D = random_dictionary(8, 20, seed=9)  # fewer atoms than dimensions: budget min(d, n_atoms) = 8
    Y = random_targets(5, 20, seed=10)
    dec = OMP(n_nonzero=8).solve(Y, D)
    lstsq = torch.linalg.lstsq(D.atoms.T, Y.T).solution.T
    torch.testing.assert_close(dec.coefficients, lstsq, atol=1e-10, rtol=1e-10)
    assert float(dec.certificate.max()) < 1e-12


def test_budget_d_reconstructs_exactly():
    D = random_dictionary(30, 10, seed=11)
    Y = random_targets(4, 10, seed=12)
    dec = OMP(n_nonzero=10).solve(Y, D)
    torch.testing.assert_close(dec.reconstruction, Y, atol=1e-10, rtol=0)
    assert ((dec.coefficients != 0).sum(dim=1) <= 10).all()


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("block", [False, True])
def test_planted_supports_are_recovered(nonnegative, block):
    D = block_dictionary(4, 24, 16, seed=13) if block else random_dictionary(96, 64, seed=13)
    g = torch.Generator().manual_seed(14)
    n, k = 20, 3
    true = torch.zeros(n, D.n_atoms, dtype=torch.float64)
    for i in range(n):
        idx = torch.randperm(D.n_atoms, generator=g)[:k]
        true[i, idx] = 1.0 + torch.rand(k, generator=g, dtype=torch.float64)
    Y = true @ D.atoms
    dec = OMP(n_nonzero=k, nonnegative=nonnegative).solve(Y, D)
    assert supports(dec.coefficients) == supports(true)
    torch.testing.assert_close(dec.coefficients, true, atol=1e-9, rtol=0)


# -- non-negative OMP ------------------------------------------------------------------------------------------------
def test_nn_omp_is_nonnegative_and_support_nnls_is_optimal():
    D = random_dictionary(70, 15, seed=15)
    Y = random_targets(12, 15, seed=16)
    dec = OMP(n_nonzero=9, nonnegative=True).solve(Y, D)
    assert dec.solver == "nn_omp"
    assert dec.certificate_kind == KKT_VIOLATION
    assert float(dec.coefficients.min()) >= 0
    assert float(dec.certificate.max()) < 1e-10
    A = D.atoms.numpy()
    for i in range(Y.shape[0]):
        S = np.flatnonzero(dec.coefficients[i].numpy())
        assert 1 <= len(S) <= 9
        # An NNLS solution on the chosen support is also the NNLS solution on its positive part.
        x, _ = nnls(A[S].T, Y[i].numpy())
        np.testing.assert_allclose(dec.coefficients[i, S].numpy(), x, atol=1e-10)
        kkt = nonnegative_kkt_violation(Y[i : i + 1], dec.coefficients[i : i + 1, S], D.atoms[S])
        assert float(kkt) < 1e-10


def test_nn_omp_stops_without_positive_correlation():
    atoms = torch.rand(12, 6, generator=torch.Generator().manual_seed(17), dtype=torch.float64) + 0.1
    D = Dictionary.from_atoms(atoms, normalize=True)
    Y = torch.stack([-torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)])
    dec = OMP(n_nonzero=4, nonnegative=True).solve(Y, D)
    assert dec.statuses()[0] == Status.NO_PROGRESS
    assert int(dec.iterations[0]) == 0
    assert float(dec.coefficients[0].abs().max()) == 0
    assert int(dec.iterations[1]) >= 1
    assert float(dec.coefficients[1].max()) > 0


def test_nn_omp_nnls_iteration_cap_is_reported():
    """With one least-squares solve per step, targets whose NNLS needs an atom to leave the active set stop
    with MAX_ITER (and one warning), keeping a feasible code; the others match the uncapped run."""
    D = random_dictionary(40, 10, seed=40)
    Y = random_targets(30, 10, seed=41)
    full = OMP(n_nonzero=10, nonnegative=True).solve(Y, D)
    assert not (full.status == Status.MAX_ITER).any()
    with pytest.warns(ConvergenceWarning, match="nn_omp"):
        capped = OMP(n_nonzero=10, nonnegative=True, nnls_max_iter=1).solve(Y, D)
    hit = capped.status == Status.MAX_ITER
    assert hit.any() and not hit.all()
    assert float(capped.coefficients.min()) >= 0
    same = ~hit
    torch.testing.assert_close(capped.coefficients[same], full.coefficients[same], atol=1e-12, rtol=0)


def test_nn_omp_differs_from_omp_when_signs_matter():
    D = random_dictionary(40, 12, seed=18)
    Y = random_targets(6, 12, seed=19)
    plain = OMP(n_nonzero=5).solve(Y, D)
    nonneg = OMP(n_nonzero=5, nonnegative=True).solve(Y, D)
    assert float(plain.coefficients.min()) < 0
    assert float(nonneg.coefficients.min()) >= 0


# -- stopping rules and statuses -------------------------------------------------------------------------------------
def test_tol_stopping_and_statuses():
    D = random_dictionary(100, 24, seed=20)
    Y = random_targets(16, 24, seed=21)
    tol = 0.2
    dec = OMP(tol=tol, n_nonzero=5).solve(Y, D)
    fvu = (Y - dec.reconstruction).pow(2).sum(1) / Y.pow(2).sum(1)
    status = dec.status
    converged = status == Status.CONVERGED
    budget = status == Status.BUDGET_REACHED
    assert bool((converged | budget).all())
    assert converged.any() and budget.any()
    assert bool((fvu[converged] <= tol).all())
    assert bool((fvu[budget] > tol).all())
    assert bool((dec.iterations[budget] == 5).all())
    # Greedy stopping: with one atom fewer the same targets had not met tol yet.
    for i in converged.nonzero().squeeze(1).tolist():
        k = int(dec.iterations[i])
        assert k >= 1
        if k > 1:
            prev = OMP(n_nonzero=k - 1).solve(Y[i : i + 1], D)
            assert float((Y[i] - prev.reconstruction[0]).pow(2).sum() / Y[i].pow(2).sum()) > tol


def test_tol_of_one_gives_zero_code():
    D = random_dictionary(20, 8, seed=22)
    Y = random_targets(3, 8, seed=23)
    dec = OMP(tol=1.0).solve(Y, D)
    assert float(dec.coefficients.abs().max()) == 0
    assert dec.statuses() == [Status.CONVERGED] * 3


def test_zero_target_gives_zero_code():
    D = random_dictionary(20, 8, seed=24)
    Y = random_targets(3, 8, seed=25)
    Y[1] = 0
    for nonnegative in (False, True):
        dec = OMP(n_nonzero=3, nonnegative=nonnegative).solve(Y, D)
        assert float(dec.coefficients[1].abs().max()) == 0
        assert dec.statuses()[1] == Status.CONVERGED
        assert float(dec.objective[1]) == 0
        assert float(dec.certificate[1]) == 0
        assert int((dec.coefficients[0] != 0).sum()) == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tol", [None, 0.0])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_exact_fit_before_the_budget_is_converged(nonnegative, tol, dtype):
    """Targets that are exactly 3-atom combinations, budget 8: the residual is zero to working precision after 3
    steps, which is CONVERGED (Status: "the certificate met the tolerance, or ... exact"), with or without tol --
    not NO_PROGRESS, which would read as "stuck short of the answer"."""
    D = random_dictionary(96, 64, seed=31, dtype=dtype)  # incoherent enough that OMP finds the 3 atoms
    g = torch.Generator().manual_seed(32)
    true = torch.zeros(6, 96, dtype=dtype)
    for i in range(6):
        true[i, torch.randperm(96, generator=g)[:3]] = 0.5 + torch.rand(3, generator=g, dtype=dtype)
    Y = true @ D.atoms
    dec = OMP(n_nonzero=8, tol=tol, nonnegative=nonnegative).solve(Y, D)
    assert dec.statuses() == [Status.CONVERGED] * 6
    assert dec.iterations.tolist() == [3] * 6
    fvu = least_squares_objective(Y.double(), dec.coefficients.double(), D.atoms.double()) * 2 / Y.double().pow(2).sum(1)
    assert float(fvu.max()) <= (100 * torch.finfo(dtype).eps) ** 2


def test_residual_left_outside_the_span_is_still_no_progress():
    """The other side of the exact-fit rule: 6 atoms spanning 3 of 5 dimensions leave a residual no atom
    correlates with; it is not zero, so the fit is not exact and the status stays NO_PROGRESS."""
    g = torch.Generator().manual_seed(33)
    atoms = torch.randn(6, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 5, generator=g, dtype=torch.float64)
    D = Dictionary.from_atoms(atoms, normalize=True)
    Y = torch.randn(2, 5, generator=g, dtype=torch.float64)
    dec = OMP(n_nonzero=5).solve(Y, D)
    assert dec.statuses() == [Status.NO_PROGRESS] * 2
    assert dec.iterations.tolist() == [3, 3]


def test_near_dependent_atom_stops_with_no_progress():
    e = torch.eye(3, dtype=torch.float64)
    a = e[0] + 1e-9 * e[2]
    atoms = torch.stack([e[0], e[1], a / a.norm()])
    D = Dictionary.from_atoms(atoms)
    Y = (2 * e[0] + e[1] + 1e-3 * e[2])[None]
    dec = OMP(n_nonzero=3).solve(Y, D)
    assert dec.statuses() == [Status.NO_PROGRESS]
    assert int(dec.iterations[0]) == 2
    assert bool(torch.isfinite(dec.coefficients).all())
    assert int((dec.coefficients[0] != 0).sum()) == 2


def test_objective_and_certificate_are_consistent():
    D = block_dictionary(3, 16, 6, seed=26)
    Y = random_targets(8, 18, seed=27)
    for nonnegative in (False, True):
        dec = OMP(n_nonzero=5, nonnegative=nonnegative).solve(Y, D)
        torch.testing.assert_close(dec.objective, least_squares_objective(Y, dec.coefficients, D.atoms))
        assert float(dec.certificate.max()) < 1e-12
        # The certificate is the normal-equation residual on the support, relative to ||y|| * max ||d_j||.
        for i in range(Y.shape[0]):
            S = dec.coefficients[i].nonzero().squeeze(1)
            g = (Y[i] - dec.reconstruction[i]) @ D.atoms[S].T
            assert float(g.abs().max() / Y[i].norm()) < 1e-12


# -- contract: dtype, batching, chunking, determinism ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_dtype_is_kept(dtype, nonnegative):
    D = block_dictionary(2, 20, 8, seed=28, dtype=torch.float64)
    Y = random_targets(5, 16, seed=29)
    dec = OMP(n_nonzero=4, nonnegative=nonnegative).solve(Y.to(dtype), D.to(dtype=dtype))
    for t in (dec.coefficients, dec.reconstruction, dec.objective, dec.certificate):
        assert t.dtype == dtype
    if dtype == torch.float32:
        ref = OMP(n_nonzero=4, nonnegative=nonnegative).solve(Y, D)
        assert supports(dec.coefficients) == supports(ref.coefficients)
        torch.testing.assert_close(dec.coefficients.double(), ref.coefficients, atol=1e-4, rtol=1e-4)
        assert float(dec.certificate.max()) < 1e-5


@pytest.mark.parametrize("nonnegative", [False, True])
def test_batch_equals_per_row_and_chunks(nonnegative):
    D = block_dictionary(3, 25, 8, seed=30)
    Y = random_targets(11, 24, seed=31)
    Y[4] = 0
    solver = OMP(n_nonzero=6, tol=0.1, nonnegative=nonnegative)
    whole = solver.solve(Y, D)
    chunked = OMP(n_nonzero=6, tol=0.1, nonnegative=nonnegative, chunk_size=4).solve(Y, D)
    for i in range(Y.shape[0]):
        row = solver.solve(Y[i : i + 1], D)
        torch.testing.assert_close(row.coefficients[0], whole.coefficients[i], atol=1e-12, rtol=0)
        assert int(row.status[0]) == int(whole.status[i])
        assert int(row.iterations[0]) == int(whole.iterations[i])
    torch.testing.assert_close(chunked.coefficients, whole.coefficients, atol=1e-12, rtol=0)
    assert torch.equal(chunked.status, whole.status)


def test_inputs_not_mutated_and_deterministic():
    D = random_dictionary(30, 10, seed=32)
    Y = random_targets(4, 10, seed=33)
    atoms_before, targets_before = D.atoms.clone(), Y.clone()
    first = OMP(n_nonzero=4).solve(Y, D)
    second = OMP(n_nonzero=4).solve(Y, D)
    assert torch.equal(D.atoms, atoms_before) and torch.equal(Y, targets_before)
    assert torch.equal(first.coefficients, second.coefficients)


def test_registry_builds_both_variants():
    D = random_dictionary(30, 10, seed=34)
    Y = random_targets(3, 10, seed=35)
    assert make_solver("omp", n_nonzero=2).name == "omp"
    assert make_solver("nn_omp", n_nonzero=2).name == "nn_omp"
    dec = decompose(Y, D, method="nn_omp", n_nonzero=3)
    assert dec.solver == "nn_omp" and dec.params["nonnegative"] is True and dec.params["n_nonzero"] == 3
    assert float(dec.coefficients.min()) >= 0


# -- parameter validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "n_nonzero"),
        ({"n_nonzero": 0}, ValueError, "n_nonzero"),
        ({"n_nonzero": 2.5}, TypeError, "n_nonzero"),
        ({"n_nonzero": True}, TypeError, "n_nonzero"),
        ({"tol": -0.1}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"tol": "0.1"}, TypeError, "tol"),
        ({"n_nonzero": 2, "nonnegative": 1}, TypeError, "nonnegative"),
        ({"n_nonzero": 2, "nnls_max_iter": 0}, ValueError, "nnls_max_iter"),
        ({"n_nonzero": 2, "chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_bad_parameters_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        OMP(**kwargs)


def test_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        OMP(2048, 3)  # type: ignore[misc]  (only chunk_size, inherited, is positional)


def test_budget_above_rank_limit_raises():
    D = random_dictionary(30, 10, seed=36)
    Y = random_targets(2, 10, seed=37)
    with pytest.raises(ValueError, match="n_nonzero=11"):
        OMP(n_nonzero=11).solve(Y, D)
    small = random_dictionary(5, 10, seed=38)
    with pytest.raises(ValueError, match="n_nonzero"):
        OMP(n_nonzero=6).solve(Y, small)


def test_bad_targets_raise():
    D = random_dictionary(30, 10, seed=39)
    with pytest.raises(ValueError, match="columns"):
        OMP(n_nonzero=2).solve(torch.randn(3, 9, dtype=torch.float64), D)
    with pytest.raises(ValueError, match="float32"):
        OMP(n_nonzero=2).solve(torch.randn(3, 10, dtype=torch.float32), D)
