"""The package's one JSON module: Python values to strict JSON and back.

**To JSON** (:func:`to_jsonable`, :func:`dumps_strict`). A report dataclass holds only JSON-ready values: ``bool``,
``int``, ``float`` (non-finite floats become ``null``, as strict JSON has no NaN), ``str``, ``None``, tuples or lists
of them, ``str``-keyed mappings of them and nested report dataclasses. Tensors never go into a report: per-token or
per-feature arrays are summarised (or kept as tuples of floats when a figure needs them) before the dataclass is
built, so a report can always be written and read back. Outside reports (manifests, codes-file metadata, solver
parameters) ``arrays=True`` also converts tensors, numpy values and paths. A field may be left out of the JSON:
``metadata={"json": False}`` always, ``metadata=OMIT_IF_NONE`` when its value is ``None`` (for keys a file has only
in some runs, e.g. the residual space's).

**From JSON** (:func:`from_jsonable`): the inverse for the types the convention allows: a report dataclass,
``X | None``, ``tuple[X, ...]``, ``Mapping[str, X]``, ``bool``, ``int``, ``float``, ``str`` and ``Any`` (taken as it
is). Reading is strict, so a file whose keys drifted from the dataclasses is refused by name rather than half-read:
an unknown key, a missing key (unless the field has a default) or a value of the wrong type raises
:class:`~sparsedecomp.errors.InputError`. A ``null`` read into a ``float`` field is NaN.

**Key paths** (:func:`key_paths`) name every key a report's JSON can hold, dotted: ``results.*.features[].atoms[].head``,
where ``*`` stands for any key of a mapping and ``[]`` for any item of a list.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from .errors import InputError, InputTypeError

T = typing.TypeVar("T")
# Field metadata: leave the key out of the JSON when the value is None (instead of writing null).
OMIT_IF_NONE = {"omit_if_none": True}


def to_jsonable(value: Any, *, path: str = "report", arrays: bool = False) -> Any:
    """``value`` as plain JSON types (dataclass -> dict in field order, tuple -> list, NaN/inf -> ``None``). With
    ``arrays``, tensors / numpy arrays and scalars become lists and numbers, paths strings and mapping keys strings;
    without, anything else (a tensor, an arbitrary object) is refused naming where it sits."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), path=f"{path}.{f.name}", arrays=arrays)
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
                if not arrays:
                    raise InputTypeError(f"{path} has a non-string key {key!r}: JSON objects need string keys")
                key = str(key)
            out[key] = to_jsonable(item, path=f"{path}.{key}", arrays=arrays)
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, path=f"{path}[{i}]", arrays=arrays) for i, item in enumerate(value)]
    if arrays:
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
            return to_jsonable(value.tolist(), path=path, arrays=True)
        if hasattr(value, "item"):
            return to_jsonable(value.item(), path=path, arrays=True)
    raise InputTypeError(f"{path} holds a {type(value).__name__}, which is not JSON-ready (summarise it first)")


def dumps_strict(value: Any, *, indent: int | None = None) -> str:
    """JSON text that every parser accepts: non-finite floats become ``null``, tensors become lists
    (:func:`to_jsonable` with ``arrays=True``)."""
    separators = None if indent is not None else (",", ":")
    return json.dumps(to_jsonable(value, path="value", arrays=True), indent=indent, separators=separators,
                      allow_nan=False)


def from_jsonable(cls: type[T], data: Any, *, path: str = "report") -> T:
    """The ``cls`` report dataclass whose :func:`to_jsonable` form is ``data``."""
    return _read(cls, data, path)


def key_paths(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every key path of the JSON of the report dataclass ``cls``, in field order (see the module docstring)."""
    paths: list[str] = []
    for name, tp in _fields(cls):
        path = f"{prefix}{name}"
        paths.append(path)
        paths.extend(_nested_paths(tp, path))
    return tuple(paths)


def _nested_paths(tp: Any, path: str) -> list[str]:
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return list(key_paths(tp, f"{path}."))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple or origin is list:
        return _nested_paths(args[0], f"{path}[]")
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return [f"{path}.*", *_nested_paths(args[1], f"{path}.*")]
    return []


@lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(name, type)`` of the fields written to JSON (cached: resolving the annotations is slow)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("json", True))


@lru_cache(maxsize=None)
def _optional_fields(cls: type) -> frozenset[str]:
    """The fields with a default, which a JSON object may leave out."""
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _read(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        return _read(_strip_optional(tp), value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise InputError(f"{path} must be an object, got {type(value).__name__}")
        fields = dict(_fields(tp))
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise InputError(f"{path} has unknown keys {unknown} (a {tp.__name__} has {list(fields)})")
        missing = [name for name in fields if name not in value and name not in _optional_fields(tp)]
        if missing:
            raise InputError(f"{path} lacks the keys {missing}")
        return tp(**{name: _read(fields[name], value[name], f"{path}.{name}") for name in fields if name in value})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple or origin is list:
        if not isinstance(value, list):
            raise InputError(f"{path} must be a list, got {type(value).__name__}")
        return tuple(_read(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise InputError(f"{path} must be an object, got {type(value).__name__}")
        return {key: _read(args[1], item, f"{path}.{key}") for key, item in value.items()}
    if tp is float:
        if value is None:
            return float("nan")  # written as null because it was not finite
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str) and isinstance(value, tp):
        return value
    raise InputError(f"{path} must be a {getattr(tp, '__name__', tp)}, got {value!r:.60}")
