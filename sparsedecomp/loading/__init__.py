"""Loading SAE checkpoints (Kissane concat-z, legacy SAELens 1.4-2.1.3, SAELens 6) and TransformerLens models.

Every loader returns the same :class:`SAE`; ``load_sae`` picks the loader from what is on disk through the
explicit mapping :data:`LOADERS`. Importing this package imports neither ``sae_lens`` nor ``transformer_lens``;
they are imported inside the functions that need them. No loader unpickles arbitrary objects.
"""

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    HookUnknownError,
    ModelNotFoundError,
    UnsupportedCheckpointError,
)
from .files import DeadEncoderWarning
from .heads import (HeadSAEs, MissingHeadsWarning, check_compatible, check_model_matches, load_head_saes,
                    warn_if_input_scale_missing)
from .hub import HubReference, parse_reference
from .kissane import DEFAULT_REPO_ID, load_kissane, read_kissane, save_kissane
from .models import LoadedModel, ProcessingFlags, load_model, process_state_dict
from .registry import LOADERS, detect_format, load_sae
from .sae import CONCATENATED, NO_HEAD, SAE, InputScaleWarning
from .releases import load_saelens_pretrained
from .saelens6 import from_saelens, load_saelens6, save_saelens6
from .standin_models import STANDIN_BOS_TOKEN_ID, standin_config, write_standin_model, write_standin_tokenizer
from .saelens_legacy import (CheckpointChoiceWarning, choose_checkpoint, find_legacy_sae_dir, load_legacy_saelens,
                             save_legacy_saelens)
from .scaling import (
    HeadNormAccumulator,
    HeadScales,
    estimate_head_scales,
    estimate_head_scales_from_model,
    estimate_input_scale,
    fold_head_scales,
)

__all__ = [
    "CONCATENATED",
    "CheckpointChoiceWarning",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DEFAULT_REPO_ID",
    "DeadEncoderWarning",
    "HeadNormAccumulator",
    "HeadSAEs",
    "HeadScales",
    "HookUnknownError",
    "HubReference",
    "InputScaleWarning",
    "LOADERS",
    "LoadedModel",
    "MissingHeadsWarning",
    "ModelNotFoundError",
    "NO_HEAD",
    "ProcessingFlags",
    "SAE",
    "STANDIN_BOS_TOKEN_ID",
    "UnsupportedCheckpointError",
    "check_compatible",
    "check_model_matches",
    "choose_checkpoint",
    "detect_format",
    "estimate_head_scales",
    "estimate_head_scales_from_model",
    "estimate_input_scale",
    "find_legacy_sae_dir",
    "fold_head_scales",
    "from_saelens",
    "load_head_saes",
    "load_kissane",
    "load_legacy_saelens",
    "load_model",
    "load_sae",
    "load_saelens6",
    "load_saelens_pretrained",
    "parse_reference",
    "process_state_dict",
    "read_kissane",
    "save_kissane",
    "save_legacy_saelens",
    "save_saelens6",
    "standin_config",
    "warn_if_input_scale_missing",
    "write_standin_model",
    "write_standin_tokenizer",
]
