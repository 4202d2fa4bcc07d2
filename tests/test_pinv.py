"""The pseudoinverse solver is the minimum-norm least-squares solution, and the block split is exact."""

from __future__ import annotations

import pytest
import torch

from sparsedecomp import BlockDictionary, Dictionary, Status, decompose
from sparsedecomp.decomposition import EXACT
from sparsedecomp.optimality import least_squares_objective, least_squares_optimality

F64 = torch.float64


@pytest.fixture(scope="module")
def dense_case():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(30, 10, generator=g, dtype=F64)
    targets = torch.randn(5, 10, generator=g, dtype=F64)
    return atoms, targets


def test_matches_lstsq_minimum_norm(dense_case):
    atoms, targets = dense_case
    result = decompose(targets, atoms, method="pinv")
    # c D = y  <=>  D^T c^T = y^T: underdetermined (30 unknowns, 10 equations); gelsd returns the minimum-norm
    # solution.
    expected = torch.linalg.lstsq(atoms.T, targets.T, driver="gelsd").solution.T
    torch.testing.assert_close(result.coefficients, expected)
    torch.testing.assert_close(result.coefficients, targets @ torch.linalg.pinv(atoms))
    torch.testing.assert_close(result.reconstruction, targets)  # 30 generic atoms span R^10
    assert result.certificate_kind == EXACT
    assert result.statuses() == [Status.CONVERGED] * 5
    assert bool((result.certificate == 0).all())


def test_least_squares_when_targets_leave_the_span():
    # 12 atoms spanning only a 4-dimensional subspace of R^9: the answer is the least-squares projection.
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(12, 4, generator=g, dtype=F64) @ torch.randn(4, 9, generator=g, dtype=F64)
    targets = torch.randn(3, 9, generator=g, dtype=F64)
    result = decompose(targets, atoms, method="pinv")
    assert bool((least_squares_optimality(targets, result.coefficients, atoms) < 1e-10).all())
    expected = torch.linalg.lstsq(atoms.T, targets.T, driver="gelsd").solution.T
    torch.testing.assert_close(result.coefficients, expected)
    torch.testing.assert_close(result.objective, least_squares_objective(targets, result.coefficients, atoms))
    assert bool((result.objective > 0).all())


@pytest.mark.parametrize("sizes", [(8, 8, 8), (5, 11, 7)])  # equal blocks, and padded unequal blocks
def test_block_split_equals_dense(sizes):
    g = torch.Generator().manual_seed(2)
    d_head = 4
    blocks = [torch.randn(n, d_head, generator=g, dtype=F64) for n in sizes]
    block = BlockDictionary.from_blocks(blocks)
    dense = Dictionary.from_atoms(block.atoms)
    assert not dense.is_block_diagonal
    targets = torch.randn(6, len(sizes) * d_head, generator=g, dtype=F64)
    by_block = decompose(targets, block, method="pinv")
    by_dense = decompose(targets, dense, method="pinv")
    torch.testing.assert_close(by_block.coefficients, by_dense.coefficients)
    torch.testing.assert_close(by_block.coefficients, targets @ torch.linalg.pinv(block.atoms))
    # Each head's code reconstructs exactly that head's block of the target (the seed's per-head pinv).
    for h in range(len(sizes)):
        a, b = block.block_columns[h]
        head_code = by_block.coefficients[:, block.head_atoms(h)]
        torch.testing.assert_close(head_code, targets[:, a:b] @ torch.linalg.pinv(block.block(h)))
