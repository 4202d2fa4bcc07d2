"""Splice-in losses: how much of a layer's (or one head's) contribution a reconstruction of ``hook_z`` keeps.

A **variant** replaces ``blocks.{layer}.attn.hook_z`` -- one head's ``z`` (``head=h``, rows ``(n, d_head)``) or the
head-major concatenation of every head's (``head=None``, rows ``(n, n_heads * d_head)``) -- and the model runs on.
:func:`splice_variants` builds the variants a researcher compares, with these names:

* ``clean``: nothing replaced;
* ``zero_head_<h>`` / ``zero_layer``: head ``h``'s ``z`` / every head's set to 0;
* ``mean_layer``: every position's ``z`` replaced by the mean ``z`` over tokens (see :func:`splice_variants` on why
  the mean comes from an earlier pass);
* ``head_sae_<h>``: head ``h``'s ``z`` replaced by its per-head SAE's ``decode(encode(z_h))``, the others clean;
* ``all_head_saes``: every head by its own SAE at once; ``concat_sae``: the concatenated-``z`` SAE's reconstruction;
* ``routed_<label>``: the concat SAE's activations sent through a decomposition onto the per-head atoms
  (:class:`~sparsedecomp.evaluation.routing.RoutedDecoder`): ``z_hat = encode(z) @ W_routed + b_dec``.

For every variant ``v`` and context ``i`` the accumulator keeps ``l_i(v)``, the mean next-token cross-entropy over
the context's predicted positions, and ``k_i(v)``, the mean over the same positions of ``KL(p_clean || p_v)``.
``ce_loss`` and ``kl`` are their means over contexts (every context has the same number of predicted tokens, so
these are also token means), with standard errors ``std(x) / sqrt(n)`` over contexts, the independent units.

**Score** (loss recovered, Kissane et al.): ``S = (L_zero - L_v) / (L_zero - L_clean)``, where ``L_zero`` is the
variant's ``score_baseline``: ``zero_head_<h>`` for single-head variants, ``zero_layer`` for whole-layer ones.
1 = the clean loss, 0 = no better than zeroing; it can be negative. With ``a_i = l_i(zero) - l_i(v)`` and
``b_i = l_i(zero) - l_i(clean)``, ``S = mean(a) / mean(b)`` and its delta-method standard error is
``sqrt(sum_i (a_i - S b_i)^2 / (n (n - 1))) / |mean(b)|``. ``ablation_effect = mean(b) = L_zero - L_clean`` has
standard error ``std(b) / sqrt(n)``; a score whose denominator is within a few standard errors of 0 says nothing.
By choice, ``clean`` has no score and no baseline (it would be 1 against any baseline, by definition), and each zero
ablation has score ``None`` (0 against itself by definition) but reports its own ``ablation_effect``;
``mean_layer`` is scored against ``zero_layer`` (how much of zeroing's cost the mean keeps).

Speed: the stream runs the model up to the layer once per batch; every variant reruns only the layers from
``layer`` on, to the final residual stream (``model(resid_pre, start_at_layer=layer, stop_at_layer=n_layers)``).
The unembedding, the largest cost at a large vocabulary (gemma-3-270m: 262,144 tokens, 168M multiply-adds a
position against about 66M for its last six layers), is paid once per variant and position, never more, and its
memory is bounded: the logits are made a block of vocabulary columns at a time for all the batch's positions
(:data:`~sparsedecomp.activations.LOSS_CHUNK_BYTES` of vocabulary-wide tensors whatever the context length and
batch; each block one well-shaped matrix product), every variant's block beside the clean one, and the softmax sums
are carried from block to block (:class:`OnlineLosses`). A log-softmax is never materialised (``CE = lse -
logit_target`` and ``KL = lse_v - lse_c - sum_x p_c (logits_v - logits_c)``), head variants write into ``z`` in
place, and only the per-context sums are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from ..activations import (DEFAULT_MEMORY_BUDGET, LOSS_CHUNK_BYTES, ActivationBatch, check_merge, check_state,
                           hooked_transformer, run_accumulators, snapshot)
from ..naming import head_variant
from ..errors import InputError, InputTypeError
from ..loading.heads import HeadSAEs, warn_if_input_scale_missing
from ..loading.sae import warn_input_scale
from .routing import RoutedDecoder

Reconstruction = Callable[[Tensor], Tensor]
"""``x (n, width) -> x_hat (n, width)``: ``width`` is ``d_head`` for a head variant, ``n_heads * d_head`` else."""


@dataclass(frozen=True, eq=False)
class SpliceVariant:
    """One intervention on ``hook_z``.

    Attributes:
        name: the key it is reported under.
        description: what it does, in words.
        head: the head whose ``z`` is replaced, or ``None`` for the whole layer.
        replacement: a :data:`Reconstruction`, or ``None`` for the clean model.
        score_baseline: the zero-ablation variant its score and ablation effect refer to (``None`` for clean).
        setting: JSON-ready parameters worth reporting (e.g. a routed variant's solver setting), or ``None``.
    """

    name: str
    description: str
    head: int | None
    replacement: Reconstruction | None
    score_baseline: str | None
    setting: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a splice variant needs a non-empty name, got {self.name!r}")
        if self.head is not None and (isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0):
            raise InputError(f"variant {self.name!r}: head must be None or a non-negative int, got {self.head!r}")
        if self.replacement is not None and not callable(self.replacement):
            raise InputTypeError(f"variant {self.name!r}: replacement must be callable x -> x_hat, "
                                 f"got {type(self.replacement).__name__}")

    @property
    def is_scored(self) -> bool:
        """Whether the loss-recovered score means something (not clean, not the baseline itself)."""
        return self.score_baseline is not None and self.score_baseline != self.name


@dataclass(frozen=True)
class SpliceResult:
    """Splice-in numbers of one variant (see the module docstring for every formula). Losses are nats per
    predicted token; ``None`` where a number is undefined (a score without baseline, a standard error of one
    context, a zero denominator)."""

    name: str
    description: str
    head: int | None
    ce_loss: float
    ce_loss_stderr: float | None
    kl: float
    kl_stderr: float | None
    score: float | None
    score_stderr: float | None
    score_baseline: str | None
    ablation_effect: float | None
    ablation_effect_stderr: float | None
    score_measurable: bool | None
    """Whether the score's denominator (``ablation_effect``) is a measurement (:func:`is_measurable`: at least
    :data:`MEASURABLE_NATS` and :data:`MEASURABLE_STDERRS` standard errors
    above 0; a score over a denominator that is noise says nothing about the variant. ``None`` for an unscored
    variant (``clean``, the zero ablations)."""
    setting: Mapping[str, Any] | None
    n_contexts: int
    n_tokens: int


@dataclass(frozen=True)
class SpliceReport:
    """Every variant's :class:`SpliceResult`, by name, in the order the variants were given (``clean`` first).
    Indexing and iteration go through ``results``."""

    hook_name: str
    n_contexts: int
    n_tokens: int
    results: Mapping[str, SpliceResult]

    def __getitem__(self, name: str) -> SpliceResult:
        if name not in self.results:
            raise KeyError(f"no splice variant {name!r}; have {list(self.results)}")
        return self.results[name]

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)


# -- statistics over contexts -----------------------------------------------------------------------------------
def mean_and_stderr(values: Tensor) -> tuple[float, float | None]:
    """``(mean, std / sqrt(n))`` of per-context values; the standard error is ``None`` for one context."""
    n = values.numel()
    if n == 0:
        raise InputError("no contexts were seen: splice losses are undefined")
    stderr = float(values.std(correction=1) / math.sqrt(n)) if n > 1 else None
    return float(values.mean()), stderr


def recovered_with_stderr(*, clean: Tensor, ablated: Tensor, spliced: Tensor) -> tuple[float | None, float | None]:
    """Loss recovered ``S = mean(a) / mean(b)`` with ``a = ablated - spliced``, ``b = ablated - clean`` (per-context
    losses), and its delta-method standard error ``sqrt(sum (a - S b)^2 / (n (n - 1))) / |mean(b)|``. ``(None,
    None)`` when ``mean(b) == 0`` (ablation does not change the loss: the score is undefined)."""
    a, b = ablated - spliced, ablated - clean
    denominator = float(b.mean())
    if denominator == 0 or not math.isfinite(denominator):
        return None, None
    score = float(a.mean()) / denominator
    n = a.numel()
    if n < 2:
        return score, None
    return score, float(((a - score * b).pow(2).sum() / (n * (n - 1))).sqrt()) / abs(denominator)


def recovered_fraction(*, clean: float, ablated: float, spliced: float) -> float:
    """``(ablated - spliced) / (ablated - clean)``; ``InputError`` when ablation does not change the loss."""
    gap = ablated - clean
    if gap == 0 or gap != gap:
        raise InputError(f"ablation does not change the loss (clean {clean}, ablated {ablated}): the score is undefined")
    return (ablated - spliced) / gap


# -- the variants -------------------------------------------------------------------------------------------------
def splice_variants(n_heads: int, d_head: int, *, head_saes: HeadSAEs | Mapping[int, Any] | None = None,
                    concat_sae: Any = None, mean_z: Tensor | None = None,
                    routed: Mapping[str, RoutedDecoder] | None = None,
                    heads: Iterable[int] | None = None) -> dict[str, SpliceVariant]:
    """The ordered variants (see the module docstring) for a layer of ``n_heads`` heads of width ``d_head``.

    Always ``clean``, ``zero_head_<h>`` for each of ``heads`` (default: every head) and ``zero_layer``; then
    ``mean_layer`` when ``mean_z`` is given, ``head_sae_<h>`` for each of ``heads`` with an SAE in ``head_saes``
    (a :class:`~sparsedecomp.loading.HeadSAEs` or a ``{head: sae}`` mapping; an SAE is anything with
    ``encode``/``decode``), ``all_head_saes`` when ``head_saes`` covers every head, ``concat_sae`` and one
    ``routed_<label>`` per entry of ``routed`` (which need ``concat_sae``). Take a subset with
    :func:`select_variants`.

    ``mean_z`` is the ``(n_heads, d_head)`` mean of ``z`` over tokens, e.g. ``run_accumulators(model, tokens,
    {"mean": MeanAccumulator()}, layer=L)["mean"]``. It is an input rather than computed on the fly because a
    streamed pass sees each batch once: the mean over all tokens is only known at the end, and a running mean would
    ablate early batches with a different value than late ones. It may come from other tokens than the evaluation
    (e.g. the SAEs' training tokens), which keeps the ablation value independent of the tokens scored.

    SAEs that still need an unsaved input scale warn here, before anything runs.
    """
    for value, what in ((n_heads, "n_heads"), (d_head, "d_head")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be a positive int, got {value!r}")
    heads_asked = heads is not None
    heads = _check_heads(range(n_heads) if heads is None else heads, n_heads)
    head_sae_map = _head_sae_map(head_saes, n_heads, d_head)
    d_z = n_heads * d_head

    variants = [SpliceVariant("clean", "the model as is", None, None, None)]
    for h in heads:
        variants.append(SpliceVariant(head_variant("zero_head", h), f"head {h}'s z set to 0", h, torch.zeros_like,
                                      head_variant("zero_head", h)))
    variants.append(SpliceVariant("zero_layer", "every head's z set to 0", None, torch.zeros_like, "zero_layer"))
    if mean_z is not None:
        variants.append(_mean_variant(mean_z, n_heads, d_head))
    if head_saes is not None:
        if isinstance(head_saes, HeadSAEs):
            head_saes.warn_input_scale()
        else:
            warn_input_scale([s for s in head_sae_map.values() if hasattr(s, "needs_input_scale")])
        for h in heads:
            if h not in head_sae_map:
                if heads_asked:
                    raise InputError(f"head {h} was asked for but head_saes has no SAE for it "
                                     f"(heads with an SAE: {sorted(head_sae_map)})")
                continue
            variants.append(SpliceVariant(head_variant("head_sae", h), f"head {h}'s z replaced by its per-head SAE's "
                                          "reconstruction, the other heads clean", h,
                                          _sae_reconstruction(head_sae_map[h]), head_variant("zero_head", h)))
        if sorted(head_sae_map) == list(range(n_heads)):
            saes = [head_sae_map[h] for h in range(n_heads)]
            variants.append(SpliceVariant("all_head_saes", "every head's z replaced by its own per-head SAE's "
                                          "reconstruction at once", None, _all_heads_reconstruction(saes, d_head),
                                          "zero_layer"))
    encode = None
    if concat_sae is not None:
        _check_width(concat_sae, d_z, "concat_sae")
        warn_if_input_scale_missing(concat_sae)
        # Every rerun's z equals the clean z, so the concat and routed variants share one encode per batch.
        encode = _reuse_last(concat_sae.encode)
        variants.append(SpliceVariant("concat_sae", "all heads' z replaced by the concatenated-z SAE's "
                                      "reconstruction", None, lambda x: concat_sae.decode(encode(x)), "zero_layer"))
    for label, decoder in (routed or {}).items():
        variants.append(_routed_variant(label, decoder, concat_sae, encode, d_z))
    return {v.name: v for v in variants}


def select_variants(variants: Mapping[str, SpliceVariant], names: Iterable[str]) -> dict[str, SpliceVariant]:
    """The named variants with what they need (``clean`` and their score baselines), in ``variants``' order."""
    names = list(names)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise InputError(f"unknown splice variants {unknown}; have {list(variants)}")
    keep = {"clean", *names, *(variants[n].score_baseline for n in names if variants[n].score_baseline)}
    return {name: v for name, v in variants.items() if name in keep}


def _check_heads(heads: Iterable[int], n_heads: int) -> tuple[int, ...]:
    heads = tuple(heads)
    bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n_heads]
    if bad:
        raise InputError(f"unknown heads {bad}: the layer has heads 0..{n_heads - 1}")
    return tuple(dict.fromkeys(heads))


def _head_sae_map(head_saes: Any, n_heads: int, d_head: int) -> dict[int, Any]:
    if head_saes is None:
        return {}
    if not (isinstance(head_saes, HeadSAEs) or isinstance(head_saes, Mapping)):
        raise InputTypeError(f"head_saes must be HeadSAEs or a {{head: sae}} mapping, got {type(head_saes).__name__}")
    out = dict(head_saes.items())
    _check_heads(out, n_heads)
    for h, sae in out.items():
        _check_width(sae, d_head, f"head_saes[{h}]")
    return out


def _check_width(sae: Any, width: int, what: str) -> None:
    if not (hasattr(sae, "encode") and hasattr(sae, "decode")):
        raise InputTypeError(f"{what} must have encode and decode, got {type(sae).__name__}")
    d_in = getattr(sae, "d_in", width)
    if d_in != width:
        raise InputError(f"{what} reads d_in={d_in} but its site is {width} wide")


def _sae_reconstruction(sae: Any) -> Reconstruction:
    return lambda x: sae.decode(sae.encode(x))


def _all_heads_reconstruction(saes: list[Any], d_head: int) -> Reconstruction:
    def reconstruct(x: Tensor) -> Tensor:
        return torch.cat([s.decode(s.encode(block)) for s, block in zip(saes, x.split(d_head, dim=1))], dim=1)
    return reconstruct


def _mean_variant(mean_z: Tensor, n_heads: int, d_head: int) -> SpliceVariant:
    if not isinstance(mean_z, Tensor):
        raise InputTypeError(f"mean_z must be a tensor, got {type(mean_z).__name__}")
    if tuple(mean_z.shape) != (n_heads, d_head):
        raise InputError(f"mean_z must have shape (n_heads, d_head) = ({n_heads}, {d_head}), got {tuple(mean_z.shape)}")
    if not bool(torch.isfinite(mean_z).all()):
        raise InputError("mean_z holds NaN or inf")
    flat = mean_z.reshape(1, -1)
    return SpliceVariant("mean_layer", "every position's z replaced by the mean z over tokens", None,
                         lambda x: flat.to(x).expand_as(x), "zero_layer")


def _reuse_last(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn`` remembering its last input and output: an input equal to the last one (checked, ``torch.equal``: far
    cheaper than an SAE encode) returns the remembered output."""
    last: list[Tensor] = []

    def call(x: Tensor) -> Tensor:
        if last and last[0].shape == x.shape and torch.equal(last[0], x):
            return last[1]
        out = fn(x)
        last[:] = [x, out]
        return out

    return call


def _routed_variant(label: str, decoder: RoutedDecoder, concat_sae: Any, encode: Callable[[Tensor], Tensor] | None,
                    d_z: int) -> SpliceVariant:
    if not isinstance(decoder, RoutedDecoder):
        raise InputTypeError(f"routed[{label!r}] must be a RoutedDecoder, got {type(decoder).__name__}")
    if concat_sae is None:
        raise InputError(f"routed[{label!r}] needs concat_sae (its activations are what is routed)")
    expected = (getattr(concat_sae, "d_sae", decoder.W_routed.shape[0]), d_z)
    if tuple(decoder.W_routed.shape) != expected:
        raise InputError(f"routed[{label!r}] has W_routed of shape {tuple(decoder.W_routed.shape)}, but the concat "
                         f"SAE needs (d_sae, n_heads * d_head) = {expected}")
    W = decoder.W_routed.to(device=concat_sae.W_dec.device, dtype=concat_sae.W_dec.dtype)

    def reconstruct(x: Tensor) -> Tensor:
        return encode(x) @ W + concat_sae.b_dec

    return SpliceVariant(f"routed_{label}", f"the concat SAE's activations routed onto the per-head atoms through "
                         f"the {decoder.method} decomposition in {decoder.space} space", None, reconstruct,
                         "zero_layer", {"label": decoder.label, "method": decoder.method, "space": decoder.space,
                                        **decoder.setting})


# -- losses over vocabulary blocks ----------------------------------------------------------------------------------
class OnlineLosses:
    """Each position's CE and KL(clean || variant) from logits seen a block of vocabulary columns at a time.

    Per position and variant ``v`` it carries the running maximum ``m_v``, ``s_v = sum_x exp(l_v(x) - m_v)`` over the
    columns seen and the target's logit; for the KL, ``w_v = sum_x exp(l_c(x) - m_c) (l_v(x) - l_c(x))`` on the clean
    run's running maximum. When a block raises a maximum, the sums carried so far are rescaled by
    ``exp(m_old - m_new)``. At the end ``lse_v = m_v + log s_v``, ``CE = lse_v - l_v(target)`` and
    ``KL = lse_v - lse_c - w_v / s_c`` (``sum_x p_c (log p_c - log p_v)`` with the difference of logits taken first,
    so a small KL keeps its accuracy). Exactly the full-vocabulary values, up to float32 rounding."""

    def __init__(self, rows: int, names: list[str], *, device: torch.device) -> None:
        def filled(value: float) -> dict[str, Tensor]:
            return {name: torch.full((rows,), value, device=device) for name in names}

        self.max, self.sum, self.target, self.weighted = filled(-math.inf), filled(0.0), filled(0.0), filled(0.0)
        self._clean_max: Tensor | None = None  # the clean run's maximum after the current block
        self._clean_exp: Tensor | None = None  # exp(l_c - that maximum) on the current block
        self._clean_rescale: Tensor | None = None

    def _add(self, name: str, logits: Tensor, targets: Tensor, columns: slice) -> tuple[Tensor, Tensor, Tensor]:
        """Fold one block of ``name``'s logits into its sums; returns ``(new maximum, rescale, exp(logits - it))``."""
        new_max = torch.maximum(self.max[name], logits.max(dim=1).values)
        rescale = torch.exp(self.max[name] - new_max)
        exp = torch.exp(logits - new_max[:, None])
        self.sum[name] = self.sum[name] * rescale + exp.sum(dim=1)
        inside = (targets >= columns.start) & (targets < columns.stop)
        rows = inside.nonzero().squeeze(1)
        self.target[name][rows] = logits[rows, targets[rows] - columns.start]
        return new_max, rescale, exp

    def add_clean(self, logits: Tensor, targets: Tensor, columns: slice) -> None:
        self._clean_max, self._clean_rescale, self._clean_exp = self._add("clean", logits, targets, columns)

    def add_variant(self, name: str, logits: Tensor, clean: Tensor, targets: Tensor, columns: slice) -> None:
        self.max[name] = self._add(name, logits, targets, columns)[0]
        self.weighted[name] = (self.weighted[name] * self._clean_rescale
                               + torch.linalg.vecdot(self._clean_exp, logits - clean))

    def advance(self) -> None:
        """After every variant of a block: the clean run's maximum moves on."""
        self.max["clean"] = self._clean_max

    def result(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        lse = {name: self.max[name] + self.sum[name].log() for name in self.max}
        ce = {name: lse[name] - self.target[name] for name in lse}
        kl = {name: (lse[name] - lse["clean"] - self.weighted[name] / self.sum["clean"]) if name != "clean"
              else torch.zeros_like(lse[name]) for name in lse}
        return ce, kl


# -- the accumulator ----------------------------------------------------------------------------------------------
class SpliceAccumulator:
    """Splice-in losses of ``variants`` (name -> :class:`SpliceVariant`), streamed: per batch, one clean rerun and
    one rerun per variant from the hooked layer on; ``compute()`` gives a :class:`SpliceReport`.

    Per-context sums are kept (float64, two numbers per context and variant) so that standard errors and scores
    are exact whatever the batching.

    Mergeable: every kept value carries its context's global index (``first_context + i``), and a merge puts the
    contexts of both parts in that order (stably), so that merged parts hold the per-context values of one pass in
    stream order and compute the same means and standard errors, whichever part is merged into which. The parts
    must not share contexts (a shared context would count twice)."""

    needs: tuple[str, ...] = ("resid_pre",)

    def __init__(self, model: Any, variants: Mapping[str, SpliceVariant]) -> None:
        self.model = hooked_transformer(model)
        if not isinstance(variants, Mapping) or not variants:
            raise InputError("variants must be a non-empty mapping name -> SpliceVariant (see splice_variants)")
        n_heads = self.model.cfg.n_heads
        for name, v in variants.items():
            if not isinstance(v, SpliceVariant):
                raise InputTypeError(f"variant {name!r} must be a SpliceVariant, got {type(v).__name__}")
            if v.name != name:
                raise InputError(f"variant {name!r} is named {v.name!r}: keys must be the variants' names")
            if v.head is not None and v.head >= n_heads:
                raise InputError(f"variant {name!r} replaces head {v.head} but the model has heads 0..{n_heads - 1}")
            if v.score_baseline is not None and v.score_baseline not in variants:
                raise InputError(f"variant {name!r} is scored against {v.score_baseline!r}, which is not among the "
                                 "variants: add it (select_variants keeps baselines)")
        clean = variants.get("clean", SpliceVariant("clean", "the model as is", None, None, None))
        if clean.replacement is not None:
            raise InputError("the variant named 'clean' must not replace anything (replacement=None)")
        self.variants = {"clean": clean, **{k: v for k, v in variants.items() if k != "clean"}}
        self.reset()

    def reset(self) -> None:
        self._ce: dict[str, list[Tensor]] = {name: [] for name in self.variants}
        self._kl: dict[str, list[Tensor]] = {name: [] for name in self.variants}
        self._context: list[Tensor] = []  # the contexts' indices in the stream, in the order of the values
        self._hook_name: str | None = None
        self._predicted_per_context = 0

    @torch.no_grad()
    def update(self, batch: ActivationBatch) -> None:
        batch.require("resid_pre")
        self._hook_name = f"blocks.{batch.layer}.attn.hook_z"
        self._predicted_per_context = batch.context_size - 1
        n, pos = batch.n_contexts, batch.context_size
        rows = n * pos
        # One rerun per variant from the hooked layer to the normed final residual stream (d_model wide); the
        # vocabulary-wide logits are then made a block of vocabulary columns at a time (_vocabulary_blocks), for every
        # variant from the same columns as the clean ones, with the softmax sums carried online across blocks: the
        # unembedding is paid once per variant and position, and a 262,144-token vocabulary never holds a whole
        # batch's logits.
        normed = {name: self._final_normed(batch, None if v.replacement is None else v).reshape(rows, -1)
                  for name, v in self.variants.items()}
        # Each position predicts the next token; the last one of a context predicts nothing (dropped below).
        targets = torch.cat([batch.tokens[:, 1:], batch.tokens[:, :1]], dim=1).reshape(-1)
        losses = OnlineLosses(rows, list(self.variants), device=targets.device)
        for columns in self._vocabulary_blocks(rows):
            clean = self._logits_block(normed["clean"], columns, "clean")
            losses.add_clean(clean, targets, columns)
            for name, variant in self.variants.items():
                if variant.replacement is not None:
                    losses.add_variant(name, self._logits_block(normed[name], columns, name), clean, targets, columns)
            losses.advance()
        ce, kl = losses.result()
        if not bool(torch.isfinite(ce["clean"]).all()):
            raise InputError(f"the model's clean logits are not finite on contexts {batch.first_context}.."
                             f"{batch.first_context + n - 1}: check its weights for NaN / inf")
        for name in self.variants:
            self._ce[name].append(ce[name].double().reshape(n, pos)[:, :-1].mean(dim=1).cpu())
            self._kl[name].append(kl[name].double().reshape(n, pos)[:, :-1].mean(dim=1).cpu())
        self._context.append(torch.arange(batch.first_context, batch.first_context + n))

    def _final_normed(self, batch: ActivationBatch, variant: SpliceVariant | None) -> Tensor:
        """The final residual stream after the final norm ``(batch, pos, d_model)``, with ``variant`` spliced in: the
        rerun from the hooked layer (TransformerLens's ``forward`` with ``stop_at_layer=n_layers`` stops just before
        its final norm, applied here; the unembedding is :meth:`_logits_block`)."""
        hooks = [] if variant is None else [(f"blocks.{batch.layer}.attn.hook_z", _hook(variant))]
        with self.model.hooks(fwd_hooks=hooks):
            residual = self.model(batch.resid_pre, start_at_layer=batch.layer, stop_at_layer=self.model.cfg.n_layers)
        return residual if self.model.cfg.normalization_type is None else self.model.ln_final(residual)

    def _vocabulary_blocks(self, rows: int) -> list[slice]:
        """Column blocks of the vocabulary such that one block's logits for ``rows`` positions take a quarter of
        :data:`~sparsedecomp.activations.LOSS_CHUNK_BYTES` (four such tensors live at once)."""
        d_vocab = self.model.cfg.d_vocab
        width = max(1, min(d_vocab, LOSS_CHUNK_BYTES // (16 * rows)))
        return [slice(c, min(c + width, d_vocab)) for c in range(0, d_vocab, width)]

    def _logits_block(self, normed: Tensor, columns: slice, name: str) -> Tensor:
        """Float32 logits ``(rows, block)`` of the vocabulary ``columns``: TransformerLens's unembedding (``x @ W_U +
        b_U``) and logit soft-cap on those columns. ``name``: the variant's (for timing)."""
        from transformer_lens.utilities.activation_functions import apply_softcap

        unembed = self.model.unembed
        logits = torch.addmm(unembed.b_U[columns], normed, unembed.W_U[:, columns])
        return apply_softcap(logits, self.model.cfg.output_logits_soft_cap).float()

    def compute(self) -> SpliceReport:
        if self._hook_name is None:
            raise InputError("no batches were seen: splice losses are undefined")
        ce = {name: torch.cat(parts) for name, parts in self._ce.items()}
        kl = {name: torch.cat(parts) for name, parts in self._kl.items()}
        n_contexts = len(ce["clean"])
        n_tokens = n_contexts * self._predicted_per_context
        results = {}
        for name, v in self.variants.items():
            ce_loss, ce_stderr = mean_and_stderr(ce[name])
            kl_mean, kl_stderr = mean_and_stderr(kl[name])
            effect = effect_stderr = score = score_stderr = None
            if v.score_baseline is not None:
                effect, effect_stderr = mean_and_stderr(ce[v.score_baseline] - ce["clean"])
            if v.is_scored:
                score, score_stderr = recovered_with_stderr(clean=ce["clean"], ablated=ce[v.score_baseline],
                                                            spliced=ce[name])
            results[name] = SpliceResult(
                name=name, description=v.description, head=v.head, ce_loss=ce_loss, ce_loss_stderr=ce_stderr,
                kl=kl_mean, kl_stderr=kl_stderr, score=score, score_stderr=score_stderr,
                score_baseline=v.score_baseline, ablation_effect=effect, ablation_effect_stderr=effect_stderr,
                score_measurable=is_measurable(effect, effect_stderr) if v.is_scored else None,
                setting=None if v.setting is None else MappingProxyType(dict(v.setting)),
                n_contexts=n_contexts, n_tokens=n_tokens)
        return SpliceReport(hook_name=self._hook_name, n_contexts=n_contexts, n_tokens=n_tokens,
                            results=MappingProxyType(results))

    # -- merging and saving --------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, list]:
        # The replacements are functions and cannot be compared; the variants' names, heads and baselines can.
        return {"variants": list(self.variants),
                "variant_heads": [-1 if v.head is None else v.head for v in self.variants.values()],
                "score_baselines": [v.score_baseline or "" for v in self.variants.values()]}

    def _values(self) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``(context, ce, kl)``: every kept value, one tensor per variant, and their contexts."""
        def cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
            return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)

        return (cat(self._context, torch.long), {name: cat(parts, torch.float64) for name, parts in self._ce.items()},
                {name: cat(parts, torch.float64) for name, parts in self._kl.items()})

    def merge(self, other: SpliceAccumulator) -> None:
        check_merge(self, other)
        if other._hook_name is None:
            return
        if self._hook_name is not None and (self._hook_name, self._predicted_per_context) != \
                (other._hook_name, other._predicted_per_context):
            raise InputError(f"cannot merge splice losses at {other._hook_name} with {other._predicted_per_context} "
                             f"predicted tokens a context into ones at {self._hook_name} with "
                             f"{self._predicted_per_context}: feed every part the same layer and context size")
        (mine, ce, kl), (theirs, their_ce, their_kl) = self._values(), other._values()
        context = torch.cat([mine, theirs])
        order = context.sort(stable=True).indices
        self._context = [context[order]]
        self._ce = {name: [torch.cat([ce[name], their_ce[name]])[order]] for name in self.variants}
        self._kl = {name: [torch.cat([kl[name], their_kl[name]])[order]] for name in self.variants}
        self._hook_name, self._predicted_per_context = other._hook_name, other._predicted_per_context

    def state_dict(self) -> dict[str, object]:
        """Settings, ``hook_name`` (``""`` before the first batch), ``predicted_per_context``, ``context`` (each
        kept context's index) and per variant ``ce.<name>`` / ``kl.<name>``, float64 per context."""
        context, ce, kl = self._values()
        state: dict[str, object] = {**self._settings(), "hook_name": self._hook_name or "",
                                    "predicted_per_context": self._predicted_per_context, "context": snapshot(context)}
        for name in self.variants:
            state[f"ce.{name}"], state[f"kl.{name}"] = snapshot(ce[name]), snapshot(kl[name])
        return state

    def load_state_dict(self, state) -> None:
        per_context = ("n_contexts", torch.float64)
        tensors = {"context": ("n_contexts", torch.long),
                   **{f"{what}.{name}": per_context for name in self.variants for what in ("ce", "kl")}}
        check_state(self, state, tensors, {"hook_name": str, "predicted_per_context": int})
        seen = bool(state["hook_name"])
        if seen != (state["context"].numel() > 0):
            raise InputError(f"the SpliceAccumulator state has hook_name {state['hook_name']!r} but "
                             f"{state['context'].numel()} contexts: both are set once a batch was seen")
        self._context = [state["context"].clone()] if seen else []
        self._ce = {name: [state[f"ce.{name}"].clone()] if seen else [] for name in self.variants}
        self._kl = {name: [state[f"kl.{name}"].clone()] if seen else [] for name in self.variants}
        self._hook_name = state["hook_name"] or None
        self._predicted_per_context = state["predicted_per_context"]


MEASURABLE_STDERRS = 5.0
MEASURABLE_NATS = 0.01
"""The package's one rule for a splice score whose denominator is a measurement (:func:`is_measurable`): the
ablation it is scored against costs at least :data:`MEASURABLE_NATS` (a site measurably but practically unused says
nothing about an SAE) and at least :data:`MEASURABLE_STDERRS` standard errors over contexts."""


def is_measurable(effect: float | None, stderr: float | None) -> bool:
    """Whether an ablation's cost ``effect`` (nats, mean over contexts, with its standard error ``stderr``) is a
    measurement a score can divide by: at least :data:`MEASURABLE_NATS` and :data:`MEASURABLE_STDERRS` standard
    errors. Without a standard error (one context) it is unknown, so not measurable."""
    if effect is None or stderr is None or not effect > 0:
        return False
    return effect >= MEASURABLE_NATS and effect >= MEASURABLE_STDERRS * stderr


def _hook(variant: SpliceVariant):
    """A ``hook_z`` hook applying ``variant.replacement``: head variants write their head's slice in place (``z``
    is this rerun's own tensor, so no clone is needed); whole-layer variants return the new ``z``."""
    fn, head = variant.replacement, variant.head

    def check(out: Tensor, shape: tuple[int, ...]) -> Tensor:
        if tuple(out.shape) != shape:
            raise InputError(f"variant {variant.name!r} returned shape {tuple(out.shape)} for input {shape}")
        return out

    def hook(z: Tensor, hook: Any = None) -> Tensor:
        if head is None:
            flat = z.reshape(z.shape[0] * z.shape[1], -1)
            return check(fn(flat), tuple(flat.shape)).to(z.dtype).reshape(z.shape)
        part = z[:, :, head].reshape(-1, z.shape[-1])
        z[:, :, head] = check(fn(part), tuple(part.shape)).to(z.dtype).reshape(z.shape[0], z.shape[1], -1)
        return z

    return hook


def splice_losses(model: Any, tokens: Any, variants: Mapping[str, SpliceVariant], *, layer: int,
                  batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  progress: bool = False) -> SpliceReport:
    """Splice-in losses of ``variants`` (see :func:`splice_variants`) on ``tokens`` (a tensor or a ``TokenSet``)
    at ``blocks.{layer}.attn.hook_z``, in one streamed pass (:func:`~sparsedecomp.activations.run_accumulators`;
    to share the pass with other statistics, run a :class:`SpliceAccumulator` there yourself)."""
    accumulator = SpliceAccumulator(model, variants)
    return run_accumulators(model, tokens, {"splice": accumulator}, layer=layer, batch_size=batch_size,
                            memory_budget=memory_budget, progress=progress, desc="splice")["splice"]
