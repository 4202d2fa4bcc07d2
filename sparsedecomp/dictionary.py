"""Dictionaries: the atoms a target direction is decomposed into.

Convention (as an SAE ``W_dec``): ``atoms`` has shape ``(n_atoms, d)`` and rows are atoms, so a code
``coefficients`` of shape ``(n_targets, n_atoms)`` reconstructs ``coefficients @ atoms``.

Three kinds of dictionary appear in the per-head decomposition problem:

* :class:`Dictionary` -- any dense ``(n_atoms, d)`` matrix.
* :class:`BlockDictionary` -- per-head SAE decoders ``blocks[h]`` of shape ``(n_h, d_head)`` lifted into the
  concatenated ``z`` space ``d = n_heads * d_head``: head ``h`` owns columns ``h*d_head:(h+1)*d_head``, so the
  dictionary is block-diagonal and problems that are separable over coordinates of the code *and* blocks of the
  target (least squares, NNLS, lasso) split exactly into one independent problem per head.
* :meth:`BlockDictionary.mix` -- the same atoms after the output projection, ``a_i = d_i @ W_O[h(i)]`` in the
  residual stream (``d_model``); heads are no longer orthogonal and compete for the target ``t @ W_O_cat``.

Every atom remembers which head and which per-head feature it is. With ``normalize=True`` atoms are unit-norm
and the original norms are kept in ``scales``: a coefficient ``c_i`` on the unit atom equals the activation
``f_i = c_i / scales[i]`` of feature ``i`` in its SAE's own units, because ``c_i * d_i / ||d_i|| = f_i * d_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .codes import Codes
from .validation import check_device, check_norms_representable, check_tensor, first_indices
from .errors import InputError


@dataclass(frozen=True)
class StackedBlocks:
    """The dictionary as ``n_groups`` independent sub-dictionaries of equal (padded) size, for batched solvers.

    ``atoms[g]`` (``(n_groups, group_size, group_dim)``) acts on target columns ``columns[g]``; padded slots are
    zero atoms with ``atom_index == -1`` and ``mask == False``. A dense dictionary is one group that owns every
    column, so solvers can treat both cases with the same batched code.
    """

    atoms: Tensor
    mask: Tensor
    atom_index: Tensor
    columns: tuple[tuple[int, int], ...]

    @property
    def n_groups(self) -> int:
        return self.atoms.shape[0]

    def split_targets(self, targets: Tensor) -> Tensor:
        """``(n, d)`` targets -> ``(n, n_groups, group_dim)``: each group's share of every target."""
        return torch.stack([targets[:, a:b] for a, b in self.columns], dim=1)

    def scatter_coefficients(self, grouped: Tensor, n_atoms: int) -> Tensor:
        """``(n, n_groups, group_size)`` codes -> ``(n, n_atoms)`` in the dictionary's atom order."""
        # Explicit width: reshape(n, -1) is ambiguous for an empty batch.
        flat = grouped.reshape(grouped.shape[0], grouped.shape[1] * grouped.shape[2])
        index = self.atom_index.reshape(-1)
        keep = index >= 0
        out = flat.new_zeros(flat.shape[0], n_atoms)
        out[:, index[keep]] = flat[:, keep]
        return out


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A dense dictionary of ``n_atoms`` atoms in ``R^d`` with optional per-atom provenance.

    Attributes:
        atoms: ``(n_atoms, d)`` floating tensor; rows are atoms.
        scales: ``(n_atoms,)`` positive factors; ``coefficients / scales`` converts a code on these atoms to the
            original (un-normalised) feature units. All ones when the atoms were not rescaled.
        head: ``(n_atoms,)`` long tensor, the attention head that owns each atom, or ``None``.
        feature: ``(n_atoms,)`` long tensor, each atom's index within its head's SAE, or ``None``.
        block_columns: for an exactly block-diagonal dictionary, ``block_columns[h] = (start, stop)`` are the
            only columns head ``h``'s atoms touch; ``None`` otherwise.
        space: a label for the space atoms live in (``"dense"``, ``"z"`` or ``"residual"``).
    """

    atoms: Tensor
    scales: Tensor
    head: Tensor | None = None
    feature: Tensor | None = None
    block_columns: tuple[tuple[int, int], ...] | None = None
    space: str = "dense"

    def __post_init__(self) -> None:
        check_tensor(self.atoms, "atoms", ndim=2)
        n = self.atoms.shape[0]
        if n == 0 or self.atoms.shape[1] == 0:
            raise InputError(f"atoms must be a non-empty (n_atoms, d) matrix, got shape {tuple(self.atoms.shape)}")
        # Solvers work with ||d_j||^2: an atom whose square over/underflows would yield silent zero codes.
        check_norms_representable(self.atoms, "atoms")
        check_tensor(self.scales, "scales", ndim=1)
        if self.scales.shape[0] != n:
            raise InputError(f"scales must have shape ({n},), got {tuple(self.scales.shape)}")
        if bool((self.scales <= 0).any()):
            raise InputError("scales must be positive")
        for name in ("head", "feature"):
            label = getattr(self, name)
            if label is not None and (label.shape != (n,) or label.dtype != torch.long):
                raise InputError(f"{name} must be a long tensor of shape ({n},), got {label.dtype} {tuple(label.shape)}")
        if self.block_columns is not None and self.head is None:
            raise InputError("block_columns needs head labels")

    @classmethod
    def from_atoms(cls, atoms: Tensor, *, normalize: bool = False) -> "Dictionary":
        """A plain dense dictionary from an ``(n_atoms, d)`` matrix (e.g. any SAE ``W_dec``)."""
        check_tensor(atoms, "atoms", ndim=2)
        atoms, scales = _maybe_normalize(atoms, normalize, "atoms")
        return cls(atoms=atoms, scales=scales)

    # -- shape ---------------------------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def dim(self) -> int:
        return self.atoms.shape[1]

    @property
    def n_heads(self) -> int:
        return 0 if self.head is None else int(self.head.max()) + 1

    @property
    def dtype(self) -> torch.dtype:
        return self.atoms.dtype

    @property
    def device(self) -> torch.device:
        return self.atoms.device

    @property
    def is_block_diagonal(self) -> bool:
        return self.block_columns is not None

    def head_atoms(self, h: int) -> Tensor:
        """Indices of the atoms owned by head ``h``."""
        if self.head is None:
            raise InputError("this dictionary has no head labels")
        return (self.head == h).nonzero().squeeze(1)

    # -- conversion ----------------------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Dictionary":
        """A copy on ``device`` with floating tensors in ``dtype`` (labels stay long)."""
        if device is not None:
            device = check_device(device)

        def move(t: Tensor | None, floating: bool) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if floating else None)

        return type(self)(
            atoms=move(self.atoms, True),
            scales=move(self.scales, True),
            head=move(self.head, False),
            feature=move(self.feature, False),
            block_columns=self.block_columns,
            space=self.space,
        )

    def to_feature_units(self, coefficients: Tensor) -> Tensor:
        """Convert a code on these (possibly normalised) atoms into the SAE's own feature activations."""
        return coefficients / self.scales.to(coefficients)

    def reconstruct(self, coefficients: Tensor | Codes) -> Tensor:
        """``coefficients @ atoms``; sparse :class:`~sparsedecomp.codes.Codes` gather only their atoms, a dense
        code is multiplied per head block when block-diagonal (``n_heads`` times fewer flops, since head ``h``'s
        atoms are zero outside its own columns)."""
        if isinstance(coefficients, Codes):
            if coefficients.is_sparse:
                return coefficients.matmul(self.atoms)
            coefficients = coefficients.values
        if self.block_columns is None:
            return coefficients @ self.atoms
        out = coefficients.new_zeros(coefficients.shape[0], self.dim)
        for h, (a, b) in enumerate(self.block_columns):
            members = self.head_atoms(h)
            out[:, a:b] = coefficients[:, members] @ self.atoms[members, a:b]
        return out

    def stacked(self) -> StackedBlocks:
        """The dictionary as independent groups for batched solvers: one group per head when block-diagonal
        (padded with zero atoms to the largest head), else a single group that owns every column."""
        if self.block_columns is None:
            idx = torch.arange(self.n_atoms, device=self.device)
            return StackedBlocks(
                atoms=self.atoms[None],
                mask=torch.ones(1, self.n_atoms, dtype=torch.bool, device=self.device),
                atom_index=idx[None],
                columns=((0, self.dim),),
            )
        members = [self.head_atoms(h) for h in range(len(self.block_columns))]
        size = max(len(m) for m in members)
        width = max(b - a for a, b in self.block_columns)
        atoms = self.atoms.new_zeros(len(members), size, width)
        mask = torch.zeros(len(members), size, dtype=torch.bool, device=self.device)
        index = torch.full((len(members), size), -1, dtype=torch.long, device=self.device)
        for g, (m, (a, b)) in enumerate(zip(members, self.block_columns)):
            atoms[g, : len(m), : b - a] = self.atoms[m, a:b]
            mask[g, : len(m)] = True
            index[g, : len(m)] = m
        return StackedBlocks(atoms=atoms, mask=mask, atom_index=index, columns=self.block_columns)

    # -- analysis ------------------------------------------------------------------------------------------------
    def rank(self, *, rtol: float | None = None) -> int:
        """Numerical rank of the ``(n_atoms, d)`` atom matrix (the seed expects ``d`` = 512 for gelu-2l)."""
        return int(torch.linalg.matrix_rank(self.atoms.double(), rtol=rtol))

    def head_ranks(self, *, rtol: float | None = None) -> dict[int, int]:
        """Numerical rank of each head's atoms (the seed expects ``d_head`` = 64 per head)."""
        return {
            h: int(torch.linalg.matrix_rank(self.atoms[self.head_atoms(h)].double(), rtol=rtol))
            for h in range(self.n_heads)
        }

    def coherence(self) -> float:
        """Largest absolute cosine between two distinct atoms (computed in chunks)."""
        unit = self.atoms / self.atoms.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)
        best = 0.0
        for start in range(0, self.n_atoms, 4096):
            block = unit[start : start + 4096] @ unit.T
            rows = torch.arange(block.shape[0], device=self.device)
            block[rows, rows + start] = 0
            best = max(best, float(block.abs().max()))
        return best


@dataclass(frozen=True, eq=False)
class BlockDictionary(Dictionary):
    """Per-head SAE decoders lifted into the concatenated ``z`` space (block-diagonal).

    Atoms are ordered head-major: head 0's features first. ``d_head`` is the width of every block.
    """

    d_head: int = 0

    @classmethod
    def from_blocks(cls, blocks: Sequence[Tensor], *, normalize: bool = True) -> "BlockDictionary":
        """Lift per-head decoders ``blocks[h]`` of shape ``(n_features_h, d_head)`` into ``R^{n_heads * d_head}``.

        Atom ``i`` of head ``h`` becomes ``[0, ..., 0, d_i, 0, ..., 0]`` with ``d_i`` in columns
        ``h*d_head:(h+1)*d_head``. With ``normalize=True`` atoms are ``d_i / ||d_i||`` and ``scales`` keeps
        ``||d_i||`` (April-2024-recipe decoders have norms around 2, so this matters).
        """
        if isinstance(blocks, Tensor):
            blocks = list(blocks)
        if len(blocks) == 0:
            raise InputError("blocks must hold at least one (n_features, d_head) decoder")
        for h, b in enumerate(blocks):
            check_tensor(b, f"blocks[{h}]", ndim=2)
            if b.shape[0] == 0:
                # Head h would own columns that no atom touches: its share of every target is unexplainable.
                raise InputError(f"blocks[{h}] (head {h}) has no atoms, shape {tuple(b.shape)}: every head needs "
                                 "at least one (n_features, d_head) decoder row")
        d_head = blocks[0].shape[1]
        for h, b in enumerate(blocks):
            if b.shape[1] != d_head:
                raise InputError(f"blocks[{h}] has d_head {b.shape[1]} but blocks[0] has {d_head}; all heads must match")
            if b.dtype != blocks[0].dtype or b.device != blocks[0].device:
                raise InputError(f"blocks[{h}] is {b.dtype} on {b.device}; blocks[0] is {blocks[0].dtype} on {blocks[0].device}")
        n_heads = len(blocks)
        n_total = sum(b.shape[0] for b in blocks)
        ref = blocks[0]
        atoms = ref.new_zeros(n_total, n_heads * d_head)
        head = torch.empty(n_total, dtype=torch.long, device=ref.device)
        feature = torch.empty(n_total, dtype=torch.long, device=ref.device)
        start = 0
        for h, b in enumerate(blocks):
            stop = start + b.shape[0]
            atoms[start:stop, h * d_head : (h + 1) * d_head] = b
            head[start:stop] = h
            feature[start:stop] = torch.arange(b.shape[0], device=ref.device)
            start = stop
        atoms, scales = _maybe_normalize(atoms, normalize, "blocks")
        columns = tuple((h * d_head, (h + 1) * d_head) for h in range(n_heads))
        return cls(atoms=atoms, scales=scales, head=head, feature=feature, block_columns=columns, space="z", d_head=d_head)

    def to(self, device=None, dtype=None) -> "BlockDictionary":
        moved = Dictionary.to(self, device, dtype)
        return BlockDictionary(**{**moved.__dict__, "d_head": self.d_head})

    def block(self, h: int) -> Tensor:
        """Head ``h``'s atoms in its own ``d_head`` coordinates: ``(n_features_h, d_head)``."""
        a, b = self.block_columns[h]
        return self.atoms[self.head_atoms(h), a:b]

    def head_ranks(self, *, rtol: float | None = None) -> dict[int, int]:
        return {h: int(torch.linalg.matrix_rank(self.block(h).double(), rtol=rtol)) for h in range(self.n_heads)}

    def mix(self, W_O: Tensor) -> Dictionary:
        """The residual-space dictionary ``a_i = d_i @ W_O[h(i)]`` (``W_O``: ``(n_heads, d_head, d_model)``).

        Coefficients keep their meaning: ``c @ mixed.atoms == (c @ self.atoms) @ W_O_cat``, so a code found in
        the residual space is a code on the same per-head features. Atoms are not renormalised after mixing.
        """
        W_O = check_W_O(W_O, self.n_heads, self.d_head)
        W_cat = W_O.reshape(self.n_heads * self.d_head, -1).to(self.atoms)
        mixed = self.atoms @ W_cat
        _check_mixed_atoms(mixed, W_O, self.head)
        return Dictionary(
            atoms=mixed,
            scales=self.scales,
            head=self.head,
            feature=self.feature,
            block_columns=None,
            space="residual",
        )


def mix_targets(targets: Tensor, W_O: Tensor) -> Tensor:
    """Map concatenated-``z`` targets ``t`` (``(n, n_heads*d_head)``) to the residual stream: ``t @ W_O_cat``."""
    check_tensor(W_O, "W_O", ndim=3)
    n_heads, d_head, _ = W_O.shape
    check_tensor(targets, "targets", ndim=2)
    if targets.shape[1] != n_heads * d_head:
        raise InputError(
            f"targets have {targets.shape[1]} columns but W_O {tuple(W_O.shape)} expects n_heads*d_head = {n_heads * d_head}"
        )
    return targets @ W_O.reshape(n_heads * d_head, -1).to(targets)


def check_W_O(W_O: Tensor, n_heads: int, d_head: int) -> Tensor:
    """Check ``W_O`` is one layer's ``(n_heads, d_head, d_model)`` output projection (TransformerLens layout)."""
    check_tensor(W_O, "W_O", ndim=3)
    if W_O.shape[0] != n_heads or W_O.shape[1] != d_head:
        raise InputError(
            f"W_O must have shape (n_heads={n_heads}, d_head={d_head}, d_model); got {tuple(W_O.shape)}. "
            "Pass one layer, e.g. model.W_O[layer]."
        )
    return W_O


def _check_mixed_atoms(mixed: Tensor, W_O: Tensor, head: Tensor) -> None:
    """Refuse a mixing that leaves atoms zero, as :func:`_maybe_normalize` refuses zero atoms: a zero atom can never
    be used, so its feature would be silently absent from every code (and OMP, which divides by atom norms, stops
    on it).

    Heads whose ``W_O[h]`` is all zero are named as such (an all-zero ``W_O`` is the wrong matrix, e.g. an
    uninitialised or pruned layer); any other atom that ``W_O`` maps to zero is named by row."""
    dead_heads = [h for h in range(W_O.shape[0]) if not bool((W_O[h] != 0).any())]
    if len(dead_heads) == W_O.shape[0]:
        raise InputError(f"W_O {tuple(W_O.shape)} is all zero: every mixed atom would be zero; pass the layer's "
                         "output projection, e.g. model.W_O[layer]")
    if dead_heads:
        raise InputError(
            f"W_O is all zero for heads {dead_heads} ({len(dead_heads)} of {W_O.shape[0]} heads), so "
            "every atom of those heads mixes to zero and no residual-space code can use them; decompose in z "
            "space instead (the block dictionary itself), or check W_O"
        )
    zero = ~(mixed != 0).any(dim=1)
    if bool(zero.any()):
        rows = first_indices(zero)
        raise InputError(
            f"W_O maps {int(zero.sum())} atoms to zero (first rows {rows}, heads {head[rows].tolist()}): their "
            "decoder rows lie in the null space of their head's W_O; drop those features first"
        )


def _maybe_normalize(atoms: Tensor, normalize: bool, name: str) -> tuple[Tensor, Tensor]:
    check_tensor(atoms, name, ndim=2)
    # First, so that atoms too small to square are not reported as all-zero.
    check_norms_representable(atoms, name)
    norms = atoms.norm(dim=1)
    if bool((norms == 0).any()):
        zero = first_indices(norms == 0)
        raise InputError(f"{name} has {int((norms == 0).sum())} all-zero atoms (first rows {zero}); drop dead features first")
    if not normalize:
        return atoms, torch.ones_like(norms)
    return atoms / norms[:, None], norms
