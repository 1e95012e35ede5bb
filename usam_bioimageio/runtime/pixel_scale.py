"""Running a model at another pixel scale: the image is resized by a factor before it is encoded, the decoder's
maps are resized back to the image.

A model sees objects at the size its training showed them: µSAM's 1024 frame shows a 256-520 px DSB2018 image
enlarged 2-4x, and a model trained on crops of images enlarged S times (``usam train --scale S``) segments best
on images enlarged S times (``usam ais --scale S``). Both resizes are bilinear with pixel-area alignment
(``F.interpolate(mode="bilinear", align_corners=False)`` without antialiasing, edges replicated), the image
resize being the one training uses (``usam_bioimageio.training.recipe.enlarged``). numpy / scipy only.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

__all__ = ["MAX_SCALE", "check_scale", "scale_image", "scaled_shape", "resize_maps"]

MAX_SCALE = 8.0


def check_scale(scale: float) -> float:
    """``scale`` as a float, or ValueError unless 0 < scale <= MAX_SCALE."""
    scale = float(scale)
    if not (math.isfinite(scale) and 0.0 < scale <= MAX_SCALE):
        raise ValueError(f"scale must be > 0 and at most {MAX_SCALE:g}, got {scale:g}")
    return scale


def scaled_shape(shape: Sequence[int], scale: float) -> Tuple[int, int]:
    """(H, W) of an image of ``shape`` (H, W, ...) resized by ``scale`` (rounded, at least 1 pixel)."""
    scale = check_scale(scale)
    return tuple(max(1, int(round(int(s) * scale))) for s in tuple(shape)[:2])  # type: ignore[return-value]


def _resize(array: np.ndarray, shape: Tuple[int, int], spatial: Tuple[int, int]) -> np.ndarray:
    from scipy import ndimage

    zoom = [1.0] * array.ndim
    for axis, size in zip(spatial, shape):
        zoom[axis] = size / array.shape[axis]
    return ndimage.zoom(np.asarray(array, np.float32), zoom, order=1, grid_mode=True, mode="nearest")


def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """A 2D image (H, W) or (H, W, C) resized by ``scale``: float32 (H', W'[, C]), H' = round(H * scale)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image (H, W) or (H, W, C), got shape {image.shape}")
    shape = scaled_shape(image.shape, scale)
    if shape == tuple(image.shape[:2]):
        return image.astype(np.float32)
    return _resize(image, shape, (0, 1))


def resize_maps(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Maps (C, H', W') resized to (C, H, W) = ``shape[:2]``: float32."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"expected maps (C, H, W), got shape {maps.shape}")
    shape = (int(shape[0]), int(shape[1]))
    if shape == tuple(maps.shape[1:]):
        return maps.astype(np.float32)
    return _resize(maps, shape, (1, 2))
