"""Write reports/volumes_tracking.json: the quality of the 3D merge and of the linker, without model weights.

    .venv/bin/python scripts/volumes_tracking_report.py [--data ../shared/data] [--out reports/volumes_tracking.json]

Linking alone: ``bacteria_tracking``'s ground-truth masks (``TRA/man_track*.tif``), every frame relabelled on
its own with shuffled ids (so the linker has to link), linked by :func:`usam_bioimageio.tracking.linking.link`
(motile; and the greedy fallback), written as a CTC result folder and scored with py-ctcmetrics against
``TRA/man_track.txt``; next to it the peer result in ``RES/`` scored the same way.

3D merge alone: the three GoNuclear ground-truth volumes (100^3 each, whole), every z slice relabelled on its
own with shuffled ids, merged by :func:`usam_bioimageio.volumes.merge.merge_slices` with µSAM's defaults
(``merge_instance_segmentation_3d``: beta 0.5, no gap closing, no minimal z extent) and scored against the 3D
ground truth (µSAM's mSA and SA50, mean over the three volumes); variants: µSAM's annotator defaults (gap
closing 2, min z extent 2), min z extent 3, and our opt-in symmetric overlap.

With ``--model FAMILY`` (a family with AIS packages, e.g. the demo model's: model_packages/dsb2018_vit_t_256) the
full pipelines too: automatic 3D (µSAM's ``automatic_3d_segmentation``: AIS per slice with µSAM's default
thresholds, merged across z) on the three GoNuclear volumes, scored against their 3D ground truth
(``msa3d_ais_gonuclear``, ``sa50_3d_ais_gonuclear``), and automatic tracking (AIS per frame, then the linker) on
the 53 bacteria frames, scored by py-ctcmetrics (``tra_ais_bacteria``, ``det_ais_bacteria``).

About 4 minutes on 2 cores (py-ctcmetrics' matching of 53 frames of 1305x1009 takes ~35 s per result), plus the
pipelines (minutes with a vit_t at input size 256).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import tifffile

from usam_bioimageio.evaluation.ctc_metrics import ctc_scores, volume_scores
from usam_bioimageio.tracking.ctc import read_ctc, write_ctc
from usam_bioimageio.tracking.linking import LinkingParams, link
from usam_bioimageio.volumes.merge import merge_slices

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("TRA", "DET", "AOGM", "AOGM_0", "AOGM_NS", "AOGM_FN", "AOGM_FP", "AOGM_ED", "AOGM_EA", "AOGM_EC")
MERGE_SETTINGS = {
    "musam_defaults": {},
    "musam_annotator_defaults": {"gap_closing": 2, "min_z_extent": 2},
    "min_z_extent_3": {"min_z_extent": 3},
    "symmetric_overlap": {"overlap": "max"},
}


def relabel_each(stack: np.ndarray, seed: int) -> np.ndarray:
    """Every 2D plane (frame or slice) relabelled on its own with shuffled ids 1 .. n."""
    rng = np.random.default_rng(seed)
    out = np.zeros(stack.shape, dtype=np.int32)
    for i in range(stack.shape[0]):
        ids = np.unique(stack[i])
        ids = ids[ids > 0]
        lut = np.zeros(int(stack.max()) + 1, dtype=np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1
        out[i] = lut[stack[i]]
    return out


def _scores(result: Path, ground_truth: Path) -> dict:
    scores = ctc_scores(result=result, ground_truth=ground_truth)
    return {key: round(float(scores[key]), 6) for key in KEEP if key in scores}


def linking_report(data: Path, progress: bool) -> dict:
    folder = data / "bacteria_tracking" / "data" / "bacteria"
    gt = read_ctc(folder=folder / "TRA")
    per_frame = relabel_each(gt.masks, seed=0)
    out = {"sequence": "bacteria_tracking/data/bacteria", "frames": int(gt.n_frames),
           "ground_truth_tracks": int(len(gt.tracks)), "ground_truth_divisions": int(np.sum(gt.tracks[:, 3] > 0) // 2)}
    start = time.time()
    out["peer"] = _scores(folder / "RES", folder)
    out["peer"]["seconds_scoring"] = round(time.time() - start, 1)
    for solver in ("motile", "greedy"):
        start = time.time()
        tracks = link(segmentation=per_frame, solver=solver, progress=progress)
        seconds = time.time() - start
        with tempfile.TemporaryDirectory(prefix="usam_link_") as tmp:
            result = write_ctc(folder=Path(tmp) / "RES", tracks=tracks)
            scores = _scores(result, folder)
        scores.update(tracks=int(len(tracks.tracks)), divisions=int(np.sum(tracks.tracks[:, 3] > 0) // 2),
                      seconds_linking=round(seconds, 1))
        out[solver] = scores
        print(f"linking {solver}: TRA {scores['TRA']:.5f} DET {scores['DET']:.5f} ({seconds:.0f} s)", flush=True)
    print(f"peer: TRA {out['peer']['TRA']:.5f} DET {out['peer']['DET']:.5f}", flush=True)
    out["params"] = LinkingParams().__dict__
    return out


def merge_report(data: Path, progress: bool) -> dict:
    names = ("1135", "1136", "1137")
    out = {"volumes": {}, "settings": {k: v for k, v in MERGE_SETTINGS.items()}}
    for name in names:
        gt = tifffile.imread(data / "gonuclear3d" / f"{name}_mini_labels.tif")
        slices = relabel_each(gt, seed=int(name))
        entry = {"shape": list(gt.shape), "nuclei": int(len(np.unique(gt)) - 1)}
        for setting, kwargs in MERGE_SETTINGS.items():
            start = time.time()
            merged = merge_slices(slice_segmentation=slices, progress=progress, **kwargs)
            seconds = time.time() - start
            scores = volume_scores(prediction=merged, ground_truth=gt)
            entry[setting] = {"msa": round(scores["msa"], 6), "sa50": round(scores["sa50"], 6),
                              "sa75": round(scores["sa75"], 6), "objects": int(merged.max()),
                              "seconds": round(seconds, 2)}
        out["volumes"][name] = entry
    out["mean"] = {setting: {metric: round(float(np.mean([out["volumes"][n][setting][metric] for n in names])), 6)
                             for metric in ("msa", "sa50", "sa75")} for setting in MERGE_SETTINGS}
    for setting, means in out["mean"].items():
        print(f"merge {setting}: mSA {means['msa']:.4f} SA50 {means['sa50']:.4f}", flush=True)
    return out


def pipeline_report(data: Path, family: Path, progress: bool) -> dict:
    """The full pipelines with a model: automatic 3D on GoNuclear, automatic tracking on bacteria."""
    from usam_bioimageio.io.download import sha256_of
    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.tracking.automatic import track_frames
    from usam_bioimageio.volumes.automatic import segment_volume

    model = SamModel.load(family)
    encoder = model.family.get("image_encoder")
    out = {"model": {"family": str(family), "name": encoder.name, "image_size": model.image_size,
                     "encoder_identity": model.encoder_identity}, "volumes": {}}
    start = time.time()
    for name in ("1135", "1136", "1137"):
        raw = tifffile.imread(data / "gonuclear3d" / f"{name}_mini_raw.tif")
        gt = tifffile.imread(data / "gonuclear3d" / f"{name}_mini_labels.tif")
        labels = segment_volume(model, raw, method="ais", progress=progress)
        scores = volume_scores(prediction=labels, ground_truth=gt)
        out["volumes"][name] = {k: round(float(scores[k]), 6) for k in ("msa", "sa50", "sa75")}
        out["volumes"][name].update(objects=int(labels.max()), nuclei=int(len(np.unique(gt)) - 1))
        print(f"automatic 3D {name}: mSA {scores['msa']:.4f} ({int(labels.max())} objects, "
              f"{out['volumes'][name]['nuclei']} nuclei)", flush=True)
    out["msa3d"] = round(float(np.mean([v["msa"] for v in out["volumes"].values()])), 6)
    out["sa50_3d"] = round(float(np.mean([v["sa50"] for v in out["volumes"].values()])), 6)
    out["seconds_3d"] = round(time.time() - start, 1)
    folder = data / "bacteria_tracking" / "data" / "bacteria"
    frames = np.stack([tifffile.imread(f) for f in sorted((folder / "img").glob("t*.tif"))])
    start = time.time()
    tracks = track_frames(model, frames, progress=progress)
    with tempfile.TemporaryDirectory(prefix="usam_track_") as tmp:
        out["tracking"] = _scores(write_ctc(folder=Path(tmp) / "RES", tracks=tracks), folder)
    out["tracking"].update(tracks=int(len(tracks.tracks)), seconds=round(time.time() - start, 1))
    print(f"automatic tracking: TRA {out['tracking']['TRA']:.4f} DET {out['tracking']['DET']:.4f}", flush=True)
    out["weights_sha256"] = {kind: sha256_of(p.weights_path("onnx")) for kind, p in model.family.packages.items()
                             if kind in ("image_encoder", "ais_head")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "volumes_tracking.json")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--model", type=Path, help="a family with AIS packages: also the full pipelines")
    args = parser.parse_args()
    start = time.time()
    pipeline = pipeline_report(args.data, args.model, args.progress) if args.model else None
    merge = merge_report(args.data, args.progress)
    linking = linking_report(args.data, args.progress)
    report = {
        "tra_ours_gt_masks": linking["motile"]["TRA"],
        "tra_peer": linking["peer"]["TRA"],
        "det_ours_gt_masks": linking["motile"]["DET"],
        "det_peer": linking["peer"]["DET"],
        "tra_ours_gt_masks_greedy": linking["greedy"]["TRA"],
        "msa3d_merge_gt_slices": merge["mean"]["musam_defaults"]["msa"],
        "sa50_3d_merge_gt_slices": merge["mean"]["musam_defaults"]["sa50"],
        "msa3d_merge_gt_slices_symmetric_overlap": merge["mean"]["symmetric_overlap"]["msa"],
        "notes": {
            "linking": "ground-truth masks of bacteria_tracking, each frame relabelled with shuffled ids, linked by "
                       "usam_bioimageio.tracking.linking.link (motile = tra_ours_gt_masks; greedy fallback "
                       "= tra_ours_gt_masks_greedy), scored by py-ctcmetrics against TRA/man_track.txt; peer = "
                       "RES/ (another tool's result on the same masks: its DET is 1) scored the same way",
            "merge": "GoNuclear ground truth (3 volumes of 100^3, whole), each z slice relabelled with shuffled ids, "
                     "merged with µSAM's merge_instance_segmentation_3d defaults (beta 0.5, no gap closing, no "
                     "min z extent); mSA / SA50 = mean over the volumes; other settings under merge.mean",
        },
        "linking": linking,
        "merge": merge,
        **({"msa3d_ais_gonuclear": pipeline["msa3d"], "sa50_3d_ais_gonuclear": pipeline["sa50_3d"],
            "tra_ais_bacteria": pipeline["tracking"]["TRA"], "det_ais_bacteria": pipeline["tracking"]["DET"],
            "pipeline": pipeline} if pipeline else {}),
        "versions": {"py-ctcmetrics": version("py-ctcmetrics"), "motile": version("motile"),
                     "ilpy": version("ilpy"), "numpy": np.__version__, "python": platform.python_version()},
        "seconds": round(time.time() - start, 1),
        "command": ".venv/bin/python scripts/volumes_tracking_report.py" + (f" --model {args.model}" if args.model
                                                                              else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
