"""Segment an object from a mask: the box, points and mask prompt µSAM derives from it (``segment_from_mask``).

Semantics of micro_sam 1.8.14 ``prompt_based_segmentation.segment_from_mask`` (and its helpers
``_compute_box_from_mask``, ``_process_box``, ``_compute_points_from_mask``, ``_compute_logits_from_mask``) for
a mask at the image's own size (µSAM's ``original_size`` None, as every projection in 3D uses it):

* **Box**: the mask's bounding box ``(x0, y0, x1 + 1, y1 + 1)``, each side pushed out by ``box_extension``
  (>= 1: that many pixels; below 1: that fraction of the box's extent), clipped to the image, rounded half to
  even (``np.round``).
* **Points**: inside the box (with the extension), the Euclidean distance to the mask's outer boundary
  (``find_boundaries(mode="outer")``), smoothed by a Gaussian of sigma 1 (window radius 3, mirrored borders: as
  bioimage_cpp's ``gaussian_smoothing``). Positive points: the local maxima of the smoothed distance inside the
  mask (``peak_local_max``, ``min_distance=3``); negative: those outside it (``min_distance=5``). With
  ``single_point``: one positive point at the maximum inside the mask. µSAM draws no random numbers here.
* **Mask prompt**: the binary mask resized to L x L (the low-resolution mask size, N / 4 for a model of input
  size N: 256 at 1024; torch's antialiased bilinear ``F.interpolate``), thresholded at 0.5 and turned into logits
  ``±log(0.999 / 0.001)``. µSAM means to resize the longer side to 256 and pad, but segment_anything 1.0's
  ``ResizeLongestSide.apply_image_torch`` takes the size from the batch and channel axes (1, 1), so every mask is
  stretched to 256 x 256 whatever its aspect ratio, and nothing is padded. We reproduce that (for square images
  it is also the intended frame).

The points depend on exact float32 ties between distance maxima (``peak_local_max`` keeps equal maxima in
raster order and thins them by ``min_distance``), so the smoothing reproduces bioimage_cpp 0.9.0's arithmetic bit
for bit, as its AVX2 build computes it (``usam_bioimageio.filters``): a float64 filter agrees only to 1e-7, which moved
a point on 3 of 106 ground-truth masks. On a CPU without AVX2 bioimage_cpp rounds differently (a last-bit matter).

**Tiled embeddings** (µSAM's ``_mask_to_tile`` / ``_tile_to_full_mask``): the object is answered from the tile whose
inner block holds the mask's centroid (the mean of its pixel coordinates, rounded half to even); the mask is cut
to that tile's outer block (halo included), the prompts are derived from the cut mask and decoded on the tile's
embeddings, and the result is pasted into an empty full-size mask at the outer block. µSAM's tiled path has no
multimask output and fails on an empty mask; here an empty mask (``allow_empty``) gives an empty result.
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np

from usam_bioimageio import registry
from usam_bioimageio.embeddings.types import Embeddings, TiledEmbeddings
from usam_bioimageio.errors import InputError
from usam_bioimageio.filters import gaussian_smoothing
from usam_bioimageio.prompting.predict import PromptResult, segment_from_prompts
from usam_bioimageio.runtime.geometry import upscale_masks_binary
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.packages import check_embeddings

__all__ = ["box_from_mask", "logits_from_mask", "points_from_mask", "segment_from_mask"]

# µSAM's _compute_logits_from_mask: logits of probabilities 1 - eps and eps
MASK_PROMPT_EPS = 1e-3
INNER_MIN_DISTANCE, OUTER_MIN_DISTANCE = 3, 5  # µSAM's peak_local_max min_distance for positive / negative
SMOOTHING_SIGMA = 1.0


def _as_mask(mask, what: str = "mask", *, allow_empty: bool = False) -> np.ndarray:
    """A 2D mask as bool (µSAM reads ``mask == 1``); an empty one is refused (it yields no prompt)."""
    a = np.asarray(mask)
    if a.ndim != 2:
        raise InputError(f"{what} must be 2D (H, W), got shape {a.shape}")
    a = a == 1
    if not allow_empty and not a.any():
        raise InputError(f"{what} is empty: no box, points or mask prompt can be derived from it")
    return a


def _decode_without_points(model: SamModel, embeddings: Embeddings, logits, multimask_output: bool) -> PromptResult:
    """SamPredictor.predict with no points and no box (zero sparse prompt tokens, not a padding point), with the
    mask prompt ``logits`` or none: what µSAM decodes for an empty mask."""
    decoder = model.runner("prompt_decoder")
    check_embeddings(decoder.package, embeddings)
    size = registry.low_res_mask_size(model.image_size)
    mask_input = np.zeros((size, size), np.float32) if logits is None else logits
    out = decoder(embeddings=embeddings.features, point_coords=np.zeros((1, 0, 2), np.float32),
                  point_labels=np.zeros((1, 0), np.float32), mask_input=mask_input[None, None],
                  has_mask_input=np.full((1, 1), float(logits is not None), np.float32),
                  orig_im_size=np.asarray(embeddings.original_shape, np.float32))
    tokens = slice(1, None) if multimask_output else slice(0, 1)
    low = np.ascontiguousarray(out["low_res_masks"][:, tokens])
    return PromptResult(masks=upscale_masks_binary(low, embeddings.original_shape, registry.MASK_THRESHOLD,
                                                   model.image_size),
                        scores=np.ascontiguousarray(out["iou_predictions"][:, tokens]), low_res_logits=low)


def _check_extension(box_extension: float) -> float:
    if isinstance(box_extension, bool) or not np.isfinite(box_extension) or box_extension < 0:
        raise InputError(f"box_extension must be a finite number >= 0, got {box_extension!r}")
    return float(box_extension)


def _process_box(box_yx: np.ndarray, shape: Tuple[int, int], box_extension: float) -> np.ndarray:
    """µSAM's ``_process_box`` without ``original_size``: (y0, x0, y1, x1) -> extended, clipped (x0, y0, x1, y1)."""
    y0, x0, y1, x1 = box_yx
    if box_extension == 0:
        ey = ex = 0
    elif box_extension >= 1:  # pixels
        ey = ex = box_extension
    else:  # a fraction of the extent
        ey, ex = box_extension * (y1 - y0), box_extension * (x1 - x0)
    box = np.array([max(x0 - ex, 0), max(y0 - ey, 0), min(x1 + ex, shape[1]), min(y1 + ey, shape[0])])
    return np.round(box).astype(np.int64)


def box_from_mask(*, mask: np.ndarray, box_extension: float = 0.0) -> np.ndarray:
    """The box prompt of a mask: (4,) int64 (x0, y0, x1, y1), x1 / y1 exclusive, extended by ``box_extension``."""
    m = _as_mask(mask)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return _process_box(np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]), m.shape,
                        _check_extension(box_extension))


def _smoothed_distances(boundaries: np.ndarray) -> np.ndarray:
    """bioimage_cpp's ``gaussian_smoothing(distance_transform(boundaries == 0), sigma=1)`` (float32)."""
    from scipy import ndimage

    # the exact EDT; bioimage_cpp returns it as float32 (bit-equal to scipy's, rounded)
    distances = ndimage.distance_transform_edt(~boundaries).astype(np.float32)
    return gaussian_smoothing(distances, SMOOTHING_SIGMA)


def points_from_mask(*, mask: np.ndarray, box_extension: float = 0.0,
                     single_point: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The point prompts of a mask: (coords (n, 2) float64 (x, y), labels (n,) int64 1 / 0), µSAM's maxima of
    the smoothed distance to the mask's boundary (module doc); one positive point with ``single_point``."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import find_boundaries

    m = _as_mask(mask)
    x0, y0, x1, y1 = box_from_mask(mask=m, box_extension=box_extension)
    offset = np.array([y0, x0])
    crop = m[y0:y1, x0:x1]
    distances = _smoothed_distances(find_boundaries(crop, mode="outer"))
    inner = np.where(crop, distances, np.float32(0))
    if single_point:
        center = np.array(np.unravel_index(int(inner.argmax()), inner.shape)) + offset
        return center[None, ::-1].astype(np.float64), np.ones(1, np.int64)
    outer = np.where(crop, np.float32(0), distances)
    inner_max = peak_local_max(inner, exclude_border=False, min_distance=INNER_MIN_DISTANCE)
    outer_max = peak_local_max(outer, exclude_border=False, min_distance=OUTER_MIN_DISTANCE)
    coords = np.concatenate([inner_max, outer_max]).astype(np.float64) + offset
    labels = np.concatenate([np.ones(len(inner_max), np.int64), np.zeros(len(outer_max), np.int64)])
    return coords[:, ::-1].copy(), labels


def _aa_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 weights of torch's ``F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)`` along one axis (PIL's triangle filter, widened by the scale when downscaling)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # interp_size / 2 = 1, times the scale when downscaling
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = np.maximum(1.0 - np.abs((j - center + 0.5) * invscale), 0.0)
        total = w.sum()
        matrix[i, lo:hi] = w / total if total != 0 else w
    return matrix


def logits_from_mask(*, mask: np.ndarray, image_size: int = registry.IMAGE_SIZE) -> np.ndarray:
    """The mask prompt of a mask for a model of input size ``image_size``: (L, L) float32 logits with
    L = image_size / 4 ((256, 256) at 1024; module doc), for ``mask_inputs``.

    Resizing ratios whose weights are dyadic (2x up or down, ...) are exact; otherwise a resized value within
    float rounding of the 0.5 threshold could fall the other way than in torch.
    """
    m = _as_mask(mask).astype(np.float64)
    size = registry.low_res_mask_size(image_size)
    h, w = m.shape
    if (h, w) != (size, size):  # stretched to size x size (module doc: segment_anything's size bug)
        m = _aa_bilinear_matrix(h, size) @ m @ _aa_bilinear_matrix(w, size).T
    high = np.log((1 - MASK_PROMPT_EPS) / MASK_PROMPT_EPS)
    return np.where(m > 0.5, high, -high).astype(np.float32)


def segment_from_mask(
    model: SamModel,
    embeddings: Union[Embeddings, TiledEmbeddings],
    *,
    mask: np.ndarray,
    use_box: bool = True,
    use_mask: bool = True,
    use_points: bool = False,
    single_point: bool = False,
    box_extension: float = 0.0,
    multimask_output: bool = False,
    allow_empty: bool = False,
) -> PromptResult:
    """Segment the object of ``mask`` (H, W) on ``embeddings`` from the prompts µSAM derives from it.

    ``use_box`` / ``use_points`` / ``use_mask`` choose the prompts (any combination but none); ``single_point``
    makes ``use_points`` one positive point. µSAM's defaults: box and mask. The result has one object:
    ``masks`` (1, k, H, W). An empty mask is an error unless ``allow_empty``: then, as µSAM, it gives no box
    or points and an all-background mask prompt, decoded without any point or box (what projecting an object
    that vanished on the previous slice does in µSAM). Tiled embeddings: see the module doc (``masks`` at the
    full size; ``low_res_logits`` in the frame of the object's tile).
    """
    flags = dict(use_box=use_box, use_mask=use_mask, use_points=use_points, single_point=single_point,
                 box_extension=box_extension)
    if isinstance(embeddings, TiledEmbeddings):
        return _segment_from_mask_tiled(model, embeddings, mask, flags, multimask_output, allow_empty)
    if not isinstance(embeddings, Embeddings):
        raise InputError(f"segment_from_mask takes the Embeddings of one 2D image, got {type(embeddings).__name__}")
    m = _as_mask(mask, allow_empty=allow_empty)
    if m.shape != tuple(embeddings.original_shape):
        raise InputError(f"mask of shape {m.shape} does not match the image of shape "
                         f"{tuple(embeddings.original_shape)} the embeddings come from")
    if not (use_box or use_mask or use_points):
        raise InputError("segment_from_mask needs at least one of use_box, use_mask, use_points")
    box_extension = _check_extension(box_extension)
    if not m.any():
        high = np.float32(np.log((1 - MASK_PROMPT_EPS) / MASK_PROMPT_EPS))
        logits = np.full((registry.low_res_mask_size(model.image_size),) * 2, -high, np.float32) if use_mask else None
        return _decode_without_points(model, embeddings, logits, multimask_output)
    points = labels = box = logits = None
    if use_points:
        points, labels = points_from_mask(mask=m, box_extension=box_extension, single_point=single_point)
    if use_box:
        box = box_from_mask(mask=m, box_extension=box_extension).astype(np.float64)
    if use_mask:
        logits = logits_from_mask(mask=m, image_size=model.image_size)
    # no maxima found (e.g. no background in the box) -> no points: as in SamPredictor, only the padding point
    return segment_from_prompts(
        model, embeddings,
        points=None if points is None else points[None], point_labels=None if labels is None else labels[None],
        boxes=None if box is None else box[None], mask_inputs=None if logits is None else logits[None],
        multimask_output=multimask_output)


def _segment_from_mask_tiled(model: SamModel, tiled: TiledEmbeddings, mask, flags: dict, multimask_output: bool,
                             allow_empty: bool) -> PromptResult:
    m = _as_mask(mask, allow_empty=allow_empty)
    if m.shape != tuple(tiled.original_shape):
        raise InputError(f"mask of shape {m.shape} does not match the image of shape {tuple(tiled.original_shape)} "
                         "the embeddings come from")
    if multimask_output:
        raise InputError("multimask output is not available on tiled embeddings (nor in µSAM)")
    size = registry.low_res_mask_size(model.image_size)
    if not m.any():  # nothing to locate a tile with: an empty object stays empty
        high = np.float32(np.log((1 - MASK_PROMPT_EPS) / MASK_PROMPT_EPS))
        return PromptResult(masks=np.zeros((1, 1) + m.shape, bool), scores=np.zeros((1, 1), np.float32),
                            low_res_logits=np.full((1, 1, size, size), -high, np.float32))
    y, x = np.round(np.mean(np.nonzero(m), axis=1)).astype(int)  # µSAM's _mask_to_tile
    tile = tiled.tiling.tile_at(int(y), int(x))
    result = segment_from_mask(model, tiled.tile_embeddings(tile.index), mask=m[tile.outer_slices],
                               multimask_output=False, allow_empty=allow_empty, **flags)
    full = np.zeros((1, 1) + m.shape, bool)
    full[(0, 0) + tile.outer_slices] = result.masks[0, 0]
    return PromptResult(masks=full, scores=result.scores, low_res_logits=result.low_res_logits)
