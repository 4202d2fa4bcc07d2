"""SAELens pretrained releases by name: ``SAE.from_pretrained(release, sae_id)`` through SAELens's own registry and
conversion functions (hub files fetched with ``huggingface_hub``, so its cache and ``HF_HUB_OFFLINE`` apply).

Three attention releases are known by their facts (``docs/releases.md`` has a worked example of each):

* ``gpt2-small-hook-z-kk`` (Kissane et al.; conversion ``connor_rob_hook_z``): ``{version}.pt`` + ``{version}_cfg.json``
  pairs, read with our ``weights_only=True`` loader; ``blocks.L.attn.hook_z`` of gpt2-small, d_in 768 = 12 x 64.
* ``gemma-scope-2b-pt-att`` and the other Gemma Scope releases (conversion ``gemma_2``): ``params.npz`` per SAE
  folder; JumpReLU; ``blocks.L.attn.hook_z`` of gemma-2-2b, d_in 2048 = 8 query heads x 256.
* ``gemma-scope-2-270m-pt-att`` and the other Gemma Scope 2 releases (conversion ``gemma_3``): ``config.json`` +
  ``params.safetensors`` per SAE folder; JumpReLU; ``attn_out`` folders read ``model.layers.L.self_attn.o_proj.input``
  = ``blocks.L.attn.hook_z`` of gemma-3-270m, d_in 1024 = 4 query heads x 256.

Model processing. SAELens's ``gemma_2`` / ``gemma_3`` conversion functions record no ``model_from_pretrained_kwargs``
(nor does ``connor_rob_hook_z``), yet processing changes ``hook_z`` (``fold_value_biases`` moves ``b_V`` out of it).
Where SAELens records none, the release's recorded facts decide (:data:`RELEASE_MODEL_PROCESSING`, by conversion
function): Gemma Scope 1 and 2 were trained on the unprocessed model (Google's JAX activations of the Hugging Face
weights; SAELens's and Gemma Scope's tutorials load it with ``HookedTransformer.from_pretrained_no_processing``), so
their SAEs record every processing flag off; Kissane et al. loaded gpt2-small with ``HookedTransformer.from_pretrained``
(TransformerLens's default processing), so that release records the default flags. Any other release keeps what
SAELens records (``None`` when nothing: sparsedecomp does not guess).

Offline Gemma Scope 2. SAELens's ``gemma_3`` config reads the tensor shapes from the ``params.safetensors`` header
with HTTP range requests, which fail offline even when the file is cached. While a release loads here, that lookup
reads the header of the cached file when the hub cache holds it (the same bytes), and asks the hub otherwise.

Refusals. SAEs the package cannot represent are refused by name, before their weights are fetched where SAELens's
config says what they are (``saelens6.UNREPRESENTABLE``): transcoders and skip transcoders (they read one hook and
write another), temporal SAEs, matching-pursuit SAEs and AbsTopK SAEs. An SAE on another hook (``hook_resid_post``,
``hook_attn_out``, ...) loads -- it is a valid SAE -- and is refused where a concatenated-``z`` SAE is required
(:func:`sparsedecomp.loading.check_compatible`).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Mapping

import torch

from .errors import CheckpointError, CheckpointNotFoundError, UnsupportedCheckpointError
from .files import DTYPE_NAMES
from .models import ProcessingFlags
from .sae import SAE
from .saelens6 import SUPPORTED_ARCHITECTURES, UNREPRESENTABLE, from_saelens
from ..errors import InputError

# Releases whose files are Kissane-style (.pt + _cfg.json) checkpoints: read them with our safe loader.
_KISSANE_CONVERSIONS = ("connor_rob_hook_z",)

RELEASE_MODEL_PROCESSING: dict[str, tuple[ProcessingFlags, str]] = {
    "connor_rob_hook_z": (
        ProcessingFlags(),
        "Kissane et al. trained on HookedTransformer.from_pretrained('gpt2-small') (default processing)",
    ),
    "gemma_2": (
        ProcessingFlags.none(),
        "Gemma Scope was trained on the unprocessed model (HookedTransformer.from_pretrained_no_processing)",
    ),
    "gemma_3": (
        ProcessingFlags.none(),
        "Gemma Scope 2 was trained on the unprocessed model (HookedTransformer.from_pretrained_no_processing)",
    ),
}
"""Per SAELens conversion function: the TransformerLens processing the release's SAEs were trained with, and why
(used only where SAELens records no ``model_from_pretrained_kwargs``)."""


# SAELens conversion functions that only ever produce transcoders: refused before anything is fetched.
_TRANSCODER_CONVERSIONS = {
    "gemma_2_transcoder": "jumprelu_transcoder",
    "mwhanna_transcoder": "transcoder",
    "mntss_clt_layer_transcoder": "transcoder",
    "temporal": "temporal",
}


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
    ``model_from_pretrained_kwargs``: see the module docstring. Architectures in ``saelens6.UNREPRESENTABLE`` are
    refused (:class:`UnsupportedCheckpointError`) naming what the SAE is.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    if dtype not in DTYPE_NAMES:
        raise InputError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    lookup = get_pretrained_saes_directory().get(release)
    where = {"release": release, "sae_id": sae_id}
    reference = f"saelens://{release}/{sae_id}"
    conversion = None if lookup is None else (lookup.conversion_func or "sae_lens")
    if lookup is not None and sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        raise CheckpointError(f"sae_id {sae_id!r} is not in release {release!r} ({len(ids)} ids: {ids[:5]} ...)")
    if conversion in _TRANSCODER_CONVERSIONS:
        _refuse(_TRANSCODER_CONVERSIONS[conversion], reference, f"SAELens conversion {conversion!r}")
    if conversion in _KISSANE_CONVERSIONS:
        from .kissane import load_kissane

        path = lookup.saes_map[sae_id]
        version = path[: -len(".pt")] if path.endswith(".pt") else path
        sae = load_kissane(version=version, repo_id=lookup.repo_id, device=device)
        if sae.dtype != DTYPE_NAMES[dtype]:
            sae = sae.to(dtype=DTYPE_NAMES[dtype])
        sae = _with_provenance(sae, {**where, "source": reference})
        return _with_release_processing(sae, conversion)
    from sae_lens import SAE as LensSAE

    with cached_safetensors_shapes():
        if lookup is not None:
            _refuse_by_config(release, sae_id, reference, force_download)
        try:
            obj, cfg_dict, log_sparsity = LensSAE.from_pretrained_with_cfg_and_sparsity(
                release, sae_id, device=str(device), dtype=dtype, force_download=force_download
            )
        except (CheckpointError, InputError):
            raise
        except Exception as err:
            raise CheckpointError(
                f"SAELens could not load release {release!r}, sae_id {sae_id!r}: {type(err).__name__}: {err}"
            ) from err
    architecture = obj.cfg.architecture()
    if architecture in UNREPRESENTABLE:
        _refuse(architecture, reference, "SAELens")
    repo = lookup.repo_id if lookup is not None else release
    sae = from_saelens(
        obj,
        provenance={"source": reference, "repo_id": repo, "conversion_func": conversion, **where},
        log_sparsity=log_sparsity,
    )
    return _with_release_processing(sae, conversion)


def _refuse(architecture: str, reference: str, said_by: str) -> None:
    what = UNREPRESENTABLE.get(architecture, f"a {architecture!r} SAE")
    raise UnsupportedCheckpointError(
        f"{reference} is {what} (architecture {architecture!r}, per {said_by}); this package represents "
        f"{list(SUPPORTED_ARCHITECTURES)}"
    )


def _refuse_by_config(release: str, sae_id: str, reference: str, force_download: bool) -> None:
    """Refuse an unrepresentable architecture from SAELens's config alone (before the weights are fetched). A config
    SAELens cannot build is left to the full load, which reports it."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    try:
        cfg = load_sae_config_from_huggingface(release, sae_id, force_download=force_download)
    except CheckpointNotFoundError:
        raise
    except Exception:  # noqa: BLE001 -- the full load below names the problem with SAELens's own message
        return
    architecture = cfg.get("architecture")
    if architecture in UNREPRESENTABLE:
        facts = {**cfg, **(cfg.get("metadata") or {})}  # SAELens 6 nests the hooks under "metadata"
        hooks = " -> ".join(str(facts[k]) for k in ("hook_name", "hook_name_out") if facts.get(k))
        _refuse(architecture, reference, "SAELens's config" + (f"; hooks {hooks}" if hooks else ""))


def _with_release_processing(sae: SAE, conversion: str | None) -> SAE:
    """Record the release's model processing (:data:`RELEASE_MODEL_PROCESSING`) where SAELens records none."""
    if sae.model_from_pretrained_kwargs is not None or conversion not in RELEASE_MODEL_PROCESSING:
        return sae
    flags, why = RELEASE_MODEL_PROCESSING[conversion]
    return _with_provenance(sae, {
        "model_from_pretrained_kwargs": flags.as_kwargs(),
        "model_processing_note": f"recorded by sparsedecomp from the release's facts (SAELens records none): {why}",
    })


def _with_provenance(sae: SAE, extra: Mapping[str, Any]) -> SAE:
    return replace(sae, provenance={**sae.provenance, **dict(extra)})


# -- Gemma Scope 2 shapes from the hub cache ------------------------------------------------------------------------
_SHAPES_LOCK = threading.RLock()


@contextmanager
def cached_safetensors_shapes() -> Iterator[None]:
    """While inside, SAELens's ``get_safetensors_tensor_shapes(repo_id, filename)`` (HTTP range requests) reads the
    header of the hub cache's copy of the file when there is one, and asks the hub otherwise; offline and uncached,
    it raises :class:`CheckpointNotFoundError` naming the file. One thread at a time patches SAELens's module."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    with _SHAPES_LOCK:
        original = loaders.get_safetensors_tensor_shapes

        def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
            path = _cached_file(repo_id, filename)
            if path is not None:
                return read_safetensors_shapes(path)
            import huggingface_hub.constants as constants

            if constants.HF_HUB_OFFLINE:
                raise CheckpointNotFoundError(
                    f"{filename!r} of the hub repo {repo_id!r} is not in the Hugging Face cache and the hub is offline "
                    "(HF_HUB_OFFLINE): SAELens needs its tensor shapes"
                )
            return original(repo_id, filename)

        loaders.get_safetensors_tensor_shapes = shapes
        try:
            yield
        finally:
            loaders.get_safetensors_tensor_shapes = original


def _cached_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def read_safetensors_shapes(path: str) -> dict[str, list[int]]:
    """``{name: shape}`` from a safetensors file's header (what SAELens's range requests read), without the data."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), byteorder="little")
        try:
            header = json.loads(handle.read(size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}
