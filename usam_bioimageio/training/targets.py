"""Training targets of µSAM's AIS decoder: foreground and per-object normalised distances.

:func:`distance_targets` is torch_em's ``PerObjectDistanceTransform(distances=True, boundary_distances=True,
directed_distances=False, foreground=True, instances=False, min_size=...)`` (torch_em 0.10.9), the label
transform µSAM's ``train_sam`` uses with its instance segmentation decoder, in numpy / scipy:

1. connected components of equal labels (4-connected; ``apply_label=True``), objects smaller than
   ``min_size`` removed;
2. boundaries = ``skimage.segmentation.find_boundaries(labels, mode="inner")``;
3. per object, in its bounding box: the centre is its rounded centroid or, when that lies outside the object,
   the object pixel farthest from the boundaries (first in C order); centre distance = Euclidean distance to
   the centre; boundary distance = (distance to the nearest boundary pixel at the centre) minus the distance
   to the nearest boundary pixel; both zero outside the object and divided by their maximum over the box
   (+ 1e-7);
4. channels (foreground, centre distances, boundary distances); distances are 1 outside every object.

So both distance maps are 0 at an object's centre and approach 1 at its border: the decoder's maps have
"seeds where both distances are low", which the watershed post-processing uses.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def distance_targets(labels: np.ndarray, *, min_size: int = 0) -> np.ndarray:
    """(H, W) instance labels -> float32 (3, H, W): foreground, centre distances, boundary distances."""
    from scipy import ndimage
    from skimage.measure import label, regionprops
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D (H, W), got shape {labels.shape}")
    labels = label(labels, background=0, connectivity=1).astype(np.uint32)
    if min_size > 0:
        ids, sizes = np.unique(labels, return_counts=True)
        labels[np.isin(labels, ids[(sizes < min_size) & (ids != 0)])] = 0
        labels = label(labels, background=0, connectivity=1).astype(np.uint32)
    boundaries = find_boundaries(labels, mode="inner")
    distances = np.ones((2,) + labels.shape, dtype=np.float32)
    for prop in regionprops(labels):
        box = prop.slice
        mask = labels[box] == prop.label
        # torch_em computes in float32 from bioimage_cpp's float distance transforms
        to_boundary = ndimage.distance_transform_edt(~boundaries[box]).astype(np.float32)
        to_boundary[~mask] = 0
        farthest = np.unravel_index(np.argmax(to_boundary), to_boundary.shape)
        centre = tuple(int(c) - s.start for c, s in zip(np.round(prop.centroid), box))
        if not mask[centre]:
            centre = farthest
        seed = np.ones(mask.shape, dtype=bool)
        seed[centre] = False
        to_centre = ndimage.distance_transform_edt(seed).astype(np.float32)
        from_boundary = to_boundary[farthest] - to_boundary
        for channel, values in enumerate((to_centre, from_boundary)):
            values = np.where(mask, values, 0).astype(np.float32)
            values /= np.abs(values).max() + np.float32(EPS)
            distances[channel][box][mask] = values[mask]
    return np.concatenate([(labels > 0).astype(np.float32)[None], distances])
