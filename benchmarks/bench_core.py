"""Our packages vs segment_anything's SamPredictor, same weights and image, measured in one run.

Each measurement runs in its own subprocess so that peak RSS is that of the measured path alone.
Usage: .venv/bin/python benchmarks/bench_core.py [--model-type vit_b] [--family DIR] [--repeats 3]
Appends a section to BENCHMARKS.md (absolute times drift 25-40% between runs here: read the ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from child import PEAK_RSS  # benchmarks/child.py (the script's folder is on the path)
from exports import mark_current, needs_export  # benchmarks/exports.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
IMAGE = DATA / "bacteria_tracking" / "data" / "bacteria" / "img" / "t000000.tif"  # 1305 x 1009, real

CHILD = PEAK_RSS + r"""
import json, sys, time

import numpy as np
sys.path.insert(0, {tests!r})
args = json.loads({args!r})
import tifffile
image = tifffile.imread(args["image"])
h, w = image.shape[:2]
rng = np.random.default_rng(0)
centers = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h], size=(32, 2))
half = rng.uniform(10, 40, size=(32, 2))
boxes = np.concatenate([centers - half, centers + half], axis=1)
out = {{}}

def timed(fn, repeats):
    fn()  # warm-up (onnxruntime's first calls are slow)
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

if args["path"] == "reference":
    import torch
    from reference import build_reference_sam, reference_predictor, usam_to_image
    from usam_bioimageio.modeling import seeded_sam
    torch.set_num_threads(args["threads"])
    predictor = reference_predictor(build_reference_sam(args["model_type"], seeded_sam(args["model_type"], seed=0).state_dict()))
    rgb = usam_to_image(image)
    out["embed_s"] = timed(lambda: predictor.set_image(rgb), args["repeats"])
    out["point_s"] = timed(lambda: predictor.predict(point_coords=centers[:1], point_labels=np.array([1]), multimask_output=False), args["repeats"])
    out["box_s"] = timed(lambda: predictor.predict(box=boxes[0], multimask_output=False), args["repeats"])
    tb = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (h, w))
    out["boxes32_s"] = timed(lambda: predictor.predict_torch(None, None, boxes=tb, multimask_output=False), args["repeats"])
else:
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.prompting.predict import segment_from_prompts
    model = SamModel.load(args["family"], weight_format=args["path"], num_threads=args["threads"])
    emb = compute_embeddings(model, image)
    out["embed_s"] = timed(lambda: compute_embeddings(model, image), args["repeats"])
    out["point_s"] = timed(lambda: segment_from_prompts(model, emb, points=centers[:1], point_labels=[1]), args["repeats"])
    out["box_s"] = timed(lambda: segment_from_prompts(model, emb, boxes=boxes[0]), args["repeats"])
    out["boxes32_s"] = timed(lambda: segment_from_prompts(model, emb, boxes=boxes), args["repeats"])
out["peak_rss_gb"] = peak_rss_gb()
print("RESULT" + json.dumps(out))
"""


def measure(path: str, args: argparse.Namespace, family: Path) -> dict:
    params = dict(path=path, image=str(IMAGE), model_type=args.model_type, family=str(family),
                  repeats=args.repeats, threads=args.threads)
    code = CHILD.format(tests=str(ROOT / "tests"), args=json.dumps(params))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode or not line:
        raise RuntimeError(f"{path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT"):])


def export(model_type: str, folder: Path) -> Path:
    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training.checkpoints import save_checkpoint
    from usam_exporters.family import export_family

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / f"{model_type}_seed0.pt"
    save_checkpoint(ckpt, sam_state=seeded_sam(model_type, seed=0).state_dict())
    # the two formats timed here; not gated (the gate is the exporter's tests' business, not the benchmark's)
    family = export_family(checkpoint=ckpt, output_dir=folder / "family", name=f"{model_type}_random", overwrite=True,
                           formats=("onnx", "torchscript"), test=False, progress=True)
    mark_current(family)
    return family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--family", type=Path, default=None, help="an exported family of the seed-0 model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    family = args.family or ROOT / "out" / "bench" / args.model_type / "family"
    if needs_export(family, passed=args.family is not None):
        t = time.perf_counter()
        family = export(args.model_type, family.parent)
        print(f"exported {family} in {time.perf_counter() - t:.0f} s")

    results = {p: measure(p, args, family) for p in ("reference", "onnx", "torchscript")}
    ref = results["reference"]
    rows = ["| path | embedding (s) | 1 point (ms) | 1 box (ms) | 32 boxes (ms) | peak RSS (GB) |",
            "|---|---|---|---|---|---|"]
    for p, r in results.items():
        rows.append(f"| {p} | {r['embed_s']:.2f} | {1e3 * r['point_s']:.0f} | {1e3 * r['box_s']:.0f} | "
                    f"{1e3 * r['boxes32_s']:.0f} | {r['peak_rss_gb']:.2f} |")
    for p in ("onnx", "torchscript"):
        r = results[p]
        rows.append(f"| speed-up {p} vs reference | {ref['embed_s'] / r['embed_s']:.1f}x | "
                    f"{ref['point_s'] / r['point_s']:.1f}x | {ref['box_s'] / r['box_s']:.1f}x | "
                    f"{ref['boxes32_s'] / r['boxes32_s']:.1f}x | |")
    load = open("/proc/loadavg").read().split()[0]
    text = (f"\n## Core: {args.model_type} embeddings and prompts ({time.strftime('%Y-%m-%d %H:%M')}, load {load})\n\n"
            f"Seed-0 random {args.model_type}, image {IMAGE.name} (1305 x 1009 gray, real), {args.threads} threads, "
            f"best of {args.repeats} after a warm-up; reference = segment_anything SamPredictor (eager torch, "
            f"masks upsampled to full size), ours = `usam_bioimageio` on the exported packages. "
            f"Host: {platform.processor() or platform.machine()}, Python {platform.python_version()}.\n\n"
            + "\n".join(rows) + "\n")
    print(text)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
