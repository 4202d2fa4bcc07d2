"""Re-estimating the input scale that legacy SAELens never saved, and folding it into the weights.

With ``normalize_activations=True`` (SAELens 2.x, Anthropic's April 2024 recipe) a per-head SAE was trained on
``s_h * z_h`` with

    s_h = sqrt(d_head) / E ||z_h||

the mean taken over the training distribution (same model, processing flags, data, context size and BOS
setting). ``s_h`` is in no file, so it is re-estimated from ``hook_z`` activations ``[batch, pos, n_heads, d_head]``
and folded (``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``), after which the SAE reads unscaled ``z_h``.

The streaming accumulator and the one-shot function share one piece of maths (``update`` / ``compute``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..activations import (ActivationBatch, check_merge, check_state, hooked_transformer, merged_sum,
                           run_accumulators, snapshot)
from ..validation import check_tensor
from .heads import HeadSAEs
from ..errors import InputError, InputTypeError


class HeadNormAccumulator:
    """Running ``sum ||z_h||`` and count per head over ``[batch, pos, n_heads, d_head]`` batches (in float64).

    An :class:`~sparsedecomp.activations.Accumulator`: ``update`` takes an
    :class:`~sparsedecomp.activations.ActivationBatch` (its ``z``) or a raw ``z`` tensor; ``compute`` gives
    :meth:`mean_norms`. Mergeable: the parts' sums and counts add."""

    needs: tuple[str, ...] = ()

    def __init__(self, *, exclude_bos: bool = False) -> None:
        self.exclude_bos = bool(exclude_bos)
        self.reset()

    def reset(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0
        self._shape: tuple[int, int] | None = None

    def update(self, z: Tensor | ActivationBatch) -> None:
        if isinstance(z, ActivationBatch):
            z = z.z
        check_tensor(z, "z", ndim=4)
        if self._shape is not None and tuple(z.shape[2:]) != self._shape:
            raise InputError(f"z batches must share (n_heads, d_head) = {self._shape}; got {tuple(z.shape[2:])}")
        if self.exclude_bos:
            # Position 0 holds BOS when prompts are prepended with it; its z is atypically large.
            z = z[:, 1:]
        norms = z.double().norm(dim=-1)  # [batch, pos, n_heads]
        total = norms.sum(dim=(0, 1)).cpu()
        self._sum = total if self._sum is None else self._sum + total
        self._count += norms.shape[0] * norms.shape[1]
        self._shape = tuple(z.shape[2:])

    def compute(self) -> Tensor:
        """:meth:`mean_norms`."""
        return self.mean_norms()

    @property
    def n_vectors(self) -> int:
        return self._count

    @property
    def head_shape(self) -> tuple[int, int] | None:
        """``(n_heads, d_head)`` of the batches seen so far (``None`` before the first update)."""
        return self._shape

    def mean_norms(self) -> Tensor:
        """``E ||z_h||`` per head, ``(n_heads,)`` float64."""
        if self._sum is None or self._count == 0:
            raise InputError("no activations were seen (empty iterable, or only BOS positions with exclude_bos=True)")
        return self._sum / self._count

    def _settings(self) -> dict[str, bool]:
        return {"exclude_bos": self.exclude_bos}

    def merge(self, other: HeadNormAccumulator) -> None:
        check_merge(self, other)
        if self._shape is not None and other._shape is not None and self._shape != other._shape:
            raise InputError(f"cannot merge norms of z with (n_heads, d_head) = {other._shape} into {self._shape}")
        self._sum = merged_sum(self._sum, other._sum)
        self._count += other._count
        self._shape = self._shape or other._shape

    def state_dict(self) -> dict[str, Any]:
        """Settings, ``count``, ``head_shape`` (``[n_heads, d_head]``, ``[]`` before the first batch) and ``sum``
        (once a batch was seen)."""
        state: dict[str, Any] = {**self._settings(), "count": self._count, "head_shape": list(self._shape or ())}
        if self._sum is not None:
            state["sum"] = snapshot(self._sum)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(self, state, {"sum": ("n_heads", torch.float64)}, {"count": int, "head_shape": list},
                    optional=("sum",))
        shape = tuple(state["head_shape"])
        seen = "sum" in state
        if seen:  # (n_heads, d_head) of the batches seen, n_heads being the sum's length
            bad = len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape) or \
                state["sum"].shape[0] != shape[0]
        else:
            bad = len(shape) != 0
        if bad:
            raise InputError(f"the HeadNormAccumulator state's 'head_shape' {list(shape)} does not go with its 'sum' "
                             f"of shape {tuple(state['sum'].shape) if seen else None}")
        self._sum = state["sum"].clone() if seen else None
        self._count = state["count"]
        self._shape = shape if seen else None


@dataclass(frozen=True)
class HeadScales:
    """Per-head input scales ``s_h = sqrt(d_head) / E||z_h||`` and how they were estimated."""

    scales: dict[int, float]
    mean_norms: dict[int, float]
    d_head: int
    n_vectors: int
    description: str = ""

    def __getitem__(self, head: int) -> float:
        return self.scales[head]


def estimate_head_scales(
    activations: Tensor | Iterable[Tensor],
    *,
    heads: Sequence[int] | None = None,
    exclude_bos: bool = False,
    description: str = "",
) -> HeadScales:
    """Estimate ``s_h = sqrt(d_head) / E||z_h||`` from ``hook_z`` batches ``[batch, pos, n_heads, d_head]``.

    ``exclude_bos`` drops position 0 of every batch. ``heads`` restricts the result (default: all heads).
    """
    batches = [activations] if isinstance(activations, Tensor) else activations
    acc = HeadNormAccumulator(exclude_bos=exclude_bos)
    for z in batches:
        acc.update(z)
    return _finish(acc, heads, description or f"{acc.n_vectors} positions, exclude_bos={exclude_bos}")


def _finish(acc: HeadNormAccumulator, heads: Sequence[int] | None, description: str) -> HeadScales:
    means = acc.mean_norms()
    n_heads, d_head = acc.head_shape
    chosen = list(range(n_heads)) if heads is None else list(heads)
    bad = [h for h in chosen if not (isinstance(h, int) and 0 <= h < n_heads)]
    if bad:
        raise InputError(f"heads {bad} are not in range(n_heads={n_heads})")
    zero = [h for h in chosen if float(means[h]) == 0.0]
    if zero:
        raise InputError(f"heads {zero} have E||z_h|| = 0 on these activations: no scale can be estimated")
    return HeadScales(
        scales={h: math.sqrt(d_head) / float(means[h]) for h in chosen},
        mean_norms={h: float(means[h]) for h in chosen},
        d_head=d_head,
        n_vectors=acc.n_vectors,
        description=description,
    )


def estimate_head_scales_from_model(
    model: Any,
    token_batches: Tensor | Iterable[Tensor],
    *,
    layer: int,
    heads: Sequence[int] | None = None,
    exclude_bos: bool = False,
) -> HeadScales:
    """Run ``model`` (a ``HookedTransformer`` or a :class:`~sparsedecomp.loading.models.LoadedModel`) on token
    batches ``[batch, pos]`` (BOS already prepended if the SAEs were trained with it) and estimate each head's
    scale from ``blocks.{layer}.attn.hook_z``, read through the activation stream
    (:func:`~sparsedecomp.activations.run_accumulators`). The model must be processed with the same flags as in
    training."""
    batches = [token_batches] if isinstance(token_batches, Tensor) else list(token_batches)
    acc = HeadNormAccumulator(exclude_bos=exclude_bos)
    for tokens in batches:
        run_accumulators(model, tokens, {"hook_z norms": acc}, layer=layer)
    n_tokens = sum(tokens.numel() for tokens in batches)
    hooked = hooked_transformer(model)
    name = getattr(hooked.cfg, "model_name", "model")
    flags = getattr(model, "flags", None)
    description = (
        f"{name} blocks.{layer}.attn.hook_z on {n_tokens} tokens ({acc.n_vectors} positions), exclude_bos={exclude_bos}"
        + (f", processing {flags.describe()}" if flags is not None and hasattr(flags, "describe") else "")
    )
    return _finish(acc, heads, description)


def estimate_input_scale(activations: Tensor | Iterable[Tensor]) -> float:
    """``sqrt(d) / E||x||`` over vectors ``(..., d)`` (e.g. a concatenated-z SAE's flattened input)."""
    batches = [activations] if isinstance(activations, Tensor) else activations
    total, count, dim = 0.0, 0, None
    for x in batches:
        check_tensor(x, "activations")
        if dim is not None and x.shape[-1] != dim:
            raise InputError(f"activation batches must share the last dimension {dim}; got {x.shape[-1]}")
        dim = x.shape[-1]
        norms = x.double().reshape(-1, dim).norm(dim=1)
        total += float(norms.sum())
        count += norms.numel()
    if count == 0 or total == 0.0:
        raise InputError("no (non-zero) activations were seen")
    return math.sqrt(dim) / (total / count)


def fold_head_scales(
    head_saes: HeadSAEs,
    scales: HeadScales | Mapping[int, float],
    *,
    force: bool = False,
) -> HeadSAEs:
    """Fold each head's scale into its SAE (``SAE.with_input_scale``), recording it in the SAE's
    ``transformations`` and ``provenance["input_scale_source"]``.

    Every head must have a scale. An SAE that does not need one (trained on unscaled inputs, or already folded)
    is refused unless ``force=True``, because folding a scale into it would break it.
    """
    if not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
    table = scales.scales if isinstance(scales, HeadScales) else dict(scales)
    source = scales.description if isinstance(scales, HeadScales) else "user-supplied scales"
    missing = [h for h in head_saes.heads if h not in table]
    if missing:
        raise InputError(f"no scale given for heads {missing} (scales cover {sorted(table)})")
    if not force:
        unneeded = [h for h in head_saes.heads if not head_saes[h].needs_input_scale]
        if unneeded:
            raise InputError(
                f"heads {unneeded} do not need an input scale (normalize_activations off, or already folded); "
                "pass force=True to fold anyway"
            )

    def fold(sae):
        s = table[sae.head]
        folded = sae.with_input_scale(s, reason=f"s_h = sqrt(d_head)/E||z_h|| re-estimated: {source}")
        return replace(folded, provenance={**folded.provenance, "input_scale_source": source})

    return head_saes.map(fold)
