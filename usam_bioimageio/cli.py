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


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


def _is_stack(image: np.ndarray, forced: bool) -> bool:
    """A stack (z, y, x[, c]): with --stack, a 4D array, or a 3D array whose last axis is too long for channels."""
    if forced:
        if image.ndim not in (3, 4):
            raise ValueError(f"--stack needs a (z, y, x) or (z, y, x, c) image, got shape {image.shape}")
        return True
    return image.ndim == 4 or (image.ndim == 3 and image.shape[-1] > 4)


def _embed_to_cache(model, image: np.ndarray, cache: Path, args: argparse.Namespace, name: str) -> str:
    from .cache import cached_embeddings

    stack = _is_stack(image, args.stack)
    tile_shape, halo = args.tile_shape, args.halo
    if tile_shape is not None and halo is None:
        halo = (0, 0)
    emb = cached_embeddings(model, image, cache, tile_shape=tile_shape, halo=halo, stack=stack,
                            progress=not args.quiet)
    what = f"a stack of {len(emb)} slices" if stack else f"an image of shape {image.shape[:2]}"
    tiles = f", {len(emb.tiling)} tiles per image" if getattr(emb, "tiling", None) is not None else ""
    return f"{name}: {what}{tiles} -> {cache}"


def cmd_embed(args: argparse.Namespace) -> int:
    from .embeddings import compute_embeddings, save_embeddings
    from .model import SamModel

    if args.halo is not None and args.tile_shape is None:
        raise ValueError("--halo needs --tile-shape")
    source = Path(args.image)
    if args.cache is None:
        if args.out is None:
            raise ValueError("give --out FILE.npz (one 2D image) or --cache PATH (any image, stack or folder)")
        if args.tile_shape is not None or args.stack or source.is_dir():
            raise ValueError("tiled embeddings, stacks and folders of images are written to a cache: "
                             "pass --cache PATH")
    elif args.out is not None:
        raise ValueError("give --out or --cache, not both")

    model = SamModel.load(args.model, weight_format=args.weight_format)
    if args.cache is None:
        image = _read_image(args.image)
        if _is_stack(image, False):
            raise ValueError(f"{args.image} holds a stack of shape {image.shape}: pass --cache PATH")
        emb = compute_embeddings(model, image)
        save_embeddings(Path(args.out), emb)
        print(f"wrote embeddings {emb.features.shape} to {args.out}")
        return 0
    cache = Path(args.cache)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        cache.mkdir(parents=True, exist_ok=True)
        for path in files:
            print(_embed_to_cache(model, _read_image(str(path)), cache / f"{path.stem}.zarr", args, path.name))
        return 0
    print(_embed_to_cache(model, _read_image(args.image), cache, args, source.name))
    return 0


def _load_embeddings_for(path: Path, image: np.ndarray, model):
    """--embeddings: an .npz of ``usam embed --out`` or a cache folder (ours or micro-sam's)."""
    from .embeddings import load_embeddings

    if not path.is_dir():
        return load_embeddings(path)
    from .cache import EmbeddingCache, data_sha256, is_micro_sam_cache, load_cache

    if not is_micro_sam_cache(path):
        signature = EmbeddingCache.read(path).signature
        if signature["data_sha256"] != data_sha256(image):
            raise ValueError(f"the embedding cache {path} was computed for another image than {image.shape} "
                             f"{image.dtype} read from the --image file")
    emb = load_cache(path, model=model)
    if not hasattr(emb, "original_shape"):
        raise ValueError(f"{path} holds embeddings of a stack; `usam segment` segments one 2D image")
    return emb


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .embeddings import compute_embeddings
    from .model import SamModel
    from .overlay import masks_to_labels, overlay
    from .prompts import read_prompts, segment_objects
    from .tiled_prompts import label_objects_tiled
    from .tiling import TiledEmbeddings

    model = SamModel.load(args.model, weight_format=args.weight_format)
    image = _read_image(args.image)
    objects = read_prompts(args.prompts)
    with tqdm(total=2, desc="segment", disable=args.quiet) as bar:
        bar.set_postfix_str("embeddings")
        emb = _load_embeddings_for(Path(args.embeddings), image, model) if args.embeddings \
            else compute_embeddings(model, image)
        if tuple(emb.original_shape) != image.shape[:2]:
            raise ValueError(f"embeddings are for an image of shape {emb.original_shape}, not {image.shape[:2]}")
        bar.update()
        bar.set_postfix_str(f"{len(objects)} objects")
        if isinstance(emb, TiledEmbeddings):
            labels = label_objects_tiled(model, emb, objects)
        else:
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

    p = sub.add_parser("train", add_help=False, help="finetune with µSAM's iterative prompting (usam train --help)")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("validate", help="run bioimageio.core's test on packages (every weight format)")
    p.add_argument("packages", nargs="+")
    p.set_defaults(func=cmd_validate)

    for name, func, helptext in (("embed", cmd_embed, "compute image embeddings (.npz, or a cache for large "
                                                       "images, stacks and folders)"),
                                 ("segment", cmd_segment, "segment objects from prompts -> label TIFF")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="family folder, package zip/folder, URL or bioimage.io id")
        p.add_argument("--weight-format", default="onnx", choices=["onnx", "torchscript"])
        if name == "embed":
            p.add_argument("--image", required=True,
                           help="2D image (TIFF, PNG, ...), 3D TIFF stack / time series, or a folder of images")
            p.add_argument("--out", default=None, help="output .npz (one 2D image, no tiling)")
            p.add_argument("--cache", default=None,
                           help="embedding cache folder (zarr) to create or resume; for a folder of images, a "
                                "folder holding one NAME.zarr cache per image")
            p.add_argument("--tile-shape", type=int, nargs=2, metavar=("Y", "X"), default=None,
                           help="tile the image(s) (micro-sam's tiling); needs --cache")
            p.add_argument("--halo", type=int, nargs=2, metavar=("Y", "X"), default=None,
                           help="overlap added around each tile (default 0 0)")
            p.add_argument("--stack", action="store_true",
                           help="read the image as a stack (z, y, x[, c]) and embed each slice (automatic for "
                                "4D arrays and 3D arrays whose last axis is longer than 4)")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        else:
            p.add_argument("--image", required=True, help="2D image (TIFF, PNG, ...)")
            p.add_argument("--out", required=True, help="output file")
        p.set_defaults(func=func)
    p.add_argument("--prompts", required=True, help="prompts as JSON or CSV (see usam_bioimageio.prompts.read_prompts)")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings: .npz from `usam embed --out`, or a cache folder from "
                        "`usam embed --cache` (tiled too) or micro-sam's precompute_image_embeddings")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of the labels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own parser (argparse REMAINDER would swallow nothing before --help)
        from .training import train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"usam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
