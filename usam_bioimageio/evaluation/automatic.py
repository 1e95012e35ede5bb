"""Automatic segmentation evaluation: grid search of AIS / AMG thresholds on a validation split, scores on a
test split, and a classical baseline that needs no training.

As µSAM's ``evaluation.instance_segmentation.run_instance_segmentation_grid_search`` does it: the expensive
part runs once per validation image (AIS: the decoder maps; AMG: every candidate mask of the point grid, before
the thresholds), then each parameter combination is applied and scored (mean segmentation accuracy, mSA,
averaged over the images); the combination with the best mean mSA is then applied to the test images.

AMG candidates: :func:`usam_bioimageio.automatic.amg.generator.generate_masks` with the grid's lowest thresholds and no NMS;
per combination the records are filtered by predicted IoU (``>``) and stability (``>=``) and the box NMS runs on
the survivors, which is what ``generate_masks`` with those thresholds computes (one crop layer, no
``min_mask_region_area``): filtering comes before the NMS there too.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from usam_bioimageio.evaluation.metrics import segmentation_scores

#: µSAM-like grids, smaller (CPU): AIS distance thresholds and smoothing, AMG score thresholds
AIS_GRID: Dict[str, Sequence[Any]] = {
    "center_distance_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "boundary_distance_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "distance_smoothing": (1.2, 1.6, 2.0),
    "min_size": (0, 25),
}
AMG_GRID: Dict[str, Sequence[Any]] = {
    "pred_iou_thresh": (0.6, 0.7, 0.8, 0.88),
    "stability_score_thresh": (0.6, 0.75, 0.85, 0.95),
}


def combinations(grid: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Every combination of the grid's values, in ``itertools.product`` order."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def mean_scores(predictions: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray]) -> Dict[str, float]:
    """``segmentation_scores`` averaged over images (mSA, SA50, SA75, precision, recall, f1)."""
    rows = [segmentation_scores(p, g) for p, g in zip(predictions, ground_truths)]
    if not rows:
        raise ValueError("no images to score")
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def grid_search(prepared: Sequence[Any], ground_truths: Sequence[np.ndarray], grid: Mapping[str, Sequence[Any]],
                segment: Callable[[Any, Dict[str, Any]], np.ndarray], *,
                progress: bool = False) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(best combination, table): ``segment(prepared_i, combination)`` -> labels for each image and combination;
    the table has one row per combination (its values and its mean scores), the best has the highest mean mSA
    (the first of equals)."""
    from tqdm import tqdm

    table = []
    for combo in tqdm(combinations(grid), desc="grid search", disable=not progress):
        scores = mean_scores([segment(p, combo) for p in prepared], ground_truths)
        table.append({**combo, **scores})
    best = max(range(len(table)), key=lambda i: (table[i]["msa"], -i))
    return {k: table[best][k] for k in grid}, table


# -- AIS ---------------------------------------------------------------------------------------------------------

def ais_segment(maps: np.ndarray, combo: Mapping[str, Any], base=None) -> np.ndarray:
    from usam_bioimageio.automatic.ais.postprocess import AisParameters, instances_from_maps

    params = dataclasses.replace(base if base is not None else AisParameters(), **combo)
    return instances_from_maps(maps, params=params)


# -- AMG ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AmgCandidates:
    """An image's AMG candidates before the thresholds and the NMS (see the module docstring)."""

    records: List[Dict[str, Any]]
    shape: Tuple[int, int]
    box_nms_thresh: float


def amg_candidates(model, image: np.ndarray, grid: Mapping[str, Sequence[Any]], *, embeddings=None,
                   base=None) -> AmgCandidates:
    """Every mask the point grid gives with the grid's lowest thresholds, without NMS."""
    from usam_bioimageio.automatic.amg.params import AmgParameters
    from usam_bioimageio.automatic.amg.generator import generate_masks

    base = base if base is not None else AmgParameters()
    if base.crop_n_layers or base.min_mask_region_area:
        raise ValueError("the AMG grid search supports one crop layer and no min_mask_region_area")
    low = dataclasses.replace(base, box_nms_thresh=1.0, **{k: min(v) for k, v in grid.items()
                                                            if k in ("pred_iou_thresh", "stability_score_thresh")})
    records = generate_masks(model, image, embeddings=embeddings, params=low)
    return AmgCandidates(records, tuple(np.asarray(image).shape[:2]), base.box_nms_thresh)


def amg_segment(candidates: AmgCandidates, combo: Mapping[str, Any]) -> np.ndarray:
    """The label image ``automatic_mask_generation`` gives with the combination's thresholds."""
    from usam_bioimageio.automatic.amg.labels import masks_to_label_image
    from usam_bioimageio.automatic.amg.geometry import nms

    iou_t = np.float32(combo.get("pred_iou_thresh", 0.0))
    stab_t = np.float32(combo.get("stability_score_thresh", 0.0))
    kept = [r for r in candidates.records
            if (iou_t == 0 or np.float32(r["predicted_iou"]) > iou_t)
            and (stab_t == 0 or np.float32(r["stability_score"]) >= stab_t)]
    if kept:
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in kept)], np.int64)
        scores = np.asarray([r["predicted_iou"] for r in kept], np.float32)
        kept = [kept[i] for i in nms(boxes, scores, combo.get("box_nms_thresh", candidates.box_nms_thresh))]
    return masks_to_label_image(kept, candidates.shape)


# -- classical baseline --------------------------------------------------------------------------------------------


def evaluate_automatic(
    model,
    val_pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    test_pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    *,
    mode: str,
    grid: Optional[Mapping[str, Sequence[Any]]] = None,
    progress: bool = False,
    embed: Optional[Callable[[np.ndarray], Any]] = None,
    amg_base=None,
    scale: float = 1.0,
) -> Dict[str, Any]:
    """Grid search on ``val_pairs`` then scores on ``test_pairs`` for ``mode`` "ais" or "amg":
    ``{"best": combination, "val_table": [...], "test": mean scores, "test_per_image": [...]}``.
    ``embed``: image -> embeddings (default ``compute_embeddings(model, image)``; e.g. a cache shared by modes).
    ``amg_base``: the AMG parameters the grid varies (default ``AmgParameters()``: 32 points per side).
    ``scale`` (AIS only): each image is resized by this factor before it is encoded, its maps back
    (``ais_maps(scale=...)``); ``embed`` then returns the embeddings of the resized image."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.pixel_scale import check_scale, scale_image

    if mode not in ("ais", "amg"):
        raise ValueError(f"mode must be 'ais' or 'amg', got {mode!r}")
    if check_scale(scale) != 1.0 and mode != "ais":
        raise ValueError(f"scale is for mode 'ais', not {mode!r}")
    grid = dict(grid if grid is not None else (AIS_GRID if mode == "ais" else AMG_GRID))

    def prepare(image):
        if embed is not None:
            emb = embed(image)
        else:
            emb = compute_embeddings(model, image if scale == 1.0 else scale_image(image, scale))
        if mode == "ais":
            return ais_maps(model, image, embeddings=emb, scale=scale)
        return amg_candidates(model, image, grid, embeddings=emb, base=amg_base)

    segment = ais_segment if mode == "ais" else amg_segment
    from tqdm import tqdm

    val = [prepare(image) for image, _ in tqdm(val_pairs, desc=f"{mode} val", disable=not progress)]
    best, table = grid_search(val, [g for _, g in val_pairs], grid, segment, progress=progress)
    predictions = [segment(prepare(image), best) for image, _ in tqdm(test_pairs, desc=f"{mode} test",
                                                                       disable=not progress)]
    per_image = [segmentation_scores(p, g) for p, (_, g) in zip(predictions, test_pairs)]
    return {"best": best, "val_table": table, "test": mean_scores(predictions, [g for _, g in test_pairs]),
            "test_per_image": per_image}
