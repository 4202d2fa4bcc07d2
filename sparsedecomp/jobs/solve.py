"""The one decomposition driver: every command that decomposes (``decompose``, ``evaluate``, ``dashboard``,
``demo``) asks it, and each solver setting is solved once per run.

The problem, in each space:

* **z** (concatenated ``hook_z``): targets are the concat SAE's decoder rows ``t_i = W_dec[i] / ||W_dec[i]||``; the
  dictionary is the per-head decoders lifted block-diagonally, with unit atoms (``head_saes.dictionary(normalize=
  True)``), so a coefficient weighs a unit per-head feature direction;
* **residual** (after the layer's ``W_O``): atoms ``d_j @ W_O[h]``, targets ``t_i @ W_O_cat`` renormalised to unit
  norm, so the two spaces ask the same question at the same scale (``||t_i @ W_O_cat||`` is returned beside them).

Norms are taken after dividing each row by its largest magnitude, so rows of any finite size (1e30, the float
maximum) give the same unit direction as a row of size 1, instead of overflowing to ``inf`` and a zero target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from ..decomposition import Decomposition
from ..decomposition_report import NormRange, TargetsNote
from ..dictionary import Dictionary, mix_targets
from ..errors import InputError
from ..solver_settings import SolverSetting, unique_labels
from ..solvers import SOLVERS, make_solver

DEFAULT_METHOD = "nn_omp"
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "nn_omp": {"n_nonzero": 16, "tol": 0.01},
    # A fraction of each target's alpha_max: comparable across targets and across the z and residual spaces.
    "lasso": {"alpha_is_fraction_of_max": True},
    "nn_lasso": {"alpha_is_fraction_of_max": True},
    "cvxpy_lasso": {"alpha_is_fraction_of_max": True},
    "cvxpy_nn_lasso": {"alpha_is_fraction_of_max": True},
}
DEFAULT_SETTINGS = (SolverSetting("pinv"), SolverSetting("nn_omp", {"n_nonzero": 16, "tol": 0.01}),
                    SolverSetting("nn_lasso", {"alpha": 0.2}))
"""The settings evaluated, routed and linked on the dashboards by default: the exact pseudoinverse (the consistency
check), sparse OMP and the lasso."""


def solver_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params`` over the defaults for the method (:data:`DEFAULT_PARAMS`), validated by building the solver (which
    raises :class:`~sparsedecomp.errors.InputError` naming a bad method or parameter)."""
    if method not in SOLVERS:
        raise InputError(f"unknown method {method!r}; choose one of {sorted(SOLVERS)}")
    merged = {**DEFAULT_PARAMS.get(method, {}), **{k: v for k, v in (params or {}).items() if v is not None}}
    make_solver(method, **merged)
    return merged


def unit_rows(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(matrix / ||row||, ||row||)`` computed without overflow: each row is first divided by its largest
    magnitude ``m``, so ``||row|| = m ||row / m||`` and the unit row never passes through ``inf``. Non-finite entries
    are refused by row; zero rows give zero norms (and zero unit rows)."""
    finite = torch.isfinite(matrix).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise InputError(f"rows {bad[:5]}{'...' if len(bad) > 5 else ''} hold NaN or infinite values")
    peak = matrix.abs().amax(dim=1, keepdim=True)
    scaled = matrix / peak.clamp_min(torch.finfo(matrix.dtype).tiny)
    scaled_norm = scaled.norm(dim=1, keepdim=True)
    unit = scaled / scaled_norm.clamp_min(torch.finfo(matrix.dtype).tiny)
    # The norm itself in float64, where m * ||row / m|| does not overflow for any float32 row.
    norms = (peak.double() * scaled_norm.double()).flatten()
    return unit, norms


def concat_targets(concat_sae: Any) -> tuple[Tensor, TargetsNote]:
    """Unit-norm concat decoder rows and a note on their original norms; all-zero rows are refused by index."""
    unit, norms = unit_rows(concat_sae.W_dec)
    zero_rows = (norms == 0).nonzero().flatten().tolist()
    if zero_rows:
        raise InputError(f"the concat SAE has {len(zero_rows)} all-zero decoder rows ({zero_rows[:5]}"
                         f"{'...' if len(zero_rows) > 5 else ''}); they cannot be decomposed")
    unit_already = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
    note = TargetsNote(decoder_already_unit_norm=unit_already, norm_min=float(norms.min()),
                       norm_mean=float(norms.mean()), norm_max=float(norms.max()), zero_rows=0)
    return unit, note


@dataclass(frozen=True, eq=False)
class SpaceProblem:
    """Targets and dictionary of one space; ``target_norms`` are the residual targets' norms before they were made
    unit (``None`` in ``z``)."""

    space: str
    targets: Tensor
    dictionary: Dictionary
    target_norms: Tensor | None = None

    def norm_range(self) -> NormRange | None:
        if self.target_norms is None:
            return None
        n = self.target_norms
        return NormRange(min=float(n.min()), mean=float(n.mean()), max=float(n.max()))


@dataclass(frozen=True, eq=False)
class Solved:
    """One setting's decomposition, with the problem it solved and how long it took."""

    setting: SolverSetting
    params: Mapping[str, Any]
    problem: SpaceProblem
    decomposition: Decomposition
    seconds: float


class Decomposer:
    """Decomposes the selected concat features into the per-head dictionaries, each setting at most once.

    ``W_O`` (``(n_heads, d_head, d_model)``) is needed for residual-space settings; ``features`` selects concat
    features by index (all by default). :meth:`solve` returns a cached :class:`Solved` when the same setting (same
    method, parameters after defaults, and space) was solved before in this run.
    """

    def __init__(self, concat_sae: Any, head_saes: Any, *, W_O: Tensor | None = None,
                 features: Tensor | None = None) -> None:
        self.dictionary = head_saes.dictionary(normalize=True)
        targets, self.targets_note = concat_targets(concat_sae)
        self.n_concat_features = int(targets.shape[0])
        self.unit_decoder = targets  # every feature's unit direction (the concat decoder's rank is of all of them)
        self.feature_ids = torch.arange(targets.shape[0]) if features is None else features
        self.targets = targets[self.feature_ids].to(self.dictionary.dtype)
        self.layer = concat_sae.layer
        self.W_O = None if W_O is None else W_O.to(device=self.dictionary.device, dtype=self.dictionary.dtype)
        self._problems: dict[str, SpaceProblem] = {}
        self._solved: dict[str, Solved] = {}

    def problem(self, space: str) -> SpaceProblem:
        """The targets and dictionary of ``space`` (built once)."""
        if space not in self._problems:
            if space == "z":
                self._problems[space] = SpaceProblem("z", self.targets, self.dictionary)
            elif space == "residual":
                if self.W_O is None:
                    raise InputError(f"the residual space needs W_O: give a model so that W_O of layer {self.layer} "
                                     "is known")
                mixed, norms = unit_rows(mix_targets(self.targets, self.W_O))
                self._problems[space] = SpaceProblem("residual", mixed, self.dictionary.mix(self.W_O),
                                                     norms.to(mixed.dtype))
            else:
                raise InputError(f"space must be 'z' or 'residual', got {space!r}")
        return self._problems[space]

    def solve(self, setting: SolverSetting, *, progress: bool = False,
              log: Callable[[str], None] | None = None) -> Solved:
        params = solver_params(setting.method, setting.params)
        key = repr((setting.method, sorted(params.items()), setting.space))
        if key not in self._solved:
            problem = self.problem(setting.space)
            start = time.time()
            dec = make_solver(setting.method, **params).prepare(problem.dictionary).solve(
                problem.targets, progress=progress, desc=f"decompose ({setting.label})")
            self._solved[key] = Solved(setting, params, problem, dec, time.time() - start)
            if log is not None:
                solved = self._solved[key]
                log(f"decomposed {problem.targets.shape[0]:,} features with {setting.label} "
                    f"({solved.seconds:.1f}s): {dec.status_counts()}")
        return self._solved[key]

    def solve_all(self, settings: Iterable[SolverSetting], *, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Decomposition]:
        """``label -> Decomposition`` for every setting (labels must be unique)."""
        settings = unique_labels(list(settings))
        return {s.label: self.solve(s, progress=progress, log=log).decomposition for s in settings}


def decompose_settings(concat_sae: Any, head_saes: Any, settings: Iterable[SolverSetting], *,
                       W_O: Tensor | None = None, progress: bool = False,
                       log: Callable[[str], None] | None = None) -> dict[str, Decomposition]:
    """``label -> Decomposition`` of every concat feature for each setting: a one-off :class:`Decomposer`."""
    return Decomposer(concat_sae, head_saes, W_O=W_O).solve_all(settings, progress=progress, log=log)
