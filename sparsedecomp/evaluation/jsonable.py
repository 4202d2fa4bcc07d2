"""The one convention for report dataclasses: frozen, typed, and JSON-ready through :func:`to_jsonable`.

A report dataclass holds only JSON-ready values: ``bool``, ``int``, ``float`` (non-finite floats become ``null``,
as strict JSON has no NaN), ``str``, ``None``, tuples or lists of them, ``str``-keyed mappings of them and nested
report dataclasses. Tensors never go into a report: per-token or per-feature arrays are summarised (or kept as
tuples of floats when a figure needs them) before the dataclass is built, so a report can always be written and
read back.

A field may be left out of the JSON: ``metadata={"json": False}`` always, ``metadata=OMIT_IF_NONE`` when its value
is ``None`` (for keys a file has only in some runs, e.g. the residual space's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ..errors import InputTypeError

# Field metadata: leave the key out of the JSON when the value is None (instead of writing null).
OMIT_IF_NONE = {"omit_if_none": True}


def to_jsonable(value: Any, *, path: str = "report") -> Any:
    """``value`` as plain JSON types (dataclass -> dict in field order, tuple -> list, NaN/inf -> ``None``);
    anything else (a tensor, an arbitrary object) is refused naming where it sits."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), path=f"{path}.{f.name}")
                for f in dataclasses.fields(value) if f.metadata.get("json", True)
                and not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputTypeError(f"{path} has a non-string key {key!r}: JSON objects need string keys")
            out[key] = to_jsonable(item, path=f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, path=f"{path}[{i}]") for i, item in enumerate(value)]
    raise InputTypeError(f"{path} holds a {type(value).__name__}, which is not JSON-ready (summarise it first)")
