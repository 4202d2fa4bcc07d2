"""Which loader reads a checkpoint: an explicit name -> loader mapping and detection from what is on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError, CheckpointNotFoundError
from .files import CFG_NAME, SAE_DIR_FILES, WEIGHTS_NAME, as_path, is_sae_dir, read_json, sae_dir_of
from .hub import SYNTAX, is_reference, load_reference
from .kissane import CFG_SUFFIX, find_kissane_pair, load_kissane
from .sae import SAE
from .saelens6 import is_saelens6_cfg, load_saelens6
from .saelens_legacy import is_legacy_cfg, list_checkpoints, load_legacy_saelens
from ..errors import InputError
from ..validation import check_device

LOADERS: dict[str, Callable[..., SAE]] = {
    "kissane": load_kissane,
    "saelens_legacy": load_legacy_saelens,
    "saelens6": load_saelens6,
}


def detect_format(source: str | Path, *, version: str | int | None = None) -> str:
    """Name the format of the checkpoint at ``source`` (a key of :data:`LOADERS`).

    * ``{version}.pt`` + ``{version}_cfg.json`` (the file, or a directory holding the pair): ``"kissane"``;
    * a folder with ``cfg.json`` + ``sae_weights.safetensors`` (or one of those files) whose config has
      ``architecture`` / ``metadata``: ``"saelens6"``; one whose config has ``hook_point``: ``"saelens_legacy"``;
    * a legacy checkpoint folder (``<sae_name>/`` inside) or run folder (``final_<n>/`` inside):
      ``"saelens_legacy"``.
    """
    if is_reference(source):
        raise InputError(f"{source} is a hub reference, not a local checkpoint: load it with load_sae")
    path = as_path(source)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.name.endswith(".pt") or path.name.endswith(CFG_SUFFIX):
            return "kissane"
        if path.name in SAE_DIR_FILES:
            path = path.parent
        else:
            raise CheckpointError(
                f"{path} is not a checkpoint file this package reads ({{version}}.pt, {{version}}{CFG_SUFFIX}, "
                f"{', '.join(SAE_DIR_FILES)})"
            )
    if find_kissane_pair(path, version) is not None:
        return "kissane"
    if version is not None:
        raise CheckpointError(f"{path} holds no Kissane checkpoint {version}.pt + {version}{CFG_SUFFIX}")
    if is_sae_dir(path):
        cfg = read_json(path / CFG_NAME)
        if is_saelens6_cfg(cfg):
            return "saelens6"
        if is_legacy_cfg(cfg):
            return "saelens_legacy"
        raise CheckpointError(
            f"{path / CFG_NAME} matches no known format: no 'architecture'/'metadata' (SAELens 6) and no "
            "'hook_point' (legacy SAELens)"
        )
    if any(is_sae_dir(child) for child in path.iterdir() if child.is_dir()) or list_checkpoints(path):
        return "saelens_legacy"
    raise CheckpointError(
        f"no checkpoint recognised at {path}: expected a Kissane {{version}}.pt + {{version}}_cfg.json pair, a "
        f"SAELens folder ({CFG_NAME} + {WEIGHTS_NAME}), or a legacy SAELens checkpoint / run folder"
    )


def load_sae(
    source: str | Path | None = None,
    *,
    version: str | int | None = None,
    repo_id: str | None = None,
    format: str | None = None,
    device: str | torch.device = "cpu",
    sae_name: str | None = None,
    step: int | str | None = None,
) -> SAE:
    """Load one SAE.

    ``source`` is a local checkpoint (file or folder; format detected unless ``format`` names it) or a hub
    reference, ``hf://OWNER/REPO[@REVISION]/VERSION`` (a Kissane pair) or ``saelens://RELEASE/SAE_ID`` (a SAELens
    release; see :mod:`sparsedecomp.loading.hub`). With ``repo_id`` (or no ``source`` but a ``version``) a Kissane
    checkpoint is fetched from the Hugging Face hub. ``step`` picks the checkpoint of a legacy SAELens run folder
    (its number of training tokens, or ``"final"``; see :func:`~sparsedecomp.loading.saelens_legacy.choose_checkpoint`).
    """
    if format is not None and format not in LOADERS:
        raise InputError(f"format must be one of {sorted(LOADERS)}, got {format!r}")
    if source is not None and not is_reference(source):
        as_path(source, references=True)  # a number or list is refused by type before anything is looked up
    device = check_device(device)
    if is_reference(source):
        if repo_id is not None or format is not None or sae_name is not None or step is not None:
            raise InputError(
                f"{source} is a hub reference ({SYNTAX}); it takes no repo_id=, format=, sae_name= or step="
            )
        return load_reference(source, version=version, device=device)
    if source is None or repo_id is not None:
        if format not in (None, "kissane"):
            raise InputError(f"only the 'kissane' format is read from a hub repo here, got format={format!r}")
        if step is not None:
            raise InputError("step= only applies to legacy SAELens run folders, not to a Kissane hub checkpoint")
        return load_kissane(source, version=version, repo_id=repo_id, device=device)
    name = format or detect_format(source, version=version)
    path = Path(source)
    options: dict[str, object] = {}
    if name == "kissane":
        options["version"] = version
    elif version is not None:
        raise InputError(f"version= only applies to Kissane checkpoints; {source} is {name}")
    if name == "saelens_legacy":
        options["sae_name"] = sae_name
        options["step"] = step
    elif sae_name is not None or step is not None:
        given = "sae_name=" if sae_name is not None else "step="
        raise InputError(f"{given} only applies to legacy SAELens trees; {source} is {name}")
    if name in ("saelens6", "saelens_legacy"):
        path = sae_dir_of(path)
    return LOADERS[name](path, device=device, **options)
