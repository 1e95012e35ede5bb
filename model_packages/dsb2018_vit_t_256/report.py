"""The demo model's benchmark (issue 13) -> report/ (report.md with plots, results.json).

Usage (report.sh): .venv/bin/python model_packages/dsb2018_vit_t_256/report.py --checkpoint CKPT --model FAMILY
    --data DSB2018 --out REPORT_DIR --parts PARTS_DIR [--n-val N] [--limit N] [--training STAGE_FOLDER ...]

`usam evaluate`'s code (usam_bioimageio.evaluation): AIS / AMG thresholds by grid search on the first --n-val
`val` images (AIS also whether to run on native-resolution tiles where an image is larger than the model's frame,
or on such tiles of the image enlarged --scale times), interactive segmentation from a box (scored at the start)
and from a point (then 7 of µSAM's corrections; both at --scale on such tiles, as `usam segment` runs the model), Otsu + watershed, and the filled-box baseline, all scored by the same mSA code on the same `test`
images. results.json gets issue 13's flat keys next to the full numbers, report.md the bars and the learning
curves. Each part is kept in PARTS_DIR with a fingerprint of the weights it depends on (AIS: image encoder + AIS
decoder; prompts and AMG: all SAM weights; baselines: none) and the settings, and reused while they match: stage 2
of the recipe leaves the encoder and the AIS decoder as stage 1 wrote them, so AIS can be scored during it.
"""

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from usam_bioimageio.evaluation.automatic import evaluate_automatic, mean_scores
from usam_bioimageio.evaluation.report import bars, filled_box_labels, summary, write_report
from usam_bioimageio.io.datasets import read_split

AMG_POINTS_PER_SIDE = 8  # SAM's 32 points per side at input 1024, scaled to the 256 frame (32 px spacing)


def fingerprint(checkpoint: str, part: str) -> str:
    from usam_bioimageio.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if part == "ais":
        tensors = {k: v for k, v in ckpt.sam_state.items() if k.startswith("image_encoder.")}
        tensors.update({"decoder." + k: v for k, v in (ckpt.decoder_state or {}).items()})
    else:
        tensors = dict(ckpt.sam_state)
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the weights the family was exported from")
    parser.add_argument("--model", required=True, help="the exported package family")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", type=Path, required=True, help="folder for the cached parts")
    parser.add_argument("--only", nargs="*", default=None, help="compute only these parts (e.g. ais baseline)")
    parser.add_argument("--partial", action="store_true", help="with --only: write the report of the parts there "
                        "are, naming the missing ones")
    parser.add_argument("--n-val", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.0, help="the model's pixel scale: also AIS on tiles of the "
                        "images enlarged this many times (`usam ais --scale`), a choice next to the frame and native "
                        "tiles; box / point prompts on such tiles (in the frame at 1)")
    parser.add_argument("--ais-ways", nargs="+", choices=("frame", "tiles", "scaled"),
                        default=["frame", "tiles", "scaled"], help="the ways AIS is run, the best on `val` is used: "
                        "the whole image in the frame, native-resolution tiles, tiles of the image at --scale")
    parser.add_argument("--limit", type=int, default=None, help="the first N test images (default: all)")
    parser.add_argument("--limit-reason", default="", help="why fewer than all test images, for report.md")
    parser.add_argument("--training", type=Path, nargs="*", default=[], help="training folders (curves, CPU time)")
    parser.add_argument("--title", default="usam_dsb2018_vit_t_256 (demo model trained here) on DSB2018")
    args = parser.parse_args()
    t0 = time.time()
    val = read_split(args.data, "val", args.n_val)
    test = read_split(args.data, "test", args.limit)
    gts = [g for _, g in test]
    settings = {"n_val": len(val), "n_test": len(test)}  # a part's own settings are in its name
    args.parts.mkdir(parents=True, exist_ok=True)

    from usam_bioimageio.automatic.amg.params import AmgParameters
    from usam_bioimageio.embeddings.compute import compute_embeddings, compute_image_embeddings
    from usam_bioimageio.embeddings.types import AUTO_TILING
    from usam_bioimageio.runtime.pixel_scale import scale_image
    from usam_bioimageio.evaluation.baseline import otsu_watershed
    from usam_bioimageio.evaluation.interactive import evaluate_interactive
    from usam_bioimageio.runtime.model import SamModel

    model = SamModel.load(args.model)
    cache = {}

    def embed(image):  # one encoder run per image for all parts
        if id(image) not in cache:
            cache[id(image)] = compute_embeddings(model, image)
        return cache[id(image)]

    def embed_tiled(image, scale=1.0):
        # `usam ais --tile-shape auto [--scale S]`: N x N tiles of the image (resized S times) where it is larger
        if ("tiled", scale, id(image)) not in cache:
            resized = image if scale == 1.0 else scale_image(image, scale)
            cache["tiled", scale, id(image)] = compute_image_embeddings(model, resized, tile_shape=AUTO_TILING,
                                                                        progress=False)
        return cache["tiled", scale, id(image)]

    # prompts as `usam segment --tile-shape auto` runs the model by default: at --scale (the model's pixel scale),
    # on N x N tiles of the enlarged image where it is larger than the frame, each mask shrunk back
    prompt_way = "frame" if args.scale == 1.0 else f"auto tiles at scale {args.scale:g}"

    def interactive(start, n):
        # box prompts are scored at the start only (box_msa): one round; a point with 7 corrections: 8 rounds
        return evaluate_interactive(model, test, start=start, n_iterations=n, seed=0, progress=True, scale=args.scale,
                                    embed=embed if args.scale == 1.0 else lambda i: embed_tiled(i, args.scale))

    def automatic(mode, embed_fn=embed, scale=1.0):
        base = AmgParameters(points_per_side=AMG_POINTS_PER_SIDE) if mode == "amg" else None
        out = evaluate_automatic(model, val, test, mode=mode, progress=True, embed=embed_fn, amg_base=base,
                                 scale=scale)
        return {"best": out["best"], "test": out["test"], "grid_size": len(out["val_table"]),
                "best_val_msa": max(r["msa"] for r in out["val_table"])}

    scaled = f"ais_tiled_x{args.scale:g}"
    parts = {
        "baseline": (None, lambda: mean_scores([otsu_watershed(i) for i, _ in test], gts)),
        "filled_box": (None, lambda: mean_scores([filled_box_labels(g) for g in gts], gts)),
        **({"ais": ("ais", lambda: automatic("ais"))} if "frame" in args.ais_ways else {}),
        **({"ais_tiled": ("ais", lambda: automatic("ais", embed_tiled))} if "tiles" in args.ais_ways else {}),
        **({scaled: ("ais", lambda: automatic("ais", lambda i: embed_tiled(i, args.scale), args.scale))}
           if args.scale != 1.0 and "scaled" in args.ais_ways else {}),
        "box": ("sam", lambda: interactive("box", 1)),
        "point": ("sam", lambda: interactive("point", 8)),
        "amg": ("sam", lambda: automatic("amg")),
    }
    # AIS of the whole image in the N x N frame, on native-resolution tiles, or on tiles of the image enlarged
    # --scale times: the one with the best validation mSA is used
    ways = {"ais": "frame", "ais_tiled": "auto tiles", scaled: f"auto tiles at scale {args.scale:g}"}
    ways = {name: way for name, way in ways.items() if name in parts}
    if not ways:  # before anything is computed
        raise SystemExit("report.py: no way to run AIS (--ais-ways scaled needs --scale other than 1)")
    results = {"n_val": len(val), "n_test": len(test)}
    fingerprints = {}
    missing = []
    for name, (depends, compute) in parts.items():
        if depends is not None and depends not in fingerprints:
            fingerprints[depends] = fingerprint(args.checkpoint, depends)
        own = {"amg": {"amg_points_per_side": AMG_POINTS_PER_SIDE}, "box": {"prompts": prompt_way},
               "point": {"prompts": prompt_way}}.get(name, {})
        key = {"settings": {**settings, **own},
               "weights": fingerprints.get(depends)}
        path = args.parts / f"{name}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored["key"] == key:
                results[name] = stored["result"]
                print(f"{name}: reused {path}")
                continue
        if args.only is not None and name not in args.only:
            missing.append(name)
            continue
        t = time.time()
        results[name] = compute()
        path.write_text(json.dumps({"key": key, "result": results[name], "seconds": round(time.time() - t, 1)},
                                   indent=1))
        print(f"{name}: {time.time() - t:.0f} s")
    results["interactive"] = {k: results.pop(k) for k in ("box", "point") if k in results}
    found = {way: results.pop(name) for name, way in ways.items() if name in results}
    if len(found) == len(ways):
        chosen = max(found, key=lambda k: found[k]["best_val_msa"])
        results["ais"] = {**found[chosen], "tiling": chosen,
                          "by_tiling": {k: {"best_val_msa": v["best_val_msa"], "test_msa": v["test"]["msa"]}
                                        for k, v in found.items()}}
    elif found:
        missing.append("ais")
    if missing and not args.partial:
        print(f"not computed (--only): {missing}; no report written")
        return
    flat = summary(results)
    results["summary"] = flat
    results["bars"] = bars(flat)
    results["amg_points_per_side"] = AMG_POINTS_PER_SIDE
    command = "bash model_packages/dsb2018_vit_t_256/report.sh  # runs " + " ".join(shlex.quote(a) for a in sys.argv)
    report = write_report(results, args.out, title=args.title, command=command)
    full = json.loads((args.out / "results.json").read_text())
    (args.out / "results.json").write_text(json.dumps({**flat, "details": full}, indent=1) + "\n")
    lines = ["", "## Issue 13: summary and bars", "",
             f"{flat['n_images']} DSB2018 `test` images" + (" (the whole split)" if args.limit is None else
                                                            f" (the first {len(test)}: {args.limit_reason or 'by --limit'})") +
             f"; AIS / AMG thresholds by grid search on the first {len(val)} `val` images (AIS also the way it "
             f"runs, among: {'; '.join(ways.values())} (tiles: `usam ais --tile-shape auto`, N x N tiles where the "
             f"image is larger than the model's input" + (f"; at scale {args.scale:g}: `--scale {args.scale:g}`, of the "
                                                           f"image enlarged {args.scale:g}x" if args.scale != 1.0 else "") +
             f"); chosen: {results.get('ais', {}).get('tiling', 'n/a')}); box and point prompts: {prompt_way} "
             "(`usam segment`'s default for the model); AMG with "
             f"{AMG_POINTS_PER_SIDE} points per side; filled box = each ground-truth object's bounding box as its "
             "mask.", "", "| key | mSA |", "|---|---|"]
    lines += [f"| `{k}` | {v:.3f} |" for k, v in flat.items() if k != "n_images"]
    if "by_tiling" in results.get("ais", {}):
        lines += ["", "AIS by tiling (the better validation mSA is used): " + "; ".join(
            f"{k}: val {v['best_val_msa']:.3f}, test {v['test_msa']:.3f}" for k, v in results["ais"]["by_tiling"].items())
            + "."]
    if missing:
        lines += ["", f"**Not computed in this run** (`--only`): {', '.join(missing)}; rerun `report.sh` without "
                  "ONLY for them (the parts above are reused)."]
    lines += ["", "| bar | value | reference | met |", "|---|---|---|---|"]
    for b in results["bars"]:
        def fmt(v):
            return "n/a" if v is None else f"{v:.3f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[b["met"]]
        lines.append(f"| {b['bar']} | {fmt(b['value'])} | {fmt(b['reference'])} | {met} |")
    if args.training:
        lines += ["", "## Training (learning curves)", ""]
        for folder in args.training:
            png = folder / "curves.png"
            if png.exists():
                name = f"training_{folder.name}.png"
                shutil.copyfile(png, args.out / name)
                lines += [f"![stage {folder.name}]({name})", ""]
    lines += [f"This run of report.py took {(time.time() - t0) / 60:.1f} min (wall, 2 shared cores, reused parts "
              "not counted)."]
    with open(report, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(flat, indent=1))


if __name__ == "__main__":
    main()
