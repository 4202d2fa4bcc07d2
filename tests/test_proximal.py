"""Lasso, non-negative lasso and NNLS: agreement with scikit-learn, cvxpy/Clarabel and scipy, certificates,
exactness of the per-head split, and the solver contract (dtype, status, warnings, validation)."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls
from sklearn.linear_model import Lasso as SkLasso

from sparsedecomp.decomposition import ConvergenceWarning, Status
from sparsedecomp.dictionary import BlockDictionary, Dictionary
from sparsedecomp.optimality import alpha_max, lasso_duality_gap, lasso_objective, nonnegative_kkt_violation
from sparsedecomp.solvers import NNLS, Lasso, decompose, make_solver

N_HEADS, N_FEATURES, D_HEAD = 3, 24, 6


def correlated_blocks(seed: int, dtype=torch.float64, n_heads=N_HEADS, n_features=N_FEATURES, d_head=D_HEAD):
    """Per-head decoders whose atoms cluster around a few centres (coherent, like SAE decoders)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(n_heads):
        centres = torch.randn(4, d_head, generator=g, dtype=torch.float64)
        assign = torch.randint(0, 4, (n_features,), generator=g)
        atoms = centres[assign] + 0.6 * torch.randn(n_features, d_head, generator=g, dtype=torch.float64)
        blocks.append((atoms * 2.0).to(dtype))
    return blocks


def planted_targets(dictionary: Dictionary, n: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """Unit-norm sparse non-negative mixes of a few atoms plus noise."""
    g = torch.Generator().manual_seed(seed)
    code = torch.zeros(n, dictionary.n_atoms, dtype=torch.float64)
    for i in range(n):
        idx = torch.randperm(dictionary.n_atoms, generator=g)[:4]
        code[i, idx] = torch.rand(4, generator=g, dtype=torch.float64) + 0.2
    y = code @ dictionary.atoms.double() + noise * torch.randn(n, dictionary.dim, generator=g, dtype=torch.float64)
    return (y / y.norm(dim=1, keepdim=True)).to(dictionary.dtype)


@pytest.fixture(scope="module")
def block_problem():
    dictionary = BlockDictionary.from_blocks(correlated_blocks(0), normalize=True)
    return dictionary, planted_targets(dictionary, 8, seed=1)


def sklearn_lasso(y: torch.Tensor, atoms: torch.Tensor, alpha: float, positive: bool) -> torch.Tensor:
    """scikit-learn minimises (1/(2d))||y - X w||^2 + a||w||_1 with X = D^T, so a = alpha / d."""
    d = atoms.shape[1]
    rows = []
    for target in y.double().numpy():
        model = SkLasso(alpha=alpha / d, positive=positive, fit_intercept=False, tol=1e-12, max_iter=1_000_000)
        model.fit(atoms.double().T.numpy(), target)
        rows.append(torch.from_numpy(model.coef_.copy()))
    return torch.stack(rows)


def cvxpy_lasso_objective(y: torch.Tensor, atoms: torch.Tensor, alpha: float, nonnegative: bool) -> torch.Tensor:
    D = atoms.double().numpy()
    values = []
    for target in y.double().numpy():
        c = cp.Variable(D.shape[0], nonneg=nonnegative)
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(target - D.T @ c) + alpha * cp.norm1(c)))
        problem.solve(solver=cp.CLARABEL)
        assert problem.status == cp.OPTIMAL
        values.append(problem.value)
    return torch.tensor(values, dtype=torch.float64)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs() / b.double().abs()


@pytest.mark.parametrize("nonnegative", [True, False])
def test_lasso_matches_sklearn_and_cvxpy_on_block_dictionary(block_problem, nonnegative):
    dictionary, y = block_problem
    alpha = 0.1 * float(alpha_max(y, dictionary.atoms, nonnegative=nonnegative).median())
    result = decompose(y, dictionary, method="nn_lasso" if nonnegative else "lasso", alpha=alpha, tol=1e-10)

    reference = sklearn_lasso(y, dictionary.atoms, alpha, positive=nonnegative)
    sk_objective = lasso_objective(y, reference, dictionary.atoms, alpha)
    ours = lasso_objective(y, result.coefficients, dictionary.atoms, alpha)
    torch.testing.assert_close(result.objective, ours)
    assert float(relative_difference(ours, sk_objective).max()) < 1e-6
    # Never worse than scikit-learn beyond rounding.
    assert bool((ours <= sk_objective * (1 + 1e-9)).all())

    clarabel = cvxpy_lasso_objective(y, dictionary.atoms, alpha, nonnegative)
    assert float(relative_difference(ours, clarabel).max()) < 1e-6

    gap = lasso_duality_gap(y, result.coefficients, dictionary.atoms, alpha, nonnegative=nonnegative)
    assert float(gap.max()) <= 1e-10
    assert bool((result.status == Status.CONVERGED).all())
    assert result.solver == ("nn_lasso" if nonnegative else "lasso")
    assert result.certificate_kind == "relative_duality_gap"
    if nonnegative:
        assert float(result.coefficients.min()) >= 0
    else:
        assert bool((result.coefficients < 0).any()), "the plain lasso should use some negative weights here"


@pytest.mark.parametrize("nonnegative", [True, False])
def test_coefficients_match_sklearn_when_solution_is_unique(nonnegative):
    # Fewer atoms than dimensions and generic atoms: the lasso solution is unique.
    g = torch.Generator().manual_seed(3)
    dictionary = Dictionary.from_atoms(torch.randn(10, 16, generator=g, dtype=torch.float64), normalize=True)
    y = planted_targets(dictionary, 6, seed=4, noise=0.2)
    alpha = 0.05 * float(alpha_max(y, dictionary.atoms, nonnegative=nonnegative).median())
    result = Lasso(alpha=alpha, nonnegative=nonnegative, tol=1e-12).solve(y, dictionary)
    reference = sklearn_lasso(y, dictionary.atoms, alpha, positive=nonnegative)
    torch.testing.assert_close(result.coefficients, reference, atol=1e-6, rtol=1e-5)


def test_nnls_matches_scipy_objective(block_problem):
    dictionary, y = block_problem
    result = decompose(y, dictionary, method="nnls", tol=1e-9)
    expected = torch.tensor(
        [0.5 * scipy_nnls(dictionary.atoms.T.numpy(), t, maxiter=10_000)[1] ** 2 for t in y.numpy()],
        dtype=torch.float64,
    )
    # NNLS optima are not unique here (72 atoms in 18 dimensions); the objective is. Objectives are ~0 when
    # the target lies in the cone of the atoms, so compare on the scale of 0.5 ||y||^2 = 0.5.
    assert float((result.objective - expected).abs().max()) < 1e-8
    kkt = nonnegative_kkt_violation(y, result.coefficients, dictionary.atoms)
    assert float(kkt.max()) <= 1e-9
    torch.testing.assert_close(result.certificate, kkt, atol=1e-12, rtol=1e-6)
    assert float(result.coefficients.min()) >= 0
    assert result.certificate_kind == "relative_kkt_violation"
    assert result.solver == "nnls"


def test_nnls_on_a_cone_that_excludes_the_target():
    # With few atoms the target is outside their cone: a positive residual and a sparse answer.
    g = torch.Generator().manual_seed(5)
    atoms = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = torch.randn(4, 12, generator=g, dtype=torch.float64)
    result = NNLS(tol=1e-10).solve(y, Dictionary.from_atoms(atoms))
    for i, t in enumerate(y.numpy()):
        x, rnorm = scipy_nnls(atoms.T.numpy(), t)
        assert abs(float(result.objective[i]) - 0.5 * rnorm**2) < 1e-9 * max(1.0, 0.5 * rnorm**2)
        torch.testing.assert_close(result.coefficients[i], torch.from_numpy(x), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("method", ["lasso", "nn_lasso"])
def test_block_split_is_exact(block_problem, method):
    dictionary, y = block_problem
    nonnegative = method == "nn_lasso"
    alpha = 0.05 * float(alpha_max(y, dictionary.atoms, nonnegative=nonnegative).median())
    blocked = decompose(y, dictionary, method=method, alpha=alpha, tol=1e-12)
    dense = decompose(y, Dictionary.from_atoms(dictionary.atoms), method=method, alpha=alpha, tol=1e-12)
    assert float(relative_difference(blocked.objective, dense.objective).max()) < 1e-9
    # A solution in z space never uses an atom of one head to fit another head's columns.
    torch.testing.assert_close(blocked.reconstruction, dense.reconstruction, atol=1e-6, rtol=0)


def test_nnls_block_split_is_exact(block_problem):
    dictionary, y = block_problem
    blocked = decompose(y, dictionary, method="nnls", tol=1e-10)
    dense = decompose(y, Dictionary.from_atoms(dictionary.atoms), method="nnls", tol=1e-10)
    assert float((blocked.objective - dense.objective).abs().max()) < 1e-9


@pytest.mark.parametrize("nonnegative", [True, False])
def test_w_o_mixed_dictionary(block_problem, nonnegative):
    dictionary, y = block_problem
    g = torch.Generator().manual_seed(7)
    W_O = torch.randn(N_HEADS, D_HEAD, 2 * D_HEAD, generator=g, dtype=torch.float64) / np.sqrt(2 * D_HEAD)
    mixed = dictionary.mix(W_O)
    targets = y @ W_O.reshape(N_HEADS * D_HEAD, -1)
    alpha = 0.1 * float(alpha_max(targets, mixed.atoms, nonnegative=nonnegative).median())
    result = Lasso(alpha=alpha, nonnegative=nonnegative, tol=1e-10).solve(targets, mixed)
    clarabel = cvxpy_lasso_objective(targets, mixed.atoms, alpha, nonnegative)
    assert float(relative_difference(result.objective, clarabel).max()) < 1e-6
    gap = lasso_duality_gap(targets, result.coefficients, mixed.atoms, alpha, nonnegative=nonnegative)
    assert float(gap.max()) <= 1e-10


@pytest.mark.parametrize("method", ["lasso", "nn_lasso"])
def test_alpha_at_or_above_alpha_max_gives_zero_code(block_problem, method):
    dictionary, y = block_problem
    top = alpha_max(y, dictionary.atoms, nonnegative=method == "nn_lasso")
    result = decompose(y, dictionary, method=method, alpha=float(top.max()))
    assert bool((result.coefficients == 0).all())
    assert bool((result.status == Status.CONVERGED).all())
    torch.testing.assert_close(result.objective, 0.5 * y.pow(2).sum(dim=1))
    # Just below alpha_max of a target, its code is no longer zero.
    below = decompose(y[:1], dictionary, method=method, alpha=0.99 * float(top[0]))
    assert bool((below.coefficients != 0).any())


@pytest.mark.parametrize("method", ["lasso", "nn_lasso", "nnls"])
def test_zero_target_gives_zero_code(block_problem, method):
    dictionary, y = block_problem
    targets = torch.cat([y[:2], torch.zeros(1, dictionary.dim, dtype=y.dtype)])
    params = {} if method == "nnls" else {"alpha": 0.01}
    result = decompose(targets, dictionary, method=method, **params)
    assert bool((result.coefficients[2] == 0).all())
    assert float(result.objective[2]) == 0.0
    assert int(result.status[2]) == Status.CONVERGED
    assert bool((result.coefficients[:2] != 0).any())


def test_nonnegative_lasso_with_adversarial_targets_stays_nonnegative(block_problem):
    dictionary, y = block_problem
    # Negated targets correlate negatively with most atoms: a sign-free solver would go negative.
    result = decompose(-y, dictionary, method="nn_lasso", alpha=0.01, tol=1e-8)
    assert float(result.coefficients.min()) >= 0
    assert float(result.certificate.max()) <= 1e-8


def test_alpha_as_fraction_of_alpha_max(block_problem):
    dictionary, y = block_problem
    top = alpha_max(y, dictionary.atoms, nonnegative=True)
    fraction = Lasso(alpha=0.2, nonnegative=True, alpha_is_fraction_of_max=True, tol=1e-10).solve(y, dictionary)
    for i in range(3):
        single = Lasso(alpha=0.2 * float(top[i]), nonnegative=True, tol=1e-10).solve(y[i : i + 1], dictionary)
        torch.testing.assert_close(fraction.objective[i : i + 1], single.objective, rtol=1e-9, atol=0)
    gap = lasso_duality_gap(y, fraction.coefficients, dictionary.atoms, 0.2 * top, nonnegative=True)
    assert float(gap.max()) <= 1e-10
    # A fraction of 1 is alpha_max itself: all zeros.
    full = Lasso(alpha=1.0, nonnegative=True, alpha_is_fraction_of_max=True).solve(y, dictionary)
    assert bool((full.coefficients == 0).all())


def test_chunks_and_batch_agree_with_single_rows(block_problem):
    dictionary, y = block_problem
    alpha = 0.05
    whole = Lasso(alpha=alpha, nonnegative=True, tol=1e-12).solve(y, dictionary)
    chunked = Lasso(alpha=alpha, nonnegative=True, tol=1e-12, chunk_size=3).solve(y, dictionary)
    torch.testing.assert_close(chunked.objective, whole.objective, rtol=1e-10, atol=0)
    single = Lasso(alpha=alpha, nonnegative=True, tol=1e-12).solve(y[5:6], dictionary)
    torch.testing.assert_close(single.objective, whole.objective[5:6], rtol=1e-10, atol=0)


def test_inputs_not_mutated_and_deterministic(block_problem):
    dictionary, y = block_problem
    y_before, atoms_before = y.clone(), dictionary.atoms.clone()
    first = decompose(y, dictionary, method="lasso", alpha=0.05)
    second = decompose(y, dictionary, method="lasso", alpha=0.05)
    assert torch.equal(y, y_before) and torch.equal(dictionary.atoms, atoms_before)
    assert torch.equal(first.coefficients, second.coefficients)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["lasso", "nn_lasso", "nnls"])
def test_dtype_is_kept(dtype, method):
    dictionary = BlockDictionary.from_blocks(correlated_blocks(11, dtype=dtype), normalize=True)
    y = planted_targets(dictionary, 5, seed=12)
    params = {} if method == "nnls" else {"alpha": 0.05, "tol": 1e-5}
    result = decompose(y, dictionary, method=method, **params)
    for name in ("coefficients", "reconstruction", "objective", "certificate"):
        assert getattr(result, name).dtype == dtype, name
    assert result.status.dtype == torch.long and result.iterations.dtype == torch.long
    assert bool((result.status == Status.CONVERGED).all())
    # The reported certificate is what optimality.py computes from the returned code (up to rounding).
    if method == "nnls":
        recomputed = nonnegative_kkt_violation(y, result.coefficients, dictionary.atoms)
        assert float(recomputed.max()) <= 1e-5 + 1e-6
    else:
        recomputed = lasso_duality_gap(y, result.coefficients, dictionary.atoms, 0.05, nonnegative=method == "nn_lasso")
        assert float(recomputed.max()) <= 1e-5 + (1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("method", ["lasso", "nn_lasso", "nnls"])
def test_too_small_max_iter_reports_max_iter_with_one_warning(block_problem, method):
    dictionary, y = block_problem
    params = {} if method == "nnls" else {"alpha": 0.01}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = decompose(y, dictionary, method=method, max_iter=1, tol=1e-14, chunk_size=3, **params)
    convergence = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(convergence) == 1
    # The warning points at the caller's line (this file), not into torch's no_grad wrapper or the package.
    assert convergence[0].filename == __file__
    assert bool((result.status == Status.MAX_ITER).any())
    failed = result.status == Status.MAX_ITER
    assert bool((result.certificate[failed] > 1e-14).all())
    assert bool((result.iterations <= 1).all())


def test_validation():
    with pytest.raises(ValueError, match="alpha"):
        Lasso(alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Lasso(alpha=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        Lasso(alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha"):
        Lasso(alpha="0.1")
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'alpha'"):
        Lasso()
    with pytest.raises(ValueError, match="tol"):
        Lasso(alpha=0.1, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        NNLS(tol=-1e-3)
    with pytest.raises(ValueError, match="max_iter"):
        NNLS(max_iter=0)
    with pytest.raises(TypeError, match="nonnegative"):
        Lasso(alpha=0.1, nonnegative=1)
    # Keyword-only: every required argument is given, positionally, so only the keyword-only rule can object.
    with pytest.raises(TypeError, match=r"takes 1 positional argument but 2 were given"):
        Lasso(0.1)
    with pytest.raises(TypeError, match=r"takes 1 positional argument but 2 were given"):
        NNLS(1e-6)
    with pytest.raises(TypeError, match="alpha"):
        make_solver("nnls", alpha=0.1)


def test_registry_names_and_params():
    lasso = make_solver("lasso", alpha=0.1)
    nn_lasso = make_solver("nn_lasso", alpha=0.1)
    assert (lasso.name, nn_lasso.name, make_solver("nnls").name) == ("lasso", "nn_lasso", "nnls")
    assert nn_lasso.nonnegative and not lasso.nonnegative
    assert nn_lasso.params()["alpha"] == 0.1 and "tol" in nn_lasso.params()


@pytest.mark.parametrize("method", ["lasso", "nn_lasso", "cvxpy_lasso", "cvxpy_nn_lasso"])
def test_a_relative_alpha_above_one_is_refused(method):
    from sparsedecomp import make_solver

    with pytest.raises(ValueError, match="must be <= 1"):
        make_solver(method, alpha=1.5, alpha_is_fraction_of_max=True)
    assert make_solver(method, alpha=1.0, alpha_is_fraction_of_max=True).alpha == 1.0
    assert make_solver(method, alpha=1.5).alpha == 1.5  # an absolute weight may be anything positive


@pytest.mark.parametrize("method", ["lasso", "nn_lasso", "nnls"])
@pytest.mark.parametrize("block", [False, True])
def test_float32_converged_rows_are_certified_in_float64(method, block):
    """With a tol near what float32 resolves (1e-7 of ||y||^2), float32 certificates once passed rows whose
    float64 certificate was 1-2 % above tol (up to 2x here). Every CONVERGED row must meet tol in float64: the
    certificate of its float32 code, recomputed in float64 from the same float32 targets and atoms and the alpha
    asked for (a fraction of alpha_max computed in float64)."""
    g = torch.Generator().manual_seed(0)
    if block:
        D = BlockDictionary.from_blocks([torch.randn(32, 8, generator=g) for _ in range(4)], normalize=True)
    else:
        D = Dictionary.from_atoms(torch.randn(96, 24, generator=g), normalize=True)
    Y = torch.randn(128, D.dim, generator=g)
    tol, frac = (1e-7, 0.1) if method != "nnls" else (3e-7, None)
    params = {"tol": tol} if method == "nnls" else {"tol": tol, "alpha": frac, "alpha_is_fraction_of_max": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        dec = decompose(Y, D, method=method, **params)
    Y64, A64, c64 = Y.double(), D.atoms.double(), dec.coefficients.double()
    if method == "nnls":
        exact = nonnegative_kkt_violation(Y64, c64, A64)
    else:
        nonnegative = method == "nn_lasso"
        alpha = frac * alpha_max(Y64, A64, nonnegative=nonnegative)
        exact = lasso_duality_gap(Y64, c64, A64, alpha, nonnegative=nonnegative)
    converged = dec.status == Status.CONVERGED
    assert int(converged.sum()) >= 50  # many rows still converge: the check is not vacuous
    assert float(exact[converged].max()) <= tol
    # The reported certificate of a converged row is the float64 one (rounded to float32).
    torch.testing.assert_close(dec.certificate[converged].double(), exact[converged], rtol=1e-3, atol=tol * 1e-3)


def coherent_near_full_support_problem():
    """Two heads of 96 coherent atoms in 12 dimensions and random targets: at 1 % of alpha_max the lasso keeps
    about 12 atoms per head, as many as the head has dimensions (as on the demo world's real decoders), where
    coordinate descent alone converges slowly."""
    blocks = correlated_blocks(0, n_heads=2, n_features=96, d_head=12)
    dictionary = BlockDictionary.from_blocks(blocks, normalize=True)
    y = torch.randn(16, dictionary.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return dictionary, y


def test_lasso_converges_within_the_default_budget_on_a_near_full_support():
    # Before the support-only, repeated Newton steps and the relative inner tolerance, one of these targets ended
    # MAX_ITER with the default max_iter.
    dictionary, y = coherent_near_full_support_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = decompose(y, dictionary, method="lasso", alpha=0.01, alpha_is_fraction_of_max=True)
    assert bool((result.status == Status.CONVERGED).all())
    exact = lasso_duality_gap(y, result.coefficients, dictionary.atoms, 0.01 * alpha_max(y, dictionary.atoms))
    assert float(exact.max()) <= 1e-6
    assert float((result.coefficients != 0).sum(dim=1).double().mean()) > 20  # the hard regime: ~12 per head


@pytest.mark.parametrize("method", ["nnls", "lasso", "nn_lasso"])
@pytest.mark.parametrize("max_iter", [20, 50])
def test_a_tighter_tol_never_gives_a_worse_objective_in_the_same_budget(method, max_iter):
    # Before, the tighter tol spent the budget on early inner solves and ended up to 3.6e-2 ||y||^2 / 2 higher
    # (nnls, here). The inner solve does not depend on tol, so the tighter run follows the looser one until that
    # one stops, then only descends.
    dictionary, y = coherent_near_full_support_problem()
    params = {} if method == "nnls" else {"alpha": 0.01, "alpha_is_fraction_of_max": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        loose = decompose(y, dictionary, method=method, tol=1e-1, max_iter=max_iter, **params)
        tight = decompose(y, dictionary, method=method, tol=1e-9, max_iter=max_iter, **params)
    worse = (tight.objective - loose.objective) / (0.5 * y.pow(2).sum(dim=1))
    assert float(worse.max()) <= 1e-12
    assert float(worse.min()) < -1e-9  # not vacuous: the tighter tol went further on some target


def random_unit_problem(seed: int, n: int, m: int, d: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    return Dictionary.from_atoms(atoms.to(dtype), normalize=False), torch.randn(n, d, generator=g).to(dtype)


def test_float32_targets_finished_in_float64_keep_a_tighter_tol_no_worse_and_match_solving_alone():
    # Before, targets stuck at float32's rounding floor were re-solved in float64 from zero with the budget of the
    # batch's most expensive target, and always replaced: a tighter tol ended 2.9e-3 ||y||^2 / 2 higher within
    # the same max_iter, and a row's answer depended on the rest of its batch (gap 0.027 in a batch, 1.8e-8 alone).
    dictionary, y = random_unit_problem(0, n=30, m=80, d=20)
    params = {"alpha": 0.05, "alpha_is_fraction_of_max": True, "max_iter": 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        loose = decompose(y, dictionary, method="lasso", tol=1e-7, **params)
        tight = decompose(y, dictionary, method="lasso", tol=1e-9, **params)
        alone = [decompose(y[i : i + 1], dictionary, method="lasso", tol=1e-9, **params) for i in range(len(y))]
    half_y2 = 0.5 * y.double().pow(2).sum(dim=1)
    assert float(((tight.objective.double() - loose.objective.double()) / half_y2).max()) <= 1e-6
    alone_objective = torch.cat([a.objective for a in alone]).double()
    assert float(((tight.objective.double() - alone_objective).abs() / half_y2).max()) <= 1e-6
    # Every reported certificate is that of the returned code, in float64.
    alpha = 0.05 * alpha_max(y.double(), dictionary.atoms.double())
    exact = lasso_duality_gap(y.double(), tight.coefficients.double(), dictionary.atoms.double(), alpha)
    torch.testing.assert_close(tight.certificate.double(), exact, rtol=1e-3, atol=1e-9)


def test_a_target_whose_steps_all_fail_stops_after_two_rounds_not_at_max_iter(monkeypatch):
    # Before, a step that did not move still counted as progress, so a target whose every step failed (e.g. a
    # failed factorisation) repeated the same global check until max_iter (101 rounds for max_iter=200).
    from sparsedecomp.solvers import working_set

    def failing(gram, rows, q, c, sign, alpha, ridge):
        none = torch.zeros(c.shape[0], dtype=torch.bool)
        return c, none, none

    monkeypatch.setattr(working_set, "newton_step", failing)
    dictionary, y = random_unit_problem(1, n=1, m=40, d=12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = decompose(y, dictionary, method="lasso", alpha=0.1, alpha_is_fraction_of_max=True, max_iter=200)
    assert result.statuses() == [Status.MAX_ITER]
    assert int(result.iterations[0]) <= 4


def test_nnls_codes_stay_near_vertex_solutions():
    # Atoms enter only while the active set has fewer atoms than dimensions: about d non-zeros per problem (the
    # former inner solvers gave up to 20 here, d = 12; coordinate descent drifted to dense codes).
    dictionary, _ = random_unit_problem(2, n=1, m=200, d=12)
    g = torch.Generator().manual_seed(3)
    y = torch.rand(8, 200, generator=g) @ dictionary.atoms  # inside the atoms' cone: exact non-negative fits
    result = decompose(y, dictionary, method="nnls")
    assert result.statuses() == [Status.CONVERGED] * 8
    assert int((result.coefficients != 0).sum(dim=1).max()) <= 12 + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["lasso", "nn_lasso"])
def test_tiny_alpha_on_a_support_as_large_as_the_dimension_converges(method, dtype):
    # At 1e-4 of alpha_max the support fills the 12 dimensions. Before, a target stalled once with a slightly
    # inexact pattern could never swap atoms (an atom entering a full support makes a singular step) and its
    # float64 finish got one round: 9 of 2,560 such targets ended MAX_ITER well before max_iter, 1.5e-3 above
    # the optimum, with a tol that the float32 rounding of the float64 optimum meets.
    failed = 0
    for seed in range(0, 40, 3):
        dictionary, y = random_unit_problem(seed, n=8, m=60, d=12, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = decompose(y, dictionary, method=method, alpha=1e-4, alpha_is_fraction_of_max=True,
                               tol=1e-6 if dtype == torch.float32 else 1e-10)
        failed += int((result.status != Status.CONVERGED).sum())
    assert failed == 0
