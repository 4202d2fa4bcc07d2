"""Planted worlds: a planted problem (:mod:`sparsedecomp.demo.planted`) as per-head SAEs and a concat SAE, with the
truth attached, written to and read from disk.

:func:`build_planted_world` wraps a planted problem as SAEs (:class:`PlantedWorld`): one per-head
:class:`~sparsedecomp.loading.SAE` per head whose decoder is the planted head decoder, a concatenated-``z`` SAE whose
decoder rows are the targets, and the truth (:class:`PlantedTruth`). :func:`write_planted_world` writes it as SAELens 6
folders (what the package's jobs load) plus the truth; :func:`load_planted_world` reads it back through the package's
loaders. ``python -m sparsedecomp.demo.planted_world --out DIR [--size small] [--seed 0]`` builds and writes one in
seconds. Scoring codes against the truth is :mod:`sparsedecomp.demo.recovery`. See ``docs/planted.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..dictionary import BlockDictionary
from ..errors import InputError, InputTypeError, OutputError
from ..jsonio import from_jsonable, to_jsonable
from ..loading import CONCATENATED, SAE, HeadSAEs
from ..naming import CONCAT_NAME, head_name
from ..validation import FLOAT_DTYPES
from .planted import (SIZES, MixedProblem, PlantedConfig, PlantedProblem, _generate, _synthesize, mix_planted,
                      planted_dense)

WORLD_COMMAND = "planted-world"
"""The command recorded in a written world's ``manifest.json`` (a folder holding another command's run is refused)."""
WORLD_FORMAT = "sparsedecomp-planted-world/1"
WORLD_FILE = "planted.json"
TRUTH_FILE = "truth.safetensors"
HEADS_DIR = "heads"
DEFAULT_LAYER = 1
"""gelu-2l's layer 1, the layer of the real problem."""


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
                         "python -m sparsedecomp.demo.planted_world --out DIR")
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

# -- command line ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sparsedecomp.demo.planted_world --out DIR [--size small] [--seed 0] [--layer 1]``: build a planted
    world and write it (:func:`write_planted_world`), printing how long each step took."""
    parser = argparse.ArgumentParser(prog="python -m sparsedecomp.demo.planted_world",
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
