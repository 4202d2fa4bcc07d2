"""SAELens pretrained releases by name: ``SAE.from_pretrained(release, sae_id)`` through SAELens's own registry and
conversion functions (hub files fetched with ``huggingface_hub``, so its cache and ``HF_HUB_OFFLINE`` apply)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .files import DTYPE_NAMES
from .sae import SAE
from .saelens6 import from_saelens
from ..errors import InputError

# Releases whose files are Kissane-style (.pt + _cfg.json) checkpoints: read them with our safe loader.
_KISSANE_CONVERSIONS = ("connor_rob_hook_z",)


def load_saelens_pretrained(
    release: str,
    sae_id: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    force_download: bool = False,
) -> SAE:
    """``SAE.from_pretrained(release, sae_id)`` through SAELens's registry and hub loaders.

    Releases stored as Kissane ``.pt`` + ``_cfg.json`` pairs (``gpt2-small-hook-z-kk``) are read with
    :func:`~sparsedecomp.loading.kissane.load_kissane` (``weights_only=True``) instead of SAELens's own loader.
    SAELens folds a known ``norm_scaling_factor`` for the release; an unknown one leaves ``needs_input_scale``.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    where = {"release": release, "sae_id": sae_id}
    if lookup is not None and lookup.conversion_func in _KISSANE_CONVERSIONS:
        from .kissane import load_kissane

        if sae_id not in lookup.saes_map:
            raise CheckpointError(f"sae_id {sae_id!r} is not in release {release!r} (ids: {list(lookup.saes_map)[:5]} ...)")
        path = lookup.saes_map[sae_id]
        version = path[: -len(".pt")] if path.endswith(".pt") else path
        if dtype not in DTYPE_NAMES:
            raise InputError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        sae = load_kissane(version=version, repo_id=lookup.repo_id, device=device)
        if sae.dtype != DTYPE_NAMES[dtype]:
            sae = sae.to(dtype=DTYPE_NAMES[dtype])
        return _with_provenance(sae, {**where, "source": f"saelens://{release}/{sae_id}"})
    from sae_lens import SAE as LensSAE

    try:
        obj, cfg_dict, log_sparsity = LensSAE.from_pretrained_with_cfg_and_sparsity(
            release, sae_id, device=str(device), dtype=dtype, force_download=force_download
        )
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"SAELens could not load release {release!r}, sae_id {sae_id!r}: {err}") from err
    repo = lookup.repo_id if lookup is not None else release
    return from_saelens(
        obj,
        provenance={"source": f"saelens://{release}/{sae_id}", "repo_id": repo, **where},
        log_sparsity=log_sparsity,
    )


def _with_provenance(sae: SAE, extra: Mapping[str, Any]) -> SAE:
    return replace(sae, provenance={**sae.provenance, **dict(extra)})
