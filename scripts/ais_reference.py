"""Write tests/data/ais_reference/*.npz: µSAM's AIS post-processing on maps made from real label images.

Run it with scripts/regenerate_ais_reference.sh, which creates the environment it needs (micro-sam 1.8.14,
torch-em, python-elf, bioimage-cpp). Usage: python scripts/ais_reference.py OUT_DIR [--data SHARED_DATA_DIR]

Each fixture holds, for one crop of a real ground-truth label image:
- ``maps_u16`` (3, H, W) uint16; the maps given to µSAM are ``maps_u16.astype(float32) / float32(65535)``:
  foreground, centre distances, boundary distances as µSAM's decoder is trained to predict them, i.e.
  ``torch_em.transform.label.PerObjectDistanceTransform`` with µSAM's training arguments (style "target"),
  or those targets blurred and with noise, to look like a network prediction (style "degraded");
- ``labels_<i>``: the label image returned by ``InstanceSegmentationWithDecoder.generate(**params[i])``
  (after ``set_state`` with the maps, no tiling), as uint16;
- ``masks_<i>`` (n, 6) int64 for the first parameter set: µSAM's ``output_mode="binary_mask"`` list as rows
  (seg_id, area, bbox x0, width, y0, height);
- optionally ``smoothed_<name>``: ``bioimage_cpp.filters.gaussian_smoothing`` outputs, the filter µSAM calls;
- ``meta``: JSON with the source, crop, recipe, parameter sets and package versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np


def _import_reference():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from micro_sam_env import setup_imports

    torchvision_info = setup_imports()  # torchvision, or stand-ins: unused by the AIS post-processing
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
    from torch_em.transform.label import PerObjectDistanceTransform
    import bioimage_cpp
    return InstanceSegmentationWithDecoder, PerObjectDistanceTransform, bioimage_cpp, torchvision_info


# µSAM's per-model settings (micro_sam._model_settings.AIS_SETTINGS), as generate() arguments.
_PRESETS = {
    "vit_b_lm": dict(center_distance_threshold=0.4, boundary_distance_threshold=0.5, distance_smoothing=2.0,
                     min_size=100),
    "vit_h_lm": dict(center_distance_threshold=0.5, boundary_distance_threshold=0.5, distance_smoothing=1.4,
                     min_size=100),
    "vit_b_em_organelles": dict(center_distance_threshold=0.3, boundary_distance_threshold=0.4,
                                distance_smoothing=1.2, min_size=100),
}
_DEFAULT: dict = {}  # generate()'s defaults
_NO_SMOOTHING = dict(foreground_smoothing=0.0, distance_smoothing=0.0)
_VARIANT = dict(center_distance_threshold=0.45, boundary_distance_threshold=0.55, foreground_threshold=0.4,
                foreground_smoothing=0.7, distance_smoothing=1.0, min_size=15)

CROP = 128


def _read_tif(path: Path) -> np.ndarray:
    import tifffile
    return tifffile.imread(str(path))


def _densest_window(labels: np.ndarray, size: int, step: int = 16):
    """The size x size window (top-left on a grid of ``step``) with the most label ids; the first one wins."""
    height, width = labels.shape
    best = None
    for y in range(0, max(height - size, 0) + 1, step):
        for x in range(0, max(width - size, 0) + 1, step):
            window = labels[y:y + size, x:x + size]
            n = len(np.unique(window[window > 0]))
            if best is None or n > best[0]:
                best = (n, y, x)
    _, y, x = best
    return y, x


def _sources(data: Path):
    """(name, relative path, 2D labels, note) for each crop source: real ground truth only."""
    index = json.loads((data / "dsb2018" / "index.json").read_text())
    for kind in ("fluorescence", "color", "brightfield_gray"):
        candidates = [e for e in index if e["kind"].startswith(kind) and min(e["shape"][:2]) >= CROP]
        entry = max(candidates, key=lambda e: (e["n_objects"], e["id"]))
        rel = f"dsb2018/labels/{entry['id']}.tif"
        yield f"dsb2018_{kind}", rel, _read_tif(data / rel), f"DSB2018 {entry['kind']} image with most nuclei"
    rel = "stardist_samples/tests_mask2d.tif"
    yield "stardist_nuclei", rel, _read_tif(data / rel), "StarDist sample (DSB2018 origin) nuclei"
    # bacteria_tracking and isbi2012_em are "research use" data: no fixtures derived from them are committed.
    rel = "gonuclear3d/1135_mini_labels.tif"
    yield "gonuclear3d_z50", rel, _read_tif(data / rel)[50], "GoNuclear 3D nuclei labels, slice z=50"


# Which map styles and parameter sets to use for each source (keeps the fixtures small but varied).
_PLAN = {
    "dsb2018_fluorescence": (["target", "degraded"], [_DEFAULT, _PRESETS["vit_b_lm"], _NO_SMOOTHING, _VARIANT]),
    "dsb2018_color": (["degraded"], [_DEFAULT, _PRESETS["vit_h_lm"], _VARIANT]),
    "dsb2018_brightfield_gray": (["degraded"], [_DEFAULT, _NO_SMOOTHING]),
    "stardist_nuclei": (["target", "degraded"], [_DEFAULT, _PRESETS["vit_b_lm"], _NO_SMOOTHING, _VARIANT]),
    "gonuclear3d_z50": (["target"], [_DEFAULT, _VARIANT]),
}


def _make_maps(labels: np.ndarray, style: str, transform_cls, seed: int):
    """Decoder-like maps for a label crop, quantised to uint16 (the exact input is q / 65535 in float32)."""
    from scipy import ndimage
    transform = transform_cls(  # µSAM's training target (micro_sam.training.training.default_sam_dataset)
        distances=True, boundary_distances=True, directed_distances=False, foreground=True, instances=False,
        min_size=25,
    )
    maps = transform(labels).astype(np.float64)
    assert maps.shape == (3,) + labels.shape, maps.shape
    if style == "degraded":
        rng = np.random.default_rng(seed)
        maps = np.stack([ndimage.gaussian_filter(m, 1.0, mode="nearest") for m in maps])
        maps = maps + rng.normal(0.0, 0.04, size=maps.shape)
    elif style != "target":
        raise ValueError(style)
    q = np.round(np.clip(maps, 0.0, 1.0) * 65535).astype(np.uint16)
    return q


def _as_float(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / np.float32(65535)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    args = parser.parse_args()

    segmenter_cls, transform_cls, bic, torchvision_info = _import_reference()
    versions = {name: metadata.version(name) for name in (
        "micro_sam", "torch_em", "python-elf", "bioimage-cpp", "numpy", "scipy", "scikit-image", "torch")}
    versions["torchvision"] = torchvision_info
    backend = bic._core._filters_convolution_backend()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for seed, (name, rel, labels, note) in enumerate(_sources(args.data)):
        styles, param_sets = _PLAN[name]
        labels = np.asarray(labels)
        y, x = _densest_window(labels, CROP)
        crop = labels[y:y + CROP, x:x + CROP].astype(np.uint32)
        for style in styles:
            q = _make_maps(crop, style, transform_cls, seed)
            maps = _as_float(q)
            segmenter = segmenter_cls(predictor=None, decoder=None)
            segmenter.set_state({"foreground": maps[0], "center_distances": maps[1], "boundary_distances": maps[2]})
            arrays = {"maps_u16": q}
            counts = []
            for i, params in enumerate(param_sets):
                result = segmenter.generate(**params)
                assert result.max() < 2 ** 16
                arrays[f"labels_{i}"] = result.astype(np.uint16)
                counts.append(int(result.max()))
            masks = segmenter.generate(**param_sets[0], output_mode="binary_mask")
            arrays["masks_0"] = np.array(
                [[m["seg_id"], m["area"], *m["bbox"]] for m in masks], dtype=np.int64).reshape(-1, 6)
            if name == "stardist_nuclei" and style == "degraded":
                arrays["smoothed_foreground_sigma1.0"] = bic.filters.gaussian_smoothing(maps[0], 1.0)
                arrays["smoothed_boundary_sigma1.6"] = bic.filters.gaussian_smoothing(maps[2], 1.6)
            meta = {
                "reference": "micro_sam.instance_segmentation.InstanceSegmentationWithDecoder(predictor=None, "
                             "decoder=None).set_state({foreground, center_distances, boundary_distances}); "
                             ".generate(**params) (untiled); masks_0 from output_mode='binary_mask'",
                "source": f"shared/data/{rel}",
                "source_note": note,
                "crop_yx": [int(y), int(x)],
                "crop_shape": list(crop.shape),
                "n_gt_objects": int(len(np.unique(crop[crop > 0]))),
                "map_style": style,
                "map_recipe": (
                    "torch_em PerObjectDistanceTransform(distances=True, boundary_distances=True, "
                    "directed_distances=False, foreground=True, instances=False, min_size=25) of the crop"
                    + ("; each channel scipy gaussian_filter(sigma=1, mode='nearest') + normal noise sd 0.04 "
                       f"(numpy default_rng({seed}))" if style == "degraded" else "")
                    + "; clipped to 0..1, quantised: maps = maps_u16.astype(float32) / float32(65535)"
                ),
                "params": param_sets,
                "n_objects": counts,
                "bioimage_cpp_convolution_backend": backend,
                "versions": versions,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
            arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
            path = args.out_dir / f"{name}_{style}.npz"
            np.savez_compressed(path, **arrays)
            written.append(path)
            print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB, objects {counts} (gt {meta['n_gt_objects']})")
    total = sum(p.stat().st_size for p in written)
    print(f"{len(written)} fixtures, {total / 1024:.0f} KiB in total; convolution backend {backend}")


if __name__ == "__main__":
    main()
