"""Where the demo artifacts live and how their small files are named."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from ..errors import InputError

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
HELDOUT_FILE = "heldout_tokens.safetensors"
MODEL_DIR = "model"
TOKENIZER_FILE = f"{MODEL_DIR}/tokenizer.json"
"""The tokenizer travels in the model folder (``sparsedecomp.loading.load_model`` attaches it to the model)."""
TOKENIZER_CONFIG_FILE = f"{MODEL_DIR}/tokenizer_config.json"
"""Names its BOS / EOS tokens for ``transformers`` (see :func:`sparsedecomp.demo.tokenizer.save_tokenizer`)."""
LEGACY_TOKENIZER_FILE = "tokenizer.json"
"""Where builds before the tokenizer moved into the model folder wrote it (still read)."""
HEADS_ROOT = "saes/heads"
"""One SAELens 6 folder per head, ``head_<h>`` (as ``sparsedecomp train-heads`` writes them)."""
CONCAT_DIR = "saes/concat"
REPORT_FILE = "build_report.json"
BUILD_MARKER = "demo_build.json"
"""Written first into every build's output folder; the build deletes files only in a folder that carries it."""


def tokenizer_path(artifacts_dir: Path) -> Path:
    """The tokenizer file of the build in ``artifacts_dir`` (``model/tokenizer.json``, or an older build's
    ``tokenizer.json`` beside the model folder)."""
    path = Path(artifacts_dir) / TOKENIZER_FILE
    legacy = Path(artifacts_dir) / LEGACY_TOKENIZER_FILE
    return legacy if not path.is_file() and legacy.is_file() else path


def concat_version(cfg, l1: float) -> str:
    """Kissane et al.'s run name grammar (formats.md section 1) for the concat SAE (no resampling: ``rie0_nr0``)."""
    return (
        f"{cfg.model_name}_L{cfg.sae_layer}_Hcat_z_lr{cfg.sae_lr:.2e}_l1{l1:.2e}_ds{cfg.concat_d_sae}"
        f"_bs{cfg.sae_batch_size}_dc{1e-7:.2e}_rie0_nr0_v0"
    )


def save_heldout_tokens(path: Path, tokens: Tensor) -> None:
    """Held-out contexts as int16 (the vocabulary is far below 32768) in safetensors."""
    from safetensors.torch import save_file

    if int(tokens.max()) >= 2**15:
        raise InputError("token ids do not fit int16")
    save_file({"tokens": tokens.to(torch.int16).contiguous()}, str(path))


def load_heldout_tokens(path: Path) -> Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["tokens"].long()
