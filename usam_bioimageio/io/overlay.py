"""Label images drawn over their image as RGB arrays (for PNG overlays and package covers)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def to_display(image: np.ndarray) -> np.ndarray:
    """Any 2D image -> (H, W, 3) uint8 for display (per-image 1-99.8 percentile stretch)."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 2:
        x = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
    if x.ndim == 3:
        x = x[..., :3]
    lo, hi = np.percentile(x, (1, 99.8)) if x.size else (0.0, 1.0)
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    x = (x * 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 2 else x


def label_colors(n: int, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(60, 256, size=(n + 1, 3), dtype=np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.5, boundaries: bool = True,
            points: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend labels (0 = background) over the image; object boundaries drawn opaque; points as white dots."""
    from scipy import ndimage

    rgb = to_display(image).astype(np.float32)
    labels = np.asarray(labels)
    colors = label_colors(int(labels.max()) if labels.size else 0).astype(np.float32)
    fg = labels > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colors[labels[fg]]
    if boundaries:
        edge = fg & (ndimage.grey_erosion(labels, size=3) != ndimage.grey_dilation(labels, size=3))
        rgb[edge] = colors[labels[edge]]
    if points is not None:
        h, w = labels.shape
        for x, y in np.asarray(points).reshape(-1, 2):
            yy, xx = int(round(y)), int(round(x))
            rgb[max(0, yy - 2):min(h, yy + 3), max(0, xx - 2):min(w, xx + 3)] = 255
    return rgb.astype(np.uint8)


def masks_to_labels(masks: np.ndarray) -> np.ndarray:
    """(o, H, W) boolean masks -> (H, W) uint32 labels 1..o; later objects are drawn over earlier ones."""
    masks = np.asarray(masks, dtype=bool)
    labels = np.zeros(masks.shape[1:], dtype=np.uint32)
    for i, m in enumerate(masks, start=1):
        labels[m] = i
    return labels
