"""Planted worlds: per-head SAEs and a concat SAE made from known atoms with known coefficients, to score solvers on.

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

:func:`build_planted_world` wraps a planted problem as SAEs (:class:`PlantedWorld`): one per-head
:class:`~sparsedecomp.loading.SAE` per head whose decoder is the planted head decoder, a concatenated-``z`` SAE whose
decoder rows are the targets, and the truth (:class:`PlantedTruth`). :func:`write_planted_world` writes it as SAELens 6
folders (what the package's jobs load) plus the truth; :func:`load_planted_world` reads it back through the package's
loaders; :func:`score_recovery` scores a solver's codes against the truth. ``python -m sparsedecomp.demo.planted --out
DIR [--size small] [--seed 0]`` builds and writes one in seconds. See ``docs/planted.md``.

All randomness comes from one ``numpy.random.default_rng(seed)``, so a problem is the same on every machine.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..codes import Codes
from ..decomposition import Decomposition
from ..dictionary import BlockDictionary, Dictionary, mix_targets
from ..errors import InputError, InputTypeError, OutputError
from ..jsonio import from_jsonable, to_jsonable
from ..loading import CONCATENATED, SAE, HeadSAEs
from ..naming import CONCAT_NAME, head_name
from ..validation import FLOAT_DTYPES

# name -> (n_heads, n_features per head, d_head, n_targets)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (8, 64, 8, 48),
    "small": (8, 256, 16, 256),
    "medium": (8, 2048, 64, 2048),
    "full": (8, 2048, 64, 16384),
}

WORLD_COMMAND = "planted-world"
"""The command recorded in a written world's ``manifest.json`` (a folder holding another command's run is refused)."""
WORLD_FORMAT = "sparsedecomp-planted-world/1"
WORLD_FILE = "planted.json"
TRUTH_FILE = "truth.safetensors"
HEADS_DIR = "heads"
DEFAULT_LAYER = 1
"""gelu-2l's layer 1, the layer of the real problem."""
DEFAULT_THRESHOLD = 0.05
"""An atom is *found* in a code row when ``|c_i| > DEFAULT_THRESHOLD * max_j |c_j|`` (see :func:`score_recovery`)."""


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


# -- the truth -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PlantedTruth:
    """What a planted target is made of, on the unit-norm atoms of the block dictionary.

    With ``a_j = d_j / ||d_j||`` the unit atoms (head-major: atom ``h * n_features + i`` is feature ``i`` of head
    ``h``, as :meth:`BlockDictionary.from_blocks` orders them), target ``t`` is

        targets[t] = sum_s weights[t, s] * a_{support[t, s]} + noise[t]

    over the non-padded slots ``s`` (``support >= 0``). In each per-head SAE's own feature units the coefficient of
    atom ``j`` is ``weights / ||d_j||`` (:meth:`feature_weights`).

    Attributes:
        support: ``(n_targets, k)`` long atom indices, ``-1`` padded; no atom twice in a row, at least one per row.
        weights: ``(n_targets, k)`` non-zero coefficients on the unit atoms (0 where padded).
        noise: ``(n_targets, d)`` the part of each target that no code reproduces.
        atom_head: ``(n_atoms,)`` long, the head of each atom.
    """

    support: Tensor
    weights: Tensor
    noise: Tensor
    atom_head: Tensor

    def __post_init__(self) -> None:
        for name in ("support", "atom_head"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dtype != torch.long:
                raise InputTypeError(f"truth {name} must be a long tensor, got "
                                     f"{getattr(value, 'dtype', type(value).__name__)}")
        if self.support.ndim != 2 or self.support.shape[0] == 0 or self.support.shape[1] == 0:
            raise InputError(f"truth support must be a non-empty (n_targets, k) tensor, got "
                             f"{tuple(self.support.shape)}")
        if self.atom_head.ndim != 1 or self.atom_head.shape[0] == 0 or bool((self.atom_head < 0).any()):
            raise InputError(f"truth atom_head must be a non-empty (n_atoms,) tensor of head indices >= 0, got shape "
                             f"{tuple(self.atom_head.shape)}")
        for name in ("weights", "noise"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dtype not in FLOAT_DTYPES:
                raise InputTypeError(f"truth {name} must be a floating-point tensor, got "
                                     f"{getattr(value, 'dtype', type(value).__name__)}")
            if not bool(torch.isfinite(value).all()):
                raise InputError(f"truth {name} holds NaN or infinite values")
        n, k = self.support.shape
        if tuple(self.weights.shape) != (n, k):
            raise InputError(f"truth weights must have the support's shape {(n, k)}, got {tuple(self.weights.shape)}")
        if self.noise.ndim != 2 or self.noise.shape[0] != n:
            raise InputError(f"truth noise must be ({n}, d), got {tuple(self.noise.shape)}")
        valid = self.support >= 0
        if bool((self.support < -1).any()) or bool((self.support >= self.n_atoms).any()):
            raise InputError(f"truth support indices must be -1 (padding) or atoms 0..{self.n_atoms - 1}")
        if bool((valid & (self.weights == 0)).any()) or bool((~valid & (self.weights != 0)).any()):
            raise InputError("truth weights must be non-zero exactly where the support names an atom")
        if not bool(valid.any(dim=1).all()):
            rows = (~valid.any(dim=1)).nonzero().squeeze(1)[:5].tolist()
            raise InputError(f"every planted target needs at least one atom; rows {rows} have none")
        ordered = torch.sort(torch.where(valid, self.support, -1 - torch.arange(k).expand(n, k)), dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise InputError("truth support names an atom twice in one row")

    @property
    def n_targets(self) -> int:
        return self.support.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.atom_head.shape[0]

    @property
    def n_heads(self) -> int:
        return int(self.atom_head.max()) + 1

    def coefficients(self) -> Tensor:
        """The planted code, dense ``(n_targets, n_atoms)`` (large at full size: use :meth:`rows`)."""
        return planted_dense(self.support, self.weights, self.n_atoms)

    def feature_weights(self, scales: Tensor) -> Tensor:
        """``weights / scales[support]`` (0 where padded): the planted coefficients in each head SAE's own feature
        units, for ``scales`` the decoder norms (``BlockDictionary.scales``)."""
        if tuple(scales.shape) != (self.n_atoms,):
            raise InputError(f"scales must have shape ({self.n_atoms},), got {tuple(scales.shape)}")
        valid = self.support >= 0
        per_slot = scales.to(self.weights)[self.support.clamp_min(0)]
        return torch.where(valid, self.weights / per_slot, torch.zeros_like(self.weights))

    def rows(self, index: slice | Tensor) -> "PlantedTruth":
        return replace(self, support=self.support[index], weights=self.weights[index], noise=self.noise[index])

    def to(self, device: torch.device | str | None = None) -> "PlantedTruth":
        return replace(self, support=self.support.to(device), weights=self.weights.to(device),
                       noise=self.noise.to(device), atom_head=self.atom_head.to(device))

    @classmethod
    def of(cls, problem: PlantedProblem | MixedProblem) -> "PlantedTruth":
        """The truth of a bare planted problem (z-space or mixed): support and weights as planted, the noise part
        ``targets - weights . atoms[support]`` on that problem's dictionary."""
        if not isinstance(problem, (PlantedProblem, MixedProblem)):
            raise InputTypeError(f"problem must be a PlantedProblem or MixedProblem, got {type(problem).__name__}")
        dictionary = problem.dictionary
        if isinstance(problem, PlantedProblem):
            noise = problem.noise
        else:
            noise = problem.targets - _synthesize(dictionary.atoms, problem.support, problem.weights)
        return cls(support=problem.support, weights=problem.weights, noise=noise, atom_head=dictionary.head)


# -- the world -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PlantedWorld:
    """A planted problem as SAEs: what the package's loaders and jobs read, with the answer attached.

    * ``head_saes[h]`` reads head ``h``'s ``z`` at ``blocks.{layer}.attn.hook_z``. Its decoder ``W_dec`` is the
      planted ``(n_features, d_head)`` head decoder ``D_h`` (rows ``d_i``, norms around ``norm_median``); its encoder
      is the decoder's pseudo-transpose ``W_enc[:, i] = d_i / ||d_i||^2`` with zero biases, so a single feature
      ``f d_i`` encodes to ``f`` on feature ``i`` (standard ReLU; correlated features fire too).
    * ``concat_sae`` reads all heads' ``z`` flattened head-major (``d_in = n_heads * d_head``); its decoder rows are the
      ``n_targets`` unit-norm planted targets, its encoder their transpose (zero biases).
    * ``truth`` says what each target is made of on the unit atoms ``a_j = d_j / ||d_j||`` of
      ``dictionary = head_saes.dictionary()`` (atom ``h * n_features + i`` is feature ``i`` of head ``h``):
      ``concat_sae.W_dec[t] = sum_s truth.weights[t, s] a_{truth.support[t, s]} + truth.noise[t]``
      (exactly in float64 before the cast to the world's dtype).

    Attributes:
        config: the generating configuration (its seed included).
        layer: the attention layer every SAE claims to read.
        head_saes: one :class:`~sparsedecomp.loading.SAE` per head, heads ``0 .. n_heads-1``.
        concat_sae: the concatenated-``z`` SAE.
        truth: the planted :class:`PlantedTruth`.
    """

    config: PlantedConfig
    layer: int
    head_saes: HeadSAEs
    concat_sae: SAE
    truth: PlantedTruth

    def __post_init__(self) -> None:
        c = self.config
        if not isinstance(c, PlantedConfig):
            raise InputTypeError(f"config must be a PlantedConfig, got {type(c).__name__}")
        if not isinstance(self.head_saes, HeadSAEs) or not isinstance(self.concat_sae, SAE):
            raise InputTypeError("head_saes must be HeadSAEs and concat_sae an SAE")
        if not isinstance(self.truth, PlantedTruth):
            raise InputTypeError(f"truth must be a PlantedTruth, got {type(self.truth).__name__}")
        problems = []
        if self.head_saes.heads != tuple(range(c.n_heads)):
            problems.append(f"head SAEs for heads {list(self.head_saes.heads)}, expected 0..{c.n_heads - 1}")
        for h, sae in self.head_saes.items():
            if (sae.d_in, sae.d_sae) != (c.d_head, c.n_features):
                problems.append(f"head {h}'s SAE is d_in={sae.d_in}, d_sae={sae.d_sae}, expected d_in={c.d_head}, "
                                f"d_sae={c.n_features}")
        d = c.n_heads * c.d_head
        if (self.concat_sae.d_in, self.concat_sae.d_sae) != (d, c.n_targets) or self.concat_sae.head != CONCATENATED:
            problems.append(f"the concat SAE reads head={self.concat_sae.head!r} with d_in={self.concat_sae.d_in}, "
                            f"d_sae={self.concat_sae.d_sae}; expected head='concatenated', d_in={d}, "
                            f"d_sae={c.n_targets}")
        n_atoms = c.n_heads * c.n_features
        if (self.truth.n_targets, self.truth.n_atoms, self.truth.noise.shape[1]) != (c.n_targets, n_atoms, d):
            problems.append(f"the truth covers {self.truth.n_targets} targets on {self.truth.n_atoms} atoms in "
                            f"{self.truth.noise.shape[1]} dimensions; expected {c.n_targets} on {n_atoms} in {d}")
        for sae in (*self.head_saes, self.concat_sae):
            if sae.layer != self.layer:
                problems.append(f"{sae.describe()} reads layer {sae.layer}, expected {self.layer}")
                break
        if problems:
            raise InputError("not a consistent planted world: " + "; ".join(problems))

    @property
    def hook_name(self) -> str:
        return hook_name_of(self.layer)

    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def targets(self) -> Tensor:
        """``(n_targets, n_heads * d_head)``: the concat SAE's decoder rows, the targets a solver decomposes."""
        return self.concat_sae.W_dec

    @cached_property
    def dictionary(self) -> BlockDictionary:
        """The block dictionary of the head decoders with unit atoms (``scales`` = decoder norms), the dictionary
        ``truth`` is expressed on."""
        return self.head_saes.dictionary(normalize=True)

    def problem(self) -> PlantedProblem:
        """The world as a bare :class:`PlantedProblem` (what :mod:`benchmarks.solvers` runs on)."""
        return PlantedProblem(dictionary=self.dictionary, blocks=tuple(sae.W_dec for sae in self.head_saes),
                              targets=self.targets, support=self.truth.support, weights=self.truth.weights,
                              noise=self.truth.noise, config=self.config)

    def mixed(self, *, d_model: int | None = None, seed: int | None = None) -> MixedProblem:
        """The world lifted to the residual stream through a random ``W_O`` (:func:`mix_planted`)."""
        return mix_planted(self.problem(), d_model=d_model, seed=seed)


def hook_name_of(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def build_planted_world(config: PlantedConfig | str = "small", *, seed: int | None = None, layer: int = DEFAULT_LAYER,
                        dtype: torch.dtype = torch.float32) -> PlantedWorld:
    """The :class:`PlantedWorld` of ``config`` (a :class:`PlantedConfig` or a size name of :data:`SIZES`), with its
    seed replaced by ``seed`` when given; every SAE claims to read ``blocks.{layer}.attn.hook_z``. Deterministic in
    the seed; a ``small`` world builds in a tenth of a second, a ``medium`` one in about a second."""
    if isinstance(config, str):
        config = PlantedConfig.for_size(config)
    if not isinstance(config, PlantedConfig):
        raise InputTypeError(f"config must be a PlantedConfig or a size name {sorted(SIZES)}, got "
                             f"{type(config).__name__}")
    if seed is not None:
        config = replace(config, seed=seed)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InputError(f"layer must be a non-negative int, got {layer!r}")
    drawn = _generate(config, dtype)
    hook = hook_name_of(layer)
    provenance = {"format": "planted", "source": f"sparsedecomp.demo.planted (seed {config.seed})",
                  "planted": config.to_dict()}
    heads = []
    for h, block64 in enumerate(drawn.blocks):
        block = torch.from_numpy(block64).to(dtype)
        encoder = torch.from_numpy(block64 / (block64**2).sum(axis=1, keepdims=True)).to(dtype)
        heads.append(SAE(W_enc=encoder.T.contiguous(),
                         b_enc=block.new_zeros(config.n_features), W_dec=block.contiguous(),
                         b_dec=block.new_zeros(config.d_head), apply_b_dec_to_input=False, hook_name=hook,
                         layer=layer, head=h, model_name=None, provenance=dict(provenance)))
    targets = drawn.targets.to(dtype)
    concat = SAE(W_enc=targets.T.contiguous(), b_enc=targets.new_zeros(config.n_targets), W_dec=targets.contiguous(),
                 b_dec=targets.new_zeros(targets.shape[1]), apply_b_dec_to_input=False, hook_name=hook, layer=layer,
                 head=CONCATENATED, model_name=None, provenance=dict(provenance))
    n_atoms = config.n_heads * config.n_features
    truth = PlantedTruth(support=drawn.support, weights=drawn.weights.to(dtype), noise=drawn.noise.to(dtype),
                         atom_head=torch.arange(n_atoms) // config.n_features)
    return PlantedWorld(config=config, layer=layer, head_saes=HeadSAEs(tuple(heads)), concat_sae=concat, truth=truth)


# -- on disk ---------------------------------------------------------------------------------------------------------
def write_planted_world(world: PlantedWorld, out: str | Path) -> Path:
    """Write ``world`` into folder ``out`` through the package's one writer (atomic files, ``manifest.json``):

    * ``heads/head_<h>/``: each head SAE as a SAELens 6 folder (``cfg.json`` + ``sae_weights.safetensors``);
    * ``concat/``: the concat SAE as a SAELens 6 folder (``load_sae`` and the jobs read both kinds as they are);
    * ``truth.safetensors``: ``support``, ``weights``, ``noise``, ``atom_head`` (:class:`PlantedTruth`);
    * ``planted.json``: the format, the config, the layer, the dtype and where each part is.

    A folder holding anything but an earlier planted world is refused (:class:`~sparsedecomp.errors.InputError`);
    an earlier planted world there is replaced. Returns the folder."""
    from safetensors.torch import save_file

    from ..loading import save_saelens6
    from ..outputs import RunWriter

    if not isinstance(world, PlantedWorld):
        raise InputTypeError(f"world must be a PlantedWorld, got {type(world).__name__}")
    heads = {h: f"{HEADS_DIR}/{head_name(h)}" for h in world.head_saes.heads}
    meta = {
        "format": WORLD_FORMAT,
        "config": to_jsonable(world.config),
        "layer": world.layer,
        "hook_name": world.hook_name,
        "dtype": str(world.concat_sae.dtype).removeprefix("torch."),
        "heads": {str(h): folder for h, folder in heads.items()},
        "concat": CONCAT_NAME,
        "truth": TRUTH_FILE,
    }
    with RunWriter(out, command=WORLD_COMMAND, settings={"config": meta["config"], "layer": world.layer}) as writer:
        with tempfile.TemporaryDirectory(prefix="sparsedecomp-planted-") as scratch:
            folders = [(folder, world.head_saes[h]) for h, folder in heads.items()] + [(CONCAT_NAME, world.concat_sae)]
            for folder, sae in folders:
                written = save_saelens6(sae, Path(scratch) / folder)
                for file in sorted(p for p in written.iterdir() if p.is_file()):
                    writer.write_with(f"{folder}/{file.name}", lambda tmp, src=file: shutil.copyfile(src, tmp))
        truth = world.truth
        tensors = {"support": truth.support, "weights": truth.weights, "noise": truth.noise,
                   "atom_head": truth.atom_head}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        writer.write_with(TRUTH_FILE, lambda tmp: save_file(tensors, str(tmp)))
        writer.write_json(WORLD_FILE, meta)
        return writer.out


def load_planted_world(folder: str | Path, *, device: str | torch.device = "cpu") -> PlantedWorld:
    """The :class:`PlantedWorld` written in ``folder`` by :func:`write_planted_world`, read through the package's
    loaders (``load_head_saes`` for ``heads/head_<h>``, ``load_sae`` for ``concat``). A folder that is not a complete
    planted world is refused by name."""
    from ..loading import load_head_saes, load_sae
    from ..loading.files import read_json, read_safetensors
    from ..outputs import read_manifest

    if folder is None or str(folder).strip() == "":
        raise InputError("the planted world folder is empty: give the folder write_planted_world wrote")
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder: give the folder write_planted_world wrote")
    manifest = read_manifest(root)
    if manifest is None or manifest.get("command") != WORLD_COMMAND:
        found = "no manifest.json" if manifest is None else f"a `{manifest.get('command')}` run"
        raise InputError(f"{root} is not a planted world (it holds {found}); write one with write_planted_world or "
                         "python -m sparsedecomp.demo.planted --out DIR")
    if manifest.get("complete") is not True:
        raise InputError(f"{root} holds an incomplete planted world (its writer was interrupted): write it again")
    meta = read_json(root / WORLD_FILE, "planted world description")
    if meta.get("format") != WORLD_FORMAT:
        raise InputError(f"{root / WORLD_FILE} has format {meta.get('format')!r}, expected {WORLD_FORMAT!r}")
    config = from_jsonable(PlantedConfig, meta.get("config"), path=f"{WORLD_FILE}.config")
    layer = meta.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InputError(f"{root / WORLD_FILE}: layer must be a non-negative int, got {layer!r}")
    heads = meta.get("heads")
    if not isinstance(heads, dict) or sorted(heads) != sorted(str(h) for h in range(config.n_heads)):
        raise InputError(f"{root / WORLD_FILE} must name one folder per head 0..{config.n_heads - 1} under 'heads'")
    head_saes = load_head_saes({int(h): root / path for h, path in heads.items()}, n_heads=config.n_heads,
                               device=device)
    concat = load_sae(root / str(meta.get("concat", CONCAT_NAME)), device=device)
    tensors = read_safetensors(root / str(meta.get("truth", TRUTH_FILE)), "planted truth", device=device)
    missing = sorted({"support", "weights", "noise", "atom_head"} - set(tensors))
    if missing:
        raise InputError(f"{root / TRUTH_FILE} lacks the tensors {missing}")
    truth = PlantedTruth(support=tensors["support"], weights=tensors["weights"], noise=tensors["noise"],
                         atom_head=tensors["atom_head"])
    return PlantedWorld(config=config, layer=layer, head_saes=head_saes, concat_sae=concat, truth=truth)


# -- scoring ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RecoveryPerTarget:
    """Per-target recovery scores, ``(n_targets,)`` float64 tensors (see :func:`score_recovery` for the maths)."""

    support_recall: Tensor
    support_precision: Tensor
    support_exact: Tensor
    coefficient_error: Tensor
    head_recall: Tensor
    head_precision: Tensor
    n_found: Tensor
    n_planted: Tensor


@dataclass(frozen=True, eq=False)
class RecoveryScore:
    """How well codes recover a planted truth: means over targets (JSON-ready: :meth:`to_dict`), and the
    per-target values in ``per_target`` (left out of the JSON). See :func:`score_recovery` for the maths."""

    threshold: float
    n_targets: int
    support_recall: float
    support_precision: float
    support_exact: float
    coefficient_error: float
    coefficient_error_median: float
    coefficient_error_max: float
    head_recall: float
    head_precision: float
    l0_mean: float
    planted_l0_mean: float
    per_target: RecoveryPerTarget | None = field(default=None, metadata={"json": False})

    def to_dict(self) -> dict[str, Any]:
        """The aggregates as plain JSON types (:func:`sparsedecomp.jsonio.to_jsonable`)."""
        return to_jsonable(self)


def score_recovery(codes: Decomposition | Codes | Tensor, truth: PlantedTruth | PlantedWorld | PlantedProblem
                   | MixedProblem, *, threshold: float = DEFAULT_THRESHOLD) -> RecoveryScore:
    """Score codes against the planted truth.

    ``codes`` (a :class:`~sparsedecomp.Decomposition`, :class:`~sparsedecomp.Codes` or a dense ``(n_targets,
    n_atoms)`` tensor) must be on the truth's atoms: the unit atoms of the world's ``dictionary`` (what
    ``decompose(world.targets, world.dictionary, ...)`` returns), in the same order. For target row ``c`` with
    planted coefficients ``w`` (dense, ``w_j != 0`` exactly on the planted support ``P``):

    * **found** atoms ``F = {j : |c_j| > threshold * max_i |c_i|}`` (a row of zeros finds nothing), so small
      coefficients a solver leaves on the noise do not count as choices;
    * **support recall** ``|F & P| / |P|``; **support precision** ``|F & P| / |F|`` (0 when nothing is found);
      **support exact** 1 when ``F == P``;
    * **coefficient error** ``||c - w||_2 / ||w||_2`` on the raw code (every coefficient, thresholded or not; NaN for
      a non-finite code row);
    * **head recall / precision**: the same on the sets of heads that own an atom of ``F`` and of ``P``.

    A planted atom whose own weight is below ``threshold`` times the target's largest is hard to count as found:
    keep ``threshold`` below the smallest planted ratio (with the default ``weight_sigma = 0.5`` and at most 12
    atoms that ratio is rarely below 0.1; the default threshold is :data:`DEFAULT_THRESHOLD`).
    """
    truth = _as_truth(truth)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise InputError(f"threshold must be a number in [0, 1) (a fraction of each row's largest |coefficient|), "
                         f"got {threshold!r}")
    if isinstance(codes, Decomposition):
        codes = codes.codes
    if isinstance(codes, Tensor):
        if codes.ndim != 2 or not codes.is_floating_point():
            raise InputError(f"codes must be a floating (n_targets, n_atoms) tensor, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        codes = Codes.dense(codes)
    if not isinstance(codes, Codes):
        raise InputTypeError(f"codes must be a Decomposition, Codes or a dense tensor, got {type(codes).__name__}")
    if codes.shape != (truth.n_targets, truth.n_atoms):
        raise InputError(f"codes are {codes.shape[0]} targets x {codes.shape[1]} atoms but the truth is "
                         f"{truth.n_targets} targets x {truth.n_atoms} atoms: score the codes of the planted targets "
                         "on the planted dictionary")
    device = codes.device
    truth = truth.to(device)
    n_heads = truth.n_heads
    head_onehot = torch.nn.functional.one_hot(truth.atom_head, n_heads).double()
    chunk = max(1, 2**22 // truth.n_atoms)  # dense (chunk, n_atoms) float64 blocks of about 32 MB
    parts: dict[str, list[Tensor]] = {name: [] for name in RecoveryPerTarget.__dataclass_fields__}
    for start in range(0, truth.n_targets, chunk):
        rows = slice(start, start + chunk)
        part = truth.rows(rows)
        c = codes.rows(rows).to_dense().double()
        w = planted_dense(part.support, part.weights.double(), truth.n_atoms)
        planted = planted_dense(part.support, torch.ones_like(part.weights, dtype=torch.float64), truth.n_atoms) > 0
        magnitude = c.abs()
        peak = magnitude.nan_to_num(0.0).amax(dim=1, keepdim=True)
        found = magnitude > threshold * peak
        found &= peak > 0
        hits = (found & planted).sum(dim=1).double()
        n_found, n_planted = found.sum(dim=1).double(), planted.sum(dim=1).double()
        parts["support_recall"].append(hits / n_planted)
        parts["support_precision"].append(torch.where(n_found > 0, hits / n_found.clamp_min(1), 0.0))
        parts["support_exact"].append((found == planted).all(dim=1).double())
        parts["coefficient_error"].append((c - w).norm(dim=1) / w.norm(dim=1))
        found_heads, planted_heads = found.double() @ head_onehot > 0, planted.double() @ head_onehot > 0
        head_hits = (found_heads & planted_heads).sum(dim=1).double()
        n_found_heads = found_heads.sum(dim=1).double()
        parts["head_recall"].append(head_hits / planted_heads.sum(dim=1).double())
        parts["head_precision"].append(torch.where(n_found_heads > 0, head_hits / n_found_heads.clamp_min(1), 0.0))
        parts["n_found"].append(n_found)
        parts["n_planted"].append(n_planted)
    per_target = RecoveryPerTarget(**{name: torch.cat(values).cpu() for name, values in parts.items()})
    error = per_target.coefficient_error
    return RecoveryScore(
        threshold=float(threshold),
        n_targets=truth.n_targets,
        support_recall=float(per_target.support_recall.mean()),
        support_precision=float(per_target.support_precision.mean()),
        support_exact=float(per_target.support_exact.mean()),
        coefficient_error=float(error.mean()),
        coefficient_error_median=float(error.median()),
        coefficient_error_max=float(error.max()),
        head_recall=float(per_target.head_recall.mean()),
        head_precision=float(per_target.head_precision.mean()),
        l0_mean=float(per_target.n_found.mean()),
        planted_l0_mean=float(per_target.n_planted.mean()),
        per_target=per_target,
    )


def _as_truth(truth: Any) -> PlantedTruth:
    if isinstance(truth, PlantedTruth):
        return truth
    if isinstance(truth, PlantedWorld):
        return truth.truth
    if isinstance(truth, (PlantedProblem, MixedProblem)):
        return PlantedTruth.of(truth)
    raise InputTypeError(f"truth must be a PlantedTruth, PlantedWorld, PlantedProblem or MixedProblem, got "
                         f"{type(truth).__name__}")


# -- command line ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sparsedecomp.demo.planted --out DIR [--size small] [--seed 0] [--layer 1]``: build a planted world
    and write it (:func:`write_planted_world`), printing how long each step took."""
    parser = argparse.ArgumentParser(prog="python -m sparsedecomp.demo.planted",
                                     description="Build a planted world (per-head SAEs, a concat SAE made from known "
                                                 "atoms, and the truth) and write it as SAELens 6 folders.")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an earlier planted world)")
    parser.add_argument("--size", choices=sorted(SIZES, key=list(SIZES).index), default="small",
                        help="n_heads x n_features x d_head, n_targets: " + "; ".join(
                            f"{k} {h}x{f}x{d}, {t}" for k, (h, f, d, t) in SIZES.items()) + " (default small)")
    parser.add_argument("--seed", type=int, default=0, help="the one numpy seed (default 0)")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="the layer the SAEs claim to read (default 1)")
    parser.add_argument("--noise", type=float, default=None, help="relative noise of the targets (default 0.01)")
    args = parser.parse_args(argv)
    try:
        overrides = {} if args.noise is None else {"noise": args.noise}
        start = time.perf_counter()
        world = build_planted_world(PlantedConfig.for_size(args.size, **overrides), seed=args.seed, layer=args.layer)
        built = time.perf_counter() - start
        folder = write_planted_world(world, args.out)
        written = time.perf_counter() - start - built
    except (InputError, OutputError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    c = world.config
    print(f"planted world {args.size} (seed {c.seed}): {c.n_heads} heads x {c.n_features} features x d_head "
          f"{c.d_head}, {c.n_targets} targets; built in {built:.2f} s, written in {written:.2f} s to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
