"""A solver setting: a method, its parameters and the label it is reported under.

Evaluation compares several decompositions side by side (``routed_<label>`` splice variants, attribution and
faithfulness per setting), so each needs a short, unique, stable label. A setting is written on the command line as
``METHOD[:NAME=VALUE,...][@SPACE]``, e.g. ``pinv``, ``nn_omp:n_nonzero=16,tol=0.01``, ``nn_lasso:alpha=0.2@residual``.
The label is the method, then the parameters given (not the defaults filled in), then the space when it is not
``z``: ``nn_omp``, ``nn_omp_n_nonzero8``, ``nn_lasso_alpha0.2_residual``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InputError

SETTING_SPACES = ("z", "residual")
_VALUE = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class SolverSetting:
    """``method`` with ``params`` (as given: the decomposition driver's defaults are added when the solver is built) in
    ``space`` (``"z"``: concatenated z; ``"residual"``: after ``W_O``)."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    space: str = "z"

    def __post_init__(self) -> None:
        if self.space not in SETTING_SPACES:
            raise InputError(f"space must be one of {SETTING_SPACES}, got {self.space!r}")
        object.__setattr__(self, "params", dict(self.params))

    @property
    def label(self) -> str:
        parts = [self.method] + [f"{name}{_short(value)}" for name, value in self.params.items()]
        if self.space != "z":
            parts.append(self.space)
        return "_".join(parts)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "params": dict(self.params), "space": self.space, "label": self.label}


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_solver_setting(text: str) -> SolverSetting:
    """``"nn_lasso:alpha=0.2@residual"`` -> ``SolverSetting("nn_lasso", {"alpha": 0.2}, "residual")``; values are
    ints, floats or ``true`` / ``false``. The method and parameter names are checked when the solver is built."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"a solver setting must be METHOD[:NAME=VALUE,...][@SPACE], got {text!r}")
    body, _, space = text.strip().partition("@")
    method, _, spec = body.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, raw = item.partition("=")
        if not eq or not name.strip() or not raw.strip():
            raise InputError(f"solver setting {text!r}: {item!r} is not NAME=VALUE")
        params[name.strip()] = _value(raw.strip(), text)
    return SolverSetting(method.strip(), params, space.strip() or "z")


def _value(raw: str, text: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if not _VALUE.match(raw):
        raise InputError(f"solver setting {text!r}: {raw!r} is not a number or true/false")
    return int(raw) if re.fullmatch(r"-?\d+", raw) else float(raw)


def unique_labels(settings: list[SolverSetting]) -> list[SolverSetting]:
    """``settings`` unchanged, refused when two share a label (they would overwrite each other's results)."""
    seen: dict[str, SolverSetting] = {}
    for setting in settings:
        if setting.label in seen:
            raise InputError(f"solver settings {seen[setting.label]} and {setting} share the label {setting.label!r}")
        seen[setting.label] = setting
    return settings
