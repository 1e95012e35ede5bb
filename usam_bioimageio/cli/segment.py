"""`usam segment`: prompted segmentation of a 2D image from a prompt file, or of a volume (``--volume``: each object
prompted on one slice and projected through the stack, µSAM's interactive 3D)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from usam_bioimageio.cli.files import (
    check_tile_options,
    Output,
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
from usam_bioimageio.cli.scale import parse_scale, refuse_model_scale, run_scale
from usam_bioimageio.errors import InputError, OutputError, UsageError


def _segment_volume(args: argparse.Namespace) -> int:
    """``--volume``: a 3D TIFF (z, y, x), prompts with a slice ``z`` per object -> a 3D label TIFF."""
    from usam_bioimageio.embeddings.compute import compute_stack_embeddings
    from usam_bioimageio.io.prompt_files import check_prompt_slices, check_prompts_inside, read_prompts
    from usam_bioimageio.volumes.interactive import segment_volume_from_prompts

    volume = read_image(args.image)
    if not is_stack(volume):
        raise InputError(f"--volume needs a stack (z, y, x); {args.image} is a 2D image of shape {volume.shape}: "
                         "drop --volume to segment it")
    if volume.shape[0] < 2:
        raise InputError(f"{args.image} holds one slice: there is nothing to project; segment it without --volume")
    if args.overlay:
        raise UsageError(f"--overlay draws one 2D image; {args.image} holds a stack of {volume.shape[0]} slices")
    objects = read_prompts(args.prompts)
    check_prompt_slices(objects, volume.shape[0], args.prompts)
    check_prompts_inside(objects, volume.shape[1:3], args.prompts)
    out = Output("--out", Path(args.out), "labels")
    if out.path.suffix.lower() not in (".tif", ".tiff"):
        raise OutputError(f"--out {out.path}: the labels of a stack are a 3D TIFF (.tif), not "
                          f"{out.path.suffix or 'a file without suffix'}")
    check_outputs([out], [("--image", args.image), ("--prompts", args.prompts), ("--embeddings", args.embeddings)],
                  overwrite=args.overwrite)
    if args.embeddings:
        check_stack_embeddings_for(Path(args.embeddings), volume)

    model = load_model(args)
    refuse_model_scale(args, model, "a stack (3D segmentation)")
    emb = load_stack_embeddings_for(Path(args.embeddings), volume, model) if args.embeddings \
        else compute_stack_embeddings(model, volume, progress=not args.quiet)
    labels = segment_volume_from_prompts(model, emb, objects=objects, projection=args.projection,
                                         iou_threshold=args.iou_threshold, box_extension=args.box_extension,
                                         progress=not args.quiet)
    write_labels(out.path, labels)
    print(f"wrote {args.out} ({len(np.unique(labels)) - 1} objects in {volume.shape[0]} slices)")
    return 0


def _check_tiling_and_scale(args: argparse.Namespace) -> None:
    parse_scale(args)
    check_tile_options(args)
    if args.volume and args.scale not in (None, 1.0):
        raise UsageError("--scale is for 2D images; --volume segments a stack at its own scale")
    if args.volume and args.tile_shape is not None:
        raise UsageError("--tile-shape is for 2D images here; for a tiled stack give --embeddings from "
                         "`usam embed --stack --cache C --tile-shape Y X`")


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from usam_bioimageio.embeddings.compute import compute_image_embeddings
    from usam_bioimageio.io.overlay import overlay
    from usam_bioimageio.io.prompt_files import check_prompt_slices, check_prompts_inside, read_prompts
    from usam_bioimageio.prompting.scaled import label_objects_scaled
    from usam_bioimageio.runtime.pixel_scale import scale_image

    _check_tiling_and_scale(args)
    if args.volume:
        return _segment_volume(args)
    # every input and output is checked before the model is loaded or anything is computed
    image = read_image_2d(args.image, "usam segment")
    objects = read_prompts(args.prompts)
    check_prompt_slices(objects, None, args.prompts)
    check_prompts_inside(objects, image.shape[:2], args.prompts)
    out = Output("--out", Path(args.out), "labels")
    outputs = [out] + ([Output("--overlay", Path(args.overlay), "overlay")] if args.overlay else [])
    check_outputs(outputs, [("--image", args.image), ("--prompts", args.prompts), ("--embeddings", args.embeddings)],
                  overwrite=args.overwrite)
    check_label_count(out, len(objects))
    if args.embeddings:
        check_embeddings_for(Path(args.embeddings), image)

    model = load_model(args)
    if args.embeddings:
        refuse_model_scale(args, model, "embeddings (of the image as it is)")
    scale = run_scale(args, model)
    with tqdm(total=2, desc="segment", disable=args.quiet) as bar:
        bar.set_postfix_str("embeddings")
        emb = load_embeddings_for(Path(args.embeddings), image, model) if args.embeddings else \
            compute_image_embeddings(model, scale_image(image, scale) if scale != 1.0 else image,
                                     tile_shape=args.tile_shape, halo=args.halo, progress=False)
        bar.update()
        bar.set_postfix_str(f"{len(objects)} objects")
        # in batches: memory bounded for thousands of objects; at a scale, each mask shrunk back to the image
        labels = label_objects_scaled(model, emb, objects, shape=image.shape[:2], scale=scale)
        bar.update()
    write_labels(out.path, labels)
    print(f"wrote {args.out} ({int(labels.max())} objects)")
    if args.overlay:
        points = [o.points for o in objects if o.points is not None]
        pts = np.concatenate([np.reshape(p, (-1, 2)) for p in points]) if points else None
        write_overlay(Path(args.overlay), overlay(image, labels, points=pts))
        print(f"wrote {args.overlay}")
    return 0
