"""Segment objects from point, box and mask prompts, many objects per call.

The semantics are those of segment_anything's ``SamPredictor.predict`` applied to each object:
points and boxes in original image pixel coordinates (x, y), labels 1 = positive, 0 = negative, a mask
prompt is a previous low-resolution logit map (256 x 256), single-mask output is mask token 0 and
multimask output are tokens 1..3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from usam_bioimageio import registry
from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.packages import check_encoder
from usam_bioimageio.prompting.inputs import build_decoder_inputs
from usam_bioimageio.runtime.geometry import upscale_masks_binary

@dataclass(frozen=True)
class PromptResult:
    """masks (o, k, H, W) bool; scores (o, k) predicted IoU; low_res_logits (o, k, 256, 256), which can be
    passed back as ``mask_inputs`` for a refinement."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


def _check_plain(embeddings) -> None:
    """The embeddings of one 2D image, not tiled ones or a stack (each has its own entry point)."""
    if not isinstance(embeddings, Embeddings):
        raise TypeError(
            f"segment_from_prompts takes the Embeddings of one 2D image, got {type(embeddings).__name__}: for tiled "
            "embeddings use usam_bioimageio.prompting.tiled.segment_from_prompts_tiled, for a stack one slice "
            "(stack[z])")


def segment_from_prompts(
    model: SamModel,
    embeddings: Embeddings,
    *,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    mask_inputs: Optional[np.ndarray] = None,
    multimask_output: bool = False,
) -> PromptResult:
    """Segment one object per row of the prompts (all objects decoded in one call).

    points (o, p, 2) / point_labels (o, p), boxes (o, 4) as (x0, y0, x1, y1), mask_inputs (o, 256, 256);
    a single object's prompts may omit the object axis. Every object gets the same kinds of prompts.
    """
    _check_plain(embeddings)
    decoder = model.runner("prompt_decoder")
    check_encoder(decoder.package, embeddings.encoder, "these embeddings come from")
    inputs = build_decoder_inputs(
        embeddings.original_shape, points=points, point_labels=point_labels, boxes=boxes, mask_inputs=mask_inputs
    )
    out = decoder(embeddings=embeddings.features, **inputs)
    tokens = slice(1, None) if multimask_output else slice(0, 1)
    low = out["low_res_masks"][:, tokens]
    masks = upscale_masks_binary(low, embeddings.original_shape, registry.MASK_THRESHOLD)
    return PromptResult(masks=masks, scores=out["iou_predictions"][:, tokens], low_res_logits=low)


def segment_objects(model: SamModel, embeddings: Embeddings, objects: list) -> np.ndarray:
    """Segment objects whose prompts differ in kind or number; returns (o, H, W) bool masks in input order.

    Objects with the same prompt structure are decoded together; padding them to a common structure
    would change SAM's result, so differently structured objects go to separate calls.
    """
    _check_plain(embeddings)
    if not objects:
        raise ValueError("no objects to segment")
    masks = [None] * len(objects)
    groups: dict = {}
    for i, obj in enumerate(objects):
        groups.setdefault(obj.signature(), []).append(i)
    for (n_points, has_box, has_mask), idx in groups.items():
        members = [objects[i] for i in idx]
        result = segment_from_prompts(
            model,
            embeddings,
            points=np.stack([np.asarray(o.points, float).reshape(-1, 2) for o in members]) if n_points else None,
            point_labels=np.stack([np.asarray(o.point_labels).reshape(-1) for o in members]) if n_points else None,
            boxes=np.stack([np.asarray(o.box, float) for o in members]) if has_box else None,
            mask_inputs=np.stack([np.asarray(o.mask, np.float32) for o in members]) if has_mask else None,
        )
        for j, i in enumerate(idx):
            masks[i] = result.masks[j, 0]
    return np.stack(masks)


