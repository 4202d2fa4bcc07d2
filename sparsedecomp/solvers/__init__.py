"""Batched sparse-coding solvers and the one entry point :func:`decompose`.

The registry is a literal mapping from method name to solver class plus the fixed arguments that distinguish
variants (``lasso`` and ``nn_lasso`` are one class with ``nonnegative`` set), so that the set of methods is
readable in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ..decomposition import Decomposition
from ..dictionary import Dictionary
from .base import PreparedSolver, Solver
from ..validation import AlphaAboveMaxWarning, DegenerateInputWarning, ZeroTargetWarning
from .omp import OMP
from .pinv import Pseudoinverse
from .proximal import NNLS, Lasso
from .reference import CvxpyBPDN, CvxpyLasso, CvxpyNNLS
from ..errors import InputError, InputTypeError

SOLVERS: dict[str, tuple[type[Solver], dict[str, Any]]] = {
    "pinv": (Pseudoinverse, {}),
    "nnls": (NNLS, {}),
    "lasso": (Lasso, {"nonnegative": False}),
    "nn_lasso": (Lasso, {"nonnegative": True}),
    "omp": (OMP, {"nonnegative": False}),
    "nn_omp": (OMP, {"nonnegative": True}),
    "cvxpy_lasso": (CvxpyLasso, {"nonnegative": False}),
    "cvxpy_nn_lasso": (CvxpyLasso, {"nonnegative": True}),
    "cvxpy_nnls": (CvxpyNNLS, {}),
    "cvxpy_bpdn": (CvxpyBPDN, {}),
}


def make_solver(method: str, *positional: Any, **params: Any) -> Solver:
    """Build the solver registered as ``method`` with ``params`` (e.g. ``alpha``, ``n_nonzero``, ``tol``).

    Parameters are keyword-only: ``make_solver("nn_lasso", alpha=0.2)``. A positional value is refused by name
    (which parameter it was meant for cannot be guessed: ``0.2`` could be ``alpha`` or ``tol``)."""
    if not isinstance(method, str):
        raise InputTypeError(f"method must be a method name (str), one of {sorted(SOLVERS)}; got "
                             f"{type(method).__name__}")
    if method not in SOLVERS:
        raise InputError(f"unknown method {method!r}; choose one of {sorted(SOLVERS)}")
    cls, fixed = SOLVERS[method]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    if positional:
        raise InputTypeError(
            f"method {method!r} takes keyword parameters only ({', '.join(sorted(fields))}); got "
            f"{len(positional)} positional value(s) {list(positional)}: name each one, as in "
            f"make_solver({method!r}, <parameter>=<value>, ...)"
        )
    unknown = set(params) - set(fields)
    if unknown:
        raise InputTypeError(f"method {method!r} takes parameters {sorted(fields)}; got unexpected {sorted(unknown)}")
    missing = [name for name, f in fields.items() if name not in params
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputTypeError(f"method {method!r} needs parameter(s) {missing}; see the {cls.__name__} docstring")
    return cls(**fixed, **params)


def decompose(targets: Tensor, dictionary: Dictionary | Tensor, *positional: Any, method: str | None = None,
              progress: bool = False, **params: Any) -> Decomposition:
    """Decompose each row of ``targets`` (``(n_targets, d)``) into the atoms of ``dictionary``.

    ``method`` is one of :data:`SOLVERS`; ``params`` are that solver's parameters, each meaning one thing:
    ``alpha`` (L1 weight), ``n_nonzero`` (OMP budget), ``tol`` (stopping tolerance), ``max_iter``, ``eps``
    (BPDN residual bound), ``chunk_size``. ``progress`` shows a bar advancing per solved chunk. Returns a
    :class:`~sparsedecomp.Decomposition`.

    To solve several batches against one dictionary, prepare once:
    ``prepared = make_solver(method, **params).prepare(dictionary)``, then ``prepared.solve(batch)`` per batch.
    """
    if positional or method is None:
        given = f"; got positional value(s) {list(positional)}" if positional else ""
        raise InputTypeError(f"decompose takes targets and dictionary positionally, then method= and the method's "
                             f"parameters by keyword, e.g. decompose(targets, dictionary, method='nn_lasso', "
                             f"alpha=0.2){given}")
    return make_solver(method, **params).solve(targets, dictionary, progress=progress)


__all__ = ["SOLVERS", "Solver", "PreparedSolver", "make_solver", "decompose", "Pseudoinverse", "NNLS", "Lasso", "OMP",
           "CvxpyLasso", "CvxpyNNLS", "CvxpyBPDN", "DegenerateInputWarning", "ZeroTargetWarning",
           "AlphaAboveMaxWarning"]
