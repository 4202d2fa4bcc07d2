"""Codes of a batch of targets, stored dense or sparse: :class:`Codes`.

A code row ``c`` (``(n_atoms,)``) reconstructs ``c @ atoms``. The sparse solvers keep at most a few dozen non-zeros
per row (OMP at most ``n_nonzero``), so at gelu-2l size (16,384 targets x 16,384 atoms) a dense float32 matrix
would take 1.07 GB where the non-zeros take a few MB. :class:`Codes` holds either layout behind one interface:

* **dense**: ``values`` is ``(n, n_atoms)`` and ``indices`` is ``None``;
* **sparse** (row-padded): ``values`` and ``indices`` are ``(n, width)``; row ``i``'s code is
  ``c[indices[i, s]] = values[i, s]`` summed over slots ``s``. Unused slots hold value 0 (and index 0), so every
  reduction over slots (sums, maxima of ``|c|``, counts of non-zeros) needs no mask. Each atom appears at most once
  per row among the non-zero slots.

Row padding (rather than CSR) keeps every operation a batched tensor operation on CPU and GPU alike; the width is
the largest number of non-zeros of any row. :meth:`Codes.compact` picks whichever layout takes fewer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

# Rows per block in matmul, bounded so the gathered (rows, width, d) atoms stay around 2^24 elements.
_GATHER_ELEMENTS = 2**24


@dataclass(frozen=True, eq=False)
class Codes:
    """Codes of ``n`` targets on ``n_atoms`` atoms (see the module docstring for the two layouts).

    Attributes:
        values: ``(n, n_atoms)`` when dense, ``(n, width)`` when sparse.
        indices: ``None`` when dense; ``(n, width)`` long atom indices when sparse.
        n_atoms: the number of atoms (columns of the dense view).
    """

    values: Tensor
    indices: Tensor | None
    n_atoms: int

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise InputError(f"code values must be 2-D, got shape {tuple(self.values.shape)}")
        if self.indices is None:
            if self.values.shape[1] != self.n_atoms:
                raise InputError(f"dense codes must have {self.n_atoms} columns, got {self.values.shape[1]}")
        elif self.indices.shape != self.values.shape or self.indices.dtype != torch.long:
            raise InputError(f"sparse code indices must be long with the values' shape {tuple(self.values.shape)}, "
                             f"got {self.indices.dtype} {tuple(self.indices.shape)}")

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, values: Tensor) -> "Codes":
        return cls(values, None, values.shape[1])

    @classmethod
    def sparse(cls, indices: Tensor, values: Tensor, n_atoms: int) -> "Codes":
        """Row-padded codes; zero-valued slots are padding whatever their index."""
        return cls(values, indices.long(), n_atoms)

    @classmethod
    def from_dense(cls, dense: Tensor, *, layout: str = "auto") -> "Codes":
        """Codes holding ``dense`` (``(n, n_atoms)``) in the ``"dense"``, ``"sparse"`` or smaller (``"auto"``)
        layout. Non-finite entries (a failed reference solve's NaN row) are kept as entries."""
        if layout not in ("auto", "dense", "sparse"):
            raise InputError(f"layout must be 'auto', 'dense' or 'sparse', got {layout!r}")
        n, n_atoms = dense.shape
        present = dense != 0  # NaN != 0, so NaN entries are kept
        width = int(present.sum(dim=1).max()) if n > 0 else 0
        if layout == "dense" or (layout == "auto" and not _sparse_is_smaller(width, n_atoms, dense.element_size())):
            return cls.dense(dense)
        atoms = torch.arange(n_atoms, device=dense.device).expand(n, -1)
        return cls.sparse(*pack_rows(atoms, dense, width), n_atoms)

    def compact(self) -> "Codes":
        """The same codes in whichever layout takes fewer bytes, with sparse rows stripped of trailing padding."""
        if self.indices is None:
            return Codes.from_dense(self.values)
        present = self.values != 0
        width = int(present.sum(dim=1).max()) if self.n_targets > 0 else 0
        if not _sparse_is_smaller(width, self.n_atoms, self.values.element_size()):
            return Codes.dense(self.to_dense())
        if width == self.width:
            return self
        return Codes.sparse(*pack_rows(self.indices, self.values, width), self.n_atoms)

    @staticmethod
    def cat(parts: list["Codes"]) -> "Codes":
        """Codes of consecutive target chunks, in one layout (sparse only if every part is sparse)."""
        if len(parts) == 1:
            return parts[0]
        n_atoms = parts[0].n_atoms
        if any(p.n_atoms != n_atoms for p in parts):
            raise InputError(f"cannot join codes on different numbers of atoms: {[p.n_atoms for p in parts]}")
        if any(p.indices is None for p in parts):
            return Codes.dense(torch.cat([p.to_dense() for p in parts]))
        width = max(p.width for p in parts)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        return Codes.sparse(torch.cat([pad(p.indices) for p in parts]), torch.cat([pad(p.values) for p in parts]),
                            n_atoms)

    # -- shape and layout ----------------------------------------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    @property
    def layout(self) -> str:
        return "sparse" if self.is_sparse else "dense"

    @property
    def n_targets(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        """Slots per row: ``n_atoms`` when dense."""
        return self.values.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_targets, self.n_atoms)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held (values, plus indices when sparse)."""
        total = self.values.numel() * self.values.element_size()
        if self.indices is not None:
            total += self.indices.numel() * self.indices.element_size()
        return total

    def atom_indices(self) -> Tensor:
        """``(n, width)`` atom index of every slot (``arange(n_atoms)`` per row when dense)."""
        if self.indices is not None:
            return self.indices
        return torch.arange(self.n_atoms, device=self.device).expand(self.n_targets, -1)

    # -- conversions ---------------------------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The ``(n, n_atoms)`` dense matrix (a new tensor when sparse; the stored one when dense)."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.n_targets, self.n_atoms)
        # Padding slots add 0 to whatever atom they name.
        return out.scatter_add_(1, self.indices, self.values)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Codes":
        values = self.values.to(device=device, dtype=dtype)
        indices = None if self.indices is None else self.indices.to(device=device)
        return Codes(values, indices, self.n_atoms)

    def rows(self, index: int | slice | Tensor) -> "Codes":
        """The codes of a subset of targets (an ``int`` selects one target and keeps the 2-D layout)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Codes(self.values[index], None if self.indices is None else self.indices[index], self.n_atoms)

    def scaled(self, per_atom: Tensor) -> "Codes":
        """Codes with entry ``j`` multiplied by ``per_atom[j]`` (``(n_atoms,)``), in the same layout."""
        per_atom = per_atom.to(self.values)
        if self.indices is None:
            return Codes.dense(self.values * per_atom)
        return Codes(self.values * per_atom[self.indices], self.indices, self.n_atoms)

    def nonzero_entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(row, atom, value)`` of every non-zero entry, ordered by row."""
        if self.indices is None:
            nz = self.values.nonzero()
            return nz[:, 0], nz[:, 1], self.values[nz[:, 0], nz[:, 1]]
        nz = (self.values != 0).nonzero()
        return nz[:, 0], self.indices[nz[:, 0], nz[:, 1]], self.values[nz[:, 0], nz[:, 1]]

    def row_support(self, row: int, *, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
        """Atom indices and values of row ``row`` with ``|c_j| > threshold``, largest ``|c_j|`` first."""
        values = self.values[row]
        atoms = self.atom_indices()[row]
        keep = values.abs() > threshold
        values, atoms = values[keep], atoms[keep]
        order = values.abs().argsort(descending=True, stable=True)
        return atoms[order], values[order]

    # -- linear algebra ------------------------------------------------------------------------------------------
    def matmul(self, atoms: Tensor) -> Tensor:
        """``c @ atoms`` for ``atoms`` of shape ``(n_atoms, d)``; sparse codes gather only their atoms."""
        if atoms.shape[0] != self.n_atoms:
            raise InputError(f"codes on {self.n_atoms} atoms cannot multiply {atoms.shape[0]} atoms")
        if self.indices is None:
            return self.values @ atoms
        n, d = self.n_targets, atoms.shape[1]
        out = atoms.new_zeros(n, d)
        block = max(1, _GATHER_ELEMENTS // max(1, self.width * d))
        for start in range(0, n, block):
            idx, val = self.indices[start : start + block], self.values[start : start + block]
            out[start : start + block] = torch.bmm(val[:, None, :].to(atoms.dtype), atoms[idx]).squeeze(1)
        return out

    def group_sums(self, group_of_atom: Tensor, n_groups: int, *, absolute: bool = True) -> Tensor:
        """``(n, n_groups)``: ``sum_{group[j] = g} |c_j|`` (or ``c_j`` when not ``absolute``)."""
        values = self.values.abs() if absolute else self.values
        groups = group_of_atom.to(self.device)[self.atom_indices()]
        return values.new_zeros(self.n_targets, n_groups).scatter_add_(1, groups, values)


def pack_rows(indices: Tensor, values: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Row-padded ``(indices, values)`` with each row's non-zero slots moved to the front (in their order) and
    exactly ``width`` slots per row; the other slots are padding (value 0, index 0). ``width`` must be at least the
    largest number of non-zeros in a row (non-finite values count as non-zero)."""
    if values.shape[1] < width:  # zero padding is never "present"
        extra = width - values.shape[1]
        indices = torch.nn.functional.pad(indices, (0, extra))
        values = torch.nn.functional.pad(values, (0, extra))
    present = values != 0
    order = torch.argsort(present.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
    keep = present.gather(1, order)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return (torch.where(keep, indices.gather(1, order), torch.zeros_like(order)),
            torch.where(keep, values.gather(1, order), zero))


def _sparse_is_smaller(width: int, n_atoms: int, value_bytes: int) -> bool:
    """Whether ``width`` slots of value + long index take fewer bytes than ``n_atoms`` dense values."""
    return width * (value_bytes + 8) < n_atoms * value_bytes
