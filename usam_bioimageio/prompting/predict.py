"""Segment objects from point, box and mask prompts, many objects per call.

The semantics are those of segment_anything's ``SamPredictor.predict`` applied to each object:
points and boxes in original image pixel coordinates (x, y), labels 1 = positive, 0 = negative, a mask
prompt is a previous low-resolution logit map (L x L, L = N / 4 for the model's input size N: 256 at 1024),
single-mask output is mask token 0 and multimask output are tokens 1..3.

Objects go to the prompt decoder ``batch_size`` at a time (as AMG's ``points_per_batch``): its memory grows
with the objects of one call, not with all of them, and each batch is upscaled and written out before the
next is decoded, so thousands of objects fit. Batching does not change the result: in a decoder call of two
or more objects each object's outputs do not depend on the others (bit-identical ONNX outputs for 2 to 40
objects per call), but a call of one object rounds differently (logits ~2e-6 apart, enough to flip a pixel at
the threshold). A batch of one object from a group of several is therefore decoded beside a copy of itself,
so that every batch size gives the result of decoding the group in one call (tests/test_batched_prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from usam_bioimageio import registry
from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.packages import check_embeddings
from usam_bioimageio.prompting.inputs import as_objects, build_decoder_inputs
from usam_bioimageio.runtime.geometry import upscale_masks_binary

# Objects per prompt-decoder call. The decoder holds about 20 MB of float32 intermediates per object (its
# two-way transformer runs on the 4096 image tokens of every object), so this bounds its memory. Measured with
# vit_t on 2 shared CPU cores, 64 boxes on a 696 x 520 image after its embeddings (0.45 GB): 8 / 16 / 32 objects
# per call peaked at 0.64 / 0.82 / 1.42 GB RSS, 100 / 85 / 116 ms per object (AMG's DECODE_CHUNK is 16 too).
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class PromptResult:
    """masks (o, k, H, W) bool; scores (o, k) predicted IoU; low_res_logits (o, k, L, L) (L = N / 4), which can be
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


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _decode_batch(model: SamModel, embeddings: Embeddings, prompts: dict, *, multimask_output: bool,
                  group_size: int) -> PromptResult:
    """One decoder call for the objects of ``prompts`` (segment_from_prompts' arrays, with the object axis),
    part of a group of ``group_size`` objects of the same structure; results as decoding the group at once."""
    decoder = model.runner("prompt_decoder")
    check_embeddings(decoder.package, embeddings)
    inputs = build_decoder_inputs(embeddings.original_shape, **prompts, image_size=model.image_size)
    n = len(inputs["point_coords"])
    if n == 1 and group_size > 1:  # a call of one object rounds differently from one of several (module doc)
        inputs = {k: v if k == "orig_im_size" else np.concatenate([v, v]) for k, v in inputs.items()}
    out = decoder(embeddings=embeddings.features, **inputs)
    tokens = slice(1, None) if multimask_output else slice(0, 1)
    # copies: the decoder's (n, 4, L, L) output is freed with the batch
    low = np.ascontiguousarray(out["low_res_masks"][:n, tokens])
    masks = upscale_masks_binary(low, embeddings.original_shape, registry.MASK_THRESHOLD, model.image_size)
    return PromptResult(masks=masks, scores=np.ascontiguousarray(out["iou_predictions"][:n, tokens]),
                        low_res_logits=low)


def segment_from_prompts(
    model: SamModel,
    embeddings: Embeddings,
    *,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    mask_inputs: Optional[np.ndarray] = None,
    multimask_output: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PromptResult:
    """Segment one object per row of the prompts, ``batch_size`` objects per decoder call.

    points (o, p, 2) / point_labels (o, p), boxes (o, 4) as (x0, y0, x1, y1), mask_inputs (o, L, L) (L = N / 4,
    256 for a 1024 model);
    a single object's prompts may omit the object axis. Every object gets the same kinds of prompts.
    """
    _check_plain(embeddings)
    batch_size = _check_batch_size(batch_size)
    check_embeddings(model.runner("prompt_decoder").package, embeddings)
    shape = embeddings.original_shape
    # every object is checked before any is decoded; the (o, 1, L, L) zero mask input this builds
    # when there are no mask prompts is calloc'ed and never touched, so it costs no memory
    n = len(build_decoder_inputs(shape, points=points, point_labels=point_labels, boxes=boxes,
                                 mask_inputs=mask_inputs, image_size=model.image_size)["point_coords"])
    pts, box = as_objects(points, 3, "points"), as_objects(boxes, 2, "boxes")
    lab = None if pts is None else np.asarray(point_labels, dtype=np.float64).reshape(pts.shape[:2])
    masks_in = None if mask_inputs is None else \
        np.asarray(mask_inputs, dtype=np.float32).reshape((n,) + np.shape(mask_inputs)[-2:])
    k = registry.NUM_MASK_OUTPUTS - 1 if multimask_output else 1
    size = registry.low_res_mask_size(model.image_size)
    masks = np.zeros((n, k) + tuple(shape), dtype=bool)
    scores = np.zeros((n, k), dtype=np.float32)
    low = np.zeros((n, k, size, size), dtype=np.float32)
    for start in range(0, n, batch_size):
        s = slice(start, start + batch_size)
        prompts = {"points": None if pts is None else pts[s], "point_labels": None if lab is None else lab[s],
                   "boxes": None if box is None else box[s], "mask_inputs": None if masks_in is None else masks_in[s]}
        result = _decode_batch(model, embeddings, prompts, multimask_output=multimask_output, group_size=n)
        masks[s], scores[s], low[s] = result.masks, result.scores, result.low_res_logits
    return PromptResult(masks=masks, scores=scores, low_res_logits=low)


def _stack_prompts(members: list, signature: Tuple[int, bool, bool]) -> Dict[str, Optional[np.ndarray]]:
    """The prompts of objects with one signature (points count, box, mask) as segment_from_prompts' arrays."""
    n_points, has_box, has_mask = signature
    return {
        "points": np.stack([np.asarray(o.points, float).reshape(-1, 2) for o in members]) if n_points else None,
        "point_labels": np.stack([np.asarray(o.point_labels).reshape(-1) for o in members]) if n_points else None,
        "boxes": np.stack([np.asarray(o.box, float) for o in members]) if has_box else None,
        "mask_inputs": np.stack([np.asarray(o.mask, np.float32) for o in members]) if has_mask else None,
    }


def _object_batches(model: SamModel, embeddings: Embeddings, objects: list,
                    batch_size: int) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Decode objects grouped by prompt signature, ``batch_size`` per call; yields (object indices,
    (b, H, W) bool masks) per batch, groups in order of first appearance."""
    _check_plain(embeddings)
    batch_size = _check_batch_size(batch_size)
    if not objects:
        raise ValueError("no objects to segment")
    groups: Dict[tuple, List[int]] = {}
    for i, obj in enumerate(objects):
        groups.setdefault(obj.signature(), []).append(i)
    batches = [(signature, idx[s:s + batch_size]) for signature, idx in groups.items()
               for s in range(0, len(idx), batch_size)]
    # every object is checked before any is decoded (the checks are cheap next to one decoder call)
    for signature, idx in batches:
        build_decoder_inputs(embeddings.original_shape, **_stack_prompts([objects[i] for i in idx], signature),
                             image_size=model.image_size)
    for signature, idx in batches:
        prompts = _stack_prompts([objects[i] for i in idx], signature)
        result = _decode_batch(model, embeddings, prompts, multimask_output=False,
                               group_size=len(groups[signature]))
        yield idx, result.masks[:, 0]


def segment_objects(model: SamModel, embeddings: Embeddings, objects: list, *,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Segment objects whose prompts differ in kind or number; returns (o, H, W) bool masks in input order.

    Objects with the same prompt structure are decoded together, ``batch_size`` per decoder call; padding
    them to a common structure would change SAM's result, so differently structured objects go to separate
    calls. For a label image use :func:`label_objects`, which does not hold every object's full-size mask.
    """
    _check_plain(embeddings)
    masks = np.zeros((len(objects),) + tuple(embeddings.original_shape), dtype=bool)
    for idx, batch in _object_batches(model, embeddings, objects, batch_size):
        masks[idx] = batch
    return masks


def label_objects(model: SamModel, embeddings: Embeddings, objects: list, *,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """``masks_to_labels(segment_objects(...))`` in memory O(image + batch_size x image): (H, W) uint32
    labels 1..o, later objects drawn over earlier ones.

    Batches come in prompt-signature order, not input order; drawing object i as ``max(label, i)`` gives
    every pixel the last object (in input order) that covers it whatever the order of drawing, which is
    masks_to_labels' rule.
    """
    _check_plain(embeddings)
    labels = np.zeros(tuple(embeddings.original_shape), dtype=np.uint32)
    for idx, batch in _object_batches(model, embeddings, objects, batch_size):
        for i, mask in zip(idx, batch):
            np.maximum(labels, np.uint32(i + 1), out=labels, where=mask)
    return labels
