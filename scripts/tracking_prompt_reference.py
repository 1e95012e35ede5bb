"""Write tests/data/tracking_prompt_reference/: µSAM's interactive tracking (``track_from_prompts``) on seeded weights.

Run it with the python of the reference venv (scripts/micro_sam_venv.sh: micro-sam 1.8.14, mobile_sam for vit_t):
``/tmp/usam-ais-ref/bin/python scripts/tracking_prompt_reference.py tests/data/tracking_prompt_reference``.

The SAM is the seeded random vit_t of the tests (``seeded_sam("vit_t", seed=0)``, the ``vit_t_family`` fixture's),
loaded by µSAM with MobileSAM's attention-bias cache refreshed (as scripts/volume_prompt_reference.py does). The
frames: 6 frames of ``bacteria_tracking`` (van Vliet et al. 2018) cropped to 128 x 128 around ground-truth track 2,
which divides after frame 2 into tracks 5 and 6 (``man_track.txt``). µSAM's own embeddings
(``util.precompute_image_embeddings(ndim=3)``) feed µSAM's own functions:

* ``mask_<case>``: ``sam_annotator.util.track_from_prompts`` on a segmentation holding ground-truth masks on the
  annotated frames (motion model, projection modes, IoU stop, smoothing, a division frame, a stop frame); the
  result (packed bits, 6 x 128 x 128) and ``has_division`` in meta.json.
* ``prompts_<case>``: the tracking annotator's flow for a prompt file (meta.json ``prompt_file``, our tracking
  prompt format): for each track in order ``segment_slices_with_prompts`` + ``track_from_prompts`` with the
  annotator's defaults, the lineage updated on a division as ``_widgets._update_lineage`` does (daughters
  mother + 1, mother + 2) and each track painted over the labels as ``SegmentNDWidget._run_tracking`` does. The
  labels (uint8, 6 x 128 x 128) and the lineage in meta.json.

µSAM's napari layers are stood in for by plain objects with the attributes these functions read (``data``,
``properties``, ``shape_type``); ``sam_annotator/util.py`` is loaded without the package's ``__init__`` (which
imports the napari annotators) and with a stub ``napari`` module (it names napari types in annotations only).
Only results are stored (a few kB), no weights or frames.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import types
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from micro_sam_env import refresh_attention_bias_cache, setup_imports  # noqa: E402

SAM_SEED = 0
MODEL_TYPE = "vit_t"
FRAMES = "bacteria_tracking/data/bacteria/img/t{t:06d}.tif"
TRA = "bacteria_tracking/data/bacteria/TRA/man_track{t:06d}.tif"
N_FRAMES = 6
CROP = {"y": [688, 816], "x": [408, 536]}
MOTHER, DAUGHTERS, OTHER = 2, (5, 6), 3  # ground-truth tracks: 2 (frames 0-2) divides into 5 and 6 (frames 3-)
PROJECTIONS = ("box", "mask", "points", "points_and_mask", "single_point")
# µSAM's tracking annotator (SegmentNDWidget): projection, IoU threshold, box extension, motion smoothing
DEFAULTS = {"projection": "single_point", "iou_threshold": 0.5, "box_extension": 0.05, "motion_smoothing": 0.5}

# track_from_prompts on ground-truth masks: name -> (gt track, annotated frames, division frame or None,
# stop frame or None, projection, iou_threshold, motion_smoothing, box_extension)
MASK_CASES = {f"one_frame_{p}": (MOTHER, [0], None, None, p, 0.0, 0.5, 0.05) for p in PROJECTIONS}
MASK_CASES.update({
    "one_frame_default": (MOTHER, [0], None, None, "single_point", 0.5, 0.5, 0.05),
    "iou_low": (OTHER, [1], None, None, "mask", 0.2, 0.5, 0.0),
    "two_frames": (OTHER, [1, 4], None, None, "mask", 0.5, 0.5, 0.05),
    "smoothing_0": (OTHER, [1], None, None, "box", 0.0, 0.0, 0.05),
    "smoothing_0.9": (OTHER, [1], None, None, "box", 0.0, 0.9, 0.05),
    "division": (MOTHER, [0, 2], 2, None, "mask", 0.0, 0.5, 0.05),
    "stop": (OTHER, [1], None, 4, "points", 0.0, 0.5, 0.05),
})


def crop_frames(data: Path):
    """(frames (6, 128, 128) uint8, ground-truth track labels (6, 128, 128))."""
    import tifffile

    sl = (slice(*CROP["y"]), slice(*CROP["x"]))
    frames = np.stack([tifffile.imread(data / FRAMES.format(t=t))[sl] for t in range(N_FRAMES)])
    labels = np.stack([tifffile.imread(data / TRA.format(t=t))[sl] for t in range(N_FRAMES)])
    return np.ascontiguousarray(frames), labels


def _inner_point(mask: np.ndarray):
    """[x, y] of the pixel of ``mask`` farthest from its boundary (integers)."""
    from scipy import ndimage

    y, x = np.unravel_index(int(ndimage.distance_transform_edt(mask).argmax()), mask.shape)
    return [int(x), int(y)]


def _box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def prompt_file(labels: np.ndarray) -> dict:
    """The prompt file of the prompt cases (our tracking format: points [x, y], box [x0, y0, x1, y1]): track 1
    (gt 2) by a point on frame 0 and a point marking its division on frame 2; its daughters 2 (gt 5, a box) and
    3 (gt 6, a positive and a negative point) on frame 3; track 4 (gt 3) by a box and a point on frame 1."""
    d1, d2 = (labels[3] == d for d in DAUGHTERS)
    return {"objects": [
        {"t": 0, "track": 1, "points": [_inner_point(labels[0] == MOTHER)], "labels": [1]},
        {"t": 2, "track": 1, "points": [_inner_point(labels[2] == MOTHER)], "labels": [1], "division": True},
        {"t": 3, "track": 2, "parent": 1, "box": _box(d1)},
        {"t": 3, "track": 3, "parent": 1, "points": [_inner_point(d2), _inner_point(d1)], "labels": [1, 0]},
        {"t": 1, "track": 4, "points": [_inner_point(labels[1] == OTHER)], "labels": [1],
         "box": _box(labels[1] == OTHER)},
    ]}


# prompt cases: name -> the annotator's settings
PROMPT_CASES = {"default": DEFAULTS, "no_stop": dict(DEFAULTS, iou_threshold=0.0, projection="mask")}


class _Points:
    """Stands in for napari's Points layer: data (n, 3) (t, y, x), properties label / track_id / state."""

    def __init__(self, rows):
        self.data = np.array([r[0] for r in rows], dtype=np.float64).reshape(-1, 3)
        self.properties = {"label": np.array([r[1] for r in rows], dtype=object),
                           "track_id": np.array([str(r[2]) for r in rows], dtype=object),
                           "state": np.array([r[3] for r in rows], dtype=object)}


class _Shapes:
    """Stands in for napari's Shapes layer of rectangles: data [(4, 3) corners (t, y, x)], properties."""

    def __init__(self, rows):
        self.data = [np.array(r[0], dtype=np.float64) for r in rows]
        self.shape_type = ["rectangle"] * len(rows)
        self.properties = {"track_id": np.array([str(r[1]) for r in rows], dtype=object),
                           "state": np.array([r[2] for r in rows], dtype=object)}


def annotator_layers(objects):
    """The napari layers the tracking annotator would hold for our prompt file's objects."""
    points, boxes = [], []
    for o in objects:
        state = "division" if o.get("division") else "track"
        for (x, y), lab in zip(o.get("points", []), o.get("labels", [1] * len(o.get("points", [])))):
            points.append(((o["t"], y, x), "positive" if lab == 1 else "negative", o["track"], state))
        if "box" in o:
            x0, y0, x1, y1 = o["box"]
            t = o["t"]
            boxes.append(([[t, y0, x0], [t, y0, x1], [t, y1, x1], [t, y1, x0]], o["track"], state))
    return _Points(points), _Shapes(boxes)


def load_annotator_util():
    """micro_sam.sam_annotator.util without the package __init__ (napari annotators), napari stubbed."""
    import micro_sam

    class _Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    napari = _Anything("napari")
    napari.layers = _Anything("napari.layers")
    sys.modules.setdefault("napari", napari)
    sys.modules.setdefault("napari.layers", napari.layers)
    pkg_dir = Path(micro_sam.__file__).parent / "sam_annotator"
    pkg = types.ModuleType("micro_sam.sam_annotator")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["micro_sam.sam_annotator"] = pkg
    spec = importlib.util.spec_from_file_location("micro_sam.sam_annotator.util", pkg_dir / "util.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    shim_info = setup_imports()

    import torch
    from micro_sam import util

    from usam_bioimageio.modeling import seeded_sam
    from volume_prompt_reference import state_sha256

    vutil = load_annotator_util()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    frames, gt = crop_frames(args.data)
    prompts = prompt_file(gt)
    arrays, meta = {}, {
        "model_type": MODEL_TYPE, "sam_seed": SAM_SEED, "frames": FRAMES, "tra": TRA, "n_frames": N_FRAMES,
        "crop": CROP, "defaults": DEFAULTS, "prompt_file": prompts, "mask": {}, "prompts": {},
        "versions": {p: metadata.version(p) for p in ("micro_sam", "torch", "numpy", "scikit-image", "scipy",
                                                       "bioimage-cpp", "mobilesam-mirror")},
        "torchvision": shim_info, "python": platform.python_version(),
        "script": "scripts/tracking_prompt_reference.py",
    }
    sam_state = seeded_sam(MODEL_TYPE, seed=SAM_SEED).state_dict()
    meta["sam_state_sha256"] = state_sha256(sam_state)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "vit_t.pt"
        torch.save(sam_state, ckpt)
        predictor = util.get_sam_model(model_type=MODEL_TYPE, checkpoint_path=ckpt, device="cpu")
    meta["refreshed_attention_bias_cache_max_change"] = refresh_attention_bias_cache(predictor.model)
    with torch.no_grad():
        embeddings = util.precompute_image_embeddings(predictor, frames, ndim=3, verbose=False)

        for name, (track, annotated, division, stop, projection, iou, smoothing, ext) in MASK_CASES.items():
            seg = np.zeros(frames.shape, "uint32")
            seg[annotated] = gt[annotated] == track
            slices = sorted(annotated + ([stop] if stop is not None else []))
            rows = [((t, 0, 0), "positive", 1, "division" if t == division else "track") for t in slices]
            out, has_division = vutil.track_from_prompts(
                _Points(rows), None, seg, predictor, np.array(slices), embeddings, stop is not None,
                threshold=iou, projection=projection, motion_smoothing=smoothing, box_extension=ext)
            arrays[f"mask_{name}"] = np.packbits(out == 1)
            meta["mask"][name] = {
                "gt_track": track, "annotated": annotated, "division": division, "stop": stop,
                "projection": projection, "iou_threshold": iou, "motion_smoothing": smoothing,
                "box_extension": ext, "has_division": bool(has_division),
                "pixels_per_frame": (out == 1).sum(axis=(1, 2)).tolist(),
            }
            print(f"mask {name}: division {has_division}, px {meta['mask'][name]['pixels_per_frame']}")

        for name, settings in PROMPT_CASES.items():
            points, boxes = annotator_layers(prompts["objects"])
            labels = np.zeros(frames.shape, "uint32")
            lineage = {1: []}  # the annotator's state: track 1 exists from the start
            for track in sorted({o["track"] for o in prompts["objects"]}):
                lineage.setdefault(track, [])
                seg, slices, _, stop_upper = vutil.segment_slices_with_prompts(
                    predictor, points, boxes, embeddings, frames.shape, track_id=track)
                seg, has_division = vutil.track_from_prompts(
                    points, boxes, seg, predictor, slices, embeddings, stop_upper,
                    threshold=settings["iou_threshold"], projection=settings["projection"],
                    motion_smoothing=settings["motion_smoothing"], box_extension=settings["box_extension"])
                if has_division and not lineage[track]:  # _widgets._update_lineage
                    lineage[track] = [track + 1, track + 2]
                    lineage[track + 1], lineage[track + 2] = [], []
                labels[labels == track] = 0
                labels[seg == 1] = track
            arrays[f"prompts_{name}"] = labels.astype("uint8")
            meta["prompts"][name] = {
                "settings": settings, "lineage": {str(k): v for k, v in sorted(lineage.items())},
                "pixels_per_frame": {str(k): (labels == k).sum(axis=(1, 2)).tolist() for k in sorted(lineage)},
            }
            print(f"prompts {name}: lineage {lineage}, px {meta['prompts'][name]['pixels_per_frame']}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out_dir / "results.npz", **arrays)
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out_dir} ({(args.out_dir / 'results.npz').stat().st_size} bytes of results)")


if __name__ == "__main__":
    main()
