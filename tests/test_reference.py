"""The cvxpy reference solvers agree with scikit-learn / scipy, with each other, and flag every failure."""

from __future__ import annotations

import cvxpy as cp
import pytest
import scipy.optimize
import torch
from sklearn.linear_model import Lasso as SklearnLasso

from sparsedecomp import BlockDictionary, ConvergenceWarning, Dictionary, Status, decompose
from sparsedecomp.decomposition import DUALITY_GAP, KKT_VIOLATION
from sparsedecomp.optimality import lasso_objective
from sparsedecomp.optimality import bpdn_certificate
from sparsedecomp.solvers.reference import CvxpyBPDN, CvxpyLasso, CvxpyNNLS

N_ATOMS, DIM, N_TARGETS = 40, 12, 4
ALPHA = 0.05


@pytest.fixture(scope="module")
def atoms() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(N_ATOMS, DIM, generator=g, dtype=torch.float64)
    return raw / raw.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def targets(atoms: torch.Tensor) -> torch.Tensor:
    # Planted non-negative combinations plus noise, at assorted scales (the solvers work in unit scale).
    g = torch.Generator().manual_seed(1)
    code = torch.zeros(N_TARGETS, N_ATOMS, dtype=torch.float64)
    for i in range(N_TARGETS):
        code[i, torch.randperm(N_ATOMS, generator=g)[:3]] = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    noise = 0.05 * torch.randn(N_TARGETS, DIM, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 0.01, 30.0, 2.0], dtype=torch.float64)[:, None]
    return scales * (code @ atoms + noise)


def sklearn_lasso_code(atoms: torch.Tensor, y: torch.Tensor, alpha: float, positive: bool) -> torch.Tensor:
    # sklearn minimises (1 / (2 d)) ||y - X w||^2 + a ||w||_1 with X = D^T (d samples); multiplying by d gives
    # ours with alpha = a d.
    model = SklearnLasso(alpha=alpha / DIM, positive=positive, fit_intercept=False, tol=1e-12, max_iter=200_000)
    model.fit(atoms.T.numpy(), y.numpy())
    return torch.from_numpy(model.coef_.copy())


@pytest.mark.parametrize("nonnegative", [True, False])
def test_lasso_matches_sklearn_objective(atoms, targets, nonnegative):
    result = decompose(targets, atoms, method="cvxpy_nn_lasso" if nonnegative else "cvxpy_lasso", alpha=ALPHA)
    assert result.certificate_kind == DUALITY_GAP
    assert result.statuses() == [Status.CONVERGED] * N_TARGETS
    assert bool((result.certificate <= 1e-6).all())
    for i in range(N_TARGETS):
        ref = sklearn_lasso_code(atoms, targets[i], ALPHA, nonnegative)
        ref_obj = float(lasso_objective(targets[i : i + 1], ref[None], atoms, ALPHA))
        ours = float(result.objective[i])
        # The reference must be at least as good as coordinate descent, and equal up to solver tolerance.
        assert ours <= ref_obj * (1 + 1e-7) + 1e-12
        assert ours == pytest.approx(ref_obj, rel=1e-6, abs=1e-12)
    if nonnegative:
        assert bool((result.coefficients >= 0).all())


def test_reported_objective_is_the_lasso_objective_of_the_code(atoms, targets):
    result = decompose(targets, atoms, method="cvxpy_lasso", alpha=ALPHA)
    expected = lasso_objective(targets, result.coefficients, atoms, ALPHA)
    torch.testing.assert_close(result.objective, expected)


def test_nnls_matches_scipy(atoms, targets):
    result = decompose(targets, atoms, method="cvxpy_nnls")
    assert result.certificate_kind == KKT_VIOLATION
    assert result.statuses() == [Status.CONVERGED] * N_TARGETS
    assert bool((result.coefficients >= 0).all())
    for i in range(N_TARGETS):
        _, rnorm = scipy.optimize.nnls(atoms.T.numpy(), targets[i].numpy())
        expected = 0.5 * rnorm**2
        scale = 0.5 * float(targets[i].pow(2).sum())
        assert float(result.objective[i]) == pytest.approx(expected, abs=1e-8 * scale)


def test_nn_lasso_is_bracketed_by_nnls(atoms, targets):
    """The NNLS code is feasible for the non-negative lasso, so
    ``min_ls <= P_lasso <= 0.5 ||y - c_nnls D||^2 + alpha ||c_nnls||_1``."""
    nnls = decompose(targets, atoms, method="cvxpy_nnls")
    lasso = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA)
    upper = lasso_objective(targets, nnls.coefficients, atoms, ALPHA)
    assert bool((lasso.objective <= upper * (1 + 1e-7)).all())
    assert bool((lasso.objective >= nnls.objective * (1 - 1e-7)).all())


def test_signed_lasso_is_no_worse_than_nonnegative(atoms, targets):
    signed = decompose(targets, atoms, method="cvxpy_lasso", alpha=ALPHA)
    nonneg = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA)
    assert bool((signed.objective <= nonneg.objective * (1 + 1e-7)).all())


def test_bpdn_feasible_and_sparser_than_nnls(atoms, targets):
    nnls = decompose(targets, atoms, method="cvxpy_nnls")
    nnls_rel = (targets - nnls.reconstruction).norm(dim=1) / targets.norm(dim=1)
    eps = float(nnls_rel.max()) + 0.05
    result = decompose(targets, atoms, method="cvxpy_bpdn", eps=eps)
    assert result.statuses() == [Status.CONVERGED] * N_TARGETS
    assert bool((result.coefficients >= 0).all())
    rel = (targets - result.reconstruction).norm(dim=1) / targets.norm(dim=1)
    assert bool((rel <= eps * (1 + 1e-7)).all())
    # The NNLS code satisfies the bound, so the minimum-L1 code can only have a smaller L1 norm.
    assert bool((result.coefficients.sum(dim=1) <= nnls.coefficients.sum(dim=1) * (1 + 1e-7)).all())
    torch.testing.assert_close(result.objective, result.coefficients.abs().sum(dim=1))


def test_bpdn_equals_lasso_at_the_lasso_residual(atoms, targets):
    """Lasso and BPDN share solutions: with eps set to the lasso solution's relative residual, the minimum L1
    norm is the lasso code's L1 norm."""
    lasso = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA)
    for i in range(N_TARGETS):
        y = targets[i : i + 1]
        eps = float((y - lasso.reconstruction[i]).norm() / y.norm())
        bpdn = decompose(y, atoms, method="cvxpy_bpdn", eps=eps)
        assert bpdn.statuses() == [Status.CONVERGED]
        l1_lasso = float(lasso.coefficients[i].sum())
        assert float(bpdn.objective[0]) == pytest.approx(l1_lasso, rel=1e-5)


def test_bpdn_eps_at_least_one_gives_zero_code(atoms, targets):
    result = decompose(targets, atoms, method="cvxpy_bpdn", eps=1.0)
    assert bool((result.coefficients == 0).all())
    assert result.statuses() == [Status.CONVERGED] * N_TARGETS


def test_lasso_scales_with_target(atoms, targets):
    """``c(s y, s alpha) = s c(y, alpha)``: checks the unit-scale rescaling inside the solver."""
    s = 7.0
    base = decompose(targets, atoms, method="cvxpy_lasso", alpha=ALPHA)
    scaled = decompose(s * targets, atoms, method="cvxpy_lasso", alpha=s * ALPHA)
    torch.testing.assert_close(scaled.coefficients, s * base.coefficients, rtol=1e-5, atol=1e-7 * s)


def test_float32_input_solved_in_float64(atoms, targets):
    exact = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA)
    single = decompose(targets.float(), atoms.float(), method="cvxpy_nn_lasso", alpha=ALPHA)
    assert single.coefficients.dtype == torch.float32
    assert single.objective.dtype == torch.float32
    torch.testing.assert_close(single.coefficients.double(), exact.coefficients, rtol=1e-4, atol=1e-5)


def test_problem_is_built_once_and_dpp(atoms, targets, monkeypatch):
    """Preparing compiles one DPP problem; solving several batches on the prepared solver reuses it."""
    builds = []
    original = CvxpyLasso.build
    monkeypatch.setattr(CvxpyLasso, "build", lambda self, *args: builds.append(1) or original(self, *args))
    prepared = CvxpyLasso(alpha=ALPHA, nonnegative=True).prepare(Dictionary.from_atoms(atoms))
    first, second = prepared.solve(targets[:2]), prepared.solve(targets[2:4])
    assert len(builds) == 1
    assert first.n_targets == second.n_targets == 2
    program = prepared.precomputed
    assert program.problem.is_dcp(dpp=True)
    assert program.target in program.problem.parameters()


def test_interior_point_dust_is_zeroed(atoms, targets):
    """Entries below ``zero_tol`` of the largest are exact zeros; with ``zero_tol=0`` none are."""
    cleaned = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA)
    raw = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA, zero_tol=0.0)
    assert bool(((cleaned.coefficients == 0).sum(dim=1) > 0).all())
    assert int((raw.coefficients == 0).sum()) < int((cleaned.coefficients == 0).sum())
    assert cleaned.statuses() == [Status.CONVERGED] * N_TARGETS


def test_infeasible_bpdn_is_flagged_not_answered():
    """Atoms in the positive orthant cannot reach a target in the negative orthant with c >= 0."""
    g = torch.Generator().manual_seed(3)
    atoms = torch.rand(20, 8, generator=g, dtype=torch.float64) + 0.1
    target = -atoms[:1] * 2.0
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        result = decompose(target, atoms, method="cvxpy_bpdn", eps=1e-3)
    assert result.statuses() == [Status.NUMERICAL_ERROR]
    assert bool(torch.isnan(result.coefficients).all())
    assert bool(torch.isnan(result.objective).all())
    assert float(result.certificate[0]) == float("inf")
    assert not bool(result.converged[0])


def test_certificate_above_tol_is_flagged(atoms, targets):
    """A row Clarabel calls optimal is still NUMERICAL_ERROR if its certificate exceeds ``tol``; the code is
    kept (it is the solver's answer), only flagged."""
    with pytest.warns(ConvergenceWarning):
        result = decompose(targets, atoms, method="cvxpy_nnls", tol=1e-300)
    assert bool((result.status == Status.NUMERICAL_ERROR).all())
    assert bool(torch.isfinite(result.coefficients).all())


def test_inaccurate_status_is_flagged(atoms, targets, monkeypatch):
    original = cp.Problem.solve

    def inaccurate(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        self._status = cp.OPTIMAL_INACCURATE
        return value

    monkeypatch.setattr(cp.Problem, "solve", inaccurate)
    with pytest.warns(ConvergenceWarning):
        result = decompose(targets, atoms, method="cvxpy_nn_lasso", alpha=ALPHA)
    assert result.statuses() == [Status.NUMERICAL_ERROR] * N_TARGETS
    assert bool(torch.isfinite(result.coefficients).all())


def test_solver_error_is_flagged(atoms, targets, monkeypatch):
    def broken(self, *args, **kwargs):
        raise cp.SolverError("simulated failure")

    monkeypatch.setattr(cp.Problem, "solve", broken)
    with pytest.warns(ConvergenceWarning):
        result = decompose(targets, atoms, method="cvxpy_nnls")
    assert result.statuses() == [Status.NUMERICAL_ERROR] * N_TARGETS
    assert bool(torch.isnan(result.coefficients).all())


def test_zero_target_skips_the_solver(atoms, monkeypatch):
    def never(self, *args, **kwargs):
        raise AssertionError("a zero target must not reach the solver")

    monkeypatch.setattr(cp.Problem, "solve", never)
    zero = torch.zeros(2, DIM, dtype=torch.float64)
    for method, params in [("cvxpy_lasso", {"alpha": ALPHA}), ("cvxpy_nnls", {}), ("cvxpy_bpdn", {"eps": 0.1})]:
        result = decompose(zero, atoms, method=method, **params)
        assert bool((result.coefficients == 0).all())
        assert result.statuses() == [Status.CONVERGED] * 2


def test_names_and_parameters():
    assert CvxpyLasso(alpha=1.0).name == "cvxpy_lasso"
    assert CvxpyLasso(alpha=1.0, nonnegative=True).name == "cvxpy_nn_lasso"
    assert CvxpyNNLS().name == "cvxpy_nnls"
    assert CvxpyBPDN(eps=0.1).name == "cvxpy_bpdn"
    with pytest.raises(ValueError, match="alpha"):
        CvxpyLasso(alpha=-1.0)
    with pytest.raises(ValueError, match="eps"):
        CvxpyBPDN(eps=-0.1)
    with pytest.raises(TypeError):
        CvxpyLasso()  # alpha is required
    with pytest.raises(TypeError, match="nonnegative"):
        CvxpyLasso(alpha=1.0, nonnegative="yes")


def test_bpdn_certificate_by_hand():
    """Two orthonormal atoms, y = (3, 4), eps = 0.2: the optimum shrinks y radially by eps ||y|| = 1, giving
    c = (2.4, 3.2) with L1 5.6; the residual (0.6, 0.8) has max_j r.d_j = 0.8, so the dual bound is
    (r.y - 1 * ||r||) / 0.8 = (5 - 1) / 0.8 = 5: the gap is 0.6 / 5.6 at c, and 0 at the optimum."""
    atoms = torch.eye(2, dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    at_c = torch.tensor([[2.4, 3.2]], dtype=torch.float64)
    # Exact optimum: minimise c1 + c2 on the circle of radius 1 around y -> c = y - (1, 1)/sqrt(2).
    optimum = y - torch.tensor([[1.0, 1.0]], dtype=torch.float64) / 2**0.5
    cert_c = bpdn_certificate(y, at_c, atoms, 0.2)
    assert float(cert_c[0]) == pytest.approx((5.6 - 5.0) / 5.6, rel=1e-12)
    assert float(bpdn_certificate(y, optimum, atoms, 0.2)[0]) == pytest.approx(0.0, abs=1e-12)
    infeasible = y * 0.5  # residual (1.5, 2) has norm 2.5 > 1
    assert float(bpdn_certificate(y, infeasible, atoms, 0.2)[0]) >= (2.5 - 1.0) / 5.0 - 1e-12
    assert float(bpdn_certificate(y, -at_c, atoms, 0.2)[0]) == float("inf")
    solved = decompose(y, atoms, method="cvxpy_bpdn", eps=0.2)
    # The point on a curved boundary is only accurate to about the square root of the solver tolerance.
    torch.testing.assert_close(solved.coefficients, optimum, rtol=1e-5, atol=1e-6)
    assert solved.statuses() == [Status.CONVERGED]


def test_nnls_exact_fit_in_one_head_is_certified():
    """The seed's situation: a target living in one head's block of a block-diagonal dictionary, with twice as
    many atoms per head as dimensions (the exact fit is not unique). The interior-point code alone leaves dust
    on the other head and a KKT violation near sqrt(tol) (about 1e-5 here); polishing on the support must bring
    it to rounding level, and the row must not be flagged."""
    g = torch.Generator().manual_seed(5)
    dictionary = BlockDictionary.from_blocks([torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2)])
    code = torch.zeros(1, 16, dtype=torch.float64)
    code[0, :8] = torch.rand(8, generator=g, dtype=torch.float64)
    target = code @ dictionary.atoms
    result = decompose(target, dictionary, method="cvxpy_nnls")
    assert result.statuses() == [Status.CONVERGED]
    assert float(result.certificate[0]) < 1e-9
    assert float((target - result.reconstruction).norm() / target.norm()) < 1e-9
    assert bool((result.coefficients[0, 8:] == 0).all())  # nothing on the head the target does not touch


@pytest.mark.parametrize("nonnegative", [False, True])
def test_alpha_as_a_fraction_of_each_targets_alpha_max(atoms, targets, nonnegative):
    """The reference reads a relative alpha as the fast lasso does: alpha * alpha_max(y), per target."""
    from sparsedecomp.optimality import alpha_max

    method = "nn_lasso" if nonnegative else "lasso"
    relative = decompose(targets, atoms, method=f"cvxpy_{method}", alpha=0.3, alpha_is_fraction_of_max=True)
    fast = decompose(targets, atoms, method=method, alpha=0.3, alpha_is_fraction_of_max=True, tol=1e-12)
    torch.testing.assert_close(relative.objective, fast.objective, rtol=1e-6, atol=1e-12)
    weights = 0.3 * alpha_max(targets, atoms, nonnegative=nonnegative)
    for i in (0, 2):
        absolute = decompose(targets[i : i + 1], atoms, method=f"cvxpy_{method}", alpha=float(weights[i]))
        torch.testing.assert_close(absolute.objective[0], relative.objective[i], rtol=1e-8, atol=1e-12)
    assert len(set(weights.tolist())) > 1  # the targets really get different weights
