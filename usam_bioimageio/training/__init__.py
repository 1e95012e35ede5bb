"""Finetuning SAM with µSAM's iterative prompting scheme (torch)."""

from .iterative_prompting import corrective_points, starting_boxes, starting_points
from .trainer import TrainConfig, Trainer, train, train_main

__all__ = ["TrainConfig", "Trainer", "corrective_points", "starting_boxes", "starting_points", "train", "train_main"]
