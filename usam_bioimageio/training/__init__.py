"""Finetuning SAM with µSAM's iterative prompting scheme (torch)."""

from usam_bioimageio.prompting.iterative import corrective_points, starting_boxes, starting_points
from usam_bioimageio.training.trainer import TrainConfig, Trainer, read_pairs, train

__all__ = ["TrainConfig", "Trainer", "corrective_points", "read_pairs", "starting_boxes", "starting_points", "train"]
