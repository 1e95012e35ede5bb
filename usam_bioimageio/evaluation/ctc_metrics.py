"""Cell Tracking Challenge metrics TRA and DET through ``py-ctcmetrics`` (imported when called), and 3D mSA.

TRA and DET are not reimplemented: :func:`ctc_scores` hands the two folders to py-ctcmetrics
(``ctc_metrics.scripts.evaluate``: ``load_data`` + ``calculate_metrics``, the code behind its ``ctc_evaluate``
command), which matches result to reference masks frame by frame (a reference object is detected by the
result object covering more than half of it) and counts the acyclic-oriented-graph-matching operations
(AOGM; DET = 1 - AOGM-D / AOGM-D0, TRA = 1 - min(AOGM, AOGM0) / AOGM0, the CTC's weights).

py-ctcmetrics reads fixed names (``res_track.txt`` + ``mask*.tif`` for the result, ``TRA/man_track.txt`` +
``TRA/man_track*.tif`` for the reference): both folders are staged as links under those names first, so any
CTC folder that :func:`usam_bioimageio.tracking.ctc.ctc_files` reads can be scored (e.g. a peer result stored
as ``man_track*.tif`` + ``man_track.txt``).

3D mSA: :func:`usam_bioimageio.evaluation.metrics.mean_segmentation_accuracy` counts voxels of any shape (one
overlap table over the flattened arrays), so it is µSAM's mSA in 3D as it is; :func:`volume_scores` checks the
shapes and returns µSAM's summary.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

from usam_bioimageio.evaluation.metrics import segmentation_scores
from usam_bioimageio.tracking.ctc import CtcTracks, ctc_files, write_ctc

__all__ = ["ctc_scores", "ctc_scores_of_tracks", "volume_scores"]

_METRICS = ["Valid", "DET", "TRA"]


def _import_evaluate():
    try:
        from ctc_metrics.scripts import evaluate
    except ImportError as error:
        raise ImportError("TRA / DET need py-ctcmetrics: pip install 'usam-bioimageio[tracking]'") from error
    return evaluate


def _link(source: Path, target: Path):
    try:
        os.symlink(os.path.abspath(source), target)
    except OSError:  # no symlinks here: copy
        target.write_bytes(Path(source).read_bytes())


def ctc_scores(*, result: Path, ground_truth: Path, threads: int = 1) -> Dict[str, float]:
    """TRA, DET, AOGM (and its parts) and ``Valid`` of a CTC ``result`` folder against a CTC ``ground_truth``
    folder (``TRA`` itself or the folder holding it), by py-ctcmetrics."""
    evaluate = _import_evaluate()
    res_files, gt_files = ctc_files(folder=Path(result)), ctc_files(folder=Path(ground_truth))
    if len(res_files.frames) != len(gt_files.frames):
        raise ValueError(f"the result has {len(res_files.frames)} frames, the ground truth "
                         f"{len(gt_files.frames)}")
    with tempfile.TemporaryDirectory(prefix="usam_ctc_") as tmp:
        res_dir, gt_dir = Path(tmp) / "RES", Path(tmp) / "GT" / "TRA"
        res_dir.mkdir()
        gt_dir.mkdir(parents=True)
        digits = max(4, len(str(len(res_files.frames))))
        for t, (r, g) in enumerate(zip(res_files.frames, gt_files.frames)):
            _link(r, res_dir / f"mask{t:0{digits}d}.tif")
            _link(g, gt_dir / f"man_track{t:0{digits}d}.tif")
        _link(res_files.track_file, res_dir / "res_track.txt")
        _link(gt_files.track_file, gt_dir / "man_track.txt")
        with contextlib.redirect_stdout(io.StringIO()):
            comp_tracks, ref_tracks, traj, segm, _, is_valid = evaluate.load_data(
                str(res_dir), str(gt_dir.parent), True, False, threads)
            results = evaluate.calculate_metrics(comp_tracks, ref_tracks, traj, segm, list(_METRICS), is_valid)
    if not results.get("Valid"):
        raise ValueError(f"{result}: py-ctcmetrics finds the result invalid (track table and masks disagree)")
    return {key: float(value) for key, value in results.items() if value is not None}


def ctc_scores_of_tracks(*, result: CtcTracks, ground_truth: CtcTracks, threads: int = 1) -> Dict[str, float]:
    """:func:`ctc_scores` of tracks in memory (both written to a temporary folder first)."""
    with tempfile.TemporaryDirectory(prefix="usam_ctc_") as tmp:
        res = write_ctc(folder=Path(tmp) / "res", tracks=result)
        gt = write_ctc(folder=Path(tmp) / "gt" / "TRA", tracks=ground_truth, result=False)
        return ctc_scores(result=res, ground_truth=gt, threads=threads)


def volume_scores(*, prediction: np.ndarray, ground_truth: np.ndarray) -> Dict[str, float]:
    """µSAM's scores (mSA, SA50, SA75, precision / recall / F1 at IoU 0.5) of a 3D label volume."""
    prediction, ground_truth = np.asarray(prediction), np.asarray(ground_truth)
    if prediction.ndim != 3 or prediction.shape != ground_truth.shape:
        raise ValueError(f"need two 3D label volumes of one shape, got {prediction.shape} and {ground_truth.shape}")
    return segmentation_scores(prediction, ground_truth)
