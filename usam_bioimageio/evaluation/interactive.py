"""Interactive segmentation evaluation as µSAM runs it (``micro_sam.evaluation.inference
.run_inference_with_iterative_prompting``), on our packages.

For one image and its ground truth, every object is segmented at once from a starting prompt (one positive
point inside it, or its bounding box); then, ``n_iterations - 1`` times, one positive point where the
prediction misses the object and one negative point where it spills over (``training.iterative_prompting
.corrective_points``, the same rule as in training) are added to the object's prompts and all objects are
segmented again. After every round the masks are painted into a label image as µSAM saves them
(``mask_data_to_segmentation``: largest first, connected components relabelled) and scored with the mean
segmentation accuracy against the ground truth.

Settings as µSAM's: a lone starting point uses multimask output (the mask with the best predicted IoU), every
later round one mask; no mask prompts (``use_masks=False``); boxes are the objects' exact bounding boxes.
Deviation: µSAM draws the starting point from the object after an erosion (``dilation=5``); here it is drawn
uniformly from the object (seeded ``numpy.random.Generator``), so the prompt sequence is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.evaluation.metrics import segmentation_scores
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.pixel_scale import check_scale, scale_image
from usam_bioimageio.prompting.scaled import AnyEmbeddings, segment_from_prompts_scaled
from usam_bioimageio.prompting import iterative as ip

START_PROMPTS = ("point", "box")


@dataclass(frozen=True)
class InteractiveRound:
    """One round: the prompts every object had (points (o, p, 2) as (x, y), labels (o, p), boxes (o, 4) or
    None), the label image and its scores (mSA, accuracy at IoU 0.5 and 0.75)."""

    points: Optional[np.ndarray]
    point_labels: Optional[np.ndarray]
    boxes: Optional[np.ndarray]
    labels: np.ndarray
    msa: float
    sa50: float
    sa75: float


def _label_image(masks: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    from usam_bioimageio.automatic.amg.labels import masks_to_label_image

    records = [{"segmentation": m, "area": int(np.count_nonzero(m))} for m in masks]
    return masks_to_label_image(records, shape, with_background=False)


def _decode(model: SamModel, embeddings: AnyEmbeddings, shape: Tuple[int, int], scale: float, points, point_labels,
            boxes, multimask: bool, batch_size: int) -> np.ndarray:
    """(o, H, W) masks; with ``multimask`` the one with the best predicted IoU per object."""
    n = len(points) if points is not None else len(boxes)
    out = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        result = segment_from_prompts_scaled(
            model, embeddings, shape=shape, scale=scale,
            points=None if points is None else points[sl], point_labels=None if points is None else point_labels[sl],
            boxes=None if boxes is None else boxes[sl], multimask_output=multimask,
        )
        best = np.argmax(result.scores, axis=1)
        out.append(result.masks[np.arange(len(best)), best])
    return np.concatenate(out)


def interactive_segmentation(
    model: SamModel,
    image: np.ndarray,
    ground_truth: np.ndarray,
    *,
    start: str = "box",
    n_iterations: int = 8,
    seed: int = 0,
    embeddings: Optional[AnyEmbeddings] = None,
    batch_size: int = 32,
    scale: float = 1.0,
) -> List[InteractiveRound]:
    """µSAM's iterative prompting evaluation of one image: ``n_iterations`` rounds (µSAM's default 8: the
    starting prompt and 7 corrections), each an :class:`InteractiveRound`. ``start``: "point" or "box".

    ``scale`` (``prompting.scaled``): the model prompted on the image enlarged this many times, masks shrunk back;
    ``embeddings`` (default: computed untiled) are those of ``scale_image(image, scale)``, plain or tiled. Prompts
    and scores stay in the image's pixels."""
    if start not in START_PROMPTS:
        raise ValueError(f"start must be one of {START_PROMPTS}, got {start!r}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    gt = np.asarray(ground_truth)
    if gt.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"ground truth {gt.shape} and image {np.asarray(image).shape[:2]} differ in size")
    ids = np.unique(gt)
    ids = ids[ids != 0]
    if len(ids) == 0:
        raise ValueError("the ground truth has no objects")
    if embeddings is None:
        embeddings = compute_embeddings(model, scale_image(image, scale) if check_scale(scale) != 1.0 else image)
    rng = np.random.default_rng(seed)
    gt_masks = ip.object_masks(gt, ids)
    points = point_labels = boxes = None
    if start == "point":
        points, point_labels = ip.starting_points(gt_masks, rng)
        points = points.astype(np.float64)
    else:
        boxes = ip.bounding_boxes(gt_masks).astype(np.float64)
    rounds = []
    for k in range(n_iterations):
        masks = _decode(model, embeddings, gt.shape, scale, points, point_labels, boxes, start == "point" and k == 0,
                        batch_size)
        labels = _label_image(masks, gt.shape)
        scores = segmentation_scores(labels, gt)
        rounds.append(InteractiveRound(points, point_labels, boxes, labels, scores["msa"], scores["sa50"],
                                       scores["sa75"]))
        if k == n_iterations - 1:
            break
        coords, new_labels = ip.corrective_points(gt_masks, masks, rng)
        points = coords.astype(np.float64) if points is None else np.concatenate([points, coords], axis=1)
        point_labels = new_labels if point_labels is None else np.concatenate([point_labels, new_labels], axis=1)
    return rounds


def evaluate_interactive(
    model: SamModel,
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    *,
    start: str = "box",
    n_iterations: int = 8,
    seed: int = 0,
    embed: Optional[Callable[[np.ndarray], AnyEmbeddings]] = None,
    progress: bool = False,
    scale: float = 1.0,
) -> Dict[str, Any]:
    """Mean scores per round over (image, ground truth) pairs (images without objects are skipped):
    ``{"msa": [round 0, round 1, ...], "sa50": [...], "sa75": [...], "n_images": n}``; image i uses seed
    ``seed + i``. ``embed``: image -> embeddings (default: computed per image); ``scale``: as in
    :func:`interactive_segmentation` (``embed`` then returns those of the enlarged image)."""
    from tqdm import tqdm

    per_image = []
    for i, (image, gt) in enumerate(tqdm(pairs, desc=f"interactive ({start})", disable=not progress)):
        if not np.any(np.asarray(gt)):
            continue
        rounds = interactive_segmentation(model, image, gt, start=start, n_iterations=n_iterations, seed=seed + i,
                                          embeddings=embed(image) if embed is not None else None, scale=scale)
        per_image.append([[r.msa, r.sa50, r.sa75] for r in rounds])
    if not per_image:
        raise ValueError("no image with objects")
    mean = np.mean(per_image, axis=0)  # (rounds, 3)
    return {"msa": mean[:, 0].tolist(), "sa50": mean[:, 1].tolist(), "sa75": mean[:, 2].tolist(),
            "n_images": len(per_image)}
