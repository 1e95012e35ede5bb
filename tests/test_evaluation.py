"""usam_bioimageio.evaluation.metrics: hand-computed cases, and elf's numbers on real ground truth.

The reference numbers in tests/data/evaluation_reference.json come from scripts/evaluation_reference.py
(python-elf's ``mean_segmentation_accuracy`` / ``matching``); this file rebuilds the same label images.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from usam_bioimageio.evaluation.metrics import DEFAULT_THRESHOLDS, iou_matrix, matching, mean_segmentation_accuracy, \
    segmentation_scores

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "evaluation_reference.json"


def _square_case():
    """GT: A (10x10 = 100 px) and B (4x4); prediction: 60 px of A only -> IoU(A) = 0.6, B missed."""
    gt = np.zeros((32, 32), np.uint16)
    gt[0:10, 0:10] = 1
    gt[20:24, 20:24] = 2
    pred = np.zeros((32, 32), np.int32)
    pred[0:10, 0:6] = 7
    return pred, gt


def test_thresholds_are_elfs():
    assert len(DEFAULT_THRESHOLDS) == 10
    np.testing.assert_array_equal(DEFAULT_THRESHOLDS, np.arange(0.5, 1.0, 0.05))


def test_iou_matrix_by_hand():
    pred, gt = _square_case()
    np.testing.assert_array_equal(iou_matrix(pred, gt), [[0.6, 0.0]])


def test_one_match_one_miss():
    pred, gt = _square_case()
    stats = matching(pred, gt, 0.5)
    # tp 1 (IoU 0.6), fp 0, fn 1 (B) -> SA = 1 / (1 + 0 + 1)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (1, 0, 1)
    assert stats["segmentation_accuracy"] == 0.5
    assert stats["precision"] == 1.0 and stats["recall"] == 0.5
    assert stats["f1"] == pytest.approx(2 / 3)
    msa, accuracies = mean_segmentation_accuracy(pred, gt)
    # 0.6 passes 0.5 and 0.55, but not the third threshold, which is 0.6000000000000001 as in elf.
    np.testing.assert_array_equal(accuracies, [0.5, 0.5] + [0.0] * 8)
    assert msa == pytest.approx(0.1)
    assert matching(pred, gt, 0.6)["tp"] == 1  # an explicit 0.6 does match


def test_false_positive_and_perfect_object():
    pred, gt = _square_case()
    pred[20:24, 20:24] = 3  # B predicted exactly (IoU 1)
    pred[28:31, 0:3] = 4  # an object where there is none
    # at every threshold up to 0.55: tp 2, fp 1, fn 0 -> 2 / 3; above: tp 1 (B), fp 2, fn 1 -> 1 / 4
    msa, accuracies = mean_segmentation_accuracy(pred, gt)
    np.testing.assert_allclose(accuracies, [2 / 3, 2 / 3] + [1 / 4] * 8)
    assert msa == pytest.approx((4 / 3 + 2) / 10)
    scores = segmentation_scores(pred, gt)
    assert scores["sa50"] == pytest.approx(2 / 3) and scores["sa75"] == 0.25
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == 1.0


def test_assignment_is_optimal_not_greedy():
    """Below 0.5 an object can pass the threshold with two partners: the matching must maximise tp.

    One row repeated: G1 = [0, 10), G2 = [10, 20); P1 = [4, 15): IoU(G1) = 6/15 = 0.4, IoU(G2) = 5/16 = 0.3125;
    P2 = [0, 3): IoU(G1) = 3/10 = 0.3. Greedy by best IoU pairs P1-G1 and leaves P2, G2 unmatched (tp 1); the
    optimal assignment pairs P1-G2 and P2-G1 (tp 2).
    """
    gt = np.zeros((3, 24), np.int64)
    gt[:, 0:10], gt[:, 10:20] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, 4:15], pred[:, 0:3] = 1, 2
    np.testing.assert_allclose(iou_matrix(pred, gt), [[0.4, 0.3125], [0.3, 0.0]])
    stats = matching(pred, gt, 0.3)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (2, 0, 0)
    assert stats["segmentation_accuracy"] == 1.0
    # at 0.35 only P1-G1 passes: tp 1, fp 1, fn 1
    assert matching(pred, gt, 0.35)["segmentation_accuracy"] == pytest.approx(1 / 3)
    assert mean_segmentation_accuracy(pred, gt)[0] == 0.0


def test_empty_images():
    pred, gt = _square_case()
    empty = np.zeros_like(gt)
    # elf's convention: accuracy is 0 whenever there is no true positive, also for two empty images
    assert mean_segmentation_accuracy(empty, empty)[0] == 0.0
    stats = matching(empty, gt)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (0, 0, 2)
    stats = matching(pred, empty)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (0, 1, 0)
    assert mean_segmentation_accuracy(pred, empty)[0] == 0.0


def test_ids_and_background_coverage():
    pred, gt = _square_case()
    pred[20:24, 20:24] = 3
    permuted = np.select([pred == 7, pred == 3], [100000, 2], 0)
    assert mean_segmentation_accuracy(permuted, gt)[0] == mean_segmentation_accuracy(pred, gt)[0]
    # a prediction without background: one object covering the whole image (IoU with A: 100 / 1024)
    full = np.full_like(gt, 5)
    stats = matching(full, gt, 0.05)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (1, 0, 1)
    with pytest.raises(ValueError, match="shape"):
        matching(pred[:10], gt)


def _load_cases():
    spec = importlib.util.spec_from_file_location("evaluation_reference", ROOT / "scripts" / "evaluation_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equals_elf_on_real_ground_truth(data_dir):
    reference = json.loads(REFERENCE.read_text())["cases"]
    module = _load_cases()
    seen = set()
    for name, pred, gt in module.cases(data_dir):
        expected = reference[name]
        msa, accuracies = mean_segmentation_accuracy(pred, gt)
        assert msa == pytest.approx(expected["msa"], abs=1e-12), name
        np.testing.assert_allclose(accuracies, expected["accuracies"], atol=1e-12, err_msg=name)
        for key, threshold in (("", 0.5), ("low_threshold", module.LOW_THRESHOLD)):
            stats = matching(pred, gt, threshold)
            want = expected[key] if key else expected
            for metric in ("precision", "recall", "segmentation_accuracy", "f1"):
                assert stats[metric] == pytest.approx(want[metric], abs=1e-12), (name, threshold, metric)
        seen.add(name)
    assert seen == set(reference)
    # the fixture is not trivial: a spread of values, several objects per image
    values = sorted({round(v["msa"], 4) for v in reference.values()})
    assert len(values) > 15
