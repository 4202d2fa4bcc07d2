"""A format-independent SAE: weights, its firing rule, what it reads, where it came from and what was done to it.

Every loader returns this one object, so downstream code never depends on a checkpoint format. The maths:

    pre(x)    = (x - a * b_dec) @ W_enc + b_enc               a = apply_b_dec_to_input (0 or 1); linear in x
    encode(x) = rule(pre(x))                                  ReLU, JumpReLU, TopK or gated (activation_rules.py)
    decode(f) = f @ W_dec + b_dec                             rows of W_dec are features

Transformations return a new SAE and append a human-readable line to ``transformations``, so a result can
always say exactly which weights produced it.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .activation_rules import ActivationRule, ReLU
from .errors import HookUnknownError
from ..validation import FLOAT_DTYPES, check_device, check_like, check_positive, check_tensor, first_indices
from ..errors import InputError, InputTypeError

CONCATENATED = "concatenated"
NO_HEAD = "none"  # the hook has no head axis (e.g. a residual-stream SAE)


class InputScaleWarning(UserWarning):
    """An SAE was trained on inputs scaled by a factor that was never saved and has not been folded in."""


# SAEs already warned about (once per SAE object: a derived SAE, e.g. after .to(), is a new object).
_WARNED_INPUT_SCALE: "weakref.WeakSet[SAE]" = weakref.WeakSet()
_INPUT_SCALE_FIX = (
    "Estimate the scale on the model and tokens the SAE was trained on and fold it in first: "
    "scales = sparsedecomp.loading.estimate_head_scales_from_model(model, token_batches, layer=L) then "
    "head_saes = sparsedecomp.loading.fold_head_scales(head_saes, scales); for a single SAE, "
    "sae = sae.with_input_scale(sparsedecomp.loading.estimate_input_scale(activations))."
)


@dataclass(frozen=True, eq=False)
class SAE:
    """A sparse autoencoder on one hook, with an explicit firing rule (standard ReLU by default).

    Attributes:
        W_enc: ``(d_in, d_sae)`` encoder.
        b_enc: ``(d_sae,)`` encoder bias.
        W_dec: ``(d_sae, d_in)`` decoder; row ``i`` is feature ``i``'s direction (not necessarily unit norm).
        b_dec: ``(d_in,)`` decoder bias.
        apply_b_dec_to_input: whether ``b_dec`` is subtracted from the input before encoding.
        hook_name: the TransformerLens hook read, e.g. ``"blocks.1.attn.hook_z"``; ``None`` when the checkpoint
            does not say (a SAELens SAE saved without metadata): set it with :meth:`with_hook`.
        layer: the layer of that hook (``None`` when unknown).
        head: the attention head whose ``z`` (``d_head`` wide) the SAE reads, or ``"concatenated"`` for an SAE on
            all heads' ``z`` flattened head-major (head ``h`` owns columns ``h*d_head:(h+1)*d_head``), or
            ``"none"`` for a hook without a head axis; ``None`` when unknown.
        model_name: the model the SAE was trained on (``None`` when unknown).
        provenance: format, source path / repository, the checkpoint's own config and loader notes.
        transformations: every change applied since the checkpoint was read, in order.
        log_sparsity: optional ``(d_sae,)`` log10 firing frequency saved next to the weights.
        activation: the firing rule (:mod:`~sparsedecomp.loading.activation_rules`): ``ReLU()`` (default),
            ``JumpReLU(threshold)``, ``TopK(k)`` or ``Gated(W_gate, b_gate, r_mag)``.
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    apply_b_dec_to_input: bool
    hook_name: str | None
    layer: int | None
    head: int | str | None
    model_name: str | None
    provenance: dict[str, Any] = field(default_factory=dict)
    transformations: tuple[str, ...] = ()
    log_sparsity: Tensor | None = None
    activation: ActivationRule = field(default_factory=ReLU)

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
            check_like(getattr(self, name), name, self.W_enc, "W_enc")
        if self.log_sparsity is not None:
            if not isinstance(self.log_sparsity, Tensor) or tuple(self.log_sparsity.shape) != (d_sae,):
                shape = getattr(self.log_sparsity, "shape", type(self.log_sparsity).__name__)
                raise InputError(f"log_sparsity must be a ({d_sae},) tensor, got {shape}")
        if not isinstance(self.activation, ActivationRule):
            raise InputTypeError(f"activation must be an ActivationRule (ReLU(), JumpReLU(threshold), TopK(k), "
                                 f"Gated(...)), got {type(self.activation).__name__}")
        self.activation.check(d_in, d_sae, self.W_enc)
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise InputTypeError(f"apply_b_dec_to_input must be a bool, got {type(self.apply_b_dec_to_input).__name__}")
        if self.hook_name is not None and (not isinstance(self.hook_name, str) or not self.hook_name):
            raise InputError(f"hook_name must be a non-empty string or None (unknown), got {self.hook_name!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise InputError(f"layer must be a non-negative int or None (unknown), got {self.layer!r}")
        head_ok = self.head is None or (
            isinstance(self.head, int) and not isinstance(self.head, bool) and self.head >= 0
        ) or (self.head in (CONCATENATED, NO_HEAD))
        if not head_ok:
            raise InputError(
                f"head must be a non-negative int, {CONCATENATED!r}, {NO_HEAD!r} or None (unknown); got {self.head!r}"
            )
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise InputTypeError(f"model_name must be a string or None (unknown), got {type(self.model_name).__name__}")
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

    @property
    def model_from_pretrained_kwargs(self) -> dict[str, Any] | None:
        """The keyword arguments the model was loaded with for training, as the checkpoint records them
        (SAELens's ``model_from_pretrained_kwargs``, e.g. ``{"center_writing_weights": False}``): load the model
        with them, since processing flags change ``hook_z``. ``None`` when the checkpoint records none (Kissane
        checkpoints; a SAELens SAE saved without metadata). A copy: changing it changes nothing here."""
        value = self.provenance.get("model_from_pretrained_kwargs")
        return None if value is None else dict(value)

    def describe(self) -> str:
        """One line naming the SAE: model, hook, head, sizes and source."""
        source = self.provenance.get("source", "?")
        rule = "" if self.activation.kind == "relu" else f" {self.activation.kind}"
        return (
            f"{self.model_name or '<model unknown>'} {self.hook_name or '<hook unknown>'} head={self.head} "
            f"d_in={self.d_in} d_sae={self.d_sae}{rule} ({self.provenance.get('format', '?')}: {source})"
        )

    def require_hook(self, purpose: str) -> tuple[str, int]:
        """``(hook_name, layer)``, or :class:`~sparsedecomp.loading.errors.HookUnknownError` saying that
        ``purpose`` needs them and how to give them (:meth:`with_hook`)."""
        if self.hook_name is None or self.layer is None:
            source = self.provenance.get("source", "this SAE")
            raise HookUnknownError(
                f"{purpose} needs the SAE's hook_name, but {source} does not record one (a SAELens SAE saved without "
                "metadata): give it with sae.with_hook('blocks.<layer>.attn.hook_z', head=<head index, or "
                "'concatenated' for all heads' z>)"
            )
        return self.hook_name, self.layer

    # -- forward -----------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, name: str, width: int) -> Tensor:
        check_tensor(x, name)
        if x.ndim == 0 or x.shape[-1] != width:
            raise InputError(f"{name} must have shape (..., {width}), got {tuple(x.shape)}")
        # Computing in the SAE's own dtype matches how the SAE was trained and evaluated.
        return x.to(device=self.device, dtype=self.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``rule((x - a*b_dec) @ W_enc + b_enc)`` for ``x`` of shape ``(..., d_in)``.

        Warns (:class:`InputScaleWarning`, once per SAE) while :attr:`needs_input_scale`."""
        warn_input_scale((self,))
        x = self._check_input(x, "x", self.d_in)
        centred = self.centred(x)
        return self.activation.apply(centred @ self.W_enc + self.b_enc, centred)

    def pre_activation(self, x: Tensor) -> Tensor:
        """``(x - a*b_dec) @ W_enc + b_enc``: linear in ``x``, what direct feature attribution splits exactly. The
        activation is :attr:`activation` applied to it."""
        x = self._check_input(x, "x", self.d_in)
        return self.centred(x) @ self.W_enc + self.b_enc

    # The encoder in pieces, for the streaming statistics and dashboards (their hot paths check each batch once, so
    # these check nothing): every place that encodes goes through them, so the firing rule is applied here only.
    def centred(self, x: Tensor) -> Tensor:
        """``x - a * b_dec`` (``a`` = :attr:`apply_b_dec_to_input`): what the encoder multiplies."""
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encoding_context(self, centred: Tensor) -> Tensor | None:
        """What :meth:`encode_columns` needs from the token's other features: ``None`` except for a TopK SAE, whose
        context is each row's cut between its k-th and (k+1)-th largest pre-activations over all features (one full
        encoder pass). Compute it once per batch and pass it to every :meth:`encode_columns` call on that batch."""
        return self.activation.context(self.W_enc, self.b_enc, centred) if self.activation.needs_context else None

    def encode_columns(self, centred: Tensor, features: slice | Tensor | None = None,
                       context: Tensor | None = None) -> Tensor:
        """Activations ``(n, m)`` of the ``features`` columns (all by default) for centred inputs ``(n, d_in)``
        (:meth:`centred`, on the SAE's device and dtype): one fused ``addmm``, then the firing rule. ``context`` is
        :meth:`encoding_context` of the same rows (computed here when a TopK SAE is not given it)."""
        if features is None:
            return self.activation.apply(torch.addmm(self.b_enc, centred, self.W_enc), centred)
        if context is None and self.activation.needs_context:
            context = self.encoding_context(centred)
        pre = torch.addmm(self.b_enc[features], centred, self.W_enc[:, features])
        return self.activation.apply_columns(pre, features, centred, context)

    def encode_examples(self, centred: Tensor, features: Tensor) -> Tensor:
        """``(e, w)``: example ``j``'s own feature ``features[j]`` at each of its ``w`` tokens, for centred inputs
        ``(e, w, d_in)``; only that feature's encoder column is applied (plus, for a TopK SAE, one full pass to rank
        each token's features)."""
        column = features.reshape(-1, 1)
        pre = torch.einsum("ewd,ed->ew", centred, self.W_enc[:, column[:, 0]].T) + self.b_enc[column[:, 0]][:, None]
        context = self.encoding_context(centred)  # (e, w, 1) for a TopK SAE: one cut per token
        return self.activation.apply_columns(pre, column, centred, None if context is None else context[..., 0])

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` for activations ``f`` of shape ``(..., d_sae)``.

        Warns (:class:`InputScaleWarning`, once per SAE) while :attr:`needs_input_scale`."""
        warn_input_scale((self,))
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
            activation=self.activation.scaled(s),
            provenance={"input_scale": s * float(self.provenance.get("input_scale", 1.0)), "needs_input_scale": False},
        )

    def with_decoder_norms_folded(self) -> "SAE":
        """Unit-norm decoder rows with the norms moved into the encoder.

        With ``n_i = ||W_dec[i]||``: ``W_dec[i] <- W_dec[i] / n_i``, ``W_enc[:, i] <- n_i W_enc[:, i]``,
        ``b_enc[i] <- n_i b_enc[i]``; activations become ``n_i f_i`` (ReLU is positively homogeneous; a JumpReLU
        threshold scales by ``n_i`` too, a gate keeps its sign) and the reconstruction is unchanged. Refused for a
        TopK SAE with unequal norms: scaling would change which ``k`` features fire.
        """
        norms = self.W_dec.norm(dim=1)
        if bool((norms == 0).any()):
            zero = first_indices(norms == 0)
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
            activation=self.activation.feature_scaled(norms),
        )

    def with_hook(
        self,
        hook_name: str,
        *,
        head: int | str | None = None,
        layer: int | None = None,
        model_name: str | None = None,
    ) -> "SAE":
        """A copy that reads ``hook_name`` (for a checkpoint that does not say which hook it reads).

        ``layer`` defaults to the one in ``hook_name`` (``blocks.L....``); ``head`` to the SAE's own if known, else
        ``"concatenated"`` for a ``hook_z`` hook and ``"none"`` otherwise (pass the head index for a per-head SAE);
        ``model_name`` to the SAE's own. Recorded in :attr:`transformations`."""
        from .files import layer_from_hook

        if not isinstance(hook_name, str) or not hook_name:
            raise InputError(f"hook_name must be a non-empty string, got {hook_name!r}")
        if layer is None:
            layer = layer_from_hook(hook_name)
            if layer is None:
                raise InputError(f"hook_name {hook_name!r} names no layer (blocks.<layer>....): pass layer=")
        if head is None:
            head = self.head if self.head is not None else (CONCATENATED if "hook_z" in hook_name else NO_HEAD)
        model_name = self.model_name if model_name is None else model_name
        note = f"hook set by hand: {hook_name} (layer {layer}, head {head!r}, model {model_name!r})"
        return self._derive(note, hook_name=hook_name, layer=layer, head=head, model_name=model_name)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SAE":
        """A copy on ``device`` in floating ``dtype``; a dtype change is recorded, a device move is not."""
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise InputTypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
        if device is not None:
            device = check_device(device)
        moved = {
            name: getattr(self, name).to(device=device, dtype=dtype) for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        if self.log_sparsity is not None:
            moved["log_sparsity"] = self.log_sparsity.to(device=device)
        moved["activation"] = self.activation.to(device, dtype)
        if dtype is not None and dtype != self.dtype:
            return self._derive(f"cast {self.dtype} -> {dtype}", **moved)
        return replace(self, **moved)


def warn_input_scale(saes: Iterable[SAE], *, describe: Callable[[list[SAE]], str] | None = None) -> bool:
    """Warn (:class:`InputScaleWarning`) about the SAEs among ``saes`` that still need their input scale and have
    not been warned about yet; one warning names them all (``describe(pending)``, default: each SAE's
    :meth:`SAE.describe`). Returns whether a warning was issued. The warning points at the first caller outside
    ``sparsedecomp``."""
    pending = [sae for sae in saes if sae.needs_input_scale and sae not in _WARNED_INPUT_SCALE]
    if not pending:
        return False
    for sae in pending:
        _WARNED_INPUT_SCALE.add(sae)
    what = describe(pending) if describe is not None else "; ".join(sae.describe() for sae in pending)
    verb = "was" if len(pending) == 1 else "were"
    message = (
        f"{what} {verb} trained on inputs multiplied by an input scale that was never saved (legacy SAELens, "
        "normalize_activations: true) and is not folded in, so on unscaled activations encode / forward / decode "
        f"and splice-in losses are wrong (per-head splice scores drop). {_INPUT_SCALE_FIX}"
    )
    warnings.warn(message, InputScaleWarning, stacklevel=_outside_stacklevel())
    return True


def _outside_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first frame outside sparsedecomp and torch."""
    frame = sys._getframe(2)  # the caller of the function that calls warnings.warn
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("sparsedecomp", "torch"):
        frame = frame.f_back
        level += 1
    return level


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

