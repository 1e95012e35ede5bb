"""Time our automatic mask generation (usam_bioimageio.automatic.amg.generator) against segment_anything's.

Same weights, same image, same parameters, in one process, runs interleaved (ours, reference, ours, ...),
embeddings computed beforehand for both (the timed part is the mask generation: point-grid decoding,
filtering, NMS and the mask records). The reference is ``SamAutomaticMaskGenerator`` of mobile_sam
(vit_t) or segment_anything (vit_b / vit_l / vit_h), given µSAM's 8-bit version of the image, with its
``set_image`` replaced by restoring the precomputed features. The results are compared one to one
(count, smallest mask IoU) as a check that both did the same work.

    python benchmarks/bench_amg.py                              # seeded random vit_t, stardist sample
    python benchmarks/bench_amg.py --model-type vit_b --repeats 1
    python benchmarks/bench_amg.py --family DIR --checkpoint FILE.pt --image img.tif

Without ``--family`` a seeded random model (``usam_bioimageio.modeling.seeded_sam``) is exported once into
``--workdir`` (needs the ``export`` extra; a few minutes for vit_t). ``--checkpoint`` is any checkpoint
``usam_bioimageio.training.checkpoints.load_checkpoint`` reads. Timings on shared machines are noisy: the median of
the repeats and the ratio of medians are printed, with the CPU times (process time, all threads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from exports import is_current, mark_current  # benchmarks/exports.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # reference.py: segment_anything / mobile_sam with test-only shims

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "stardist_samples" / "tests_img2d.tif"
DSB = ROOT.parent / "shared" / "data" / "dsb2018"


def _random_family(model_type: str, workdir: Path):
    """(family folder, SAM state dict) of a seeded random model, exported once and reused while current."""
    import torch

    root = workdir / model_type
    family, state_file = root / "family", root / "sam_state.pt"
    if not is_current(family) or not state_file.is_file():
        from usam_bioimageio.modeling import seeded_sam
        from usam_bioimageio.training.checkpoints import save_checkpoint
        from usam_exporters.family import export_family

        root.mkdir(parents=True, exist_ok=True)
        state = seeded_sam(model_type, seed=0).state_dict()
        save_checkpoint(root / f"{model_type}.pt", sam_state=state)
        print(f"exporting a seeded random {model_type} into {family} ...", flush=True)
        export_family(checkpoint=root / f"{model_type}.pt", output_dir=family, name=f"{model_type}_random",
                      overwrite=True)
        mark_current(family)
        torch.save(state, state_file)
    return family, torch.load(state_file)


def _read_image(path: Path) -> np.ndarray:
    from usam_bioimageio.io.images import read_image

    return np.asarray(read_image(path))


def _reference_generator(model_type: str, state, image_u8: np.ndarray, params):
    """The reference SamAutomaticMaskGenerator with the image's features set once (embeddings given)."""
    from reference import build_reference_sam, mobile_sam, segment_anything

    sam = build_reference_sam(model_type, state)
    pkg = mobile_sam() if model_type == "vit_t" else segment_anything()
    generator = pkg.SamAutomaticMaskGenerator(
        sam,
        points_per_side=params.points_per_side,
        points_per_batch=params.points_per_batch,
        pred_iou_thresh=params.pred_iou_thresh,
        stability_score_thresh=params.stability_score_thresh,
        stability_score_offset=params.stability_score_offset,
        box_nms_thresh=params.box_nms_thresh,
        crop_n_layers=0,
    )
    predictor = generator.predictor
    predictor.set_image(image_u8)
    saved = {k: getattr(predictor, k) for k in ("features", "original_size", "input_size", "is_image_set")}

    def restore(_image, image_format="RGB"):
        for key, value in saved.items():
            setattr(predictor, key, value)

    predictor.set_image = restore
    predictor.reset_image = lambda: None
    return generator


def _match(ours, reference) -> tuple:
    """(same count, smallest IoU of the masks paired in output order)."""
    ious = []
    for a, b in zip(ours, reference):
        x, y = a["segmentation"], b["segmentation"]
        union = np.count_nonzero(x | y)
        ious.append(1.0 if union == 0 else np.count_nonzero(x & y) / union)
    return len(ours) == len(reference), (min(ious) if ious else 1.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_t", choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--family", type=Path, help="exported family folder (default: a seeded random model)")
    parser.add_argument("--checkpoint", help="the checkpoint the family was exported from (for the reference)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usam-bench-amg"))
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0,
                        help="0 by default: a random model's predicted IoUs are negative")
    parser.add_argument("--stability-score-thresh", type=float, default=0.05)
    parser.add_argument("--stability-score-offset", type=float, default=1.0)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Medians of both sides (``speedup`` = reference / ours), mask counts, the printed lines (``log``)."""
    lines = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    import torch

    from reference import usam_to_image
    from usam_bioimageio.automatic.amg.params import AmgParameters
    from usam_bioimageio.automatic.amg.generator import generate_masks
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel

    torch.set_num_threads(args.threads)
    if args.family is None:
        family, state = _random_family(args.model_type, args.workdir)
    else:
        if not args.checkpoint:
            raise SystemExit("--family needs --checkpoint (the weights for the reference)")
        from usam_bioimageio.training.checkpoints import load_checkpoint

        family, state = args.family, load_checkpoint(args.checkpoint, model_type=args.model_type).sam_state

    params = AmgParameters(
        points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset, box_nms_thresh=args.box_nms_thresh,
    )
    image = _read_image(args.image)
    model = SamModel.load(family, num_threads=args.threads)
    embeddings = compute_embeddings(model, image)
    reference = _reference_generator(args.model_type, state, usam_to_image(image), params)
    image_u8 = usam_to_image(image)
    log(f"{args.model_type}, image {args.image.name} {image.shape} {image.dtype}, {params}")

    times = {"ours": [], "reference": []}
    cpu = {"ours": [], "reference": []}
    results = {}
    for repeat in range(args.repeats):
        for name in ("ours", "reference"):
            wall, proc = time.perf_counter(), time.process_time()
            if name == "ours":
                results[name] = generate_masks(model, embeddings=embeddings, params=params)
            else:
                with torch.no_grad():
                    results[name] = reference.generate(image_u8)
            times[name].append(time.perf_counter() - wall)
            cpu[name].append(time.process_time() - proc)
            log(f"  repeat {repeat}: {name:9s} {times[name][-1]:7.2f} s wall, {cpu[name][-1]:7.2f} s CPU, "
                f"{len(results[name])} masks")
    same_count, min_iou = _match(results["ours"], results["reference"])
    ours, ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    ours_cpu, ref_cpu = statistics.median(cpu["ours"]), statistics.median(cpu["reference"])
    log(f"masks: ours {len(results['ours'])}, reference {len(results['reference'])}, "
        f"same count {same_count}, min IoU in order {min_iou:.5f}")
    log(f"median wall: ours {ours:.2f} s, reference {ref:.2f} s, speed-up {ref / ours:.2f}x")
    log(f"median CPU:  ours {ours_cpu:.2f} s, reference {ref_cpu:.2f} s, ratio {ref_cpu / ours_cpu:.2f}x")
    return {"ours_seconds": ours, "reference_seconds": ref, "speedup": ref / ours, "masks_ours": len(results["ours"]),
            "masks_reference": len(results["reference"]), "same_count": same_count, "min_iou_in_order": min_iou,
            "log": lines}


def main(argv=None) -> int:
    run(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
