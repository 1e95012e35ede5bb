"""Parameters of SAM's automatic mask generator: segment_anything's defaults and µSAM's per-model presets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import numpy as np


@dataclass(frozen=True)
class AmgParameters:
    """Parameters of SAM's automatic mask generator; the defaults are segment_anything's (and µSAM's).

    points_per_side: grid points per side of the image (crop layer 0).
    points_per_batch: points decoded per decoder call (memory only; does not change the result).
    pred_iou_thresh: keep masks whose predicted IoU is above this (0 = no filter).
    stability_score_thresh: keep masks whose stability score is at least this (0 = no filter).
    stability_score_offset: logit offset of the stability score (thresholds 0 +- offset).
    box_nms_thresh: box IoU above which NMS drops the lower-scored mask, within a crop.
    crop_n_layers: extra crop layers; layer i has (2**i)**2 crops whose embeddings are computed separately.
    crop_nms_thresh: box IoU for the NMS between crops (smaller crops win).
    crop_overlap_ratio: overlap of the crops of layer 1, as a fraction of the image's shorter side.
    crop_n_points_downscale_factor: layer i uses ``int(points_per_side / factor**i)`` points per side.
    min_mask_region_area: remove holes and islands smaller than this (pixels) from each mask; 0 = off.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"AmgParameters.{name} must be an integer >= {minimum}, got {value!r}")
            return int(value)

        def number(name: str, low: float, high: float, *, high_open: bool = False) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"AmgParameters.{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
                bracket = ")" if high_open else "]"
                raise ValueError(f"AmgParameters.{name} must be in [{low}, {high}{bracket}, got {value!r}")
            return value

        per_side = integer("points_per_side", 1)
        integer("points_per_batch", 1)
        layers = integer("crop_n_layers", 0)
        factor = integer("crop_n_points_downscale_factor", 1)
        integer("min_mask_region_area", 0)
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            number(name, 0.0, 1.0)
        number("stability_score_offset", 0.0, math.inf)
        number("crop_overlap_ratio", 0.0, 1.0, high_open=True)
        if int(per_side / factor**layers) < 1:
            raise ValueError(
                f"crop layer {layers} would get int({per_side} / {factor}**{layers}) = 0 points per side: "
                "lower crop_n_layers or crop_n_points_downscale_factor"
            )


def _preset(pred_iou: float, stability: float) -> AmgParameters:
    return AmgParameters(pred_iou_thresh=pred_iou, stability_score_thresh=stability)


#: µSAM's per-model AMG thresholds for its finetuned models (``micro_sam._model_settings.AMG_SETTINGS`` in
#: 1.8.14), keyed by µSAM model name; everything else keeps the defaults. µSAM's annotator applies these two
#: thresholds; the ``min_object_size`` of 100 listed there as well is not applied to AMG results in 1.8.14
#: (``_instance_segmentation_impl`` ignores it), see ``masks_to_label_image(min_object_size=...)`` for it.
AMG_PRESETS: Dict[str, AmgParameters] = {
    "vit_t_lm": _preset(0.6, 0.65),
    "vit_b_lm": _preset(0.65, 0.7),
    "vit_l_lm": _preset(0.65, 0.73),
    "vit_h_lm": _preset(0.65, 0.7),
    "vit_t_em_organelles": _preset(0.75, 0.75),
    "vit_b_em_organelles": _preset(0.75, 0.75),
    "vit_l_em_organelles": _preset(0.8, 0.8),
    "vit_h_em_organelles": _preset(0.8, 0.8),
}
