"""Segment objects from prompts on tiled embeddings, the way micro-sam 1.8.14 does.

micro-sam (``prompt_based_segmentation._points_to_tile`` / ``_box_to_tile`` / ``_tile_to_full_mask``):

- the tile of an object is the one whose *inner* block holds the prompt's centre: the box centre
  ``((x0 + x1) / 2, (y0 + y1) / 2)`` for a box, the mean of all its points (negatives included) otherwise,
  rounded to a pixel (numpy's round-half-to-even, as micro-sam);
- prompts move into the frame of that tile's *outer* block (minus ``outer_begin``); points that fall
  outside the outer block are dropped with a warning; a box is clipped to the outer block;
- the decoded mask (the whole outer block, halo included) is pasted into a full-size mask at the outer
  block's position; everything else is background.

Where micro-sam raises for a box and points that fall into different tiles, the box decides here.
Mask prompts (``mask_inputs``, low-resolution logits) are in the frame of the object's tile, e.g. the
``low_res_logits`` of an earlier result for the same object; they need a point or a box to locate the tile.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.io.prompt_files import ObjectPrompt
from usam_bioimageio.prompting.inputs import as_objects, build_decoder_inputs
from usam_bioimageio.prompting.predict import DEFAULT_BATCH_SIZE, _check_batch_size, _decode_batch
from usam_bioimageio.embeddings.types import Tile, TiledEmbeddings, Tiling


@dataclass(frozen=True)
class TiledPromptResult:
    """masks (o, k, H, W) bool at full-image size; scores (o, k); low_res_logits (o, k, L, L) (L = N / 4) in the
    frame of each object's tile; tiles (o,) the tile id each object was decoded from."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    tiles: np.ndarray


def _centre_pixel(xy: np.ndarray, shape: Tuple[int, int]) -> Tuple[int, int]:
    """(x, y) -> the (y, x) pixel micro-sam looks the tile up with (rounded, kept inside the image)."""
    x, y = np.round(np.asarray(xy, dtype=np.float64)).astype(int)
    return int(np.clip(y, 0, shape[0] - 1)), int(np.clip(x, 0, shape[1] - 1))


def choose_tile(tiling: Tiling, *, points: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None) -> Tile:
    """The tile micro-sam answers an object from: box centre if there is a box, else the mean point."""
    if box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(4)
        centre = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    elif points is not None and len(np.asarray(points).reshape(-1, 2)):
        centre = np.asarray(points, dtype=np.float64).reshape(-1, 2).mean(axis=0)
    else:
        raise ValueError("an object on tiled embeddings needs points or a box to choose its tile")
    return tiling.tile_at(*_centre_pixel(centre, tiling.shape))


@dataclass
class _Placed:
    """One object's prompts in the frame of its tile."""

    tile: Tile
    points: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    box: Optional[np.ndarray]
    mask: Optional[np.ndarray]

    def key(self) -> tuple:
        n_points = 0 if self.points is None else len(self.points)
        return self.tile.index, n_points, self.box is not None, self.mask is not None


def _place(tiling: Tiling, i: int, points, labels, box, mask) -> _Placed:
    tile = choose_tile(tiling, points=points, box=box)
    (oy, ox), (h, w) = tile.outer_begin, tile.outer_shape
    if points is not None:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2) - (ox, oy)
        lab = np.asarray(labels).reshape(-1)
        keep = (p >= 0).all(axis=1) & (p[:, 0] < w) & (p[:, 1] < h)
        if not keep.all():
            warnings.warn(f"object {i}: {int((~keep).sum())} of its points lie outside its tile {tile.index} "
                          "(with halo) and are dropped, as micro-sam does", stacklevel=3)
        points, labels = (p[keep], lab[keep]) if keep.any() else (None, None)
    if box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(4)
        box = np.array([max(b[0] - ox, 0), max(b[1] - oy, 0), min(b[2] - ox, w), min(b[3] - oy, h)])
    if points is None and box is None:
        raise ValueError(f"object {i}: none of its points lies in its tile {tile.index} with halo; "
                         "use a larger halo or tile_shape")
    return _Placed(tile, points, labels, box, None if mask is None else np.asarray(mask, np.float32))


def _decode(model: SamModel, tiled: TiledEmbeddings, placed: List[_Placed], multimask_output: bool,
            batch_size: int):
    """Decode placed objects grouped by (tile, prompt structure), at most ``batch_size`` per decoder call;
    yields (object indices, PromptResult, tile) per batch."""
    batch_size = _check_batch_size(batch_size)
    groups: Dict[tuple, List[int]] = {}
    for i, obj in enumerate(placed):
        groups.setdefault(obj.key(), []).append(i)
    embeddings: Dict[int, Embeddings] = {}
    for (t, n_points, has_box, has_mask), group in sorted(groups.items()):
        if t not in embeddings:
            embeddings[t] = tiled.tile_embeddings(t)
        for start in range(0, len(group), batch_size):
            idx = group[start:start + batch_size]
            members = [placed[i] for i in idx]
            prompts = {
                "points": np.stack([m.points for m in members]) if n_points else None,
                "point_labels": np.stack([m.labels for m in members]) if n_points else None,
                "boxes": np.stack([m.box for m in members]) if has_box else None,
                "mask_inputs": np.stack([m.mask for m in members]) if has_mask else None,
            }
            # as decoding the whole (tile, structure) group in one call (predict's module doc)
            result = _decode_batch(model, embeddings[t], prompts, multimask_output=multimask_output,
                                   group_size=len(group))
            yield idx, result, members[0].tile


def segment_from_prompts_tiled(
    model: SamModel,
    tiled: TiledEmbeddings,
    *,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    mask_inputs: Optional[np.ndarray] = None,
    multimask_output: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TiledPromptResult:
    """``segment_from_prompts`` on tiled embeddings: each object is decoded from its tile (see module doc).

    Prompts as in ``segment_from_prompts``, in full-image pixel coordinates (x, y); masks come back at
    full-image size (o, k, H, W), zero outside each object's outer tile; ``batch_size`` objects per
    decoder call.
    """
    # validates every prompt against the full image (shapes, labels, inside the image)
    build_decoder_inputs(tiled.original_shape, points=points, point_labels=point_labels, boxes=boxes,
                         mask_inputs=mask_inputs, image_size=model.image_size)
    pts, box = as_objects(points, 3, "points"), as_objects(boxes, 2, "boxes")
    if pts is None and box is None:
        raise ValueError("on tiled embeddings every object needs points or a box to choose its tile; "
                         "mask_inputs alone do not locate it")
    n = len(pts) if pts is not None else len(box)
    lab = None if pts is None else np.asarray(point_labels, dtype=np.float64).reshape(pts.shape[:2])
    masks_in = None
    if mask_inputs is not None:
        masks_in = np.asarray(mask_inputs, np.float32).reshape((n,) + np.shape(mask_inputs)[-2:])
    placed = [_place(tiled.tiling, i, None if pts is None else pts[i], None if lab is None else lab[i],
                     None if box is None else box[i], None if masks_in is None else masks_in[i]) for i in range(n)]
    k = 3 if multimask_output else 1
    h, w = tiled.original_shape
    masks = np.zeros((n, k, h, w), dtype=bool)
    scores = np.zeros((n, k), dtype=np.float32)
    low = None
    tiles = np.array([p.tile.index for p in placed], dtype=np.int64)
    for idx, result, tile in _decode(model, tiled, placed, multimask_output, batch_size):
        if low is None:
            low = np.zeros((n,) + result.low_res_logits.shape[1:], dtype=np.float32)
        ys, xs = tile.outer_slices
        for j, i in enumerate(idx):
            masks[i, :, ys, xs] = result.masks[j]
            scores[i] = result.scores[j]
            low[i] = result.low_res_logits[j]
    return TiledPromptResult(masks=masks, scores=scores, low_res_logits=low, tiles=tiles)


def _place_objects(model: SamModel, tiled: TiledEmbeddings, objects: list) -> List[_Placed]:
    if not objects:
        raise ValueError("no objects to segment")
    placed = []
    for i, o in enumerate(objects):
        build_decoder_inputs(tiled.original_shape, points=None if o.points is None else np.reshape(o.points, (-1, 2)),
                             point_labels=o.point_labels, boxes=o.box, mask_inputs=o.mask, image_size=model.image_size)
        placed.append(_place(tiled.tiling, i, o.points, o.point_labels, o.box, o.mask))
    return placed


def segment_objects_tiled(model: SamModel, tiled: TiledEmbeddings, objects: List[ObjectPrompt], *,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """``segment_objects`` on tiled embeddings: (o, H, W) bool full-size masks in input order."""
    placed = _place_objects(model, tiled, objects)
    h, w = tiled.original_shape
    masks = np.zeros((len(placed), h, w), dtype=bool)
    for idx, result, tile in _decode(model, tiled, placed, False, batch_size):
        ys, xs = tile.outer_slices
        for j, i in enumerate(idx):
            masks[i, ys, xs] = result.masks[j, 0]
    return masks


def label_objects_tiled(model: SamModel, tiled: TiledEmbeddings, objects: List[ObjectPrompt], *,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """``masks_to_labels(segment_objects_tiled(...))`` without the full-size masks of every object:
    (H, W) uint32 labels 1..o, later objects drawn over earlier ones; memory O(image + batch_size x tile).

    Batches come in (tile, prompt structure) order; drawing object i as ``max(label, i)`` gives every pixel
    the last object in input order that covers it, whatever the order of drawing (masks_to_labels' rule).
    """
    placed = _place_objects(model, tiled, objects)
    labels = np.zeros(tiled.original_shape, dtype=np.uint32)
    for idx, result, tile in _decode(model, tiled, placed, False, batch_size):
        region = labels[tile.outer_slices]  # a view: drawing into it draws into labels
        for j, i in enumerate(idx):
            np.maximum(region, np.uint32(i + 1), out=region, where=result.masks[j, 0])
    return labels
