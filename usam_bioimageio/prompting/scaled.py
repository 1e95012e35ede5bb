"""Prompted segmentation at another pixel scale: the image is enlarged ``scale`` times before it is encoded
(``runtime.pixel_scale.scale_image``, tiled or not), the prompts are moved onto it, and every mask is shrunk back
to the image.

A model trained on crops of images enlarged S times (``usam train --scale S``) knows objects at that size, and its
low-res masks (N / 4 per side) are finer there: a 256 model gives one mask pixel per 2 image pixels on a 2x tile,
where the whole image shrunk into its frame gives a 696-pixel-wide image one per ~11.

- Prompts (x, y) in the image's pixels move to ``x * W' / W``, ``y * H' / H`` (the enlarged image is
  (H', W') = ``scaled_shape``), the mapping of SAM's own resize (``ResizeLongestSide.apply_coords``).
- A mask comes back as the enlarged mask resized to (H, W) the way ``resize_maps`` resizes AIS maps (bilinear,
  pixel-area alignment, edges replicated); an image pixel belongs to the object where that is >= 0.5 (at scale 2:
  at least 2 of the 4 enlarged pixels over it). Only the rows and columns the object touches are interpolated,
  so shrinking costs the object's size, not the image's.
- Mask prompts (low-res logits of the model's frame) cannot be moved to another scale and are refused.

At scale 1 nothing is resized: the results equal ``segment_from_prompts`` / ``segment_from_prompts_tiled``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from usam_bioimageio.embeddings.types import Embeddings, TiledEmbeddings
from usam_bioimageio.io.prompt_files import ObjectPrompt
from usam_bioimageio.prompting.inputs import build_decoder_inputs
from usam_bioimageio.prompting.predict import DEFAULT_BATCH_SIZE, _object_batches, label_objects, segment_from_prompts
from usam_bioimageio.prompting.tiled import _decode, _place_objects, label_objects_tiled, segment_from_prompts_tiled
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.pixel_scale import check_scale, scaled_shape

__all__ = ["ScaledPromptResult", "shrink_mask", "scale_objects", "segment_from_prompts_scaled",
           "label_objects_scaled"]

AnyEmbeddings = Union[Embeddings, TiledEmbeddings]


@dataclass(frozen=True)
class ScaledPromptResult:
    """masks (o, k, H, W) bool at the image's size; scores (o, k) predicted IoU."""

    masks: np.ndarray
    scores: np.ndarray


def _taps(n_out: int, n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n_in to n_out samples with pixel-area alignment (``ndimage.zoom(order=1,
    grid_mode=True, mode="nearest")``): output i reads (1 - w) * in[lo] + w * in[hi]."""
    c = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(c).astype(np.intp)
    return lo, np.minimum(lo + 1, n_in - 1), c - lo


def _shrunk_block(mask: np.ndarray, shape: Tuple[int, int]):
    """The object of the enlarged ``mask`` (H', W') at the image's ``shape``: (row slice, column slice, bool
    block), only over the pixels it can reach; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    out = []
    for n_out, n_in, (first, last) in ((shape[0], mask.shape[0], rows[[0, -1]]), (shape[1], mask.shape[1], cols[[0, -1]])):
        lo, hi, w = _taps(n_out, n_in)
        # lo and hi grow with the output index: the outputs that read the object's span form one range
        sl = slice(int(np.searchsorted(hi, first, "left")), int(np.searchsorted(lo, last, "right")))
        out.append((sl, lo[sl], hi[sl], w[sl]))
    (ys, r_lo, r_hi, wr), (xs, c_lo, c_hi, wc) = out
    m = mask.astype(np.float64)
    wr, wc = wr[:, None], wc[None, :]
    top = m[np.ix_(r_lo, c_lo)] * (1 - wc) + m[np.ix_(r_lo, c_hi)] * wc
    bottom = m[np.ix_(r_hi, c_lo)] * (1 - wc) + m[np.ix_(r_hi, c_hi)] * wc
    return ys, xs, (top * (1 - wr) + bottom * wr) >= 0.5


def shrink_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A mask (H', W') of the enlarged image -> (H, W) = ``shape`` bool (module doc)."""
    mask = np.asarray(mask, dtype=bool)
    shape = (int(shape[0]), int(shape[1]))
    if mask.shape == shape:
        return mask.copy()
    out = np.zeros(shape, dtype=bool)
    block = _shrunk_block(mask, shape)
    if block is not None:
        out[block[0], block[1]] = block[2]
    return out


def _check(embeddings: AnyEmbeddings, shape: Sequence[int], scale: float) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(image shape, enlarged shape), checking that the embeddings are of the image enlarged ``scale`` times."""
    if not isinstance(embeddings, (Embeddings, TiledEmbeddings)):
        raise TypeError(f"expected the Embeddings or TiledEmbeddings of the enlarged image, got "
                        f"{type(embeddings).__name__}")
    shape = (int(shape[0]), int(shape[1]))
    enlarged = scaled_shape(shape, check_scale(scale))
    if tuple(embeddings.original_shape) != enlarged:
        raise ValueError(f"the embeddings are of an image of shape {tuple(embeddings.original_shape)}, not of the "
                         f"{shape} image enlarged {scale:g} times {enlarged} (scale_image(image, {scale:g}))")
    return shape, enlarged


def _ratios(shape: Tuple[int, int], enlarged: Tuple[int, int]) -> np.ndarray:
    """(x, y) factors from the image's pixels to the enlarged image's."""
    return np.array([enlarged[1] / shape[1], enlarged[0] / shape[0]])


def _moved(points, boxes, ratios):
    points = None if points is None else np.asarray(points, dtype=np.float64) * ratios
    boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64) * np.tile(ratios, 2)
    return points, boxes


def segment_from_prompts_scaled(
    model: SamModel,
    embeddings: AnyEmbeddings,
    *,
    shape: Sequence[int],
    scale: float,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    multimask_output: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ScaledPromptResult:
    """``segment_from_prompts`` (or its tiled form) of an image of ``shape`` (H, W) at pixel ``scale``.

    ``embeddings``: of ``scale_image(image, scale)``, plain or tiled (``compute_image_embeddings``). Prompts as in
    ``segment_from_prompts``, in the image's pixels (no mask prompts); masks come back at (H, W)."""
    shape, enlarged = _check(embeddings, shape, scale)
    # the prompts are checked against the image they are given for, before they are moved
    build_decoder_inputs(shape, points=points, point_labels=point_labels, boxes=boxes, image_size=model.image_size)
    points, boxes = _moved(points, boxes, _ratios(shape, enlarged))
    run = segment_from_prompts_tiled if isinstance(embeddings, TiledEmbeddings) else segment_from_prompts
    result = run(model, embeddings, points=points, point_labels=point_labels, boxes=boxes,
                 multimask_output=multimask_output, batch_size=batch_size)
    if enlarged == shape:
        return ScaledPromptResult(masks=result.masks, scores=result.scores)
    masks = np.zeros(result.masks.shape[:2] + shape, dtype=bool)
    for i, j in np.ndindex(*masks.shape[:2]):
        masks[i, j] = shrink_mask(result.masks[i, j], shape)
    return ScaledPromptResult(masks=masks, scores=result.scores)


def scale_objects(objects: List[ObjectPrompt], shape: Sequence[int], enlarged: Sequence[int]) -> List[ObjectPrompt]:
    """The objects' prompts moved from an image of ``shape`` to it enlarged to ``enlarged``; ValueError for a
    mask prompt."""
    ratios = _ratios(tuple(shape), tuple(enlarged))
    moved = []
    for i, o in enumerate(objects):
        if o.mask is not None:
            name = o.name if o.name is not None else i
            raise ValueError(f"object {name} has a mask prompt (low-res logits of the model's frame), which cannot "
                             "be moved to another pixel scale; segment at scale 1")
        points, box = _moved(o.points, o.box, ratios)
        moved.append(dataclasses.replace(o, points=points, box=box))
    return moved


def _enlarged_batches(model: SamModel, embeddings: AnyEmbeddings, objects: List[ObjectPrompt],
                      batch_size: int) -> Iterator[Tuple[List[int], Iterator[np.ndarray]]]:
    """(object indices, their (H', W') masks) per decoder batch, plain or tiled embeddings."""
    if isinstance(embeddings, TiledEmbeddings):
        placed = _place_objects(model, embeddings, objects)
        full = embeddings.original_shape
        for idx, result, tile in _decode(model, embeddings, placed, False, batch_size):
            def masks(result=result, tile=tile):
                for j in range(len(result.masks)):
                    m = np.zeros(full, dtype=bool)
                    m[tile.outer_slices] = result.masks[j, 0]
                    yield m
            yield idx, masks()
    else:
        for idx, batch in _object_batches(model, embeddings, objects, batch_size):
            yield idx, iter(batch)


def label_objects_scaled(model: SamModel, embeddings: AnyEmbeddings, objects: List[ObjectPrompt], *,
                         shape: Sequence[int], scale: float, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """``label_objects`` (or ``label_objects_tiled``) of an image of ``shape`` at pixel ``scale``: (H, W) uint32
    labels 1..o, later objects drawn over earlier ones; ``embeddings`` of ``scale_image(image, scale)``, the
    objects' prompts in the image's pixels."""
    shape, enlarged = _check(embeddings, shape, scale)
    if enlarged == shape:  # nothing to resize
        if isinstance(embeddings, TiledEmbeddings):
            return label_objects_tiled(model, embeddings, objects, batch_size=batch_size)
        return label_objects(model, embeddings, objects, batch_size=batch_size)
    if not objects:
        raise ValueError("no objects to segment")
    for o in objects:  # every prompt is checked in the image's pixels before any is decoded
        build_decoder_inputs(shape, points=None if o.points is None else np.reshape(o.points, (-1, 2)),
                             point_labels=o.point_labels, boxes=o.box, mask_inputs=o.mask, image_size=model.image_size)
    labels = np.zeros(shape, dtype=np.uint32)
    for idx, masks in _enlarged_batches(model, embeddings, scale_objects(objects, shape, enlarged), batch_size):
        for i, mask in zip(idx, masks):
            # drawing object i as max(label, i) keeps masks_to_labels' rule whatever the batch order
            block = _shrunk_block(mask, shape)
            if block is not None:
                region = labels[block[0], block[1]]
                np.maximum(region, np.uint32(i + 1), out=region, where=block[2])
    return labels
