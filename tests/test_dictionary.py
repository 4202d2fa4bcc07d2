"""BlockDictionary layout, normalisation, ranks, mixing through W_O, and input errors."""

from __future__ import annotations

import pytest
import torch

from sparsedecomp import BlockDictionary, Dictionary, mix_targets

F64 = torch.float64
D_HEAD = 4
SIZES = (6, 9, 5)  # features per head; every block has more features than d_head (generic: full rank)
D_MODEL = 7


@pytest.fixture(scope="module")
def blocks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, D_HEAD, generator=g, dtype=F64) * (1 + h) for h, n in enumerate(SIZES)]


@pytest.fixture(scope="module")
def W_O() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(len(SIZES), D_HEAD, D_MODEL, generator=g, dtype=F64)


def test_from_blocks_layout(blocks):
    d = BlockDictionary.from_blocks(blocks, normalize=False)
    n_heads = len(SIZES)
    assert d.atoms.shape == (sum(SIZES), n_heads * D_HEAD)
    assert d.d_head == D_HEAD and d.n_heads == n_heads and d.space == "z" and d.is_block_diagonal
    assert d.block_columns == tuple((h * D_HEAD, (h + 1) * D_HEAD) for h in range(n_heads))
    expected_head = torch.cat([torch.full((n,), h) for h, n in enumerate(SIZES)])
    expected_feature = torch.cat([torch.arange(n) for n in SIZES])
    assert torch.equal(d.head, expected_head)
    assert torch.equal(d.feature, expected_feature)
    for h, block in enumerate(blocks):
        rows = d.head_atoms(h)
        a, b = h * D_HEAD, (h + 1) * D_HEAD
        assert torch.equal(d.atoms[rows, a:b], block)
        others = torch.ones(n_heads * D_HEAD, dtype=torch.bool)
        others[a:b] = False
        assert bool((d.atoms[rows][:, others] == 0).all())
        assert torch.equal(d.block(h), block)
    assert torch.equal(d.scales, torch.ones(sum(SIZES), dtype=F64))


def test_normalize_scales_and_feature_units_round_trip(blocks):
    raw = BlockDictionary.from_blocks(blocks, normalize=False)
    unit = BlockDictionary.from_blocks(blocks, normalize=True)
    norms = torch.cat([b.norm(dim=1) for b in blocks])
    torch.testing.assert_close(unit.scales, norms)
    torch.testing.assert_close(unit.atoms.norm(dim=1), torch.ones(sum(SIZES), dtype=F64))
    torch.testing.assert_close(unit.atoms * norms[:, None], raw.atoms)
    # A code on the unit atoms and the same code in feature units reconstruct the same vector.
    g = torch.Generator().manual_seed(2)
    c = torch.randn(3, sum(SIZES), generator=g, dtype=F64)
    f = unit.to_feature_units(c)
    torch.testing.assert_close(f, c / norms)
    torch.testing.assert_close(f @ raw.atoms, c @ unit.atoms)


def test_ranks_generic_blocks(blocks):
    d = BlockDictionary.from_blocks(blocks)
    assert d.head_ranks() == {h: D_HEAD for h in range(len(SIZES))}
    assert d.rank() == len(SIZES) * D_HEAD


def test_ranks_deficient_block(blocks):
    # Head 1 built from two directions only: its rank is 2, and the whole dictionary loses D_HEAD - 2.
    g = torch.Generator().manual_seed(3)
    low = torch.randn(SIZES[1], 2, generator=g, dtype=F64) @ torch.randn(2, D_HEAD, generator=g, dtype=F64)
    d = BlockDictionary.from_blocks([blocks[0], low, blocks[2]])
    assert d.head_ranks() == {0: D_HEAD, 1: 2, 2: D_HEAD}
    assert d.rank() == len(SIZES) * D_HEAD - (D_HEAD - 2)


def test_mix_semantics(blocks, W_O):
    d = BlockDictionary.from_blocks(blocks)
    mixed = d.mix(W_O)
    assert mixed.atoms.shape == (sum(SIZES), D_MODEL)
    assert mixed.space == "residual" and not mixed.is_block_diagonal
    assert torch.equal(mixed.head, d.head) and torch.equal(mixed.feature, d.feature)
    assert torch.equal(mixed.scales, d.scales)
    # Atom i of head h is d_i @ W_O[h].
    for h in range(len(SIZES)):
        torch.testing.assert_close(mixed.atoms[d.head_atoms(h)], d.block(h) @ W_O[h])
    g = torch.Generator().manual_seed(4)
    c = torch.randn(5, sum(SIZES), generator=g, dtype=F64)
    W_cat = W_O.reshape(-1, D_MODEL)
    torch.testing.assert_close(c @ mixed.atoms, (c @ d.atoms) @ W_cat)
    z = torch.randn(5, len(SIZES) * D_HEAD, generator=g, dtype=F64)
    torch.testing.assert_close(mix_targets(z, W_O), z @ W_cat)
    # mix_targets of a reconstruction is the mixed reconstruction.
    torch.testing.assert_close(mix_targets(c @ d.atoms, W_O), c @ mixed.atoms)


def test_mix_wrong_shapes(blocks, W_O):
    d = BlockDictionary.from_blocks(blocks)
    with pytest.raises(ValueError, match="W_O"):
        d.mix(W_O[:2])
    with pytest.raises(ValueError, match="W_O"):
        d.mix(W_O[:, :3])
    with pytest.raises(ValueError, match="W_O"):
        d.mix(W_O[0])
    with pytest.raises(ValueError, match="columns"):
        mix_targets(torch.zeros(2, 5, dtype=F64), W_O)
    bad = W_O.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        d.mix(bad)


def test_from_blocks_errors(blocks):
    with pytest.raises(ValueError, match="at least one"):
        BlockDictionary.from_blocks([])
    with pytest.raises(ValueError, match="d_head"):
        BlockDictionary.from_blocks([blocks[0], torch.randn(5, D_HEAD + 1, dtype=F64)])
    with pytest.raises(ValueError, match="2 dimensions"):
        BlockDictionary.from_blocks([blocks[0], torch.randn(D_HEAD, dtype=F64)])
    nan_block = blocks[1].clone()
    nan_block[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\[1\] contains 1 NaN"):
        BlockDictionary.from_blocks([blocks[0], nan_block])
    dead = blocks[2].clone()
    dead[3] = 0
    with pytest.raises(ValueError, match="all-zero"):
        BlockDictionary.from_blocks([blocks[0], dead])
    with pytest.raises(ValueError, match="float32"):
        BlockDictionary.from_blocks([blocks[0], blocks[1].float()])
    with pytest.raises(TypeError, match="floating-point"):
        BlockDictionary.from_blocks([torch.ones(3, D_HEAD, dtype=torch.long)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockDictionary.from_blocks([[1.0, 2.0]])


def test_dense_dictionary_errors():
    with pytest.raises(ValueError, match="all-zero"):
        Dictionary.from_atoms(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="2 dimensions"):
        Dictionary.from_atoms(torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="Inf"):
        Dictionary.from_atoms(torch.tensor([[1.0, float("inf")]], dtype=F64))


def test_to_dtype_keeps_labels(blocks):
    d = BlockDictionary.from_blocks(blocks)
    single = d.to(dtype=torch.float32)
    assert isinstance(single, BlockDictionary)
    assert single.atoms.dtype == torch.float32 and single.scales.dtype == torch.float32
    assert single.head.dtype == torch.long and single.feature.dtype == torch.long
    assert single.d_head == D_HEAD and single.block_columns == d.block_columns
    torch.testing.assert_close(single.atoms.double(), d.atoms, rtol=1e-6, atol=1e-7)
    assert d.atoms.dtype == F64  # the original is untouched


def test_stacked_round_trip(blocks):
    d = BlockDictionary.from_blocks(blocks)
    stacked = d.stacked()
    assert stacked.n_groups == len(SIZES)
    assert stacked.atoms.shape == (len(SIZES), max(SIZES), D_HEAD)
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, sum(SIZES), generator=g, dtype=F64)
    grouped = torch.zeros(2, len(SIZES), max(SIZES), dtype=F64)
    for h in range(len(SIZES)):
        grouped[:, h, : SIZES[h]] = c[:, d.head_atoms(h)]
        assert torch.equal(stacked.atoms[h, : SIZES[h]], d.block(h))
        assert bool((stacked.atoms[h, SIZES[h] :] == 0).all()) and not bool(stacked.mask[h, SIZES[h] :].any())
    assert torch.equal(stacked.scatter_coefficients(grouped, d.n_atoms), c)
    y = c @ d.atoms
    parts = stacked.split_targets(y)
    for h in range(len(SIZES)):
        torch.testing.assert_close(parts[:, h], grouped[:, h] @ stacked.atoms[h])


def test_atoms_whose_squared_norms_do_not_fit_the_dtype_are_refused():
    from sparsedecomp import Dictionary

    with pytest.raises(ValueError, match=r"atoms row 0 .* not representable in torch.float32"):
        Dictionary.from_atoms(torch.ones(3, 4) * 1e20)
    with pytest.raises(ValueError, match="not representable"):
        Dictionary.from_atoms(torch.ones(3, 4) * 1e-25)
