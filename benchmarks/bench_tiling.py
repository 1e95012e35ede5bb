"""Tiled embeddings of a large image: ours (packages + zarr cache) vs micro-sam's precompute_image_embeddings.

Same seed-0 random weights, same image, same tiling (tile 1024, halo 256), both writing a zarr cache; each
run in its own subprocess so that peak RSS is that path's alone. micro-sam runs in the reference environment
of scripts/regenerate_ais_reference.sh (``--micro-sam-python``, default /tmp/usam-ais-ref/bin/python) from a
checkpoint of the same weights; when it cannot run, only ours is measured and the reason printed.
The tiles of both caches are compared (micro-sam's vit_t keeps MobileSAM's stale attention-bias cache unless
refreshed, see scripts/ais_decoder_reference.py; the child refreshes it so that the weights are the same).

Usage: .venv/bin/python benchmarks/bench_tiling.py [--sizes 2048 8192] [--ours-only-above 2048] [--threads 2]
Prints a Markdown section; ``--out FILE`` appends it there too.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child import PEAK_RSS  # benchmarks/child.py (the script's folder is on the path)
from exports import needs_export  # benchmarks/exports.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
IMAGE = DATA / "bacteria_tracking" / "data" / "bacteria" / "img" / "t000000.tif"  # 1305 x 1009, real
MODEL_TYPE = "vit_t"  # default of --model-type
TILE, HALO = 1024, 256

OURS = PEAK_RSS + r"""
import json, sys, time

import numpy as np
args = json.loads(sys.argv[1])
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.embeddings.compute import compute_tiled_embeddings
image = np.load(args["image"], mmap_mode="r")
model = SamModel.load(args["family"], num_threads=args["threads"])
t = time.perf_counter()
emb = compute_tiled_embeddings(model, image, tile_shape=args["tile"], halo=args["halo"], cache=args["cache"],
                               progress=False)
out = {"seconds": time.perf_counter() - t, "tiles": len(emb),
       "peak_rss_gb": peak_rss_gb()}
print("RESULT" + json.dumps(out))
"""

MICRO_SAM = PEAK_RSS + r"""
import json, sys, time

args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"] + "/scripts")
from micro_sam_env import refresh_attention_bias_cache, setup_imports  # torchvision stand-ins
setup_imports()
import numpy as np
import torch
from micro_sam.util import get_sam_model, precompute_image_embeddings
torch.set_num_threads(args["threads"])
image = np.load(args["image"], mmap_mode="r")
predictor = get_sam_model(model_type=args["model_type"], checkpoint_path=args["checkpoint"], device="cpu")
refresh_attention_bias_cache(predictor.model)  # MobileSAM's attention-bias cache, from the loaded weights
t = time.perf_counter()
with torch.no_grad():
    precompute_image_embeddings(predictor, image, save_path=args["cache"], tile_shape=(args["tile"],) * 2,
                                halo=(args["halo"],) * 2, verbose=False)
out = {"seconds": time.perf_counter() - t,
       "peak_rss_gb": peak_rss_gb()}
print("RESULT" + json.dumps(out))
"""


def run_child(python: str, code: str, params: dict) -> dict:
    proc = subprocess.run([python, "-c", code, json.dumps(params)], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode or not line:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line[0][len("RESULT"):])


def large_image(size: int):
    """A real microscopy image repeated (mirrored, so that no seam is flat) to size x size, uint16."""
    import numpy as np
    import tifffile

    tile = tifffile.imread(IMAGE)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]))
    return np.ascontiguousarray(np.tile(tile, reps)[:size, :size])


def compare(ours_cache: Path, micro_sam_cache: Path) -> dict:
    import numpy as np

    from usam_bioimageio.embeddings.cache import load_cache, load_micro_sam_embeddings

    ours, theirs = load_cache(ours_cache)[0], load_micro_sam_embeddings(micro_sam_cache)[0]
    diff, scale = 0.0, 0.0
    for t in range(len(ours)):
        a, b = ours.features[t], theirs.features[t]
        diff, scale = max(diff, float(np.abs(a - b).max())), max(scale, float(np.abs(b).max()))
    return {"max_abs_diff": diff, "max_abs_value": scale, "tiles": len(ours)}


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048])
    parser.add_argument("--ours-only-above", type=int, default=2048, help="skip micro-sam for larger images")
    parser.add_argument("--model-type", default=MODEL_TYPE, choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--family", type=Path, default=None,
                        help="an exported family of the seed-0 model (default: out/bench/MODEL_TYPE/family, "
                             "shared with bench_core.py; exported when missing)")
    parser.add_argument("--micro-sam-python", default="/tmp/usam-ais-ref/bin/python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also append the Markdown section to this file")
    args = parser.parse_args()
    model_type = args.model_type
    family = args.family or ROOT / "out" / "bench" / model_type / "family"
    if needs_export(family, passed=args.family is not None):
        t = time.perf_counter()
        from bench_core import export  # the family bench_core.py times too (same folder, same formats)

        family = export(model_type, family.parent)
        print(f"exported {family} in {time.perf_counter() - t:.0f} s")
    checkpoint = family.parent / f"{model_type}_seed0.pt"

    rows = ["| image | path | tiles | time (s) | s / tile | peak RSS (GB) | cache on disk (MB) |",
            "|---|---|---|---|---|---|---|"]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            image = large_image(size)
            np.save(tmp / "image.npy", image)
            params = dict(image=str(tmp / "image.npy"), family=str(family), threads=args.threads, tile=TILE,
                          halo=HALO, root=str(ROOT), model_type=model_type, checkpoint=str(checkpoint))
            paths = {"ours": (sys.executable, OURS)}
            if size <= args.ours_only_above:
                if Path(args.micro_sam_python).is_file() and checkpoint.is_file():
                    paths["micro-sam 1.8.14"] = (args.micro_sam_python, MICRO_SAM)
                else:
                    notes.append(f"micro-sam not measured: no {args.micro_sam_python} or no checkpoint {checkpoint}")
            caches = {}
            for name, (python, code) in paths.items():
                caches[name] = tmp / f"{name.split()[0]}-{size}.zarr"
                try:
                    r = run_child(python, code, {**params, "cache": str(caches[name])})
                except RuntimeError as err:
                    notes.append(f"{name} at {size}: failed ({str(err).strip().splitlines()[-1]})")
                    caches.pop(name)
                    continue
                n_tiles = r.get("tiles") or len(range(0, size, TILE)) ** 2
                disk = sum(f.stat().st_size for f in caches[name].rglob("*") if f.is_file()) / 2 ** 20
                rows.append(f"| {size} x {size} uint16 | {name} | {n_tiles} | {r['seconds']:.1f} | "
                            f"{r['seconds'] / n_tiles:.2f} | {r['peak_rss_gb']:.2f} | {disk:.0f} |")
                print(rows[-1], flush=True)
            if len(caches) == 2:
                c = compare(caches["ours"], caches["micro-sam 1.8.14"])
                notes.append(f"{size} x {size}: the {c['tiles']} tiles of both caches agree to max |diff| "
                             f"{c['max_abs_diff']:.2e} (features up to {c['max_abs_value']:.2f})")
                print(notes[-1], flush=True)
    text = (f"\n## Tiled embeddings: {model_type}, tile {TILE}, halo {HALO} ({time.strftime('%Y-%m-%d %H:%M')}, "
            f"load {open('/proc/loadavg').read().split()[0]})\n\n"
            f"Seed-0 random {model_type}; image: {IMAGE.name} (real, 1305 x 1009) mirrored and repeated; both "
            f"paths write a zarr cache; {args.threads} threads; one run each (time includes writing, not model "
            f"loading; peak RSS includes the model and the image). micro-sam = `precompute_image_embeddings(predictor, "
            f"image, save_path, tile_shape, halo)` (eager torch). Host: {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}.\n\n" + "\n".join(rows) + "\n"
            + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    print(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
