"""Interactive 3D: an object segmented on some slices, projected slice by slice through the volume
(µSAM's ``segment_mask_in_volume``).

Semantics of micro_sam 1.8.14 ``multi_dimensional_segmentation.segment_mask_in_volume`` on per-slice
embeddings:

* Each step segments slice ``z`` with :func:`~usam_bioimageio.prompting.from_mask.segment_from_mask` from the
  mask of the slice before it (in the direction of travel), with the prompts of the projection mode:
  ``mask`` (box + mask prompt), ``box``, ``points``, ``points_and_mask``, ``single_point``.
* Below the lowest and above the highest annotated slice it goes on until the volume's end, or stops at the
  first slice whose mask has IoU < ``iou_threshold`` with the previous one (that slice stays empty);
  ``stop_lower`` / ``stop_upper``: do not go below / above at all.
* Between two annotated slices (no IoU test): adjacent ones need nothing; with one slice between them it is
  segmented from the union of both masks; otherwise each half is propagated from its end, and when the gap is
  even the middle slice is segmented from the union of its two neighbours. (µSAM segments these union slices
  without ``use_single_point``: in ``single_point`` mode they get all the points; kept.) Next to a stopped end
  (``stop_lower`` at the lowest annotated slice, ``stop_upper`` at the highest), the gap is filled from the
  other end only.

An empty mask on the previous slice is decoded as µSAM does (``segment_from_mask(allow_empty=True)``: no box
or points, the all-background mask prompt where the mode has one): between annotated slices, where no IoU test
ends the projection, such a slice can turn non-empty again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from usam_bioimageio.embeddings.types import StackEmbeddings, TiledEmbeddings
from usam_bioimageio.errors import InputError, UsageError
from usam_bioimageio.io.prompt_files import ObjectPrompt
from usam_bioimageio.progress import progress_bar
from usam_bioimageio.prompting.from_mask import segment_from_mask
from usam_bioimageio.prompting.predict import segment_objects
from usam_bioimageio.prompting.tiled import segment_objects_tiled
from usam_bioimageio.runtime.model import SamModel

__all__ = ["PROJECTION_MODES", "VolumeSegmentation", "projection_prompts", "segment_mask_in_volume",
           "segment_volume_from_prompts"]

PROJECTION_MODES = ("box", "mask", "points", "points_and_mask", "single_point")
# µSAM's napari annotator (sam_annotator/_widgets.py): projection, IoU threshold, box extension
DEFAULT_PROJECTION, DEFAULT_IOU_THRESHOLD, DEFAULT_BOX_EXTENSION = "single_point", 0.5, 0.05


@dataclass(frozen=True)
class VolumeSegmentation:
    """masks (Z, H, W) bool: the object on every slice; z_min / z_max: the lowest and highest slice the
    projection outside the annotated slices reached (µSAM's returned pair)."""

    masks: np.ndarray
    z_min: int
    z_max: int


def projection_prompts(projection: str) -> dict:
    """A projection mode -> ``segment_from_mask``'s prompt flags (µSAM's ``_validate_projection``)."""
    flags = {
        "mask": (True, True, False, False), "box": (True, False, False, False),
        "points": (False, False, True, False), "points_and_mask": (False, True, True, False),
        "single_point": (False, False, True, True),
    }
    if projection not in flags:
        raise UsageError(f"projection must be one of {', '.join(PROJECTION_MODES)}, got {projection!r}")
    use_box, use_mask, use_points, single = flags[projection]
    return {"use_box": use_box, "use_mask": use_mask, "use_points": use_points, "single_point": single}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """µSAM's ``util.compute_iou`` (its eps included, so two empty masks have IoU 0)."""
    return float(np.logical_and(a, b).sum()) / (float(np.logical_or(a, b).sum()) + 1e-7)


def _check_inputs(embeddings, segmentation, segmented_slices, iou_threshold) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(embeddings, StackEmbeddings):
        raise InputError(f"segment_mask_in_volume takes StackEmbeddings, got {type(embeddings).__name__}")
    if not embeddings.is_stack:
        raise InputError("these embeddings are of a 2D image, not of a volume")
    seg = np.asarray(segmentation)
    if seg.ndim != 3:
        raise InputError(f"segmentation must be a volume (Z, H, W), got shape {seg.shape}")
    if seg.shape[0] < 2:
        raise InputError(f"the volume has {seg.shape[0]} slice(s): projecting an object needs at least 2")
    expected = (len(embeddings),) + tuple(embeddings.image_shape)
    if seg.shape != expected:
        raise InputError(f"segmentation of shape {seg.shape} does not match the embedded volume {expected}")
    z = np.asarray(segmented_slices)
    if z.ndim != 1 or z.size == 0:
        raise InputError("segmented_slices must name at least one slice")
    if not np.issubdtype(z.dtype, np.integer):
        if not np.all(np.isfinite(z.astype(float))) or not np.all(np.mod(z.astype(float), 1) == 0):
            raise InputError(f"segmented_slices must be integers, got {z.tolist()}")
    z = np.unique(z.astype(np.int64))
    if z[0] < 0 or z[-1] >= seg.shape[0]:
        raise InputError(f"segmented slice(s) {[int(v) for v in z if v < 0 or v >= seg.shape[0]]} out of range "
                         f"for a volume of {seg.shape[0]} slices (0..{seg.shape[0] - 1})")
    masks = seg == 1
    empty = [int(v) for v in z if not masks[v].any()]
    if empty:
        raise InputError(f"the object's mask is empty on segmented slice(s) {empty}")
    if isinstance(iou_threshold, bool) or not 0.0 <= float(iou_threshold) <= 1.0:
        raise InputError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    return masks, z


def segment_mask_in_volume(
    model: SamModel,
    embeddings: StackEmbeddings,
    *,
    segmentation: np.ndarray,
    segmented_slices: Sequence[int],
    projection: str = DEFAULT_PROJECTION,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    box_extension: float = DEFAULT_BOX_EXTENSION,
    stop_lower: bool = False,
    stop_upper: bool = False,
    progress: bool = True,
) -> VolumeSegmentation:
    """Project an object through a volume from the slices where it is segmented (module doc).

    ``segmentation`` (Z, H, W): the object (pixels == 1) on ``segmented_slices``; the slices the projection
    reaches are overwritten, the others kept (in a copy: the input is not changed). Defaults are those of µSAM's annotator. The progress bar counts slices.
    """
    masks, annotated = _check_inputs(embeddings, segmentation, segmented_slices, iou_threshold)
    prompts = projection_prompts(projection)
    masks = masks.copy()
    n = masks.shape[0]
    bar = progress_bar(n - len(annotated), 0, "slices", progress)
    bar.unit = "slice"

    def segment(z: int, prompt: np.ndarray, *, union: bool = False) -> np.ndarray:
        # µSAM segments a slice from the union of its two neighbours without use_single_point: in
        # "single_point" mode those slices get all the points
        flags = dict(prompts, single_point=False) if union else prompts
        result = segment_from_mask(model, embeddings[z], mask=prompt, box_extension=box_extension,
                                   allow_empty=True, **flags)
        return result.masks[0, 0]

    def segment_range(z_start: int, z_stop: int, step: int, past_stop, threshold=None) -> int:
        # µSAM's loop: segment z, keep it unless its IoU with the previous slice is below the threshold,
        # stop once the next z is past z_stop; returns the last slice kept
        z = z_start + step
        while True:
            mask = segment(z, masks[z - step])
            if threshold is not None and _iou(masks[z - step], mask) < threshold:
                break
            masks[z] = mask
            bar.update(1)
            z += step
            if past_stop(z, z_stop):
                break
        return z - step

    try:
        z0, z1 = int(annotated[0]), int(annotated[-1])
        z_min = segment_range(z0, 0, -1, np.less, iou_threshold) if z0 > 0 and not stop_lower else z0
        z_max = segment_range(z1, n - 1, 1, np.greater, iou_threshold) if z1 < n - 1 and not stop_upper else z1
        for z_start, z_stop in zip(annotated[:-1].tolist(), annotated[1:].tolist()):
            gap, z_mid = z_stop - z_start, (z_start + z_stop) // 2
            if gap == 1:
                continue
            if z_start == z0 and stop_lower:
                segment_range(z_stop, z_start, -1, np.less_equal)
            elif z_stop == z1 and stop_upper:
                segment_range(z_start, z_stop, 1, np.greater_equal)
            elif gap == 2:
                masks[z_start + 1] = segment(z_start + 1, masks[z_start] | masks[z_stop], union=True)
                bar.update(1)
            else:
                segment_range(z_start, z_mid, 1, np.greater_equal if gap % 2 == 0 else np.greater)
                segment_range(z_stop, z_mid, -1, np.less_equal)
                if gap % 2 == 0:  # the middle slice is as far from both ends: from its two neighbours
                    masks[z_mid] = segment(z_mid, masks[z_mid - 1] | masks[z_mid + 1], union=True)
                    bar.update(1)
    finally:
        bar.close()
    return VolumeSegmentation(masks=masks, z_min=z_min, z_max=z_max)


def segment_volume_from_prompts(
    model: SamModel,
    embeddings: StackEmbeddings,
    *,
    objects: Sequence[ObjectPrompt],
    projection: str = DEFAULT_PROJECTION,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    box_extension: float = DEFAULT_BOX_EXTENSION,
    progress: bool = True,
) -> np.ndarray:
    """Labels (Z, H, W) uint32 of objects prompted on one slice each (``ObjectPrompt.z``), as µSAM's annotator
    does: the prompts segment the object on its slice (single-mask output), :func:`segment_mask_in_volume`
    projects it through the volume. Objects are numbered 1..n in order; where two overlap, the later wins (as
    ``masks_to_labels``). An object whose prompts give an empty mask on its slice stays absent."""
    if not isinstance(embeddings, StackEmbeddings) or not embeddings.is_stack:
        raise InputError("segment_volume_from_prompts needs the embeddings of a volume (a stack)")
    shape = (len(embeddings),) + tuple(embeddings.image_shape)
    labels = np.zeros(shape, np.uint32)
    objects = list(objects)
    for k, obj in enumerate(objects):
        if obj.z is None or not 0 <= obj.z < shape[0]:
            raise InputError(f"object {obj.name if obj.name is not None else k}: slice z={obj.z} is not one of the "
                             f"volume's 0..{shape[0] - 1}")
    bar = progress_bar(len(objects), 0, "objects", progress)
    bar.unit = "object"
    try:
        for k, obj in enumerate(objects):
            seed = np.zeros(shape, np.uint8)
            plane = embeddings[obj.z]  # segmented as `usam segment` segments that slice
            segment = segment_objects_tiled if isinstance(plane, TiledEmbeddings) else segment_objects
            seed[obj.z] = segment(model, plane, [obj])[0]
            if seed[obj.z].any():
                volume = segment_mask_in_volume(model, embeddings, segmentation=seed, segmented_slices=[obj.z],
                                                projection=projection, iou_threshold=iou_threshold,
                                                box_extension=box_extension, progress=False)
                labels[volume.masks] = k + 1
            bar.update(1)
    finally:
        bar.close()
    return labels
