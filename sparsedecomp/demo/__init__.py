"""A small but genuine model-and-SAEs world shipped with the package (see ``python -m sparsedecomp.demo.build``).

``load_demo_world()`` returns a 2-layer gelu-2l-like transformer trained on Python's own docs and standard library,
its tokenizer, held-out tokens, eight per-head SAEs on layer 1 ``hook_z`` (April 2024 recipe, legacy SAELens
layout) and one concatenated-z SAE (Kissane recipe). Importing this package loads nothing.
"""

from .layout import ARTIFACTS_DIR
from .world import DemoWorld, demo_tokens, load_demo_world

__all__ = ["ARTIFACTS_DIR", "DemoWorld", "demo_tokens", "load_demo_world"]
