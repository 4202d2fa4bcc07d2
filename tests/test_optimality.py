"""The solver-independent certificates agree with their textbook definitions."""

import pytest
import torch

from sparsedecomp import optimality
from sparsedecomp.optimality import alpha_max, lasso_duality_gap, lasso_objective


def textbook_gap(y, c, D, alpha, nonnegative):
    """``P(c) - D(theta)`` with ``theta = r / max(1, worst / alpha)``, written the direct way."""
    r = y - c @ D
    g = r @ D.T
    worst = g.max(dim=1).values.clamp_min(0) if nonnegative else g.abs().max(dim=1).values
    theta = r / torch.clamp(worst / alpha, min=1.0)[:, None]
    dual = 0.5 * y.pow(2).sum(1) - 0.5 * (y - theta).pow(2).sum(1)
    return (lasso_objective(y, c, D, alpha) - dual) / y.pow(2).sum(1)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_duality_gap_equals_the_textbook_formula(nonnegative):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(40, 12, generator=g, dtype=torch.float64)
    y = torch.randn(6, 12, generator=g, dtype=torch.float64)
    c = torch.rand(6, 40, generator=g, dtype=torch.float64) * (torch.rand(6, 40, generator=g) < 0.2)
    if not nonnegative:
        c = c * torch.sign(torch.randn(6, 40, generator=g, dtype=torch.float64))
    alpha = 0.3
    got = lasso_duality_gap(y, c, D, alpha, nonnegative=nonnegative)
    want = textbook_gap(y, c, D, alpha, nonnegative)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert bool((got > 0).all())


def test_zero_code_at_alpha_max_has_zero_gap_and_negative_code_is_infeasible():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(4, 8, generator=g, dtype=torch.float64)
    zero = torch.zeros(4, 30, dtype=torch.float64)
    gap = lasso_duality_gap(y, zero, D, alpha_max(y, D, nonnegative=True), nonnegative=True)
    assert float(gap.abs().max()) < 1e-15
    negative = zero.clone()
    negative[0, 0] = -1.0
    assert torch.isinf(lasso_duality_gap(y, negative, D, 0.1, nonnegative=True)[0])


def test_certificates_accept_a_dictionary_as_well_as_its_atoms():
    from sparsedecomp import Dictionary

    g = torch.Generator().manual_seed(5)
    atoms = torch.randn(12, 4, generator=g, dtype=torch.float64)
    targets = torch.randn(3, 4, generator=g, dtype=torch.float64)
    dictionary = Dictionary.from_atoms(atoms)
    assert torch.equal(optimality.alpha_max(targets, dictionary), optimality.alpha_max(targets, atoms))
    code = torch.zeros(3, 12, dtype=torch.float64)
    assert torch.equal(optimality.lasso_duality_gap(targets, code, dictionary, 0.1),
                       optimality.lasso_duality_gap(targets, code, atoms, 0.1))
