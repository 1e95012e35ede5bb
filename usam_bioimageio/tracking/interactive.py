"""Interactive tracking: an object segmented in one or several frames, followed forward through time (µSAM's
``track_from_prompts``), and tracks with their lineage in the Cell Tracking Challenge's form.

Semantics of micro_sam 1.8.14 ``sam_annotator.util.track_from_prompts`` (the tracking annotator's "Segment All
Frames") on per-frame embeddings, for one object (:func:`track_object`):

* Tracking starts at the object's first annotated frame ``t0`` and goes forward only (frames before ``t0`` are
  never segmented). At an annotated frame the annotated mask is kept; at any other frame ``t`` the mask of
  frame ``t - 1`` is shifted by the motion model and segmented on frame ``t`` with
  :func:`~usam_bioimageio.prompting.from_mask.segment_from_mask` and the prompts of the projection mode
  (``mask``, ``box``, ``points``, ``points_and_mask``, ``single_point``; as in
  :mod:`usam_bioimageio.volumes.interactive`).
* **Motion model** (a smoothed centre shift): none on frames ``t0 + 1`` (no shift); on frame ``t0 + 2`` the
  shift between the centres of mass of frames ``t0`` and ``t0 + 1``; afterwards
  ``motion = motion_smoothing * motion + (1 - motion_smoothing) * (centre(t - 1) - centre(t - 2))``. The shift
  is ``scipy.ndimage.shift(order=0, prefilter=False)`` (nearest pixel, zeros shifted in). An empty mask has no
  centre: µSAM's ``np.mean`` of nothing is NaN, the motion stays NaN from then on and scipy shifts every mask to
  nothing; we give the same result without going through NaN arithmetic (an empty shifted mask).
* **IoU stop**: after the last annotated frame, tracking stops at the first frame whose mask has IoU <
  ``iou_threshold`` with the shifted previous mask (that frame and the rest stay empty; 0 never stops).
  Between annotated frames there is no test.
* **Division**: a frame marked as the object's division frame (µSAM: a prompt point of state "division")
  ends the track there, with the annotated mask of that frame as its last; the daughters are tracks of their
  own, annotated on later frames (``parents``). µSAM detects no division from the images: the division is the
  annotator's mark, and so it is here.
* **Stop frame** (µSAM: a single negative point on the highest annotated frame): the track ends the frame
  before it.

Several tracks (:func:`track_from_prompts`) are tracked one by one in increasing track id and painted over one
another in that order (where two overlap the higher id wins), as the annotator paints each tracked object over
the labels. The lineage: µSAM's annotator numbers the daughters of track ``k`` ``k + 1`` and ``k + 2`` (its state
then overwrites the lineage of an existing track ``k + 1``); here each daughter names its parent, so the labels
are the caller's. With daughters ``k + 1`` and ``k + 2`` the result is µSAM's.

Where this differs from µSAM (each a case µSAM's own code does not handle):

* A division mark on the object's first annotated frame: µSAM checks the division state from frame
  ``t0 + 1`` on, so it ignores the mark and tracks on (and records no lineage); here the track ends there.
* µSAM reads the "division" state of a frame from every point on it, of any track; here only the object's own.
* An object annotated only on the last frame: µSAM indexes past the embeddings (an IndexError); here the
  track is that one frame.
* Annotations after the division frame, and daughters annotated on or before it, are refused (µSAM would keep
  such masks under the mother's label, or let a daughter begin before its mother ends, which the CTC format
  forbids).
* A track whose masks have a gap (a frame left empty between annotated frames, or painted over by a later
  track): the CTC tracks we write have none, so each later piece becomes a track of its own (a new label, no
  parent); daughters take the last piece of their mother as parent.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from usam_bioimageio.embeddings.types import StackEmbeddings
from usam_bioimageio.errors import InputError, UsageError
from usam_bioimageio.io.prompt_files import ObjectPrompt
from usam_bioimageio.progress import progress_bar
from usam_bioimageio.prompting.from_mask import _process_box, segment_from_mask
from usam_bioimageio.prompting.predict import segment_from_prompts
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.tracking.ctc import CtcTracks, track_table
from usam_bioimageio.volumes.interactive import projection_prompts

__all__ = ["DEFAULT_BOX_EXTENSION", "DEFAULT_IOU_THRESHOLD", "DEFAULT_MOTION_SMOOTHING", "DEFAULT_PROJECTION",
           "FramePrompt", "TrackedObject", "segment_frame_prompt", "track_from_prompts", "track_object",
           "tracks_from_frame_prompts"]

# µSAM's tracking annotator (sam_annotator/_widgets.py SegmentNDWidget): projection, IoU threshold, box
# extension, motion smoothing
DEFAULT_PROJECTION, DEFAULT_IOU_THRESHOLD, DEFAULT_BOX_EXTENSION = "single_point", 0.5, 0.05
DEFAULT_MOTION_SMOOTHING = 0.5


@dataclasses.dataclass(frozen=True)
class TrackedObject:
    """masks (T, H, W) bool: the object in every frame; divides: whether tracking ended at its division frame."""

    masks: np.ndarray
    divides: bool


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """µSAM's ``util.compute_iou`` (its eps included, so two empty masks have IoU 0)."""
    return float(np.logical_and(a, b).sum()) / (float(np.logical_or(a, b).sum()) + 1e-7)


def _centre(mask: np.ndarray) -> Optional[np.ndarray]:
    coords = np.nonzero(mask)
    if len(coords[0]) == 0:
        return None  # µSAM: NaN
    return np.array([np.mean(coords[0]), np.mean(coords[1])], dtype=np.float64)


def _shift(mask: np.ndarray, motion: Optional[np.ndarray]) -> np.ndarray:
    from scipy import ndimage

    if motion is None:
        return mask
    if not np.all(np.isfinite(motion)):
        return np.zeros_like(mask)  # a NaN shift: scipy gives an empty mask (module doc)
    out = np.zeros(mask.shape, np.uint8)
    ndimage.shift(mask.astype(np.uint8), motion, output=out, order=0, prefilter=False)
    return out.astype(bool)


def _check_embeddings(embeddings, n_frames: Optional[int] = None) -> None:
    if not isinstance(embeddings, StackEmbeddings):
        raise InputError(f"tracking takes the StackEmbeddings of a time series, got {type(embeddings).__name__}")
    if not embeddings.is_stack:
        raise InputError("these embeddings are of one 2D image, not of a time series")
    if embeddings.tiling is not None:
        raise UsageError("interactive tracking does not support tiled embeddings yet: embed the frames untiled")
    if len(embeddings) < 2:
        raise InputError(f"the time series has {len(embeddings)} frame: tracking needs at least 2")


def _check_series(embeddings: StackEmbeddings, segmentation, what: str) -> np.ndarray:
    """``segmentation`` as an array of the embedded time series' shape (T, H, W); ``what`` names its content."""
    seg = np.asarray(segmentation)
    expected = (len(embeddings),) + tuple(embeddings.image_shape)
    if seg.ndim != 3:
        raise InputError(f"segmentation must be a time series (T, H, W){what}, got shape {seg.shape}")
    if seg.shape != expected:
        raise InputError(f"segmentation of shape {seg.shape} does not match the embedded time series {expected}")
    return seg


def _check_settings(projection: str, iou_threshold: float, motion_smoothing: float) -> dict:
    flags = projection_prompts(projection)
    for name, value in (("iou_threshold", iou_threshold), ("motion_smoothing", motion_smoothing)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not 0.0 <= float(value) <= 1.0:
            raise InputError(f"{name} must be a number in [0, 1], got {value!r}")
    return flags


def _frames(values, n: int, what: str) -> List[int]:
    z = np.asarray(list(values))
    if z.ndim != 1 or z.size == 0:
        raise InputError(f"{what} must name at least one frame")
    if not np.issubdtype(z.dtype, np.integer):
        f = z.astype(float)
        if not np.all(np.isfinite(f)) or not np.all(np.mod(f, 1) == 0):
            raise InputError(f"{what} must be integers, got {z.tolist()}")
    frames = sorted(set(int(v) for v in z.tolist()))
    bad = [t for t in frames if not 0 <= t < n]
    if bad:
        raise InputError(f"{what}: frame(s) {bad} out of range for a time series of {n} frames (0..{n - 1})")
    return frames


def _frame_index(value, n: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < n:
        raise InputError(f"{what} must be a frame in 0..{n - 1}, got {value!r}")
    return int(value)


def track_object(
    model: SamModel,
    embeddings: StackEmbeddings,
    *,
    segmentation: np.ndarray,
    segmented_frames: Sequence[int],
    division_frame: Optional[int] = None,
    stop_frame: Optional[int] = None,
    projection: str = DEFAULT_PROJECTION,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    motion_smoothing: float = DEFAULT_MOTION_SMOOTHING,
    box_extension: float = DEFAULT_BOX_EXTENSION,
    progress: bool = True,
) -> TrackedObject:
    """Follow one object forward through a time series from the frames where it is segmented (module doc).

    ``segmentation`` (T, H, W): the object (pixels == 1) on ``segmented_frames``; the frames tracking reaches
    are overwritten, the others kept (in a copy). ``division_frame``: one of the segmented frames, the track's
    last (the object divides there). ``stop_frame``: after every segmented frame; the track ends before it.
    Defaults are those of µSAM's tracking annotator. The progress bar counts frames.
    """
    _check_embeddings(embeddings)
    flags = _check_settings(projection, iou_threshold, motion_smoothing)
    seg = _check_series(embeddings, segmentation, "")
    n = len(embeddings)
    annotated = _frames(segmented_frames, n, "segmented_frames")
    masks = seg == 1
    empty = [t for t in annotated if not masks[t].any()]
    if empty:
        raise InputError(f"the object's mask is empty on segmented frame(s) {empty}")
    if division_frame is not None:
        division_frame = _frame_index(division_frame, n, "division_frame")
        if division_frame not in annotated:
            raise InputError(f"division_frame {division_frame} is not one of the segmented frames {annotated}")
        if division_frame != annotated[-1]:
            raise InputError(f"the object divides on frame {division_frame} but is segmented after it "
                             f"({[t for t in annotated if t > division_frame]}): a division ends the track")
    slices = list(annotated)
    if stop_frame is not None:
        stop_frame = _frame_index(stop_frame, n, "stop_frame")
        if stop_frame <= annotated[-1]:
            raise InputError(f"stop_frame {stop_frame} must come after the last segmented frame {annotated[-1]}")
        if division_frame is not None:
            raise InputError("a track ends at its division: give a division_frame or a stop_frame, not both")
        masks[stop_frame] = False
        slices.append(stop_frame)
    bar = progress_bar(max(n - 1 - slices[0], 0), 0, "frames", progress)
    bar.unit = "frame"
    try:
        divides = _track_core(model, embeddings, masks, slices, division_frame, stop_frame, flags=flags,
                              iou_threshold=float(iou_threshold), motion_smoothing=float(motion_smoothing),
                              box_extension=float(box_extension), bar=bar)
    finally:
        bar.close()
    return TrackedObject(masks=masks, divides=divides)


def _track_core(model, embeddings, masks, slices, division_frame, stop_frame, *, flags, iou_threshold,
                motion_smoothing, box_extension, bar) -> bool:
    """µSAM's loop (module doc) on ``masks`` (T, H, W) bool, in place, from the annotated ``slices`` (sorted;
    the stop frame included, empty); returns whether it ended at the division frame."""
    n = masks.shape[0]
    t0, last = slices[0], slices[-1]
    if division_frame == t0 or t0 == n - 1:  # nothing to track (module doc: µSAM differs here)
        return division_frame is not None
    motion: Optional[np.ndarray] = None
    motion_valid = True
    divides = False
    t = t0 + 1
    while True:
        if t >= t0 + 2:  # the motion model: from the third frame on
            c1, c0 = _centre(masks[t - 1]), _centre(masks[t - 2])
            move = None if c1 is None or c0 is None else c1 - c0
            if move is None:
                motion_valid = False  # µSAM: NaN from now on
                motion = np.full(2, np.nan)
            elif t == t0 + 2:
                motion = move
            elif motion_valid:
                motion = motion_smoothing * motion + (1 - motion_smoothing) * move
        if t in slices:
            previous = None
            mask_t = masks[t]
        else:
            previous = _shift(masks[t - 1], motion)
            mask_t = segment_from_mask(model, embeddings[t], mask=previous, box_extension=box_extension,
                                       allow_empty=True, **flags).masks[0, 0]
            if t < last:  # tracking towards a later annotation: no IoU test
                previous = None
        bar.update(1)
        if previous is not None and _iou(previous, mask_t) < iou_threshold:
            break
        if t == division_frame:
            divides = True
            break
        masks[t] = mask_t
        t += 1
        if stop_frame is not None and t == last:
            break
        if t == n:
            break
    return divides


def _split_gaps(labels: np.ndarray, parents: Dict[int, int]) -> Dict[int, int]:
    """Relabel (in place) the pieces after a gap of every track as new tracks; returns the parents with each
    daughter pointing at the last piece of its mother."""
    next_id = int(labels.max()) + 1 if labels.size else 1
    last_piece: Dict[int, int] = {}
    for label in np.unique(labels).tolist():
        if label == 0:
            continue
        present = [t for t in range(labels.shape[0]) if (labels[t] == label).any()]
        current = label
        for prev, t in zip(present, present[1:]):
            if t != prev + 1:
                current, next_id = next_id, next_id + 1
            if current != label:
                labels[t][labels[t] == label] = current
        last_piece[label] = current
    out = {}
    for daughter, mother in parents.items():
        if mother in last_piece:
            out[daughter] = last_piece[mother]
    return out


def track_from_prompts(
    model: SamModel,
    embeddings: StackEmbeddings,
    *,
    segmentation: np.ndarray,
    frames: Optional[Mapping[int, Sequence[int]]] = None,
    divisions: Optional[Mapping[int, int]] = None,
    parents: Optional[Mapping[int, int]] = None,
    stops: Optional[Mapping[int, int]] = None,
    projection: str = DEFAULT_PROJECTION,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    motion_smoothing: float = DEFAULT_MOTION_SMOOTHING,
    box_extension: float = DEFAULT_BOX_EXTENSION,
    progress: bool = True,
) -> CtcTracks:
    """Tracks of objects segmented on some frames, followed through time as µSAM's tracking annotator does.

    ``segmentation`` (T, H, W) integer labels: track ``k``'s mask on its annotated frames (``frames[k]``; by
    default every frame where label ``k`` is present; pixels of ``k`` elsewhere are ignored). ``divisions``:
    track -> the frame it divides in (its last, one of its annotated frames); ``parents``: daughter track ->
    its mother (which must have a division, before the daughter's first annotated frame); ``stops``: track ->
    a frame after its annotations where it ends (µSAM's stop annotation). Each track is followed with
    :func:`track_object` (the settings are µSAM's annotator defaults) and painted in increasing id. Returns the
    masks labelled by track id and the ``L B E P`` table (module doc: gaps, lineage); a progress bar over the
    tracks with ``progress``.
    """
    _check_embeddings(embeddings)
    _check_settings(projection, iou_threshold, motion_smoothing)
    seg = _check_series(embeddings, segmentation, " of track labels")
    n = len(embeddings)
    if not (np.issubdtype(seg.dtype, np.integer) or seg.dtype == bool):
        raise InputError(f"segmentation must hold integer track labels, got {seg.dtype}")
    if seg.size and (seg.min() < 0 or seg.max() > np.iinfo(np.uint16).max):
        raise InputError("track labels must be in 1..65535 (the CTC's 16-bit labels; 0 is background)")
    present = [int(v) for v in np.unique(seg).tolist() if v]
    frames = {int(k): _frames(v, n, f"frames of track {k}") for k, v in dict(frames or {}).items()}
    for k in present:
        if k not in frames:
            frames[k] = [t for t in range(n) if (seg[t] == k).any()]
    divisions = {int(k): _frame_index(v, n, f"the division frame of track {k}")
                 for k, v in dict(divisions or {}).items()}
    parents = {int(k): int(v) for k, v in dict(parents or {}).items() if v}
    stops = {int(k): _frame_index(v, n, f"the stop frame of track {k}") for k, v in dict(stops or {}).items()}
    for what, mapping in (("divisions", divisions), ("parents", parents), ("stops", stops)):
        unknown = sorted(set(mapping) - set(frames))
        if unknown:
            raise InputError(f"{what} names track(s) {unknown}, which are segmented on no frame")
    masks = {}
    for k in frames:
        masks[k] = np.zeros(seg.shape, bool)
        masks[k][frames[k]] = seg[frames[k]] == k
        empty = [t for t in frames[k] if not masks[k][t].any()]
        if empty:
            raise InputError(f"track {k}: its mask is empty on segmented frame(s) {empty}")
    return _track_masks(model, embeddings, masks=masks, frames=frames, divisions=divisions, parents=parents,
                        stops=stops, projection=projection, iou_threshold=iou_threshold,
                        motion_smoothing=motion_smoothing, box_extension=box_extension, progress=progress)


# -- prompts per frame (`usam track --prompts`) -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FramePrompt:
    """The prompts of one track on one frame ``t``: ``prompt`` (points / box; None on a stop frame),
    ``track`` its id (>= 1), ``parent`` the mother's id (0: none), ``division``: the track divides in this frame,
    ``stop``: the track ends before this frame (µSAM's single negative point)."""

    t: int
    track: int
    prompt: Optional[ObjectPrompt] = None
    parent: int = 0
    division: bool = False
    stop: bool = False


def segment_frame_prompt(model: SamModel, embeddings, prompt: ObjectPrompt) -> np.ndarray:
    """(H, W) bool: one object's prompts on one frame as µSAM's annotator segments them
    (``sam_annotator.util.prompt_segmentation``): points only with ``segment_from_points`` (one positive point:
    the best of the multimask output by predicted IoU), a box (clipped to the image and rounded as µSAM's
    ``_process_box``) alone or with points, single-mask output."""
    shape = tuple(embeddings.original_shape)
    points = None if prompt.points is None else np.asarray(prompt.points, np.float64).reshape(-1, 2)
    labels = None if points is None else np.asarray(prompt.point_labels, np.int64).reshape(-1)
    box = None
    if prompt.box is not None:
        x0, y0, x1, y1 = np.asarray(prompt.box, np.float64)
        box = _process_box(np.array([y0, x0, y1, x1]), shape, 0.0).astype(np.float64)
    if points is None and box is None:
        raise InputError("a frame prompt needs points or a box")
    best_of_three = box is None and len(points) == 1 and labels[0] == 1
    result = segment_from_prompts(model, embeddings, points=points, point_labels=labels, boxes=box,
                                  multimask_output=best_of_three)
    if best_of_three:
        return result.masks[0, int(np.argmax(result.scores[0]))]
    return result.masks[0, 0]


def tracks_from_frame_prompts(
    model: SamModel,
    embeddings: StackEmbeddings,
    *,
    prompts: Sequence[FramePrompt],
    projection: str = DEFAULT_PROJECTION,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    motion_smoothing: float = DEFAULT_MOTION_SMOOTHING,
    box_extension: float = DEFAULT_BOX_EXTENSION,
    progress: bool = True,
) -> CtcTracks:
    """Tracks from prompts per frame, as µSAM's tracking annotator: each track's prompts are segmented on their
    frames (:func:`segment_frame_prompt`), then :func:`track_from_prompts` follows every track (a frame whose
    prompts give an empty mask stays an annotated, empty frame, as in µSAM). Lineage from ``parent`` and
    ``division``; a ``stop`` frame ends its track."""
    _check_embeddings(embeddings)
    n = len(embeddings)
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts: nothing to track")
    seen, frames, divisions, parents, stops = set(), {}, {}, {}, {}
    for p in prompts:
        if isinstance(p.track, bool) or not isinstance(p.track, (int, np.integer)) or \
                not 1 <= p.track <= np.iinfo(np.uint16).max:
            raise InputError(f"track ids are integers in 1..65535, got {p.track!r}")
        t = _frame_index(p.t, n, f"track {p.track}: t")
        if (p.track, t) in seen:
            raise InputError(f"track {p.track} has two prompts on frame {t}: give one per track and frame")
        seen.add((p.track, t))
        if p.parent:
            if parents.setdefault(p.track, p.parent) != p.parent:
                raise InputError(f"track {p.track} names two parents, {parents[p.track]} and {p.parent}")
        if p.stop:
            if p.track in stops:
                raise InputError(f"track {p.track} has two stop frames")
            stops[p.track] = t
            continue
        if p.prompt is None:
            raise InputError(f"track {p.track}, frame {t}: no prompt")
        if p.division:
            if p.track in divisions:
                raise InputError(f"track {p.track} divides twice (frames {divisions[p.track]} and {t})")
            divisions[p.track] = t
        frames.setdefault(p.track, []).append(t)
    missing = sorted(set(stops) - set(frames))
    if missing:
        raise InputError(f"track(s) {missing} have a stop frame but no prompts")
    _check_settings(projection, iou_threshold, motion_smoothing)
    _check_lineage(frames, divisions, parents, stops)
    shape = (n,) + tuple(embeddings.image_shape)
    # one array per track: tracks prompted on one frame each keep their own mask there
    masks = {k: np.zeros(shape, bool) for k in frames}
    bar = progress_bar(sum(len(v) for v in frames.values()), 0, "prompted frames", progress)
    bar.unit = "frame"
    try:
        for p in prompts:
            if not p.stop:
                masks[p.track][p.t] = segment_frame_prompt(model, embeddings[p.t], p.prompt)
                bar.update(1)
    finally:
        bar.close()
    return _track_masks(model, embeddings, masks=masks, frames={k: sorted(v) for k, v in frames.items()},
                        divisions=divisions, parents=parents, stops=stops, projection=projection,
                        iou_threshold=iou_threshold, motion_smoothing=motion_smoothing,
                        box_extension=box_extension, progress=progress)


def _check_lineage(frames, divisions, parents, stops) -> None:
    for k, t in sorted(divisions.items()):
        later = [f for f in frames[k] if f > t]
        if t not in frames[k]:
            raise InputError(f"track {k} divides on frame {t}, which is not one of its segmented frames {frames[k]}")
        if later:
            raise InputError(f"track {k} divides on frame {t} but is segmented after it ({later}): a division "
                             "ends the track")
    for k, t in sorted(stops.items()):
        if t <= max(frames[k]):
            raise InputError(f"track {k}: its stop frame {t} must come after its segmented frames {frames[k]}")
        if k in divisions:
            raise InputError(f"track {k} ends at its division: give it a division or a stop frame, not both")
    for daughter, mother in sorted(parents.items()):
        if mother == daughter or mother not in frames:
            raise InputError(f"track {daughter}: its parent {mother} is not another track")
        if mother not in divisions:
            raise InputError(f"track {daughter} has parent {mother}, but track {mother} has no division frame")
        if min(frames[daughter]) <= divisions[mother]:
            raise InputError(f"track {daughter} is segmented on frame {min(frames[daughter])}, but its mother "
                             f"{mother} divides on frame {divisions[mother]}: daughters begin after the division")


def _track_masks(model, embeddings, *, masks, frames, divisions, parents, stops, projection, iou_threshold,
                 motion_smoothing, box_extension, progress) -> CtcTracks:
    """Follow every track (``masks``: track -> (T, H, W) bool, annotated on ``frames[track]``, possibly empty
    there, as µSAM allows) in increasing id, paint, split gaps, build the table."""
    flags = _check_settings(projection, iou_threshold, motion_smoothing)
    _check_lineage(frames, divisions, parents, stops)
    n = len(embeddings)
    labels = np.zeros((n,) + tuple(embeddings.image_shape), np.uint16)
    bar = progress_bar(sum(n - 1 - min(v) for v in frames.values()), 0, "frames", progress)
    bar.unit = "frame"
    try:
        for k in sorted(frames):
            own = masks[k]
            slices = sorted(frames[k]) + ([stops[k]] if k in stops else [])
            if k in stops:
                own[stops[k]] = False
            _track_core(model, embeddings, own, slices, divisions.get(k), stops.get(k), flags=flags,
                        iou_threshold=float(iou_threshold), motion_smoothing=float(motion_smoothing),
                        box_extension=float(box_extension), bar=bar)
            labels[labels == k] = 0
            labels[own] = k
    finally:
        bar.close()
    parents = _split_gaps(labels, parents)
    return CtcTracks(masks=labels, tracks=track_table(masks=labels, parents=parents))
