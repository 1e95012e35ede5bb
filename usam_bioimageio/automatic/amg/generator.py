"""Automatic mask generation (AMG): SAM's point-grid segmentation of everything, on our packages.

Same semantics as segment_anything's ``SamAutomaticMaskGenerator.generate`` (``output_mode="binary_mask"``),
which µSAM's ``AutomaticMaskGenerator`` (micro_sam 1.8.14) splits into ``initialize`` + ``generate`` with the
same filters in the same order. Step by step, per crop box (crop layer 0 is the whole image):

1. Point grid: ``points_per_side`` x ``points_per_side`` points at the centres of a regular grid over the
   crop (``build_point_grid``: ``linspace(1/2n, 1 - 1/2n, n)``, x fastest), ``int(points_per_side /
   crop_n_points_downscale_factor**layer)`` per side in crop layer ``layer``.
2. In batches of ``points_per_batch`` points: one positive point per object (plus SamPredictor's padding
   point), multimask output, i.e. mask tokens 1..3; every point gives three candidates, in point order.
3. Filters, per candidate: predicted IoU ``> pred_iou_thresh`` (skipped when the threshold is 0); stability
   score ``>= stability_score_thresh`` (skipped when 0), where the stability score is
   ``count(logits > t + offset) / count(logits > t - offset)`` on the full-resolution logits (``t`` =
   ``mask_threshold`` = 0, 0 / 0 = NaN, which fails every threshold > 0); the binary mask is
   ``logits > 0`` and its box ``[x_min, y_min, x_max, y_max]`` with *inclusive* maxima ([0, 0, 0, 0] for an
   empty mask); candidates whose box lies within 20 px of a crop edge that is not an image edge are dropped.
   Comparisons are in float32, as torch compares a float32 tensor with a Python float.
4. Greedy box NMS per crop (torchvision's CPU ``nms``: stable descending sort of the scores, suppress
   every later box with IoU ``> box_nms_thresh``; IoU in float32 with SAM's inclusive boxes, ``(x1 - x0) *
   (y1 - y0)`` areas, compared with the threshold in double), scores = predicted IoU. The surviving
   candidates are kept in score order.
5. Boxes and points go back to image coordinates. With several crops, NMS across crops
   (``crop_nms_thresh``) with score ``1 / crop area``, so masks from smaller crops win.
6. ``min_mask_region_area > 0``: per mask, holes (8-connected background components) and then islands
   (8-connected mask components) smaller than the area are removed (an island-only mask keeps its largest
   island); masks that changed get score 0, unchanged ones 1, their boxes are recomputed, and NMS with
   ``max(box_nms_thresh, crop_nms_thresh)`` runs once more (``remove_small_regions``, which uses OpenCV's
   ``connectedComponentsWithStats``; here ``scipy.ndimage.label`` with the same 8-connectivity).

Records: ``segmentation`` (bool H x W), ``area`` (pixels), ``bbox`` ``[x0, y0, x1 - x0, y1 - y0]`` from the
inclusive box (SAM's XYWH, one less than the pixel extent), ``predicted_iou``, ``point_coords`` ``[[x, y]]``,
``stability_score``, ``crop_box`` ``[x0, y0, w, h]``; in SAM's output order.

Where this implementation is faster than SAM's (same result): the IoU filter runs on the decoder outputs
before any upscaling, so only its survivors are upscaled, and not through SAM's two bilinear resizes via
1024 x 1024 but with ``upscale_masks``' per-axis matrices: one dense product for the columns, then 16
output rows at a time through the few intermediate rows that carry non-zero weights, each group
thresholded for the mask and both stability counts while it is in cache (full-size logits are never
stored); masks are kept as their box crops, not as run-length codes. The decoder runs on at most 16 points
per call whatever ``points_per_batch`` is (see ``DECODE_CHUNK``), which bounds its memory.

Deviations:
- Logits: ``preprocess.upscale_masks`` (the same bilinear maps as ``Sam.postprocess_masks``) agrees with
  torch to float32 rounding, and the ONNX decoder with torch's to ~1e-5; a pixel whose logit lies within
  that of a threshold can flip, so masks match SAM's to IoU ~0.999, not bit for bit.
- Prompt coordinates: SAM's generator keeps the grid points in float64 through the prompt encoder's
  ``(x + 0.5) / 1024``; the decoder package (as SamPredictor.predict and µSAM's generator) casts them to
  float32 first. A difference of float32 rounding in the positional encoding's input.
- Crop layers (``crop_n_layers > 0``): the embeddings of a crop are those of the crop as an image of its
  own, i.e. µSAM's per-channel min-max normalisation is taken over the crop (the packaged image encoder
  normalises its input). µSAM (and SAM given µSAM's normalised image) normalise the whole image once and
  crop the 8-bit result; the two agree when every crop spans the image's intensity range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from usam_bioimageio import registry
from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.packages import check_encoder
from usam_bioimageio.runtime.geometry import longest_side_shape, mask_upscale_matrix, to_rgb, upscale_support
from usam_bioimageio.prompting.inputs import build_decoder_inputs
from usam_bioimageio.embeddings.types import TiledEmbeddings
from usam_bioimageio.progress import progress_bar

__all__ = [
    "AMG_PRESETS",
    "AmgParameters",
    "automatic_mask_generation",
    "generate_masks",
    "masks_to_label_image",
]

EDGE_TOLERANCE = 20.0  # is_box_near_crop_edge(atol=20)
LABEL_BLOCK = 512  # micro_sam.util.mask_data_to_segmentation: elf.parallel blocks of 512 x 512
# Points per prompt-decoder call. Each prompt's result does not depend on the others in its call (checked:
# bit-identical ONNX outputs for 1, 4, 16 and 64 points per call), so this sets speed and memory only, not
# the result. Measured on 2 CPU cores (vit_t, 64 grid points): 16 or 64 points per call take the same time,
# 2 points per call 10-20 % longer; the process peaked at 1.2 GB RSS with 16 and 3.9 GB with 64 (SAM's
# points_per_batch default), the decoder's (points, 4096, 256) float32 image tokens dominating.
DECODE_CHUNK = 16


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


# --------------------------------------------------------------------------------------------------
# SAM's geometry (segment_anything.utils.amg)
# --------------------------------------------------------------------------------------------------

def build_point_grid(n_per_side: int) -> np.ndarray:
    """``build_point_grid``: (n * n, 2) points (x, y) in [0, 1], x varying fastest."""
    offset = 1 / (2 * n_per_side)
    one_side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(one_side[None, :], (n_per_side, 1))
    ys = np.tile(one_side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def generate_crop_boxes(shape: Tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """``generate_crop_boxes``: crop boxes [x0, y0, x1, y1] (exclusive ends) and their layer indices."""
    im_h, im_w = shape
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision's CPU ``nms`` (also ``batched_nms`` with one category): indices kept, by descending score.

    Boxes (n, 4) as float32 [x0, y0, x1, y1]; areas ``(x1 - x0) * (y1 - y0)`` and IoUs in float32, a box is
    suppressed when its IoU with a kept, higher-scored box is ``> iou_threshold`` (compared in double, as
    the C++ kernel does); ties in the scores keep their input order (stable sort).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    areas = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    zero = np.float32(0.0)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        rest = slice(i + 1, None)
        w = np.maximum(zero, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
        h = np.maximum(zero, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= iou.astype(np.float64) > float(iou_threshold)
    return np.asarray(keep, dtype=np.int64)


def _boxes_of(masks: np.ndarray) -> np.ndarray:
    """``batched_mask_to_box`` of (k, h, w) bool masks: (k, 4) int64 [x0, y0, x1, y1], inclusive maxima,
    [0, 0, 0, 0] for an empty mask."""
    k, h, w = masks.shape
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    boxes = np.stack([
        cols.argmax(axis=1), rows.argmax(axis=1),
        w - 1 - cols[:, ::-1].argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1),
    ], axis=1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def _near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], image_box: Sequence[int]) -> np.ndarray:
    """``is_box_near_crop_edge`` for boxes already in image coordinates."""
    b = boxes.astype(np.float32)
    crop = np.asarray(crop_box, dtype=np.float32)[None]
    image = np.asarray(image_box, dtype=np.float32)[None]
    near_crop = np.abs(b - crop) <= EDGE_TOLERANCE
    near_image = np.abs(b - image) <= EDGE_TOLERANCE
    return np.any(near_crop & ~near_image, axis=1)


# --------------------------------------------------------------------------------------------------
# Thresholds and counts of the upscaled logits, group of rows by group of rows
# --------------------------------------------------------------------------------------------------

ROW_GROUP = 16  # output rows per step of the row pass


@dataclass(frozen=True)
class _UpscalePlan:
    """``preprocess.upscale_masks`` for one image shape, as :func:`_threshold_logits` applies it.

    cols_t: (256, W) float32, the transposed column matrix (the dense first pass);
    rows: per group of up to ``ROW_GROUP`` output rows: (r0, r1, b0, b1, weights (r1 - r0, b1 - b0)), the
    band b0:b1 of intermediate rows that carries all non-zero weights of those output rows.
    """

    cols_t: np.ndarray
    rows: Tuple[Tuple[int, int, int, int, np.ndarray], ...]


@lru_cache(maxsize=16)
def _upscale_plan(shape: Tuple[int, int]) -> _UpscalePlan:
    h, w = shape
    new_h, new_w = longest_side_shape(h, w)
    rows = mask_upscale_matrix(h, new_h)
    first, last = upscale_support(h, new_h)
    groups = []
    for r0 in range(0, h, ROW_GROUP):
        r1 = min(r0 + ROW_GROUP, h)
        b0, b1 = int(first[r0:r1].min()), int(last[r0:r1].max()) + 1
        groups.append((r0, r1, b0, b1, np.ascontiguousarray(rows[r0:r1, b0:b1])))
    cols_t = np.ascontiguousarray(mask_upscale_matrix(w, new_w).T)
    return _UpscalePlan(cols_t, tuple(groups))


def _threshold_logits(low: np.ndarray, shape: Tuple[int, int], mask_t: float, high_t: float,
                      low_t: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (k, 256, 256) low-res logits and ``L = upscale_masks(low, shape)``: (``L > mask_t`` as bool
    (k, H, W), ``count(L > high_t)``, ``count(L > low_t)``) per mask, without holding ``L`` in memory.

    The column pass is one matrix product; the row pass goes ``ROW_GROUP`` output rows at a time through
    the band of intermediate rows with non-zero weights (the same products as ``upscale_masks`` less the
    exact zeros), each group thresholded and counted while it is in cache.
    """
    plan = _upscale_plan(tuple(shape))
    k = len(low)
    h, w = shape
    inter = np.matmul(np.asarray(low, dtype=np.float32).reshape(-1, low.shape[-1]), plan.cols_t)
    inter = inter.reshape(k, low.shape[-2], w)
    masks = np.empty((k, h, w), dtype=bool)
    n_high = np.zeros(k, dtype=np.int64)
    n_low = np.zeros(k, dtype=np.int64)
    mask_t, high_t, low_t = np.float32(mask_t), np.float32(high_t), np.float32(low_t)
    for r0, r1, b0, b1, weights in plan.rows:
        values = np.matmul(weights, inter[:, b0:b1, :])  # (k, g, W): output rows r0:r1
        np.greater(values, mask_t, out=masks[:, r0:r1, :])
        n_high += np.count_nonzero(values > high_t, axis=(1, 2))
        n_low += np.count_nonzero(values > low_t, axis=(1, 2))
    return masks, n_high, n_low


# --------------------------------------------------------------------------------------------------
# Mask candidates
# --------------------------------------------------------------------------------------------------

@dataclass
class _Masks:
    """Mask candidates: boxes (n, 4) int64 inclusive [x0, y0, x1, y1], each mask stored as its box crop
    (a bool array placed at (y0, x0)); scores, points and crop boxes in image coordinates."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    crops: List[np.ndarray] = field(default_factory=list)
    iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))
    crop_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.crops)

    def take(self, index: np.ndarray) -> "_Masks":
        index = np.asarray(index, dtype=np.int64)
        return _Masks(self.boxes[index], [self.crops[i] for i in index], self.iou[index], self.stability[index],
                      self.points[index], self.crop_boxes[index])

    @staticmethod
    def concat(parts: Sequence["_Masks"]) -> "_Masks":
        parts = list(parts)
        if not parts:
            return _Masks()
        return _Masks(
            np.concatenate([p.boxes for p in parts]), [c for p in parts for c in p.crops],
            np.concatenate([p.iou for p in parts]), np.concatenate([p.stability for p in parts]),
            np.concatenate([p.points for p in parts]), np.concatenate([p.crop_boxes for p in parts]),
        )

    def full(self, i: int, shape: Tuple[int, int]) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        x0, y0 = int(self.boxes[i, 0]), int(self.boxes[i, 1])
        crop = self.crops[i]
        mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return mask


def _decode_batch(model: SamModel, embeddings: Embeddings, points: np.ndarray, params: AmgParameters,
                  chunk: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, List[np.ndarray]]:
    """Decode one batch of grid points (crop coordinates) and apply the per-mask filters.

    Returns, for the surviving candidates in SAM's order: source point indices, predicted IoU, stability
    score, boxes (crop coordinates) and mask crops.
    """
    shape = embeddings.original_shape
    decoder = model.runner("prompt_decoder")
    iou, low = [], []
    for start in range(0, len(points), DECODE_CHUNK):
        sub = points[start:start + DECODE_CHUNK]
        inputs = build_decoder_inputs(shape, points=sub[:, None, :], point_labels=np.ones((len(sub), 1)))
        out = decoder(embeddings=embeddings.features, **inputs)
        iou.append(out["iou_predictions"])
        low.append(out["low_res_masks"])
    n_tokens = registry.NUM_MASK_OUTPUTS - 1
    iou = np.ascontiguousarray(np.concatenate(iou)[:, 1:], dtype=np.float32).reshape(-1)
    low = np.concatenate(low)  # (b, 4, 256, 256); candidate c is point c // 3, token 1 + c % 3
    candidates = np.arange(len(iou))
    if params.pred_iou_thresh > 0.0:
        candidates = candidates[iou > np.float32(params.pred_iou_thresh)]

    kept, stability, boxes, crops = [], [], [], []
    for start in range(0, len(candidates), chunk):
        index = candidates[start:start + chunk]
        masks, n_high, n_low = _threshold_logits(
            low[index // n_tokens, 1 + index % n_tokens], shape, registry.MASK_THRESHOLD,
            registry.MASK_THRESHOLD + params.stability_score_offset,
            registry.MASK_THRESHOLD - params.stability_score_offset,
        )
        # calculate_stability_score: int32 counts divided in float32
        with np.errstate(divide="ignore", invalid="ignore"):
            score = n_high.astype(np.float32) / n_low.astype(np.float32)
        ok = np.ones(len(index), dtype=bool)
        if params.stability_score_thresh > 0.0:
            ok = score >= np.float32(params.stability_score_thresh)
        if not ok.any():
            continue
        masks = masks[ok]
        b = _boxes_of(masks)
        kept.append(index[ok])
        stability.append(score[ok])
        boxes.append(b)
        crops.extend(m[y0:y1 + 1, x0:x1 + 1].copy() for m, (x0, y0, x1, y1) in zip(masks, b))
    if not kept:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 4), np.int64), []
    kept = np.concatenate(kept)
    return kept // n_tokens, iou[kept], np.concatenate(stability), np.concatenate(boxes), crops


def _chunk_size(shape: Tuple[int, int]) -> int:
    """Masks thresholded at once: about 64 MiB of bool masks plus 256 x W float32 intermediates each."""
    per_mask = shape[0] * shape[1] + 4 * 256 * shape[1]
    return int(max(1, min(64, (64 << 20) // per_mask)))


def _process_crop(model: SamModel, embeddings: Embeddings, crop_box: Sequence[int], grid: np.ndarray,
                  image_shape: Tuple[int, int], params: AmgParameters) -> _Masks:
    crop_h, crop_w = embeddings.original_shape
    points = grid * np.array([crop_w, crop_h], dtype=np.float64)[None]
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    offset = np.array([x0, y0, x0, y0], dtype=np.int64)
    chunk = _chunk_size((crop_h, crop_w))
    image_box = [0, 0, image_shape[1], image_shape[0]]
    parts = []
    for start in range(0, len(points), params.points_per_batch):
        batch = points[start:start + params.points_per_batch]
        source, iou, stability, boxes, crops = _decode_batch(model, embeddings, batch, params, chunk)
        if len(crops) == 0:
            continue
        boxes = boxes + offset
        near = _near_crop_edge(boxes, crop_box, image_box)
        if near.any():
            keep = np.flatnonzero(~near)
            source, iou, stability, boxes = source[keep], iou[keep], stability[keep], boxes[keep]
            crops = [crops[i] for i in keep]
        parts.append(_Masks(boxes, crops, iou, stability, batch[source] + np.array([x0, y0], np.float64),
                            np.tile(np.asarray(crop_box, np.int64), (len(crops), 1))))
    masks = _Masks.concat(parts)
    # NMS within the crop: boxes in crop coordinates as SAM has them here (translation does not change IoUs)
    return masks.take(nms(masks.boxes - offset, masks.iou, params.box_nms_thresh))


# --------------------------------------------------------------------------------------------------
# remove_small_regions
# --------------------------------------------------------------------------------------------------

_EIGHT = np.ones((3, 3), dtype=bool)


def _fill_small_holes(mask: np.ndarray, area: int) -> Tuple[np.ndarray, bool]:
    """``remove_small_regions(mode="holes")``: fill the 8-connected components of ``~mask`` smaller than
    ``area`` (components touching the image border included)."""
    labels, n = ndimage.label(~mask, structure=_EIGHT)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area) + 1
    if len(small) == 0:
        return mask, False
    return mask | np.isin(labels, small), True


def _drop_small_islands(mask: np.ndarray, area: int) -> Tuple[np.ndarray, bool]:
    """``remove_small_regions(mode="islands")``: remove the 8-connected components of ``mask`` smaller than
    ``area``; if all are, keep the largest (the first in raster order among equals, as ``argmax``)."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area
    if not small.any():
        return mask, False
    keep = np.flatnonzero(~small) + 1
    if len(keep) == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True


def _remove_small_regions(masks: _Masks, i: int, shape: Tuple[int, int],
                          area: int) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Holes, then islands, of mask ``i``. Returns (new box, new crop, changed).

    Holes are looked for in the box grown by one pixel: a background component that reaches the grown rim
    joins the background outside the box, which holds at least one whole side strip of the image outside
    the box (all background); when every such strip has ``>= area`` pixels these components are never
    small and the window result equals the whole-image one, otherwise the whole image is labelled.
    """
    h, w = shape
    x0, y0, x1, y1 = (int(v) for v in masks.boxes[i])
    crop = masks.crops[i]
    strips = [x0 * h, (w - 1 - x1) * h, y0 * w, (h - 1 - y1) * w]
    strips = [s for s in strips if s > 0]
    if crop.any() and (not strips or min(strips) >= area):
        wy0, wx0, wy1, wx1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 2, h), min(x1 + 2, w)
        window = np.zeros((wy1 - wy0, wx1 - wx0), dtype=bool)
        window[y0 - wy0:y0 - wy0 + crop.shape[0], x0 - wx0:x0 - wx0 + crop.shape[1]] = crop
        labels, n = ndimage.label(~window, structure=_EIGHT)
        changed_holes = False
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            rim = np.zeros_like(window)
            rim[y0 - wy0:y0 - wy0 + crop.shape[0], x0 - wx0:x0 - wx0 + crop.shape[1]] = True
            outside = np.unique(labels[~rim])  # labels reaching the grown rim: never small (see above)
            small = np.flatnonzero(sizes < area)
            small = small[(small > 0) & ~np.isin(small, outside)]
            if len(small):
                window = window | np.isin(labels, small)
                changed_holes = True
        # islands lie inside the box: label the box crop only
        inner = window[y0 - wy0:y0 - wy0 + crop.shape[0], x0 - wx0:x0 - wx0 + crop.shape[1]]
        inner, changed_islands = _drop_small_islands(inner, area)
        full_box = (x0, y0)
        new = inner
    else:
        full = masks.full(i, shape)
        full, changed_holes = _fill_small_holes(full, area)
        full, changed_islands = _drop_small_islands(full, area)
        full_box = (0, 0)
        new = full
    changed = changed_holes or changed_islands
    if not changed:
        return masks.boxes[i], crop, False
    box = _boxes_of(new[None])[0]
    bx0, by0, bx1, by1 = (int(v) for v in box)
    new_crop = new[by0:by1 + 1, bx0:bx1 + 1].copy()
    box = box + np.array([full_box[0], full_box[1]] * 2, dtype=np.int64) if new.any() else np.zeros(4, np.int64)
    return box, new_crop, True


def _postprocess_small_regions(masks: _Masks, shape: Tuple[int, int], area: int, nms_thresh: float) -> _Masks:
    if len(masks) == 0:
        return masks
    boxes = masks.boxes.copy()
    crops = list(masks.crops)
    scores = np.ones(len(masks), dtype=np.float32)
    for i in range(len(masks)):
        box, crop, changed = _remove_small_regions(masks, i, shape, area)
        if changed:
            boxes[i], crops[i], scores[i] = box, crop, 0.0
    updated = _Masks(boxes, crops, masks.iou, masks.stability, masks.points, masks.crop_boxes)
    return updated.take(nms(boxes, scores, nms_thresh))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def _check_image(image: np.ndarray) -> np.ndarray:
    to_rgb(np.asarray(image))  # validation (shape, dtype, finite values) with the encoder's rules
    return np.asarray(image)


def _tile_crops(model: SamModel, tiled: TiledEmbeddings, params: AmgParameters, progress: bool) -> List[_Masks]:
    """µSAM's ``TiledAutomaticMaskGenerator``: every tile is a crop whose box is the outer tile (tile + halo)
    and whose embeddings are the tile's; a mask near a crop edge that is not an image edge is dropped, so an
    object cut by a tile's halo border survives only from a tile that holds it whole."""
    shape = tuple(int(v) for v in tiled.original_shape)
    grid = build_point_grid(params.points_per_side)
    parts = []
    with progress_bar(len(tiled), 0, "AMG (tiles)", progress) as bar:
        for tile in tiled.tiling.tiles():
            if tiled.features[tile.index] is not None:  # micro-sam skips tiles outside its mask
                (y0, x0), (y1, x1) = tile.outer_begin, tile.outer_end
                parts.append(_process_crop(model, tiled.tile_embeddings(tile.index), [x0, y0, x1, y1], grid,
                                           shape, params))
            bar.update()
    return parts


def _checked_shape(model: SamModel, image, embeddings, params: AmgParameters) -> Tuple[int, int]:
    """Validates image, embeddings and parameters together; the image shape (H, W)."""
    if not isinstance(params, AmgParameters):
        raise TypeError(f"params must be AmgParameters, got {type(params).__name__}")
    if image is None and embeddings is None:
        raise ValueError("give the image or its embeddings (or both)")
    tiled = isinstance(embeddings, TiledEmbeddings)
    if tiled and params.crop_n_layers > 0:
        raise ValueError("crop layers (crop_n_layers > 0) cannot be combined with tiled embeddings: "
                         "the tiles are the crops (as in µSAM's TiledAutomaticMaskGenerator)")
    if image is not None:
        image = _check_image(image)
        shape = (int(image.shape[0]), int(image.shape[1]))
        if embeddings is not None and tuple(embeddings.original_shape) != shape:
            raise ValueError(f"the embeddings are of an image of shape {tuple(embeddings.original_shape)}, "
                             f"not of this image {shape}")
    else:
        shape = tuple(int(v) for v in embeddings.original_shape)
        if params.crop_n_layers > 0:
            raise ValueError("crop layers (crop_n_layers > 0) need the image: its crops are encoded separately")
    if embeddings is not None:
        check_encoder(model.family.get("prompt_decoder"), embeddings.encoder, "these embeddings come from")
    return shape


def generate_masks(
    model: SamModel,
    image: Optional[np.ndarray] = None,
    *,
    embeddings: Optional[Union[Embeddings, TiledEmbeddings]] = None,
    params: AmgParameters = AmgParameters(),
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """SAM's automatic mask generation; the records of ``SamAutomaticMaskGenerator.generate`` (binary masks).

    ``image``: the 2D image (H, W) or (H, W, C), as for ``compute_embeddings``; ``embeddings``: its
    precomputed embeddings. Give either or both; crop layers (``params.crop_n_layers > 0``) need the image,
    whose crops are encoded separately. See the module docstring for the steps and the record fields.

    Tiled ``embeddings`` (:class:`usam_bioimageio.embeddings.types.TiledEmbeddings`) give µSAM's tiled AMG: each tile
    is a crop (a point grid of ``points_per_side`` over its outer block), and the NMS across crops
    (``crop_nms_thresh``) removes the duplicates of objects seen by several tiles; crop layers are not
    available then (µSAM uses the crop machinery for the tiles). ``progress``: a bar over the tiles.
    """
    shape = _checked_shape(model, image, embeddings, params)
    image = None if image is None else np.asarray(image)
    masks = _mask_set(model, image, embeddings, shape, params, progress)

    records = []
    for i in range(len(masks)):
        x0, y0, x1, y1 = (int(v) for v in masks.boxes[i])
        cx0, cy0, cx1, cy1 = (int(v) for v in masks.crop_boxes[i])
        records.append({
            "segmentation": masks.full(i, shape),
            "area": int(np.count_nonzero(masks.crops[i])),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "predicted_iou": float(masks.iou[i]),
            "point_coords": [[float(v) for v in masks.points[i]]],
            "stability_score": float(masks.stability[i]),
            "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
        })
    return records


def _mask_set(model: SamModel, image: Optional[np.ndarray], embeddings, shape: Tuple[int, int],
              params: AmgParameters, progress: bool) -> _Masks:
    """The masks of ``generate_masks`` (arguments checked there), as box crops."""
    if isinstance(embeddings, TiledEmbeddings):
        parts = _tile_crops(model, embeddings, params, progress)
    else:
        crop_boxes, layer_idxs = generate_crop_boxes(shape, params.crop_n_layers, params.crop_overlap_ratio)
        grids = [build_point_grid(int(params.points_per_side / params.crop_n_points_downscale_factor**i))
                 for i in range(params.crop_n_layers + 1)]
        parts = []
        for crop_box, layer in zip(crop_boxes, layer_idxs):
            x0, y0, x1, y1 = crop_box
            if layer == 0:
                crop_embeddings = embeddings if embeddings is not None else compute_embeddings(model, image)
            else:
                crop_embeddings = compute_embeddings(model, image[y0:y1, x0:x1])
            parts.append(_process_crop(model, crop_embeddings, crop_box, grids[layer], shape, params))
    masks = _Masks.concat(parts)
    if len(parts) > 1 and len(masks):
        areas = (masks.crop_boxes[:, 2] - masks.crop_boxes[:, 0]) * (masks.crop_boxes[:, 3] - masks.crop_boxes[:, 1])
        scores = np.float32(1.0) / areas.astype(np.float32)
        masks = masks.take(nms(masks.boxes, scores, params.crop_nms_thresh))
    if params.min_mask_region_area > 0:
        masks = _postprocess_small_regions(masks, shape, params.min_mask_region_area,
                                           max(params.box_nms_thresh, params.crop_nms_thresh))
    return masks


# --------------------------------------------------------------------------------------------------
# Label image (micro_sam.util.mask_data_to_segmentation, as µSAM's AMG calls it)
# --------------------------------------------------------------------------------------------------

def _label_components(segmentation: np.ndarray) -> np.ndarray:
    """``elf.parallel.label(segmentation, block_shape=(512, 512))`` (python-elf 0.9.2, bioimage-cpp 0.9.0):
    4-connected components of equal labels (0 = background), with elf's numbering, step by step:

    1. each 512 x 512 block (C order) is labelled on its own (``bioimage_cpp.segmentation.label``, which
       numbers components 1..n in raster order of their first pixel, as ``skimage.measure.label``), ids
       offset by the number of components of the blocks before it;
    2. for each block in order and each axis (rows, then columns), the pairs (id here, id in the lower
       neighbour) of equal labels across the shared face, ``np.unique``-sorted, are merged in sequence by
       ``bioimage_cpp.utils.UnionFind`` (union by rank, ties keep the first id's root);
    3. the roots are renumbered consecutively in increasing order (``relabel_sequential``).
    """
    from skimage.measure import label as sk_label

    h, w = segmentation.shape
    n_by, n_bx = -(-h // LABEL_BLOCK), -(-w // LABEL_BLOCK)
    ids = np.zeros((h, w), dtype=np.int64)
    total = 0
    blocks = []
    for by in range(n_by):
        for bx in range(n_bx):
            sl = (slice(by * LABEL_BLOCK, min((by + 1) * LABEL_BLOCK, h)),
                  slice(bx * LABEL_BLOCK, min((bx + 1) * LABEL_BLOCK, w)))
            local = sk_label(segmentation[sl], background=0, connectivity=1).astype(np.int64)
            ids[sl] = np.where(local > 0, local + total, 0)
            total += int(local.max())
            blocks.append((by, bx, sl))
    if len(blocks) == 1 or total == 0:
        return ids.astype(segmentation.dtype)

    parent: Dict[int, int] = {}
    rank: Dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for by, bx, (rows, cols) in blocks:
        faces = []
        if by > 0:
            faces.append(((rows.start, cols), (rows.start - 1, cols)))
        if bx > 0:
            faces.append(((rows, cols.start), (rows, cols.start - 1)))
        for face, neighbour in faces:
            here, there = segmentation[face], segmentation[neighbour]
            same = (here != 0) & (there != 0) & (here == there)
            if not same.any():
                continue
            pairs = np.unique(np.stack([ids[face][same], ids[neighbour][same]], axis=1), axis=0)
            for a, b in pairs.tolist():
                ra, rb = find(a), find(b)
                if ra == rb:
                    continue
                rank_a, rank_b = rank.get(ra, 0), rank.get(rb, 0)
                if rank_a < rank_b:
                    parent[ra] = rb
                elif rank_a > rank_b:
                    parent[rb] = ra
                else:
                    parent[rb] = ra
                    rank[ra] = rank_a + 1
    roots = np.arange(total + 1, dtype=np.int64)
    for x in list(parent):
        roots[x] = find(x)
    kept = np.unique(roots)  # relabel_sequential: sorted roots -> 0, 1, 2, ... (0 stays 0)
    lookup = np.searchsorted(kept, roots)
    return lookup[ids].astype(segmentation.dtype)


def masks_to_label_image(
    masks: Sequence[Dict[str, Any]],
    shape: Optional[Tuple[int, int]] = None,
    *,
    with_background: bool = True,
    min_object_size: int = 0,
) -> np.ndarray:
    """AMG records -> an instance label image (uint32), as µSAM's AMG makes one.

    ``micro_sam.util.mask_data_to_segmentation`` with the arguments of ``AutomaticMaskGenerator.generate``
    (``output_mode="instance_segmentation"``: ``with_background=True``, ``merge_exclusively=False``,
    ``label_masks=True``): the masks are painted in order of decreasing area (stable), each with the next
    id, smaller masks overwriting larger ones (masks with an ``area`` below ``min_object_size`` are
    skipped); the label image is split into 4-connected components of equal ids (numbered as µSAM's
    blockwise ``elf.parallel.label`` numbers them, see :func:`_label_components`); components with fewer
    than ``min_object_size`` pixels are removed and, with ``with_background``, so is the largest region,
    background (0) included (so nothing when the background is largest); the remaining ids are renumbered
    consecutively in order (when no pixel is 0, µSAM's renumbering maps the smallest id to 0 as well).
    ``shape`` is needed when ``masks`` is empty.
    """
    _check_min_object_size(min_object_size)
    masks = list(masks)
    if shape is None:
        if not masks:
            raise ValueError("no masks: give the shape of the label image")
        shape = np.asarray(masks[0]["segmentation"]).shape
    shape = tuple(int(v) for v in shape)

    def paint(i: int, segmentation: np.ndarray, seg_id: int) -> None:
        mask = np.asarray(masks[i]["segmentation"], dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask of shape {mask.shape} does not fit the label image of shape {shape}")
        segmentation[mask] = seg_id

    areas = np.asarray([m["area"] for m in masks], dtype=np.int64)
    return _label_image(areas, paint, shape, with_background, min_object_size)


def _check_min_object_size(min_object_size: int) -> None:
    if isinstance(min_object_size, bool) or not isinstance(min_object_size, (int, np.integer)) or min_object_size < 0:
        raise ValueError(f"min_object_size must be an integer >= 0, got {min_object_size!r}")


def _label_image(areas: np.ndarray, paint: Callable[[int, np.ndarray, int], None], shape: Tuple[int, int],
                 with_background: bool, min_object_size: int) -> np.ndarray:
    """``masks_to_label_image`` on masks given by their areas and a function that paints mask i."""
    segmentation = np.zeros(shape, dtype=np.uint32)
    seg_id = 0
    for i in np.argsort(-areas, kind="stable"):  # decreasing area, ties in order (Python's stable sort)
        if areas[i] < min_object_size:  # skipped before painting, without using up an id
            continue
        seg_id += 1
        paint(int(i), segmentation, seg_id)
    segmentation = _label_components(segmentation)
    ids, sizes = np.unique(segmentation, return_counts=True)
    drop = ids[sizes < min_object_size]
    if with_background:
        drop = np.concatenate([drop, [ids[np.argmax(sizes)]]])
    if len(drop):
        segmentation[np.isin(segmentation, drop)] = 0
    # elf.parallel.relabel_consecutive(start_label=0, keep_zeros=True): sorted ids -> 0, 1, 2, ...;
    # 0 stays 0 (when there is no background at all, µSAM maps the smallest id to 0 as well)
    ids = np.unique(segmentation)
    lookup = np.zeros(int(ids[-1]) + 1, dtype=np.uint32)
    lookup[ids] = np.arange(len(ids), dtype=np.uint32)
    return lookup[segmentation]


def automatic_mask_generation(
    model: SamModel,
    image: Optional[np.ndarray],
    *,
    params: AmgParameters = AmgParameters(),
    embeddings: Optional[Union[Embeddings, TiledEmbeddings]] = None,
    with_background: bool = True,
    min_object_size: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """µSAM's AMG instance segmentation: ``generate_masks`` then ``masks_to_label_image`` (uint32 labels).

    Equals ``AutomaticMaskGenerator.initialize(image)`` + ``.generate(...)`` with its default
    ``output_mode="instance_segmentation"`` for the same parameters (``image`` may be None when
    ``embeddings`` are given and there are no crop layers); with tiled ``embeddings``, µSAM's
    ``TiledAutomaticMaskGenerator``. The masks are painted from their box crops: no full-size mask is made,
    so memory does not grow with the number of masks times the image size.
    """
    _check_min_object_size(min_object_size)
    shape = _checked_shape(model, image, embeddings, params)
    masks = _mask_set(model, None if image is None else np.asarray(image), embeddings, shape, params, progress)

    def paint(i: int, segmentation: np.ndarray, seg_id: int) -> None:
        x0, y0 = int(masks.boxes[i, 0]), int(masks.boxes[i, 1])
        crop = masks.crops[i]
        segmentation[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]][crop] = seg_id

    areas = np.asarray([np.count_nonzero(c) for c in masks.crops], dtype=np.int64)
    return _label_image(areas, paint, shape, with_background, min_object_size)
