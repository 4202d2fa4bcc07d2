"""Training per-head SAEs with SAELens's own training code (:mod:`sparsedecomp.training.heads`), fed by one activation
stream for every head (:mod:`sparsedecomp.training.stream`)."""

from .heads import (ARCHITECTURES, HeadTrainingSpec, completed_checkpoints, save_head_saes, save_training_sae,
                    train_head_saes, train_layer_saes)
from .stream import HeadBatchStream

__all__ = ["ARCHITECTURES", "HeadBatchStream", "HeadTrainingSpec", "completed_checkpoints", "save_head_saes",
           "save_training_sae", "train_head_saes", "train_layer_saes"]
