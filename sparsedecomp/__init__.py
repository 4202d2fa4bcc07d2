"""sparsedecomp: decompose attention-layer SAE features into per-head SAE dictionaries.

Importing the package has no side effects and imports nothing heavy: the names below are loaded on first use
(PEP 562), so ``sparsedecomp --help`` answers without importing torch, and loaders and dashboards import
transformer_lens / sae_lens only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "BlockDictionary": ".dictionary",
    "Codes": ".codes",
    "ConvergenceWarning": ".decomposition",
    "Decomposition": ".decomposition",
    "Dictionary": ".dictionary",
    "HeadSAEs": ".loading",
    "InputError": ".errors",
    "InputTypeError": ".errors",
    "PreparedSolver": ".solvers",
    "SAE": ".loading",
    "SOLVERS": ".solvers",
    "Status": ".decomposition",
    "decompose": ".solvers",
    "load_head_saes": ".loading",
    "load_sae": ".loading",
    "make_solver": ".solvers",
    "mix_targets": ".dictionary",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .codes import Codes
    from .decomposition import ConvergenceWarning, Decomposition, Status
    from .dictionary import BlockDictionary, Dictionary, mix_targets
    from .errors import InputError, InputTypeError
    from .loading import SAE, HeadSAEs, load_head_saes, load_sae
    from .solvers import SOLVERS, PreparedSolver, decompose, make_solver
