"""One naming scheme for a layer's SAEs, and one parser for it.

Every output keys SAEs the same way: ``concat`` for the concatenated-``z`` SAE and ``head_<h>`` for head ``h``'s
(``head_0`` ... ``head_7``); figures and tables show them in words (``head 0``, ``concat``). Splice variants that
concern one head are named ``<kind>_<h>`` after that head (``zero_head_3``, ``head_sae_3``). Names are parsed back only
here, and a name that is not of the scheme is refused rather than half-read.
"""

from __future__ import annotations

import re

from .errors import InputError

CONCAT_NAME = "concat"
_HEAD = re.compile(r"head_(0|[1-9][0-9]*)")


def head_name(head: int) -> str:
    """``head_<h>``: the key of head ``h``'s SAE."""
    if isinstance(head, bool) or not isinstance(head, int) or head < 0:
        raise InputError(f"a head index is a non-negative int, got {head!r}")
    return f"head_{head}"


def head_of(name: str) -> int:
    """The head of an SAE key ``head_<h>``; anything else (``concat`` included) is refused by name."""
    match = _HEAD.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InputError(f"{name!r} is not a per-head SAE name (head_<h>)")
    return int(match.group(1))


def is_head_name(name: str) -> bool:
    return isinstance(name, str) and _HEAD.fullmatch(name) is not None


def display_name(name: str) -> str:
    """``head 3`` / ``concat``: an SAE key in words."""
    return CONCAT_NAME if name == CONCAT_NAME else f"head {head_of(name)}"


def head_variant(kind: str, head: int) -> str:
    """The name of a per-head splice variant: ``zero_head_3`` (kind ``zero_head``), ``head_sae_3`` (``head_sae``)."""
    return f"{kind}_{head_name(head).removeprefix('head_')}"


def head_of_variant(kind: str, name: str) -> int:
    """The head of a per-head splice variant name made by :func:`head_variant`."""
    prefix = f"{kind}_"
    if not isinstance(name, str) or not name.startswith(prefix):
        raise InputError(f"{name!r} is not a {kind}_<h> splice variant")
    return head_of("head_" + name[len(prefix):])
