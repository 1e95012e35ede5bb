"""Prompts sampled from ground truth for µSAM's iterative prompting, as pure numpy functions.

Semantics of micro_sam 1.8.14 (``training.util.ConvertToSamInputs`` with ``PointAndBoxPromptGenerator`` for
the first prompt, ``prompt_generators.IterativePromptGenerator`` for the corrections):

* **Start, point**: one positive point drawn uniformly from the object's pixels (µSAM passes no centres, and
  its dilation only restricts negative points, of which training asks none).
* **Start, box**: the object's bounding box ``(x0, y0, x1, y1)`` with exclusive ends (regionprops), each side
  optionally pushed out by ``uniform(0, distortion) * extent`` (µSAM's ``box_distortion_factor``, default
  0.025), rounded and clipped to the image.
* **Correction** (every later sub-iteration): one positive and one negative point per object, added to the
  prompts already given. Positive: uniform over the pixels the prediction misses (``gt & ~pred``); if there
  are none, over the correctly predicted ones (``gt & pred``) (and, where µSAM would fail because the
  prediction is empty and the object too, over the object). Negative: uniform over the pixels where the
  prediction spills over (``pred & ~gt``); if there are none, over the object's bounding box grown by 3
  pixels minus the object; if empty too, over the background (``~gt``).

Pixel candidates are enumerated in row-major order (``np.nonzero``, like ``torch.where``) and one is drawn
with ``rng.integers(n)`` (µSAM: ``np.random.choice(n)`` on the global state). Points are (x, y) pixel
coordinates in the image's own frame, like the runtime's prompts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "BBOX_MARGIN",
    "bounding_boxes",
    "corrective_points",
    "object_masks",
    "sample_object_ids",
    "starting_boxes",
    "starting_points",
]

BBOX_MARGIN = 3  # IterativePromptGenerator._get_negative_locations_in_obj_bbox(custom_df=3)


def sample_object_ids(labels: np.ndarray, n_objects: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """The object ids of ``labels`` (0 = background), or ``n_objects`` of them drawn without replacement, sorted."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if n_objects is not None and len(ids) > n_objects:
        ids = np.sort(rng.choice(ids, size=n_objects, replace=False))
    return ids


def object_masks(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """(n, H, W) bool: one mask per id."""
    return np.stack([labels == i for i in ids]) if len(ids) else np.zeros((0,) + labels.shape, bool)


def _draw(rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> Tuple[int, int]:
    idx = int(rng.integers(len(rows)))
    return int(cols[idx]), int(rows[idx])


def starting_points(masks: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One positive point per object: coords (n, 1, 2) float32 (x, y), labels (n, 1) int64."""
    coords = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            raise ValueError("cannot sample a point from an empty object mask")
        coords.append([_draw(rows, cols, rng)])
    return np.asarray(coords, np.float32).reshape(-1, 1, 2), np.ones((len(masks), 1), np.int64)


def bounding_boxes(masks: np.ndarray) -> np.ndarray:
    """(n, 4) int64 boxes (x0, y0, x1, y1), x1 / y1 exclusive (skimage regionprops' bbox, in SAM's order)."""
    boxes = []
    for mask in masks:
        rows = np.nonzero(mask.any(axis=1))[0]
        cols = np.nonzero(mask.any(axis=0))[0]
        if len(rows) == 0:
            raise ValueError("cannot take the bounding box of an empty object mask")
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return np.asarray(boxes, np.int64).reshape(-1, 4)


def starting_boxes(masks: np.ndarray, rng: np.random.Generator, distortion: Optional[float] = None) -> np.ndarray:
    """One box per object, (n, 4) float32 (x0, y0, x1, y1); with ``distortion`` each side is pushed outwards
    by ``uniform(0, distortion) * extent`` (µSAM's order of draws: y0, y1, x0, x1), rounded, clipped."""
    boxes = bounding_boxes(masks)
    if distortion:
        h, w = masks.shape[-2:]
        out = []
        for x0, y0, x1, y1 in boxes:
            ly, lx = y1 - y0, x1 - x0
            y0 = int(round(max(0, y0 - rng.uniform(0, distortion) * ly)))
            y1 = int(round(min(h, y1 + rng.uniform(0, distortion) * ly)))
            x0 = int(round(max(0, x0 - rng.uniform(0, distortion) * lx)))
            x1 = int(round(min(w, x1 + rng.uniform(0, distortion) * lx)))
            out.append([x0, y0, x1, y1])
        boxes = np.asarray(out, np.int64).reshape(-1, 4)
    return boxes.astype(np.float32)


def _positive_candidates(gt: np.ndarray, pred: np.ndarray):
    for region in (gt & ~pred, gt & pred, gt):
        rows, cols = np.nonzero(region)
        if len(rows):
            return rows, cols
    raise ValueError("cannot sample a positive point for an empty object mask")


def _negative_candidates(gt: np.ndarray, pred: np.ndarray):
    rows, cols = np.nonzero(pred & ~gt)
    if len(rows):
        return rows, cols
    h, w = gt.shape
    obj_rows, obj_cols = np.nonzero(gt)
    if len(obj_rows):
        box = np.zeros_like(gt)
        box[max(obj_rows.min() - BBOX_MARGIN, 0):min(obj_rows.max() + 1 + BBOX_MARGIN, h),
            max(obj_cols.min() - BBOX_MARGIN, 0):min(obj_cols.max() + 1 + BBOX_MARGIN, w)] = True
        rows, cols = np.nonzero(box & ~gt)
        if len(rows):
            return rows, cols
    rows, cols = np.nonzero(~gt)
    if len(rows):
        return rows, cols
    raise ValueError("cannot sample a negative point: the object covers the whole image")


def corrective_points(gt_masks: np.ndarray, pred_masks: np.ndarray,
                      rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One positive and one negative point per object from where the prediction is wrong.

    ``gt_masks``, ``pred_masks``: (n, H, W) bool. Returns coords (n, 2, 2) float32 (x, y) and labels (n, 2)
    int64 ``[1, 0]``. All positive points are drawn first, then all negative ones, as µSAM does.
    """
    gt_masks = np.asarray(gt_masks, bool)
    pred_masks = np.asarray(pred_masks, bool)
    if gt_masks.shape != pred_masks.shape:
        raise ValueError(f"ground truth {gt_masks.shape} and prediction {pred_masks.shape} differ in shape")
    positive = [_draw(*_positive_candidates(g, p), rng) for g, p in zip(gt_masks, pred_masks)]
    negative = [_draw(*_negative_candidates(g, p), rng) for g, p in zip(gt_masks, pred_masks)]
    coords = np.asarray([[pos, neg] for pos, neg in zip(positive, negative)], np.float32).reshape(-1, 2, 2)
    labels = np.tile(np.asarray([[1, 0]], np.int64), (len(gt_masks), 1))
    return coords, labels
