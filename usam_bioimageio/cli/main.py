"""The ``usam`` command: export, validate, embed, segment, ais, amg (and train)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from usam_bioimageio import __version__
from usam_bioimageio.errors import UsageError, UsamError


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
    from usam_bioimageio.io.images import read_image

    return read_image(path)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from usam_exporters.family import export_family
    except ImportError as err:
        raise UsamError(f"usam export needs the exporters: pip install 'usam-bioimageio[export]' ({err})") from err
    out = export_family(
        checkpoint=args.checkpoint,
        output_dir=Path(args.out),
        name=args.name,
        model_type=args.model_type,
        sample_image=args.sample_image,
        sample_labels=args.sample_labels,
        overwrite=args.overwrite,
        vit_t_attention_biases=args.vit_t_attention_biases,
        progress=not args.quiet,
        **({"formats": tuple(args.formats)} if args.formats else {}),
    )
    print(f"wrote {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        from usam_exporters.writer import validate_package
    except ImportError as err:
        raise UsamError(f"usam validate needs bioimageio.core: pip install 'usam-bioimageio[export]' ({err})") from err
    ok = True
    for path in args.packages:
        summary = validate_package(Path(path))
        for fmt, status in summary.items():
            print(f"{path}: {fmt}: {status}")
            ok &= status == "passed"
        for reason in summary.errors:  # why a check failed, one line each
            print(f"{path}: failed: {reason}")
        ok &= summary.passed
    return 0 if ok else 1


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


def _is_stack(image: np.ndarray, forced: bool) -> bool:
    """A stack (z, y, x[, c]): with --stack, a 4D array, or a 3D array whose last axis is too long for channels."""
    if forced:
        if image.ndim not in (3, 4):
            raise UsageError(f"--stack needs a (z, y, x) or (z, y, x, c) image, got shape {image.shape}")
        return True
    return image.ndim == 4 or (image.ndim == 3 and image.shape[-1] > 4)


def _embed_to_cache(model, image: np.ndarray, cache: Path, args: argparse.Namespace, name: str) -> str:
    from usam_bioimageio.embeddings.compute import cached_embeddings

    stack = _is_stack(image, args.stack)
    tile_shape, halo = args.tile_shape, args.halo
    if tile_shape is not None and halo is None:
        halo = (0, 0)
    emb = cached_embeddings(model, image, cache, tile_shape=tile_shape, halo=halo, stack=stack,
                            progress=not args.quiet)
    what = f"a stack of {len(emb)} slices" if stack else f"an image of shape {image.shape[:2]}"
    tiles = f", {len(emb.tiling)} tiles per image" if emb.tiling is not None else ""
    return f"{name}: {what}{tiles} -> {cache}"


def cmd_embed(args: argparse.Namespace) -> int:
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.embeddings.npz import save_embeddings
    from usam_bioimageio.runtime.model import SamModel

    if args.halo is not None and args.tile_shape is None:
        raise UsageError("--halo needs --tile-shape")
    source = Path(args.image)
    if args.cache is None:
        if args.out is None:
            raise UsageError("give --out FILE.npz (one 2D image) or --cache PATH (any image, stack or folder)")
        if args.tile_shape is not None or args.stack or source.is_dir():
            raise UsageError("tiled embeddings, stacks and folders of images are written to a cache: "
                             "pass --cache PATH")
    elif args.out is not None:
        raise UsageError("give --out or --cache, not both")

    model = SamModel.load(args.model, weight_format=args.weight_format)
    if args.cache is None:
        image = _read_image(args.image)
        if _is_stack(image, False):
            raise UsageError(f"{args.image} holds a stack of shape {image.shape}: pass --cache PATH")
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
    from usam_bioimageio.embeddings.npz import load_embeddings

    if not path.is_dir():
        return load_embeddings(path)
    from usam_bioimageio.embeddings.cache import EmbeddingCache, data_sha256, is_micro_sam_cache, load_cache

    if not is_micro_sam_cache(path):
        signature = EmbeddingCache.read(path).signature
        if signature["data_sha256"] != data_sha256(image):
            raise ValueError(f"the embedding cache {path} was computed for another image than {image.shape} "
                             f"{image.dtype} read from the --image file")
    stack = load_cache(path, model=model)
    if stack.is_stack:
        raise ValueError(f"{path} holds embeddings of a stack; `usam segment` segments one 2D image")
    return stack[0]


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.io.overlay import masks_to_labels, overlay
    from usam_bioimageio.io.prompt_files import read_prompts
    from usam_bioimageio.prompting.predict import segment_objects
    from usam_bioimageio.prompting.tiled import label_objects_tiled
    from usam_bioimageio.embeddings.types import TiledEmbeddings

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


# -- automatic segmentation (ais, amg) ---------------------------------------------------------------

def _image_jobs(args: argparse.Namespace) -> list:
    """(image path, output TIFF, overlay PNG or None, embeddings path or None) for one image or a folder."""
    source = Path(args.image)
    if not source.is_dir():
        return [(source, Path(args.out), Path(args.overlay) if args.overlay else None,
                 Path(args.embeddings) if args.embeddings else None)]
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    out = Path(args.out)
    if out.suffix.lower() in (".tif", ".tiff"):
        raise UsageError(f"--image is a folder: --out must be a folder for the label images, not {out}")
    jobs = []
    for path in files:
        emb = None
        if args.embeddings:  # a folder as `usam embed --cache FOLDER` writes it: NAME.zarr (or NAME.npz)
            candidates = [Path(args.embeddings) / f"{path.stem}{ext}" for ext in (".zarr", ".npz")]
            emb = next((c for c in candidates if c.exists()), None)
            if emb is None:
                raise ValueError(f"no embeddings for {path.name} in {args.embeddings} (expected {candidates[0].name})")
        jobs.append((path, out / f"{path.stem}.tif", Path(args.overlay) / f"{path.stem}.png" if args.overlay else None,
                     emb))
    return jobs


def _embeddings_for_job(model, image: np.ndarray, embeddings: Optional[Path], args: argparse.Namespace,
                        progress: bool):
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.embeddings.compute import compute_tiled_embeddings

    if _is_stack(image, False):
        raise ValueError(f"usam {args.command} segments 2D images; got an array of shape {image.shape}")
    if embeddings is not None:
        if args.tile_shape is not None:
            raise UsageError("--tile-shape and --halo are read from the embedding cache; do not give them with "
                             "--embeddings")
        emb = _load_embeddings_for(embeddings, image, model)
        if tuple(emb.original_shape) != image.shape[:2]:
            raise ValueError(f"embeddings are for an image of shape {emb.original_shape}, not {image.shape[:2]}")
        return emb
    if args.tile_shape is not None:
        halo = args.halo if args.halo is not None else (0, 0)
        return compute_tiled_embeddings(model, image, tile_shape=args.tile_shape, halo=halo, progress=progress)
    return compute_embeddings(model, image)


def _override(params, args: argparse.Namespace, names):
    """Parameters with the options the user gave (None = keep the preset / default)."""
    import dataclasses

    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return dataclasses.replace(params, **given)


AIS_OPTIONS = ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold",
               "foreground_smoothing", "distance_smoothing", "min_size")
AMG_OPTIONS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
               "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
               "min_mask_region_area")


def _run_automatic(args: argparse.Namespace, segment) -> int:
    """Shared driver of ``usam ais`` / ``usam amg``: ``segment(model, image, embeddings, progress)`` -> labels."""
    from tqdm import tqdm

    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.io.overlay import overlay

    if args.halo is not None and args.tile_shape is None:
        raise UsageError("--halo needs --tile-shape")
    jobs = _image_jobs(args)
    model = SamModel.load(args.model, weight_format=args.weight_format)
    single = len(jobs) == 1
    summary = []
    for path, out, overlay_path, embeddings in tqdm(jobs, desc=f"usam {args.command}", unit="image",
                                                    disable=args.quiet or single):
        image = _read_image(str(path))
        emb = _embeddings_for_job(model, image, embeddings, args, progress=single and not args.quiet)
        labels = segment(model, image, emb, single and not args.quiet)
        _write_tiff(out, labels)
        if overlay_path is not None:
            _write_png(overlay_path, overlay(image, labels))
        summary.append(f"wrote {out} ({int(labels.max())} objects)")
    print("\n".join(summary))
    return 0


def cmd_ais(args: argparse.Namespace) -> int:
    from usam_bioimageio.automatic.ais.postprocess import AIS_PRESETS, AisParameters
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation

    params = _override(AIS_PRESETS[args.preset] if args.preset else AisParameters(), args, AIS_OPTIONS)

    def segment(model, image, emb, progress):
        return automatic_instance_segmentation(model, image, embeddings=emb, params=params, progress=progress)

    return _run_automatic(args, segment)


def cmd_amg(args: argparse.Namespace) -> int:
    from usam_bioimageio.automatic.amg.generator import AMG_PRESETS, AmgParameters, automatic_mask_generation

    params = _override(AMG_PRESETS[args.preset] if args.preset else AmgParameters(), args, AMG_OPTIONS)
    if params.crop_n_layers > 0 and args.embeddings:
        raise UsageError("--crop-n-layers encodes crops of the image: it cannot use --embeddings")

    def segment(model, image, emb, progress):
        return automatic_mask_generation(model, image, embeddings=emb, params=params,
                                         min_object_size=args.min_object_size, progress=progress)

    return _run_automatic(args, segment)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import shlex

    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.io.datasets import read_split
    from usam_bioimageio.evaluation.report import run_evaluation, write_report

    model = SamModel.load(args.model, weight_format=args.weight_format)
    val = read_split(Path(args.data), args.val_split, args.limit) if {"ais", "amg"} & set(args.modes) else []
    test = read_split(Path(args.data), args.test_split, args.limit)
    results = run_evaluation(model, val, test, modes=args.modes, n_iterations=args.n_iterations, seed=args.seed,
                             progress=not args.quiet)
    command = "usam evaluate " + " ".join(shlex.quote(a) for a in args.argv)
    report = write_report(results, Path(args.out), title=args.title or f"Evaluation of {args.model}", command=command)
    print(f"wrote {report}")
    return 0


def _add_automatic_parser(sub, name: str, func, helptext: str, presets) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext, description=helptext)
    p.add_argument("--model", required=True, help="family folder, package zip/folder, URL or bioimage.io id")
    p.add_argument("--weight-format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--image", required=True, help="2D image (TIFF, PNG, ...) or a folder of images")
    p.add_argument("--out", required=True, help="label TIFF (uint32, 0 = background); a folder for a folder of images")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings: .npz or cache from `usam embed` (tiled too) or micro-sam's; for a "
                        "folder of images, the folder holding NAME.zarr (or NAME.npz) per image")
    p.add_argument("--tile-shape", type=int, nargs=2, metavar=("Y", "X"), default=None,
                   help="compute tiled embeddings (micro-sam's tiling) for large images")
    p.add_argument("--halo", type=int, nargs=2, metavar=("Y", "X"), default=None,
                   help="overlap around each tile; should cover half the largest object (default 0 0)")
    p.add_argument("--preset", default=None, choices=sorted(presets),
                   help="µSAM's per-model settings (default: µSAM's library defaults, see --help of each option)")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay (a folder for a folder of images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    return p


def _add_automatic_parsers(sub) -> None:
    from usam_bioimageio.automatic.ais.postprocess import AIS_PRESETS, AisParameters
    from usam_bioimageio.automatic.amg.generator import AMG_PRESETS, AmgParameters

    ais = _add_automatic_parser(sub, "ais", cmd_ais, "automatic instance segmentation with µSAM's decoder (the "
                                "family's AIS packages) -> label TIFF", AIS_PRESETS)
    d = AisParameters()
    for name, kind, text in (
        ("center_distance_threshold", float, "seeds: smoothed centre distance below this"),
        ("boundary_distance_threshold", float, "seeds: smoothed boundary distance below this"),
        ("foreground_threshold", float, "foreground: smoothed probability above this"),
        ("foreground_smoothing", float, "Gaussian sigma of the foreground map (0 = none)"),
        ("distance_smoothing", float, "Gaussian sigma of the distance maps (0 = none)"),
        ("min_size", int, "remove objects with fewer pixels"),
    ):
        ais.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                         help=f"{text} (default {getattr(d, name)})")
    amg = _add_automatic_parser(sub, "amg", cmd_amg, "automatic mask generation (SAM's point grid) -> label TIFF",
                                AMG_PRESETS)
    d = AmgParameters()
    for name, kind, text in (
        ("points_per_side", int, "grid points per side of the image (per tile when tiled)"),
        ("points_per_batch", int, "points per decoder batch (memory only)"),
        ("pred_iou_thresh", float, "keep masks with predicted IoU above this"),
        ("stability_score_thresh", float, "keep masks with stability score at least this"),
        ("stability_score_offset", float, "logit offset of the stability score"),
        ("box_nms_thresh", float, "box IoU for NMS within a crop or tile"),
        ("crop_n_layers", int, "extra crop layers (untiled only; each crop is encoded)"),
        ("crop_nms_thresh", float, "box IoU for NMS across crops and tiles"),
        ("min_mask_region_area", int, "remove holes and islands smaller than this from each mask"),
    ):
        amg.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                         help=f"{text} (default {getattr(d, name)})")
    amg.add_argument("--min-object-size", type=int, default=0,
                     help="drop masks and label components with fewer pixels (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usam", description="Segment Anything for Microscopy as bioimage.io packages.")
    parser.add_argument("--version", action="version", version=f"usam {__version__}")
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
    p.add_argument("--vit-t-attention-biases", choices=["loaded", "micro_sam"], default="loaded",
                   help="vit_t only: 'loaded' uses TinyViT's attention biases as trained (default); 'micro_sam' "
                        "zeroes them, as micro-sam and MobileSAM's builder run vit_t (their bias cache is "
                        "filled before the weights are loaded), to reproduce micro-sam's numbers")
    p.add_argument("--formats", nargs="+", choices=["pytorch_state_dict", "torchscript", "onnx"], default=None,
                   help="weight formats of the packages (default: all three), each gated by bioimageio.core")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    p.add_argument("--prompts", required=True, help="prompts as JSON or CSV (see usam_bioimageio.prompting.predict.read_prompts)")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings: .npz from `usam embed --out`, or a cache folder from "
                        "`usam embed --cache` (tiled too) or micro-sam's precompute_image_embeddings")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of the labels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_automatic_parsers(sub)

    from usam_bioimageio.evaluation.report import MODES

    p = sub.add_parser("evaluate", help="interactive, AIS, AMG and baseline evaluation on a dataset -> report",
                       description="Evaluate a model family on a dataset with splits.json, images/, labels/ (the "
                                   "layout of ../shared/data/dsb2018): AIS / AMG thresholds by grid search on the "
                                   "validation split, everything scored on the test split; writes report.md, "
                                   "results.json and plots.")
    p.add_argument("--model", required=True, help="family folder, package zip/folder, URL or bioimage.io id")
    p.add_argument("--weight-format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--data", required=True, help="dataset folder (splits.json, images/, labels/)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", default="test")
    p.add_argument("--limit", type=int, default=None, help="use the first N images of each split")
    p.add_argument("--n-iterations", type=int, default=8, help="interactive rounds (start + corrections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")).strip()
    return text or type(err).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """``usam``: one error policy for every verb. Errors a user can cause (our ``UsamError``s, bad values,
    files: ``ValueError``, ``OSError``) are one line on stderr and exit status 1; options that do not go together
    exit with 2, as argparse's usage errors do."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own parser (argparse REMAINDER would swallow nothing before --help)
        command = "train"

        def run() -> int:
            from usam_bioimageio.training import train_main

            return train_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]
        command = args.command

        def run() -> int:
            return args.func(args)
    try:
        return run()
    except UsageError as err:
        print(f"usam {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (UsamError, ValueError, OSError) as err:
        print(f"usam {command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"usam {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
