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
from .base import Solver
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


def make_solver(method: str, **params: Any) -> Solver:
    """Build the solver registered as ``method`` with ``params`` (e.g. ``alpha``, ``n_nonzero``, ``tol``)."""
    if method not in SOLVERS:
        raise InputError(f"unknown method {method!r}; choose one of {sorted(SOLVERS)}")
    cls, fixed = SOLVERS[method]
    allowed = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = set(params) - allowed
    if unknown:
        raise InputTypeError(f"method {method!r} takes parameters {sorted(allowed)}; got unexpected {sorted(unknown)}")
    return cls(**fixed, **params)


def decompose(targets: Tensor, dictionary: Dictionary | Tensor, *, method: str, **params: Any) -> Decomposition:
    """Decompose each row of ``targets`` (``(n_targets, d)``) into the atoms of ``dictionary``.

    ``method`` is one of :data:`SOLVERS`; ``params`` are that solver's parameters, each meaning one thing:
    ``alpha`` (L1 weight), ``n_nonzero`` (OMP budget), ``tol`` (stopping tolerance), ``max_iter``, ``eps``
    (BPDN residual bound), ``chunk_size``. Returns a :class:`~sparsedecomp.Decomposition`.
    """
    return make_solver(method, **params).solve(targets, dictionary)


__all__ = ["SOLVERS", "Solver", "make_solver", "decompose", "Pseudoinverse", "NNLS", "Lasso", "OMP",
           "CvxpyLasso", "CvxpyNNLS", "CvxpyBPDN"]
