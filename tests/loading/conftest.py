"""Shared fixtures for the loader tests: small random SAEs, poisoned pickles and a stand-in Hugging Face cache."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sparsedecomp.loading import SAE

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_sae(
    *,
    d_in: int = 8,
    d_sae: int = 24,
    head: int | str = 0,
    layer: int = 1,
    hook_name: str | None = None,
    model_name: str = "gelu-2l",
    apply_b_dec_to_input: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """An SAE with random weights, non-unit decoder rows (as in the April-2024 recipe) and a non-zero b_dec."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (0.5 + 2 * torch.rand(d_sae, 1, generator=g))
    return SAE(
        W_enc=(torch.randn(d_in, d_sae, generator=g) * 0.5).to(dtype),
        b_enc=(torch.randn(d_sae, generator=g) * 0.1).to(dtype),
        W_dec=W_dec.to(dtype),
        b_dec=(torch.randn(d_in, generator=g) * 0.3).to(dtype),
        apply_b_dec_to_input=apply_b_dec_to_input,
        hook_name=hook_name or f"blocks.{layer}.attn.hook_z",
        layer=layer,
        head=head,
        model_name=model_name,
    )


class _Payload:
    """Unpickling this calls os.makedirs(marker): proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def write_poisoned_pickle(path: Path, marker: Path, *, torch_format: bool = False) -> None:
    """Write a file whose unpickling would create ``marker`` (plain pickle, or a torch.save zip archive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save({"W_enc": _Payload(marker)}, path)
        return
    with open(path, "wb") as handle:
        pickle.dump({"optimizer": _Payload(marker)}, handle)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A folder laid out like the Hugging Face hub cache, with the hub forced offline and pointed at it.

    Call ``put(repo_id, filename, source_path)`` to place a file as if it had been downloaded."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo_id: str, filename: str, source: Path) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        target = repo / "snapshots" / COMMIT / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    put.cache = cache
    return put


@pytest.fixture
def make_sae():
    return random_sae


@pytest.fixture
def poison():
    return write_poisoned_pickle
