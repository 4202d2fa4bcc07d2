"""A small but genuine model-and-SAEs world shipped with the package (see ``python -m sparsedecomp.demo.build``).

``load_demo_world()`` returns a 2-layer gelu-2l-like transformer trained on Python's own docs and standard library,
its tokenizer, held-out tokens, eight per-head BatchTopK SAEs on layer 1 ``hook_z`` (SAELens 6 folders, as
``sparsedecomp train-heads`` writes them) and one concatenated-z ReLU SAE (Kissane's file pair), all trained in one
pass with SAELens's trainer; and planted worlds (``build_planted_world``: per-head dictionaries and concat features
made from known atoms, for scoring solvers on recovering the truth). Importing this package loads nothing.
"""

from ..lazy import lazy_exports
from .layout import ARTIFACTS_DIR
from .world import DemoWorld, demo_tokens, load_demo_world

# Planted problems, worlds and recovery scores (sparsedecomp.demo.planted, .planted_world, .recovery) load on first use,
# so that `python -m sparsedecomp.demo.planted_world` does not find its module already imported by this package.
_PLANTED = {
    **{name: ".planted" for name in ("MixedProblem", "PlantedConfig", "PlantedProblem", "SIZES", "make_planted",
                                     "mix_planted")},
    **{name: ".planted_world" for name in ("PlantedTruth", "PlantedWorld", "build_planted_world",
                                           "load_planted_world", "write_planted_world")},
    **{name: ".recovery" for name in ("RecoveryScore", "score_recovery")},
}

__all__ = ["ARTIFACTS_DIR", "DemoWorld", "demo_tokens", "load_demo_world", *sorted(_PLANTED)]

__getattr__, __dir__ = lazy_exports(__name__, _PLANTED, globals())
