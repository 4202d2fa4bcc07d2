"""The contract every registered solver keeps, driven by one table of all solvers.

A new method added to ``SOLVERS`` must get a row in ``SOLVER_TABLE`` (``test_every_registered_method_is_in_the
_table`` fails otherwise), and then runs every contract test below: shapes, dtype and device kept, batch equals
per-row, zero target gives zero code, deterministic, inputs not mutated, input errors named, registry
entry points agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from sparsedecomp import SOLVERS, BlockDictionary, Dictionary, Status, decompose, make_solver
from sparsedecomp.decomposition import DUALITY_GAP, EXACT, KKT_VIOLATION


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

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_problem(kind: str, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    """A small dictionary (dense unit atoms or 3 heads x 8 atoms x 4 dims) and targets: planted non-negative
    3-atom combinations (so every non-negative problem is feasible), one zero row."""
    g = torch.Generator().manual_seed(0)
    if kind == "block":
        blocks = [torch.randn(PER_HEAD, D_HEAD, generator=g, dtype=torch.float64) for _ in range(N_HEADS)]
        dictionary: Dictionary | torch.Tensor = BlockDictionary.from_blocks(blocks).to(device, dtype)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_shapes_dtype_device(method, dtype, device):
    targets, dictionary = make_problem("dense", dtype, device)
    result = solve(method, targets, dictionary)
    n = N_TARGETS
    assert result.coefficients.shape == (n, N_ATOMS)
    assert result.reconstruction.shape == (n, DIM)
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


@pytest.mark.parametrize("kind", ["dense", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_per_row(method, kind):
    targets, dictionary = make_problem(kind)
    batch = solve(method, targets, dictionary)
    for i in range(N_TARGETS):
        row = solve(method, targets[i : i + 1], dictionary)
        torch.testing.assert_close(row.coefficients[0], batch.coefficients[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(row.objective[0], batch.objective[i], rtol=1e-5, atol=1e-8)
        assert int(row.status[0]) == int(batch.status[i])


@pytest.mark.parametrize("kind", ["dense", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_easy_problem_converges(method, kind):
    targets, dictionary = make_problem(kind)
    result = solve(method, targets, dictionary)
    assert not any(s.is_failure for s in result.statuses()), result.status_counts()
    if SOLVER_TABLE[method].nonnegative:
        assert bool((result.coefficients >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_zero_target_gives_zero_code(method, dtype):
    targets, dictionary = make_problem("dense", dtype)
    result = solve(method, targets, dictionary)
    assert bool((result.coefficients[ZERO_ROW] == 0).all())
    assert bool((result.reconstruction[ZERO_ROW] == 0).all())
    assert not Status(int(result.status[ZERO_ROW])).is_failure
    only_zero = solve(method, torch.zeros_like(targets), dictionary)
    assert bool((only_zero.coefficients == 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    targets, dictionary = make_problem("block")
    first = solve(method, targets, dictionary)
    second = solve(method, targets, dictionary)
    for name in ("coefficients", "objective", "certificate", "iterations", "status"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize("kind", ["dense", "block"])
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


@pytest.mark.parametrize("method", METHODS)
def test_decompose_and_make_solver_agree(method):
    targets, dictionary = make_problem("block")
    params = SOLVER_TABLE[method].params
    via_decompose = decompose(targets, dictionary, method=method, **params)
    solver = make_solver(method, **params)
    via_solver = solver.solve(targets, dictionary)
    assert solver.name == method == via_decompose.solver == via_solver.solver
    assert torch.equal(via_decompose.coefficients, via_solver.coefficients)
    assert dict(via_decompose.params) == dict(via_solver.params) == solver.params()
    for key, value in params.items():
        assert via_decompose.params[key] == value


@pytest.mark.parametrize("method", METHODS)
def test_chunking_does_not_change_the_answer(method):
    targets, dictionary = make_problem("dense")
    whole = solve(method, targets, dictionary)
    chunked = decompose(targets, dictionary, method=method, chunk_size=3, **SOLVER_TABLE[method].params)
    torch.testing.assert_close(chunked.coefficients, whole.coefficients, rtol=1e-4, atol=1e-4)
