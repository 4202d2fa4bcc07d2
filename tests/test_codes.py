"""Codes: the dense and row-padded sparse layouts must be interchangeable for every consumer."""

import pytest
import torch

from sparsedecomp import BlockDictionary
from sparsedecomp.codes import Codes
from sparsedecomp.errors import InputError
from sparsedecomp.evaluation.metrics import head_mass, l0, l1, top_k_mass_share


def random_sparse(n=7, n_atoms=40, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n, n_atoms, dtype=dtype)
    for i in range(n):
        m = i % (k + 1)  # rows with 0..k non-zeros, so rows differ in width (row 0 is the zero code)
        idx = torch.randperm(n_atoms, generator=g)[:m]
        dense[i, idx] = torch.randn(m, generator=g, dtype=dtype)
    return dense


def test_sparse_round_trip_and_width():
    dense = random_sparse()
    codes = Codes.from_dense(dense, layout="sparse")
    assert codes.is_sparse and codes.width == 5  # the widest row, not n_atoms
    assert torch.equal(codes.to_dense(), dense)
    assert torch.equal(Codes.from_dense(dense, layout="dense").to_dense(), dense)


def test_auto_layout_picks_the_smaller_one():
    sparse = random_sparse(n_atoms=400)
    assert Codes.from_dense(sparse).is_sparse
    full = torch.randn(4, 40, dtype=torch.float64)
    assert not Codes.from_dense(full).is_sparse
    # A sparse container holding a dense code is converted back by compact().
    assert not Codes.from_dense(full, layout="sparse").compact().is_sparse


def test_matmul_and_block_reconstruction_match_dense():
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    dictionary = BlockDictionary.from_blocks(blocks, normalize=True)
    dense = random_sparse(n_atoms=dictionary.n_atoms)
    codes = Codes.from_dense(dense, layout="sparse")
    expected = dense @ dictionary.atoms
    assert torch.allclose(codes.matmul(dictionary.atoms), expected, atol=1e-12)
    assert torch.allclose(dictionary.reconstruct(codes), expected, atol=1e-12)
    assert torch.allclose(dictionary.reconstruct(Codes.dense(dense)), expected, atol=1e-12)


def test_metrics_agree_between_layouts():
    dense = random_sparse(n_atoms=40)
    sparse = Codes.from_dense(dense, layout="sparse")
    head = torch.arange(40) // 10
    assert torch.equal(l0(sparse), l0(dense))
    assert torch.allclose(l1(sparse), l1(dense))
    assert torch.allclose(top_k_mass_share(sparse, k=2), top_k_mass_share(dense, k=2))
    assert torch.allclose(head_mass(sparse, head, 4), head_mass(dense, head, 4))


def test_cat_pads_to_the_widest_part_and_mixed_layouts_become_dense():
    a = Codes.from_dense(random_sparse(seed=2, k=2), layout="sparse")
    b = Codes.from_dense(random_sparse(seed=3, k=5), layout="sparse")
    joined = Codes.cat([a, b])
    assert joined.is_sparse and joined.width == max(a.width, b.width)
    assert torch.equal(joined.to_dense(), torch.cat([a.to_dense(), b.to_dense()]))
    mixed = Codes.cat([a, Codes.dense(b.to_dense())])
    assert not mixed.is_sparse and torch.equal(mixed.to_dense(), joined.to_dense())


def test_nan_entries_are_kept_not_dropped():
    dense = torch.zeros(2, 30, dtype=torch.float64)
    dense[1] = float("nan")
    codes = Codes.from_dense(dense)
    assert torch.isnan(codes.to_dense()[1]).all() and (codes.to_dense()[0] == 0).all()


def test_nonzero_entries_and_row_support():
    dense = torch.zeros(2, 6, dtype=torch.float64)
    dense[0, 4], dense[0, 1], dense[1, 2] = 0.5, -2.0, 1.0
    codes = Codes.from_dense(dense, layout="sparse")
    rows, atoms, values = codes.nonzero_entries()
    assert rows.tolist() == [0, 0, 1] and sorted(atoms[:2].tolist()) == [1, 4] and atoms[2] == 2
    atoms0, values0 = codes.row_support(0)
    assert atoms0.tolist() == [1, 4] and values0.tolist() == [-2.0, 0.5]


def test_bad_shapes_are_named():
    with pytest.raises(InputError, match="dense codes must have 5 columns"):
        Codes(torch.zeros(2, 4), None, 5)
    with pytest.raises(InputError, match="indices must be long"):
        Codes(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.long), 9)
    with pytest.raises(InputError, match="cannot multiply 3 atoms"):
        Codes.dense(torch.zeros(2, 4)).matmul(torch.zeros(3, 2))


def test_rows_by_int_keeps_the_two_dimensional_layout():
    dense = random_sparse()
    codes = Codes.from_dense(dense, layout="sparse")
    assert torch.equal(codes.rows(3).to_dense(), dense[3:4])
    assert torch.equal(codes.rows(-1).to_dense(), dense[-1:])
