"""The ``usam`` command: export, validate, embed, segment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np


def _write_tiff(path: Path, labels: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, labels, compression="zlib")
    tmp.replace(path)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(rgb).save(tmp, format="PNG")
    tmp.replace(path)


def _read_image(path: str) -> np.ndarray:
    from .io import read_image

    return read_image(path)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from usam_exporters.export import export_family
    except ImportError as err:
        print(f"usam export needs the exporters: pip install 'usam-bioimageio[export]' ({err})", file=sys.stderr)
        return 2
    out = export_family(
        checkpoint=args.checkpoint,
        output_dir=Path(args.out),
        name=args.name,
        model_type=args.model_type,
        sample_image=args.sample_image,
        sample_labels=args.sample_labels,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        from usam_exporters.package import validate_package
    except ImportError as err:
        print(f"usam validate needs bioimageio.core: pip install 'usam-bioimageio[export]' ({err})", file=sys.stderr)
        return 2
    ok = True
    for path in args.packages:
        summary = validate_package(Path(path))
        for fmt, status in summary.items():
            print(f"{path}: {fmt}: {status}")
            ok &= status == "passed"
    return 0 if ok else 1


def cmd_embed(args: argparse.Namespace) -> int:
    from .embeddings import compute_embeddings, save_embeddings
    from .model import SamModel

    model = SamModel.load(args.model, weight_format=args.weight_format)
    emb = compute_embeddings(model, _read_image(args.image))
    save_embeddings(Path(args.out), emb)
    print(f"wrote embeddings {emb.features.shape} to {args.out}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .embeddings import compute_embeddings, load_embeddings
    from .model import SamModel
    from .overlay import masks_to_labels, overlay
    from .prompts import read_prompts, segment_objects

    model = SamModel.load(args.model, weight_format=args.weight_format)
    image = _read_image(args.image)
    objects = read_prompts(args.prompts)
    with tqdm(total=2, desc="segment", disable=args.quiet) as bar:
        bar.set_postfix_str("embeddings")
        emb = load_embeddings(Path(args.embeddings)) if args.embeddings else compute_embeddings(model, image)
        if emb.original_shape != image.shape[:2]:
            raise ValueError(f"embeddings are for an image of shape {emb.original_shape}, not {image.shape[:2]}")
        bar.update()
        bar.set_postfix_str(f"{len(objects)} objects")
        labels = masks_to_labels(segment_objects(model, emb, objects))
        bar.update()
    _write_tiff(Path(args.out), labels)
    print(f"wrote {args.out} ({int(labels.max())} objects)")
    if args.overlay:
        points = [o.points for o in objects if o.points is not None]
        pts = np.concatenate([np.reshape(p, (-1, 2)) for p in points]) if points else None
        _write_png(Path(args.overlay), overlay(image, labels, points=pts))
        print(f"wrote {args.overlay}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usam", description="Segment Anything for Microscopy as bioimage.io packages.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="checkpoint -> bioimage.io packages (image encoder, prompt decoder)")
    p.add_argument("checkpoint", help="checkpoint file, URL, or registry name (e.g. vit_b_lm)")
    p.add_argument("--out", required=True, help="output folder for the family of package zips")
    p.add_argument("--name", default=None, help="model name used in the packages (default: from the checkpoint)")
    p.add_argument("--model-type", default=None, choices=["vit_t", "vit_b", "vit_l", "vit_h"],
                   help="check the detected model type")
    p.add_argument("--sample-image", default=None, help="image for test tensors and covers")
    p.add_argument("--sample-labels", default=None, help="ground-truth labels of the sample image (prompts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("validate", help="run bioimageio.core's test on packages (every weight format)")
    p.add_argument("packages", nargs="+")
    p.set_defaults(func=cmd_validate)

    for name, func, helptext in (("embed", cmd_embed, "compute image embeddings (.npz)"),
                                 ("segment", cmd_segment, "segment objects from prompts -> label TIFF")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="family folder, package zip/folder, URL or bioimage.io id")
        p.add_argument("--image", required=True, help="2D image (TIFF, PNG, ...)")
        p.add_argument("--weight-format", default="onnx", choices=["onnx", "torchscript"])
        p.add_argument("--out", required=True, help="output file")
        p.set_defaults(func=func)
    p.add_argument("--prompts", required=True, help="prompts as JSON or CSV (see usam_bioimageio.prompts.read_prompts)")
    p.add_argument("--embeddings", default=None, help="precomputed embeddings (.npz from `usam embed`)")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of the labels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"usam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
