"""Weight-only dashboard data: each feature's logits through ``W_O`` and the unembedding, and its correlated features.

Logits. A feature of an SAE on ``z`` writes ``d_f = W_dec[f]`` to ``z``; through the output projection it adds
``d_f W_O`` to the residual stream (for a concat SAE ``W_O_cat`` is ``W_O`` with heads stacked head-major, ``(n_heads
* d_head, d_model)``; for head ``h``'s SAE it is ``W_O[h]``, ``(d_head, d_model)``), and its direct effect on the
logits is ``l_f = d_f W_O W_U`` (``(d_vocab,)``). :func:`feature_logits` keeps the top and bottom ``k`` of ``l_f``
and a histogram of all ``d_vocab`` values on ``[min l_f, max l_f]`` in a fixed number of bins (one bin for a
degenerate range, see :mod:`.histograms`), a chunk of features at a time, so that ``n_features x d_vocab`` is never
held at once.

Correlated features. :func:`correlated_features` ranks, for each feature, the other features by the cosine of their
decoder rows, ``cos(d_f, d_g) = d_f . d_g / (||d_f|| ||d_g||)`` (0 for a zero row), a chunk of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..evaluation.top_activations import DEFAULT_CHUNK_ELEMENTS, feature_chunks
from ..validation import check_positive_int, check_tensor
from .histograms import RowHistograms, row_histograms

DEFAULT_LOGIT_BINS = 40


@dataclass(frozen=True, eq=False)
class FeatureLogits:
    """Each feature's direct effect on the logits.

    Attributes:
        top_ids, top_values: ``(n_features, k)`` the ``k`` largest logits and their token ids, largest first.
        bottom_ids, bottom_values: ``(n_features, k)`` the ``k`` smallest, smallest first.
        histogram: the histogram of every token's logit, per feature, on ``[min, max]``.
    """

    top_ids: Tensor
    top_values: Tensor
    bottom_ids: Tensor
    bottom_values: Tensor
    histogram: RowHistograms


@dataclass(frozen=True, eq=False)
class CorrelatedFeatures:
    """``indices`` and ``cosine`` ``(n_features, k)``: each feature's ``k`` nearest other features by decoder
    cosine, largest first."""

    indices: Tensor
    cosine: Tensor


def output_projection(W_O: Tensor | None, d_in: int) -> Tensor | None:
    """``W_O`` as a ``(d_in, d_model)`` matrix: a 2-d ``W_O`` as it is, a 3-d ``(n_heads, d_head, d_model)`` one
    with heads stacked head-major (``W_O_cat``)."""
    if W_O is None:
        return None
    check_tensor(W_O, "W_O")
    if W_O.ndim == 3:
        W_O = W_O.reshape(-1, W_O.shape[2])
    if W_O.ndim != 2 or W_O.shape[0] != d_in:
        raise InputError(f"W_O must be (d_in={d_in}, d_model), or (n_heads, d_head, d_model) with n_heads * d_head "
                         f"= {d_in}; got {tuple(W_O.shape)}")
    return W_O


def feature_logits(decoder_rows: Tensor, W_O: Tensor | None, W_U: Tensor, *, k: int = 10,
                   n_bins: int = DEFAULT_LOGIT_BINS, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> FeatureLogits:
    """:class:`FeatureLogits` of ``l_f = decoder_rows[f] @ W_O @ W_U`` (see the module docstring).

    Args:
        decoder_rows: ``(n_features, d_in)`` the features' decoder rows (``W_dec``, or ``W_dec_h`` of one head).
        W_O: ``(d_in, d_model)`` (``W_O[h]`` for head ``h``), ``(n_heads, d_head, d_model)`` (stacked into
            ``W_O_cat``), or ``None`` when ``decoder_rows`` already live in the residual stream.
        W_U: ``(d_model, d_vocab)`` unembedding.
        k: top and bottom logits kept (at most ``d_vocab``).
        n_bins: bins of each histogram.
        chunk_elements: logits (features x vocabulary) computed at a time.
    """
    check_tensor(decoder_rows, "decoder_rows", ndim=2)
    check_tensor(W_U, "W_U", ndim=2)
    k, n_bins = check_positive_int(k, "k"), check_positive_int(n_bins, "n_bins")
    W_O = output_projection(W_O, decoder_rows.shape[1])
    d_model = decoder_rows.shape[1] if W_O is None else W_O.shape[1]
    if W_U.shape[0] != d_model:
        raise InputError(f"W_U must be (d_model={d_model}, d_vocab), got {tuple(W_U.shape)}")
    if k > W_U.shape[1]:
        raise InputError(f"k={k} exceeds the vocabulary ({W_U.shape[1]} tokens)")
    directions = decoder_rows if W_O is None else decoder_rows @ W_O.to(decoder_rows)
    W_U = W_U.to(directions)
    parts: list[tuple[Tensor, ...]] = []
    for chunk in feature_chunks(directions.shape[0], W_U.shape[1], chunk_elements):
        logits = directions[chunk] @ W_U
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        lo, hi = logits.aminmax(dim=1)
        hist = row_histograms(logits, lo, hi, n_bins)
        parts.append((top.indices, top.values, bottom.indices, bottom.values, hist.lo, hist.hi, hist.counts,
                      hist.n_bins))
    cat = [torch.cat(column) for column in zip(*parts)]
    return FeatureLogits(top_ids=cat[0], top_values=cat[1], bottom_ids=cat[2], bottom_values=cat[3],
                         histogram=RowHistograms(lo=cat[4], hi=cat[5], counts=cat[6], n_bins=cat[7]))


def correlated_features(decoder_rows: Tensor, k: int = 5, *,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> CorrelatedFeatures:
    """:class:`CorrelatedFeatures`: for each row of ``decoder_rows`` (``(n_features, d_in)``, at least 2 rows) the
    ``k`` other rows of largest cosine (``k`` at most ``n_features - 1``)."""
    check_tensor(decoder_rows, "decoder_rows", ndim=2)
    k = check_positive_int(k, "k")
    n = decoder_rows.shape[0]
    if k > n - 1:
        raise InputError(f"k={k} correlated features asked of {n} features: at most {n - 1}")
    unit = decoder_rows / decoder_rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(decoder_rows.dtype).tiny)
    indices, cosine = [], []
    for chunk in feature_chunks(n, n, chunk_elements):
        similarity = unit[chunk] @ unit.T
        rows = torch.arange(chunk.start, chunk.stop, device=unit.device)
        similarity[rows - chunk.start, rows] = float("-inf")  # a feature is not its own neighbour
        top = similarity.topk(k, dim=1)
        indices.append(top.indices)
        cosine.append(top.values)
    return CorrelatedFeatures(indices=torch.cat(indices), cosine=torch.cat(cosine))
