"""Splice-in losses: how much of a layer's (or one head's) contribution an SAE reconstruction keeps.

For next-token cross-entropy ``L`` on a batch of contexts:

* ``L_clean``: the model as is;
* ``L_zero``: ``hook_z`` of one head (``head=h``) or of the whole layer (``head=None``) set to 0;
* ``L_mean``: the same activations replaced by their mean over every position of ``tokens``;
* ``L_splice``: the activations replaced by the SAE's reconstruction ``x_hat = decode(encode(x))``, where ``x`` is
  one head's ``z`` (``(n, d_head)``) or the head-major concatenation of all heads (``(n, n_heads * d_head)``).

The recovered fraction is ``(L_zero - L_splice) / (L_zero - L_clean)`` (Kissane et al.; 1 = perfect, 0 = no better
than zeroing; it can be negative). Losses are token-weighted means over all predicted positions. The model runs
up to the hooked layer once per batch; every intervention then reruns only the layers from there on.

Uncertainty: every context has the same number of predicted tokens, so each loss is the mean of per-context
losses ``l_i`` and contexts are the independent units. With ``a_i = z_i - s_i`` and ``b_i = z_i - c_i`` (zeroed minus
spliced, zeroed minus clean), the recovered fraction is ``R = mean(a) / mean(b)`` and its delta-method standard error
is ``sqrt(sum_i (a_i - R b_i)^2 / (n (n - 1))) / |mean(b)|``; the ablation effect ``mean(b)`` has standard error
``std(b) / sqrt(n)``. A score whose denominator is within a few standard errors of 0 says nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from ..errors import InputError, InputTypeError
from ..loading.heads import warn_if_input_scale_missing

Reconstruction = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SpliceLosses:
    """Cross-entropy losses (nats per predicted token) for one hooked site and one SAE (if any)."""

    hook_name: str
    head: int | None
    clean: float
    zero_ablated: float
    mean_ablated: float
    spliced: float | None
    n_tokens: int
    clean_per_context: Tensor | None = None
    """Per-context mean cross-entropy, ``(n_contexts,)`` float64 (``None`` when built by hand)."""
    zero_per_context: Tensor | None = None
    spliced_per_context: Tensor | None = None

    @property
    def ablation_effect(self) -> float:
        """``L_zero - L_clean``: what zeroing the site costs (the recovered fraction's denominator)."""
        return self.zero_ablated - self.clean

    @property
    def ablation_effect_stderr(self) -> float | None:
        """Standard error of :attr:`ablation_effect` over contexts (``None`` without per-context losses)."""
        if self.clean_per_context is None or self.zero_per_context is None or len(self.clean_per_context) < 2:
            return None
        b = self.zero_per_context - self.clean_per_context
        return float(b.std(correction=1) / len(b) ** 0.5)

    @property
    def recovered_stderr(self) -> float | None:
        """Delta-method standard error of :attr:`recovered` over contexts (see the module docstring)."""
        if self.spliced_per_context is None or self.clean_per_context is None or len(self.spliced_per_context) < 2:
            return None
        a = self.zero_per_context - self.spliced_per_context
        b = self.zero_per_context - self.clean_per_context
        ratio, n = float(a.mean() / b.mean()), len(a)
        return float(((a - ratio * b).pow(2).sum() / (n * (n - 1))).sqrt() / b.mean().abs())

    @property
    def recovered(self) -> float | None:
        """``(L_zero - L_splice) / (L_zero - L_clean)``; ``None`` without an SAE."""
        if self.spliced is None:
            return None
        return recovered_fraction(clean=self.clean, ablated=self.zero_ablated, spliced=self.spliced)

    @property
    def recovered_vs_mean(self) -> float | None:
        """``(L_mean - L_splice) / (L_mean - L_clean)``: the same score against mean ablation."""
        if self.spliced is None or self.mean_ablated != self.mean_ablated:
            return None
        return recovered_fraction(clean=self.clean, ablated=self.mean_ablated, spliced=self.spliced)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict of every loss and both scores."""
        return {
            "hook_name": self.hook_name,
            "head": self.head,
            "clean": self.clean,
            "zero_ablated": self.zero_ablated,
            "mean_ablated": None if self.mean_ablated != self.mean_ablated else self.mean_ablated,
            "spliced": self.spliced,
            "recovered": self.recovered,
            "recovered_vs_mean": self.recovered_vs_mean,
            "recovered_stderr": self.recovered_stderr,
            "ablation_effect": self.ablation_effect,
            "ablation_effect_stderr": self.ablation_effect_stderr,
            "n_contexts": None if self.clean_per_context is None else len(self.clean_per_context),
            "n_tokens": self.n_tokens,
        }


def recovered_fraction(*, clean: float, ablated: float, spliced: float) -> float:
    """``(ablated - spliced) / (ablated - clean)``; ``ValueError`` when ablation does not change the loss."""
    gap = ablated - clean
    if gap == 0 or gap != gap:
        raise InputError(f"ablation does not change the loss (clean {clean}, ablated {ablated}): the score is undefined")
    return (ablated - spliced) / gap


def splice_losses(model, tokens: Tensor, sae: Any = None, *, layer: int, head: int | None = None,
                  hook: str = "attn.hook_z", batch_size: int = 16, include_mean: bool = True) -> SpliceLosses:
    """Splice-in losses for one site (``blocks.{layer}.{hook}``, one head or all) and one SAE (or ``None``)."""
    return splice_losses_many(model, tokens, {"sae": (head, sae)}, layer=layer, hook=hook, batch_size=batch_size,
                              include_mean=include_mean)["sae"]


@torch.no_grad()
def splice_losses_many(model, tokens: Tensor, splices: Mapping[str, tuple[int | None, Any]], *, layer: int,
                       hook: str = "attn.hook_z", batch_size: int = 16,
                       include_mean: bool = True) -> dict[str, SpliceLosses]:
    """Splice-in losses for several ``name -> (head, sae)`` interventions on the same layer, sharing the clean
    and prefix passes. ``sae`` is an object with ``encode``/``decode``, a callable ``x -> x_hat``, or ``None``.
    ``include_mean=False`` skips the mean-ablation runs (``mean_ablated`` is then NaN)."""
    tokens = _check_tokens(tokens)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise InputError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if not splices:
        raise InputError("splices is empty: give at least one name -> (head, sae)")
    recon = {}
    for name, (head, sae) in splices.items():
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads):
            raise InputError(f"splice {name!r}: head must be None or an int in [0, {n_heads}), got {head!r}")
        recon[name] = None if sae is None else _as_reconstruction(sae, name)
        # An SAE (or per-head SAEs) still needing its unsaved input scale splices in wrong: say so before running.
        warn_if_input_scale_missing(sae)
    if hook != "attn.hook_z" and any(h is not None for h, _ in splices.values()):
        raise InputError(f"a head index only makes sense for attn.hook_z, not {hook!r}")

    hook_name = f"blocks.{layer}.{hook}"
    resid_name = f"blocks.{layer}.hook_resid_pre"
    batches = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]

    # Pass 1: the residual stream entering the layer (reused by every intervention) and the mean activation.
    prefix, act_sum, n_pos = [], None, 0
    for batch in batches:
        _, cache = model.run_with_cache(batch, names_filter=[resid_name, hook_name], stop_at_layer=layer + 1)
        prefix.append(cache[resid_name])
        act = cache[hook_name]
        total = act.sum(dim=(0, 1))
        act_sum = total if act_sum is None else act_sum + total
        n_pos += act.shape[0] * act.shape[1]
    mean_act = act_sum / n_pos

    heads = sorted({h for h, _ in splices.values()}, key=lambda h: -1 if h is None else h)
    keys = ["clean", *[("zero", h) for h in heads], *[("mean", h) for h in heads]]
    keys += [("splice", name) for name in splices]
    per_context: dict = {key: [] for key in keys}  # per-context summed cross-entropy, one tensor per batch
    n_pred = 0
    for batch, resid in zip(batches, prefix):
        def run(fn=None):
            hooks = [] if fn is None else [(hook_name, fn)]
            with model.hooks(fwd_hooks=hooks):
                logits = model(resid, start_at_layer=layer)
            return _sum_ce(logits, batch)

        per_context["clean"].append(run())
        for h in heads:
            per_context[("zero", h)].append(run(_replace(h, lambda x: torch.zeros_like(x))))
            if include_mean:
                per_context[("mean", h)].append(run(_replace_with_mean(h, mean_act)))
        for name, (h, _) in splices.items():
            if recon[name] is not None:
                per_context[("splice", name)].append(run(_replace(h, recon[name])))
        n_pred += batch.shape[0] * (batch.shape[1] - 1)

    tokens_per_context = tokens.shape[1] - 1
    losses = {key: torch.cat(parts) / tokens_per_context for key, parts in per_context.items() if parts}

    out = {}
    for name, (h, _) in splices.items():
        spliced = losses.get(("splice", name))
        out[name] = SpliceLosses(
            hook_name=hook_name,
            head=h,
            clean=float(losses["clean"].mean()),
            zero_ablated=float(losses[("zero", h)].mean()),
            mean_ablated=float(losses[("mean", h)].mean()) if include_mean else float("nan"),
            spliced=None if spliced is None else float(spliced.mean()),
            n_tokens=n_pred,
            clean_per_context=losses["clean"],
            zero_per_context=losses[("zero", h)],
            spliced_per_context=spliced,
        )
    return out


def _sum_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Summed next-token cross-entropy of each context, ``(batch,)`` in float64 (sums of many terms)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1).double().sum(dim=1)


def _replace(head: int | None, fn: Reconstruction):
    """A hook replacing one head's slice (``x: (n, d_head)``) or the flattened activation (``(n, prod(rest))``)."""
    def hook(act: Tensor, hook=None) -> Tensor:
        if head is None:
            flat = act.reshape(act.shape[0] * act.shape[1], -1)
            return fn(flat).to(act.dtype).reshape(act.shape)
        out = act.clone()
        part = act[:, :, head, :]
        out[:, :, head, :] = fn(part.reshape(-1, part.shape[-1])).to(act.dtype).reshape(part.shape)
        return out
    return hook


def _replace_with_mean(head: int | None, mean_act: Tensor):
    def hook(act: Tensor, hook=None) -> Tensor:
        out = act.clone()
        if head is None:
            out[:] = mean_act
        else:
            out[:, :, head, :] = mean_act[head]
        return out
    return hook


def _as_reconstruction(sae: Any, name: str) -> Reconstruction:
    if hasattr(sae, "encode") and hasattr(sae, "decode"):
        return lambda x: sae.decode(sae.encode(x))
    if callable(sae):
        return sae
    raise InputTypeError(f"splice {name!r}: expected an SAE with encode/decode or a callable x -> x_hat, got {type(sae).__name__}")


def _check_tokens(tokens: Any) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise InputTypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.int64):
        raise InputTypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise InputError(f"tokens must have shape (n_contexts, n_ctx >= 2), got {tuple(tokens.shape)}")
    return tokens.long()
