"""``usam evaluate``: one model on a dataset with a validation and a test split -> a Markdown report.

What it runs (each optional): interactive segmentation starting from a box and from a point with µSAM's
iterative corrections (:mod:`.interactive_evaluation`), AIS and AMG with thresholds chosen by grid search on
the validation split (:mod:`.automatic_evaluation`), and the classical Otsu + watershed baseline, all scored
on the test split with the mean segmentation accuracy (mSA) and the accuracy at IoU 0.5 / 0.75. Writes
``report.md``, ``results.json`` and ``interactive.png`` / ``automatic.png`` (matplotlib) into ``out_dir``:
all of them into a hidden staging folder beside it first, then swapped in, so that a failure midway leaves no
partial report and the old one, if any, untouched (see :func:`write_report`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from usam_bioimageio.io.datasets import Pair

MODES = ("interactive", "ais", "amg", "baseline")
# every file a report may hold (report.md last: the file that says a report is there); cli.files checks these
REPORT_FILES = ("interactive.png", "automatic.png", "results.json", "report.md")


def _plot(path: Path, draw) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    path.write_bytes(buf.getvalue())


def run_evaluation(model, val_pairs: Sequence[Pair], test_pairs: Sequence[Pair], *,
                   modes: Sequence[str] = MODES, n_iterations: int = 8, seed: int = 0,
                   progress: bool = True) -> Dict[str, Any]:
    """The numbers of the report (JSON-serialisable)."""
    from tqdm import tqdm

    from usam_bioimageio.evaluation.automatic import evaluate_automatic, mean_scores
    from usam_bioimageio.evaluation.baseline import otsu_watershed
    from usam_bioimageio.evaluation.interactive import evaluate_interactive

    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.pixel_scale import scale_image

    results: Dict[str, Any] = {"n_val": len(val_pairs), "n_test": len(test_pairs)}
    computed: Dict[tuple, Any] = {}
    # prompts and AIS run at the model's pixel scale, as `usam segment` / `usam ais` do; AMG at the image's own
    model_scale = model.pixel_scale

    def embed_at(scale: float):
        def embed(image):  # one encoder run per image and scale for all modes (the pairs hold the images alive)
            if (id(image), scale) not in computed:
                computed[id(image), scale] = compute_embeddings(model, scale_image(image, scale) if scale != 1.0
                                                                else image)
            return computed[id(image), scale]
        return embed

    if "baseline" in modes:
        preds = [otsu_watershed(image) for image, _ in tqdm(test_pairs, desc="baseline", disable=not progress)]
        results["baseline"] = mean_scores(preds, [g for _, g in test_pairs])
    if "interactive" in modes:
        results["interactive"] = {
            start: {**evaluate_interactive(model, test_pairs, start=start, n_iterations=n_iterations, seed=seed,
                                           embed=embed_at(model_scale), progress=progress, scale=model_scale),
                    "pixel_scale": model_scale}
            for start in ("box", "point")
        }
    for mode in ("ais", "amg"):
        if mode in modes:
            scale = model_scale if mode == "ais" else 1.0
            out = evaluate_automatic(model, val_pairs, test_pairs, mode=mode, progress=progress,
                                     embed=embed_at(scale), scale=scale)
            results[mode] = {"best": out["best"], "test": out["test"], "grid_size": len(out["val_table"]),
                             "best_val_msa": max(r["msa"] for r in out["val_table"]), "pixel_scale": scale}
    return results


def _row(name: str, scores: Dict[str, float]) -> str:
    return f"| {name} | {scores['msa']:.3f} | {scores['sa50']:.3f} | {scores['sa75']:.3f} |"


def write_report(results: Dict[str, Any], out_dir: Path, *, title: str, command: str) -> Path:
    """report.md (+ results.json and plots) from :func:`run_evaluation`'s numbers, written into a hidden staging
    folder beside ``out_dir`` and swapped in (:func:`_swap_in`); nothing of it is left when writing fails."""
    out_dir = Path(out_dir).resolve()  # "--out ." has no name to put a sibling beside
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    staging.mkdir()
    try:
        _write_files(results, staging, title=title, command=command)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "report.md"


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Move the report in ``staging`` to ``out_dir``. A new, empty or report-only folder is replaced as a whole
    (renamed: atomic; an old report is renamed aside until the new one is in place); a folder that also holds the
    user's other files, or the working directory (never renamed away under the user's shell), keeps them: each
    report file is moved in on its own (atomic per file, report.md last) and report files the new report lacks
    (a plot of a mode not run) are removed after."""
    written = [name for name in REPORT_FILES if (staging / name).exists()]
    cwd = Path.cwd().resolve()
    if out_dir.is_dir() and (out_dir == cwd or out_dir in cwd.parents
                             or any(p.name not in REPORT_FILES for p in out_dir.iterdir())):
        for name in written:
            os.replace(staging / name, out_dir / name)
        for name in REPORT_FILES:
            if name not in written:
                (out_dir / name).unlink(missing_ok=True)
        return
    old = staging.with_suffix(".old")
    if out_dir.exists():
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old.exists():
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_files(results: Dict[str, Any], out_dir: Path, *, title: str, command: str) -> None:
    lines = [f"# {title}", "", f"Regenerate: `{command}`", "",
             f"Test images: {results['n_test']}; validation images (AIS / AMG grid search): {results['n_val']}. "
             "mSA: mean segmentation accuracy over IoU thresholds 0.5..0.95; SA50 / SA75: accuracy at IoU 0.5 / "
             "0.75 (µSAM's metrics).", "", "| method | mSA | SA50 | SA75 |", "|---|---|---|---|"]
    if "baseline" in results:
        lines.append(_row("Otsu + distance-transform watershed (no training)", results["baseline"]))
    for mode, name in (("ais", "AIS (µSAM decoder)"), ("amg", "AMG (point grid)")):
        if mode in results:
            best = ", ".join(f"{k} {v}" for k, v in results[mode]["best"].items())
            scale = results[mode].get("pixel_scale", 1.0)
            at = f" at pixel scale {scale:g}" if scale != 1.0 else ""
            lines.append(_row(f"{name}{at}; val-chosen {best}", results[mode]["test"]))
    inter = results.get("interactive", {})
    for start, r in inter.items():
        for k in sorted({0, len(r["msa"]) - 1}):
            label = "start" if k == 0 else f"after {k} corrections"
            scale = r.get("pixel_scale", 1.0)
            at = f" at pixel scale {scale:g}" if scale != 1.0 else ""
            lines.append(_row(f"interactive from a {start}{at}, {label}",
                              {"msa": r["msa"][k], "sa50": r["sa50"][k], "sa75": r["sa75"][k]}))
    lines.append("")
    if inter:
        def draw_interactive(ax):
            for start, r in inter.items():
                ax.plot(range(len(r["msa"])), r["msa"], marker="o", label=f"from a {start}")
            if "baseline" in results:
                ax.axhline(results["baseline"]["msa"], color="gray", linestyle="--", label="Otsu baseline")
            ax.set_xlabel("corrections (µSAM's iterative prompting)")
            ax.set_ylabel("mSA (test)")
            ax.legend()

        _plot(out_dir / "interactive.png", draw_interactive)
        lines += ["![interactive segmentation](interactive.png)", ""]
    auto = {"Otsu": results["baseline"]["msa"]} if "baseline" in results else {}
    auto.update({name: results[key]["test"]["msa"] for key, name in (("ais", "AIS"), ("amg", "AMG")) if key in results})
    if auto:
        def draw_automatic(ax):
            ax.bar(list(auto), list(auto.values()), color=["gray", "tab:blue", "tab:orange"][:len(auto)])
            ax.set_ylabel("mSA (test)")

        _plot(out_dir / "automatic.png", draw_automatic)
        lines += ["![automatic segmentation](automatic.png)", ""]
    lines += [f"Written {time.strftime('%Y-%m-%d %H:%M')} by `usam evaluate`."]
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- the demo model's benchmark (issue 13): the summary keys, the filled-box baseline, the bars -------------------

def filled_box_labels(ground_truth):
    """The "filled box" baseline: each ground-truth object's bounding box used as its mask, composed into a label
    image as box-prompted masks are (``evaluation.interactive``: larger masks first, smaller ones on top). A
    box-prompted model is worth its prompts only above this."""
    import numpy as np

    from usam_bioimageio.evaluation.interactive import _label_image
    from usam_bioimageio.prompting import iterative as ip

    gt = np.asarray(ground_truth)
    ids = np.unique(gt)
    ids = ids[ids != 0]
    masks = np.zeros((len(ids),) + gt.shape, bool)
    for m, (x0, y0, x1, y1) in zip(masks, ip.bounding_boxes(ip.object_masks(gt, ids))):
        m[y0:y1, x0:x1] = True
    return _label_image(masks, gt.shape)


def summary(results: Dict[str, Any]) -> Dict[str, Any]:
    """The flat keys of issue 13 from :func:`run_evaluation`'s results (+ ``results["filled_box"]``): mSA on the
    same test images with the same scoring code."""
    out: Dict[str, Any] = {"n_images": results["n_test"]}
    if "ais" in results:
        out["ais_msa"] = results["ais"]["test"]["msa"]
    if "amg" in results:
        out["amg_msa"] = results["amg"]["test"]["msa"]
    inter = results.get("interactive", {})
    if "box" in inter:
        out["box_msa"] = inter["box"]["msa"][0]
    if "point" in inter:
        out["point_msa_0"] = inter["point"]["msa"][0]
        if len(inter["point"]["msa"]) > 7:
            out["point_msa_7"] = inter["point"]["msa"][7]
    if "baseline" in results:
        out["otsu_msa"] = results["baseline"]["msa"]
    if "filled_box" in results:
        out["filled_box_msa"] = results["filled_box"]["msa"]
    return out


BARS = (("AIS mSA > Otsu mSA", "ais_msa", "otsu_msa"),
        ("box mSA > filled-box mSA", "box_msa", "filled_box_msa"),
        ("box mSA > Otsu mSA", "box_msa", "otsu_msa"),
        ("a point after 7 corrections > a lone point", "point_msa_7", "point_msa_0"))


def bars(flat: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each bar of issue 13: its name, the two numbers and whether it is met (None when a number is missing)."""
    rows = []
    for name, a, b in BARS:
        met = (flat[a] > flat[b]) if a in flat and b in flat else None
        rows.append({"bar": name, "value": flat.get(a), "reference": flat.get(b), "met": met})
    return rows
