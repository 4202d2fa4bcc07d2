"""Training per-head SAEs with SAELens's own training code (:mod:`sparsedecomp.training.heads`)."""

from .heads import ARCHITECTURES, HeadTrainingSpec, head_batches, save_head_saes, train_head_saes

__all__ = ["ARCHITECTURES", "HeadTrainingSpec", "head_batches", "save_head_saes", "train_head_saes"]
