"""Activation-level faithfulness of a decomposition of concat-``z`` features into per-head features.

A decomposition writes each concat feature's unit decoder direction ``u_f = W_dec[f] / ||W_dec[f]||`` as
``u_f ~= sum_i C[f, i] * e_i`` over the unit atoms ``e_i`` of the block dictionary
(``head_saes.dictionary(normalize=True)``; atom ``i`` is per-head feature ``j = feature[i]`` of head
``h = head[i]``). On held-out tokens it then predicts the concat feature's contribution from the per-head SAEs:

    y_f = a_f * ||W_dec[f]||                    the concat feature's contribution along u_f
    g_i = act_{h,j} * ||W_dec_h[j]||            per-head feature j of head h's contribution along e_i
    p_f = sum_i C[f, i] * g_i                   the decomposition's prediction of y_f

(codes on atoms that are not unit, or targets that are not unit rows, are first rescaled to this form:
``C[f, i] * ||atom_i|| / ||target_f||``). Per feature, over every token (streamed sums in float64): the Pearson
correlation of ``y`` and ``p``, the explained variance ``1 - E(y - p)^2 / Var(y)``, and the share of the concat
feature's top-``k`` tokens (by ``y``) that are also among the predictor's top-``k`` (by ``p``; both only over tokens
where they are positive); and, from the codes alone, how concentrated the decomposition is on heads: the entropy
(bits) of the head mass shares and the heads needed for ``mass_fraction`` of the mass.

A feature that never fires on the tokens has no correlation, explained variance or top tokens (NaN, counted), nor
does a feature whose code failed (NaN); a predictor that is constant (e.g. a zero code) leaves the correlation
undefined (NaN) while the explained variance is still defined.

``P`` for a batch is ``C @ G^T`` with ``C`` a sparse CSR matrix (``~16`` non-zeros a row) and ``G`` the per-head
contributions ``(n_tokens, n_atoms)``, a chunk of features and a bounded number of whole contexts at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .metrics import head_mass_shares, heads_for_mass, summarize
from .top_activations import DEFAULT_CHUNK_ELEMENTS, TopActivations, TopKTracker, feature_chunks
from ..activations import ActivationBatch, check_merge, check_state, merged_sum, prefixed, snapshot, split_state
from ..decomposition import Decomposition
from ..errors import InputError, InputTypeError
from ..loading.heads import HeadSAEs, check_compatible
from ..loading.sae import SAE
from ..validation import check_positive, check_positive_int

DEFAULT_TOKEN_ELEMENTS = 2**25
"""Per-head contributions (tokens x atoms) one sub-batch may hold: 128 MiB in float32."""


@dataclass(frozen=True)
class WorstFeature:
    """A feature the decomposition predicts worst (lowest correlation)."""

    feature: int
    correlation: float
    explained_variance: float
    top_overlap: float | None
    heads_for_mass: int


@dataclass(frozen=True)
class FaithfulnessReport:
    """JSON-ready summary of :class:`Faithfulness`: ``{mean, median, p10, p90, n_nonfinite}`` of each per-feature
    metric (:func:`~sparsedecomp.evaluation.metrics.summarize`) and the ``n`` worst features."""

    label: str
    n_features: int
    n_tokens: int
    k: int
    mass_fraction: float
    n_never_fire: int
    n_failed_codes: int
    n_correlation_undefined: int
    correlation: Mapping[str, Any]
    explained_variance: Mapping[str, Any]
    top_overlap: Mapping[str, Any]
    head_entropy_bits: Mapping[str, Any]
    heads_for_mass: Mapping[str, Any]
    worst: tuple[WorstFeature, ...]


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """Per-feature faithfulness of one decomposition (see the module docstring); tensors are ``(n_features,)``.

    Attributes:
        label: the solver setting's label.
        correlation, explained_variance, top_overlap: float64, NaN where undefined.
        head_entropy_bits: entropy of the head mass shares (NaN for a zero or failed code).
        heads_for_mass: long, heads needed for ``mass_fraction`` of the code's mass (0 for a zero code).
        n_firing: long, tokens where the concat feature fires.
        failed: bool, features whose code is not finite.
        top_target, top_predictor: top-``k`` tokens of ``y`` and of ``p``.
        n_tokens, k, mass_fraction: what was measured and the settings.
    """

    label: str
    correlation: Tensor
    explained_variance: Tensor
    top_overlap: Tensor
    head_entropy_bits: Tensor
    heads_for_mass: Tensor
    n_firing: Tensor
    failed: Tensor
    top_target: TopActivations
    top_predictor: TopActivations
    n_tokens: int
    k: int
    mass_fraction: float

    @property
    def n_features(self) -> int:
        return self.correlation.shape[0]

    def report(self, n_worst: int = 10) -> FaithfulnessReport:
        """The JSON-ready :class:`FaithfulnessReport` with the ``n_worst`` lowest-correlation features."""
        n_worst = check_positive_int(n_worst, "n_worst")
        finite = torch.isfinite(self.correlation)
        order = self.correlation.masked_fill(~finite, float("inf")).sort(stable=True).indices[: min(n_worst,
                                                                                                    int(finite.sum()))]
        worst = tuple(
            WorstFeature(feature=int(f), correlation=round(float(self.correlation[f]), 4),
                         explained_variance=round(float(self.explained_variance[f]), 4),
                         top_overlap=round(float(self.top_overlap[f]), 4), heads_for_mass=int(self.heads_for_mass[f]))
            for f in order
        )
        never = self.n_firing == 0
        return FaithfulnessReport(
            label=self.label, n_features=self.n_features, n_tokens=self.n_tokens, k=self.k,
            mass_fraction=self.mass_fraction, n_never_fire=int(never.sum()), n_failed_codes=int(self.failed.sum()),
            n_correlation_undefined=int((~finite).sum()),
            correlation=summarize(self.correlation), explained_variance=summarize(self.explained_variance),
            top_overlap=summarize(self.top_overlap), head_entropy_bits=summarize(self.head_entropy_bits),
            heads_for_mass=summarize(self.heads_for_mass.masked_select(~self.failed)), worst=worst,
        )


class FaithfulnessAccumulator:
    """:class:`~sparsedecomp.activations.Accumulator` of :class:`Faithfulness` for one decomposition.

    Args:
        concat_sae: the concatenated-``z`` SAE whose decoder rows were decomposed (one target per feature).
        head_saes: the per-head SAEs whose block dictionary the decomposition used.
        decomposition: codes on ``head_saes.dictionary()`` atoms (head and feature labels needed).
        label: the solver setting's name (default: the decomposition's solver).
        k: top tokens compared per feature.
        mass_fraction: for ``heads_for_mass``.
        chunk_elements: tokens x features held per feature chunk.
        token_elements: tokens x atoms of per-head contributions held per sub-batch (whole contexts).

    Mergeable: the seven sums add and the two top-``k`` trackers merge (:meth:`TopKTracker.merge`).
    """

    needs: tuple[str, ...] = ()

    def __init__(self, concat_sae: SAE, head_saes: HeadSAEs, decomposition: Decomposition, *,
                 label: str | None = None, k: int = 20, mass_fraction: float = 0.9,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, token_elements: int = DEFAULT_TOKEN_ELEMENTS) -> None:
        self.n_heads, self.d_head = check_compatible(concat_sae, head_saes)
        if not isinstance(decomposition, Decomposition):
            raise InputTypeError(f"decomposition must be a sparsedecomp.Decomposition, got {type(decomposition).__name__}")
        self.sae, self.head_saes, self.decomposition = concat_sae, head_saes, decomposition
        self.label = decomposition.solver if label is None else label
        if not isinstance(self.label, str) or not self.label:
            raise InputTypeError(f"label must be a non-empty string, got {self.label!r}")
        self.k = check_positive_int(k, "k")
        self.mass_fraction = check_positive(mass_fraction, "mass_fraction")
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
        self.token_elements = check_positive_int(token_elements, "token_elements")
        self.codes, self.failed = self._unit_codes()
        self.decoder_norm = concat_sae.W_dec.norm(dim=1)
        n = concat_sae.d_sae
        self.top_target = TopKTracker(n, k)
        self.top_predictor = TopKTracker(n, k)
        self.reset()

    def reset(self) -> None:
        self.top_target.reset()
        self.top_predictor.reset()
        self._sums: Tensor | None = None  # (7, n) float64: count, y, p, y^2, p^2, y p, (y - p)^2

    def _unit_codes(self) -> tuple[Tensor, Tensor]:
        """The codes as a CSR matrix on the per-head SAEs' features in head order (``offset[h] + j``), rescaled to
        unit atoms and unit targets; failed (non-finite) rows are zeroed and flagged."""
        decomposition, sae = self.decomposition, self.sae
        dictionary = decomposition.dictionary
        if dictionary is None or dictionary.head is None or dictionary.feature is None:
            raise InputError("the decomposition's dictionary must name each atom's head and feature: decompose into "
                             "head_saes.dictionary(normalize=True)")
        sizes = [s.d_sae for s in self.head_saes]
        if dictionary.n_atoms != sum(sizes) or dictionary.n_heads != self.n_heads or dictionary.dim != sae.d_in:
            raise InputError(f"the decomposition's dictionary ({dictionary.n_atoms} atoms, {dictionary.n_heads} heads, "
                             f"dim {dictionary.dim}) is not the block dictionary of these per-head SAEs "
                             f"({sum(sizes)} features, {self.n_heads} heads, dim {sae.d_in})")
        if decomposition.n_targets != sae.d_sae:
            raise InputError(f"the decomposition has {decomposition.n_targets} targets but the concat SAE has "
                             f"{sae.d_sae} features: decompose every decoder row, in order")
        row, atom, value = decomposition.codes.nonzero_entries()
        failed = torch.zeros(decomposition.n_targets, dtype=torch.bool, device=value.device)
        failed[row[~torch.isfinite(value)]] = True
        keep = ~failed[row]
        row, atom, value = row[keep], atom[keep], value[keep]
        atom_norm = dictionary.atoms.norm(dim=1)
        target_norm = decomposition.targets.norm(dim=1)
        value = value * atom_norm[atom] / target_norm[row].clamp_min(torch.finfo(value.dtype).tiny)
        offsets = torch.tensor([0, *sizes[:-1]], device=atom.device).cumsum(0)
        column = offsets[dictionary.head[atom]] + dictionary.feature[atom]
        device, dtype = sae.device, sae.dtype
        coo = torch.sparse_coo_tensor(torch.stack([row, column]).to(device), value.to(device=device, dtype=dtype),
                                      (decomposition.n_targets, sum(sizes)), check_invariants=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = coo.coalesce().to_sparse_csr()
        return csr, failed.cpu()

    def _code_rows(self, rows: slice) -> Tensor:
        """Rows ``rows`` of the CSR codes (sharing storage)."""
        crow, start, stop = self.codes.crow_indices(), rows.start, rows.stop
        a, b = int(crow[start]), int(crow[stop])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow[start : stop + 1] - a, self.codes.col_indices()[a:b],
                                           self.codes.values()[a:b], (stop - start, self.codes.shape[1]),
                                           check_invariants=False)

    def _head_contributions(self, z: Tensor) -> Tensor:
        """``G^T``, ``(n_atoms, n_tokens)``: ``act_{h,j} * ||W_dec_h[j]||`` in head order, for ``z``
        ``(n_tokens, n_heads, d_head)``."""
        parts = []
        for h, head_sae in self.head_saes.items():
            acts = head_sae.encode(z[:, h])
            parts.append((acts * head_sae.W_dec.norm(dim=1)).T.to(self.sae.dtype))
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def update(self, batch: ActivationBatch) -> None:
        if batch.n_heads != self.n_heads or batch.d_head != self.d_head:
            raise InputError(f"the batch has {batch.n_heads} heads of d_head {batch.d_head}, the SAEs read "
                             f"{self.n_heads} of {self.d_head}")
        contexts = max(1, self.token_elements // (batch.context_size * self.codes.shape[1]))
        for first in range(0, batch.n_contexts, contexts):
            z = batch.z[first : first + contexts]
            self._update_tokens(z.reshape(-1, self.n_heads, self.d_head), batch.first_context + first,
                                batch.context_size)

    def _update_tokens(self, z: Tensor, first_context: int, context_size: int) -> None:
        sae = self.sae
        x = z.reshape(z.shape[0], -1).to(device=sae.device, dtype=sae.dtype)
        centred = sae.centred(x)
        context = sae.encoding_context(centred)
        g_t = self._head_contributions(z.to(sae.device))
        if self._sums is None:
            self._sums = torch.zeros(7, sae.d_sae, dtype=torch.float64, device=sae.device)
        for chunk in feature_chunks(sae.d_sae, x.shape[0], self.chunk_elements):
            y = sae.encode_columns(centred, chunk, context) * self.decoder_norm[chunk]
            p = torch.sparse.mm(self._code_rows(chunk), g_t).T  # (n_tokens, m)
            yd, pd = y.double(), p.double()
            self._sums[:, chunk] += torch.stack([
                torch.full_like(yd[0], yd.shape[0]), yd.sum(0), pd.sum(0), yd.pow(2).sum(0), pd.pow(2).sum(0),
                (yd * pd).sum(0), (yd - pd).pow(2).sum(0)])
            self.top_target.update(y, first_context=first_context, context_size=context_size, features=chunk)
            self.top_predictor.update(p, first_context=first_context, context_size=context_size, features=chunk)

    def compute(self) -> Faithfulness:
        if self._sums is None:
            raise InputError("no activations were seen: faithfulness is undefined")
        n, sy, sp, syy, spp, syp, see = self._sums.cpu()
        var_y = syy / n - (sy / n).pow(2)
        var_p = spp / n - (sp / n).pow(2)
        cov = syp / n - sy * sp / n.pow(2)
        top_y, top_p = self.top_target.compute(), self.top_predictor.compute()
        fires = (top_y.n_firing > 0) & ~self.failed
        # Rounding leaves a constant series a variance of a few ulps of its mean square: treat that as zero.
        tiny_y = var_y <= 1e-12 * syy / n
        tiny_p = var_p <= 1e-12 * spp.clamp_min(1e-300) / n
        nan = torch.full_like(var_y, float("nan"))
        correlation = torch.where(fires & ~tiny_y & ~tiny_p,
                                  (cov / (var_y * var_p).clamp_min(1e-300).sqrt()).clamp(-1, 1), nan)
        explained = torch.where(fires & ~tiny_y, 1 - (see / n) / var_y.clamp_min(1e-300), nan)
        overlap = torch.where(fires, _top_overlap(top_y, top_p), nan)
        shares = head_mass_shares(self.decomposition.codes, self.decomposition.dictionary.head, self.n_heads).cpu()
        return Faithfulness(
            label=self.label, correlation=correlation, explained_variance=explained, top_overlap=overlap,
            head_entropy_bits=_entropy_bits(shares), heads_for_mass=heads_for_mass(shares, fraction=self.mass_fraction),
            n_firing=top_y.n_firing, failed=self.failed, top_target=top_y, top_predictor=top_p,
            n_tokens=top_y.n_tokens, k=self.k, mass_fraction=self.mass_fraction,
        )


    # -- merging and saving --------------------------------------------------------------------------------------
    _PARTS = ("top_target", "top_predictor")

    def _settings(self) -> dict[str, object]:
        # The decomposition is named by its label and size (its codes are not compared); chunk and token element
        # counts only bound memory.
        return {"label": self.label, "sae": self.sae.describe(), "n_atoms": self.codes.shape[1],
                "n_code_entries": int(self.codes.values().numel()), "k": self.k, "mass_fraction": self.mass_fraction}

    def merge(self, other: FaithfulnessAccumulator) -> None:
        check_merge(self, other)
        self._sums = merged_sum(self._sums, other._sums)
        self.top_target.merge(other.top_target)
        self.top_predictor.merge(other.top_predictor)

    def state_dict(self) -> dict[str, object]:
        state = dict(self._settings())
        if self._sums is not None:
            state["sums"] = snapshot(self._sums)
        for name in self._PARTS:
            state.update(prefixed(name, getattr(self, name).state_dict()))
        return state

    def load_state_dict(self, state) -> None:
        own, parts = split_state(state, self._PARTS, self.sae.device)
        check_state(self, own, {"sums": (7, self.sae.d_sae, torch.float64)}, optional=("sums",))
        for name in self._PARTS:
            getattr(self, name)._check_state(parts[name], f"{name}.")
        self._sums = own["sums"].to(self.sae.device).clone() if "sums" in own else None
        for name in self._PARTS:
            getattr(self, name).load_state_dict(parts[name])


def _top_overlap(target: TopActivations, predictor: TopActivations) -> Tensor:
    """``(n_features,)`` float64: ``|A & B| / |A|`` with ``A``, ``B`` the kept (context, position) entries of the
    target and of the predictor (NaN when ``A`` is empty)."""
    width = int(max(target.position.max(), predictor.position.max())) + 1
    a = torch.where(target.filled, target.context * width + target.position, torch.full_like(target.context, -1))
    b = torch.where(predictor.filled, predictor.context * width + predictor.position,
                    torch.full_like(predictor.context, -2))
    shared = (a[:, :, None] == b[:, None, :]).any(dim=2).sum(dim=1).double()
    kept = target.n_kept.double()
    return torch.where(kept > 0, shared / kept.clamp_min(1), torch.full_like(kept, float("nan")))


def _entropy_bits(shares: Tensor) -> Tensor:
    """``-sum_h s_h log2 s_h`` per row (``0 log 0 = 0``); NaN for a row without mass or with NaN shares."""
    terms = torch.where(shares > 0, -shares * torch.log2(shares.clamp_min(torch.finfo(shares.dtype).tiny)),
                        torch.zeros_like(shares))
    entropy = terms.sum(dim=1).double()
    undefined = ~(shares.sum(dim=1) > 0)
    return entropy.masked_fill(undefined, float("nan"))


def faithfulness_many(concat_sae: SAE, head_saes: HeadSAEs, decompositions: Mapping[str, Decomposition],
                      **kwargs: Any) -> dict[str, FaithfulnessAccumulator]:
    """One :class:`FaithfulnessAccumulator` per ``label -> decomposition``, to feed in one
    :func:`~sparsedecomp.activations.run_accumulators` pass."""
    return {f"faithfulness:{label}": FaithfulnessAccumulator(concat_sae, head_saes, d, label=label, **kwargs)
            for label, d in decompositions.items()}

