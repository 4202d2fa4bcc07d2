"""PLACEHOLDER: being written."""
from dataclasses import dataclass
from .base import Solver


@dataclass(frozen=True)
class OMP(Solver):
    nonnegative: bool = False
