"""Offline stand-ins for gelu-2l and its SAEs, written in the real on-disk layouts.

No hub here: the gelu-2l-size benchmark and the offline tests of the seed-reproduction commands run on a world that
has gelu-2l's shapes (or a tiny version of them) and is stored exactly as the real files are:

* the model: a local model folder (``config.json`` with the ``HookedTransformerConfig`` of gelu-2l, the
  ``from_pretrained`` processing flags, ``model.safetensors``), random weights;
* per-head SAEs: legacy SAELens 2.x runs ``checkpoints/<wandb_id>/final_<n>/<sae_name>/`` with
  ``normalize_activations: true`` and no saved input scale (Anthropic's April 2024 recipe, as in the seed), decoder
  rows of norm about 2 in training units;
* the concat SAE: a Kissane ``{version}.pt`` + ``{version}_cfg.json`` pair;
* tokens: a local Hugging Face dataset folder (parquet, a ``tokens`` column of BOS-first rows), the layout of
  ``NeelNanda/c4-code-tokenized-2b``.

Random weights are fine for cost and for known answers computed from the same files; they say nothing about
gelu-2l's numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

GELU_2L = {"model_name": "gelu-2l", "n_layers": 2, "d_model": 512, "n_heads": 8, "d_head": 64, "d_mlp": 2048,
           "n_ctx": 1024, "d_vocab": 48262, "act_fn": "gelu", "normalization_type": "LN",
           "positional_embedding_type": "standard"}
"""gelu-2l's architecture (formats.md section 5)."""

TINY = {**GELU_2L, "d_model": 64, "d_head": 8, "d_mlp": 128, "n_ctx": 64, "d_vocab": 500}
"""The same layout, small enough for a unit test (8 heads, as in gelu-2l)."""

HEAD_WANDB_IDS = ("rovi1lwe", "p7113j0v", "rjc53kjg", "hibm6x1l", "4xima76s", "jq26bfpa", "b8e2a9w5", "smfws6mc")
"""The seed's per-head run folders (head 0 .. 7)."""
CONCAT_VERSION = "concat-z-gelu-21-l1-lr-sweep-3/gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78"
BOS = 0


@dataclass(frozen=True)
class StandIn:
    """Where a stand-in world was written."""

    root: Path
    model_dir: Path
    head_runs: tuple[Path, ...]
    concat_dir: Path
    concat_version: str
    dataset_dir: Path
    config: dict
    head_d_sae: int
    concat_d_sae: int
    layer: int = 1


def write_model_folder(folder: str | Path, config: dict, *, seed: int, note: str):
    """A random-weight ``HookedTransformer`` of ``config`` written as a local model folder (the package's layout:
    ``config.json`` with the processing flags to load with, ``model.safetensors``); returns the model."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = HookedTransformer(HookedTransformerConfig(**config, seed=seed))
    (folder / "config.json").write_text(json.dumps({
        "hooked_transformer_config": config,
        "processing_flags": {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                             "fold_value_biases": True, "refactor_factored_attn_matrices": False},
        "note": note}, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}
    save_file(state, str(folder / "model.safetensors"))
    return model


def write_standin(root: str | Path, *, config: dict = GELU_2L, head_d_sae: int = 2048, concat_d_sae: int = 16384,
                  n_rows: int = 8, seed: int = 0, record_local_dataset: bool = False) -> StandIn:
    """Write a stand-in world under ``root`` (see the module docstring) and return where everything is. The head
    SAEs' configs record gelu-2l's dataset (``dataset_path``), or with ``record_local_dataset`` the local stand-in's
    folder, so that a command defaulting to the recorded dataset runs offline."""
    from sparsedecomp.loading import SAE, save_kissane, save_legacy_saelens

    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    model_dir = root / "model"
    write_model_folder(model_dir, config, seed=seed, note="sparsedecomp stand-in: gelu-2l's architecture with random "
                                                          "weights")

    n_heads, d_head, layer = config["n_heads"], config["d_head"], 1
    hook = f"blocks.{layer}.attn.hook_z"
    dataset_dir = root / "dataset"
    dataset_path = str(dataset_dir) if record_local_dataset else "NeelNanda/c4-code-tokenized-2b"
    head_runs = []
    for h in range(n_heads):
        W_enc, b_enc, W_dec, b_dec = _random_weights(d_head, head_d_sae, gen, decoder_norm=2.0)
        sae = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, apply_b_dec_to_input=False, hook_name=hook,
                  layer=layer, head=h, model_name=config["model_name"], provenance={"needs_input_scale": True})
        save_legacy_saelens(sae, root / "checkpoints", HEAD_WANDB_IDS[h], 983044096,
                            cfg_extra={"normalize_activations": True, "context_size": config["n_ctx"],
                                       "prepend_bos": True, "dataset_path": dataset_path})
        head_runs.append(root / "checkpoints" / HEAD_WANDB_IDS[h])
    d_z = n_heads * d_head
    W_enc, b_enc, W_dec, b_dec = _random_weights(d_z, concat_d_sae, gen, decoder_norm=1.0)
    concat = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, apply_b_dec_to_input=True, hook_name=hook,
                 layer=layer, head="concatenated", model_name=config["model_name"])
    concat_dir = root / "kissane"
    save_kissane(concat, concat_dir, CONCAT_VERSION, cfg_extra={"seq_len": config["n_ctx"]})

    write_token_dataset(dataset_dir, n_rows=n_rows, row_length=config["n_ctx"], d_vocab=config["d_vocab"], gen=gen)
    return StandIn(root=root, model_dir=model_dir, head_runs=tuple(head_runs), concat_dir=concat_dir,
                   concat_version=CONCAT_VERSION, dataset_dir=dataset_dir, config=dict(config), head_d_sae=head_d_sae,
                   concat_d_sae=concat_d_sae, layer=layer)


def write_token_dataset(folder: Path, *, n_rows: int, row_length: int, d_vocab: int, gen: torch.Generator) -> Path:
    """A pre-tokenised dataset folder (``data/train-00000-of-00001.parquet``, column ``tokens``, BOS-first rows), the
    layout ``datasets.load_dataset(folder)`` reads like a hub dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = torch.randint(1, d_vocab, (n_rows, row_length), generator=gen)
    rows[:, 0] = BOS
    (folder / "data").mkdir(parents=True, exist_ok=True)
    table = pa.table({"tokens": [r.tolist() for r in rows]})
    path = folder / "data" / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


def _random_weights(d_in: int, d_sae: int, gen: torch.Generator, *, decoder_norm: float):
    """A random ReLU SAE that fires sparsely on inputs of norm about ``sqrt(d_in)``: decoder rows of norm about
    ``decoder_norm`` (log-normal spread), encoder the decoder's transpose over its squared norms, negative biases."""
    directions = torch.randn(d_sae, d_in, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    norms = decoder_norm * torch.exp(0.25 * torch.randn(d_sae, generator=gen))
    W_dec = directions * norms[:, None]
    W_enc = (directions / norms[:, None]).T.contiguous()
    b_enc = -0.5 * torch.ones(d_sae) / norms * math.sqrt(d_in) / 8
    b_dec = 0.01 * torch.randn(d_in, generator=gen)
    return W_enc, b_enc, W_dec, b_dec

