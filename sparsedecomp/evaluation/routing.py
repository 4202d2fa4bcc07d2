"""Routing a concat SAE through a decomposition onto the per-head atoms: :class:`RoutedDecoder`.

The concat SAE reconstructs ``z_hat = sum_f a_f W_dec[f] + b_dec`` with ``a = encode(z)``. A decomposition writes
each unit decoder row ``t_f = W_dec[f] / ||W_dec[f]||`` as a code ``C[f]`` on the unit per-head atoms ``d_i`` (the
block dictionary ``head_saes.dictionary(normalize=True)``, see :mod:`sparsedecomp.jobs.solve`). Routing replaces
each decoder row by its decomposition::

    z_hat = sum_f a_f ||W_dec[f]|| sum_i C[f, i] d_i + b_dec = a @ W_routed + b_dec,
    W_routed[f] = ||W_dec[f]|| (C[f] @ atoms_z)                               (z-space decomposition)

so splicing ``z_hat`` in asks how much of the concat SAE's loss recovery survives when its features are built from
per-head features only. In the residual space the decomposition driver decomposes ``u_f = t_f @ W_O_cat / r_f`` (``r_f =
||t_f @ W_O_cat||``) into the mixed atoms ``d_i @ W_O[h(i)]``; codes keep their meaning (``c @ mixed.atoms == (c @
atoms_z) @ W_O_cat``), so ``W_routed[f] = ||W_dec[f]|| r_f (C[f] @ atoms_z)`` and ``W_routed[f] @ W_O_cat`` is
exactly the residual-space reconstruction of ``W_dec[f] @ W_O_cat``: spliced into ``hook_z``, it writes that
reconstruction to the residual stream through ``W_O``.

A built-in check: with ``pinv`` on a full-rank block dictionary in ``z`` space, ``W_routed == W_dec`` up to rounding
(:func:`routing_error`), so ``routed_pinv`` splices in exactly like the concat SAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..decomposition import Decomposition
from ..dictionary import Dictionary, mix_targets
from ..errors import InputError, InputTypeError
from ..jsonio import to_jsonable

SPACES = ("z", "residual")
# Largest |difference| allowed between a decomposition's targets and the unit rows routing expects (unit vectors).
_TARGET_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class RoutedDecoder:
    """A concat SAE's decoder rebuilt from a decomposition: ``z_hat = encode(z) @ W_routed + b_dec``.

    Attributes:
        label: names the variant (``routed_<label>``).
        method: the solver's registry name.
        setting: JSON-ready solver parameters and status counts of the decomposition.
        space: ``"z"`` or ``"residual"``, where the decomposition was solved.
        W_routed: ``(d_sae, n_heads * d_head)``, row ``f`` as in the module docstring.
    """

    label: str
    method: str
    setting: Mapping[str, Any]
    space: str
    W_routed: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise InputError(f"a routed decoder needs a non-empty label, got {self.label!r}")
        if self.space not in SPACES:
            raise InputError(f"space must be one of {SPACES}, got {self.space!r}")
        if not isinstance(self.W_routed, Tensor) or self.W_routed.ndim != 2:
            raise InputError(f"W_routed must be a (d_sae, d_z) tensor, got {getattr(self.W_routed, 'shape', None)}")


def route_decomposition(concat_sae: Any, decomposition: Decomposition, z_dictionary: Dictionary, *, label: str,
                        W_O: Tensor | None = None) -> RoutedDecoder:
    """The :class:`RoutedDecoder` of ``decomposition`` (one code per concat feature, solved in ``z`` space or, when
    its dictionary's ``space`` is ``"residual"``, in the residual stream: then ``W_O`` ``(n_heads, d_head,
    d_model)`` is needed to recover the norms ``r_f``). ``z_dictionary`` is the unit block dictionary in ``z``
    space the codes refer to (``head_saes.dictionary(normalize=True)``, also for a residual-space decomposition).

    The decomposition's targets are checked to be this concat SAE's unit decoder rows (mixed through ``W_O`` for
    the residual space): routing another SAE's decomposition is refused."""
    if not isinstance(decomposition, Decomposition):
        raise InputTypeError(f"decomposition must be a Decomposition, got {type(decomposition).__name__}")
    if not isinstance(z_dictionary, Dictionary):
        raise InputTypeError(f"z_dictionary must be a Dictionary, got {type(z_dictionary).__name__}")
    d_sae, d_z = concat_sae.W_dec.shape
    if decomposition.n_targets != d_sae:
        raise InputError(f"decomposition {label!r} has {decomposition.n_targets} codes but the concat SAE has "
                         f"{d_sae} features")
    if decomposition.codes.n_atoms != z_dictionary.n_atoms or z_dictionary.dim != d_z:
        raise InputError(f"decomposition {label!r} has codes on {decomposition.codes.n_atoms} atoms; z_dictionary "
                         f"has {z_dictionary.n_atoms} atoms of width {z_dictionary.dim} (the concat SAE reads {d_z})")
    space = getattr(decomposition.dictionary, "space", "z")
    if space not in SPACES:
        raise InputError(f"decomposition {label!r} was solved in space {space!r}; routing needs 'z' or 'residual'")
    W_dec = concat_sae.W_dec.to(z_dictionary.dtype)
    norms = W_dec.norm(dim=1)
    unit = W_dec / norms.clamp_min(torch.finfo(W_dec.dtype).tiny)[:, None]
    if space == "residual":
        if W_O is None:
            raise InputError(f"decomposition {label!r} was solved in the residual space: pass W_O")
        mixed = mix_targets(unit, W_O.to(unit))
        residual_norms = mixed.norm(dim=1)
        expected = mixed / residual_norms.clamp_min(torch.finfo(mixed.dtype).tiny)[:, None]
        row_scale = norms * residual_norms
    else:
        expected, row_scale = unit, norms
    gap = float((decomposition.targets.to(expected) - expected).abs().max())
    if not gap <= _TARGET_TOLERANCE:
        raise InputError(f"decomposition {label!r} is not of this concat SAE's unit decoder rows in {space} space "
                         f"(largest difference {gap:.3g})")
    W_routed = z_dictionary.reconstruct(decomposition.codes.to(dtype=z_dictionary.dtype)) * row_scale[:, None]
    setting = {"params": _jsonable_params(decomposition.params), "statuses": decomposition.status_counts()}
    return RoutedDecoder(label=label, method=decomposition.solver, setting=setting, space=space, W_routed=W_routed)


def routing_error(routed: RoutedDecoder, concat_sae: Any, *, W_O: Tensor | None = None) -> float:
    """``max |W_routed - W_dec| / max |W_dec|`` in the space the decomposition was solved in (both sides times
    ``W_O_cat`` for the residual space: ``W_O`` needed): 0 for an exact decomposition such as ``pinv`` on a
    full-rank dictionary."""
    W_dec = concat_sae.W_dec.to(routed.W_routed)
    if tuple(W_dec.shape) != tuple(routed.W_routed.shape):
        raise InputError(f"routed decoder {routed.label!r} is {tuple(routed.W_routed.shape)} but the concat SAE's "
                         f"W_dec is {tuple(W_dec.shape)}")
    W_routed = routed.W_routed
    if routed.space == "residual":
        if W_O is None:
            raise InputError(f"routed decoder {routed.label!r} is in the residual space: pass W_O")
        W_dec, W_routed = mix_targets(W_dec, W_O.to(W_dec)), mix_targets(W_routed, W_O.to(W_dec))
    return float((W_routed - W_dec).abs().max() / W_dec.abs().max())


def _jsonable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Solver parameters as JSON values; one that is not (a tensor, say) is kept as its ``repr``."""
    out = {}
    for key, value in params.items():
        try:
            out[str(key)] = to_jsonable(value)
        except InputTypeError:
            out[str(key)] = repr(value)
    return out
