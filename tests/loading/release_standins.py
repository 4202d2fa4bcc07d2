"""Stand-ins for three SAELens releases of attention SAEs (and two neighbours), written in each release's REAL hub
layout and file format into a local Hugging Face hub cache, so that ``SAE.from_pretrained`` (SAELens's own
conversion functions) and ``sparsedecomp.loading.load_sae("saelens://...")`` read them offline.

Each writer takes ``put(repo_id, filename, source_path)`` -- the ``hf_cache`` fixture of ``conftest.py`` -- and a
scratch folder, and returns a :class:`StandIn` with the reference, the weights written and the facts a test checks.
The weights are random (seeded); every name, key, shape, dtype and config entry SAELens reads is the real one,
except where a docstring says a size is shrunk.

Real facts, from SAELens 6.54's ``pretrained_saes.yaml`` and ``loading/pretrained_sae_loaders.py``:

* ``gpt2-small-hook-z-kk`` (conversion ``connor_rob_hook_z``; repo ``ckkissane/attn-saes-gpt2-small-all-layers``):
  per layer one pair ``{version}.pt`` (a ``torch.save``'d state dict ``W_enc (768, d_sae)``, ``W_dec (d_sae, 768)``,
  ``b_enc (d_sae,)``, ``b_dec (768,)``, float32) + ``{version}_cfg.json`` (Kissane's training config: ``act_size``,
  ``dict_size``, ``act_name`` = ``blocks.L.attn.hook_z``, ``layer``, ``model_name`` = ``gpt2-small``, ``head`` =
  ``"cat"``, ``concat_heads``, ``enc_dtype`` = ``fp32``, ...) at the repo root; the file name is the yaml's ``path``.
* ``gemma-scope-2b-pt-att`` (conversion ``gemma_2``; repo ``google/gemma-scope-2b-pt-att``): per SAE a folder
  ``layer_L/width_16k/average_l0_N/params.npz`` holding float32 ``W_enc (2048, 16384)``, ``W_dec (16384, 2048)``,
  ``b_enc (16384,)``, ``b_dec (2048,)``, ``threshold (16384,)`` (JumpReLU). No config file: SAELens derives the
  config from the names (d_sae from ``width_16k``; d_in 2048 = 8 heads x 256 for an ``att`` repo of ``2b``; hook
  ``blocks.L.attn.hook_z``; architecture ``jumprelu``; ``apply_b_dec_to_input`` False).
* ``gemma-scope-2-270m-pt-att`` (conversion ``gemma_3``; repo ``google/gemma-scope-2-270m-pt``): per SAE a folder
  ``attn_out/layer_L_width_16k_l0_{small,medium,big}/`` with ``config.json`` (``{"width", "model_name":
  "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0", "affine_connection": false, "hf_hook_point_in":
  "model.layers.L.self_attn.o_proj.input", "hf_hook_point_out": (the same), "type": "sae"}``) and
  ``params.safetensors`` holding float32 ``w_enc (1024, d_sae)``, ``w_dec (d_sae, 1024)``, ``b_enc``, ``b_dec``,
  ``threshold`` (lower-case ``w_``). SAELens takes d_in and d_sae from the safetensors header (over HTTP range
  requests; sparsedecomp reads the cached file's header instead when it is cached), the hook from the folder name
  (``attn_out`` -> ``blocks.L.attn.hook_z``) and the model from ``config.json`` (``-pt`` dropped for 270m).

What is shrunk: ``d_sae`` of the Kissane stand-in (256 instead of 24,576; SAELens and sparsedecomp both take it from
``dict_size``, kept consistent with the tensors) and of the Gemma Scope 2 stand-ins (256 instead of 16,384: taken
from the file; ``config.json``'s ``width`` says 256 too). Gemma Scope (1)'s d_sae cannot be shrunk -- SAELens takes it
from the folder name -- so that stand-in has the real 16,384 features, but its matrices repeat each of 256 random
features 64 times in neighbouring columns / rows (with a distinct ``b_enc`` and ``threshold`` per feature) and are
written with ``np.savez_compressed`` (an ``.npz`` all the same: ``np.load`` reads both) so that the file is small
(5.6 MB). d_in is always the real model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

KK_RELEASE = "gpt2-small-hook-z-kk"
GS_RELEASE = "gemma-scope-2b-pt-att"
GS2_RELEASE = "gemma-scope-2-270m-pt-att"
GS2_RES_RELEASE = "gemma-scope-2-270m-pt-res"
GS2_TRANSCODER_RELEASE = "gemma-scope-2-270m-pt-transcoders"

Put = Callable[[str, str, Path], Path]


@dataclass(frozen=True)
class StandIn:
    """What a writer put in the cache: the ``saelens://`` reference, the release and sae id, the hub repo, the files
    (repo-relative names), the float32 weights written (SAELens's names) and the facts a loaded SAE must show."""

    reference: str
    release: str
    sae_id: str
    repo_id: str
    files: tuple[str, ...]
    weights: dict[str, torch.Tensor]
    hook_name: str
    layer: int
    model_name: str
    n_heads: int
    d_head: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.weights["W_enc"].shape[0]

    @property
    def d_sae(self) -> int:
        return self.weights["W_enc"].shape[1]


def _entry(release: str, sae_id: str):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()[release]
    if sae_id not in lookup.saes_map:
        raise KeyError(f"{sae_id!r} is not an id of SAELens's release {release!r}")
    return lookup.repo_id, lookup.saes_map[sae_id]


def _random(shape: tuple[int, ...], g: torch.Generator, scale: float) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _jumprelu_weights(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """Random JumpReLU weights whose thresholds sit inside the pre-activations' range (some features fire, some
    do not, and the threshold decides for some)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = _random((d_sae, d_in), g, 1.0)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": _random((d_in, d_sae), g, d_in**-0.5),
        "W_dec": W_dec,
        "b_enc": _random((d_sae,), g, 0.1),
        "b_dec": _random((d_in,), g, 0.05),
        "threshold": 0.2 + 0.6 * torch.rand(d_sae, generator=g),
    }


def write_kissane_gpt2(put: Put, scratch: Path, *, layer: int = 5, d_sae: int = 256, seed: int = 0) -> StandIn:
    """``saelens://gpt2-small-hook-z-kk/blocks.{layer}.hook_z``: the Kissane pair at the yaml's path (d_sae shrunk
    from 24,576 to ``d_sae``; d_in the real 768 = 12 heads x 64)."""
    sae_id = f"blocks.{layer}.hook_z"
    repo_id, path = _entry(KK_RELEASE, sae_id)
    version = path[: -len(".pt")]
    d_in = 12 * 64
    g = torch.Generator().manual_seed(seed)
    W_dec = _random((d_sae, d_in), g, 1.0)
    weights = {
        "W_enc": _random((d_in, d_sae), g, d_in**-0.5),
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_enc": _random((d_sae,), g, 0.1),
        "b_dec": _random((d_in,), g, 0.05),
    }
    hook_name = f"blocks.{layer}.attn.hook_z"
    # Kissane et al.'s training config (the keys of their run dicts); sizes follow the stand-in's tensors.
    cfg = {
        "seed": 49, "batch_size": 4096, "buffer_mult": 384, "lr": 0.0012, "num_tokens": 2_000_000_000,
        "l1_coeff": 1.0, "beta1": 0.9, "beta2": 0.99, "dict_mult": 32, "seq_len": 128, "enc_dtype": "fp32",
        "model_name": "gpt2-small", "site": "z", "layer": layer, "device": "cuda", "reinit": "reinit", "head": "cat",
        "concat_heads": True, "resample_scheme": "anthropic", "anthropic_neuron_resample_scale": 0.2,
        "dead_direction_cutoff": 1e-06, "re_init_every": 25000, "anthropic_resample_last": 12500,
        "model_batch_size": 512, "buffer_size": 1_572_864, "buffer_batches": 12288, "act_name": hook_name,
        "act_size": d_in, "dict_size": d_sae, "name": version,
    }
    scratch.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in weights.items()}, scratch / f"{version}.pt")
    (scratch / f"{version}_cfg.json").write_text(json.dumps(cfg), encoding="utf-8")
    files = (f"{version}.pt", f"{version}_cfg.json")
    for name in files:
        put(repo_id, name, scratch / name)
    return StandIn(f"saelens://{KK_RELEASE}/{sae_id}", KK_RELEASE, sae_id, repo_id, files, weights, hook_name,
                   layer, "gpt2-small", 12, 64)


def write_gemma_scope_2b_att(put: Put, scratch: Path, *, layer: int = 5, l0: int = 30, seed: int = 1) -> StandIn:
    """``saelens://gemma-scope-2b-pt-att/layer_{layer}/width_16k/average_l0_{l0}``: ``params.npz`` in the SAE's
    folder. d_in the real 2048 (gemma-2-2b: 8 query heads x d_head 256; 4 key/value heads), d_sae the real 16,384
    (SAELens reads it from ``width_16k``), each of 256 random
    features repeated in 64 neighbouring columns of W_enc and rows of W_dec (so the compressed file is small)."""
    sae_id = f"layer_{layer}/width_16k/average_l0_{l0}"
    repo_id, folder = _entry(GS_RELEASE, sae_id)
    d_in, d_sae, block = 2048, 16384, 256
    base = _jumprelu_weights(d_in, block, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    reps = d_sae // block
    weights = {
        "W_enc": base["W_enc"].repeat_interleave(reps, dim=1).contiguous(),
        "W_dec": base["W_dec"].repeat_interleave(reps, dim=0).contiguous(),
        "b_enc": _random((d_sae,), g, 0.1),
        "b_dec": base["b_dec"],
        "threshold": 0.2 + 0.6 * torch.rand(d_sae, generator=g),
    }
    scratch.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(scratch / "params.npz", **{k: v.numpy().astype(np.float32) for k, v in weights.items()})
    files = (f"{folder}/params.npz",)
    put(repo_id, files[0], scratch / "params.npz")
    return StandIn(f"saelens://{GS_RELEASE}/{sae_id}", GS_RELEASE, sae_id, repo_id, files, weights,
                   f"blocks.{layer}.attn.hook_z", layer, "gemma-2-2b", 8, 256, {"n_kv_heads": 4})


def _gemma_scope_2(put: Put, scratch: Path, release: str, sae_id: str, *, d_in: int, d_out: int, d_sae: int,
                   config: dict[str, Any], seed: int, affine: bool = False) -> tuple[str, tuple[str, ...], dict]:
    repo_id, folder = _entry(release, sae_id)
    from safetensors.torch import save_file

    weights = _jumprelu_weights(d_in, d_sae, seed)
    if d_out != d_in:
        g = torch.Generator().manual_seed(seed + 7)
        weights["W_dec"] = _random((d_sae, d_out), g, d_out**-0.5)
        weights["b_dec"] = _random((d_out,), g, 0.05)
    raw = {"w_enc": weights["W_enc"], "w_dec": weights["W_dec"], "b_enc": weights["b_enc"],
           "b_dec": weights["b_dec"], "threshold": weights["threshold"]}
    if affine:
        g = torch.Generator().manual_seed(seed + 9)
        raw["affine_skip_connection"] = weights["affine_skip_connection"] = _random((d_in, d_out), g, 0.01)
    scratch.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in raw.items()}, str(scratch / "params.safetensors"))
    (scratch / "config.json").write_text(json.dumps({**config, "width": d_sae}), encoding="utf-8")
    files = (f"{folder}/config.json", f"{folder}/params.safetensors")
    put(repo_id, files[0], scratch / "config.json")
    put(repo_id, files[1], scratch / "params.safetensors")
    return repo_id, files, weights


def write_gemma_scope_2_270m_att(put: Put, scratch: Path, *, layer: int = 12, size: str = "small",
                                 d_sae: int = 256, seed: int = 2) -> StandIn:
    """``saelens://gemma-scope-2-270m-pt-att/layer_{layer}_width_16k_l0_{size}``: ``config.json`` +
    ``params.safetensors`` in ``attn_out/layer_{layer}_width_16k_l0_{size}/``. d_in the real 1024 (gemma-3-270m: 4
    query heads x d_head 256; 1 key/value head), d_sae shrunk from 16,384 to ``d_sae``."""
    sae_id = f"layer_{layer}_width_16k_l0_{size}"
    point = f"model.layers.{layer}.self_attn.o_proj.input"
    config = {"model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu",
              "l0": {"small": 20, "medium": 60, "big": 150}[size], "affine_connection": False,
              "hf_hook_point_in": point, "hf_hook_point_out": point, "type": "sae"}
    repo_id, files, weights = _gemma_scope_2(put, scratch, GS2_RELEASE, sae_id, d_in=1024, d_out=1024, d_sae=d_sae,
                                             config=config, seed=seed)
    return StandIn(f"saelens://{GS2_RELEASE}/{sae_id}", GS2_RELEASE, sae_id, repo_id, files, weights,
                   f"blocks.{layer}.attn.hook_z", layer, "google/gemma-3-270m", 4, 256, {"n_kv_heads": 1})


def write_gemma_scope_2_270m_res(put: Put, scratch: Path, *, layer: int = 12, d_sae: int = 256,
                                 seed: int = 3) -> StandIn:
    """``saelens://gemma-scope-2-270m-pt-res/layer_{layer}_width_16k_l0_small``: a residual-stream SAE (real d_in
    640 = gemma-3-270m's d_model; d_sae shrunk), for the refusals of an SAE that does not read ``hook_z``."""
    sae_id = f"layer_{layer}_width_16k_l0_small"
    point = f"model.layers.{layer}.output"
    config = {"model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 20,
              "affine_connection": False, "hf_hook_point_in": point, "hf_hook_point_out": point, "type": "sae"}
    repo_id, files, weights = _gemma_scope_2(put, scratch, GS2_RES_RELEASE, sae_id, d_in=640, d_out=640, d_sae=d_sae,
                                             config=config, seed=seed)
    return StandIn(f"saelens://{GS2_RES_RELEASE}/{sae_id}", GS2_RES_RELEASE, sae_id, repo_id, files, weights,
                   f"blocks.{layer}.hook_resid_post", layer, "google/gemma-3-270m", 4, 256)


def write_gemma_scope_2_270m_transcoder(put: Put, scratch: Path, *, d_sae: int = 256, seed: int = 4) -> StandIn:
    """``saelens://gemma-scope-2-270m-pt-transcoders/transcoder/layer_9_width_16k_l0_small_affine``: a skip
    transcoder (reads ``blocks.9.hook_mlp_in``, writes ``blocks.9.hook_mlp_out``; real d_in = d_out = 640, an
    ``affine_skip_connection (640, 640)``; d_sae shrunk), which sparsedecomp must refuse by name."""
    layer, sae_id = 9, "transcoder/layer_9_width_16k_l0_small_affine"
    config = {"model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 20,
              "affine_connection": True,
              "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
              "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output", "type": "transcoder"}
    repo_id, files, weights = _gemma_scope_2(put, scratch, GS2_TRANSCODER_RELEASE, sae_id, d_in=640, d_out=640,
                                             d_sae=d_sae, config=config, seed=seed, affine=True)
    return StandIn(f"saelens://{GS2_TRANSCODER_RELEASE}/{sae_id}", GS2_TRANSCODER_RELEASE, sae_id, repo_id, files,
                   weights, f"blocks.{layer}.hook_mlp_in", layer, "google/gemma-3-270m", 4, 256)
