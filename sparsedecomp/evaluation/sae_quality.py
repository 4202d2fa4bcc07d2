"""SAE quality on real activations, streamed: SAELens ``run_evals``'s metrics, under SAELens's key names.

One :class:`SAEQualityAccumulator` per SAE reads its input from each :class:`~sparsedecomp.activations.ActivationBatch`
(head ``h``'s ``z`` for a per-head SAE, all heads' ``z`` side by side for the concat SAE), so
:func:`~sparsedecomp.activations.run_accumulators` evaluates every SAE of a layer in one model pass.

Definitions (``sae_lens.evals.get_sparsity_and_variance_metrics``, SAELens 6). Over the ``N`` evaluated tokens
``i`` with SAE input ``x_i``, feature activations ``f_i = encode(x_i)`` and reconstruction ``x̂_i = decode(f_i)``::

    l0          = mean_i #{j : f_ij != 0}
    l1          = mean_i sum_j |f_ij|
    l2_norm_in  = mean_i ||x_i||            l2_norm_out = mean_i ||x̂_i||
    l2_ratio    = mean_i ||x̂_i|| / n_i,     n_i = ||x_i||, or 1 where ||x_i|| < 1e-4
    relative_reconstruction_bias = mean_i ||x̂_i||^2 / mean_i <x_i, x̂_i>       (Rajamanoharan et al. 2024, eq. 10)
    mse         = mean_i ||x_i - x̂_i||^2                (sum over dimensions, mean over tokens)
    explained_variance = 1 - mse / (mean_i ||x_i||^2 - ||mean_i x_i||^2)
                  (1 if the inputs do not vary, denominator < 1e-10, and mse < 1e-10; 0 if they do not vary and mse
                  does not vanish)
    explained_variance_legacy = mean_i [1 - ||x_i - x̂_i||^2 / ||x_i - μ_B||^2],  μ_B the mean input of token i's batch
    cossim      = mean_i <x_i, x̂_i> / (||x_i|| ||x̂_i||)   (NaN, null in JSON, if any x_i or x̂_i is zero, as in SAELens)
    feature_density_j = #{i : f_ij != 0} / N
    consistent_activation_heuristic_j = #{i : f_ij != 0} / #{contexts in which feature j fires}

Excluded tokens (``exclude_bos``: position 0 of every context; ``ignore_tokens``: every position holding one of those
token ids, as SAELens's ``ignore_tokens`` / ``run_evals(exclude_special_tokens=...)``) are left out of every sum and of
``N``; both choices are recorded in the result.

The SAE is a ReLU SAE (:class:`~sparsedecomp.loading.SAE`), so ``f >= 0``: ``f != 0`` is ``f > 0`` and ``|f|`` is
``f``. Per-token values are computed in the SAE's dtype, as SAELens does, and summed in float64, so streaming the
tokens in any number of batches gives the one-batch result up to the per-token values' own rounding (a matrix product
of another shape rounds differently in float32: about 1e-7 relative). Two metrics are tied to batches, as in SAELens:

* ``explained_variance_legacy`` centres each token on its own batch's mean input ``μ_B`` (SAELens's eval batch, here
  the stream's batch): it changes with the batch size, which is why SAELens replaced it. It is kept for comparison
  with older SAELens / SAEBench numbers.
* ``relative_reconstruction_bias``: the one deliberate difference. SAELens computes the ratio per eval batch and
  averages the ratios over batches; here it is the ratio of the two means over all tokens (SAELens's value when it
  evaluates one batch), so that it does not depend on how the tokens were batched.

The downstream keys (``ce_loss_*``, ``kl_div_*``) need splice-in forward passes; they are ``None`` until
:func:`with_downstream` fills them in from losses measured elsewhere, with SAELens's scores::

    ce_loss_score = (ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - ce_loss_without_sae)
    kl_div_score  = (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..activations import ActivationBatch, check_merge, check_state, snapshot
from ..naming import CONCAT_NAME, head_name
from ..errors import InputError, InputTypeError
from ..loading.heads import HeadSAEs
from ..loading.sae import CONCATENATED, SAE

DENSE_THRESHOLD = 0.1
"""A feature firing on more than this fraction of tokens counts as dense."""
LOG10_DENSITY_BIN_EDGES: tuple[float, ...] = tuple(-10.0 + 0.5 * k for k in range(21))
"""Fixed edges of the log10 feature-density histogram: -10, -9.5, ..., 0."""
_MIN_NORM = 1e-4  # SAELens's l2_ratio divides by 1 where ||x|| is below this
_ZERO_VARIANCE = 1e-10  # SAELens's threshold for inputs that do not vary
_CHUNK_ELEMENTS = 2**24  # feature activations held at once (64 MiB in float32), whatever the batch size


@dataclass(frozen=True)
class SAEQuality:
    """Quality of one SAE on real activations: SAELens ``run_evals`` keys plus feature-density summaries.

    Attributes:
        site: the head whose ``z`` the SAE read, or ``"concatenated"``.
        sae: the SAE's one-line description.
        d_in, d_sae: the SAE's sizes.
        n_tokens: tokens evaluated (after exclusions); n_contexts: contexts they came from.
        exclude_bos: whether position 0 of every context was left out; ignore_tokens: token ids left out.
        l0 ... cossim: see the module docstring (SAELens's names and formulas).
        dead_fraction: fraction of features that never fired; dense_fraction: fraction firing on more than
            ``dense_threshold`` of the tokens.
        feature_density_mean, feature_density_median: over all features of ``feature_density``.
        log10_density_bin_edges, log10_density_counts: histogram of ``log10 feature_density`` over the features that
            fired (bins ``[e_k, e_k+1)``, the last closed; densities below the first edge are counted in the first
            bin), ``sum(counts) = d_sae * (1 - dead_fraction)``.
        ce_loss_* / kl_div_*: downstream keys, ``None`` until :func:`with_downstream`.
    """

    site: int | str
    sae: str
    d_in: int
    d_sae: int
    n_tokens: int
    n_contexts: int
    exclude_bos: bool
    ignore_tokens: tuple[int, ...]
    l0: float
    l1: float
    explained_variance: float
    explained_variance_legacy: float
    mse: float
    cossim: float
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    feature_density_mean: float
    feature_density_median: float
    log10_density_bin_edges: tuple[float, ...]
    log10_density_counts: tuple[int, ...]
    ce_loss_score: float | None = None
    ce_loss_with_sae: float | None = None
    ce_loss_without_sae: float | None = None
    ce_loss_with_ablation: float | None = None
    kl_div_score: float | None = None
    kl_div_with_sae: float | None = None
    kl_div_with_ablation: float | None = None


class SAEQualityAccumulator:
    """Stream the SAELens quality metrics of ``sae`` over :class:`ActivationBatch` es (see the module docstring).

    Args:
        sae: the SAE to evaluate (input scale already folded in, if it needs one).
        site: head index ``h`` (reads ``batch.z_head(h)``) or ``"concatenated"`` (reads ``batch.z_concatenated()``).
        exclude_bos: leave position 0 of every context out (BOS when the tokens start with it).
        ignore_tokens: token ids whose positions are left out, wherever they are.
        dense_threshold: a feature firing on more than this fraction of tokens counts as dense.

    Memory is ``O(d_sae + d_in)`` between batches; within a batch, feature activations are computed a few contexts at a
    time (at most ``2**24`` entries at once).

    Mergeable: every statistic is a sum over tokens or contexts (``explained_variance_legacy``'s per-token terms
    already hold their own batch's mean), so the parts' sums and counts add.
    """

    needs: tuple[str, ...] = ()

    def __init__(self, sae: SAE, site: int | str, *, exclude_bos: bool = False, ignore_tokens: Iterable[int] = (),
                 dense_threshold: float = DENSE_THRESHOLD) -> None:
        if not isinstance(sae, SAE):
            raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
        if not (site == CONCATENATED or (isinstance(site, int) and not isinstance(site, bool) and site >= 0)):
            raise InputError(f"site must be a head index (int >= 0) or {CONCATENATED!r}, got {site!r}")
        if sae.head is not None and sae.head != site:
            raise InputError(f"{sae.describe()} reads head={sae.head!r} but is evaluated on site={site!r}")
        if not isinstance(exclude_bos, bool):
            raise InputTypeError(f"exclude_bos must be a bool, got {type(exclude_bos).__name__}")
        ignore = tuple(ignore_tokens)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ignore):
            raise InputError(f"ignore_tokens must be non-negative int token ids, got {ignore!r}")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, (int, float)) \
                or not 0.0 < dense_threshold < 1.0:
            raise InputError(f"dense_threshold must be a fraction in (0, 1), got {dense_threshold!r}")
        self.sae, self.site = sae, site
        self.exclude_bos, self.ignore_tokens, self.dense_threshold = exclude_bos, ignore, float(dense_threshold)
        self.reset()

    def reset(self) -> None:
        sae, device = self.sae, self.sae.device
        self._sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self._sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
        # counts in float64: exact up to 2**53
        self._fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
        self._contexts_fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
        self._n_tokens = 0
        self._n_contexts = 0

    # -- streaming ---------------------------------------------------------------------------------------------
    def _site_input(self, batch: ActivationBatch) -> Tensor:
        if self.site == CONCATENATED:
            x = batch.z_concatenated()
        else:
            if self.site >= batch.n_heads:
                raise InputError(f"site head {self.site} is not among the batch's {batch.n_heads} heads")
            x = batch.z_head(self.site)
        if x.shape[1] != self.sae.d_in:
            raise InputError(f"the SAE reads d_in={self.sae.d_in} but site {self.site!r} gives {x.shape[1]}-dim "
                             f"inputs (z of shape {tuple(batch.z.shape)})")
        return x

    def _keep(self, tokens: Tensor) -> Tensor:
        """``(batch, pos)`` bool: the positions evaluated."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.exclude_bos:
            keep[:, 0] = False
        if self.ignore_tokens:
            keep &= ~torch.isin(tokens, torch.tensor(self.ignore_tokens, device=tokens.device))
        return keep

    @torch.no_grad()
    def update(self, batch: ActivationBatch) -> None:
        if not isinstance(batch, ActivationBatch):
            raise InputTypeError(f"update takes an ActivationBatch, got {type(batch).__name__}")
        x_all = self._site_input(batch)
        n_contexts, n_pos = batch.tokens.shape
        keep_all = self._keep(batch.tokens).to(self.sae.device)
        n_kept = int(keep_all.sum())
        self._n_contexts += n_contexts
        if n_kept == 0:
            return
        self._n_tokens += n_kept
        x_all = x_all.to(device=self.sae.device, dtype=self.sae.dtype)
        kept_rows = keep_all.reshape(-1)
        # μ_B of explained_variance_legacy: the batch's mean input over the evaluated tokens, as SAELens's.
        batch_mean = x_all[kept_rows].mean(0)
        per_chunk = max(1, _CHUNK_ELEMENTS // (n_pos * max(self.sae.d_sae, self.sae.d_in)))
        for start in range(0, n_contexts, per_chunk):
            stop = min(start + per_chunk, n_contexts)
            self._update_rows(x_all[start * n_pos : stop * n_pos], keep_all[start:stop], batch_mean)

    def _update_rows(self, x: Tensor, keep: Tensor, batch_mean: Tensor) -> None:
        """Add the tokens of whole contexts: ``x`` ``(contexts * pos, d_in)``, ``keep`` ``(contexts, pos)``."""
        rows = keep.reshape(-1)
        f = self.sae.encode(x)
        # SAE.decode's formula without its finiteness check: f = relu(finite) needs none, and on a 16k-feature SAE
        # that check costs as much as the decoding.
        x_hat = torch.addmm(self.sae.b_dec, f, self.sae.W_dec)
        # f >= 0 (ReLU): sign(f) is 1 where a feature fires, else 0, and one float pass over it is several times
        # cheaper than count_nonzero. Its sums are exact: integers below 2**24 (a chunk holds at most 2**24 entries).
        fired = f.sign()
        if not bool(rows.all()):
            fired[~rows] = 0  # left-out tokens fire no feature (they are left out of the other sums below)
        self._fires += fired.sum(0)
        self._contexts_fired += fired.view(keep.shape[0], keep.shape[1], -1).amax(1).sum(0)

        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        residual = (x - x_hat).pow(2).sum(-1)
        x_dot_x_hat = (x * x_hat).sum(-1)
        values = {
            "l0": fired.sum(-1),
            "l1": f.sum(-1),
            "l2_norm_in": norm_in,
            "l2_norm_out": norm_out,
            "l2_ratio": norm_out / torch.where(norm_in.abs() < _MIN_NORM, torch.ones_like(norm_in), norm_in),
            "x_hat_sq": norm_out.pow(2),
            "x_dot_x_hat": x_dot_x_hat,
            "residual_sq": residual,
            "x_sq": norm_in.pow(2),
            "legacy": 1 - residual / (x - batch_mean).pow(2).sum(-1),
            "cossim": (x / norm_in[:, None] * (x_hat / norm_out[:, None])).sum(-1),
        }
        stacked = torch.stack([values[name].to(torch.float64) for name in _SUMS], dim=1)
        # where, not a product: a left-out row's NaN (e.g. cossim of a zero input) must not leak into the sums.
        self._sums += torch.where(rows[:, None], stacked, torch.zeros((), dtype=torch.float64, device=x.device)).sum(0)
        self._sum_x += (x.to(torch.float64) * rows[:, None]).sum(0)

    # -- merging and saving ------------------------------------------------------------------------------------
    _TENSORS = ("sums", "sum_x", "fires", "contexts_fired")

    def _settings(self) -> dict[str, object]:
        return {"sae": self.sae.describe(), "site": self.site, "exclude_bos": self.exclude_bos,
                "ignore_tokens": list(self.ignore_tokens), "dense_threshold": self.dense_threshold}

    def merge(self, other: SAEQualityAccumulator) -> None:
        check_merge(self, other)
        for name in self._TENSORS:
            getattr(self, f"_{name}").add_(getattr(other, f"_{name}").to(self.sae.device))
        self._n_tokens += other._n_tokens
        self._n_contexts += other._n_contexts

    def state_dict(self) -> dict[str, object]:
        return {**self._settings(), "n_tokens": self._n_tokens, "n_contexts": self._n_contexts,
                **{name: snapshot(getattr(self, f"_{name}")) for name in self._TENSORS}}

    def load_state_dict(self, state) -> None:
        f64, sae = torch.float64, self.sae
        check_state(self, state, {"sums": (len(_SUMS), f64), "sum_x": (sae.d_in, f64), "fires": (sae.d_sae, f64),
                                  "contexts_fired": (sae.d_sae, f64)}, {"n_tokens": int, "n_contexts": int})
        for name in self._TENSORS:
            setattr(self, f"_{name}", state[name].to(sae.device).clone())
        self._n_tokens, self._n_contexts = state["n_tokens"], state["n_contexts"]

    # -- results -----------------------------------------------------------------------------------------------
    def _require_tokens(self) -> None:
        if self._n_tokens == 0:
            raise InputError(f"no tokens were evaluated for site {self.site!r} (none seen, or all left out by "
                             f"exclude_bos={self.exclude_bos} / ignore_tokens={self.ignore_tokens})")

    def feature_density(self) -> Tensor:
        """``(d_sae,)`` float64 on the CPU: the fraction of evaluated tokens on which each feature fired."""
        self._require_tokens()
        return self._fires.cpu() / self._n_tokens

    def consistent_activation_heuristic(self) -> Tensor:
        """``(d_sae,)`` float64 on the CPU: tokens a feature fired on per context it fired in (NaN if it never
        fired), SAELens's feature metric of that name."""
        self._require_tokens()
        return self._fires.cpu() / self._contexts_fired.cpu()

    def compute(self) -> SAEQuality:
        self._require_tokens()
        n = self._n_tokens
        means = dict(zip(_SUMS, (self._sums.cpu() / n).tolist()))
        mean_x = self._sum_x.cpu() / n
        mse = means["residual_sq"]
        variance = means["x_sq"] - float(mean_x.pow(2).sum())
        if variance < _ZERO_VARIANCE:
            explained = 1.0 if mse < _ZERO_VARIANCE else 0.0
        else:
            explained = 1.0 - mse / variance
        density = self.feature_density()
        return SAEQuality(
            site=self.site, sae=self.sae.describe(), d_in=self.sae.d_in, d_sae=self.sae.d_sae, n_tokens=n,
            n_contexts=self._n_contexts, exclude_bos=self.exclude_bos, ignore_tokens=self.ignore_tokens,
            l0=means["l0"], l1=means["l1"], explained_variance=explained, explained_variance_legacy=means["legacy"],
            mse=mse, cossim=means["cossim"], l2_norm_in=means["l2_norm_in"], l2_norm_out=means["l2_norm_out"],
            l2_ratio=means["l2_ratio"], relative_reconstruction_bias=_ratio(means["x_hat_sq"], means["x_dot_x_hat"]),
            dead_fraction=float((density == 0).double().mean()),
            dense_fraction=float((density > self.dense_threshold).double().mean()),
            dense_threshold=self.dense_threshold,
            feature_density_mean=float(density.mean()), feature_density_median=float(density.median()),
            log10_density_bin_edges=LOG10_DENSITY_BIN_EDGES, log10_density_counts=log10_density_histogram(density),
        )


_SUMS = ("l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio", "x_hat_sq", "x_dot_x_hat", "residual_sq", "x_sq",
         "legacy", "cossim")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else math.nan


def log10_density_histogram(density: Tensor) -> tuple[int, ...]:
    """Counts of ``log10 density`` of the features that fired over :data:`LOG10_DENSITY_BIN_EDGES` (bins
    ``[e_k, e_k+1)``, the last closed; values below the first edge go to the first bin)."""
    edges = torch.tensor(LOG10_DENSITY_BIN_EDGES, dtype=torch.float64)
    logs = density[density > 0].double().log10()
    index = (torch.bucketize(logs, edges, right=True) - 1).clamp(0, len(edges) - 2)
    return tuple(torch.bincount(index, minlength=len(edges) - 1).tolist())


def with_downstream(quality: SAEQuality, *, ce_loss_with_sae: float, ce_loss_without_sae: float,
                    ce_loss_with_ablation: float, kl_div_with_sae: float, kl_div_with_ablation: float) -> SAEQuality:
    """``quality`` with the downstream keys filled in from splice-in losses (mean over the same tokens) and SAELens's
    two scores (module docstring). A score whose denominator is zero (the ablation changes nothing) is NaN (null in
    JSON): the SAE's effect cannot be scored against it."""
    if not isinstance(quality, SAEQuality):
        raise InputTypeError(f"quality must be an SAEQuality, got {type(quality).__name__}")
    losses = {"ce_loss_with_sae": ce_loss_with_sae, "ce_loss_without_sae": ce_loss_without_sae,
              "ce_loss_with_ablation": ce_loss_with_ablation, "kl_div_with_sae": kl_div_with_sae,
              "kl_div_with_ablation": kl_div_with_ablation}
    for name, value in losses.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
        losses[name] = float(value)
    for name in ("kl_div_with_sae", "kl_div_with_ablation"):
        if losses[name] < 0:
            raise InputError(f"{name} is a KL divergence and cannot be negative, got {losses[name]}")
    ce_gap = losses["ce_loss_with_ablation"] - losses["ce_loss_without_sae"]
    return replace(
        quality, **losses,
        ce_loss_score=_ratio(losses["ce_loss_with_ablation"] - losses["ce_loss_with_sae"], ce_gap),
        kl_div_score=_ratio(losses["kl_div_with_ablation"] - losses["kl_div_with_sae"], losses["kl_div_with_ablation"]),
    )


def sae_quality_accumulators(head_saes: HeadSAEs | None, concat_sae: SAE | None, *, exclude_bos: bool = False,
                             ignore_tokens: Sequence[int] = (),
                             dense_threshold: float = DENSE_THRESHOLD) -> dict[str, SAEQualityAccumulator]:
    """``{"head_<h>": ..., "concat": ...}`` (heads in order, then the concat SAE): one accumulator per SAE, ready for
    :func:`~sparsedecomp.activations.run_accumulators`. Either argument may be ``None``, not both."""
    if head_saes is None and concat_sae is None:
        raise InputError("give head_saes, concat_sae or both")
    if head_saes is not None and not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
    options = {"exclude_bos": exclude_bos, "ignore_tokens": ignore_tokens, "dense_threshold": dense_threshold}
    accumulators = {}
    for sae in () if head_saes is None else head_saes.saes:
        accumulators[head_name(sae.head)] = SAEQualityAccumulator(sae, sae.head, **options)
    if concat_sae is not None:
        accumulators[CONCAT_NAME] = SAEQualityAccumulator(concat_sae, CONCATENATED, **options)
    return accumulators
