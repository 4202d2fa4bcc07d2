"""How an SAE turns pre-activations into feature activations: the firing rules of SAELens 6's inference SAEs.

Every SAE here has the same linear encoder, the **pre-activation** ``pre = (x - a * b_dec) @ W_enc + b_enc`` (linear
in ``x``, so direct feature attribution splits it exactly into per-head and per-source terms plus bias terms); the
rule then decides which features fire and with what value:

=============  ===================================================================  ==============================
rule           activation ``f_i``                                                   SAELens class
=============  ===================================================================  ==============================
``relu``       ``max(pre_i, 0)``                                                    ``StandardSAE``
``jumprelu``   ``max(pre_i, 0) * [pre_i > theta_i]`` (a threshold per feature)     ``JumpReLUSAE`` (also how
                                                                                    BatchTopK and Matryoshka SAEs
                                                                                    are saved for inference)
``topk``       ``max(pre_i, 0) * [pre_i is among the k largest of the token's]``    ``TopKSAE``
``gated``      ``max(pre_i, 0) * [x' @ W_gate[:, i] + b_gate_i > 0]``, where        ``GatedSAE``
               ``W_enc = W_gate * exp(r_mag)`` and ``b_enc = b_mag`` (the magnitude
               path is the pre-activation; the gate is a second linear function)
=============  ===================================================================  ==============================

(``x' = x - a * b_dec``.) All rules give non-negative activations. The rules are immutable; a transformation of the
SAE's weights (an input scale, folded decoder norms, a device or dtype) returns a new rule through :meth:`scaled`,
:meth:`feature_scaled` and :meth:`to`.

Encoding only some features' columns (the streaming statistics and dashboards do, to bound memory) needs, for
``topk``, a per-token context from *all* features: a cut halfway between the k-th and (k+1)-th largest pre-activations
(:meth:`TopK.context`). Then feature ``i`` fires iff ``pre_i >= cut`` — the set ``torch.topk`` selects, except when
the k-th and (k+1)-th values are within rounding of each other (ties; a measure-zero event for float inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import InputError
from ..validation import check_like, check_tensor

# Rows of pre-activations ranked at once when the k-th largest value of each row is computed (bounds memory).
_RANK_ROWS = 4096


class ActivationRule:
    """Base of the firing rules; see the module docstring."""

    kind: ClassVar[str]
    needs_context: ClassVar[bool] = False  # whether encoding some columns needs the token's other columns

    def check(self, d_in: int, d_sae: int, W_enc: Tensor) -> None:
        """Raise :class:`InputError` when the rule's tensors do not fit an SAE of these sizes whose encoder is
        ``W_enc`` (the same dtype and device)."""

    def apply(self, pre: Tensor, centred: Tensor) -> Tensor:
        """Activations of all ``d_sae`` features from their pre-activations ``pre`` ``(..., d_sae)`` and the
        centred inputs ``centred`` ``(..., d_in)`` they came from."""
        raise NotImplementedError

    def context(self, W_enc: Tensor, b_enc: Tensor, centred: Tensor) -> Tensor | None:
        """What :meth:`apply_columns` needs beyond the columns' own pre-activations, per row of ``centred``
        ``(n, d_in)``: ``None`` for every rule but ``topk``."""
        return None

    def apply_columns(self, pre: Tensor, features: slice | Tensor, centred: Tensor, context: Tensor | None) -> Tensor:
        """Activations of the ``features`` columns from their pre-activations ``pre`` ``(n, m)`` (or ``(e, w)`` with
        ``features`` an ``(e, 1)`` tensor: one feature per row), the centred inputs and :meth:`context` (shaped to
        broadcast against ``pre``: ``(n, 1)``, or ``(e, w)``)."""
        raise NotImplementedError

    def scaled(self, s: float) -> "ActivationRule":
        """The rule of the SAE that reads ``x`` where this one read ``s * x`` (``W_enc <- s W_enc``)."""
        return self

    def feature_scaled(self, n: Tensor) -> "ActivationRule":
        """The rule after feature ``i``'s pre-activation is multiplied by ``n_i > 0`` (decoder norms folded into the
        encoder); activations scale by ``n_i`` too."""
        return self

    def to(self, device: torch.device | None, dtype: torch.dtype | None) -> "ActivationRule":
        return self

    def describe(self) -> str:
        """One line naming the rule, e.g. ``"JumpReLU (per-feature threshold, median 0.031)"``."""
        raise NotImplementedError

    def describe_feature(self, feature: int) -> str:
        """When feature ``feature`` fires, in words (shown beside its pre-activation's attribution)."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts about the rule for reports (``kind`` and its parameters, not per-feature tensors)."""
        return {"kind": self.kind}


@dataclass(frozen=True)
class ReLU(ActivationRule):
    """``f = max(pre, 0)``: the standard SAE."""

    kind: ClassVar[str] = "relu"

    def apply(self, pre: Tensor, centred: Tensor) -> Tensor:
        return torch.relu(pre)

    def apply_columns(self, pre: Tensor, features: slice | Tensor, centred: Tensor, context: Tensor | None) -> Tensor:
        return torch.relu(pre)

    def describe(self) -> str:
        return "ReLU"

    def describe_feature(self, feature: int) -> str:
        return "fires when its pre-activation is > 0 (ReLU)"


@dataclass(frozen=True, eq=False)
class JumpReLU(ActivationRule):
    """``f_i = max(pre_i, 0) * [pre_i > threshold_i]`` (SAELens's ``JumpReLUSAE`` with its ReLU base activation)."""

    threshold: Tensor
    kind: ClassVar[str] = "jumprelu"

    def check(self, d_in: int, d_sae: int, W_enc: Tensor) -> None:
        check_tensor(self.threshold, "threshold")
        if tuple(self.threshold.shape) != (d_sae,):
            raise InputError(f"a JumpReLU threshold must have shape ({d_sae},), got {tuple(self.threshold.shape)}")
        check_like(self.threshold, "threshold", W_enc, "W_enc")

    def apply(self, pre: Tensor, centred: Tensor) -> Tensor:
        # The order of SAELens's JumpReLUSAE.encode, so the result is the same to the bit.
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def apply_columns(self, pre: Tensor, features: slice | Tensor, centred: Tensor, context: Tensor | None) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold[features]).to(pre.dtype)

    def feature_scaled(self, n: Tensor) -> "JumpReLU":
        return JumpReLU(self.threshold * n.to(self.threshold))

    def to(self, device: torch.device | None, dtype: torch.dtype | None) -> "JumpReLU":
        return JumpReLU(self.threshold.to(device=device, dtype=dtype))

    def describe(self) -> str:
        t = self.threshold.float()
        return f"JumpReLU (per-feature threshold: median {float(t.median()):.4g}, max {float(t.max()):.4g})"

    def describe_feature(self, feature: int) -> str:
        return f"fires when its pre-activation is > {float(self.threshold[feature]):.4g} (JumpReLU threshold)"

    def summary(self) -> dict[str, Any]:
        t = self.threshold.float()
        return {"kind": self.kind, "threshold_min": float(t.min()), "threshold_median": float(t.median()),
                "threshold_max": float(t.max())}


@dataclass(frozen=True)
class TopK(ActivationRule):
    """``f_i = max(pre_i, 0)`` for the ``k`` largest pre-activations of the token, 0 for the others (SAELens's
    ``TopKSAE``; one saved with ``rescale_acts_by_decoder_norm`` is loaded with the decoder norms folded in, which
    makes it this rule exactly)."""

    k: int
    kind: ClassVar[str] = "topk"
    needs_context: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"a TopK rule needs a positive integer k, got {self.k!r}")

    def check(self, d_in: int, d_sae: int, W_enc: Tensor) -> None:
        if self.k > d_sae:
            raise InputError(f"a TopK rule keeps k={self.k} features but the SAE has only d_sae={d_sae}")

    def apply(self, pre: Tensor, centred: Tensor) -> Tensor:
        # As SAELens's TopK activation: the k largest, ReLU'd, scattered into zeros.
        values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def context(self, W_enc: Tensor, b_enc: Tensor, centred: Tensor) -> Tensor:
        """``(n, 1)``: each row's cut between its k-th and (k+1)-th largest pre-activations over all features,
        ``(v_k + v_k+1) / 2`` (``-inf`` when ``k = d_sae``), ranked ``_RANK_ROWS`` rows at a time so memory stays
        ``O(_RANK_ROWS * d_sae)``. A feature fires iff its pre-activation is ``>=`` the cut: the k-th feature itself
        sits exactly on ``v_k``, and a column computed apart from the full product may differ from it by rounding,
        so the cut lies halfway to the next value rather than on it."""
        d_sae = W_enc.shape[1]

        def cut(rows: Tensor) -> Tensor:
            values = torch.topk(torch.addmm(b_enc, rows, W_enc), k=min(self.k + 1, d_sae), dim=-1).values
            if self.k == d_sae:
                return torch.full_like(values[:, :1], -torch.inf)
            return (values[:, self.k - 1 : self.k] + values[:, self.k :]) / 2

        parts = [cut(rows) for rows in centred.reshape(-1, centred.shape[-1]).split(_RANK_ROWS)]
        if not parts:
            return centred.new_empty((*centred.shape[:-1], 1))
        return torch.cat(parts).reshape(*centred.shape[:-1], 1)

    def apply_columns(self, pre: Tensor, features: slice | Tensor, centred: Tensor, context: Tensor | None) -> Tensor:
        if context is None:
            raise InputError("a TopK rule needs each token's cut between its k-th and (k+1)-th largest "
                             "pre-activations (SAE.encoding_context) to encode some of its features")
        return torch.relu(pre) * (pre >= context).to(pre.dtype)

    def feature_scaled(self, n: Tensor) -> "TopK":
        if not bool((n == n.reshape(-1)[0]).all()):
            raise InputError("folding per-feature scales into a TopK SAE's encoder would change which k features "
                             "fire; a TopK SAE keeps its decoder norms")
        return self

    def describe(self) -> str:
        return f"TopK (k={self.k})"

    def describe_feature(self, feature: int) -> str:
        return f"fires when its pre-activation is > 0 and among the token's {self.k} largest (TopK)"

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k}


@dataclass(frozen=True, eq=False)
class Gated(ActivationRule):
    """``f_i = max(pre_i, 0) * [x' @ W_gate[:, i] + b_gate_i > 0]`` (SAELens's ``GatedSAE``: its ``W_enc`` is
    ``W_gate`` here, and the SAE's own ``W_enc = W_gate * exp(r_mag)``, ``b_enc = b_mag`` are the magnitude path).
    ``r_mag`` is kept so the SAE can be written back in SAELens's form."""

    W_gate: Tensor
    b_gate: Tensor
    r_mag: Tensor
    kind: ClassVar[str] = "gated"

    def check(self, d_in: int, d_sae: int, W_enc: Tensor) -> None:
        for name, shape in (("W_gate", (d_in, d_sae)), ("b_gate", (d_sae,)), ("r_mag", (d_sae,))):
            value = check_tensor(getattr(self, name), name)
            if tuple(value.shape) != shape:
                raise InputError(f"a gated SAE's {name} must have shape {shape}, got {tuple(value.shape)}")
            check_like(value, name, W_enc, "W_enc")

    def gate(self, centred: Tensor, features: slice | Tensor | None = None) -> Tensor:
        """The gate's pre-activation ``x' @ W_gate + b_gate`` of the ``features`` columns (all by default)."""
        if features is None:
            return centred @ self.W_gate + self.b_gate
        if isinstance(features, Tensor) and features.ndim == 2:  # one feature per row of a (e, w, d_in) input
            column = features[:, 0]
            return torch.einsum("ewd,ed->ew", centred, self.W_gate[:, column].T) + self.b_gate[column][:, None]
        return torch.addmm(self.b_gate[features], centred, self.W_gate[:, features])

    def apply(self, pre: Tensor, centred: Tensor) -> Tensor:
        # As SAELens's GatedSAE.encode: the gate's mask times the ReLU'd magnitude.
        return (self.gate(centred) > 0).to(pre.dtype) * torch.relu(pre)

    def apply_columns(self, pre: Tensor, features: slice | Tensor, centred: Tensor, context: Tensor | None) -> Tensor:
        return (self.gate(centred, features) > 0).to(pre.dtype) * torch.relu(pre)

    def scaled(self, s: float) -> "Gated":
        return Gated(self.W_gate * s, self.b_gate, self.r_mag)

    def feature_scaled(self, n: Tensor) -> "Gated":
        # As SAELens's GatedSAE.fold_W_dec_norm: both paths scale by n (the gate's sign is unchanged).
        return Gated(self.W_gate * n[None, :].to(self.W_gate), self.b_gate * n.to(self.b_gate), self.r_mag)

    def to(self, device: torch.device | None, dtype: torch.dtype | None) -> "Gated":
        return Gated(*(t.to(device=device, dtype=dtype) for t in (self.W_gate, self.b_gate, self.r_mag)))

    def describe(self) -> str:
        return "gated (a separate gate decides which features fire; the magnitude path gives the value)"

    def describe_feature(self, feature: int) -> str:
        return "fires when its gate pre-activation x' @ W_gate + b_gate is > 0 and its pre-activation is > 0 (gated)"


RULES: dict[str, type[ActivationRule]] = {rule.kind: rule for rule in (ReLU, JumpReLU, TopK, Gated)}
