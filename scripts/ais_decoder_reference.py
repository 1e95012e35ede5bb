"""Write tests/data/ais_decoder_reference/maps.npz: µSAM's own AIS decoder maps for seeded test weights.

Run it in the reference environment of scripts/regenerate_ais_reference.sh (micro-sam 1.8.14, torch-em 0.10.9,
plus mobilesam-mirror for vit_t), e.g. ``scripts/regenerate_ais_reference.sh`` (which calls it) or
``/tmp/usam-ais-ref/bin/python scripts/ais_decoder_reference.py tests/data/ais_decoder_reference``.

For every case: a seeded random vit_t SAM (``usam_bioimageio.modeling.seeded_sam``) and a seeded random AIS
decoder state (``usam_bioimageio.modeling.unetr.seeded_ais_decoder_state``; both drawn from a
``SeededDraws``, numpy draws: the same bits on every machine) are saved as a µSAM checkpoint
``{"model_state", "decoder_state"}`` and loaded by µSAM itself: ``micro_sam.instance_segmentation
.get_predictor_and_decoder`` (mobile_sam's SAM, torch_em's UNETR) and ``InstanceSegmentationWithDecoder
.initialize(image)``, whose foreground / centre distance / boundary distance maps are stored. Only the maps
and the seeds are stored, no weights: the test rebuilds the weights and checks their sha256.

Two µSAM behaviours matter here. The decoder: µSAM never calls ``eval()`` on the UNETR, so its BatchNorm
layers normalise with batch statistics; this is kept (it is what µSAM computes, and what
``usam_bioimageio.modeling.unetr`` reproduces by default). The vit_t encoder: MobileSAM caches its attention
bias tables at ``eval()``, which happens before µSAM loads the weights, so µSAM's vit_t ignores the loaded
attention biases; the script refreshes that cache, so that the reference encoder computes with the loaded
weights (as ours does) and the comparison is about the decoder.

Stored: ``maps_<case>`` (3, H, W) uint16 = round(maps * 65535) (quantisation error <= 7.7e-6), and ``meta``
(JSON): seeds, the image of each case (file under the shared data folder, crop), the state sha256s, µSAM's
decoder state layout (key -> shape, both variants), versions.

torchvision / timm: the project's test stand-ins (tests/_shims) provide the few functions SAM's preprocessing
and MobileSAM's TinyViT use (PIL resize, DropPath, ...); other torchvision modules micro_sam / torch_em import
at module level (training loggers) become stubs that raise if called.
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
# case name -> image file (relative to the shared data folder), crop (y0, y1, x0, x1) or None, decoder seed,
# use_conv_transpose
CASES = {
    "stardist_256": ("stardist_samples/tests_img2d.tif", None, 1, False),
    "dsb_rgb_crop": ("dsb2018/images/01d44a26f6680c42ba94c9bc6339228579a95d0e2695b149b7cc0c9592b21baf.png",
                     (20, 220, 10, 260), 1, False),
    "stardist_crop_convtranspose": ("stardist_samples/tests_img2d.tif", (40, 136, 60, 188), 2, True),
}


def state_sha256(state) -> str:
    """sha256 over the sorted keys, dtypes, shapes and raw bytes of a state dict."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_case_image(data: Path, file: str, crop):
    import imageio.v3 as iio
    import tifffile

    path = data / file
    image = tifffile.imread(path) if path.suffix in (".tif", ".tiff") else iio.imread(path)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if crop is not None:
        y0, y1, x0, x1 = crop
        image = image[y0:y1, x0:x1]
    return np.ascontiguousarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    shim_info = setup_imports()

    import torch
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder, get_predictor_and_decoder, get_unetr

    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    sam_state = seeded_sam(MODEL_TYPE, seed=SAM_SEED).state_dict()
    arrays = {}
    meta = {
        "model_type": MODEL_TYPE,
        "sam_seed": SAM_SEED,
        "sam_state_sha256": state_sha256(sam_state),
        "cases": {},
        "layout": {},
        "scale": 65535,
        "versions": {p: metadata.version(p) for p in ("micro_sam", "torch_em", "torch", "numpy", "pillow",
                                                       "mobilesam-mirror", "segment-anything")},
        "torchvision": shim_info,
        "python": platform.python_version(),
        "script": "scripts/ais_decoder_reference.py",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (file, crop, seed, conv_t) in CASES.items():
            decoder_state = seeded_ais_decoder_state(MODEL_TYPE, seed, use_conv_transpose=conv_t)
            ckpt = Path(tmp) / f"{name}.pt"
            torch.save({"model_state": sam_state, "decoder_state": decoder_state}, ckpt)
            predictor, decoder = get_predictor_and_decoder(MODEL_TYPE, ckpt, device="cpu")
            # MobileSAM's TinyViT attention caches its bias table (``ab``) whenever eval() is called; mobile_sam's
            # build_sam_vit_t calls it before µSAM's get_sam_model loads the weights, and µSAM never calls it
            # again, so µSAM's vit_t runs with the zero-initialised attention biases instead of the loaded ones.
            # That is an encoder matter (reported separately); refresh the cache so that the reference encoder
            # uses the loaded weights, as ours does. The decoder (a separate module) stays as µSAM leaves it:
            # in training mode.
            stale = refresh_attention_bias_cache(predictor.model)
            if decoder.training is not True:
                raise SystemExit("µSAM's decoder is expected in training mode (get_unetr never calls eval())")
            # µSAM's decoder state layout: the UNETR's state dict without the encoder
            unetr = get_unetr(predictor.model.image_encoder, decoder_state, device="cpu")
            layout = {k: list(v.shape) for k, v in unetr.state_dict().items() if not k.startswith("encoder")}
            ours = {k: list(v.shape) for k, v in decoder_state.items()}
            if layout != ours:
                raise SystemExit(f"{name}: our decoder state layout differs from µSAM's: "
                                 f"{sorted(set(layout) ^ set(ours))[:10]}")
            meta["layout"]["conv_transpose" if conv_t else "interpolation"] = layout

            image = load_case_image(args.data, file, crop)
            segmenter = InstanceSegmentationWithDecoder(predictor, decoder)
            with torch.no_grad():
                segmenter.initialize(image)
            maps = np.stack([segmenter._foreground, segmenter._center_distances, segmenter._boundary_distances])
            assert maps.shape == (3,) + image.shape[:2], maps.shape
            arrays[f"maps_{name}"] = np.round(np.clip(maps, 0, 1) * 65535).astype(np.uint16)
            meta["cases"][name] = {
                "file": file, "crop": crop, "decoder_seed": seed, "use_conv_transpose": conv_t,
                "image_shape": list(image.shape), "decoder_state_sha256": state_sha256(decoder_state),
                "maps_min": float(maps.min()), "maps_max": float(maps.max()),
                "refreshed_attention_bias_cache_max_change": stale,
            }
            print(f"{name}: image {image.shape} {image.dtype} -> maps {maps.shape}, range "
                  f"[{maps.min():.4f}, {maps.max():.4f}], per-channel mean {maps.mean((1, 2)).round(3)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "maps.npz"
    np.savez_compressed(out, meta=np.asarray(json.dumps(meta, indent=1)), **arrays)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
