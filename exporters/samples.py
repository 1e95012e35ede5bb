"""Sample images and prompts for test tensors and covers: a real image and prompts from its ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from usam_bioimageio.io.images import read_image


@dataclass(frozen=True)
class Sample:
    """An image with prompts for ``n`` objects derived from ground-truth labels.

    points (n, 1, 2) one positive point per object (x, y) at the object's most interior pixel;
    boxes (n, 4) the objects' bounding boxes (x0, y0, x1, y1), as micro_sam derives them.
    """

    image: np.ndarray
    labels: Optional[np.ndarray]
    points: np.ndarray
    boxes: np.ndarray
    source: str  # what the image is, without machine paths (it goes into the packages' rdf)


def prompts_from_labels(labels: np.ndarray, *, n_objects: int = 3):
    """Positive points and boxes of the ``n_objects`` largest objects of a label image."""
    from scipy import ndimage

    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    if len(ids) == 0:
        raise ValueError("the label image has no objects")
    chosen = ids[np.argsort(-counts, kind="stable")[:n_objects]]
    points, boxes = [], []
    for obj in chosen:
        mask = labels == obj
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        points.append([[float(x), float(y)]])
        ys, xs = np.nonzero(mask)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return np.asarray(points), np.asarray(boxes)


def load_sample(image: Union[str, Path], labels: Optional[Union[str, Path]] = None, *, n_objects: int = 3) -> Sample:
    """Read a sample image and derive prompts from its labels (or from a central box if there are none)."""
    img = read_image(image)
    h, w = img.shape[:2]
    if labels is not None:
        lab = read_image(labels)
        if lab.shape[:2] != (h, w):
            raise ValueError(f"labels {lab.shape} do not match the image {img.shape}")
        points, boxes = prompts_from_labels(lab, n_objects=n_objects)
    else:
        lab = None
        points = np.asarray([[[w / 2, h / 2]]])
        boxes = np.asarray([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]])
    return Sample(image=img, labels=lab, points=points, boxes=boxes, source=portable_name(image))


def portable_name(path: Union[str, Path]) -> str:
    """A file's name as a package may record it, without machine paths: relative to the last folder called
    ``data`` (``dsb2018/images/<id>.png`` for ``../shared/data``), else the file name alone."""
    parts = Path(path).parts
    if "data" in parts[:-1]:
        return "/".join(parts[len(parts) - parts[::-1].index("data"):])
    return parts[-1]


def synthetic_sample(*, size: int = 256, n_objects: int = 3, seed: int = 0) -> Sample:
    """A deterministic image of bright blobs with labels, used when no sample image is given."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    for i in range(1, 9):
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.05, 0.1) * size
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = i
    image = (40 + 150 * (labels > 0) + rng.normal(0, 10, labels.shape)).clip(0, 255).astype(np.uint8)
    points, boxes = prompts_from_labels(labels, n_objects=n_objects)
    return Sample(image=image, labels=labels, points=points, boxes=boxes, source="synthetic blobs (seed 0)")
