"""`usam ais` and `usam amg`: automatic segmentation of an image, a folder of images or a 3D TIFF (per slice, merged
across z), and their options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from usam_bioimageio.errors import OutputError, UsageError
from usam_bioimageio.cli.files import (
    check_tile_options,
    IMAGE_SUFFIXES,
    Output,
    add_model_options,
    add_tile_options,
    check_embeddings_for,
    check_label_count,
    check_outputs,
    check_stack_embeddings_for,
    is_stack,
    load_embeddings_for,
    load_model,
    load_stack_embeddings_for,
    read_image,
    read_image_2d,
    write_labels,
    write_overlay,
)
from usam_bioimageio.cli.scale import add_scale_option, parse_scale, refuse_model_scale, run_scale
from usam_bioimageio.embeddings.types import resolve_tiling
from usam_bioimageio.io.images import check_image_header_2d


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


def _check_folder_images(jobs: list, command: str) -> None:
    """Every image of a folder (and its embeddings), before the model loads: so that a bad fifth image does not fail
    after four label images are written. First every header (axes, stack rule, pixel budget: nothing decoded), then
    every image's values, one image at a time (decoding is cheap next to the encoder; none is kept)."""
    for path, *_ in jobs:
        check_image_header_2d(path, command)
    for path, _, _, embeddings in jobs:
        image = read_image_2d(path, command)
        if embeddings is not None:
            check_embeddings_for(embeddings, image)


def _embeddings_for_job(model, image: np.ndarray, embeddings: Optional[Path], args: argparse.Namespace,
                        progress: bool):
    """The image's embeddings: loaded, or computed (tiled as the options say) of the image resized by --scale."""
    from usam_bioimageio.embeddings.compute import compute_image_embeddings
    from usam_bioimageio.runtime.pixel_scale import scale_image

    if embeddings is not None:
        emb = load_embeddings_for(embeddings, image, model)
        if tuple(emb.original_shape) != image.shape[:2]:
            raise ValueError(f"embeddings are for an image of shape {emb.original_shape}, not {image.shape[:2]}")
        return emb
    scale = run_scale(args, model)
    if scale != 1.0:
        image = scale_image(image, scale)
    return compute_image_embeddings(model, image, tile_shape=args.tile_shape, halo=args.halo, progress=progress)


def override(params, args: argparse.Namespace, names):
    """Parameters with the options the user gave (None = keep the preset / default)."""
    import dataclasses

    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return dataclasses.replace(params, **given)


AIS_OPTIONS = ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold",
               "foreground_smoothing", "distance_smoothing", "min_size")


AMG_OPTIONS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
               "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
               "min_mask_region_area")


def run_volume(args: argparse.Namespace, volume: np.ndarray, method: str, params) -> int:
    """``usam ais`` / ``usam amg`` on a stack (z, y, x[, c]) already read and checked: its outputs are checked here
    (a 3D label image is a TIFF; no overlay), then the model is loaded, the volume segmented and written."""
    from usam_bioimageio.volumes.automatic import segment_volume

    out = Path(args.out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise OutputError(f"--out {out}: the labels of a stack ({volume.shape[0]} slices) are a 3D TIFF (.tif), "
                          f"not {out.suffix or 'a file without suffix'}")
    if args.overlay:
        raise UsageError(f"--overlay draws one 2D image; {args.image} holds a stack of {volume.shape[0]} slices")
    if args.embeddings:
        check_stack_embeddings_for(Path(args.embeddings), volume)
    model = load_model(args)
    refuse_model_scale(args, model, "a stack (3D segmentation)")
    embeddings = load_stack_embeddings_for(Path(args.embeddings), volume, model) if args.embeddings else None
    tile_shape, halo = resolve_tiling(args.tile_shape, args.halo, volume.shape[1:3], model.image_size)
    halo = halo if halo is not None or tile_shape is None else (0, 0)
    labels = segment_volume(model, volume, method=method, params=params, embeddings=embeddings,
                            min_object_size=getattr(args, "min_object_size", 0), gap_closing=args.gap_closing,
                            min_z_extent=args.min_z_extent, tile_shape=tile_shape, halo=halo,
                            progress=not args.quiet)
    write_labels(out, labels)
    print(f"wrote {out} ({int(labels.max()) if labels.size else 0} objects in {volume.shape[0]} slices)")
    return 0


def add_volume_options(p: argparse.ArgumentParser) -> None:
    """The automatic-3D options of ``usam ais`` / ``usam amg`` (used only when --image is a stack)."""
    g = p.add_argument_group("3D TIFF (z, y, x): each slice is segmented, then merged across z (µSAM's "
                             "merge_instance_segmentation_3d; a 1-slice stack is that slice's labels)")
    g.add_argument("--gap-closing", type=int, default=None, metavar="N",
                   help="close gaps of up to N slices along z before merging (default: off, as µSAM)")
    g.add_argument("--min-z-extent", type=int, default=None, metavar="N",
                   help="remove objects spanning fewer than N slices (default: off, as µSAM)")


def _run_automatic(args: argparse.Namespace, segment, method: str, params) -> int:
    """Shared driver of ``usam ais`` / ``usam amg``: ``segment(model, image, embeddings, progress)`` -> labels; one
    file holding a stack (z, y, x) is segmented in 3D (``method``, ``params``: :func:`run_volume`)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from usam_bioimageio.io.overlay import overlay

    check_tile_options(args)
    scale = getattr(args, "scale", 1.0)  # None: the model's pixel scale, known once it is loaded
    jobs = _image_jobs(args)
    # every output and the first image are checked before the model is loaded or anything is computed
    outputs, inputs = [], [("--image", args.image), ("--embeddings", args.embeddings)]
    if Path(args.image).is_dir():
        outputs.append(Output("--out", Path(args.out), "folder"))
        if args.overlay:
            outputs.append(Output("--overlay", Path(args.overlay), "folder"))
    for path, out, overlay_path, embeddings in jobs:
        outputs.append(Output("--out", out, "labels"))
        if overlay_path is not None:
            outputs.append(Output("--overlay", overlay_path, "overlay"))
        inputs += [("--image", path), ("--embeddings", embeddings)]
    check_outputs(outputs, inputs, overwrite=args.overwrite)
    if Path(args.image).is_dir():
        _check_folder_images(jobs, f"usam {args.command}")
    single = len(jobs) == 1
    if Path(args.image).is_dir():
        first = read_image_2d(jobs[0][0], f"usam {args.command}")  # a folder holds 2D images only
    else:
        first = read_image(jobs[0][0])
        if is_stack(first):
            if scale not in (None, 1.0):
                raise UsageError(f"--scale is for 2D images; {args.image} holds a stack of {first.shape[0]} slices")
            return run_volume(args, first, method, params)
    if args.gap_closing is not None or args.min_z_extent is not None:
        what = "a folder of 2D images" if Path(args.image).is_dir() else "a 2D image"
        raise UsageError(f"--gap-closing and --min-z-extent merge the slices of a 3D TIFF; {args.image} is {what}")
    if jobs[0][3] is not None:
        check_embeddings_for(jobs[0][3], first)
    model = load_model(args)
    if any(job[3] is not None for job in jobs):
        refuse_model_scale(args, model, "embeddings (of the image as it is)")
    images = {0: first}  # the first image, read above, until its job takes it

    def prepare(k: int):
        path, _, _, embeddings = jobs[k]
        image = images.pop(k) if k in images else read_image_2d(path, f"usam {args.command}")
        return image, _embeddings_for_job(model, image, embeddings, args, progress=single and not args.quiet)

    summary = []
    # a folder is a pipeline: the next image's embeddings are computed (encoder, ONNX Runtime's threads, GIL
    # released) while this image's decoder and post-processing (mostly one thread) run
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, 0)
        for k, (path, out, overlay_path, _) in enumerate(tqdm(jobs, desc=f"usam {args.command}", unit="image",
                                                              disable=args.quiet or single)):
            image, emb = pending.result()
            pending = pool.submit(prepare, k + 1) if k + 1 < len(jobs) else None
            labels = segment(model, image, emb, single and not args.quiet)
            # known only now: a PNG holds up to 65535 labels; refused before this image's label or overlay file
            check_label_count(Output("--out", out, "labels"), int(labels.max()) if labels.size else 0)
            rgb = overlay(image, labels) if overlay_path is not None else None
            write_labels(out, labels)
            if rgb is not None:
                write_overlay(overlay_path, rgb)
            summary.append(f"wrote {out} ({int(labels.max())} objects)")
    print("\n".join(summary))
    return 0


def cmd_ais(args: argparse.Namespace) -> int:
    from usam_bioimageio.automatic.ais.postprocess import AIS_PRESETS, AisParameters
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation

    params = override(AIS_PRESETS[args.preset] if args.preset else AisParameters(), args, AIS_OPTIONS)
    parse_scale(args)

    def segment(model, image, emb, progress):
        return automatic_instance_segmentation(model, image, embeddings=emb, params=params, progress=progress,
                                               scale=run_scale(args, model))

    return _run_automatic(args, segment, "ais", params)


def cmd_amg(args: argparse.Namespace) -> int:
    from usam_bioimageio.automatic.amg.params import AMG_PRESETS, AmgParameters
    from usam_bioimageio.automatic.amg.generator import automatic_mask_generation

    params = override(AMG_PRESETS[args.preset] if args.preset else AmgParameters(), args, AMG_OPTIONS)
    if params.crop_n_layers > 0 and args.embeddings:
        raise UsageError("--crop-n-layers encodes crops of the image: it cannot use --embeddings")

    def segment(model, image, emb, progress):
        return automatic_mask_generation(model, image, embeddings=emb, params=params,
                                         min_object_size=args.min_object_size, progress=progress)

    return _run_automatic(args, segment, "amg", params)


def _add_automatic_parser(sub, name: str, func, helptext: str, presets) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext, description=helptext)
    add_model_options(p)
    p.add_argument("--image", required=True, help="2D image (TIFF, PNG, ...), a folder of 2D images, or a 3D TIFF "
                                                  "(z, y, x) segmented in 3D")
    p.add_argument("--out", required=True, help="label image: .tif (uint32, 0 = background) or .png (16-bit, up to "
                                                "65535 labels); a folder for a folder of images (NAME.tif); a 3D "
                                                ".tif for a 3D TIFF")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings: .npz or cache from `usam embed` (tiled too) or micro-sam's; for a "
                        "folder of images, the folder holding NAME.zarr (or NAME.npz) per image; for a 3D TIFF a "
                        "stack cache (`usam embed --cache PATH --stack`)")
    add_tile_options(p, "compute tiled embeddings (micro-sam's tiling) for large images",
                     "overlap around each tile; should cover half the largest object (default 0 0; N / 8 with "
                     "--tile-shape auto)")
    p.add_argument("--preset", default=None, choices=sorted(presets),
                   help="µSAM's per-model settings (default: µSAM's library defaults, see --help of each option)")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay (a folder for a folder of images; not "
                                                    "for a 3D TIFF)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    add_volume_options(p)
    return p


def add_ais_options(p: argparse.ArgumentParser) -> None:
    """µSAM's AIS post-processing options (``usam ais``, ``usam track``); None keeps the preset / default."""
    from usam_bioimageio.automatic.ais.postprocess import AisParameters

    d = AisParameters()
    for name, kind, text in (
        ("center_distance_threshold", float, "seeds: smoothed centre distance below this"),
        ("boundary_distance_threshold", float, "seeds: smoothed boundary distance below this"),
        ("foreground_threshold", float, "foreground: smoothed probability above this"),
        ("foreground_smoothing", float, "Gaussian sigma of the foreground map (0 = none)"),
        ("distance_smoothing", float, "Gaussian sigma of the distance maps (0 = none)"),
        ("min_size", int, "remove objects with fewer pixels"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{text} (default {getattr(d, name)})")


def add_automatic_parsers(sub) -> None:
    from usam_bioimageio.automatic.ais.postprocess import AIS_PRESETS
    from usam_bioimageio.automatic.amg.params import AMG_PRESETS, AmgParameters

    ais = _add_automatic_parser(sub, "ais", cmd_ais, "automatic instance segmentation with µSAM's decoder (the "
                                "family's AIS packages) -> label TIFF (3D for a 3D TIFF)", AIS_PRESETS)
    add_ais_options(ais)
    add_scale_option(ais, "the maps back before post-processing (its options are in the image's pixels)")
    amg = _add_automatic_parser(sub, "amg", cmd_amg, "automatic mask generation (SAM's point grid) -> label TIFF "
                                "(3D for a 3D TIFF)",
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
