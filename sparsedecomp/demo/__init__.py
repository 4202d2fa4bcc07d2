"""A small but genuine model-and-SAEs world shipped with the package (see ``python -m sparsedecomp.demo.build``).

``load_demo_world()`` returns a 2-layer gelu-2l-like transformer trained on Python's own docs and standard library,
its tokenizer, held-out tokens, eight per-head SAEs on layer 1 ``hook_z`` (April 2024 recipe, legacy SAELens
layout) and one concatenated-z SAE (Kissane recipe). Importing this package loads nothing.
"""

from ..lazy import lazy_exports
from .layout import ARTIFACTS_DIR
from .world import DemoWorld, demo_tokens, load_demo_world

# Planted worlds (sparsedecomp.demo.planted) load on first use, so that `python -m sparsedecomp.demo.planted` does not
# find its module already imported by this package.
_PLANTED = {name: ".planted" for name in (
    "MixedProblem", "PlantedConfig", "PlantedProblem", "PlantedTruth", "PlantedWorld", "RecoveryScore", "SIZES",
    "build_planted_world", "load_planted_world", "make_planted", "mix_planted", "score_recovery",
    "write_planted_world")}

__all__ = ["ARTIFACTS_DIR", "DemoWorld", "demo_tokens", "load_demo_world", *sorted(_PLANTED)]

__getattr__, __dir__ = lazy_exports(__name__, _PLANTED, globals())
