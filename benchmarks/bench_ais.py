"""AIS from cached embeddings: ours (AIS head package + post-processing) vs µSAM's InstanceSegmentationWithDecoder.

Same seeded random weights (SAM and UNETR decoder, saved as one µSAM checkpoint), same images, embeddings
computed beforehand by each side; timed: the decoder on the embeddings plus the post-processing to labels
(µSAM: ``initialize(image, image_embeddings=...)`` + ``generate()`` with its defaults; ours:
``automatic_instance_segmentation(model, image, embeddings=...)``). µSAM runs in a subprocess in the reference
environment of scripts/regenerate_ais_reference.sh (``--micro-sam-python``, default
/tmp/usam-ais-ref/bin/python), with MobileSAM's attention-bias cache refreshed so that both encoders use the
same weights (see scripts/ais_decoder_reference.py). The labels are compared: equal label images, or the
fraction of pixels on which they agree (both embeddings agree to ~1e-5, so a pixel at a threshold can flip).

Usage: .venv/bin/python benchmarks/bench_ais.py [--model-type vit_t] [--repeats 3] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from exports import is_current, mark_current  # benchmarks/exports.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DSB = DATA / "dsb2018"

MICRO_SAM = r"""
import json, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"] + "/scripts")
from micro_sam_env import refresh_attention_bias_cache, setup_imports
setup_imports()
import numpy as np
import torch
from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder, get_predictor_and_decoder
from micro_sam.util import precompute_image_embeddings
torch.set_num_threads(args["threads"])
predictor, decoder = get_predictor_and_decoder(args["model_type"], args["checkpoint"], device="cpu")
refresh_attention_bias_cache(predictor.model)
segmenter = InstanceSegmentationWithDecoder(predictor, decoder)
out = {"seconds": [], "labels": []}
for k, path in enumerate(args["images"]):
    image = np.load(path)
    with torch.no_grad():
        emb = precompute_image_embeddings(predictor, image, ndim=2, verbose=False)  # ndim: RGB is 2D
        times = []
        for _ in range(args["repeats"] + 1):  # the first run warms up
            t = time.perf_counter()
            segmenter.initialize(image, image_embeddings=emb)  # (RGB images: 2D with channels)
            labels = segmenter.generate()
            times.append(time.perf_counter() - t)
    out["seconds"].append(times[1:])
    np.save(args["labels"] + f"_{k}.npy", np.asarray(labels))
print("RESULT" + json.dumps(out))
"""


def _checkpoint(model_type: str, folder: Path) -> Path:
    import torch

    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state

    path = folder / f"{model_type}_ais_seed0.pt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model_state": seeded_sam(model_type, seed=0).state_dict(),
                    "decoder_state": seeded_ais_decoder_state(model_type, 1, use_conv_transpose=True)}, path)
    return path


def _family(checkpoint: Path, model_type: str, folder: Path) -> Path:
    """The family exported from ``checkpoint``; exported again when the code that writes the graphs changed
    since (a kept export of an older graph would time that graph)."""
    family = folder / "family"
    if not is_current(family):
        from usam_exporters.family import export_family

        print(f"exporting {checkpoint.name} (ONNX weights) into {family} ...", flush=True)
        export_family(checkpoint=checkpoint, output_dir=family, name=f"{model_type}_ais_random", formats=("onnx",),
                      overwrite=True, progress=True, test=False)  # timed here, gated in the tests
        mark_current(family)
    return family


def _images(n: int):
    """n DSB2018 test images (real, RGB/gray as stored) and their names."""
    from usam_bioimageio.io.images import read_image

    ids = json.loads((DSB / "splits.json").read_text())["test"][:n]
    return [(i[:8], np.asarray(read_image(DSB / "images" / f"{i}.png"))) for i in ids]


def run(*, model_type: str, n_images: int, repeats: int, threads: int, workdir: Path,
        micro_sam_python: str) -> dict:
    """Both sides on the same images: per image median seconds, object counts, identical labels; ``section``
    is the Markdown section; ``checkpoint`` / ``family`` the files it used (for other benchmarks)."""
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel

    folder = workdir / model_type
    checkpoint = _checkpoint(model_type, folder)
    family = _family(checkpoint, model_type, folder)
    model = SamModel.load(family, num_threads=threads)
    images = _images(n_images)
    ours = []
    for name, image in images:
        emb = compute_embeddings(model, image)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            labels = automatic_instance_segmentation(model, image, embeddings=emb)
            times.append(time.perf_counter() - t)
        ours.append((statistics.median(times[1:]), labels))

    paths = []
    for k, (_, image) in enumerate(images):
        paths.append(str(folder / f"image_{k}.npy"))
        np.save(paths[-1], image)
    params = {"root": str(ROOT), "model_type": model_type, "checkpoint": str(checkpoint), "images": paths,
              "repeats": repeats, "threads": threads, "labels": str(folder / "musam_labels")}
    proc = subprocess.run([micro_sam_python, "-c", MICRO_SAM, json.dumps(params)], capture_output=True,
                          text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode or not line:
        raise RuntimeError(f"µSAM's path failed:\n{proc.stderr[-3000:]}")
    theirs = json.loads(line[0][len("RESULT"):])

    rows, identical = [], []
    for k, ((name, image), (ours_s, labels)) in enumerate(zip(images, ours)):
        ref = np.load(folder / f"musam_labels_{k}.npy")
        ref_s = statistics.median(theirs["seconds"][k])
        identical.append(bool(np.array_equal(labels, ref)))
        agree = float(np.mean(labels == ref))
        rows.append(f"| {name} {image.shape[1]}x{image.shape[0]} | {ref_s * 1000:.0f} | {ours_s * 1000:.0f} | "
                    f"{ref_s / ours_s:.1f}x | {int(ref.max())} / {int(labels.max())} | "
                    f"{'identical' if identical[-1] else f'{agree:.4%} of pixels'} |")
    total_ref = sum(statistics.median(s) for s in theirs["seconds"])
    total_ours = sum(s for s, _ in ours)
    section = "\n".join([
        f"## AIS from cached embeddings, {model_type} ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"load {open('/proc/loadavg').read().split()[0]})",
        "",
        f"`benchmarks/bench_ais.py`: seeded random {model_type} + UNETR decoder (one µSAM checkpoint), "
        f"DSB2018 test images, {threads} threads, median of {repeats} after a warm-up. µSAM = micro-sam "
        "1.8.14 `InstanceSegmentationWithDecoder.initialize(image, image_embeddings) + generate()`; ours = "
        "`automatic_instance_segmentation(model, image, embeddings=...)` (AIS head ONNX + post-processing). "
        f"Host: {platform.machine()}, Python {platform.python_version()}.",
        "",
        "| image | µSAM (ms) | ours (ms) | speed-up | objects µSAM / ours | labels |",
        "|---|---|---|---|---|---|",
        *rows,
        f"| all | {total_ref * 1000:.0f} | {total_ours * 1000:.0f} | {total_ref / total_ours:.1f}x | | |",
        "",
    ])
    return {"reference_seconds": total_ref, "ours_seconds": total_ours, "speedup": total_ref / total_ours,
            "identical_labels": sum(identical), "n_images": len(images), "section": section,
            "checkpoint": str(checkpoint), "family": str(family)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_t", choices=["vit_t", "vit_b"])
    parser.add_argument("--images", type=int, default=3, help="number of DSB2018 test images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usam-bench-ais"))
    parser.add_argument("--micro-sam-python", default="/tmp/usam-ais-ref/bin/python")
    parser.add_argument("--out", type=Path, default=None, help="append the Markdown section to this file")
    args = parser.parse_args()
    try:
        result = run(model_type=args.model_type, n_images=args.images, repeats=args.repeats, threads=args.threads,
                     workdir=args.workdir, micro_sam_python=args.micro_sam_python)
    except RuntimeError as e:
        raise SystemExit(str(e))
    print(result["section"])
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + result["section"])


if __name__ == "__main__":
    main()
