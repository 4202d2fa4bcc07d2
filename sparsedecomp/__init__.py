"""sparsedecomp: decompose attention-layer SAE features into per-head SAE dictionaries.

Importing the package has no side effects and does not import transformer_lens or sae_lens; loaders and
dashboards import them when used.
"""

from .decomposition import ConvergenceWarning, Decomposition, Status
from .dictionary import BlockDictionary, Dictionary, mix_targets
from .loading import SAE, HeadSAEs, load_head_saes, load_sae
from .solvers import SOLVERS, decompose, make_solver

__version__ = "0.1.0"

__all__ = [
    "BlockDictionary",
    "ConvergenceWarning",
    "Decomposition",
    "Dictionary",
    "HeadSAEs",
    "SAE",
    "SOLVERS",
    "Status",
    "decompose",
    "load_head_saes",
    "load_sae",
    "make_solver",
    "mix_targets",
]
