"""Head attribution of every feature of a concatenated-``z`` SAE, four ways, and how far the ways agree.

The SAE reads ``z`` of all heads flattened head-major (``d_in = n_heads * d_head``; head ``h`` owns the columns
``B_h = h*d_head:(h+1)*d_head``). For feature ``f`` and head ``h`` (all shares are ``(n_features, n_heads)``):

* **weight** (Kissane et al.): ``||W_dec[f, B_h]|| / sum_h' ||W_dec[f, B_h']||``; **weight_squared** (the seed's
  :func:`~sparsedecomp.evaluation.metrics.target_head_shares`): ``||W_dec[f, B_h]||^2 / ||W_dec[f]||^2``;
* **encoder** / **encoder_squared**: the same two shares of the encoder column ``W_enc[B_h, f]``;
* **dfa** (direct feature attribution by head): the pre-activation is linear in ``z``,

      pre_f(z) = sum_h z_h . W_enc[B_h, f]  -  a * b_dec . W_enc[:, f]  +  b_enc[f]      (a = apply_b_dec_to_input)

  so ``dfa_h = z_h . W_enc[B_h, f]`` is head ``h``'s part and the two bias terms are reported apart
  (:class:`DFABias`). It is measured on each feature's top-``k`` activating tokens (:class:`DFAAccumulator`) and
  summarised as the mean ``m_h`` of ``dfa_h`` over them, with the share ``max(m_h, 0) / sum_h' max(m_h', 0)``: the
  share of the positive push towards firing. (The alternative, ``|m_h| / sum |m_h'|``, counts a head that
  suppresses the feature as much as one that drives it; we keep the signed means for that question.) A feature
  that never fires on the tokens, or whose mean head terms are all ``<= 0`` (it fires through its bias), has no
  DFA share: NaN, counted, never a made-up 0;
* **decomposition:LABEL**: the share of a decomposition's coefficient mass per head
  (:func:`~sparsedecomp.evaluation.metrics.head_mass_shares`), one per solver setting; a failed (NaN) or zero
  code has no attribution (NaN).

A zero decoder row or encoder column likewise has NaN weight shares. Agreement of two methods, over the features
where both are defined: the fraction whose top head (argmax) matches, and the mean Spearman rank correlation of the
two share vectors across heads (average ranks for ties; a constant vector has none and is left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .metrics import head_columns, head_mass_shares, target_head_shares
from .top_activations import DEFAULT_CHUNK_ELEMENTS, SAETopActivations, TopActivations
from ..activations import ActivationBatch, check_merge, check_state, prefixed, split_state
from ..decomposition import Decomposition
from ..errors import InputError, InputTypeError
from ..loading.sae import SAE
from ..validation import check_positive_int

WEIGHT, WEIGHT_SQUARED, ENCODER, ENCODER_SQUARED, DFA = "weight", "weight_squared", "encoder", "encoder_squared", "dfa"
DECOMPOSITION_PREFIX = "decomposition:"
DFA_SHARE_RULE = "max(mean_dfa_h, 0) / sum_h' max(mean_dfa_h', 0) over the feature's top-k activating tokens"


# -- weight- and encoder-based ---------------------------------------------------------------------------------------
def block_norm_shares(rows: Tensor, n_heads: int, *, squared: bool = False) -> Tensor:
    """``(n, n_heads)``: each head block's share of a row's norm, ``||r[B_h]|| / sum_h' ||r[B_h']||``, or with
    ``squared`` of its squared norm, ``||r[B_h]||^2 / ||r||^2``; NaN for a zero row."""
    n_heads = check_positive_int(n_heads, "n_heads")
    if rows.ndim != 2 or rows.shape[1] % n_heads != 0:
        raise InputError(f"rows must be (n, n_heads * d_head) with n_heads={n_heads}, got {tuple(rows.shape)}")
    rows = rows.detach().float() if rows.dtype in (torch.float16, torch.bfloat16) else rows.detach()
    zero = (rows == 0).all(dim=1, keepdim=True)
    if squared:
        shares = target_head_shares(rows, head_columns(rows.shape[1], rows.shape[1] // n_heads))
    else:
        norms = rows.reshape(rows.shape[0], n_heads, -1).norm(dim=2)
        shares = norms / norms.sum(dim=1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)
    return shares.masked_fill(zero, float("nan"))


def weight_shares(sae: SAE, n_heads: int) -> dict[str, Tensor]:
    """The four weight-based shares of every feature: decoder rows and encoder columns, norm and squared norm."""
    _check_concat(sae, n_heads)
    return {
        WEIGHT: block_norm_shares(sae.W_dec, n_heads),
        WEIGHT_SQUARED: block_norm_shares(sae.W_dec, n_heads, squared=True),
        ENCODER: block_norm_shares(sae.W_enc.T, n_heads),
        ENCODER_SQUARED: block_norm_shares(sae.W_enc.T, n_heads, squared=True),
    }


# -- activation-based: DFA by head -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DFABias:
    """The two bias terms of every pre-activation: ``decoder = -a * b_dec . W_enc[:, f]`` and ``encoder =
    b_enc[f]``, each ``(d_sae,)``."""

    decoder: Tensor
    encoder: Tensor


def dfa_bias(sae: SAE) -> DFABias:
    """:class:`DFABias` of ``sae``."""
    decoder = -(sae.b_dec @ sae.W_enc) if sae.apply_b_dec_to_input else torch.zeros_like(sae.b_enc)
    return DFABias(decoder=decoder.detach(), encoder=sae.b_enc.detach())


def dfa_by_head(sae: SAE, x: Tensor, n_heads: int, features: Tensor | slice | None = None) -> Tensor:
    """``(n, m, n_heads)``: ``x_h . W_enc[B_h, f]`` for inputs ``x`` (``(n, d_in)``, uncentred ``z``) and the
    features ``features`` (all by default). Summed over heads plus :func:`dfa_bias` it is the pre-activation."""
    _check_concat(sae, n_heads)
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != sae.d_in:
        raise InputError(f"x must have shape (n, {sae.d_in}), got {tuple(getattr(x, 'shape', ()))}")
    W = sae.W_enc[:, slice(None) if features is None else features]
    x = x.to(W)
    return torch.einsum("nhd,hdm->nmh", x.reshape(x.shape[0], n_heads, -1), W.reshape(n_heads, -1, W.shape[1]))


@dataclass(frozen=True, eq=False)
class DFAResult:
    """The DFA by head on each feature's top-``k`` activating tokens.

    Attributes:
        top: the top activations; ``top.payload`` is ``(n_features, k, n_heads)``, the DFA by head at each kept
            token (NaN in empty slots).
        bias: the bias terms (the same at every token).
    """

    top: TopActivations
    bias: DFABias

    @property
    def n_heads(self) -> int:
        return self.top.payload.shape[2]

    def mean_dfa(self) -> Tensor:
        """``(n_features, n_heads)``: the mean DFA by head over each feature's kept tokens; NaN without any."""
        filled = self.top.filled[:, :, None]
        total = torch.where(filled, self.top.payload, torch.zeros_like(self.top.payload)).sum(dim=1)
        count = filled.sum(dim=1)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))

    def shares(self) -> Tensor:
        """``(n_features, n_heads)``: ``max(m_h, 0) / sum_h' max(m_h', 0)`` (NaN when no head pushes up)."""
        positive = self.mean_dfa().clamp_min(0)  # NaN stays NaN
        total = positive.sum(dim=1, keepdim=True)
        return torch.where(total > 0, positive / total.clamp_min(torch.finfo(total.dtype).tiny),
                           torch.full_like(positive, float("nan")))


class DFAAccumulator:
    """:class:`~sparsedecomp.activations.Accumulator` of :class:`DFAResult`: the top-``k`` activating tokens of
    every feature of a concatenated-``z`` SAE with the DFA by head at each, computed only for each batch's
    candidates and a bounded number of (feature, token) pairs at a time."""

    needs: tuple[str, ...] = ()

    def __init__(self, sae: SAE, n_heads: int, k: int = 20, *,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        _check_concat(sae, n_heads)
        self.sae, self.n_heads = sae, n_heads
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
        self.top = SAETopActivations(sae, k, payload=self._payload, payload_dim=n_heads, chunk_elements=chunk_elements)

    def _payload(self, x: Tensor, features: Tensor, tokens: Tensor) -> Tensor:
        """DFA by head of the candidate entries ``(features[i], tokens[i, s])``, ``(m, j, n_heads)``, a bounded
        number of gathered ``z`` rows at a time."""
        m, j = tokens.shape
        out = x.new_empty(m, j, self.n_heads)
        step = max(1, self.chunk_elements // (j * self.sae.d_in))
        for s in range(0, m, step):
            z = x[tokens[s : s + step]]  # (step, j, d_in)
            z = z.reshape(z.shape[0], j, self.n_heads, -1)
            W = self.sae.W_enc[:, features[s : s + step]].T.reshape(z.shape[0], 1, self.n_heads, -1)
            out[s : s + step] = (z * W).sum(dim=3)
        return out

    def update(self, batch: ActivationBatch) -> None:
        if batch.n_heads != self.n_heads:
            raise InputError(f"the batch has {batch.n_heads} heads, the DFA was set up for {self.n_heads}")
        self.top.update(batch)

    def compute(self) -> DFAResult:
        return DFAResult(top=self.top.compute(), bias=dfa_bias(self.sae))

    # -- merging and saving: the top activations' (the DFA is their payload) --------------------------------------
    def reset(self) -> None:
        self.top.reset()

    def _settings(self) -> dict[str, int]:
        return {"n_heads": self.n_heads}

    def merge(self, other: DFAAccumulator) -> None:
        check_merge(self, other)
        self.top.merge(other.top)

    def state_dict(self) -> dict:
        return {**self._settings(), **prefixed("top", self.top.state_dict())}

    def load_state_dict(self, state) -> None:
        own, parts = split_state(state, ("top",))
        check_state(self, own, {})
        self.top._check_state(parts["top"], "top.")
        self.top.load_state_dict(parts["top"])


# -- all methods together --------------------------------------------------------------------------------------------
def decomposition_shares(decomposition: Decomposition) -> Tensor:
    """``(n_targets, n_heads)`` coefficient-mass share per head; NaN for a failed (NaN) or zero code."""
    if not isinstance(decomposition, Decomposition):
        raise InputTypeError(f"expected a sparsedecomp.Decomposition, got {type(decomposition).__name__}")
    dictionary = decomposition.dictionary
    if dictionary is None or dictionary.head is None:
        raise InputError(f"the {decomposition.solver} decomposition's dictionary has no head labels: decompose into "
                         "head_saes.dictionary() to attribute heads")
    shares = head_mass_shares(decomposition.codes, dictionary.head, dictionary.n_heads)
    return shares.masked_fill((shares.sum(dim=1, keepdim=True) == 0), float("nan"))


def head_attribution(sae: SAE, n_heads: int, *, dfa: DFAResult | None = None,
                     decompositions: Mapping[str, Decomposition] | None = None) -> "HeadAttribution":
    """Every method's head shares of every feature of ``sae`` (see the module docstring): the weight-based four
    always, ``dfa`` when a :class:`DFAResult` is given, and ``decomposition:LABEL`` for each ``label ->
    Decomposition`` of the SAE's decoder rows (one target per feature, in order)."""
    shares = {name: value.cpu() for name, value in weight_shares(sae, n_heads).items()}
    mean_dfa = n_top = None
    k = None
    if dfa is not None:
        if not isinstance(dfa, DFAResult):
            raise InputTypeError(f"dfa must be a DFAResult (from DFAAccumulator), got {type(dfa).__name__}")
        if dfa.top.n_features != sae.d_sae or dfa.n_heads != n_heads:
            raise InputError(f"the DFA covers {dfa.top.n_features} features x {dfa.n_heads} heads, the SAE has "
                             f"{sae.d_sae} features and n_heads={n_heads}")
        shares[DFA] = dfa.shares().float()
        mean_dfa, n_top, k = dfa.mean_dfa(), dfa.top.n_kept, dfa.top.k
    for label, decomposition in (decompositions or {}).items():
        if not isinstance(label, str) or not label:
            raise InputTypeError(f"decomposition labels must be non-empty strings, got {label!r}")
        value = decomposition_shares(decomposition).float().cpu()
        if value.shape != (sae.d_sae, n_heads):
            raise InputError(f"decomposition {label!r} gives shares of shape {tuple(value.shape)}; the SAE needs "
                             f"({sae.d_sae}, {n_heads}): one target per feature, a dictionary of the same heads")
        shares[DECOMPOSITION_PREFIX + label] = value
    return HeadAttribution(shares=shares, mean_dfa=mean_dfa, n_top=n_top, dfa_k=k)


# -- agreement -----------------------------------------------------------------------------------------------------
def average_ranks(values: Tensor) -> Tensor:
    """Ranks (1-based) along the last axis, ties given their average rank."""
    less = (values[..., None, :] < values[..., :, None]).sum(dim=-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(dim=-1)
    return less.to(values.dtype) + (equal.to(values.dtype) + 1) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """``(n,)`` Spearman rank correlation of the rows of ``a`` and ``b`` (``(n, m)``); NaN where either row is
    constant or not finite."""
    ra, rb = average_ranks(a.double()), average_ranks(b.double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.pow(2).sum(dim=1) * rb.pow(2).sum(dim=1)).sqrt()
    rho = (ra * rb).sum(dim=1) / denominator
    defined = (denominator > 0) & torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1)
    return torch.where(defined, rho, torch.full_like(rho, float("nan")))


@dataclass(frozen=True)
class MethodAgreement:
    """Agreement of two methods over the ``n_compared`` features where both have shares."""

    top_head_match: float | None
    spearman_mean: float | None
    n_compared: int
    n_spearman: int
    """Features with a defined rank correlation (neither share vector constant)."""


@dataclass(frozen=True)
class FeatureDisagreement:
    """A feature whose activation-based and weight-based shares differ: ``total_variation = 0.5 * sum_h |dfa_h -
    weight_h|``; ``driving_head`` has the largest ``dfa_h - weight_h`` (it drives the activation more than its
    decoder weight shows)."""

    feature: int
    total_variation: float
    driving_head: int
    dfa_share: tuple[float, ...]
    weight_share: tuple[float, ...]


@dataclass(frozen=True)
class AttributionReport:
    """JSON-ready summary of a :class:`HeadAttribution` (see :mod:`sparsedecomp.jsonio`).

    ``mean_shares[method]`` averages the per-head shares over the features where they are defined;
    ``n_undefined[method]`` counts the others; ``agreement["A_vs_B"]`` for every pair of methods;
    ``disagreement`` the features where ``dfa`` and ``weight`` differ most, largest first."""

    n_features: int
    n_heads: int
    methods: tuple[str, ...]
    mean_shares: Mapping[str, tuple[float, ...]]
    n_undefined: Mapping[str, int]
    agreement: Mapping[str, MethodAgreement]
    disagreement: tuple[FeatureDisagreement, ...]
    dfa_top_k: int | None
    dfa_share_rule: str


@dataclass(frozen=True, eq=False)
class HeadAttribution:
    """Per-feature head shares by method (``shares[method]`` is ``(n_features, n_heads)``, NaN rows undefined).

    Attributes:
        shares: ``method -> shares`` for ``weight``, ``weight_squared``, ``encoder``, ``encoder_squared``,
            ``dfa`` (when measured) and ``decomposition:LABEL`` per decomposition.
        mean_dfa: ``(n_features, n_heads)`` mean DFA by head over the top tokens (signed), or ``None``.
        n_top: ``(n_features,)`` top tokens the DFA was averaged over, or ``None``.
        dfa_k: the ``k`` of the top tokens, or ``None``.
    """

    shares: Mapping[str, Tensor]
    mean_dfa: Tensor | None = None
    n_top: Tensor | None = None
    dfa_k: int | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.shares)

    @property
    def n_features(self) -> int:
        return next(iter(self.shares.values())).shape[0]

    @property
    def n_heads(self) -> int:
        return next(iter(self.shares.values())).shape[1]

    def defined(self, method: str) -> Tensor:
        """``(n_features,)`` bool: features with shares under ``method``."""
        return torch.isfinite(self._get(method)).all(dim=1)

    def top_head(self, method: str) -> Tensor:
        """``(n_features,)`` the head with the largest share (-1 where undefined)."""
        value = self._get(method)
        return torch.where(self.defined(method), value.nan_to_num(-1.0).argmax(dim=1), torch.full_like(value[:, 0], -1,
                           dtype=torch.long))

    def agreement(self, a: str, b: str) -> MethodAgreement:
        """Top-head match and mean Spearman correlation of methods ``a`` and ``b`` (see the module docstring)."""
        both = self.defined(a) & self.defined(b)
        n = int(both.sum())
        rho = spearman(self._get(a)[both], self._get(b)[both])
        rho = rho[torch.isfinite(rho)]
        match = (self.top_head(a)[both] == self.top_head(b)[both]).double().mean() if n else None
        return MethodAgreement(top_head_match=None if match is None else float(match),
                               spearman_mean=float(rho.mean()) if rho.numel() else None,
                               n_compared=n, n_spearman=int(rho.numel()))

    def disagreement(self, top_n: int = 20, *, activation: str = DFA, weight: str = WEIGHT
                     ) -> tuple[FeatureDisagreement, ...]:
        """The ``top_n`` features with the largest total-variation distance between ``activation`` and
        ``weight`` shares (features where either is undefined are left out)."""
        top_n = check_positive_int(top_n, "top_n")
        act, wt = self._get(activation), self._get(weight)
        both = self.defined(activation) & self.defined(weight)
        tv = torch.where(both, 0.5 * (act - wt).abs().sum(dim=1), torch.full_like(act[:, 0], float("-inf")))
        order = tv.sort(descending=True, stable=True).indices[: min(top_n, int(both.sum()))]
        return tuple(
            FeatureDisagreement(feature=int(f), total_variation=round(float(tv[f]), 4),
                                driving_head=int((act[f] - wt[f]).argmax()),
                                dfa_share=tuple(round(float(v), 4) for v in act[f]),
                                weight_share=tuple(round(float(v), 4) for v in wt[f]))
            for f in order
        )

    def report(self, top_n: int = 20) -> AttributionReport:
        """The JSON-ready :class:`AttributionReport`."""
        methods = self.methods
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
        mean_shares = {}
        for method in methods:
            keep = self.defined(method)
            mean = self.shares[method][keep].double().mean(dim=0) if bool(keep.any()) else None
            mean_shares[method] = () if mean is None else tuple(round(float(v), 4) for v in mean)
        return AttributionReport(
            n_features=self.n_features,
            n_heads=self.n_heads,
            methods=methods,
            mean_shares=mean_shares,
            n_undefined={m: int((~self.defined(m)).sum()) for m in methods},
            agreement={f"{a}_vs_{b}": self.agreement(a, b) for a, b in pairs},
            disagreement=self.disagreement(top_n) if DFA in self.shares else (),
            dfa_top_k=self.dfa_k,
            dfa_share_rule=DFA_SHARE_RULE,
        )

    def _get(self, method: str) -> Tensor:
        if method not in self.shares:
            raise InputError(f"no head shares for method {method!r}; have {list(self.shares)}")
        return self.shares[method]


def _check_concat(sae: SAE, n_heads: int) -> None:
    if not isinstance(sae, SAE):
        raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
    n_heads = check_positive_int(n_heads, "n_heads")
    if sae.d_in % n_heads != 0:
        raise InputError(f"the SAE reads d_in={sae.d_in}, which is not n_heads * d_head for n_heads={n_heads}")
    if isinstance(sae.head, int):
        raise InputError(f"{sae.describe()} reads one head only; head attribution needs a concatenated-z SAE")
