"""Write tests/data/evaluation_reference.json: elf's mSA on real ground truth vs perturbed copies of it.

Run with a Python that has python-elf (e.g. the environment scripts/regenerate_ais_reference.sh creates):

    python scripts/evaluation_reference.py tests/data/evaluation_reference.json [--data SHARED_DATA_DIR]

Only numbers are stored. tests/test_evaluation.py imports :func:`cases` from this file (numpy / scipy /
tifffile only at module level), rebuilds the same label images from the shared data and compares
``usam_bioimageio.evaluation.metrics`` with the stored values of ``elf.evaluation.mean_segmentation_accuracy``
(``return_accuracies=True``, default thresholds) and ``elf.evaluation.matching`` (threshold 0.5), which are
what micro_sam 1.8.14's ``evaluation.run_evaluation`` reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

N_IMAGES = 3  # the first DSB2018 test images of splits.json
LOW_THRESHOLD = 0.3


def _erode(labels: np.ndarray, iterations: int) -> np.ndarray:
    """Keep a pixel only if its 3x3 neighbourhood holds one label, ``iterations`` times."""
    out = labels
    for _ in range(iterations):
        same = ndimage.grey_erosion(out, size=3) == ndimage.grey_dilation(out, size=3)
        out = np.where(same, out, 0)
    return out


def _dilate(labels: np.ndarray, size: int) -> np.ndarray:
    """Grow objects into the background (the largest id wins where objects meet)."""
    return np.where(labels == 0, ndimage.grey_dilation(labels, size=size), labels)


def _shift(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(labels)
    h, w = labels.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        labels[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _merge_pairs(labels: np.ndarray) -> np.ndarray:
    """Objects 2k-1 and 2k (in sorted id order) become one object, with a large new id."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lut[ids] = 1000 + np.arange(len(ids)) // 2
    return lut[labels]


def _drop_and_split(labels: np.ndarray) -> np.ndarray:
    """Drop every third object; split every fourth remaining one at its mean row (lower half gets a new id)."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    out = labels.astype(np.int64).copy()
    next_id = int(labels.max()) + 1
    for k, i in enumerate(ids):
        if k % 3 == 2:
            out[labels == i] = 0
        elif k % 4 == 0:
            rows, cols = np.nonzero(labels == i)
            lower = rows > rows.mean()
            out[rows[lower], cols[lower]] = next_id
            next_id += 1
    return out


PERTURBATIONS = {
    "identity": lambda gt: gt.copy(),
    "eroded1": lambda gt: _erode(gt, 1),
    "eroded3": lambda gt: _erode(gt, 3),
    "dilated5": lambda gt: _dilate(gt, 5),
    "shifted_3_-2": lambda gt: _shift(gt, 3, -2),
    "shifted_-5_4": lambda gt: _shift(gt, -5, 4),
    "merged_pairs": _merge_pairs,
    "dropped_and_split": _drop_and_split,
    "eroded2_shifted_2_2": lambda gt: _shift(_erode(gt, 2), 2, 2),
    "empty": lambda gt: np.zeros_like(gt),
}


def cases(data_dir: Path):
    """Yield (name, prediction, ground truth) for every (image, perturbation) pair and two empty-gt cases."""
    import tifffile

    dsb = Path(data_dir) / "dsb2018"
    ids = json.loads((dsb / "splits.json").read_text())["test"][:N_IMAGES]
    for sid in ids:
        gt = tifffile.imread(dsb / "labels" / f"{sid}.tif").astype(np.int64)
        for name, make in PERTURBATIONS.items():
            yield f"{sid[:12]}/{name}", make(gt), gt
    gt = tifffile.imread(dsb / "labels" / f"{ids[0]}.tif").astype(np.int64)
    yield "empty_gt/pred", gt, np.zeros_like(gt)
    yield "empty_gt/empty_pred", np.zeros_like(gt), np.zeros_like(gt)


def main() -> None:
    from elf.evaluation import matching, mean_segmentation_accuracy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    results = {}
    for name, pred, gt in cases(args.data):
        msa, accuracies = mean_segmentation_accuracy(pred, gt, return_accuracies=True)
        stats = matching(pred, gt)
        low = matching(pred, gt, threshold=LOW_THRESHOLD)  # below 0.5 the assignment itself matters
        results[name] = {"msa": float(msa), "accuracies": [float(a) for a in accuracies],
                         **{k: float(v) for k, v in stats.items()},
                         "low_threshold": {k: float(v) for k, v in low.items()}}
        print(f"{name:40s} mSA {msa:.4f} SA50 {accuracies[0]:.4f} SA75 {accuracies[5]:.4f}")
    from importlib import metadata

    meta = {"elf": metadata.version("python-elf"), "numpy": np.__version__,
            "source": "elf.evaluation.mean_segmentation_accuracy(pred, gt, return_accuracies=True), "
                      "elf.evaluation.matching(pred, gt) (threshold 0.5; low_threshold: 0.3)"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "cases": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
