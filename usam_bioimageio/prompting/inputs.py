"""Decoder inputs from prompts: points, boxes and mask prompts of many objects -> the prompt decoder's tensors,
as ``SamPredictor`` builds them (points and boxes in original image pixels (x, y))."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from usam_bioimageio import registry

PAD_LABEL, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 2, 3


def as_objects(array: Optional[np.ndarray], ndim: int, name: str) -> Optional[np.ndarray]:
    """Add the object axis to a single object's prompt; check the number of dimensions."""
    if array is None:
        return None
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == ndim - 1:
        a = a[None]
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim - 1} or {ndim} dimensions, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def check_inside(coords: np.ndarray, shape: Tuple[int, int], name: str) -> None:
    h, w = shape
    outside = (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | (coords[..., 1] > h)
    if np.any(outside):
        bad = coords[outside][0]
        raise ValueError(f"{name} {bad.tolist()} lies outside the image of width {w} and height {h}")


def build_decoder_inputs(
    original_shape: Tuple[int, int],
    *,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    mask_inputs: Optional[np.ndarray] = None,
    image_size: int = registry.IMAGE_SIZE,
) -> dict:
    """Prompts -> the prompt-decoder package inputs (without embeddings), one row per object, for a model of
    input size ``image_size`` (mask prompts are (objects, image_size / 4, image_size / 4) low-res logits)."""
    size = registry.low_res_mask_size(image_size)
    pts = as_objects(points, 3, "points")
    box = as_objects(boxes, 2, "boxes")
    if pts is None and box is None and mask_inputs is None:
        raise ValueError("give at least one prompt: points, boxes or mask_inputs")
    if pts is not None:
        if point_labels is None:
            raise ValueError("points need point_labels (1 = positive, 0 = negative)")
        lab = np.asarray(point_labels, dtype=np.float64)
        if lab.ndim == pts.ndim - 2:
            lab = lab[None]
        if lab.shape != pts.shape[:2] or pts.shape[-1] != 2:
            raise ValueError(f"points {pts.shape} (objects, points, 2) do not match point_labels {lab.shape}")
        if not np.all(np.isin(lab, (0, 1))):
            raise ValueError("point_labels must be 0 (negative) or 1 (positive)")
        check_inside(pts, original_shape, "point")
    if box is not None:
        if box.shape[-1] != 4:
            raise ValueError(f"boxes must be (x0, y0, x1, y1), got shape {box.shape}")
        if np.any(box[:, 2] < box[:, 0]) or np.any(box[:, 3] < box[:, 1]):
            raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
        check_inside(box.reshape(-1, 2, 2), original_shape, "box corner")
    n = {len(a) for a in (pts, box) if a is not None}
    masks = None
    if mask_inputs is not None:
        masks = np.asarray(mask_inputs, dtype=np.float32)
        if masks.ndim == 2:  # one object
            masks = masks[None]
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.shape[1:] != (1, size, size):
            raise ValueError(f"mask_inputs must be low-resolution logits of shape (objects, {size}, {size}) for a model "
                             f"of input size {image_size}, got {np.shape(mask_inputs)}")
        n.add(len(masks))
    if len(n) != 1:
        raise ValueError(f"prompts disagree on the number of objects: {sorted(n)}")
    (n_obj,) = n

    coords = [np.zeros((n_obj, 0, 2))]
    labels = [np.zeros((n_obj, 0))]
    if pts is not None:
        coords.append(pts)
        labels.append(lab)
    if box is not None:
        coords.append(box.reshape(-1, 2, 2))
        labels.append(np.tile([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], (n_obj, 1)))
    elif pts is not None:  # SamPredictor pads points with one padding point when there is no box
        coords.append(np.zeros((n_obj, 1, 2)))
        labels.append(np.full((n_obj, 1), PAD_LABEL))
    return {
        "point_coords": np.concatenate(coords, axis=1).astype(np.float32),
        "point_labels": np.concatenate(labels, axis=1).astype(np.float32),
        "mask_input": masks if masks is not None else np.zeros((n_obj, 1, size, size), np.float32),
        "has_mask_input": np.full((n_obj, 1), float(masks is not None), np.float32),
        "orig_im_size": np.asarray(original_shape, dtype=np.float32),
    }


def batched_point_prompts(positive: np.ndarray, negative: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """µSAM's batched mode: one object per positive point, every negative point shared by all objects.

    Returns (points (o, 1 + q, 2), point_labels (o, 1 + q)) for ``segment_from_prompts``.
    """
    pos = np.asarray(positive, dtype=np.float64).reshape(-1, 1, 2)
    neg = np.zeros((0, 2)) if negative is None else np.asarray(negative, dtype=np.float64).reshape(-1, 2)
    points = np.concatenate([pos, np.broadcast_to(neg, (len(pos),) + neg.shape)], axis=1)
    labels = np.concatenate([np.ones((len(pos), 1)), np.zeros((len(pos), len(neg)))], axis=1)
    return points, labels
