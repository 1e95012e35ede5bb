"""A folder of images through automatic instance segmentation: `usam ais` vs micro-sam's command, in one run.

The first ``--n`` DSB2018 `test` images (as our reader gives them, written once as TIFF files into a working
folder so both read the same pixels) are segmented by
- ours: ``usam ais --model FAMILY --image FOLDER --out OUT`` (the runtime's folder pipeline: the next image's
  embeddings computed while this image's AIS head and post-processing run), a subprocess;
- micro-sam: its automatic segmentation command (``micro_sam.automatic_segmentation`` main, ``--mode ais``,
  ``--ndim 2``, the folder with ``--pattern *.tif``) in the reference environment (scripts/micro_sam_env.py),
  same checkpoint (SAM + UNETR decoder), a subprocess.
Timed: each command's wall time including its model loading; images per minute and the ratio, with the
fraction of images whose label images are identical (a check that both did the same work).

Usage: .venv/bin/python benchmarks/bench_folder.py --family DIR --checkpoint FILE.pt [--model-type vit_b] [--n 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT.parent / "shared" / "data" / "dsb2018"

MICRO_SAM = r"""
import json, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"] + "/scripts")
from micro_sam_env import refresh_attention_bias_cache, setup_imports
setup_imports()
import torch
torch.set_num_threads(args["threads"])
import micro_sam.util as util
from micro_sam import automatic_segmentation as command
if args["model_type"] == "vit_t":  # MobileSAM's attention-bias cache from the loaded weights (see micro_sam_env)
    get = util.get_sam_model
    def get_sam_model(*a, **k):
        out = get(*a, **k)
        refresh_attention_bias_cache((out[0] if isinstance(out, tuple) else out).model)
        return out
    util.get_sam_model = get_sam_model
sys.argv = ["micro_sam.automatic_segmentation", "-i", args["images"], "--pattern", "*.tif", "-o", args["out"],
            "-m", args["model_type"], "-c", args["checkpoint"], "--mode", "ais", "--ndim", "2", "-d", "cpu"]
with torch.no_grad():
    command.main()
"""


def write_images(n: int, folder: Path) -> list:
    """The first n DSB2018 test images as TIFF files in ``folder``; their names."""
    import tifffile

    from usam_bioimageio.io.images import read_image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for image_id in json.loads((DSB / "splits.json").read_text())["test"][:n]:
        names.append(image_id[:12])
        path = folder / f"{names[-1]}.tif"
        if not path.is_file():
            tifffile.imwrite(path, np.asarray(read_image(DSB / "images" / f"{image_id}.png")))
    return names


def _timed(cmd: list, env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def run(*, family: Path, checkpoint: Path, model_type: str, n: int, threads: int, workdir: Path,
        micro_sam_python: str) -> dict:
    """Both commands over the same n images: seconds, images per minute, their ratio, identical label images."""
    import shutil

    import tifffile

    images = workdir / "images"
    names = write_images(n, images)
    ours_out, ref_out = workdir / "ours", workdir / "micro_sam"
    for out in (ours_out, ref_out):
        shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    usam = str(Path(sys.executable).with_name("usam"))
    ours_s = _timed([usam, "ais", "--model", str(family), "--image", str(images), "--out", str(ours_out),
                     "--quiet"], env)
    params = {"root": str(ROOT), "model_type": model_type, "checkpoint": str(checkpoint), "images": str(images),
              "out": str(ref_out), "threads": threads}
    ref_s = _timed([micro_sam_python, "-c", MICRO_SAM, json.dumps(params)], env)
    identical = [np.array_equal(tifffile.imread(ours_out / f"{name}.tif"), tifffile.imread(ref_out / f"{name}.tif"))
                 for name in names]
    ours_rate, ref_rate = 60 * n / ours_s, 60 * n / ref_s
    return {"n_images": n, "ours_seconds": ours_s, "reference_seconds": ref_s, "ours_images_per_min": ours_rate,
            "reference_images_per_min": ref_rate, "images_per_min_ratio": ours_rate / ref_rate,
            "identical_labels": sum(identical)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, required=True, help="exported family with AIS packages")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the µSAM checkpoint it was exported from")
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usam-bench-folder"))
    parser.add_argument("--micro-sam-python", default="/tmp/usam-ais-ref/bin/python")
    args = parser.parse_args()
    result = run(family=args.family, checkpoint=args.checkpoint, model_type=args.model_type, n=args.n,
                 threads=args.threads, workdir=args.workdir, micro_sam_python=args.micro_sam_python)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
