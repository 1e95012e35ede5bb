"""Segment objects from point, box and mask prompts, many objects per call.

The semantics are those of segment_anything's ``SamPredictor.predict`` applied to each object:
points and boxes in original image pixel coordinates (x, y), labels 1 = positive, 0 = negative, a mask
prompt is a previous low-resolution logit map (256 x 256), single-mask output is mask token 0 and
multimask output are tokens 1..3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import registry
from .embeddings import Embeddings
from .model import SamModel
from .packages import PackageError
from .preprocess import upscale_masks_binary

PAD_LABEL, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 2, 3


@dataclass(frozen=True)
class PromptResult:
    """masks (o, k, H, W) bool; scores (o, k) predicted IoU; low_res_logits (o, k, 256, 256), which can be
    passed back as ``mask_inputs`` for a refinement."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


def _as_objects(array: Optional[np.ndarray], ndim: int, name: str) -> Optional[np.ndarray]:
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


def _check_inside(coords: np.ndarray, shape: Tuple[int, int], name: str) -> None:
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
) -> dict:
    """Prompts -> the prompt-decoder package inputs (without embeddings), one row per object."""
    pts = _as_objects(points, 3, "points")
    box = _as_objects(boxes, 2, "boxes")
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
        _check_inside(pts, original_shape, "point")
    if box is not None:
        if box.shape[-1] != 4:
            raise ValueError(f"boxes must be (x0, y0, x1, y1), got shape {box.shape}")
        if np.any(box[:, 2] < box[:, 0]) or np.any(box[:, 3] < box[:, 1]):
            raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
        _check_inside(box.reshape(-1, 2, 2), original_shape, "box corner")
    n = {len(a) for a in (pts, box) if a is not None}
    masks = None
    if mask_inputs is not None:
        masks = np.asarray(mask_inputs, dtype=np.float32)
        size = registry.LOW_RES_MASK_SIZE
        if masks.ndim == 2:  # one object
            masks = masks[None]
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.shape[1:] != (1, size, size):
            raise ValueError(f"mask_inputs must be low-resolution logits of shape (objects, {size}, {size})")
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
    size = registry.LOW_RES_MASK_SIZE
    return {
        "point_coords": np.concatenate(coords, axis=1).astype(np.float32),
        "point_labels": np.concatenate(labels, axis=1).astype(np.float32),
        "mask_input": masks if masks is not None else np.zeros((n_obj, 1, size, size), np.float32),
        "has_mask_input": np.full((n_obj, 1), float(masks is not None), np.float32),
        "orig_im_size": np.asarray(original_shape, dtype=np.float32),
    }


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
    decoder = model.runner("prompt_decoder")
    expected = decoder.package.config.get("image_encoder", {}).get("onnx_sha256")
    if expected and embeddings.encoder and expected != embeddings.encoder:
        raise PackageError("these embeddings come from another image encoder than this decoder was exported for")
    inputs = build_decoder_inputs(
        embeddings.original_shape, points=points, point_labels=point_labels, boxes=boxes, mask_inputs=mask_inputs
    )
    out = decoder(embeddings=embeddings.features, **inputs)
    tokens = slice(1, None) if multimask_output else slice(0, 1)
    low = out["low_res_masks"][:, tokens]
    masks = upscale_masks_binary(low, embeddings.original_shape, registry.MASK_THRESHOLD)
    return PromptResult(masks=masks, scores=out["iou_predictions"][:, tokens], low_res_logits=low)


def batched_point_prompts(positive: np.ndarray, negative: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """µSAM's batched mode: one object per positive point, every negative point shared by all objects.

    Returns (points (o, 1 + q, 2), point_labels (o, 1 + q)) for ``segment_from_prompts``.
    """
    pos = np.asarray(positive, dtype=np.float64).reshape(-1, 1, 2)
    neg = np.zeros((0, 2)) if negative is None else np.asarray(negative, dtype=np.float64).reshape(-1, 2)
    points = np.concatenate([pos, np.broadcast_to(neg, (len(pos),) + neg.shape)], axis=1)
    labels = np.concatenate([np.ones((len(pos), 1)), np.zeros((len(pos), len(neg)))], axis=1)
    return points, labels


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object: any of points (p, 2) with labels (p,), a box (4,), a mask (256, 256)."""

    points: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None

    def signature(self) -> Tuple[int, bool, bool]:
        n = 0 if self.points is None else len(np.asarray(self.points).reshape(-1, 2))
        return n, self.box is not None, self.mask is not None


def segment_objects(model: SamModel, embeddings: Embeddings, objects: list) -> np.ndarray:
    """Segment objects whose prompts differ in kind or number; returns (o, H, W) bool masks in input order.

    Objects with the same prompt structure are decoded together; padding them to a common structure
    would change SAM's result, so differently structured objects go to separate calls.
    """
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


def read_prompts(path) -> list:
    """Read object prompts from JSON or CSV.

    JSON: {"objects": [{"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1]}, ...]}
    (a bare list of objects works too). CSV with a header: object,kind,x,y,label,x1,y1 where kind is
    "point" (x, y, label) or "box" (x, y = top-left, x1, y1 = bottom-right); rows of one object share `object`.
    """
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.get("objects", []) if isinstance(data, dict) else data
        objects = []
        for k, item in enumerate(items):
            pts = item.get("points")
            labels = item.get("labels", [1] * len(pts) if pts else None)
            if pts is not None and len(labels) != len(pts):
                raise ValueError(f"object {k}: {len(pts)} points but {len(labels)} labels")
            objects.append(ObjectPrompt(points=pts, point_labels=labels, box=item.get("box")))
    elif path.suffix.lower() == ".csv":
        rows: dict = {}
        with path.open(newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                obj = rows.setdefault(row["object"], {"points": [], "labels": [], "box": None})
                if row["kind"] == "point":
                    obj["points"].append([float(row["x"]), float(row["y"])])
                    obj["labels"].append(int(row.get("label") or 1))
                elif row["kind"] == "box":
                    obj["box"] = [float(row["x"]), float(row["y"]), float(row["x1"]), float(row["y1"])]
                else:
                    raise ValueError(f"{path}:{line}: kind must be 'point' or 'box', not {row['kind']!r}")
        objects = [ObjectPrompt(points=o["points"] or None, point_labels=o["labels"] or None, box=o["box"])
                   for o in rows.values()]
    else:
        raise ValueError(f"prompt files are .json or .csv, not {path.suffix!r}")
    if not objects:
        raise ValueError(f"{path} holds no objects")
    return objects
