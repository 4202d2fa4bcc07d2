"""The contract every registered solver keeps, driven by one table of all solvers.

A new method added to ``SOLVERS`` must get a row in ``SOLVER_TABLE`` (``test_every_registered_method_is_in_the
_table`` fails otherwise), and then runs every contract test below: shapes, dtype and device kept, batch equals
per-row, zero target gives zero code, deterministic, inputs not mutated, input errors named, a prepared solver
reused across batches, and a reported certificate that equals the one recomputed from :mod:`sparsedecomp.optimality`.
Every contract runs on the three kinds of dictionary: dense, block-diagonal (``z``) and ``W_O``-mixed (residual).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pytest
import torch

from sparsedecomp import SOLVERS, BlockDictionary, ConvergenceWarning, Dictionary, Status, decompose, make_solver
from sparsedecomp import optimality
from sparsedecomp.decomposition import DUALITY_GAP, EXACT, KKT_VIOLATION
from sparsedecomp.errors import InputError, InputTypeError

# The standard problem holds a zero target on purpose (every solver must give it the zero code); the warning that says
# so is tested in tests/test_bad_input_library.py.
pytestmark = pytest.mark.filterwarnings("ignore::sparsedecomp.solvers.ZeroTargetWarning")


@dataclass(frozen=True)
class Case:
    """One row of the solver table: small parameters and capability tags."""

    params: dict[str, Any] = field(default_factory=dict)
    nonnegative: bool = False


SOLVER_TABLE: dict[str, Case] = {
    "pinv": Case(),
    "nnls": Case(nonnegative=True),
    "lasso": Case({"alpha": 0.05}),
    "nn_lasso": Case({"alpha": 0.05}, nonnegative=True),
    "omp": Case({"n_nonzero": 3}),
    "nn_omp": Case({"n_nonzero": 3}, nonnegative=True),
    "cvxpy_lasso": Case({"alpha": 0.05}),
    "cvxpy_nn_lasso": Case({"alpha": 0.05}, nonnegative=True),
    "cvxpy_nnls": Case(nonnegative=True),
    "cvxpy_bpdn": Case({"eps": 0.2}, nonnegative=True),
}
METHODS = sorted(SOLVER_TABLE)

N_HEADS, PER_HEAD, D_HEAD = 3, 8, 4
N_ATOMS, DIM = N_HEADS * PER_HEAD, N_HEADS * D_HEAD
N_TARGETS = 4
ZERO_ROW = 2

D_MODEL = 10
KINDS = ["dense", "block", "mixed"]
# Methods whose optimal code is not unique on these problems (only their objective and reconstruction are).
NON_UNIQUE = {"nnls", "cvxpy_nnls"}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_problem(kind: str, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    """A small dictionary (dense unit atoms or 3 heads x 8 atoms x 4 dims) and targets: planted non-negative
    3-atom combinations (so every non-negative problem is feasible), one zero row."""
    g = torch.Generator().manual_seed(0)
    if kind in ("block", "mixed"):
        blocks = [torch.randn(PER_HEAD, D_HEAD, generator=g, dtype=torch.float64) for _ in range(N_HEADS)]
        dictionary: Dictionary | torch.Tensor = BlockDictionary.from_blocks(blocks)
        if kind == "mixed":
            W_O = torch.randn(N_HEADS, D_HEAD, D_MODEL, generator=g, dtype=torch.float64) / D_HEAD**0.5
            dictionary = dictionary.mix(W_O)
        dictionary = dictionary.to(device, dtype)
        atoms = dictionary.atoms
    else:
        raw = torch.randn(N_ATOMS, DIM, generator=g, dtype=torch.float64)
        atoms = (raw / raw.norm(dim=1, keepdim=True)).to(device, dtype)
        dictionary = atoms
    code = torch.zeros(N_TARGETS, N_ATOMS, dtype=torch.float64)
    for i in range(N_TARGETS):
        code[i, torch.randperm(N_ATOMS, generator=g)[:3]] = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    code[ZERO_ROW] = 0
    targets = (code.to(device, dtype) @ atoms).to(device, dtype)
    return targets, dictionary


def solve(method: str, targets, dictionary):
    return decompose(targets, dictionary, method=method, **SOLVER_TABLE[method].params)


def test_every_registered_method_is_in_the_table():
    assert set(SOLVER_TABLE) == set(SOLVERS), "add a row to SOLVER_TABLE for every registered method"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_shapes_dtype_device(method, dtype, device, kind):
    targets, dictionary = make_problem(kind, dtype, device)
    result = solve(method, targets, dictionary)
    n = N_TARGETS
    assert result.coefficients.shape == (n, N_ATOMS)
    assert result.reconstruction.shape == targets.shape
    assert result.codes.values.device.type == device and result.codes.dtype == dtype
    for name in ("objective", "certificate", "iterations", "status"):
        assert getattr(result, name).shape == (n,), name
    for name in ("coefficients", "reconstruction", "objective", "certificate"):
        tensor = getattr(result, name)
        assert tensor.dtype == dtype, name
        assert tensor.device.type == device, name
    assert result.status.dtype == torch.long and result.iterations.dtype == torch.long
    assert result.status.device.type == device
    assert result.solver == method
    assert result.certificate_kind in (DUALITY_GAP, KKT_VIOLATION, EXACT)
    assert bool(torch.isfinite(result.coefficients).all())
    torch.testing.assert_close(result.reconstruction, result.coefficients @ result.dictionary.atoms)


def assert_same_solution(method: str, codes, expected, dictionary) -> None:
    """The same codes; for :data:`NON_UNIQUE` methods the same fit. Their problems here are exact fits from more
    atoms than dimensions: many codes are optimal, and which one a batched solve reaches depends on rounding (padded
    factorisations differ with the batch), but the fit (the projection onto the atoms' cone) is unique."""
    if method not in NON_UNIQUE:
        torch.testing.assert_close(codes, expected, rtol=1e-4, atol=1e-4)
        return
    atoms = dictionary if isinstance(dictionary, torch.Tensor) else dictionary.atoms
    torch.testing.assert_close(codes @ atoms, expected @ atoms, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_per_row(method, kind):
    targets, dictionary = make_problem(kind)
    batch = solve(method, targets, dictionary)
    for i in range(N_TARGETS):
        row = solve(method, targets[i : i + 1], dictionary)
        assert_same_solution(method, row.coefficients[0], batch.coefficients[i], dictionary)
        torch.testing.assert_close(row.objective[0], batch.objective[i], rtol=1e-5, atol=1e-8)
        assert int(row.status[0]) == int(batch.status[i])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_easy_problem_converges(method, kind):
    targets, dictionary = make_problem(kind)
    result = solve(method, targets, dictionary)
    assert not any(s.is_failure for s in result.statuses()), result.status_counts()
    if SOLVER_TABLE[method].nonnegative:
        assert bool((result.coefficients >= 0).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_zero_target_gives_zero_code(method, dtype, kind):
    targets, dictionary = make_problem(kind, dtype)
    result = solve(method, targets, dictionary)
    assert bool((result.coefficients[ZERO_ROW] == 0).all())
    assert bool((result.reconstruction[ZERO_ROW] == 0).all())
    assert not Status(int(result.status[ZERO_ROW])).is_failure
    only_zero = solve(method, torch.zeros_like(targets), dictionary)
    assert bool((only_zero.coefficients == 0).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method, kind):
    targets, dictionary = make_problem(kind)
    first = solve(method, targets, dictionary)
    second = solve(method, targets, dictionary)
    for name in ("coefficients", "objective", "certificate", "iterations", "status"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_inputs_not_mutated(method, kind):
    targets, dictionary = make_problem(kind)
    atoms = dictionary.atoms if isinstance(dictionary, Dictionary) else dictionary
    targets_before, atoms_before = targets.clone(), atoms.clone()
    scales_before = dictionary.scales.clone() if isinstance(dictionary, Dictionary) else None
    solve(method, targets, dictionary)
    assert torch.equal(targets, targets_before)
    assert torch.equal(atoms, atoms_before)
    if scales_before is not None:
        assert torch.equal(dictionary.scales, scales_before)


@pytest.mark.parametrize("method", METHODS)
def test_bad_targets_raise_naming_the_problem(method):
    targets, dictionary = make_problem("dense")
    nan = targets.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve(method, nan, dictionary)
    inf = targets.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        solve(method, inf, dictionary)
    with pytest.raises(ValueError, match=r"targets\[None\]"):
        solve(method, targets[0], dictionary)
    with pytest.raises(ValueError, match="columns"):
        solve(method, targets[:, :-1], dictionary)
    with pytest.raises(ValueError, match="dictionary is torch.float64"):
        solve(method, targets.float(), dictionary)
    with pytest.raises(TypeError, match="torch.Tensor"):
        solve(method, targets.tolist(), dictionary)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_device_mismatch_raises(method):
    targets, dictionary = make_problem("dense")
    with pytest.raises(ValueError, match="cuda"):
        solve(method, targets.cuda(), dictionary)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_parameter_raises(method):
    with pytest.raises(TypeError, match="unexpected"):
        make_solver(method, **SOLVER_TABLE[method].params, no_such_parameter=1)
    targets, dictionary = make_problem("dense")
    with pytest.raises(TypeError, match="no_such_parameter"):
        decompose(targets, dictionary, method=method, no_such_parameter=1)


def test_unknown_method_raises():
    targets, dictionary = make_problem("dense")
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        decompose(targets, dictionary, method="no_such_method")
    with pytest.raises(ValueError, match="unknown method"):
        make_solver("no_such_method")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_prepared_solver_precomputes_once_and_solves_batches(method, kind, monkeypatch):
    """``prepare`` runs the dictionary-only work once; batches solved on the prepared solver give what one call
    on all targets gives, and record the solver's parameters."""
    targets, dictionary = make_problem(kind)
    params = SOLVER_TABLE[method].params
    solver = make_solver(method, **params)
    whole = solver.solve(targets, dictionary)
    calls = []
    original = type(solver).precompute
    monkeypatch.setattr(type(solver), "precompute", lambda self, d: calls.append(1) or original(self, d))
    prepared = solver.prepare(dictionary)
    parts = [prepared.solve(targets[:1]), prepared.solve(targets[1:])]
    assert len(calls) == 1
    assert_same_solution(method, torch.cat([p.coefficients for p in parts]), whole.coefficients, dictionary)
    assert solver.name == method == parts[0].solver
    assert dict(parts[1].params) == solver.params()
    for key, value in params.items():
        assert parts[0].params[key] == value


# Parameters that stop the iterative solvers early (one epoch, an unreachable tol), so that their certificates are
# far from zero and a solver that misreported them could not match the recomputed values by accident.
CERTIFICATE_PARAMS: dict[str, dict[str, Any]] = {
    "lasso": {"alpha": 0.05, "tol": 1e-14, "max_iter": 1},
    # 0.02, not 0.05: at 0.05 one round's Newton steps reach the block problem's optimum exactly (certificate ~1e-16),
    # and this test needs a code that is not optimal yet.
    "nn_lasso": {"alpha": 0.02, "tol": 1e-14, "max_iter": 1},
    "nnls": {"tol": 1e-14, "max_iter": 1},
}
# OMP certifies the exactness of its least-squares (NNLS) fit on the support, and the polished reference NNLS its
# KKT conditions: both are at rounding level in float64 whatever the problem, so for them the comparison is at that
# level only (the others' certificates are at least 1e-13 here: 1e-11 and up for the interior point, 1e-2 for the
# early-stopped iterative solvers).
ROUNDING_LEVEL_CERTIFICATES = {"omp", "nn_omp", "pinv", "cvxpy_nnls"}


def recomputed_certificate(method: str, result, atoms: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The certificate computed from the returned code by :mod:`sparsedecomp.optimality` alone, and how it must
    compare with the reported one: ``"equal"``; ``"at_most"`` when the solver knows a better dual point than the
    code alone gives (BPDN); ``"at_least"`` when the solver's certificate covers atoms the code no longer names
    (nn_omp's support atoms whose coefficient dropped to 0); ``"zero"`` for the exact pseudoinverse."""
    y, c = result.targets, result.coefficients
    params = result.params
    if method == "pinv":
        return optimality.least_squares_optimality(y, c, atoms), "zero"
    if method in ("nnls", "cvxpy_nnls"):
        return optimality.nonnegative_kkt_violation(y, c, atoms), "equal"
    if method in ("lasso", "nn_lasso", "cvxpy_lasso", "cvxpy_nn_lasso"):
        nonnegative = SOLVER_TABLE[method].nonnegative
        return optimality.lasso_duality_gap(y, c, atoms, params["alpha"], nonnegative=nonnegative), "equal"
    if method == "cvxpy_bpdn":
        return optimality.bpdn_certificate(y, c, atoms, params["eps"]), "at_most"
    g = optimality.residual(y, c, atoms) @ atoms.T
    violation = torch.where(c != 0, g.abs(), torch.zeros_like(g)).amax(dim=1)
    scale = y.norm(dim=1) * atoms.norm(dim=1).max()
    rel = torch.where(scale > 0, violation / scale.clamp_min(1e-300), violation)
    return rel, "equal" if method == "omp" else "at_least"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_reported_certificate_matches_optimality_module(method, kind):
    targets, dictionary = make_problem(kind)
    params = CERTIFICATE_PARAMS.get(method, SOLVER_TABLE[method].params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the early stops are intended
        result = decompose(targets, dictionary, method=method, **params)
    recomputed, relation = recomputed_certificate(method, result, result.dictionary.atoms)
    reported = result.certificate
    if method not in ROUNDING_LEVEL_CERTIFICATES:
        # The comparison has teeth: a solver reporting 0 (or anything else made up) would fail it.
        assert float(recomputed.max()) > 1e-13, recomputed
    if relation == "zero":
        assert result.certificate_kind == EXACT and bool((reported == 0).all())
        assert float(recomputed.max()) < 1e-10
    elif relation == "equal":
        torch.testing.assert_close(reported, recomputed, rtol=1e-4, atol=1e-14)
    elif relation == "at_least":
        assert bool((reported >= recomputed - 1e-14).all()), (reported, recomputed)
    else:
        assert bool((reported <= recomputed + 1e-14).all()), (reported, recomputed)
        # The constraint-violation part of the BPDN certificate needs no dual point: it is a floor.
        r_norm = optimality.residual(result.targets, result.coefficients, result.dictionary).norm(dim=1)
        y_norm = result.targets.norm(dim=1)
        floor = ((r_norm - params["eps"] * y_norm).clamp_min(0) / y_norm.clamp_min(1e-300))
        assert bool((reported >= floor - 1e-14).all())


@pytest.mark.parametrize("method", METHODS)
def test_chunking_does_not_change_the_answer(method):
    targets, dictionary = make_problem("dense")
    whole = solve(method, targets, dictionary)
    chunked = decompose(targets, dictionary, method=method, chunk_size=3, **SOLVER_TABLE[method].params)
    torch.testing.assert_close(chunked.coefficients, whole.coefficients, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_gives_an_empty_result(method, kind):
    targets, dictionary = make_problem(kind)
    result = solve(method, targets[:0], dictionary)
    assert result.coefficients.shape == (0, N_ATOMS)
    assert result.reconstruction.shape == (0, targets.shape[1])
    assert result.status.shape == (0,) and result.status_counts() == {}


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("method", METHODS)
def test_targets_whose_norms_do_not_fit_the_dtype_are_refused(method, scale):
    """float32 squares of 1e20 overflow and of 1e-25 underflow: the answer would be a silent zero code."""
    targets, dictionary = make_problem("dense", torch.float32)
    with pytest.raises(ValueError, match="squared norm is not representable in torch.float32"):
        solve(method, targets * scale, dictionary)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_inputs_are_solved_and_returned_in_their_dtype(method, dtype):
    targets, dictionary = make_problem("block", dtype)
    with warnings.catch_warnings():
        # The certificate of a code rounded to half precision can exceed a tolerance met in float32.
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = solve(method, targets, dictionary)
    assert result.coefficients.dtype == dtype and result.reconstruction.dtype == dtype
    assert bool(torch.isfinite(result.coefficients).all())
    exact = solve(method, targets.double(), dictionary.to(dtype=torch.float64))
    # float16 keeps about 3 significant digits, bfloat16 about 2 (and NNLS codes, whose atoms partly cancel, lose
    # more when rounded): the reconstruction agrees with the float64 one to that share of each target's norm.
    share = 0.02 if dtype == torch.float16 else 0.1
    difference = (result.reconstruction.double() - exact.reconstruction).norm(dim=1)
    assert bool((difference <= share * targets.double().norm(dim=1) + 1e-3).all()), difference


def _int_parameters(method: str) -> list[str]:
    """The solver's integer parameters (``chunk_size`` always; budgets and iteration caps where it has them)."""
    return [f.name for f in fields(make_solver(method, **SOLVER_TABLE[method].params)) if f.type in ("int", "int | None")]


@pytest.mark.parametrize("method", METHODS)
def test_numpy_integer_parameters_are_accepted_as_ints(method):
    """``np.int64(8)`` (what indexing a numpy array gives) is an int parameter like ``8``, as ``np.float64`` already
    is a float one; it is stored as a Python ``int``, so the recorded parameters stay JSON-ready."""
    names = _int_parameters(method)
    assert "chunk_size" in names
    for name in names:
        small = 2 if name == "n_nonzero" else 3  # n_nonzero must also fit min(d, n_atoms)
        for value in (np.int64(small), np.int32(small), np.uint16(small)):
            solver = make_solver(method, **{**SOLVER_TABLE[method].params, name: value})
            assert type(getattr(solver, name)) is int and getattr(solver, name) == small
            json.dumps(solver.params())  # raises TypeError for a numpy scalar
    if "n_nonzero" in names:
        targets, dictionary = make_problem("block")
        params = {**SOLVER_TABLE[method].params}
        by_numpy = decompose(targets, dictionary, method=method, **{**params, "n_nonzero": np.int64(2)})
        by_int = decompose(targets, dictionary, method=method, **{**params, "n_nonzero": 2})
        torch.testing.assert_close(by_numpy.coefficients, by_int.coefficients, rtol=0, atol=0)
        assert by_numpy.params["n_nonzero"] == 2


@pytest.mark.parametrize("method", METHODS)
def test_bools_and_floats_are_refused_as_int_parameters(method):
    for name in _int_parameters(method):
        for value in (True, np.bool_(True), 8.0, np.float64(8.0), "8"):
            with pytest.raises(InputTypeError, match=f"{name} must be an int, got {type(value).__name__}"):
                make_solver(method, **{**SOLVER_TABLE[method].params, name: value})
        with pytest.raises(InputError, match=f"{name} must be >= 1, got 0"):
            make_solver(method, **{**SOLVER_TABLE[method].params, name: np.int64(0)})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_is_the_float32_solve_rounded(method, dtype, kind):
    """Every solver upcasts half precision the same way: the answer for half-precision inputs is the answer for the
    same values in float32 (float64 for the cvxpy references), rounded to the input dtype -- codes, objective and
    certificate alike (pinv once computed its objective in bfloat16 and the lasso rounded alpha to half)."""
    targets, dictionary = make_problem(kind, dtype)
    upcast = dictionary.to(dtype=torch.float32) if isinstance(dictionary, Dictionary) else dictionary.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        half = solve(method, targets, dictionary)
        single = solve(method, targets.float(), upcast)
    for name in ("coefficients", "objective", "certificate"):
        torch.testing.assert_close(getattr(half, name), getattr(single, name).to(dtype), rtol=0, atol=0, msg=name)
    assert torch.equal(half.status, single.status)
