"""Issue 16's numbers in one run: reports/benchmarks.json and the goals section of BENCHMARKS.md.

Usage: .venv/bin/python benchmarks/bench_report.py [--threads 2] [--ais-images 3] [--folder-images 20]
(~35 min on 2 cores; needs the micro-sam reference environment: bash scripts/micro_sam_venv.sh /tmp/usam-ais-ref)

One seeded random vit_b with a seeded UNETR decoder (one µSAM checkpoint, exported once, ONNX) against the
references on the same weights, side by side in this run:
- the host's fp32 GEMM throughput (bench_gemm) -> the encoder's FLOP floor (972 GFLOP, measured-facts.md);
- embedding and prompts vs segment_anything's SamPredictor (bench_core; each path its own process, so its peak
  RSS is its own);
- AIS from cached embeddings vs micro-sam 1.8.14 (bench_ais); AMG vs SamAutomaticMaskGenerator (bench_amg);
- a folder of DSB2018 images: `usam ais` vs micro-sam's automatic segmentation command (bench_folder).
The section between the markers in BENCHMARKS.md is rewritten; earlier runs below it are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # reference.py, for bench_amg

# matmul + conv, 2 per multiply-add, at input 1024 (shared/design/measured-facts.md)
ENCODER_GFLOP = {"vit_b": 972.0, "vit_t": 77.5}
PROMPT_DECODER_GFLOP = 3.6  # per prompt (object or AMG grid point)
AIS_DECODER_GFLOP = 822.0  # µSAM's UNETR decoder of vit_b
BEGIN, END = "<!-- bench_report: begin -->", "<!-- bench_report: end -->"
GOALS = {  # key: (what, goal as text, test on the value)
    "embed_vit_b_speedup": ("vit_b embedding vs SamPredictor", "faster", lambda v: v > 1.0),
    "embed_vit_b_floor_ratio": ("vit_b embedding / its FLOP floor on this host", "<= 1.5", lambda v: v <= 1.5),
    "rss_vit_b_encoder_gb": ("peak RSS, vit_b encoder path (GB)", "<= 2.0", lambda v: v <= 2.0),
    "point_speedup": ("1 point, full-size mask, vs SamPredictor", ">= 3x", lambda v: v >= 3.0),
    "box_speedup": ("1 box, full-size mask, vs SamPredictor", ">= 3x", lambda v: v >= 3.0),
    "boxes32_speedup": ("32 boxes vs SamPredictor", ">= 5x", lambda v: v >= 5.0),
    "ais_speedup": ("AIS from cached embeddings vs micro-sam", ">= 3x, identical labels", lambda v: v >= 3.0),
    "amg_speedup": ("AMG vs SamAutomaticMaskGenerator", ">= 5x, same masks", lambda v: v >= 5.0),
    "folder_images_per_min_ratio": ("folder of DSB2018 images, images/min vs micro-sam's command", "> 1",
                                    lambda v: v > 1.0),
}


def _load() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def _stage(name: str, fn, loads: dict):
    t = time.perf_counter()
    print(f"== {name} (load {_load():.2f})", flush=True)
    loads[name] = _load()
    result = fn()
    print(f"== {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    return result


def measure(args: argparse.Namespace) -> dict:
    import bench_ais
    import bench_amg
    import bench_core
    import bench_folder
    import bench_gemm

    loads = {}
    gemm = _stage("gemm", lambda: bench_gemm.gemm_rates(args.threads), loads)
    ais = _stage("ais", lambda: bench_ais.run(model_type=args.model_type, n_images=args.ais_images, repeats=args.repeats,
                                              threads=args.threads, workdir=args.workdir / "ais",
                                              micro_sam_python=args.micro_sam_python), loads)
    family, checkpoint = Path(ais["family"]), Path(ais["checkpoint"])
    core_args = argparse.Namespace(model_type=args.model_type, repeats=args.repeats, threads=args.threads)
    core = {p: _stage(f"core {p}", lambda p=p: bench_core.measure(p, core_args, family), loads)
            for p in ("reference", "onnx")}
    amg_args = bench_amg._parser().parse_args(["--model-type", args.model_type, "--family", str(family), "--checkpoint",
                                               str(checkpoint), "--repeats", str(args.repeats), "--threads",
                                               str(args.threads)])
    amg = _stage("amg", lambda: bench_amg.run(amg_args), loads)
    folder = _stage("folder", lambda: bench_folder.run(
        family=family, checkpoint=checkpoint, model_type=args.model_type, n=args.folder_images, threads=args.threads,
        workdir=args.workdir / "folder", micro_sam_python=args.micro_sam_python), loads)
    loads["end"] = _load()

    ref, ours = core["reference"], core["onnx"]
    ort_gflops = gemm["onnxruntime (constant weights)"]
    floor_s = ENCODER_GFLOP[args.model_type] / ort_gflops
    keys = {
        "embed_vit_b_speedup": ref["embed_s"] / ours["embed_s"],
        "embed_vit_b_floor_ratio": ours["embed_s"] / floor_s,
        "rss_vit_b_encoder_gb": ours["peak_rss_gb"],
        "point_speedup": ref["point_s"] / ours["point_s"],
        "box_speedup": ref["box_s"] / ours["box_s"],
        "boxes32_speedup": ref["boxes32_s"] / ours["boxes32_s"],
        "ais_speedup": ais["speedup"],
        "amg_speedup": amg["speedup"],
        "folder_images_per_min_ratio": folder["images_per_min_ratio"],
    }
    return {
        **{k: round(v, 3) for k, v in keys.items()},
        "host": {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": bench_gemm.cpu_description(),
                 "cores": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                 "load_at_start_of": loads, "gemm_gflops": {k: round(v, 1) for k, v in gemm.items()},
                 "model_type": args.model_type, "encoder_floor_s": round(floor_s, 2)},
        "core": {"reference": ref, "ours_onnx": ours, "image": bench_core.IMAGE.name, "repeats": args.repeats},
        "ais": {k: v for k, v in ais.items() if k not in ("section", "checkpoint", "family")},
        "amg": {k: v for k, v in amg.items() if k != "log"},
        "folder": folder,
        "sections": {"ais": ais["section"], "amg": "\n".join(amg["log"])},
    }


def _reasons(r: dict) -> list:
    """One measured line per missed goal: what this run's numbers (and the FLOP floors at this run's GEMM
    throughput) say about it."""
    g, core, host = r["host"]["gemm_gflops"], r["core"], r["host"]
    ort, torch_ = g["onnxruntime (constant weights)"], g["torch"]
    ours, ref = core["ours_onnx"], core["reference"]
    prompt_floor = PROMPT_DECODER_GFLOP / ort  # seconds per prompt at this host's ONNX Runtime GEMM rate
    out = []
    if not GOALS["embed_vit_b_floor_ratio"][2](r["embed_vit_b_floor_ratio"]):
        out.append(f"- embedding at {r['embed_vit_b_floor_ratio']:.2f}x its floor ({ours['embed_s']:.2f} s vs "
                   f"{host['encoder_floor_s']:.2f} s = 972 GFLOP at {ort:.0f} GFLOP/s): the non-GEMM work of the four "
                   "global-attention blocks (the decomposed relative-position adds onto 12 x 4096 x 4096 attention "
                   "maps, the softmax over them) is memory-bound, ~30-40% of the time in the earlier profile.")
    if not GOALS["rss_vit_b_encoder_gb"][2](r["rss_vit_b_encoder_gb"]):
        out.append(f"- peak RSS {r['rss_vit_b_encoder_gb']:.2f} GB (SamPredictor's {ref['peak_rss_gb']:.2f} GB): ONNX "
                   "Runtime holds a global block's attention maps (12 heads x 4096^2 float32 = 805 MB, with the bias "
                   "terms and the softmax output several such buffers) in its arena; attention per head in the "
                   "exported graph is the open step.")
    if not GOALS["embed_vit_b_speedup"][2](r["embed_vit_b_speedup"]):
        out.append(f"- embedding speed-up {r['embed_vit_b_speedup']:.2f}x: both sides are GEMM-bound and ONNX Runtime's "
                   f"GEMM is {ort / torch_:.2f}x torch's here ({ort:.0f} vs {torch_:.0f} GFLOP/s).")
    for key, what, t in (("point_speedup", "1 point", "point_s"), ("box_speedup", "1 box", "box_s")):
        if not GOALS[key][2](r[key]):
            out.append(f"- {what} {r[key]:.2f}x ({1e3 * ref[t]:.0f} vs {1e3 * ours[t]:.0f} ms): a third of SamPredictor's "
                       f"time is {1e3 * ref[t] / 3:.0f} ms, and the prompt decoder alone ({PROMPT_DECODER_GFLOP} GFLOP: "
                       f"its two-way transformer over 4096 image tokens and the mask upscaling) takes "
                       f"{1e3 * prompt_floor:.0f} ms at this host's GEMM rate: the goal needs "
                       f"{prompt_floor / (ref[t] / 3):.0%} of the GEMM peak over the whole decoder, which both sides "
                       "run.")
    if not GOALS["boxes32_speedup"][2](r["boxes32_speedup"]):
        out.append(f"- 32 boxes {r['boxes32_speedup']:.2f}x: {1e3 * ours['boxes32_s'] / 32:.0f} ms per object here "
                   f"against a floor of {1e3 * prompt_floor:.0f} ms per object; 5x needs "
                   f"{1e3 * ref['boxes32_s'] / 5 / 32:.0f} ms per object, "
                   f"{prompt_floor / (ref['boxes32_s'] / 5 / 32):.0%} of the GEMM peak over the whole decoder.")
    if not GOALS["ais_speedup"][2](r["ais_speedup"]):
        n = r["ais"]["n_images"]
        floor = n * AIS_DECODER_GFLOP / ort
        out.append(f"- AIS {r['ais_speedup']:.2f}x ({r['ais']['identical_labels']}/{n} label images identical): the UNETR "
                   f"head ({AIS_DECODER_GFLOP:.0f} GFLOP per image) has a floor of {floor:.1f} s for the {n} images at "
                   f"{ort:.0f} GFLOP/s; ours took {r['ais']['ours_seconds']:.1f} s, micro-sam "
                   f"{r['ais']['reference_seconds']:.1f} s, so 3x ({r['ais']['reference_seconds'] / 3:.1f} s) is "
                   f"{'below' if r['ais']['reference_seconds'] / 3 < floor else 'near'} that floor.")
    if not GOALS["amg_speedup"][2](r["amg_speedup"]):
        points = 16 * 16
        floor = points * prompt_floor
        out.append(f"- AMG {r['amg_speedup']:.2f}x: {points} grid points x {PROMPT_DECODER_GFLOP} GFLOP = a floor of "
                   f"{floor:.1f} s; ours {r['amg']['ours_seconds']:.1f} s, the reference {r['amg']['reference_seconds']:.1f}"
                   f" s, 5x = {r['amg']['reference_seconds'] / 5:.1f} s. The decoder's first layer projects the image "
                   "tokens once per grid point (~0.8 of the 3.6 GFLOP) because the package's one static graph adds "
                   "each object's dense mask prompt to them first (has_mask_input); and its GEMMs (4096 x 256 by "
                   "256 x 128 per object) ran at ~155 GFLOP/s in ONNX Runtime, not at the square-GEMM rate above.")
    if not GOALS["folder_images_per_min_ratio"][2](r["folder_images_per_min_ratio"]):
        out.append(f"- folder {r['folder_images_per_min_ratio']:.2f}x: per image the encoder and the AIS head dominate.")
    return out


def markdown(r: dict) -> str:
    host = r["host"]
    rows = ["| key | what | goal | measured | met |", "|---|---|---|---|---|"]
    for key, (what, goal, ok) in GOALS.items():
        rows.append(f"| `{key}` | {what} | {goal} | {r[key]:.2f} | {'yes' if ok(r[key]) else 'no'} |")
    core = r["core"]
    core_rows = ["| path | embedding (s) | 1 point (ms) | 1 box (ms) | 32 boxes (ms) | peak RSS (GB) |",
                 "|---|---|---|---|---|---|"]
    for name, c in (("SamPredictor", core["reference"]), ("ours (ONNX)", core["ours_onnx"])):
        core_rows.append(f"| {name} | {c['embed_s']:.2f} | {1e3 * c['point_s']:.0f} | {1e3 * c['box_s']:.0f} | "
                         f"{1e3 * c['boxes32_s']:.0f} | {c['peak_rss_gb']:.2f} |")
    f = r["folder"]
    g = host["gemm_gflops"]
    reasons = _reasons(r)
    return "\n".join([
        BEGIN,
        f"## Where we stand against the goals ({host['date']}, `benchmarks/bench_report.py`)",
        "",
        f"One run on this host ({host['cpu']}; {host['threads']} threads; load at the start of each part: "
        + ", ".join(f"{k} {v:.2f}" for k, v in host["load_at_start_of"].items())
        + f"). fp32 GEMM: ONNX Runtime {g['onnxruntime (constant weights)']:.0f}, torch {g['torch']:.0f}, numpy "
        f"{g['numpy']:.0f} GFLOP/s. Seeded random {host['model_type']} + UNETR decoder, the same weights on both sides; "
        "`reports/benchmarks.json` holds every number.",
        "",
        *rows,
        "",
        "Why the missed goals are missed, from this run:" if reasons else "Every goal is met in this run.",
        *reasons,
        "",
        f"### Embedding and prompts, {host['model_type']} ({core['image']}, best of {core['repeats']} after a warm-up)",
        "",
        *core_rows,
        "",
        f"### AIS from cached embeddings, {host['model_type']}",
        "",
        r["sections"]["ais"].split("\n", 2)[2].strip(),
        "",
        f"### AMG, {host['model_type']} (bench_amg)",
        "",
        "```",
        r["sections"]["amg"],
        "```",
        "",
        f"### A folder of {f['n_images']} DSB2018 test images, {host['model_type']}",
        "",
        f"`usam ais --image FOLDER`: {f['ours_seconds']:.0f} s ({f['ours_images_per_min']:.1f} images/min); micro-sam's "
        f"automatic segmentation command (`--mode ais`): {f['reference_seconds']:.0f} s "
        f"({f['reference_images_per_min']:.1f} images/min); model loading included on both sides; label images "
        f"identical: {f['identical_labels']} of {f['n_images']}.",
        END,
    ])


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:  # first run: the section replaces the hand-written goals section
        start = text.index("## Where we stand against the goals")
        nxt = text.index("\n## ", start + 1)
        head, tail = text[:start], text[nxt:]
    path.write_text(head + section + tail, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=sorted(ENCODER_GFLOP),
                        help="vit_b for the report's keys; vit_t for a quick try of the whole run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ais-images", type=int, default=3)
    parser.add_argument("--folder-images", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usam-bench-report"))
    parser.add_argument("--micro-sam-python", default="/tmp/usam-ais-ref/bin/python")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "benchmarks.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite BENCHMARKS.md's section from --report")
    args = parser.parse_args()
    if not args.render and not Path(args.micro_sam_python).is_file():
        raise SystemExit(f"no micro-sam reference environment at {args.micro_sam_python}: "
                         "bash scripts/micro_sam_venv.sh /tmp/usam-ais-ref")
    if args.render:
        result = json.loads(args.report.read_text())
    else:
        result = measure(args)
        args.report.write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    write_markdown(args.markdown, section)
    print(section)


if __name__ == "__main__":
    main()
