"""PLACEHOLDER: being written."""
from dataclasses import dataclass
from .base import Solver


@dataclass(frozen=True)
class CvxpyBPDN(Solver):
    nonnegative: bool = False


@dataclass(frozen=True)
class CvxpyLasso(Solver):
    nonnegative: bool = False


@dataclass(frozen=True)
class CvxpyNNLS(Solver):
    nonnegative: bool = False
