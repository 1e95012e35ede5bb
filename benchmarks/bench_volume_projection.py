"""Interactive 3D on a 50-slice volume, embeddings cached: ours vs micro-sam's segment_mask_in_volume.

Same seed-0 random weights (vit_t by default), same volume: 50 slices of GoNuclear ``1135_mini_raw.tif``
(z 25..74, 100 x 100, real), one nucleus (the largest on the middle slice, from the ground truth) given on the
middle slice and projected up and down through every other slice (``iou_threshold`` 0, so both paths segment
all 49 slices). Each path computes its own embeddings first (not timed: "embeddings cached"), then the
projection is timed, best of ``--repeats``, in its own subprocess. micro-sam runs in the reference venv
(``--micro-sam-python``, scripts/micro_sam_venv.sh) with MobileSAM's attention-bias cache refreshed (see
scripts/micro_sam_env.py), so both compute with the same weights; the masks of both are compared.

Usage: .venv/bin/python benchmarks/bench_volume_projection.py [--projections mask single_point] [--out BENCHMARKS.md]
Prints a Markdown section; ``--out FILE`` appends it there too.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_tiling import run_child  # the subprocess runner of the other micro-sam comparison (same folder)
from exports import needs_export  # benchmarks/exports.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RAW, LABELS = DATA / "gonuclear3d" / "1135_mini_raw.tif", DATA / "gonuclear3d" / "1135_mini_labels.tif"
Z0, Z1 = 25, 75

OURS = r"""
import json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.embeddings.compute import compute_stack_embeddings
from usam_bioimageio.volumes.interactive import segment_mask_in_volume
volume, seg = np.load(args["volume"]), np.load(args["segmentation"])
model = SamModel.load(args["family"], num_threads=args["threads"])
emb = compute_stack_embeddings(model, volume, progress=False)
out = {}
for projection in args["projections"]:
    best = None
    for _ in range(args["repeats"]):
        t = time.perf_counter()
        res = segment_mask_in_volume(model, emb, segmentation=seg, segmented_slices=[args["z"]], projection=projection,
                                     iou_threshold=0.0, progress=False)
        best = min(best or 1e9, time.perf_counter() - t)
    np.save(args["masks"] + projection + ".npy", res.masks)
    out[projection] = best
print("RESULT" + json.dumps(out))
"""

MICRO_SAM = r"""
import json, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"] + "/scripts")
from micro_sam_env import refresh_attention_bias_cache, setup_imports
setup_imports()
import numpy as np, torch
torch.set_num_threads(args["threads"])
from micro_sam import util
from micro_sam.multi_dimensional_segmentation import segment_mask_in_volume
volume, seg = np.load(args["volume"]), np.load(args["segmentation"])
predictor = util.get_sam_model(model_type=args["model_type"], checkpoint_path=args["checkpoint"], device="cpu")
refresh_attention_bias_cache(predictor.model)
out = {}
with torch.no_grad():
    emb = util.precompute_image_embeddings(predictor, volume, ndim=3, verbose=False)
    for projection in args["projections"]:
        best = None
        for _ in range(args["repeats"]):
            s = seg.astype("uint32").copy()
            t = time.perf_counter()
            s, _ = segment_mask_in_volume(s, predictor, emb, segmented_slices=np.array([args["z"]]),
                                          stop_lower=False, stop_upper=False, iou_threshold=0.0,
                                          projection=projection, verbose=False)
            best = min(best or 1e9, time.perf_counter() - t)
        np.save(args["masks"] + projection + ".npy", s == 1)
        out[projection] = best
print("RESULT" + json.dumps(out))
"""


def volume_and_object():
    """(volume, object mask on the middle slice only, middle slice index)."""
    import numpy as np
    import tifffile

    volume = np.ascontiguousarray(tifffile.imread(RAW)[Z0:Z1])
    labels = tifffile.imread(LABELS)[Z0:Z1]
    z = (Z1 - Z0) // 2
    ids, counts = np.unique(labels[z][labels[z] > 0], return_counts=True)
    seg = np.zeros(labels.shape, dtype=np.uint32)
    seg[z] = labels[z] == ids[np.argmax(counts)]
    return volume, seg, z


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_t", choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--family", type=Path, default=None,
                        help="an exported family of the seed-0 model (default: out/bench/MODEL_TYPE/family, "
                             "shared with bench_core.py; exported when missing)")
    parser.add_argument("--projections", nargs="+", default=["mask", "single_point"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-sam-python", default="/tmp/usam-ais-ref/bin/python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also append the Markdown section to this file")
    args = parser.parse_args()
    family = args.family or ROOT / "out" / "bench" / args.model_type / "family"
    if needs_export(family, passed=args.family is not None):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_core import export  # the family bench_core.py times too (same folder, same formats)

        family = export(args.model_type, family.parent)
    checkpoint = family.parent / f"{args.model_type}_seed0.pt"
    volume, seg, z = volume_and_object()
    n = volume.shape[0] - 1
    rows = ["| path | projection | slices segmented | time (s) | ms / slice | ratio micro-sam / ours |",
            "|---|---|---|---|---|---|"]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "volume.npy", volume)
        np.save(tmp / "seg.npy", seg)
        params = dict(volume=str(tmp / "volume.npy"), segmentation=str(tmp / "seg.npy"), family=str(family), z=z,
                      threads=args.threads, projections=args.projections, repeats=args.repeats, root=str(ROOT),
                      model_type=args.model_type, checkpoint=str(checkpoint))
        ours = run_child(sys.executable, OURS, {**params, "masks": str(tmp / "ours_")})
        theirs = None
        if Path(args.micro_sam_python).is_file() and checkpoint.is_file():
            try:
                theirs = run_child(args.micro_sam_python, MICRO_SAM, {**params, "masks": str(tmp / "musam_")})
            except RuntimeError as err:
                notes.append(f"micro-sam failed: {str(err).strip().splitlines()[-1]}")
        else:
            notes.append(f"micro-sam not measured: no {args.micro_sam_python} or no checkpoint {checkpoint}")
        for p in args.projections:
            ratio = f"{theirs[p] / ours[p]:.1f}x" if theirs else "-"
            rows.append(f"| ours | {p} | {n} | {ours[p]:.2f} | {1000 * ours[p] / n:.0f} | {ratio} |")
            if theirs:
                rows.append(f"| micro-sam 1.8.14 | {p} | {n} | {theirs[p]:.2f} | {1000 * theirs[p] / n:.0f} | |")
                a, b = np.load(tmp / f"ours_{p}.npy"), np.load(tmp / f"musam_{p}.npy")
                notes.append(f"{p}: masks differ in {int((a != b).sum())} of {a.size} voxels")
    text = (f"\n## Interactive 3D, 50 slices, embeddings cached: {args.model_type} ({time.strftime('%Y-%m-%d %H:%M')}, "
            f"load {open('/proc/loadavg').read().split()[0]})\n\n"
            f"Seed-0 random {args.model_type}; GoNuclear 1135 z {Z0}..{Z1 - 1} (100 x 100), its largest nucleus given "
            f"on slice {z} and projected through the other {n} slices (`segment_mask_in_volume`, iou_threshold 0); "
            f"best of {args.repeats}, {args.threads} threads, embeddings computed before timing. Host: "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}.\n\n"
            + "\n".join(rows) + "\n" + "".join(f"\n- {x}" for x in notes) + ("\n" if notes else ""))
    print(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
