"""PLACEHOLDER: being written."""
from dataclasses import dataclass
from .base import Solver


@dataclass(frozen=True)
class NNLS(Solver):
    nonnegative: bool = False


@dataclass(frozen=True)
class Lasso(Solver):
    nonnegative: bool = False
