"""Instance segmentation metrics as µSAM reports them: matching by IoU and the mean segmentation accuracy.

Semantics are those of ``elf.evaluation.matching`` (python-elf, used by micro_sam 1.8.14
``evaluation.evaluation.run_evaluation``), itself after stardist's ``matching``:

* The overlap table counts the pixels shared by every (predicted id, ground-truth id) pair, background
  (``ignore_label`` 0) included, so an object's size is its full pixel count. The IoU of a pair is
  ``overlap / max(size_pred + size_gt - overlap, 1e-7)`` in float64; the background row / column is then
  dropped.
* At a threshold ``t`` the objects are matched one to one by ``scipy.optimize.linear_sum_assignment`` on the
  cost ``-(iou >= t) - iou / (2 * n_matched)`` (``n_matched = min(n_pred, n_gt)``): as many pairs with
  ``iou >= t`` as possible, ties broken by the larger IoU. ``tp`` is the number of assigned pairs with
  ``iou >= t``, ``fp = n_pred - tp``, ``fn = n_gt - tp``.
* The segmentation accuracy is ``tp / (tp + fp + fn)``, and 0 whenever ``tp == 0`` (so also when both
  images are empty: elf returns 0 there, and so do we). Precision, recall and F1 are 0 when ``tp == 0``.
* The mean segmentation accuracy (mSA) averages the accuracy over ``np.arange(0.5, 1.0, 0.05)``: exactly
  these floats (0.6000000000000001, 0.7500000000000002, ...), since an IoU equal to a nominal threshold can
  fall on either side of it. µSAM reports mSA, SA50 (the first threshold) and SA75 (the sixth).

numpy / scipy only.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "DEFAULT_THRESHOLDS",
    "iou_matrix",
    "matching",
    "mean_segmentation_accuracy",
    "segmentation_scores",
]

DEFAULT_THRESHOLDS = np.arange(0.5, 1.0, 0.05)  # elf / µSAM: 10 thresholds 0.5 ... 0.95
_EPS = 1e-7


def iou_matrix(pred: np.ndarray, gt: np.ndarray, ignore_label: Optional[int] = 0) -> np.ndarray:
    """IoU of every predicted object (rows) with every ground-truth object (columns), float64.

    Rows / columns follow the sorted object ids of ``pred`` / ``gt`` without ``ignore_label``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    ids_p, inv_p = np.unique(pred.ravel(), return_inverse=True)
    ids_g, inv_g = np.unique(gt.ravel(), return_inverse=True)
    n_p, n_g = len(ids_p), len(ids_g)
    overlap = np.bincount(inv_p.ravel().astype(np.int64) * n_g + inv_g.ravel(), minlength=n_p * n_g)
    overlap = overlap.reshape(n_p, n_g).astype(np.float64)
    if overlap.sum() > 0:
        size_p = overlap.sum(axis=1, keepdims=True)
        size_g = overlap.sum(axis=0, keepdims=True)
        scores = overlap / np.maximum(size_g + size_p - overlap, _EPS)
    else:  # no pixels at all
        scores = overlap
    if ignore_label is not None:
        scores = scores[ids_p != ignore_label][:, ids_g != ignore_label]
    return scores


def _true_positives(scores: np.ndarray, threshold: float) -> int:
    n_matched = min(scores.shape)
    if n_matched == 0 or not np.any(scores >= threshold):
        return 0
    costs = -(scores >= threshold).astype(float) - scores / (2 * n_matched)
    rows, cols = linear_sum_assignment(costs)
    return int(np.count_nonzero(scores[rows, cols] >= threshold))


def _ratio(num: float, den: float, tp: int) -> float:
    return float(num / den) if tp > 0 else 0.0


def matching(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5,
             ignore_label: Optional[int] = 0) -> Dict[str, float]:
    """One-to-one matching of predicted and ground-truth objects at IoU ``threshold`` (elf / stardist).

    Returns ``tp``, ``fp``, ``fn``, ``n_pred``, ``n_true`` and ``precision``, ``recall``,
    ``segmentation_accuracy`` (``tp / (tp + fp + fn)``), ``f1`` (each 0 when ``tp == 0``).
    """
    scores = iou_matrix(pred, gt, ignore_label)
    n_pred, n_true = scores.shape
    tp = _true_positives(scores, threshold)
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp, "fp": fp, "fn": fn, "n_pred": n_pred, "n_true": n_true,
        "precision": _ratio(tp, tp + fp, tp),
        "recall": _ratio(tp, tp + fn, tp),
        "segmentation_accuracy": _ratio(tp, tp + fp + fn, tp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, tp),
    }


def mean_segmentation_accuracy(pred: np.ndarray, gt: np.ndarray, thresholds: Optional[Sequence[float]] = None,
                               ignore_label: Optional[int] = 0) -> Tuple[float, np.ndarray]:
    """(mSA, accuracy per threshold) of ``pred`` against ``gt``; thresholds default to 0.5, 0.55, ..., 0.95."""
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    scores = iou_matrix(pred, gt, ignore_label)
    n_pred, n_true = scores.shape
    accuracies = []
    for threshold in thresholds:
        tp = _true_positives(scores, threshold)
        accuracies.append(_ratio(tp, n_pred + n_true - tp, tp))
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(np.mean(accuracies)), accuracies


def segmentation_scores(pred: np.ndarray, gt: np.ndarray, ignore_label: Optional[int] = 0) -> Dict[str, float]:
    """µSAM's summary of one image: ``msa``, ``sa50``, ``sa75``, plus precision / recall / f1 at IoU 0.5."""
    msa, accuracies = mean_segmentation_accuracy(pred, gt, ignore_label=ignore_label)
    stats = matching(pred, gt, 0.5, ignore_label)
    return {"msa": msa, "sa50": float(accuracies[0]), "sa75": float(accuracies[5]),
            "precision": stats["precision"], "recall": stats["recall"], "f1": stats["f1"]}
