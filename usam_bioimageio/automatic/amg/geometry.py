"""SAM's automatic mask generator's geometry (segment_anything.utils.amg): point grids, crop boxes, box NMS,
mask boxes and the crop-edge test."""

from __future__ import annotations

import math
from itertools import product
from typing import List, Sequence, Tuple

import numpy as np


EDGE_TOLERANCE = 20.0  # is_box_near_crop_edge(atol=20)


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


def boxes_of(masks: np.ndarray) -> np.ndarray:
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


def near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], image_box: Sequence[int]) -> np.ndarray:
    """``is_box_near_crop_edge`` for boxes already in image coordinates."""
    b = boxes.astype(np.float32)
    crop = np.asarray(crop_box, dtype=np.float32)[None]
    image = np.asarray(image_box, dtype=np.float32)[None]
    near_crop = np.abs(b - crop) <= EDGE_TOLERANCE
    near_image = np.abs(b - image) <= EDGE_TOLERANCE
    return np.any(near_crop & ~near_image, axis=1)
