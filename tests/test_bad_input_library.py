"""Bad and degenerate input to the library's solvers and dictionaries: each is refused by name or warned about once,
never answered silently (the catalogue of bad inputs run against the library, defects 1-5 and 7)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

import sparsedecomp
from sparsedecomp import BlockDictionary, Dictionary, InputError, InputTypeError, Status, decompose, make_solver
from sparsedecomp.optimality import alpha_max
from sparsedecomp.solvers import AlphaAboveMaxWarning, ZeroTargetWarning
from sparsedecomp.validation import check_device, check_targets

METHODS = {
    "pinv": {},
    "nnls": {},
    "lasso": {"alpha": 0.1, "alpha_is_fraction_of_max": True},
    "nn_lasso": {"alpha": 0.1, "alpha_is_fraction_of_max": True},
    "omp": {"n_nonzero": 3},
    "nn_omp": {"n_nonzero": 3},
}


def problem(n_targets: int = 6, seed: int = 0) -> tuple[Tensor, Dictionary]:
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(10, 4, generator=g) for _ in range(2)]
    dictionary = BlockDictionary.from_blocks(blocks)
    return torch.randn(n_targets, 8, generator=g), dictionary


def solve_recording(targets, dictionary, method, **params):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = decompose(targets, dictionary, method=method, **params)
    return result, caught


# -- 1. zero targets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_zero_targets_are_warned_about_once_naming_how_many_and_which(method):
    targets, dictionary = problem()
    targets[1] = 0
    targets[4] = 0
    result, caught = solve_recording(targets, dictionary, method, **METHODS[method], chunk_size=2)
    zero = [w for w in caught if issubclass(w.category, ZeroTargetWarning)]
    assert len(zero) == 1  # one per call, although the targets were solved in three chunks
    assert f"{method}: 2 of 6 targets are all zero (first rows [1, 4])" in str(zero[0].message)
    assert zero[0].filename == __file__  # points at the caller, not into the package
    assert bool((result.coefficients[[1, 4]] == 0).all())


def test_a_prepared_solver_warns_per_batch_and_not_for_non_zero_targets():
    targets, dictionary = problem()
    prepared = make_solver("nn_omp", n_nonzero=2).prepare(dictionary)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroTargetWarning)
        prepared.solve(targets)  # no zero row: no warning
    with pytest.warns(ZeroTargetWarning, match=r"nn_omp: 3 of 3 targets are all zero \(first rows \[0, 1, 2\]\)"):
        prepared.solve(torch.zeros(3, 8))


# -- 2. an absolute alpha at or above alpha_max ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["lasso", "nn_lasso"])
def test_an_absolute_alpha_above_every_alpha_max_is_warned_about(method):
    targets, dictionary = problem()
    result, caught = solve_recording(targets, dictionary, method, alpha=1e3)
    above = [w for w in caught if issubclass(w.category, AlphaAboveMaxWarning)]
    assert len(above) == 1
    message = str(above[0].message)
    assert f"{method}: alpha=1000 (absolute) is >= alpha_max for 6 of 6 targets" in message
    assert "alpha_is_fraction_of_max=True" in message
    assert bool((result.coefficients == 0).all())


def test_alpha_above_some_alpha_max_counts_those_targets_and_skips_zero_targets():
    targets, dictionary = problem()
    targets[0] *= 1e-3  # its alpha_max falls below alpha
    targets[3] = 0  # warned about as a zero target, not counted again here
    alpha = 0.5 * float(alpha_max(targets, dictionary)[[1, 2, 4, 5]].min())
    _, caught = solve_recording(targets, dictionary, "lasso", alpha=alpha)
    above = [str(w.message) for w in caught if issubclass(w.category, AlphaAboveMaxWarning)]
    assert len(above) == 1 and "for 1 of 6 targets (first rows [0]" in above[0]


def test_no_alpha_warning_for_a_fraction_or_a_small_absolute_alpha():
    targets, dictionary = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlphaAboveMaxWarning)
        decompose(targets, dictionary, method="lasso", alpha=1.0, alpha_is_fraction_of_max=True)
        decompose(targets, dictionary, method="nn_lasso", alpha=1e-3)


# -- 3. empty head blocks and zero W_O ----------------------------------------------------------------------
def test_an_empty_head_block_is_refused_naming_the_head():
    with pytest.raises(InputError, match=r"blocks\[1\] \(head 1\) has no atoms, shape \(0, 4\)"):
        BlockDictionary.from_blocks([torch.randn(3, 4), torch.zeros(0, 4), torch.randn(2, 4)])


def test_an_all_zero_W_O_is_refused():
    _, dictionary = problem()
    with pytest.raises(InputError, match=r"W_O \(2, 4, 6\) is all zero"):
        dictionary.mix(torch.zeros(2, 4, 6))


def test_a_head_whose_W_O_is_zero_is_refused_by_name():
    _, dictionary = problem()
    W_O = torch.randn(2, 4, 6)
    W_O[1] = 0
    with pytest.raises(InputError, match=r"W_O is all zero for heads \[1\] \(1 of 2 heads\)"):
        dictionary.mix(W_O)


def test_atoms_that_W_O_maps_to_zero_are_refused_by_row_and_head():
    # Head 0's W_O kills the first coordinate only; a decoder row along it mixes to zero.
    blocks = [torch.eye(4)[:3], torch.randn(2, 4)]
    dictionary = BlockDictionary.from_blocks(blocks)
    W_O = torch.randn(2, 4, 6)
    W_O[0, 0] = 0
    with pytest.raises(InputError, match=r"W_O maps 1 atoms to zero \(first rows \[0\], heads \[0\]\)"):
        dictionary.mix(W_O)


# -- 4. targets with huge norms -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_huge_targets_are_refused_naming_every_row_not_answered_converged(method):
    """The catalogue's concat decoder rows scaled by 1e30, and a row at float32's largest value."""
    targets, dictionary = problem()
    targets[2] *= 1e30
    targets[5, 0] = torch.finfo(torch.float32).max
    with pytest.raises(InputError, match=r"targets row 2 has entries up to .* not representable in torch\.float32 "
                                         r"\(2 of 6 rows, first \[2, 5\]\)"):
        decompose(targets, dictionary, method=method, **METHODS[method])


def test_the_largest_representable_targets_are_solved_right():
    """Just below the overflow, every method still gives a certified answer (no inf / NaN taken as converged)."""
    targets, dictionary = problem()
    targets = targets / targets.norm(dim=1, keepdim=True) * (0.9 * torch.finfo(torch.float32).max) ** 0.5
    for method in ("nnls", "lasso", "pinv"):
        result = decompose(targets, dictionary, method=method, **METHODS[method])
        assert result.status_counts() == {"CONVERGED": 6}
        fit = (result.reconstruction.double() - targets.double()).norm(dim=1) / targets.double().norm(dim=1)
        assert bool(torch.isfinite(fit).all())
        if method != "lasso":
            assert float(fit.max()) < 1e-3


def test_a_row_normalised_after_overflowing_is_a_zero_target_and_warned_about():
    """Dividing 1e30-scaled rows by their float32 norm (inf) gives zero rows: the solver must say so."""
    targets, dictionary = problem()
    targets[0] *= 1e30
    normalised = targets / targets.norm(dim=1, keepdim=True)
    with pytest.warns(ZeroTargetWarning, match=r"1 of 6 targets are all zero \(first rows \[0\]\)"):
        result = decompose(normalised, dictionary, method="nn_omp", n_nonzero=2)
    assert Status(int(result.status[0])) == Status.CONVERGED  # zero code, but no longer silently


@pytest.mark.parametrize("bad, what", [(float("inf"), "0 NaN and 1 Inf"), (float("nan"), "1 NaN and 0 Inf")])
def test_non_finite_targets_are_refused_by_name(bad, what):
    targets, dictionary = problem()
    targets[3, 1] = bad
    with pytest.raises(InputError, match=rf"targets contains {what} entries \(first at index \(3, 1\)\)"):
        decompose(targets, dictionary, method="nnls")


# -- 5. make_solver called positionally --------------------------------------------------------------------
def test_make_solver_refuses_positional_parameters_naming_the_accepted_ones():
    with pytest.raises(InputTypeError, match=r"method 'nn_lasso' takes keyword parameters only \(alpha, "
                                             r"alpha_is_fraction_of_max, chunk_size, max_iter, tol\); got 1 "
                                             r"positional value\(s\) \[0\.2\]"):
        sparsedecomp.make_solver("nn_lasso", 0.2)
    with pytest.raises(InputTypeError, match=r"method must be a method name \(str\)"):
        sparsedecomp.make_solver(["lasso"])


def test_decompose_refuses_a_positional_method():
    targets, dictionary = problem()
    with pytest.raises(InputTypeError, match=r"decompose takes targets and dictionary positionally, then method= .*"
                                             r"got positional value\(s\) \['lasso'\]"):
        decompose(targets, dictionary, "lasso", alpha=0.1)
    with pytest.raises(InputTypeError, match="then method= and the method's parameters by keyword"):
        decompose(targets, dictionary)


# -- 7. the meta device --------------------------------------------------------------------------------------
def test_the_meta_device_is_refused():
    with pytest.raises(InputError, match=r"device 'meta' holds no data"):
        check_device("meta")
    with pytest.raises(InputError, match=r"device 'meta' holds no data"):
        problem()[1].to(device="meta")


def test_meta_tensors_are_refused_by_name():
    targets, dictionary = problem()
    with pytest.raises(InputError, match="atoms is on the meta device, which holds no data"):
        decompose(targets, dictionary.atoms.to("meta"), method="pinv")
    with pytest.raises(InputError, match="targets is on the meta device, which holds no data"):
        check_targets(targets.to("meta"), 8)
