"""Kissane et al.'s concatenated-``z`` attention SAEs: a ``{version}.pt`` state dict plus ``{version}_cfg.json``.

The state dict holds ``W_enc (act_size, dict_size)``, ``W_dec (dict_size, act_size)``, ``b_enc``, ``b_dec``;
the forward pass is ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec`` on ``z`` flattened head-major.
Files come from a local directory or from the Hugging Face hub (``version`` may name a sub-folder, e.g.
``"concat-z-gelu-21-l1-lr-sweep-3/gelu-2l_L1_Hcat_z_..._v78"``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError, CheckpointNotFoundError
from .files import as_path, check_sae_tensors, config_int, config_str, read_json, read_torch_state_dict, resolve_layer
from .sae import CONCATENATED, SAE
from ..errors import InputError, InputTypeError

DEFAULT_REPO_ID = "ckkissane/tinystories-1M-SAES"
ENC_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CFG_SUFFIX = "_cfg.json"

_NAME_MODEL = re.compile(r"^(?P<model>.+?)_L(?P<layer>\d+)_H(?P<head>cat|\d+)_")


def kissane_paths(directory: str | Path, version: str | int) -> tuple[Path, Path]:
    """``(directory/{version}.pt, directory/{version}_cfg.json)``."""
    directory = Path(directory)
    return directory / f"{version}.pt", directory / f"{version}{CFG_SUFFIX}"


def find_kissane_pair(path: str | Path, version: str | int | None = None) -> tuple[Path, Path] | None:
    """The ``(.pt, _cfg.json)`` pair that ``path`` (and ``version``) point at, or ``None`` if there is none.

    ``path`` may be the ``.pt`` file, the ``_cfg.json`` file, or a directory holding the pair (``version``
    chooses among several; a directory with exactly one pair needs no ``version``). Raises when a directory
    holds several pairs and no ``version`` is given.
    """
    path = Path(path)
    if path.is_file() or (version is None and path.suffix == ".pt"):
        name = path.name
        if name.endswith(CFG_SUFFIX):
            return path.with_name(name[: -len(CFG_SUFFIX)] + ".pt"), path
        if name.endswith(".pt"):
            return path, path.with_name(name[: -len(".pt")] + CFG_SUFFIX)
        return None
    if not path.is_dir():
        return None
    if version is not None:
        pt, cfg = kissane_paths(path, version)
        return (pt, cfg) if pt.exists() or cfg.exists() else None
    pairs = sorted(c for c in path.glob(f"*{CFG_SUFFIX}") if c.with_name(c.name[: -len(CFG_SUFFIX)] + ".pt").exists())
    if not pairs:
        return None
    if len(pairs) > 1:
        names = [c.name[: -len(CFG_SUFFIX)] for c in pairs]
        raise CheckpointError(f"{path} holds {len(pairs)} Kissane checkpoints {names[:5]}: pass version=")
    cfg = pairs[0]
    return cfg.with_name(cfg.name[: -len(CFG_SUFFIX)] + ".pt"), cfg


def load_kissane(
    source: str | Path | None = None,
    *,
    version: str | int | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
) -> SAE:
    """Load a Kissane-style concat-``z`` SAE.

    Local: ``source`` is the ``.pt`` file, its ``_cfg.json``, or a directory (with ``version`` when it holds
    several pairs; ``version`` may contain sub-folders). Hub: leave ``source`` out and give ``version`` (and
    ``repo_id``, default ``ckkissane/tinystories-1M-SAES``); files are fetched with
    ``huggingface_hub.hf_hub_download`` (``cache_dir``, ``revision``, ``local_files_only`` are passed through).
    """
    if source is not None and repo_id is not None:
        raise InputError("pass either a local source or repo_id, not both")
    if source is None:
        if version is None:
            raise InputError("load_kissane needs a local source or a hub version (e.g. version='.../gelu-2l_..._v78')")
        pt, cfg = _download(repo_id or DEFAULT_REPO_ID, str(version), revision, cache_dir, local_files_only)
        where = {"repo_id": repo_id or DEFAULT_REPO_ID, "version": str(version)}
        if revision is not None:
            where["revision"] = revision
        return read_kissane(pt, cfg, device=device, where=where)
    pair = find_kissane_pair(as_path(source), version)
    if pair is None:
        if not Path(source).exists():
            raise CheckpointNotFoundError(f"Kissane checkpoint not found: {source}")
        suffix = f" for version {version!r}" if version is not None else ""
        raise CheckpointError(f"{source} holds no Kissane '{{version}}.pt' + '{{version}}_cfg.json' pair{suffix}")
    return read_kissane(*pair, device=device)


def _download(repo_id: str, version: str, revision, cache_dir, local_files_only) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    paths = []
    for filename in (f"{version}.pt", f"{version}{CFG_SUFFIX}"):
        try:
            paths.append(
                Path(
                    hf_hub_download(
                        repo_id,
                        filename=filename,
                        revision=revision,
                        cache_dir=None if cache_dir is None else str(cache_dir),
                        local_files_only=local_files_only,
                    )
                )
            )
        except Exception as err:  # EntryNotFound, RepositoryNotFound, LocalEntryNotFound, HTTP errors
            raise CheckpointNotFoundError(
                f"could not fetch {filename!r} from the hub repo {repo_id!r}: {type(err).__name__}: {err}"
            ) from err
    return paths[0], paths[1]


def read_kissane(
    pt_path: str | Path,
    cfg_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    where: Mapping[str, Any] | None = None,
) -> SAE:
    """Build the SAE from an explicit ``(.pt, _cfg.json)`` pair (both must exist)."""
    pt_path, cfg_path = Path(pt_path), Path(cfg_path)
    cfg = read_json(cfg_path, "Kissane config")
    d_in = config_int(cfg, "act_size", cfg_path)
    d_sae = config_int(cfg, "dict_size", cfg_path)
    hook_name = config_str(cfg, "act_name", cfg_path)
    dtype = _enc_dtype(cfg, cfg_path)
    version = pt_path.name[: -len(".pt")] if pt_path.name.endswith(".pt") else pt_path.stem
    layer = resolve_layer(cfg.get("layer"), hook_name, cfg_path, "layer")
    model_name = cfg.get("model_name")
    if not isinstance(model_name, str) or not model_name:
        match = _NAME_MODEL.match(version)
        if match is None:
            raise CheckpointError(f"{cfg_path} lacks model_name and the version name {version!r} does not encode one")
        model_name = match.group("model")

    tensors = read_torch_state_dict(pt_path, "Kissane state dict")
    check_sae_tensors(tensors, pt_path, d_in=d_in, d_sae=d_sae, dtype=dtype)
    moved = {k: tensors[k].to(device) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    provenance = {
        "format": "kissane",
        "source": str(pt_path),
        "files": [str(pt_path), str(cfg_path)],
        "version": version,
        "cfg": cfg,
        **dict(where or {}),
    }
    if "repo_id" in provenance:  # the hub reference load_sae reads back (see hub.py)
        revision = provenance.get("revision")
        repo = provenance["repo_id"] + (f"@{revision}" if revision else "")
        provenance["source"] = f"hf://{repo}/{provenance['version']}"
    return SAE(
        **moved,
        apply_b_dec_to_input=True,
        hook_name=hook_name,
        layer=layer,
        head=_head(cfg, cfg_path),
        model_name=model_name,
        provenance=provenance,
    )


def _enc_dtype(cfg: Mapping[str, Any], path: Path) -> torch.dtype | None:
    if "enc_dtype" not in cfg:
        return None  # very old runs: accept the tensors' own dtype
    name = cfg["enc_dtype"]
    if name not in ENC_DTYPES:
        raise CheckpointError(f"{path}: enc_dtype must be one of {sorted(ENC_DTYPES)}, got {name!r}")
    return ENC_DTYPES[name]


def _head(cfg: Mapping[str, Any], path: Path) -> int | str:
    head, concat = cfg.get("head"), cfg.get("concat_heads")
    if head == "cat" or (head is None and concat is not False):
        return CONCATENATED
    if head is None:
        raise CheckpointError(f"{path}: concat_heads is false but no head index is given")
    if concat is True:
        raise CheckpointError(f"{path}: concat_heads is true but head is {head!r}, not 'cat'")
    if isinstance(head, int) and not isinstance(head, bool) and head >= 0:
        return head
    if isinstance(head, str) and head.isdigit():
        return int(head)
    raise CheckpointError(f"{path}: head must be 'cat' or a head index, got {head!r}")


def save_kissane(
    sae: SAE,
    directory: str | Path,
    version: str | int,
    cfg_extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``sae`` as ``directory/{version}.pt`` + ``directory/{version}_cfg.json`` (sub-folders of
    ``version`` are created). Returns ``(pt_path, cfg_path)``.

    The format always subtracts ``b_dec`` from the input; an SAE with ``apply_b_dec_to_input=False`` is
    written in the equivalent form ``b_enc' = b_enc + b_dec @ W_enc`` (exact).
    """
    if not isinstance(sae, SAE):
        raise InputTypeError(f"sae must be a sparsedecomp SAE, got {type(sae).__name__}")
    if sae.activation.kind != "relu":
        raise InputError(f"the Kissane format stores ReLU SAEs; this SAE is {sae.activation.describe()}: write it "
                         "with save_saelens6")
    names = {v: k for k, v in ENC_DTYPES.items()}
    if sae.dtype not in names:
        raise InputError(f"the Kissane format stores fp32/fp16/bf16 weights; cast the {sae.dtype} SAE with .to(dtype=...)")
    pt_path, cfg_path = kissane_paths(directory, version)
    b_enc = sae.b_enc if sae.apply_b_dec_to_input else sae.b_enc + sae.b_dec @ sae.W_enc
    state = {
        "W_enc": sae.W_enc.detach().cpu().contiguous(),
        "W_dec": sae.W_dec.detach().cpu().contiguous(),
        "b_enc": b_enc.detach().cpu().contiguous(),
        "b_dec": sae.b_dec.detach().cpu().contiguous(),
    }
    hook_name, layer = sae.require_hook("writing a Kissane checkpoint")
    if not (sae.head == CONCATENATED or isinstance(sae.head, int)):
        raise InputError(f"the Kissane format stores concatenated-z or one-head SAEs; this SAE's head is {sae.head!r}")
    head = "cat" if sae.head == CONCATENATED else sae.head
    cfg: dict[str, Any] = {
        "seed": 49,
        "batch_size": 4096,
        "buffer_mult": 384,
        "lr": 1e-3,
        "num_tokens": 0,
        "l1_coeff": 0.0,
        "beta1": 0.9,
        "beta2": 0.99,
        "dict_mult": max(1, sae.d_sae // sae.d_in),
        "seq_len": 128,
        "enc_dtype": names[sae.dtype],
        "model_name": sae.model_name,
        "site": "z",
        "layer": layer,
        "device": "cpu",
        "head": head,
        "concat_heads": head == "cat",
        "act_name": hook_name,
        "act_size": sae.d_in,
        "dict_size": sae.d_sae,
        "name": str(version).rsplit("/", 1)[-1],
    }
    if not sae.apply_b_dec_to_input:
        cfg["converted_apply_b_dec_to_input_false"] = True
    if sae.transformations:
        cfg["sparsedecomp_transformations"] = list(sae.transformations)
    clash = sorted(set(cfg_extra or {}) & {"act_size", "dict_size", "enc_dtype", "act_name"})
    if clash:
        raise InputError(f"cfg_extra may not override {clash}: they are determined by the SAE's weights")
    cfg.update(dict(cfg_extra or {}))
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, pt_path)
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return pt_path, cfg_path
