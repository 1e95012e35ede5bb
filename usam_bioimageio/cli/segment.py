"""`usam segment`: prompted segmentation of a 2D image from a prompt file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from usam_bioimageio.cli.files import load_embeddings_for, read_image, write_png, write_tiff


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
    image = read_image(args.image)
    objects = read_prompts(args.prompts)
    with tqdm(total=2, desc="segment", disable=args.quiet) as bar:
        bar.set_postfix_str("embeddings")
        emb = load_embeddings_for(Path(args.embeddings), image, model) if args.embeddings \
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
    write_tiff(Path(args.out), labels)
    print(f"wrote {args.out} ({int(labels.max())} objects)")
    if args.overlay:
        points = [o.points for o in objects if o.points is not None]
        pts = np.concatenate([np.reshape(p, (-1, 2)) for p in points]) if points else None
        write_png(Path(args.overlay), overlay(image, labels, points=pts))
        print(f"wrote {args.overlay}")
    return 0
