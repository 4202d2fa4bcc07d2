"""Planted problems: a block dictionary of known atoms and targets made of them with known coefficients.

The real problem (Kissane et al.'s gelu-2l layer-1 attention SAE against eight per-head SAEs) decomposes unit-norm
concat decoder rows ``t`` (``d = n_heads * d_head``) into the block-diagonal dictionary of per-head decoders. A
planted problem imitates what makes that problem hard and what solvers exploit, and *knows the answer*:

* **Correlated atoms.** Each head's features are clustered: ``d_i = normalize(center_{k(i)} + s_i u_i)`` with
  cluster centres drawn from an anisotropic Gaussian (spectrum ``1 / sqrt(1 + j / (d_head / 8))``, so a head's
  atoms concentrate in a low-dimensional subspace as SAE decoders do), unit noise directions ``u_i`` and spreads
  ``s_i ~ U(spread)``. Two atoms of one cluster have cosine about ``1 / (1 + s^2)``, so with the default
  ``spread = (0.35, 1.0)`` the mutual coherence of the dictionary reaches about 0.9.
* **April-2024-recipe norms.** Decoder norms are log-normal around 2 (``2 exp(0.15 z)``); the seed notebook
  measured a mean of 2.05. :meth:`BlockDictionary.from_blocks` with ``normalize=True`` keeps them in ``scales``.
* **Targets.** Each target mixes ``k ~ U{min_atoms..max_atoms}`` atoms from ``m ~ U{min_heads..max_heads}``
  heads (at least one atom per chosen head) with log-normal positive weights, plus Gaussian noise of relative
  size ``noise``, then is scaled to unit norm (Kissane decoder rows are unit norm). The planted weights are
  scaled with it, so ``targets = weights . atoms[support] + noise_part`` holds exactly.

:func:`make_planted` returns the bare tensors (:class:`PlantedProblem`); :func:`mix_planted` lifts them to the residual
stream through a random ``W_O`` (``(n_heads, d_head, d_model)``), where heads are no longer orthogonal.

The same draws as SAEs on disk are :mod:`sparsedecomp.demo.planted_world`; scoring a solver's codes against the truth
is :mod:`sparsedecomp.demo.recovery`. See ``docs/planted.md``.

All randomness comes from one ``numpy.random.default_rng(seed)``, so a problem is the same on every machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..dictionary import BlockDictionary, Dictionary, mix_targets
from ..errors import InputError, InputTypeError
from ..validation import FLOAT_DTYPES

# name -> (n_heads, n_features per head, d_head, n_targets)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (8, 64, 8, 48),
    "small": (8, 256, 16, 256),
    "medium": (8, 2048, 64, 2048),
    "full": (8, 2048, 64, 16384),
}


@dataclass(frozen=True)
class PlantedConfig:
    """Everything that determines a planted problem (recorded with every benchmark result and written world)."""

    n_heads: int = 8
    n_features: int = 256
    d_head: int = 16
    n_targets: int = 256
    min_atoms: int = 4
    max_atoms: int = 12
    min_heads: int = 2
    max_heads: int = 4
    cluster_size: int = 8
    spread: tuple[float, float] = (0.35, 1.0)
    norm_median: float = 2.0
    norm_sigma: float = 0.15
    weight_sigma: float = 0.5
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_heads", "n_features", "d_head", "n_targets", "min_atoms", "max_atoms", "min_heads",
                     "max_heads", "cluster_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.min_atoms > self.max_atoms:
            raise InputError(f"min_atoms ({self.min_atoms}) must not exceed max_atoms ({self.max_atoms})")
        if self.min_heads > self.max_heads:
            raise InputError(f"min_heads ({self.min_heads}) must not exceed max_heads ({self.max_heads})")
        if min(self.max_heads, self.n_heads) > self.max_atoms:
            raise InputError(f"max_atoms ({self.max_atoms}) must allow one atom in each of up to "
                             f"{min(self.max_heads, self.n_heads)} chosen heads (max_heads, at most n_heads)")
        if self.max_atoms > self.n_features:
            raise InputError(f"max_atoms ({self.max_atoms}) exceeds n_features ({self.n_features})")
        for name in ("norm_median", "norm_sigma", "weight_sigma", "noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.noise < 0 or self.norm_sigma < 0 or self.weight_sigma < 0:
            raise InputError(f"noise, norm_sigma and weight_sigma must be non-negative, got {self.noise}, "
                             f"{self.norm_sigma}, {self.weight_sigma}")
        if self.norm_median <= 0:
            raise InputError(f"norm_median must be positive, got {self.norm_median}")
        spread = tuple(self.spread) if isinstance(self.spread, (tuple, list)) else None
        if (spread is None or len(spread) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, float))
                                                      or not math.isfinite(s) or s < 0 for s in spread)
                or spread[0] > spread[1]):
            raise InputError(f"spread must be a pair (low, high) of finite numbers with 0 <= low <= high, got "
                             f"{self.spread!r}")
        object.__setattr__(self, "spread", (float(spread[0]), float(spread[1])))

    @classmethod
    def for_size(cls, size: str, **overrides) -> "PlantedConfig":
        """The named size of :data:`SIZES` (``tiny``, ``small``, ``medium``, ``full``) with optional overrides."""
        if size not in SIZES:
            raise InputError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
        n_heads, n_features, d_head, n_targets = SIZES[size]
        base = cls(n_heads=n_heads, n_features=n_features, d_head=d_head, n_targets=n_targets)
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class PlantedProblem:
    """A planted decomposition problem in the concatenated ``z`` space.

    Attributes:
        dictionary: unit-norm block-diagonal atoms; ``dictionary.scales`` are the planted decoder norms.
        blocks: the raw per-head decoders ``(n_features, d_head)`` (norms around 2).
        targets: ``(n_targets, d)`` unit-norm rows.
        support: ``(n_targets, max_atoms)`` long atom indices into ``dictionary``, ``-1`` padded.
        weights: ``(n_targets, max_atoms)`` positive weights on the unit atoms (0 where padded).
        noise: ``(n_targets, d)`` the noise part: ``targets = sum_j weights_j atoms[support_j] + noise``.
        config: the generating configuration.
    """

    dictionary: BlockDictionary
    blocks: tuple[Tensor, ...]
    targets: Tensor
    support: Tensor
    weights: Tensor
    noise: Tensor
    config: PlantedConfig

    @property
    def n_targets(self) -> int:
        return self.targets.shape[0]

    def subset(self, rows: slice | Tensor) -> "PlantedProblem":
        """The same dictionary with a subset of the targets."""
        return replace(self, targets=self.targets[rows], support=self.support[rows], weights=self.weights[rows],
                       noise=self.noise[rows])

    def coefficients(self) -> Tensor:
        """The planted code as a dense ``(n_targets, n_atoms)`` tensor (large at full size: use :meth:`subset`)."""
        return planted_dense(self.support, self.weights, self.dictionary.n_atoms)

    def heads_used(self) -> Tensor:
        """``(n_targets,)`` number of distinct heads in each planted support."""
        head = self.dictionary.head[self.support.clamp_min(0)]
        head = torch.where(self.support >= 0, head, torch.full_like(head, -1))
        present = torch.zeros(self.n_targets, self.dictionary.n_heads + 1, dtype=torch.bool)
        present.scatter_(1, head + 1, True)
        return present[:, 1:].sum(dim=1)

    def to(self, device=None, dtype=None) -> "PlantedProblem":
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(self, dictionary=self.dictionary.to(device, dtype), blocks=tuple(move(b) for b in self.blocks),
                       targets=move(self.targets), support=self.support.to(device), weights=move(self.weights),
                       noise=move(self.noise))


@dataclass(frozen=True, eq=False)
class MixedProblem:
    """A planted problem lifted to the residual stream by ``W_O``: ``atoms_r = atoms @ W_O_cat``.

    ``targets`` are the mixed planted targets rescaled to unit norm, ``weights`` rescaled with them, so the planted
    code still reconstructs ``targets`` up to the (mixed, rescaled) noise. The dictionary keeps the z-space atom
    order, head labels and scales; its atoms are not renormalised (as :meth:`BlockDictionary.mix`).
    """

    dictionary: Dictionary
    targets: Tensor
    support: Tensor
    weights: Tensor
    W_O: Tensor
    base: PlantedProblem

    @property
    def n_targets(self) -> int:
        return self.targets.shape[0]

    def subset(self, rows: slice | Tensor) -> "MixedProblem":
        return replace(self, targets=self.targets[rows], support=self.support[rows], weights=self.weights[rows],
                       base=self.base.subset(rows))

    def coefficients(self) -> Tensor:
        return planted_dense(self.support, self.weights, self.dictionary.n_atoms)


def make_planted(config: PlantedConfig, *, dtype: torch.dtype = torch.float32) -> PlantedProblem:
    """Generate the planted problem described by ``config`` (deterministic in ``config.seed``)."""
    drawn = _generate(config, dtype)
    dictionary64 = BlockDictionary.from_blocks([torch.from_numpy(b) for b in drawn.blocks], normalize=True)
    return PlantedProblem(
        dictionary=dictionary64.to(dtype=dtype),
        blocks=tuple(torch.from_numpy(b).to(dtype) for b in drawn.blocks),
        targets=drawn.targets.to(dtype),
        support=drawn.support,
        weights=drawn.weights.to(dtype),
        noise=drawn.noise.to(dtype),
        config=config,
    )


@dataclass(frozen=True, eq=False)
class _Drawn:
    """One draw of a planted problem, in float64: raw head decoders, padded supports and the rescaled targets,
    weights and noise (``targets = weights . unit_atoms[support] + noise``, unit-norm rows)."""

    blocks: list[np.ndarray]
    support: Tensor
    weights: Tensor
    targets: Tensor
    noise: Tensor


def _generate(config: PlantedConfig, dtype: torch.dtype) -> _Drawn:
    """Every random draw of a planted problem, from one ``numpy.random.default_rng(config.seed)`` in a fixed order
    (head decoders, supports and weights, noise), without building the dense dictionary."""
    if not isinstance(config, PlantedConfig):
        raise InputTypeError(f"config must be a PlantedConfig, got {type(config).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
    rng = np.random.default_rng(config.seed)
    blocks64 = [_head_decoder(rng, config) for _ in range(config.n_heads)]
    units = torch.from_numpy(np.stack([b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks64]))

    support, weights = _draw_supports(rng, config)
    support, weights = torch.from_numpy(support), torch.from_numpy(weights)
    clean = _synthesize_blocks(units, support, weights)
    d = clean.shape[1]
    raw_noise = torch.from_numpy(rng.standard_normal((config.n_targets, d))) / np.sqrt(d)
    noise = config.noise * clean.norm(dim=1, keepdim=True) * raw_noise
    y = clean + noise
    scale = y.norm(dim=1, keepdim=True)
    return _Drawn(blocks=blocks64, support=support, weights=weights / scale, targets=y / scale, noise=noise / scale)


def random_W_O(n_heads: int, d_head: int, d_model: int, *, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random output projection ``(n_heads, d_head, d_model)`` with ``N(0, 1/d_model)`` entries, so that the
    concatenated map roughly preserves norms and every head writes into overlapping residual directions."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n_heads, d_head, d_model)) / np.sqrt(d_model)).to(dtype)


def mix_planted(problem: PlantedProblem, *, d_model: int | None = None, seed: int | None = None) -> MixedProblem:
    """Lift ``problem`` to the residual stream through a random ``W_O`` (``d_model`` defaults to
    ``n_heads * d_head``, as in gelu-2l where it is 512 = 8 x 64)."""
    config = problem.config
    d_model = config.n_heads * config.d_head if d_model is None else d_model
    seed = config.seed + 1 if seed is None else seed
    dtype = problem.targets.dtype
    W_O = random_W_O(config.n_heads, config.d_head, d_model, seed=seed, dtype=torch.float64)
    mixed = mix_targets(problem.targets.double(), W_O)
    scale = mixed.norm(dim=1, keepdim=True)
    return MixedProblem(
        dictionary=problem.dictionary.to(dtype=torch.float64).mix(W_O).to(dtype=dtype),
        targets=(mixed / scale).to(dtype),
        support=problem.support,
        weights=(problem.weights.double() / scale).to(dtype),
        W_O=W_O.to(dtype),
        base=problem,
    )


def planted_dense(support: Tensor, weights: Tensor, n_atoms: int) -> Tensor:
    """Scatter padded ``(n, k)`` supports and weights into a dense ``(n, n_atoms)`` code."""
    out = weights.new_zeros(support.shape[0], n_atoms)
    valid = support >= 0
    out.scatter_add_(1, support.clamp_min(0), torch.where(valid, weights, torch.zeros_like(weights)))
    return out


def _head_decoder(rng: np.random.Generator, config: PlantedConfig) -> np.ndarray:
    """One head's ``(n_features, d_head)`` decoder: clustered unit directions times log-normal norms."""
    n, d = config.n_features, config.d_head
    n_clusters = max(1, n // config.cluster_size)
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(d) / max(1.0, d / 8))
    centers = rng.standard_normal((n_clusters, d)) * spectrum
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    assign = rng.integers(n_clusters, size=n)
    directions = rng.standard_normal((n, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    spread = rng.uniform(config.spread[0], config.spread[1], size=n)
    atoms = centers[assign] + spread[:, None] * directions
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    norms = config.norm_median * np.exp(config.norm_sigma * rng.standard_normal(n))
    return atoms * norms[:, None]


def _draw_supports(rng: np.random.Generator, config: PlantedConfig) -> tuple[np.ndarray, np.ndarray]:
    """Padded supports (atom indices in head-major order) and positive weights for every target."""
    n, K = config.n_targets, config.max_atoms
    support = np.full((n, K), -1, dtype=np.int64)
    weights = np.zeros((n, K))
    top_heads = min(config.max_heads, config.n_heads)
    low_heads = min(config.min_heads, top_heads)
    for i in range(n):
        m = int(rng.integers(low_heads, top_heads + 1))
        k = int(rng.integers(max(config.min_atoms, m), K + 1))
        heads = rng.choice(config.n_heads, size=m, replace=False)
        # One atom in every chosen head, the rest spread at random over the chosen heads.
        counts = 1 + rng.multinomial(k - m, np.full(m, 1.0 / m))
        counts = np.minimum(counts, config.n_features)
        atoms = [h * config.n_features + rng.choice(config.n_features, size=c, replace=False)
                 for h, c in zip(heads, counts)]
        chosen = np.concatenate(atoms)
        support[i, : len(chosen)] = chosen
        weights[i, : len(chosen)] = np.exp(config.weight_sigma * rng.standard_normal(len(chosen)))
    return support, weights


def _synthesize(atoms: Tensor, support: Tensor, weights: Tensor, chunk: int = 2048) -> Tensor:
    """``sum_j weights_j atoms[support_j]`` per target, in chunks to bound the gathered ``(chunk, k, d)`` array."""
    out = atoms.new_empty(support.shape[0], atoms.shape[1])
    for start in range(0, support.shape[0], chunk):
        s = support[start : start + chunk]
        w = torch.where(s >= 0, weights[start : start + chunk].to(atoms), torch.zeros((), dtype=atoms.dtype))
        out[start : start + chunk] = torch.einsum("nk,nkd->nd", w, atoms[s.clamp_min(0)])
    return out


def _synthesize_blocks(units: Tensor, support: Tensor, weights: Tensor, chunk: int = 2048) -> Tensor:
    """:func:`_synthesize` on the block dictionary of unit head decoders ``units`` (``(n_heads, n_features,
    d_head)``) without forming it: atom ``j`` is ``units[j // n_features, j % n_features]`` in the columns of head
    ``j // n_features`` in the concatenated ``(n_heads * d_head)`` space."""
    n_heads, n_features, d_head = units.shape
    out = units.new_zeros(support.shape[0], n_heads, d_head)
    for start in range(0, support.shape[0], chunk):
        s = support[start : start + chunk]
        w = torch.where(s >= 0, weights[start : start + chunk].to(units), torch.zeros((), dtype=units.dtype))
        head, feature = s.clamp_min(0) // n_features, s.clamp_min(0) % n_features
        parts = w[:, :, None] * units[head, feature]  # (chunk, k, d_head)
        out[start : start + chunk].scatter_add_(1, head[:, :, None].expand(-1, -1, d_head), parts)
    return out.reshape(support.shape[0], n_heads * d_head)


if __name__ == "__main__":  # the command moved to sparsedecomp.demo.planted_world; this name keeps working
    import sys

    from .planted_world import main

    sys.exit(main())
