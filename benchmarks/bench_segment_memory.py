"""Peak memory of `usam segment` with many box prompts on a DSB2018 image (issue 15, item 4).

Seeded random vit_t (ONNX), the DSB2018 test image with the most nuclei, ``--boxes`` boxes (default 1,000)
jittered from its ground-truth objects (random weights give arbitrary masks; what matters here is the number
of decoder calls and what they hold). Each measured run is its own process, so that its peak RSS
(``ru_maxrss``, which includes loading the model and computing the embeddings) is its own:

- ``usam segment`` (the CLI, as a user runs it) with all boxes: ``label_objects``, which draws each batch
  into the label image as soon as it is decoded;
- the library's ``masks_to_labels(segment_objects(...))`` with all boxes (the CLI's path before), the same
  batches but holding every object's full-size bool mask until the end;
- for comparison, the library at ``--compare`` boxes (default 100): the default batch size against all
  objects in one decoder call (the path before batching; at 300 objects it took 7.2 GB and crashed, too much
  for these shared machines, so it is compared at fewer).

Usage: .venv/bin/python benchmarks/bench_segment_memory.py [--boxes 1000] [--compare 100] [--threads 2]
Writes reports/segment_memory.json (``--report``) and prints a Markdown section (``--out FILE`` appends it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exports import is_current, mark_current  # benchmarks/exports.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT.parent / "shared" / "data" / "dsb2018"
MODEL_TYPE = "vit_t"
TARGET_GB = 1.5  # issue 15: 1,000 boxes under 1.5 GB with vit_t

# runs argv[1:] and reports the child's own peak RSS: RUSAGE_CHILDREN of a process that waited for one child
MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print("RESULT" + json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                             "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2}))
"""

LIBRARY = r"""
import json, sys
import numpy as np
args = json.loads(sys.argv[1])
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.io.images import read_image
from usam_bioimageio.io.overlay import masks_to_labels
from usam_bioimageio.io.prompt_files import read_prompts
from usam_bioimageio.prompting.predict import label_objects, segment_objects
from usam_bioimageio.runtime.model import SamModel
model = SamModel.load(args["family"], num_threads=args["threads"])
objects = read_prompts(args["prompts"])
emb = compute_embeddings(model, read_image(args["image"]))
batch_size = args["batch_size"] or len(objects)
if args["label_objects"]:
    labels = label_objects(model, emb, objects, batch_size=batch_size)
else:
    labels = masks_to_labels(segment_objects(model, emb, objects, batch_size=batch_size))
np.save(args["labels"], labels)
"""


def measure(argv: list, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(line[0][len("RESULT"):])
    if result["rc"]:
        raise RuntimeError(f"{argv[:4]}... exited {result['rc']}: {proc.stderr[-3000:]}")
    return result


def pick_image():
    """The DSB2018 test image with the most ground-truth objects: (id, image path, labels)."""
    import numpy as np
    import tifffile

    best = None
    for sid in json.loads((DSB / "splits.json").read_text())["test"]:
        labels = tifffile.imread(DSB / "labels" / f"{sid}.tif")
        n = len(np.unique(labels)) - 1
        if best is None or n > best[0]:
            best = (n, sid, labels)
    return best[1], DSB / "images" / f"{best[1]}.png", best[2]


def jittered_boxes(labels, n: int, seed: int = 0):
    """n boxes (x0, y0, x1, y1): the ground-truth objects' boxes, cycled, each corner moved by up to 3 px."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = labels.shape
    gt = np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels) if s],
                  dtype=np.float64)
    boxes = gt[np.arange(n) % len(gt)] + rng.uniform(-3, 3, size=(n, 4))
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    return boxes.round(1)


def family_folder(arg) -> Path:
    if arg:
        return arg
    shared = ROOT / "out" / "bench" / MODEL_TYPE / "family"  # bench_core.py's, when it exists (it has onnx)
    if is_current(shared):
        return shared
    family = ROOT / "out" / "bench" / "segment_memory" / "family"
    if not is_current(family):
        from usam_bioimageio.modeling import seeded_sam
        from usam_bioimageio.training.checkpoints import save_checkpoint
        from usam_exporters.family import export_family

        t = time.perf_counter()
        family.parent.mkdir(parents=True, exist_ok=True)
        ckpt = family.parent / f"{MODEL_TYPE}_seed0.pt"
        save_checkpoint(ckpt, sam_state=seeded_sam(MODEL_TYPE, seed=0).state_dict())
        export_family(checkpoint=ckpt, output_dir=family, name=f"{MODEL_TYPE}_random", overwrite=True,
                      formats=("onnx",), test=False)
        mark_current(family)
        print(f"exported {family} in {time.perf_counter() - t:.0f} s", flush=True)
    return family


def main() -> None:
    import numpy as np
    import tifffile

    from usam_bioimageio.prompting.predict import DEFAULT_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--compare", type=int, default=100,
                        help="boxes for the batched vs all-at-once comparison (0: skip it)")
    parser.add_argument("--family", type=Path, default=None, help="an exported seed-0 vit_t family (ONNX)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "segment_memory.json")
    parser.add_argument("--out", type=Path, default=None, help="also append the Markdown section to this file")
    args = parser.parse_args()
    family = family_folder(args.family)
    sid, image_path, gt = pick_image()
    n_gt = len(np.unique(gt)) - 1
    print(f"image {sid} {gt.shape}, {n_gt} ground-truth objects", flush=True)

    report = {"model": f"seeded random {MODEL_TYPE} (seed 0), ONNX", "image": f"dsb2018/images/{sid}.png",
              "image_shape": list(gt.shape), "ground_truth_objects": n_gt, "n_boxes": args.boxes,
              "batch_size": DEFAULT_BATCH_SIZE, "threads": args.threads, "target_peak_rss_gb": TARGET_GB}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "USAM_CACHE_DIR": str(tmp / "cache"), "USAM_NUM_THREADS": str(args.threads),
               "OMP_NUM_THREADS": str(args.threads)}

        def prompts(n: int) -> Path:
            path = tmp / f"boxes{n}.json"
            path.write_text(json.dumps({"objects": [{"box": b} for b in jittered_boxes(gt, n).tolist()]}))
            return path

        command = [sys.executable, "-m", "usam_bioimageio.cli.main", "segment", "--model", str(family),
                   "--image", str(image_path), "--prompts", str(prompts(args.boxes)),
                   "--out", str(tmp / "labels.tif"), "--quiet"]
        report["command"] = "usam segment --model FAMILY --image IMAGE --prompts BOXES.json --out labels.tif --quiet"
        cli = measure(command, env)
        labels = tifffile.imread(tmp / "labels.tif")
        report.update(segment_1000_boxes_peak_rss_gb=round(cli["peak_rss_gb"], 3) if args.boxes == 1000 else None,
                      peak_rss_gb=round(cli["peak_rss_gb"], 3), seconds=round(cli["seconds"], 1),
                      labels_in_output=int(len(np.unique(labels)) - 1), meets_target=cli["peak_rss_gb"] < TARGET_GB)
        print(f"usam segment, {args.boxes} boxes: peak RSS {cli['peak_rss_gb']:.2f} GB, {cli['seconds']:.1f} s",
              flush=True)
        rows = ["| run | boxes | objects per decoder call | peak RSS (GB) | time (s) |", "|---|---|---|---|---|",
                f"| `usam segment` | {args.boxes} | {DEFAULT_BATCH_SIZE} | {cli['peak_rss_gb']:.2f} | "
                f"{cli['seconds']:.1f} |"]
        params = dict(family=str(family), image=str(image_path), prompts=str(tmp / f"boxes{args.boxes}.json"),
                      threads=args.threads, batch_size=DEFAULT_BATCH_SIZE, label_objects=False,
                      labels=str(tmp / "segment_objects.npy"))
        lib = measure([sys.executable, "-c", LIBRARY, json.dumps(params)], env)
        same = bool(np.array_equal(np.load(params["labels"]), labels))
        report["segment_objects_masks_to_labels"] = {"peak_rss_gb": round(lib["peak_rss_gb"], 3),
                                                     "seconds": round(lib["seconds"], 1),
                                                     "labels_identical_to_cli": same}
        rows.append(f"| library `masks_to_labels(segment_objects(...))` | {args.boxes} | {DEFAULT_BATCH_SIZE} | "
                    f"{lib['peak_rss_gb']:.2f} | {lib['seconds']:.1f} |")
        print(rows[-1], flush=True)
        if args.compare:
            comparison, outs = {}, {}
            path = prompts(args.compare)
            for name, batch in (("batched", DEFAULT_BATCH_SIZE), ("all_at_once", 0)):
                outs[name] = tmp / f"{name}.npy"
                params = dict(family=str(family), image=str(image_path), prompts=str(path), threads=args.threads,
                              batch_size=batch, label_objects=False, labels=str(outs[name]))
                r = measure([sys.executable, "-c", LIBRARY, json.dumps(params)], env)
                comparison[name] = {"peak_rss_gb": round(r["peak_rss_gb"], 3), "seconds": round(r["seconds"], 1)}
                rows.append(f"| library `segment_objects`, {name.replace('_', ' ')} | {args.compare} | "
                            f"{batch or args.compare} | {r['peak_rss_gb']:.2f} | {r['seconds']:.1f} |")
                print(rows[-1], flush=True)
            same = bool(np.array_equal(np.load(outs["batched"]), np.load(outs["all_at_once"])))
            ratio = comparison["all_at_once"]["peak_rss_gb"] / comparison["batched"]["peak_rss_gb"]
            report["comparison"] = {"n_boxes": args.compare, **comparison, "labels_identical": same,
                                    "rss_ratio_all_at_once_vs_batched": round(ratio, 2)}
    report["host"] = {"machine": platform.machine(), "python": platform.python_version(),
                      "load": float(open("/proc/loadavg").read().split()[0]), "date": time.strftime("%Y-%m-%d %H:%M")}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.report}")

    notes = [f"target: peak RSS < {TARGET_GB} GB (`usam segment`, {args.boxes} boxes): "
             f"{'met' if report['meets_target'] else 'NOT met'}",
             "`masks_to_labels(segment_objects(...))` gives the CLI's labels: "
             f"{report['segment_objects_masks_to_labels']['labels_identical_to_cli']}"]
    if args.compare:
        c = report["comparison"]
        notes.append(f"{args.compare} boxes, all at once vs batched: {c['rss_ratio_all_at_once_vs_batched']}x the "
                     f"peak RSS; labels identical: {c['labels_identical']}")
    text = (f"\n## Prompted segmentation memory: {MODEL_TYPE}, many boxes ({report['host']['date']}, load "
            f"{report['host']['load']})\n\n"
            f"`benchmarks/bench_segment_memory.py`: seeded random {MODEL_TYPE} (ONNX), DSB2018 test image {sid} "
            f"({gt.shape[1]} x {gt.shape[0]}, {n_gt} nuclei), boxes jittered from its ground-truth objects; each run "
            f"its own process, peak RSS and time include loading the model and computing the embeddings; "
            f"{args.threads} threads.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
