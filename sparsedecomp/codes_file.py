"""The codes file: a decomposition's codes and per-target diagnostics in one safetensors file.

Tensors (``n`` targets, ``width`` slots per row):

* ``values``: float32, ``(n, width)`` when ``layout`` is ``"sparse"`` (with ``indices``: int32 atom indices,
  zero-valued slots are padding), or ``(n, n_atoms)`` when ``"dense"`` (the pseudoinverse's codes are dense:
  storing them as coordinates would take three times the bytes);
* ``objective``, ``certificate``: float32 ``(n,)`` (NaN / inf where a solver failed: see ``status``);
* ``iterations``: int32 ``(n,)``; ``status``: uint8 ``(n,)`` codes of :class:`~sparsedecomp.Status`;
* ``feature_index``: int32 ``(n,)`` the concat feature of each row (all features, or those selected);
* optional per-target float32 ``(n,)``: ``l1_weight`` (the lasso weight each target was solved with) and
  ``target_norm`` (residual space: ``||t @ W_O_cat||`` of each target before it was renormalised to unit norm);
* ``atom_head``, ``atom_feature``: int32 ``(n_atoms,)`` the head and per-head feature of every atom;
  ``atom_scale``: float32, ``coefficient / atom_scale`` is the per-head feature's activation in its SAE's units.

Metadata (strings): ``format``, ``layout``, ``n_atoms``, ``solver``, ``params`` (JSON), ``certificate_kind``,
``space``, and ``status_legend`` (JSON: status name -> ``{"code", "meaning"}``). Read it back with
:func:`read_codes_file`; safetensors never runs code from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .codes import Codes
from .decomposition import STATUS_LEGEND, Decomposition, Status
from .errors import InputError
from .jsonio import dumps_strict

CODES_FORMAT = "sparsedecomp-codes/1"


def codes_file_tensors(decomposition: Decomposition, extra: Mapping[str, Tensor] | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of the codes file for ``decomposition`` (see the module docstring); ``extra``
    per-target tensors (e.g. ``feature_index``, ``target_norm``, ``l1_weight``) are stored beside them, as int32
    when integer and float32 otherwise."""
    codes = decomposition.codes.compact().to(device="cpu", dtype=torch.float32)
    tensors = {"values": codes.values.contiguous()}
    if codes.is_sparse:
        tensors["indices"] = codes.indices.to(torch.int32).contiguous()
    tensors.update({
        "objective": decomposition.objective.detach().cpu().float().contiguous(),
        "certificate": decomposition.certificate.detach().cpu().float().contiguous(),
        "iterations": decomposition.iterations.detach().cpu().to(torch.int32).contiguous(),
        "status": decomposition.status.detach().cpu().to(torch.uint8).contiguous(),
    })
    for name, tensor in (extra or {}).items():
        if name in tensors or tensor.shape != (decomposition.n_targets,):
            raise InputError(f"extra codes-file tensor {name!r} must be a new per-target (n,) tensor")
        kind = torch.float32 if tensor.is_floating_point() else torch.int32
        tensors[name] = tensor.detach().cpu().to(kind).contiguous()
    dictionary = decomposition.dictionary
    if dictionary is not None:
        if dictionary.head is not None:
            tensors["atom_head"] = dictionary.head.cpu().to(torch.int32).contiguous()
        if dictionary.feature is not None:
            tensors["atom_feature"] = dictionary.feature.cpu().to(torch.int32).contiguous()
        tensors["atom_scale"] = dictionary.scales.detach().cpu().float().contiguous()
    metadata = {
        "format": CODES_FORMAT,
        "layout": codes.layout,
        "n_atoms": str(codes.n_atoms),
        "solver": decomposition.solver,
        "params": dumps_strict(dict(decomposition.params)),
        "certificate_kind": decomposition.certificate_kind,
        "space": "" if dictionary is None else str(dictionary.space),
        "status_legend": dumps_strict({s.name: {"code": int(s), "meaning": STATUS_LEGEND[s.name]} for s in Status}),
    }
    return tensors, metadata


def write_codes_file(path: str | Path, decomposition: Decomposition, extra: Mapping[str, Tensor] | None = None) -> None:
    """Write the codes file (not atomic by itself: the jobs write it through their :class:`RunWriter`)."""
    tensors, metadata = codes_file_tensors(decomposition, extra)
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors file of ``tensors`` and ``metadata`` with its JSON header's keys sorted, so that equal content
    gives equal bytes (safetensors keeps the metadata in a hash map, whose order changes from process to process).

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header padded with spaces to a
    multiple of 8 bytes, then the tensor data, whose offsets are relative to the data's start and so unchanged."""
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


@dataclass(frozen=True, eq=False)
class CodesFile:
    """A codes file read back: the codes and every stored per-target and per-atom tensor, plus the metadata."""

    codes: Codes
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]

    @property
    def status(self) -> list[Status]:
        return [Status(int(s)) for s in self.tensors["status"].tolist()]


def read_codes_file(path: str | Path) -> CodesFile:
    """Read a file written by :func:`write_codes_file`; a file in another format is refused by name."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no codes file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a file that is not safetensors
        raise InputError(f"{path} is not a safetensors file ({type(err).__name__}: {err})") from None
    if metadata.get("format") != CODES_FORMAT:
        raise InputError(f"{path} is not a sparsedecomp codes file (format {metadata.get('format')!r}, "
                         f"expected {CODES_FORMAT!r})")
    n_atoms = int(metadata["n_atoms"])
    values = tensors["values"]
    if metadata["layout"] == "sparse":
        codes = Codes.sparse(tensors["indices"].long(), values, n_atoms)
    else:
        codes = Codes.dense(values)
    metadata["params"] = json.loads(metadata["params"])
    metadata["status_legend"] = json.loads(metadata["status_legend"])
    return CodesFile(codes=codes, tensors=tensors, metadata=metadata)
