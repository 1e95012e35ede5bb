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
N x N (the model's input size: 1024 for SAM) but with ``upscale_masks``' per-axis matrices: one dense product for
the columns, then 16 output rows at a time through the few intermediate rows that carry non-zero weights, each group
thresholded for the mask and both stability counts while it is in cache (full-size logits are never
stored); masks are kept as their box crops, not as run-length codes. The decoder runs on at most 16 points
per call whatever ``points_per_batch`` is (see ``DECODE_CHUNK``), which bounds its memory.

Deviations:
- Logits: ``preprocess.upscale_masks`` (the same bilinear maps as ``Sam.postprocess_masks``) agrees with
  torch to float32 rounding, and the ONNX decoder with torch's to ~1e-5; a pixel whose logit lies within
  that of a threshold can flip, so masks match SAM's to IoU ~0.999, not bit for bit.
- Prompt coordinates: SAM's generator keeps the grid points in float64 through the prompt encoder's
  ``(x + 0.5) / N``; the decoder package (as SamPredictor.predict and µSAM's generator) casts them to
  float32 first. A difference of float32 rounding in the positional encoding's input.
- Crop layers (``crop_n_layers > 0``): the embeddings of a crop are those of the crop as an image of its
  own, i.e. µSAM's per-channel min-max normalisation is taken over the crop (the packaged image encoder
  normalises its input). µSAM (and SAM given µSAM's normalised image) normalise the whole image once and
  crop the 8-bit result; the two agree when every crop spans the image's intensity range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from usam_bioimageio import registry
from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.packages import check_embeddings
from usam_bioimageio.runtime.geometry import longest_side_shape, mask_upscale_matrix, to_rgb, upscale_support
from usam_bioimageio.prompting.inputs import build_decoder_inputs
from usam_bioimageio.embeddings.types import TiledEmbeddings
from usam_bioimageio.progress import progress_bar
from usam_bioimageio.automatic.amg.geometry import boxes_of, build_point_grid, generate_crop_boxes, near_crop_edge, nms
from usam_bioimageio.automatic.amg.labels import check_min_object_size, paint_label_image
from usam_bioimageio.automatic.amg.params import AmgParameters

__all__ = ["automatic_mask_generation", "generate_masks"]

# Points per prompt-decoder call. Each prompt's result does not depend on the others in its call (checked:
# bit-identical ONNX outputs for 1, 4, 16 and 64 points per call), so this sets speed and memory only, not
# the result. Measured on 2 CPU cores (vit_t, 64 grid points): 16 or 64 points per call take the same time,
# 2 points per call 10-20 % longer; the process peaked at 1.2 GB RSS with 16 and 3.9 GB with 64 (SAM's
# points_per_batch default), the decoder's (points, 4096, 256) float32 image tokens dominating.
DECODE_CHUNK = 16


# --------------------------------------------------------------------------------------------------
# Thresholds and counts of the upscaled logits, group of rows by group of rows
# --------------------------------------------------------------------------------------------------

ROW_GROUP = 16  # output rows per step of the row pass


@dataclass(frozen=True)
class _UpscalePlan:
    """``preprocess.upscale_masks`` for one image shape, as :func:`_threshold_logits` applies it.

    cols_t: (L, W) float32, the transposed column matrix (the dense first pass; L = N / 4, 256 at 1024);
    rows: per group of up to ``ROW_GROUP`` output rows: (r0, r1, b0, b1, weights (r1 - r0, b1 - b0)), the
    band b0:b1 of intermediate rows that carries all non-zero weights of those output rows.
    """

    cols_t: np.ndarray
    rows: Tuple[Tuple[int, int, int, int, np.ndarray], ...]


@lru_cache(maxsize=16)
def _upscale_plan(shape: Tuple[int, int], image_size: int = registry.IMAGE_SIZE) -> _UpscalePlan:
    h, w = shape
    new_h, new_w = longest_side_shape(h, w, image_size)
    rows = mask_upscale_matrix(h, new_h, image_size)
    first, last = upscale_support(h, new_h, image_size)
    groups = []
    for r0 in range(0, h, ROW_GROUP):
        r1 = min(r0 + ROW_GROUP, h)
        b0, b1 = int(first[r0:r1].min()), int(last[r0:r1].max()) + 1
        groups.append((r0, r1, b0, b1, np.ascontiguousarray(rows[r0:r1, b0:b1])))
    cols_t = np.ascontiguousarray(mask_upscale_matrix(w, new_w, image_size).T)
    return _UpscalePlan(cols_t, tuple(groups))


def _threshold_logits(low: np.ndarray, shape: Tuple[int, int], mask_t: float, high_t: float,
                      low_t: float, image_size: int = registry.IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (k, N/4, N/4) low-res logits and ``L = upscale_masks(low, shape, N)`` (N = ``image_size``):
    (``L > mask_t`` as bool (k, H, W), ``count(L > high_t)``, ``count(L > low_t)``) per mask, without holding ``L`` in memory.

    The column pass is one matrix product; the row pass goes ``ROW_GROUP`` output rows at a time through
    the band of intermediate rows with non-zero weights (the same products as ``upscale_masks`` less the
    exact zeros), each group thresholded and counted while it is in cache.
    """
    plan = _upscale_plan(tuple(shape), image_size)
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
        inputs = build_decoder_inputs(shape, points=sub[:, None, :], point_labels=np.ones((len(sub), 1)),
                                      image_size=model.image_size)
        out = decoder(embeddings=embeddings.features, **inputs)
        iou.append(out["iou_predictions"])
        low.append(out["low_res_masks"])
    n_tokens = registry.NUM_MASK_OUTPUTS - 1
    iou = np.ascontiguousarray(np.concatenate(iou)[:, 1:], dtype=np.float32).reshape(-1)
    low = np.concatenate(low)  # (b, 4, L, L); candidate c is point c // 3, token 1 + c % 3
    candidates = np.arange(len(iou))
    if params.pred_iou_thresh > 0.0:
        candidates = candidates[iou > np.float32(params.pred_iou_thresh)]

    kept, stability, boxes, crops = [], [], [], []
    for start in range(0, len(candidates), chunk):
        index = candidates[start:start + chunk]
        masks, n_high, n_low = _threshold_logits(
            low[index // n_tokens, 1 + index % n_tokens], shape, registry.MASK_THRESHOLD,
            registry.MASK_THRESHOLD + params.stability_score_offset,
            registry.MASK_THRESHOLD - params.stability_score_offset, model.image_size,
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
        b = boxes_of(masks)
        kept.append(index[ok])
        stability.append(score[ok])
        boxes.append(b)
        crops.extend(m[y0:y1 + 1, x0:x1 + 1].copy() for m, (x0, y0, x1, y1) in zip(masks, b))
    if not kept:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 4), np.int64), []
    kept = np.concatenate(kept)
    return kept // n_tokens, iou[kept], np.concatenate(stability), np.concatenate(boxes), crops


def _chunk_size(shape: Tuple[int, int], image_size: int = registry.IMAGE_SIZE) -> int:
    """Masks thresholded at once: about 64 MiB of bool masks plus L x W float32 intermediates each."""
    per_mask = shape[0] * shape[1] + 4 * registry.low_res_mask_size(image_size) * shape[1]
    return int(max(1, min(64, (64 << 20) // per_mask)))


def _process_crop(model: SamModel, embeddings: Embeddings, crop_box: Sequence[int], grid: np.ndarray,
                  image_shape: Tuple[int, int], params: AmgParameters) -> _Masks:
    crop_h, crop_w = embeddings.original_shape
    points = grid * np.array([crop_w, crop_h], dtype=np.float64)[None]
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    offset = np.array([x0, y0, x0, y0], dtype=np.int64)
    chunk = _chunk_size((crop_h, crop_w), model.image_size)
    image_box = [0, 0, image_shape[1], image_shape[0]]
    parts = []
    for start in range(0, len(points), params.points_per_batch):
        batch = points[start:start + params.points_per_batch]
        source, iou, stability, boxes, crops = _decode_batch(model, embeddings, batch, params, chunk)
        if len(crops) == 0:
            continue
        boxes = boxes + offset
        near = near_crop_edge(boxes, crop_box, image_box)
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
    box = boxes_of(new[None])[0]
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

def _check_image(image: np.ndarray, image_size: int = registry.IMAGE_SIZE) -> np.ndarray:
    to_rgb(np.asarray(image), image_size)  # validation (shape, dtype, finite values) with the encoder's rules
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
        image = _check_image(image, model.image_size)
        shape = (int(image.shape[0]), int(image.shape[1]))
        if embeddings is not None and tuple(embeddings.original_shape) != shape:
            raise ValueError(f"the embeddings are of an image of shape {tuple(embeddings.original_shape)}, "
                             f"not of this image {shape}")
    else:
        shape = tuple(int(v) for v in embeddings.original_shape)
        if params.crop_n_layers > 0:
            raise ValueError("crop layers (crop_n_layers > 0) need the image: its crops are encoded separately")
    if embeddings is not None:
        check_embeddings(model.family.get("prompt_decoder"), embeddings)
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
    check_min_object_size(min_object_size)
    shape = _checked_shape(model, image, embeddings, params)
    masks = _mask_set(model, None if image is None else np.asarray(image), embeddings, shape, params, progress)

    def paint(i: int, segmentation: np.ndarray, seg_id: int) -> None:
        x0, y0 = int(masks.boxes[i, 0]), int(masks.boxes[i, 1])
        crop = masks.crops[i]
        segmentation[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]][crop] = seg_id

    areas = np.asarray([np.count_nonzero(c) for c in masks.crops], dtype=np.int64)
    return paint_label_image(areas, paint, shape, with_background, min_object_size)
