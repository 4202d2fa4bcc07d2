"""Direct feature attribution by source position, split by head, for the examples a dashboard shows.

With ``v`` ``(src, n_key_value_heads, d_head)`` (``attn.hook_v``, bias included) and the pattern ``A`` ``(n_heads,
dest, src)``, ``z[dest, h] = sum_src A[h, dest, src] v[src, kv(h)]``, and a feature's pre-activation is linear in
``z``:

    pre_f(dest) = sum_h sum_src A[h, dest, src] * (v[src, kv(h)] . W_enc[B_h, f])  -  a * b_dec . W_enc[:, f]  +  b_enc[f]

(``B_h`` the columns of head ``h``: all heads for a concatenated-``z`` SAE, the one head for a per-head SAE, whose
``W_enc`` rows are exactly ``B_h``; ``kv(h) = h // (n_heads // n_key_value_heads)`` the key/value head query head
``h`` reads under grouped-query attention, ``h`` itself without it: see :mod:`sparsedecomp.activations`). Query
heads that share a key/value head share ``v`` but not the pattern nor ``W_enc``'s rows, so their terms differ. :func:`dfa_by_source` returns the double sum's terms ``dfa[example, src, h]``
and the two bias terms apart (:func:`~sparsedecomp.evaluation.attribution.dfa_bias`), for the given examples only:
it runs the model on just their contexts (each distinct context once), in batches, and gathers one destination row
of the pattern per example. Call it per batch of features (pages are written in batches) to bound its output,
``n_examples x context_size x n_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..activations import ActivationBatch, check_layer, check_tokens, hooked_transformer
from ..errors import InputError, InputTypeError
from ..evaluation.attribution import dfa_bias
from ..evaluation.top_activations import DEFAULT_CHUNK_ELEMENTS
from ..loading.sae import CONCATENATED, SAE
from ..validation import check_positive_int
from .replay import batches_over


@dataclass(frozen=True, eq=False)
class SourceDFA:
    """DFA by source position and head of each example.

    Attributes:
        values: ``(n_examples, context_size, len(heads))``: ``dfa[e, src, i]`` for head ``heads[i]``; 0 for ``src``
            after the example's position (causal attention).
        head_totals: ``(n_examples, len(heads))``: each head's DFA summed over every source, ``z[dest, h] .
            W_enc[B_h, f]`` (computed from ``z`` at the destination, so it is whole even when ``values`` holds only
            a window of sources: ``head_totals - values.sum(1)`` is what the sources outside the window carry).
        heads: the heads of the last axis (all heads for a concatenated-``z`` SAE, its own for a per-head SAE).
        bias_decoder: ``(n_examples,)`` ``-a * b_dec . W_enc[:, f]`` of each example's feature.
        bias_encoder: ``(n_examples,)`` ``b_enc[f]``.
    """

    values: Tensor
    head_totals: Tensor
    heads: tuple[int, ...]
    bias_decoder: Tensor
    bias_encoder: Tensor

    def pre_activation(self) -> Tensor:
        """``(n_examples,)`` the feature's pre-activation at each example: the DFA summed over every source and
        head plus both bias terms."""
        return self.head_totals.sum(dim=1) + self.bias_decoder + self.bias_encoder

    def outside_sources(self) -> Tensor:
        """``(n_examples, len(heads))`` each head's DFA from the sources not in ``values`` (before a window)."""
        return self.head_totals - self.values.sum(dim=1)


@dataclass(frozen=True, eq=False)
class DFARequest:
    """The examples of one SAE whose DFA by source is wanted: ``context`` indexes the shared token rows, with
    ``position``, ``feature`` (each ``(n_examples,)``) and optional ``sources`` ``(n_examples, W)`` (see
    :func:`dfa_by_source`)."""

    sae: SAE
    context: Tensor
    position: Tensor
    feature: Tensor
    sources: Tensor | None = None


def dfa_by_source(model: Any, sae: SAE, contexts: Tensor, positions: Tensor, features: Tensor, *, layer: int,
                  batch_size: int | None = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                  sources: Tensor | None = None) -> SourceDFA:
    """:class:`SourceDFA` of the examples ``(contexts[e], positions[e], features[e])``.

    Args:
        model: the ``HookedTransformer`` (or a ``LoadedModel``) the SAE reads.
        sae: a concatenated-``z`` SAE or a per-head SAE (``sae.head`` says which).
        contexts: ``(n_examples, context_size)`` token ids of each example's context.
        positions: ``(n_examples,)`` the destination position of each example.
        features: ``(n_examples,)`` the feature of each example.
        layer: the attention layer the SAE reads.
        batch_size: distinct contexts per forward pass (by default from the activation stream's memory budget).
        chunk_elements: the most ``v . W_enc`` products (heads x source span x examples of one context) held at
            a time.
        sources: ``(n_examples, W)`` the source positions wanted (e.g. a page's token window); then ``values`` is
            ``(n_examples, W, len(heads))`` and a position outside the context gives 0. Only those sources are
            computed, not the whole context (a window is a few percent of a 1,024-token context).
    """
    tokens = check_tokens(contexts, name="contexts")
    distinct, which = torch.unique(tokens, dim=0, return_inverse=True)
    request = DFARequest(sae=sae, context=which, position=positions, feature=features, sources=sources)
    return dfa_by_source_many(model, distinct, [request], layer=layer, batch_size=batch_size,
                              chunk_elements=chunk_elements)[0]


def dfa_by_source_many(model: Any, tokens: Tensor, requests: list[DFARequest], *, layer: int,
                       batch_size: int | None = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                       kept: Sequence[ActivationBatch] | None = None) -> list[SourceDFA]:
    """:func:`dfa_by_source` of several SAEs' examples on shared token rows ``tokens`` ``(n_contexts, size)``, with
    one forward pass over the contexts any request uses (a dashboard's concat and per-head SAEs share one), or none
    when ``kept`` holds every context's batches with ``v`` and the pattern (:mod:`.replay`)."""
    hooked = hooked_transformer(model)
    layer = check_layer(hooked, layer)
    n_heads, d_head = hooked.cfg.n_heads, hooked.cfg.d_head
    tokens = check_tokens(tokens, d_vocab=hooked.cfg.d_vocab, name="contexts")
    n_contexts, size = tokens.shape
    chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
    plans = [_plan(request, n_heads, d_head, n_contexts, size) | {"chunk_elements": chunk_elements}
             for request in requests]
    if not plans:
        return []
    used = torch.unique(torch.cat([plan["context"].cpu() for plan in plans]))
    lookup, batches = batches_over(hooked, tokens, used, layer=layer, include=("v", "pattern"),
                                   batch_size=batch_size, kept=kept)
    for batch in batches:
        for plan in plans:
            which = lookup.to(plan["context"].device)[plan["context"]]
            in_batch = ((which >= batch.first_context) & (which < batch.first_context + batch.n_contexts)).nonzero()
            if in_batch.numel():
                _fill_batch(plan, batch, which[in_batch.squeeze(1)] - batch.first_context, in_batch.squeeze(1))
    results = []
    for plan in plans:
        bias = dfa_bias(plan["sae"])
        results.append(SourceDFA(values=plan["values"], head_totals=plan["head_totals"], heads=plan["heads"],
                                 bias_decoder=bias.decoder[plan["feature"]], bias_encoder=bias.encoder[plan["feature"]]))
    return results


def _fill_batch(plan: dict, batch: Any, row: Tensor, examples: Tensor) -> None:
    """``plan["values"][examples]`` from one activation batch (``row``: each example's context in the batch).

    ``v[src, h] . W_enc[B_h, f]`` is computed per context as one batched matrix product over the context's source
    span and the features of its examples, ``(heads, span, d_head) @ (heads, d_head, examples)``, then read at each
    example's window: no ``(examples, W, heads, d_head)`` gather of ``v`` (a copy of ``W`` rows per example, which
    made this memory-bound). The pattern is read at ``(destination, window)`` directly."""
    sae, n_heads = plan["sae"], len(plan["heads"])
    # The SAE's heads are all of them or one: a slice, a view rather than a copy of the pattern
    head_slice = slice(plan["heads"][0], plan["heads"][-1] + 1)
    # Each query head's own v: under grouped-query attention hook_v has fewer heads, and head h reads kv head h // g
    v_all = batch.v_of_heads(plan["heads"]).to(device=sae.device, dtype=sae.dtype).permute(0, 2, 1, 3)  # (c, h, s, d)
    z_all = batch.z.to(device=sae.device, dtype=sae.dtype)[:, :, head_slice]  # (c, dest, heads, d)
    pattern_all = batch.pattern.to(device=sae.device, dtype=sae.dtype)[:, head_slice]  # (c, heads, dest, src)
    sources = plan["sources"][examples]  # (e, W), clamped into the context
    heads = torch.arange(n_heads, device=sae.device)
    # (e, W, heads) read through one flat index (much faster than a four-tensor advanced index)
    n_h, size = pattern_all.shape[1], pattern_all.shape[2]
    flat = ((row[:, None, None] * n_h + heads) * size + plan["position"][examples][:, None, None]) * size
    pattern = pattern_all.reshape(-1)[flat + sources[:, :, None]]  # (a copy first only for a one-head slice)
    v_dot_w = torch.empty_like(pattern)  # (e, W, heads)
    order = torch.argsort(row, stable=True)
    rows, counts = torch.unique_consecutive(row[order], return_counts=True)
    for r, in_context in zip(rows.tolist(), order.split(counts.tolist())):
        lo, hi = int(sources[in_context].min()), int(sources[in_context].max()) + 1
        # bounded output: heads x span x examples at most chunk_elements
        for group in in_context.split(max(1, plan["chunk_elements"] // (n_heads * (hi - lo)))):
            rows_g = plan["W_enc_rows"][plan["feature"][examples[group]]].view(len(group), n_heads, -1)  # (g, h, d)
            weights = rows_g.permute(1, 2, 0)  # (heads, d_head, group)
            span = torch.bmm(v_all[r, :, lo:hi], weights)  # (heads, span, group)
            local = torch.arange(len(group), device=sae.device)
            # span[h, s - lo, g] at each example's window, through one flat index
            at = (heads * (hi - lo) + (sources[group] - lo)[:, :, None]) * len(group) + local[:, None, None]
            v_dot_w[group] = span.reshape(-1)[at]
            z_dest = z_all[r, plan["position"][examples[group]]]  # (group, heads, d)
            plan["head_totals"][examples[group]] = (z_dest * rows_g).sum(dim=2)
    plan["values"][examples] = pattern * v_dot_w * plan["inside"][examples, :, None]


def _plan(request: DFARequest, n_heads: int, d_head: int, n_contexts: int, size: int) -> dict:
    """A request checked and laid out on its SAE's device: weights per example, clamped sources and their mask."""
    sae = request.sae
    if not isinstance(sae, SAE):
        raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
    heads = _sae_heads(sae, n_heads, d_head)
    device = sae.device
    n_examples = len(request.context) if isinstance(request.context, Tensor) else -1
    context = _index_vector(request.context, "contexts", n_examples, n_contexts).to(device)
    position = _index_vector(request.position, "positions", n_examples, size).to(device)
    feature = _index_vector(request.feature, "features", n_examples, sae.d_sae).to(device)
    sources = request.sources
    if sources is None:
        sources = torch.arange(size, device=device).expand(n_examples, -1)
    elif not isinstance(sources, Tensor) or sources.ndim != 2 or sources.shape[0] != n_examples:
        raise InputError(f"sources must be an (n_examples={n_examples}, W) tensor of positions, got "
                         f"{getattr(sources, 'shape', type(sources).__name__)}")
    sources = sources.to(device=device, dtype=torch.long)
    inside = (sources >= 0) & (sources < size)
    # W_enc's columns as contiguous rows: each context gathers its examples' features' rows
    return {"sae": sae, "heads": heads, "W_enc_rows": sae.W_enc.T.contiguous(), "context": context,
            "position": position, "feature": feature, "sources": sources.clamp(0, size - 1), "inside": inside,
            "values": torch.zeros(n_examples, sources.shape[1], len(heads), dtype=sae.dtype, device=device),
            "head_totals": torch.zeros(n_examples, len(heads), dtype=sae.dtype, device=device)}


def _sae_heads(sae: SAE, n_heads: int, d_head: int) -> tuple[int, ...]:
    if sae.head == CONCATENATED:
        if sae.d_in != n_heads * d_head:
            raise InputError(f"the concatenated-z SAE reads d_in={sae.d_in}, the model's z is n_heads * d_head = "
                             f"{n_heads * d_head}")
        return tuple(range(n_heads))
    if isinstance(sae.head, int):
        if sae.head >= n_heads or sae.d_in != d_head:
            raise InputError(f"the per-head SAE reads head {sae.head} with d_in={sae.d_in}; the model has {n_heads} "
                             f"heads of d_head={d_head}")
        return (sae.head,)
    raise InputError(f"DFA by source needs an SAE on hook_z that says which head it reads (an int, or "
                     f"{CONCATENATED!r}), got head={sae.head!r}: set it with sae.with_hook(..., head=...)")


def _index_vector(value: Any, name: str, n: int, bound: int) -> Tensor:
    if not isinstance(value, Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        raise InputTypeError(f"{name} must be an integer tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if value.shape != (n,):
        raise InputError(f"{name} must have shape ({n},), one per example, got {tuple(value.shape)}")
    if n and (int(value.min()) < 0 or int(value.max()) >= bound):
        raise InputError(f"{name} must lie in [0, {bound}), got values in [{int(value.min())}, {int(value.max())}]")
    return value.long()

