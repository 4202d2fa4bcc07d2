"""The planted problems now live in the package (:mod:`sparsedecomp.demo.planted`); this module re-exports them so
that ``from benchmarks.planted import ...`` keeps working."""

from sparsedecomp.demo.planted import (SIZES, MixedProblem, PlantedConfig, PlantedProblem, make_planted, mix_planted,
                                       planted_dense, random_W_O)

__all__ = ["SIZES", "MixedProblem", "PlantedConfig", "PlantedProblem", "make_planted", "mix_planted", "planted_dense",
           "random_W_O"]
