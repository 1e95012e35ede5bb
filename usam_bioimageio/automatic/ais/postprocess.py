"""Automatic instance segmentation (AIS): µSAM's decoder maps -> instance labels.

µSAM's AIS decoder predicts three maps for an image: a foreground probability, the distance to the
object centre and the (inverted) distance to the object boundary, each normalised per object to 0..1
(0 at the centre for both distances). This module turns them into a label image with the same
semantics as micro-sam 1.8.14's ``InstanceSegmentationWithDecoder.generate`` (untiled, 2D), whose
steps are, library call by library call:

1. ``foreground_smoothing > 0``: ``bioimage_cpp.filters.gaussian_smoothing(foreground, sigma)``
   (``micro_sam.instance_segmentation._apply_smoothing``).
2. ``torch_em.util.segmentation.watershed_from_center_and_boundary_distances``:

   a. ``distance_smoothing > 0``: ``bioimage_cpp.filters.gaussian_smoothing`` of both distance maps;
   b. foreground mask ``foreground > foreground_threshold``;
   c. seed mask ``(center < center_distance_threshold) & (boundary < boundary_distance_threshold)``,
      cleared outside the foreground mask;
   d. seeds ``bioimage_cpp.segmentation.label(seed_mask)``: 8-connected components, numbered 1..n in
      row-major order of their first pixel;
   e. ``bioimage_cpp.segmentation.watershed(boundary, markers=seeds, mask=foreground_mask)``: the height
      map is the (smoothed) *boundary* distance map;
   f. ``torch_em.util.segmentation.size_filter(seg, min_size)``: with ``min_size > 0`` every object with
      fewer than ``min_size`` pixels becomes background, then ``bioimage_cpp.segmentation
      .relabel_sequential`` renumbers the rest 1..m keeping their order. Seeds are not filtered.

3. ``output_mode="binary_mask"`` turns the label image into a list of per-object dicts
   (``InstanceSegmentationWithDecoder._to_masks``); see :func:`instances_to_masks`.

bioimage-cpp is a compiled library; this module reimplements the three functions it provides with
numpy/scipy only, operation for operation (see :func:`gaussian_smoothing` and :func:`seeded_watershed`),
so that the labels are identical, label ids included. Cost: the flooding of foreground regions that hold
several seeds runs in Python, about 0.5 s per megapixel of such regions (bioimage-cpp: ~0.05 s); isolated
objects are filled directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
from scipy import ndimage

from usam_bioimageio.filters import gaussian_smoothing

__all__ = [
    "AisParameters",
    "AIS_PRESETS",
    "instances_from_maps",
    "instances_to_masks",
    "gaussian_smoothing",
    "seeded_watershed",
]


@dataclass(frozen=True)
class AisParameters:
    """Post-processing parameters; the defaults are those of µSAM's ``InstanceSegmentationWithDecoder.generate``
    (also what ``micro_sam.automatic_segmentation.automatic_instance_segmentation`` and its CLI use).

    center_distance_threshold: seeds are where the (smoothed) centre distance is below this ...
    boundary_distance_threshold: ... and the (smoothed) boundary distance is below this, inside the foreground.
    foreground_threshold: foreground = (smoothed) foreground probability strictly above this.
    foreground_smoothing: sigma (pixels) of the Gaussian applied to the foreground map; 0 = none.
    distance_smoothing: sigma (pixels) of the Gaussian applied to both distance maps; 0 = none.
    min_size: objects with fewer pixels than this are removed (set to background); 0 = keep all.
    """

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0

    def __post_init__(self) -> None:
        for name in ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold",
                     "foreground_smoothing", "distance_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"AisParameters.{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"AisParameters.{name} must be finite, got {value!r}")
        for name in ("foreground_smoothing", "distance_smoothing"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"AisParameters.{name} must be >= 0 (0 = no smoothing), got {getattr(self, name)!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ValueError(f"AisParameters.min_size must be an integer >= 0, got {self.min_size!r}")


def _preset(center: float, boundary: float, smoothing: float, min_size: int) -> AisParameters:
    return AisParameters(center_distance_threshold=center, boundary_distance_threshold=boundary,
                         distance_smoothing=smoothing, min_size=min_size)


#: µSAM's per-model AIS settings (``micro_sam._model_settings.AIS_SETTINGS`` in 1.8.14), keyed by µSAM model
#: name; foreground threshold and smoothing keep the ``generate`` defaults (µSAM has no per-model value).
#: Note: in µSAM only the napari annotator reads these, and it applies only the two distance thresholds
#: (``sam_annotator.util._sync_autosegment_widget``) plus its own ``min_object_size`` default of 100; it
#: leaves ``distance_smoothing`` at 1.6. The library / CLI path uses :class:`AisParameters` defaults.
AIS_PRESETS: Dict[str, AisParameters] = {
    "vit_t_lm": _preset(0.5, 0.5, 2.0, 100),
    "vit_b_lm": _preset(0.4, 0.5, 2.0, 100),
    "vit_l_lm": _preset(0.4, 0.4, 1.6, 100),
    "vit_h_lm": _preset(0.5, 0.5, 1.4, 100),
    "vit_t_em_organelles": _preset(0.4, 0.5, 1.2, 100),
    "vit_b_em_organelles": _preset(0.3, 0.4, 1.2, 100),
    "vit_l_em_organelles": _preset(0.3, 0.4, 1.2, 100),
    "vit_h_em_organelles": _preset(0.3, 0.4, 1.2, 100),
}


# --------------------------------------------------------------------------------------------------
# Seeded watershed (bioimage_cpp.segmentation.watershed)
# --------------------------------------------------------------------------------------------------

_N_LEVELS = 65536
_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = ndimage.generate_binary_structure(2, 2)


def _quantise(height: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Heights under ``mask`` -> uint16 levels 0..65535 over their [min, max] range (truncation)."""
    levels = np.zeros(height.shape, dtype=np.uint16)
    values = height[mask]
    h_min, h_max = values.min(), values.max()  # in the height's own dtype, as the reference
    value_range = float(h_max) - float(h_min)
    if value_range > 0.0:
        scale = float(_N_LEVELS - 1) / value_range
        q = (values.astype(np.float64) - float(h_min)) * scale
        np.clip(q, 0.0, float(_N_LEVELS - 1), out=q)
        levels[mask] = q.astype(np.uint16)
    return levels


def _flood(levels: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference's bucket-queue flooding, restricted to ``mask``; returns labels (0 outside / unreached).

    Per level, a LIFO stack; a pixel takes the label of the first processed neighbour (order: up, down,
    left, right) and is pushed to the bucket max(its level, current level); seeds are pushed in row-major
    order. Runs on a copy padded with one "outside" pixel per side, which removes the border checks.
    """
    height, width = mask.shape
    stride = width + 2
    state = np.full((height + 2, width + 2), -1, dtype=np.int64)
    inner = state[1:-1, 1:-1]
    inner[mask] = 0
    seeded = mask & (seeds != 0)
    inner[seeded] = seeds[seeded]
    padded_levels = np.zeros(state.shape, dtype=np.int64)
    padded_levels[1:-1, 1:-1] = levels

    seed_nodes = np.flatnonzero(state > 0)  # row-major, as the reference's seed pass
    if seed_nodes.size == 0:
        return np.zeros(mask.shape, dtype=np.int64)
    seed_levels = padded_levels.ravel()[seed_nodes]

    out = state.ravel().tolist()
    lev = padded_levels.ravel().tolist()
    buckets: List[List[int]] = [[] for _ in range(_N_LEVELS)]
    for node, level in zip(seed_nodes.tolist(), seed_levels.tolist()):
        buckets[level].append(node)

    current = int(seed_levels.min())
    top = int(padded_levels.max())
    while current < _N_LEVELS:
        bucket = buckets[current]
        pop, push_here = bucket.pop, bucket.append
        while bucket:
            node = pop()
            label = out[node]
            n = node - stride
            if out[n] == 0:
                out[n] = label
                lv = lev[n]
                if lv > current:
                    buckets[lv].append(n)
                else:
                    push_here(n)
            n = node + stride
            if out[n] == 0:
                out[n] = label
                lv = lev[n]
                if lv > current:
                    buckets[lv].append(n)
                else:
                    push_here(n)
            n = node - 1
            if out[n] == 0:
                out[n] = label
                lv = lev[n]
                if lv > current:
                    buckets[lv].append(n)
                else:
                    push_here(n)
            n = node + 1
            if out[n] == 0:
                out[n] = label
                lv = lev[n]
                if lv > current:
                    buckets[lv].append(n)
                else:
                    push_here(n)
        if current >= top:  # nothing can be pending above the highest level once its bucket is empty
            break
        current += 1

    result = np.asarray(out, dtype=np.int64).reshape(state.shape)[1:-1, 1:-1]
    return np.where(result > 0, result, 0)


def seeded_watershed(height: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed as ``bioimage_cpp.segmentation.watershed(height, markers=seeds, mask=mask)``.

    Heights under the mask are quantised to 65,536 levels over their own min..max (a constant map is one
    level) and flooded with 4-connectivity from the non-zero seeds (seeds outside the mask are ignored);
    pixels outside the mask, or not connected to any seed inside it, stay 0. Ties within a level are broken
    exactly as the reference does (see :func:`_flood`). Returns int64 labels (the seed values).

    Speed-up, exact: flooding never crosses the mask, so every 4-connected component of the mask that holds
    a single seed label is filled with it directly, and only components with several seed labels are flooded
    (with the levels of the whole mask, as the reference quantises over the whole mask).
    """
    height = np.asarray(height)
    seeds = np.asarray(seeds)
    mask = np.asarray(mask, dtype=bool)
    if height.ndim != 2 or seeds.shape != height.shape or mask.shape != height.shape:
        raise ValueError(f"seeded_watershed: shapes differ or are not 2D: {height.shape}, {seeds.shape}, {mask.shape}")
    result = np.zeros(height.shape, dtype=np.int64)
    seeded = mask & (seeds != 0)
    if not seeded.any():
        return result

    components, n_components = ndimage.label(mask, structure=_CROSS)
    pairs = np.unique(np.stack([components[seeded].astype(np.int64), seeds[seeded].astype(np.int64)]), axis=1)
    comp_ids, first, counts = np.unique(pairs[0], return_index=True, return_counts=True)
    fill = np.zeros(n_components + 1, dtype=np.int64)
    single = counts == 1
    fill[comp_ids[single]] = pairs[1][first[single]]
    result = fill[components]

    contested_ids = comp_ids[~single]
    if contested_ids.size:
        contested = np.zeros(n_components + 1, dtype=bool)
        contested[contested_ids] = True
        contested_mask = contested[components]
        rows = np.flatnonzero(contested_mask.any(axis=1))
        cols = np.flatnonzero(contested_mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        levels = _quantise(height, mask)
        flooded = _flood(levels[box], seeds[box], contested_mask[box])
        result[box] = np.where(contested_mask[box], flooded, result[box])
    return result


# --------------------------------------------------------------------------------------------------
# The post-processing
# --------------------------------------------------------------------------------------------------

def _check_maps(maps: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != 3 or maps.shape[1] < 1 or maps.shape[2] < 1:
        raise ValueError(
            "instances_from_maps: maps must have shape (3, H, W) = (foreground, center distances, boundary "
            f"distances), got {maps.shape}"
        )
    if maps.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(maps.dtype, np.number) or maps.dtype == bool) or np.iscomplexobj(maps):
            raise ValueError(f"instances_from_maps: maps must be real numbers, got dtype {maps.dtype}")
        maps = maps.astype(np.float32)
    if not np.isfinite(maps).all():
        bad = ["foreground", "center distances", "boundary distances"]
        which = [bad[i] for i in range(3) if not np.isfinite(maps[i]).all()]
        raise ValueError(f"instances_from_maps: maps contain NaN or infinite values ({', '.join(which)})")
    return maps[0], maps[1], maps[2]


def _size_filter(segmentation: np.ndarray, min_size: int) -> np.ndarray:
    """Objects with fewer than ``min_size`` pixels -> 0, then the rest renumbered 1..m in their order."""
    n = int(segmentation.max()) if segmentation.size else 0
    sizes = np.bincount(segmentation.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[segmentation]


def instances_from_maps(maps: np.ndarray, *, params: AisParameters = AisParameters()) -> np.ndarray:
    """µSAM's AIS post-processing: decoder maps (3, H, W) -> instance labels (H, W) uint32.

    ``maps[0]`` foreground probability, ``maps[1]`` centre distances, ``maps[2]`` boundary distances (the
    decoder's output order), float32 in 0..1 (other real dtypes are converted to float32; float64 is kept).
    Returns 0 for background and 1..n for the objects, numbered as µSAM numbers them: by the row-major
    position of the first pixel of their seed. Raises ``ValueError`` for a wrong shape or NaN / inf values.
    """
    if not isinstance(params, AisParameters):
        raise TypeError(f"params must be an AisParameters, got {type(params).__name__}")
    foreground, center, boundary = _check_maps(maps)

    if params.foreground_smoothing > 0:
        foreground = gaussian_smoothing(foreground, params.foreground_smoothing)
    if params.distance_smoothing > 0:
        center = gaussian_smoothing(center, params.distance_smoothing)
        boundary = gaussian_smoothing(boundary, params.distance_smoothing)

    # Python float thresholds compare in the maps' dtype (numpy's scalar rules), as in the reference.
    foreground_mask = foreground > params.foreground_threshold
    seed_mask = (center < params.center_distance_threshold) & (boundary < params.boundary_distance_threshold)
    seed_mask &= foreground_mask
    seeds, _ = ndimage.label(seed_mask, structure=_SQUARE)  # 8-connected, row-major numbering

    segmentation = seeded_watershed(boundary, seeds, foreground_mask)
    if params.min_size > 0:
        segmentation = _size_filter(segmentation, params.min_size)
    return segmentation.astype(np.uint32)


def instances_to_masks(labels: np.ndarray) -> List[Dict[str, Any]]:
    """A label image as µSAM's ``output_mode="binary_mask"`` list: one dict per object, in label order, with
    ``segmentation`` (bool H x W), ``area`` (pixels), ``bbox`` [x0, width, y0, height] (as µSAM writes it),
    ``crop_box`` [0, W, 0, H] and ``seg_id`` (the label)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"instances_to_masks: expected a 2D label image, got shape {labels.shape}")
    height, width = labels.shape
    masks = []
    objects = ndimage.find_objects(labels.astype(np.int64, copy=False))
    for index, box in enumerate(objects):
        if box is None:
            continue
        label = index + 1
        segmentation = labels == label
        y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        masks.append({
            "segmentation": segmentation,
            "area": int(np.count_nonzero(segmentation[box])),
            "bbox": [x0, x1 - x0, y0, y1 - y0],
            "crop_box": [0, width, 0, height],
            "seg_id": label,
        })
    return masks
