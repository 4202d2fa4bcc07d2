"""Hub references: one string that names a checkpoint on the Hugging Face hub, accepted wherever a local path is.

Two schemes (the ``source`` strings that ``load_sae`` and ``load_head_saes`` take, and so the CLI's
``--concat-sae`` / ``--head-saes``):

* ``hf://OWNER/REPO[@REVISION]/VERSION`` -- a Kissane et al. pair ``{VERSION}.pt`` + ``{VERSION}_cfg.json`` in the
  hub repo ``OWNER/REPO``. ``VERSION`` may contain sub-folders; a trailing ``.pt`` or ``_cfg.json`` is ignored.
  Example (the seed's concat-z run)::

      hf://ckkissane/tinystories-1M-SAES/concat-z-gelu-21-l1-lr-sweep-3/gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78

* ``saelens://RELEASE/SAE_ID`` -- an SAE of a SAELens pretrained release (``SAE.from_pretrained(RELEASE,
  SAE_ID)``), e.g. ``saelens://gpt2-small-hook-z-kk/blocks.4.hook_z``. ``SAE_ID`` may contain ``/``. A hub repo
  that is not in SAELens's release directory is named by its id: ``saelens://OWNER/REPO/SAE_ID`` (the first path
  segment is taken as the release when the directory knows it, else the first two form the repo id).
  The attention releases (``docs/releases.md``): ``saelens://gpt2-small-hook-z-kk/blocks.5.hook_z``,
  ``saelens://gemma-scope-2b-pt-att/layer_5/width_16k/average_l0_30``,
  ``saelens://gemma-scope-2-270m-pt-att/layer_12_width_16k_l0_small``; how each loads, what model processing it
  records and what is refused: :mod:`sparsedecomp.loading.releases`.

Files are fetched with ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, tokens and revisions apply); a
loaded SAE's ``provenance["source"]`` is its reference, so ``load_sae(sae.provenance["source"])`` loads it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .kissane import CFG_SUFFIX
from .sae import SAE
from ..errors import InputError

HF_SCHEME = "hf://"
SAELENS_SCHEME = "saelens://"
SYNTAX = "hf://OWNER/REPO[@REVISION]/VERSION (a Kissane pair) or saelens://RELEASE/SAE_ID (a SAELens release)"


@dataclass(frozen=True)
class HubReference:
    """A parsed hub reference: ``scheme`` (``"hf"`` or ``"saelens"``), ``repo`` (hub repo id, or SAELens release /
    repo id), ``path`` (Kissane version, or SAELens sae id; ``None`` when not given), ``revision`` (hf only)."""

    scheme: str
    repo: str
    path: str | None
    revision: str | None = None

    def __str__(self) -> str:
        if self.scheme == "hf":
            repo = self.repo + (f"@{self.revision}" if self.revision else "")
            return f"{HF_SCHEME}{repo}/{self.path}" if self.path else f"{HF_SCHEME}{repo}"
        return f"{SAELENS_SCHEME}{self.repo}/{self.path}"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_reference(source: Any) -> bool:
    """Whether ``source`` is a string written as a reference (``scheme://...``) rather than a local path
    (a ``Path`` object never is)."""
    return isinstance(source, str) and _SCHEME.match(source) is not None


def parse_reference(source: str) -> HubReference:
    """Parse ``hf://...`` or ``saelens://...`` (see the module docstring); anything else with ``://`` is an error
    naming the two accepted forms."""
    if not isinstance(source, str):
        raise InputError(f"a hub reference is a string, got {type(source).__name__}")
    if source.startswith(HF_SCHEME):
        return _parse_hf(source)
    if source.startswith(SAELENS_SCHEME):
        return _parse_saelens(source)
    scheme = source.split("://", 1)[0]
    raise InputError(f"unknown reference scheme {scheme + '://'!r} in {source!r}: use {SYNTAX}, or a local path")


def _parse_hf(source: str) -> HubReference:
    parts = source[len(HF_SCHEME):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]) or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"{source!r} is not a hub reference: expected {HF_SCHEME}OWNER/REPO[@REVISION]/VERSION")
    name, _, revision = parts[1].partition("@")
    if not name or (parts[1].endswith("@")):
        raise InputError(f"{source!r}: empty repository name or revision after '@'")
    version = "/".join(parts[2:]) or None
    if version is not None:
        for suffix in (".pt", CFG_SUFFIX):
            if version.endswith(suffix):
                version = version[: -len(suffix)]
    return HubReference("hf", f"{parts[0]}/{name}", version, revision or None)


def _parse_saelens(source: str) -> HubReference:
    rest = source[len(SAELENS_SCHEME):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts):
        raise InputError(f"{source!r} is not a SAELens reference: expected {SAELENS_SCHEME}RELEASE/SAE_ID")
    if parts[0] in _known_releases() or len(parts) == 2:
        return HubReference("saelens", parts[0], "/".join(parts[1:]))
    return HubReference("saelens", f"{parts[0]}/{parts[1]}", "/".join(parts[2:]))


def _known_releases() -> set[str]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return set(get_pretrained_saes_directory())


def load_reference(
    source: str | HubReference,
    *,
    version: str | int | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """Load the SAE a hub reference names. ``version`` completes an ``hf://OWNER/REPO`` reference that has none."""
    ref = source if isinstance(source, HubReference) else parse_reference(source)
    if ref.scheme == "hf":
        from .kissane import load_kissane

        if ref.path is not None and version is not None:
            raise InputError(f"{ref} already names a version; do not also pass version={version!r}")
        chosen = ref.path if ref.path is not None else version
        if chosen is None:
            raise InputError(f"{ref} names no checkpoint: expected {HF_SCHEME}OWNER/REPO/VERSION (or pass version=)")
        return load_kissane(version=str(chosen), repo_id=ref.repo, revision=ref.revision, device=device)
    if version is not None:
        raise InputError(f"version= does not apply to a SAELens reference ({ref})")
    from .releases import load_saelens_pretrained

    return load_saelens_pretrained(ref.repo, ref.path, device=device)

