"""Write tests/data/volume_prompt_reference/: µSAM's segment_from_mask and segment_mask_in_volume on seeded weights.

Run it with the python of the reference venv (scripts/micro_sam_venv.sh: micro-sam 1.8.14, mobile_sam for vit_t):
``/tmp/usam-ais-ref/bin/python scripts/volume_prompt_reference.py tests/data/volume_prompt_reference``.

The SAM is the seeded random vit_t of the tests (``usam_bioimageio.modeling.seeded_sam("vit_t", seed=0)``, the
``vit_t_family`` fixture's), saved as a checkpoint and loaded by µSAM (``util.get_sam_model``); MobileSAM's stale
attention-bias cache is refreshed (scripts/micro_sam_env.py, as scripts/ais_decoder_reference.py does), so µSAM's
encoder computes with the loaded weights as our packages do. The image: a crop of GoNuclear (CC BY 4.0)
``1135_mini_raw.tif`` (7 slices x 64 x 64 around nucleus 27); the object masks come from its ground truth.
µSAM's own embeddings (``util.precompute_image_embeddings``) feed µSAM's own functions:

* ``prompt_*`` / ``meta.json["prompts"]``: the prompts µSAM derives from masks (``_compute_box_from_mask``,
  ``_compute_points_from_mask``, ``_compute_logits_from_mask``) for label masks of several image sizes: no model;
  ``meta.json["sweep"]``: the same for every object of a few label slices (the mask prompt as a sha256).
* ``from_mask_<case>``: ``segment_from_mask`` on slice 3 with each prompt combination (packed bits, 64 x 64).
* ``volume_<case>_<projection>``: ``segment_mask_in_volume`` (packed bits, 7 x 64 x 64) and its (z_min, z_max)
  in meta.json, for every projection mode, from one or several annotated ground-truth slices.
* ``tiled_from_mask_<case>`` / ``tiled_volume_<case>_<projection>``: the same on tiled embeddings of the crop
  (``TILE``, ``HALO``: micro-sam's tiling, each tile its own encoder run).

Only results are stored (well under 1 MB), no weights: the test rebuilds the weights and checks their sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from micro_sam_env import refresh_attention_bias_cache, setup_imports  # noqa: E402

SAM_SEED = 0
MODEL_TYPE = "vit_t"
RAW, LABELS = "gonuclear3d/1135_mini_raw.tif", "gonuclear3d/1135_mini_labels.tif"
CROP = {"z": [66, 73], "y": [0, 64], "x": [0, 64]}
OBJECT = 27
FROM_MASK_SLICE = 3
PROJECTIONS = ("box", "mask", "points", "points_and_mask", "single_point")
# segment_from_mask on slice FROM_MASK_SLICE: name -> keyword arguments (µSAM's names)
FROM_MASK_CASES = {
    "box": {"use_box": True, "use_mask": False, "use_points": False},
    "box_mask": {"use_box": True, "use_mask": True, "use_points": False},
    "mask": {"use_box": False, "use_mask": True, "use_points": False},
    "points": {"use_box": False, "use_mask": False, "use_points": True},
    "points_mask": {"use_box": False, "use_mask": True, "use_points": True},
    "box_points": {"use_box": True, "use_mask": False, "use_points": True},
    "box_points_mask": {"use_box": True, "use_mask": True, "use_points": True},
    "single_point": {"use_box": False, "use_mask": False, "use_points": True, "use_single_point": True},
    "box_ext_frac": {"use_box": True, "use_mask": False, "use_points": False, "box_extension": 0.1},
    "box_ext_px_points": {"use_box": True, "use_mask": True, "use_points": True, "box_extension": 2},
}
# segment_mask_in_volume: name -> (annotated slices, iou_threshold, stop_lower, stop_upper, box_extension,
# projection modes). The seeded random SAM segments small blobs, so IoU 0.5 stops at once, 0.1 on one side and
# 0 never; masks often vanish between annotated slices (then µSAM decodes without point or box prompts).
VOLUME_CASES = {
    "middle": ([3], 0.5, False, False, 0.0, PROJECTIONS),
    "middle_low": ([3], 0.1, False, False, 0.05, ("box", "mask")),  # a low threshold, with a box extension
    "middle_no_stop": ([3], 0.0, False, False, 0.05, PROJECTIONS),
    "three": ([1, 3, 6], 0.5, False, False, 0.0, PROJECTIONS),  # gaps of 2 (one slice) and 3 (odd)
    "even_gap": ([1, 5], 0.5, False, False, 0.0, PROJECTIONS),  # the middle slice from its two neighbours
    "stop_upper": ([2, 6], 0.5, False, True, 0.0, ("mask", "single_point")),
    "stop_lower": ([2, 6], 0.5, True, False, 0.0, ("mask", "single_point")),
}
# tiled embeddings (micro-sam's tiling, each tile encoded on its own): tile and halo (y, x) on the 64 x 64 crop
# (3 x 3 tiles, outer blocks up to 40 x 40, so the object is cut to its tile's outer block); segment_from_mask on
# FROM_MASK_SLICE and segment_mask_in_volume as above
TILE, HALO = (24, 24), (8, 8)
TILED_FROM_MASK_CASES = ("box", "mask", "points", "box_points_mask", "single_point")
TILED_VOLUME_CASES = {
    "middle_no_stop": ([3], 0.0, False, False, 0.05, ("box", "mask", "points_and_mask", "single_point")),
    "three": ([1, 3, 6], 0.5, False, False, 0.0, ("mask", "points")),
}
# prompt derivation only: a ground-truth label slice z cropped to [y0:y1, x0:x1], zero-padded by `pad` on every
# side: (z, y0, y1, x0, x1, object, box_extension, pad)
PROMPT_CASES = {
    "square_100": (69, 0, 100, 0, 100, 27, 0.0, 0),
    "wide_50x80": (40, 10, 60, 0, 80, 28, 0.0, 0),
    "tall_90x40": (40, 5, 95, 40, 80, 28, 0.05, 0),
    "edge_64": (35, 0, 64, 0, 64, 14, 3, 0),
    "padded_300": (69, 0, 100, 0, 100, 27, 0.0, 100),  # 300 x 300: downscaled to 256, non-dyadic weights
}


# prompt derivation sweep: every object of these label slices, in three image shapes (as is, cut to 50 x 80,
# zero-padded to 270 x 137), box extensions cycling through SWEEP_EXTENSIONS; only the prompts are stored
SWEEP_SLICES = (35, 50, 69)
SWEEP_EXTENSIONS = (0.0, 0.05, 3, 0.2)


def sweep_masks(data: Path):
    """(name, mask, box_extension) for the prompt sweep, in a fixed order."""
    import tifffile

    labels = tifffile.imread(data / LABELS)
    i = 0
    for z in SWEEP_SLICES:
        for obj in np.unique(labels[z])[1:]:
            mask = labels[z] == obj
            for variant, m in (("full", mask), ("cut", mask[:50, :80]), ("padded", np.pad(mask, ((0, 170), (0, 37))))):
                if m.any():
                    yield f"z{z}_obj{obj}_{variant}", m, SWEEP_EXTENSIONS[i % len(SWEEP_EXTENSIONS)]
                    i += 1


def state_sha256(state) -> str:
    """sha256 over the sorted keys, dtypes, shapes and raw bytes of a state dict (as ais_decoder_reference)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def crop_volume(data: Path):
    import tifffile

    sl = tuple(slice(*CROP[a]) for a in "zyx")
    raw = tifffile.imread(data / RAW)[sl]
    labels = tifffile.imread(data / LABELS)[sl]
    return np.ascontiguousarray(raw), labels == OBJECT


def prompt_case_mask(data: Path, case):
    import tifffile

    z, y0, y1, x0, x1, obj, _, pad = case
    return np.pad(tifffile.imread(data / LABELS)[z, y0:y1, x0:x1] == obj, pad)


def _cases(predictor, embeddings, gt, from_mask_names, volume_cases: dict, prefix: str, arrays: dict) -> dict:
    """micro-sam's segment_from_mask and segment_mask_in_volume cases on these embeddings: the masks into
    ``arrays`` (keys ``prefix + from_mask_NAME`` / ``prefix + volume_NAME_PROJECTION``), their sizes as meta."""
    from micro_sam.multi_dimensional_segmentation import segment_mask_in_volume
    from micro_sam.prompt_based_segmentation import segment_from_mask

    meta = {"from_mask": {}, "volume": {}}
    for name in from_mask_names:
        mask = segment_from_mask(predictor, gt[FROM_MASK_SLICE].astype("uint8"), image_embeddings=embeddings,
                                 i=FROM_MASK_SLICE, **FROM_MASK_CASES[name])
        arrays[f"{prefix}from_mask_{name}"] = np.packbits(np.asarray(mask[0], bool))
        meta["from_mask"][name] = int(mask.sum())
        print(f"{prefix}from_mask {name}: {int(mask.sum())} px (gt {int(gt[FROM_MASK_SLICE].sum())})")
    for name, (annotated, iou, stop_lower, stop_upper, ext, projections) in volume_cases.items():
        for projection in projections:
            seg = np.zeros(gt.shape, "uint8")
            seg[annotated] = gt[annotated]
            seg, (z_min, z_max) = segment_mask_in_volume(
                seg, predictor, embeddings, np.array(annotated), stop_lower=stop_lower, stop_upper=stop_upper,
                iou_threshold=iou, projection=projection, box_extension=ext)
            key = f"{name}_{projection}"
            arrays[f"{prefix}volume_{key}"] = np.packbits(seg.astype(bool))
            meta["volume"][key] = {
                "annotated": annotated, "iou_threshold": iou, "stop_lower": stop_lower, "stop_upper": stop_upper,
                "box_extension": ext, "projection": projection, "z_range": [int(z_min), int(z_max)],
                "pixels_per_slice": seg.astype(bool).sum(axis=(1, 2)).tolist(),
            }
            print(f"{prefix}volume {key}: z {z_min}..{z_max}, px {meta['volume'][key]['pixels_per_slice']}")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    shim_info = setup_imports()

    import torch
    from micro_sam import util
    from micro_sam.prompt_based_segmentation import (_compute_box_from_mask, _compute_logits_from_mask,
                                                     _compute_points_from_mask)

    from usam_bioimageio.modeling import seeded_sam

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    arrays, meta = {}, {
        "model_type": MODEL_TYPE, "sam_seed": SAM_SEED, "raw": RAW, "labels": LABELS, "crop": CROP,
        "object": OBJECT, "from_mask_slice": FROM_MASK_SLICE, "from_mask": FROM_MASK_CASES,
        "volume": {}, "prompts": {},
        "versions": {p: metadata.version(p) for p in ("micro_sam", "torch", "numpy", "scikit-image", "scipy",
                                                       "bioimage-cpp", "mobilesam-mirror")},
        "torchvision": shim_info, "python": platform.python_version(),
        "script": "scripts/volume_prompt_reference.py",
    }

    # prompts µSAM derives from masks (no model)
    for name, case in PROMPT_CASES.items():
        mask = prompt_case_mask(args.data, case).astype("uint8")
        ext = case[6]
        box = _compute_box_from_mask(mask, box_extension=ext)
        pts, lab = _compute_points_from_mask(mask, original_size=None, box_extension=ext)
        single, _ = _compute_points_from_mask(mask, original_size=None, box_extension=ext, use_single_point=True)
        logits = _compute_logits_from_mask(mask)[0]
        arrays[f"prompt_{name}_mask"] = np.packbits(mask.astype(bool))
        arrays[f"prompt_{name}_logits"] = np.packbits(logits > 0)
        meta["prompts"][name] = {
            "case": list(case), "shape": list(mask.shape), "box_extension": ext, "box": box.tolist(),
            "points": np.asarray(pts, float).tolist(), "labels": np.asarray(lab).tolist(),
            "single_point": np.asarray(single, float).tolist(), "logits_values": sorted(set(logits.ravel().tolist())),
        }

    meta["sweep"] = {}
    for name, mask, ext in sweep_masks(args.data):
        m = mask.astype("uint8")
        pts, lab = _compute_points_from_mask(m, original_size=None, box_extension=ext)
        single, _ = _compute_points_from_mask(m, original_size=None, box_extension=ext, use_single_point=True)
        meta["sweep"][name] = {
            "box": _compute_box_from_mask(m, box_extension=ext).tolist(), "points": np.asarray(pts, float).tolist(),
            "labels": np.asarray(lab).tolist(), "single_point": np.asarray(single, float).tolist(),
            "logits_sha256": hashlib.sha256(np.packbits(_compute_logits_from_mask(m)[0] > 0).tobytes()).hexdigest(),
        }

    volume, gt = crop_volume(args.data)
    meta["volume_shape"] = list(volume.shape)
    sam_state = seeded_sam(MODEL_TYPE, seed=SAM_SEED).state_dict()
    meta["sam_state_sha256"] = state_sha256(sam_state)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "vit_t.pt"
        torch.save(sam_state, ckpt)
        predictor = util.get_sam_model(model_type=MODEL_TYPE, checkpoint_path=ckpt, device="cpu")
    meta["refreshed_attention_bias_cache_max_change"] = refresh_attention_bias_cache(predictor.model)
    with torch.no_grad():
        embeddings = util.precompute_image_embeddings(predictor, volume, ndim=3, verbose=False)
        meta["embeddings_abs_mean"] = [float(np.abs(np.asarray(embeddings["features"][z])).mean())
                                       for z in range(len(volume))]

        untiled = _cases(predictor, embeddings, gt, list(FROM_MASK_CASES), VOLUME_CASES, "", arrays)
        meta["volume"] = untiled["volume"]
        # the same on tiled embeddings
        tiled = util.precompute_image_embeddings(predictor, volume, ndim=3, tile_shape=TILE, halo=HALO,
                                                 verbose=False)
        meta["tiled"] = {"tile_shape": list(TILE), "halo": list(HALO),
                         **_cases(predictor, tiled, gt, TILED_FROM_MASK_CASES, TILED_VOLUME_CASES, "tiled_", arrays)}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out_dir / "results.npz", **arrays)
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out_dir} ({(args.out_dir / 'results.npz').stat().st_size} bytes of results)")


if __name__ == "__main__":
    main()
