"""A format-independent ReLU SAE: weights, what it reads, where it came from and what was done to it.

Every loader returns this one object, so downstream code never depends on a checkpoint format. The maths:

    encode(x) = relu((x - a * b_dec) @ W_enc + b_enc)        a = apply_b_dec_to_input (0 or 1)
    decode(f) = f @ W_dec + b_dec                             rows of W_dec are features

Transformations return a new SAE and append a human-readable line to ``transformations``, so a result can
always say exactly which weights produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..validation import check_positive, check_tensor
from ..errors import InputError, InputTypeError

CONCATENATED = "concatenated"
NO_HEAD = "none"  # the hook has no head axis (e.g. a residual-stream SAE)


@dataclass(frozen=True, eq=False)
class SAE:
    """A standard (ReLU) sparse autoencoder on one hook.

    Attributes:
        W_enc: ``(d_in, d_sae)`` encoder.
        b_enc: ``(d_sae,)`` encoder bias.
        W_dec: ``(d_sae, d_in)`` decoder; row ``i`` is feature ``i``'s direction (not necessarily unit norm).
        b_dec: ``(d_in,)`` decoder bias.
        apply_b_dec_to_input: whether ``b_dec`` is subtracted from the input before encoding.
        hook_name: the TransformerLens hook read, e.g. ``"blocks.1.attn.hook_z"``.
        layer: the layer of that hook.
        head: the attention head whose ``z`` (``d_head`` wide) the SAE reads, or ``"concatenated"`` for an SAE on
            all heads' ``z`` flattened head-major (head ``h`` owns columns ``h*d_head:(h+1)*d_head``), or
            ``"none"`` for a hook without a head axis.
        model_name: the model the SAE was trained on.
        provenance: format, source path / repository, the checkpoint's own config and loader notes.
        transformations: every change applied since the checkpoint was read, in order.
        log_sparsity: optional ``(d_sae,)`` log10 firing frequency saved next to the weights.
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    apply_b_dec_to_input: bool
    hook_name: str
    layer: int
    head: int | str
    model_name: str
    provenance: dict[str, Any] = field(default_factory=dict)
    transformations: tuple[str, ...] = ()
    log_sparsity: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor(self.W_enc, "W_enc", ndim=2)
        d_in, d_sae = self.W_enc.shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in expected.items():
            value = check_tensor(getattr(self, name), name)
            if tuple(value.shape) != shape:
                raise InputError(
                    f"{name} must have shape {shape} to match W_enc (d_in={d_in}, d_sae={d_sae}); "
                    f"got {tuple(value.shape)}"
                )
        for name in ("b_enc", "W_dec", "b_dec"):
            value = getattr(self, name)
            if value.dtype != self.W_enc.dtype or value.device != self.W_enc.device:
                raise InputError(
                    f"{name} is {value.dtype} on {value.device} but W_enc is {self.W_enc.dtype} on "
                    f"{self.W_enc.device}; all SAE weights must share dtype and device"
                )
        if self.log_sparsity is not None:
            if not isinstance(self.log_sparsity, Tensor) or tuple(self.log_sparsity.shape) != (d_sae,):
                shape = getattr(self.log_sparsity, "shape", type(self.log_sparsity).__name__)
                raise InputError(f"log_sparsity must be a ({d_sae},) tensor, got {shape}")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise InputTypeError(f"apply_b_dec_to_input must be a bool, got {type(self.apply_b_dec_to_input).__name__}")
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise InputError(f"hook_name must be a non-empty string, got {self.hook_name!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InputError(f"layer must be a non-negative int, got {self.layer!r}")
        head_ok = (isinstance(self.head, int) and not isinstance(self.head, bool) and self.head >= 0) or (
            self.head in (CONCATENATED, NO_HEAD)
        )
        if not head_ok:
            raise InputError(f"head must be a non-negative int, {CONCATENATED!r} or {NO_HEAD!r}; got {self.head!r}")
        if not isinstance(self.model_name, str):
            raise InputTypeError(f"model_name must be a string, got {type(self.model_name).__name__}")
        if not isinstance(self.transformations, tuple) or not all(isinstance(t, str) for t in self.transformations):
            raise InputTypeError("transformations must be a tuple of strings")

    # -- shape -------------------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def needs_input_scale(self) -> bool:
        """True when the SAE was trained on inputs multiplied by a constant that was never saved
        (legacy ``normalize_activations=True``) and no scale has been folded in yet: see ``scaling.py``."""
        return bool(self.provenance.get("needs_input_scale", False))

    def describe(self) -> str:
        """One line naming the SAE: model, hook, head, sizes and source."""
        source = self.provenance.get("source", "?")
        return (
            f"{self.model_name} {self.hook_name} head={self.head} d_in={self.d_in} d_sae={self.d_sae} "
            f"({self.provenance.get('format', '?')}: {source})"
        )

    # -- forward -----------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, name: str, width: int) -> Tensor:
        check_tensor(x, name)
        if x.ndim == 0 or x.shape[-1] != width:
            raise InputError(f"{name} must have shape (..., {width}), got {tuple(x.shape)}")
        # Computing in the SAE's own dtype matches how the SAE was trained and evaluated.
        return x.to(device=self.device, dtype=self.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``relu((x - a*b_dec) @ W_enc + b_enc)`` for ``x`` of shape ``(..., d_in)``."""
        x = self._check_input(x, "x", self.d_in)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` for activations ``f`` of shape ``(..., d_sae)``."""
        f = self._check_input(f, "f", self.d_sae)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    __call__ = forward

    # -- transformations ---------------------------------------------------------------------------------------
    def _derive(self, note: str, **changes: Any) -> "SAE":
        provenance = {**self.provenance, **changes.pop("provenance", {})}
        return replace(self, provenance=provenance, transformations=self.transformations + (note,), **changes)

    def with_input_scale(self, s: float, *, reason: str | None = None) -> "SAE":
        """Fold a constant input scale ``s`` into the weights.

        An SAE trained on ``s * x`` becomes one that reads unscaled ``x``: ``W_enc <- s W_enc``,
        ``W_dec <- W_dec / s``, ``b_dec <- b_dec / s``. Then ``encode'(x) = encode(s x)`` and
        ``forward'(x) = forward(s x) / s`` exactly (``b_enc`` is unchanged because
        ``(x - b_dec/s) @ (s W_enc) = (s x - b_dec) @ W_enc``).
        """
        s = check_positive(s, "s")
        note = f"folded input scale s={s:.6g}" + (f" ({reason})" if reason else "")
        return self._derive(
            note,
            W_enc=self.W_enc * s,
            W_dec=self.W_dec / s,
            b_dec=self.b_dec / s,
            provenance={"input_scale": s * float(self.provenance.get("input_scale", 1.0)), "needs_input_scale": False},
        )

    def with_decoder_norms_folded(self) -> "SAE":
        """Unit-norm decoder rows with the norms moved into the encoder.

        With ``n_i = ||W_dec[i]||``: ``W_dec[i] <- W_dec[i] / n_i``, ``W_enc[:, i] <- n_i W_enc[:, i]``,
        ``b_enc[i] <- n_i b_enc[i]``; activations become ``n_i f_i`` (ReLU is positively homogeneous) and the
        reconstruction is unchanged.
        """
        norms = self.W_dec.norm(dim=1)
        if bool((norms == 0).any()):
            zero = (norms == 0).nonzero().squeeze(1)[:5].tolist()
            raise InputError(
                f"{int((norms == 0).sum())} decoder rows are zero (first {zero}); their norm cannot be folded"
            )
        note = (
            f"folded decoder norms into encoder (norms min {float(norms.min()):.4g}, "
            f"mean {float(norms.mean()):.4g}, max {float(norms.max()):.4g})"
        )
        return self._derive(
            note,
            W_dec=self.W_dec / norms[:, None],
            W_enc=self.W_enc * norms[None, :],
            b_enc=self.b_enc * norms,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SAE":
        """A copy on ``device`` in floating ``dtype``; a dtype change is recorded, a device move is not."""
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise InputTypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
        moved = {
            name: getattr(self, name).to(device=device, dtype=dtype) for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        if self.log_sparsity is not None:
            moved["log_sparsity"] = self.log_sparsity.to(device=device)
        if dtype is not None and dtype != self.dtype:
            return self._derive(f"cast {self.dtype} -> {dtype}", **moved)
        return replace(self, **moved)


def fold_legacy_scaling_factor(W_dec: Tensor, scaling_factor: Tensor) -> tuple[Tensor, str | None]:
    """Fold SAELens 1.x/2.x's per-feature ``scaling_factor`` into the decoder.

    Legacy decode is ``(f * scaling_factor) @ W_dec + b_dec`` = ``f @ (scaling_factor[:, None] * W_dec) + b_dec``.
    Returns the new decoder and a transformation note, or ``None`` when the factor is all ones (the usual case).
    """
    if bool((scaling_factor == 1).all()):
        return W_dec, None
    note = (
        f"folded legacy per-feature scaling_factor into W_dec (min {float(scaling_factor.min()):.4g}, "
        f"max {float(scaling_factor.max()):.4g})"
    )
    return W_dec * scaling_factor[:, None].to(W_dec), note

