"""Runtime-side image and prompt geometry of µSAM / SAM, in numpy only (no torch import).

- :func:`to_rgb`: µSAM's channel mapping (micro_sam 1.8.14 ``util._to_image``, before its normalisation,
  which the packaged image encoder does in its graph) plus input validation.
- :func:`longest_side_shape`, :func:`transform_coords`, :func:`transform_boxes`: segment_anything's
  ``ResizeLongestSide`` geometry for prompts given in original-image pixels.
- :func:`upscale_masks`: ``Sam.postprocess_masks`` (low-res logits -> original size) as two
  precomputed interpolation matrices.

Every function takes the model's input size N (``image_size``, default SAM's 1024): images are resized so
that their longer side is N and padded to N x N, low-resolution masks are N / 4 on a side (256 at 1024).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Sequence, Tuple

import numpy as np

from usam_bioimageio.registry import IMAGE_SIZE, check_image_size, low_res_mask_size

__all__ = [
    "interpolation_matrix",
    "longest_side_shape",
    "mask_upscale_matrix",
    "to_rgb",
    "transform_boxes",
    "transform_coords",
    "upscale_masks",
    "upscale_masks_binary",
    "upscale_support",
]


def longest_side_shape(h: int, w: int, target: int = IMAGE_SIZE) -> Tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape``: (h, w) scaled so that the longer side is ``target``."""
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"image height and width must be >= 1, got {(h, w)}")
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_rgb(image: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Map a 2D image to (H, W, 3) the way µSAM does; the dtype is kept.

    (H, W) and (H, W, 1): replicated to three channels; (H, W, 2): a zero third channel is added;
    (H, W, 3): unchanged; (H, W, C > 3): the first three channels, with a warning. Raises ValueError for
    other shapes, empty images, non-numeric or complex dtypes, NaN / inf pixels, and images so elongated
    that SAM's resize (longer side to ``image_size``) would give a side of 0 pixels.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"image must be numeric (bool, int, uint or float), got dtype {image.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(
            f"image must be 2D: (H, W) or (H, W, C) with channels last, got shape {image.shape}; "
            "for 3D or time series data pass one 2D plane at a time"
        )
    if image.size == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.ndim == 2:
        rgb = np.stack([image] * 3, axis=-1)
    elif image.shape[-1] == 1:
        rgb = np.concatenate([image] * 3, axis=-1)
    elif image.shape[-1] == 2:
        rgb = np.concatenate([image, np.zeros(image.shape[:2] + (1,), dtype=image.dtype)], axis=-1)
    elif image.shape[-1] == 3:
        rgb = image
    else:
        warnings.warn(
            f"image has {image.shape[-1]} channels (shape {image.shape}); using the first three", stacklevel=2
        )
        rgb = image[..., :3]
    if rgb.dtype.kind == "f" and not np.isfinite(rgb).all():
        n_bad = int(np.count_nonzero(~np.isfinite(rgb)))
        raise ValueError(f"image has {n_bad} NaN or infinite pixel values")
    h, w = rgb.shape[:2]
    new_h, new_w = longest_side_shape(h, w, image_size)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"image of shape {(h, w)} is too elongated: resizing its longer side to {image_size} "
            f"gives {(new_h, new_w)} pixels; crop or tile it first"
        )
    return np.ascontiguousarray(rgb)


def _original_hw(original_shape: Sequence[int]) -> Tuple[int, int]:
    if len(original_shape) < 2:
        raise ValueError(f"original_shape must be (H, W, ...), got {tuple(original_shape)}")
    return int(original_shape[0]), int(original_shape[1])


def transform_coords(coords: np.ndarray, original_shape: Sequence[int], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """``ResizeLongestSide(image_size).apply_coords``: (..., 2) points as (x, y) in original pixels -> model input.

    Returns a float64 copy: ``x * (new_w / w)``, ``y * (new_h / h)``.
    """
    h, w = _original_hw(original_shape)
    new_h, new_w = longest_side_shape(h, w, image_size)
    coords = np.array(coords, dtype=float)  # a copy
    if coords.shape[-1:] != (2,):
        raise ValueError(f"coords must have shape (..., 2) as (x, y), got {coords.shape}")
    coords[..., 0] = coords[..., 0] * (new_w / w)
    coords[..., 1] = coords[..., 1] * (new_h / h)
    return coords


def transform_boxes(boxes: np.ndarray, original_shape: Sequence[int], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """``ResizeLongestSide.apply_boxes``: (N, 4) boxes (x0, y0, x1, y1) -> model input, float64 (N, 4)."""
    boxes = np.asarray(boxes)
    if boxes.size % 4:
        raise ValueError(f"boxes must have shape (N, 4) as (x0, y0, x1, y1), got {boxes.shape}")
    return transform_coords(boxes.reshape(-1, 2, 2), original_shape, image_size).reshape(-1, 4)


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 matrix of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis.

    As torch's CPU kernel: source index ``max(scale * (i + 0.5) - 0.5, 0)`` with ``scale = in / out``,
    both in float32; neighbours ``i0 = int(src)`` and ``min(i0 + 1, in - 1)``; weights ``1 - l, l`` with
    ``l = min(src - i0, 1)``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.int64)  # src >= 0: truncation == floor
    lam1 = np.minimum(src - i0.astype(np.float32), np.float32(1.0)).astype(np.float64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (rows, i0), 1.0 - lam1)
    np.add.at(matrix, (rows, i1), lam1)
    return matrix


@lru_cache(maxsize=32)
def mask_upscale_matrix(original_size: int, resized_size: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(original, low_res) float32 matrix of one axis of ``Sam.postprocess_masks`` of a model of input size
    ``image_size`` (low_res = image_size / 4).

    The composition of: bilinear ``low_res -> image_size``, the crop to ``resized_size`` (removing SAM's
    padding), bilinear ``resized_size -> original_size``. Read-only (cached).
    """
    image_size = check_image_size(image_size)
    up = interpolation_matrix(low_res_mask_size(image_size), image_size)[:resized_size]  # (resized, low_res)
    down = interpolation_matrix(resized_size, original_size)  # (original, resized)
    matrix = (down @ up).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _check_low_res(low_res_logits: np.ndarray, image_size: int) -> None:
    size = low_res_mask_size(image_size)
    if low_res_logits.ndim < 2 or low_res_logits.shape[-2:] != (size, size):
        raise ValueError(f"low_res_logits must have shape (..., {size}, {size}) for a model of input size "
                         f"{image_size}, got {low_res_logits.shape}")


def upscale_masks(low_res_logits: np.ndarray, original_shape: Sequence[int],
                  image_size: int = IMAGE_SIZE) -> np.ndarray:
    """``Sam.postprocess_masks``: (..., L, L) mask logits (L = image_size / 4: 256 at 1024) -> float32
    (..., H, W) at the original size.

    Computed as ``Ry @ logits @ Rx.T`` with the per-axis matrices of :func:`mask_upscale_matrix`; agrees
    with torch's two ``F.interpolate`` calls to float32 rounding (about 1e-5 on logits of size ~10).
    """
    low_res_logits = np.asarray(low_res_logits, dtype=np.float32)
    _check_low_res(low_res_logits, image_size)
    h, w = _original_hw(original_shape)
    new_h, new_w = longest_side_shape(h, w, image_size)
    rows = mask_upscale_matrix(h, new_h, image_size)  # (H, L)
    cols = mask_upscale_matrix(w, new_w, image_size)  # (W, L)
    # the second product (H x L x W per mask) dominates; do the cheaper axis first
    if h <= w:
        return np.matmul(np.matmul(rows, low_res_logits), cols.T)
    return np.matmul(rows, np.matmul(low_res_logits, cols.T))


@lru_cache(maxsize=32)
def upscale_support(original_size: int, resized_size: int,
                    image_size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """First and last low-res index with a non-zero weight, per output index of ``mask_upscale_matrix``."""
    nonzero = mask_upscale_matrix(original_size, resized_size, image_size) != 0
    first = nonzero.argmax(axis=1)
    last = nonzero.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
    first.setflags(write=False)  # cached: shared by every caller
    last.setflags(write=False)
    return first, last


def upscale_masks_binary(low_res_logits: np.ndarray, original_shape: Sequence[int], threshold: float = 0.0,
                         image_size: int = IMAGE_SIZE) -> np.ndarray:
    """``upscale_masks(...) > threshold`` computed only where a mask can be above the threshold.

    The interpolation weights are non-negative and sum to one, so an output pixel can exceed the threshold
    only if one of the low-res logits it is interpolated from does. Each mask is therefore computed on the
    block of output rows / columns that touch its above-threshold low-res pixels (with every low-res value
    those rows and columns use): the same values there, exact ``False`` elsewhere, and far less work for
    compact objects.
    """
    low = np.asarray(low_res_logits, dtype=np.float32)
    _check_low_res(low, image_size)
    h, w = _original_hw(original_shape)
    new_h, new_w = longest_side_shape(h, w, image_size)
    rows, cols = mask_upscale_matrix(h, new_h, image_size), mask_upscale_matrix(w, new_w, image_size)
    (rlo, rhi), (clo, chi) = upscale_support(h, new_h, image_size), upscale_support(w, new_w, image_size)
    flat = low.reshape((-1,) + low.shape[-2:])
    out = np.zeros((len(flat), h, w), dtype=bool)
    for i, logits in enumerate(flat):
        above = logits > threshold
        if not above.any():
            continue
        r, c = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
        ys = np.flatnonzero((rhi >= r[0]) & (rlo <= r[-1]))
        xs = np.flatnonzero((chi >= c[0]) & (clo <= c[-1]))
        if ys.size == 0 or xs.size == 0:  # only the padding (cropped away) is above the threshold
            continue
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        a0, a1 = rlo[y0:y1].min(), rhi[y0:y1].max() + 1
        b0, b1 = clo[x0:x1].min(), chi[x0:x1].max() + 1
        block = rows[y0:y1, a0:a1] @ logits[a0:a1, b0:b1] @ cols[x0:x1, b0:b1].T
        out[i, y0:y1, x0:x1] = block > threshold
    return out.reshape(low.shape[:-2] + (h, w))
