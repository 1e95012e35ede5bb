"""Reduced-precision image encoders against the family's fp32 encoder, measured in one run (issue 16, part 4).

Usage: .venv/bin/python benchmarks/bench_precision.py --family DIR [--precisions int8] [--n 20] [--repeats 2]
    [--write-docs]

For each precision: the variant is written if the family has none (usam_exporters.precision); then on the first
``--n`` DSB2018 `test` images, in one process, alternating fp32 and variant: encoder time (best of ``--repeats``
after a warm-up, same session options as the runtime), embedding max / mean absolute difference from fp32, and
the mean IoU between the box-prompted masks (every ground-truth object's box) of the variant and of fp32.
Writes reports/precision.json; ``--write-docs`` rewrites the variant package with these numbers in its README
(and config.usam.measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT.parent / "shared" / "data" / "dsb2018"


def _boxes(labels: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    found = ndimage.find_objects(labels)
    return np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in found if s is not None], float)


def measure(family: Path, precision: str, n: int, repeats: int) -> dict:
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.io.datasets import read_split
    from usam_bioimageio.prompting.predict import segment_from_prompts
    from usam_bioimageio.runtime.model import SamModel

    fp32 = SamModel.load(family)
    variant = SamModel.load(family, encoder_precision=precision)
    images = read_split(DSB, "test", n)
    times = {"fp32": [], precision: []}
    max_abs, mean_abs, ious = [], [], []
    for k, (image, labels) in enumerate(images):
        embeddings = {}
        for name, model in (("fp32", fp32), (precision, variant)):
            if k == 0:
                compute_embeddings(model, image)  # warm-up of the session
            best = np.inf
            for _ in range(repeats):
                t = time.perf_counter()
                embeddings[name] = compute_embeddings(model, image)
                best = min(best, time.perf_counter() - t)
            times[name].append(best)
        diff = np.abs(embeddings[precision].features - embeddings["fp32"].features)
        max_abs.append(float(diff.max()))
        mean_abs.append(float(diff.mean()))
        boxes = _boxes(np.asarray(labels))
        a = segment_from_prompts(fp32, embeddings["fp32"], boxes=boxes).masks[:, 0]
        b = segment_from_prompts(fp32, embeddings[precision], boxes=boxes).masks[:, 0]
        union = (a | b).reshape(len(a), -1).sum(1)
        inter = (a & b).reshape(len(a), -1).sum(1)
        ious += np.where(union > 0, inter / np.maximum(union, 1), 1.0).tolist()
        print(f"{precision} image {k + 1}/{len(images)}: fp32 {times['fp32'][-1]:.3f} s, {precision} "
              f"{times[precision][-1]:.3f} s, max |diff| {max_abs[-1]:.4f}", flush=True)
    return {
        "images": len(images), "objects": len(ious),
        "encoder_seconds_fp32": round(float(np.sum(times["fp32"])), 3),
        f"encoder_seconds_{precision}": round(float(np.sum(times[precision])), 3),
        "speedup": round(float(np.sum(times["fp32"]) / np.sum(times[precision])), 3),
        "embedding_max_abs_diff": round(float(np.max(max_abs)), 5),
        "embedding_mean_abs_diff": round(float(np.mean(mean_abs)), 6),
        "box_mask_mean_iou_vs_fp32": round(float(np.mean(ious)), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["int8"], choices=["int8", "fp16"])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "precision.json")
    parser.add_argument("--write-docs", action="store_true", help="put the numbers into the variants' README")
    args = parser.parse_args()
    import yaml

    from usam_exporters.precision import write_encoder_variant

    manifest = yaml.safe_load((args.family / "family.yaml").read_text())
    report = {"family": str(args.family), "model": manifest.get("name", args.family.name),
              "host": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
              "command": "benchmarks/bench_precision.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                    (("family", args.family), ("n", args.n))),
              "variants": {}}
    for precision in args.precisions:
        if precision not in (manifest.get("variants") or {}).get("image_encoder", {}):
            try:
                write_encoder_variant(args.family, precision)
            except ValueError as e:  # the exporter's own refusal (non-finite embeddings): recorded, not measured
                report["variants"][precision] = {"not_written": str(e)}
                print(f"{precision}: {e}", flush=True)
                continue
        result = measure(args.family, precision, args.n, args.repeats)
        report["variants"][precision] = result
        if args.write_docs:
            write_encoder_variant(args.family, precision, measurements={
                "DSB2018 test images": result["images"], "objects (boxes)": result["objects"],
                "encoder speed-up vs fp32 (same process)": f"{result['speedup']}x ({report['host']})",
                "embeddings: max / mean abs difference": f"{result['embedding_max_abs_diff']} / "
                                                         f"{result['embedding_mean_abs_diff']}",
                "box-prompted masks: mean IoU vs fp32": result["box_mask_mean_iou_vs_fp32"]})
        print(json.dumps({precision: result}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
