"""Everything the dashboards show, for the concat SAE and every per-head SAE, gathered with bounded passes.

1. One streamed pass (:func:`~sparsedecomp.activations.run_accumulators`) feeds a
   :class:`~sparsedecomp.dashboards.data.FeatureDataAccumulator` per SAE (counts, top-``k``, the reservoir sample
   for true-quantile examples) and a :class:`~sparsedecomp.evaluation.attribution.DFAAccumulator` for the concat
   SAE (the activation-based head attribution).
2. Weight-only data, no tokens: logits ``l_f = d_f W_O W_U`` and correlated features by decoder cosine.
3. The shown examples of each feature (its top-``k``, then the quantile groups) and their token windows
   (:func:`~sparsedecomp.dashboards.windows.example_windows`).
4. One more pass over the contexts that hold a shown example, for every SAE at once: the feature's activation at
   each token of each window, ``a_f(x_t) = relu((x_t - a b_dec) . W_enc[:, f] + b_enc[f])`` (one feature column
   per example, not the whole SAE).
5. DFA by source position and head of the shown examples only, on their windows' positions, every SAE from one
   forward pass over the contexts that hold shown examples (:func:`~sparsedecomp.dashboards.source_dfa.dfa_by_source_many`).

Steps 4 and 5 replay the batches of step 1 instead of running the model again when every context's ``z``, ``v``
and pattern fit in ``cache_budget`` bytes (:mod:`.replay`): one forward pass in all.

No loop over features: loops run over SAEs, stream batches and example chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..activations import ActivationBatch, hooked_transformer, run_accumulators
from ..decomposition import Decomposition
from ..naming import CONCAT_NAME, head_name
from ..errors import InputTypeError
from ..evaluation.attribution import DFAAccumulator, HeadAttribution, dfa_bias, head_attribution
from ..loading.heads import HeadSAEs, check_compatible
from ..loading.sae import CONCATENATED, SAE
from ..validation import check_positive_int
from .data import FeatureData, FeatureDataAccumulator, QuantileExamples
from .histograms import RowHistograms
from .replay import DEFAULT_CACHE_BUDGET, KeepBatches, batches_over, cache_bytes
from .source_dfa import DFARequest, dfa_by_source_many
from .weights import CorrelatedFeatures, FeatureLogits, correlated_features, feature_logits
from .windows import DEFAULT_LEFT, DEFAULT_RIGHT, ExampleWindows, example_windows

@dataclass(frozen=True, eq=False)
class ShownExamples:
    """The examples a feature page shows, ``(n_features, n_shown)`` each: the top-``k`` first, then the quantile
    groups in order (``group`` is ``(n_shown,)``: -1 for a top example, ``g`` for quantile group ``g``). Empty slots
    have ``context == -1`` and a NaN value."""

    context: Tensor
    position: Tensor
    value: Tensor
    group: Tensor

    @property
    def filled(self) -> Tensor:
        return self.context >= 0


@dataclass(frozen=True, eq=False)
class GatheredSAE:
    """One SAE's dashboard data (CPU tensors; ``n_features = sae.d_sae``, ``W`` the window width).

    Attributes:
        name: ``"concat"`` or ``"head_<h>"``.
        sae: the SAE.
        data: the streamed statistics.
        quantiles: the true-quantile examples drawn from ``data``.
        activation_histograms: histogram of the non-zero activations per feature.
        logits, correlated: weight-only data.
        examples: the shown examples; ``windows`` their token windows ``(n_features, n_shown, W)``.
        window_acts: ``(n_features, n_shown, W)`` the feature's activation at each window token (0 outside).
        dfa: ``(n_features, n_shown, W, len(dfa_heads))`` DFA by source (window positions) and head, 0 outside the
            window or after the example's position; ``dfa_before_window`` ``(n_features, n_shown, len(dfa_heads))``
            each head's DFA from the sources before the window (so that the window's terms, these and the bias terms
            ``dfa_bias_encoder`` / ``dfa_bias_decoder`` ``(n_features,)`` sum to the pre-activation).
    """

    name: str
    sae: SAE
    data: FeatureData
    quantiles: QuantileExamples
    activation_histograms: RowHistograms
    logits: FeatureLogits
    correlated: CorrelatedFeatures
    examples: ShownExamples
    windows: ExampleWindows
    window_acts: Tensor
    dfa: Tensor | None
    dfa_before_window: Tensor | None
    dfa_heads: tuple[int, ...]
    dfa_bias_encoder: Tensor
    dfa_bias_decoder: Tensor


@dataclass(frozen=True, eq=False)
class DashboardData:
    """Everything :mod:`.records` turns into feature records.

    Attributes:
        saes: ``name -> GatheredSAE``, the concat SAE first, then the heads in order.
        attribution: the concat SAE's head attribution (weight, encoder, DFA, each decomposition).
        decompositions: ``label -> Decomposition`` of the concat SAE's features into the per-head SAEs.
        n_heads: the model's heads at the layer; ``layer`` the attention layer.
        n_contexts, context_size: the tokens the statistics ran on.
    """

    saes: Mapping[str, GatheredSAE]
    attribution: HeadAttribution
    decompositions: Mapping[str, Decomposition]
    n_heads: int
    layer: int
    n_contexts: int
    context_size: int


def gather_dashboard_data(model: Any, tokens: Any, head_saes: HeadSAEs, concat_sae: SAE,
                          decompositions: Mapping[str, Decomposition] | None = None, *, top_k: int = 20,
                          quantile_groups: int = 5, examples_per_group: int = 5, n_correlated: int = 5,
                          n_logits: int = 10, left: int = DEFAULT_LEFT, right: int = DEFAULT_RIGHT,
                          exclude_bos: bool = True, ignore_tokens: tuple[int, ...] = (), with_dfa: bool = True,
                          batch_size: int | None = None, cache_budget: int = DEFAULT_CACHE_BUDGET,
                          progress: bool = False, log: Callable[[str], None] | None = None) -> DashboardData:
    """:class:`DashboardData` of every feature of ``concat_sae`` and of each SAE of ``head_saes`` on ``tokens``
    (a ``(n_contexts, context_size)`` tensor or a :class:`~sparsedecomp.loading.tokens.TokenSet`); see the module
    docstring for the passes. ``decompositions`` are of the concat SAE's features (one target per feature)."""
    if not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be a HeadSAEs, got {type(head_saes).__name__}")
    if not isinstance(concat_sae, SAE):
        raise InputTypeError(f"concat_sae must be a sparsedecomp SAE, got {type(concat_sae).__name__}")
    top_k = check_positive_int(top_k, "top_k")
    hooked = hooked_transformer(model)
    layer = concat_sae.require_hook("gathering dashboard data")[1]
    check_compatible(concat_sae, head_saes)
    n_heads = hooked.cfg.n_heads
    token_ids = getattr(tokens, "tokens", tokens)
    decompositions = dict(decompositions or {})

    saes: dict[str, tuple[SAE, int | str]] = {CONCAT_NAME: (concat_sae, CONCATENATED)}
    saes.update({head_name(h): (sae, h) for h, sae in head_saes.items()})
    options = dict(top_k=top_k, quantile_groups=quantile_groups, examples_per_group=examples_per_group,
                   sample_size=max(256, 4 * quantile_groups * examples_per_group), exclude_bos=exclude_bos,
                   ignore_tokens=ignore_tokens)
    accumulators: dict[str, Any] = {name: FeatureDataAccumulator(sae, site, **options)
                                    for name, (sae, site) in saes.items()}
    accumulators["dfa"] = DFAAccumulator(concat_sae, n_heads, k=top_k)
    # Small enough to keep: the windows' activations and DFA replay this pass instead of running the model again.
    if cache_bytes(hooked.cfg, *token_ids.shape) <= cache_budget:
        accumulators["kept"] = KeepBatches()
    results = run_accumulators(hooked, tokens, accumulators, layer=layer, batch_size=batch_size, progress=progress,
                               desc="dashboard data")
    kept = results.pop("kept", None)
    if log is not None:
        log(f"dashboard data: logits, example windows{' and their DFA by source' if with_dfa else ''} of "
            f"{len(saes)} SAEs ({'replaying the kept pass' if kept is not None else 'one more pass over the contexts'})")
    attribution = head_attribution(concat_sae, n_heads, dfa=results["dfa"], decompositions=decompositions)

    W_O, W_U = hooked.W_O[layer].detach(), hooked.W_U.detach()
    quantiles = {name: results[name].quantile_examples() for name in saes}
    shown = {name: shown_examples(results[name], quantiles[name]) for name in saes}
    windows = {name: example_windows(token_ids, shown[name].context, shown[name].position, left=left, right=right)
               for name in saes}
    acts = window_activations(hooked, token_ids, saes, shown, windows, layer=layer, batch_size=batch_size, kept=kept)
    dfas = (source_dfa_windows(hooked, token_ids, saes, shown, windows, layer=layer, batch_size=batch_size,
                               kept=kept) if with_dfa else {})
    del kept
    gathered = {}
    for name, (sae, site) in saes.items():
        data = results[name]
        rows = sae.W_dec.detach()
        bias = dfa_bias(sae)
        dfa, before_window, heads = dfas.get(name, (None, None, ()))
        gathered[name] = GatheredSAE(
            name=name, sae=sae, data=data, quantiles=quantiles[name],
            activation_histograms=data.activation_histograms(),
            logits=feature_logits(rows, W_O if site == CONCATENATED else W_O[site], W_U, k=n_logits),
            correlated=correlated_features(rows, min(n_correlated, sae.d_sae - 1)),
            examples=shown[name], windows=windows[name], window_acts=acts[name].cpu(),
            dfa=None if dfa is None else dfa.cpu(), dfa_before_window=before_window, dfa_heads=heads, dfa_bias_encoder=bias.encoder.cpu(),
            dfa_bias_decoder=bias.decoder.cpu())
    return DashboardData(saes=gathered, attribution=attribution, decompositions=decompositions, n_heads=n_heads,
                         layer=layer, n_contexts=token_ids.shape[0], context_size=token_ids.shape[1])


def shown_examples(data: FeatureData, q: QuantileExamples) -> ShownExamples:
    """The top-``k`` examples then every quantile group's examples (``q``), side by side per feature."""
    n, k = data.top.values.shape
    g, p = q.values.shape[1:]
    group = torch.cat([torch.full((k,), -1, dtype=torch.long), torch.arange(g).repeat_interleave(p)])
    return ShownExamples(context=torch.cat([data.top.context, q.context.reshape(n, g * p)], dim=1),
                         position=torch.cat([data.top.position, q.position.reshape(n, g * p)], dim=1),
                         value=torch.cat([data.top.values.to(q.values), q.values.reshape(n, g * p)], dim=1),
                         group=group)


def window_activations(model: Any, tokens: Tensor, saes: Mapping[str, tuple[SAE, int | str]],
                       shown: Mapping[str, ShownExamples], windows: Mapping[str, ExampleWindows], *, layer: int, batch_size: int | None = None,
                       chunk_elements: int = 2**24, kept: Sequence[ActivationBatch] | None = None) -> dict[str, Tensor]:
    """``name -> (n_features, n_shown, W)``: each SAE's feature activation at every token of every window of its
    shown examples (0 outside the context or in an empty slot), from one pass over the contexts that hold an
    example (or a replay of ``kept``, :mod:`.replay`). Only the example's own feature column of ``W_enc`` is
    applied."""
    used = torch.unique(torch.cat([s.context.reshape(-1) for s in shown.values()]))
    used = used[used >= 0]
    lookup, batches = batches_over(model, tokens, used, layer=layer, batch_size=batch_size, kept=kept)
    out = {name: torch.zeros(w.token_ids.shape, dtype=saes[name][0].dtype) for name, w in windows.items()}
    flat = {}
    for name, w in windows.items():
        n, e, width = w.token_ids.shape
        context = shown[name].context.reshape(-1)
        example = torch.arange(n * e)
        keep = context >= 0
        feature = torch.arange(n).repeat_interleave(e)
        flat[name] = (example[keep], lookup[context[keep]], feature[keep], w.positions.reshape(n * e, width)[keep],
                      w.valid.reshape(n * e, width)[keep])
    for batch in batches:
        lo, hi = batch.first_context, batch.first_context + batch.n_contexts
        for name, (sae, site) in saes.items():
            example, row, feature, positions, valid = flat[name]
            z = batch.z.reshape(batch.n_contexts, batch.context_size, -1) if site == CONCATENATED else batch.z[:, :, site]
            here = ((row >= lo) & (row < hi)).nonzero().squeeze(1)
            step = max(1, chunk_elements // (positions.shape[1] * sae.d_in))
            target = out[name].view(-1, positions.shape[1])
            for part in here.split(step):
                x = z[(row[part] - lo)[:, None], positions[part].clamp(0, batch.context_size - 1)]
                x = x.to(device=sae.device, dtype=sae.dtype)
                acts = sae.encode_examples(sae.centred(x), feature[part].to(sae.device))
                target[example[part]] = torch.where(valid[part], acts.cpu(), torch.zeros(()))
    return out


def source_dfa_windows(model: Any, tokens: Tensor, saes: Mapping[str, tuple[SAE, int | str]],
                       shown: Mapping[str, ShownExamples], windows: Mapping[str, ExampleWindows], *, layer: int,
                       batch_size: int | None = None, kept: Sequence[ActivationBatch] | None = None) -> dict[str, tuple[Tensor, Tensor, tuple[int, ...]]]:
    """DFA by source and head of every shown example of every SAE, on its window's positions: per SAE
    ``(n_features, n_shown, W, n_sae_heads)``, each head's DFA from the sources before the window ``(n_features,
    n_shown, n_sae_heads)``, and the heads of the last axis. One forward pass over the contexts that hold shown
    examples serves every SAE (:func:`~sparsedecomp.dashboards.source_dfa.dfa_by_source_many`)."""
    requests, layouts = [], {}
    for name, (sae, _) in saes.items():
        n, e, width = windows[name].token_ids.shape
        flat_context = shown[name].context.reshape(-1)
        filled = (flat_context >= 0).nonzero().squeeze(1)
        feature = torch.arange(n).repeat_interleave(e)
        positions = windows[name].positions.reshape(n * e, width)[filled]
        inside = windows[name].valid.reshape(n * e, width)[filled]
        # Only the window's sources are computed; padding positions come back as 0.
        requests.append(DFARequest(sae=sae, context=flat_context[filled], position=shown[name].position.reshape(-1)[filled],
                                   feature=feature[filled], sources=torch.where(inside, positions, -1)))
        layouts[name] = (n, e, width, filled)
    results = dfa_by_source_many(model, tokens, requests, layer=layer, batch_size=batch_size, kept=kept)
    out = {}
    for (name, (n, e, width, filled)), result in zip(layouts.items(), results):
        values = torch.zeros(n * e, width, len(result.heads), dtype=result.values.dtype)
        values[filled] = result.values.cpu()
        before = torch.zeros(n * e, len(result.heads), dtype=result.values.dtype)
        before[filled] = result.outside_sources().cpu()
        out[name] = (values.reshape(n, e, width, len(result.heads)), before.reshape(n, e, len(result.heads)),
                     result.heads)
    return out


