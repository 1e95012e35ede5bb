"""`usam segment`: prompted segmentation of a 2D image from a prompt file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from usam_bioimageio.cli.files import (
    Output,
    check_embeddings_for,
    check_label_count,
    check_outputs,
    load_embeddings_for,
    read_image_2d,
    write_labels,
    write_overlay,
)


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.embeddings.types import TiledEmbeddings
    from usam_bioimageio.io.overlay import overlay
    from usam_bioimageio.io.prompt_files import check_prompts_inside, read_prompts
    from usam_bioimageio.prompting.predict import label_objects
    from usam_bioimageio.prompting.tiled import label_objects_tiled
    from usam_bioimageio.runtime.model import SamModel

    # every input and output is checked before the model is loaded or anything is computed
    image = read_image_2d(args.image, "usam segment")
    objects = read_prompts(args.prompts)
    check_prompts_inside(objects, image.shape[:2], args.prompts)
    out = Output("--out", Path(args.out), "labels")
    outputs = [out] + ([Output("--overlay", Path(args.overlay), "overlay")] if args.overlay else [])
    check_outputs(outputs, [("--image", args.image), ("--prompts", args.prompts), ("--embeddings", args.embeddings)],
                  overwrite=args.overwrite)
    check_label_count(out, len(objects))
    if args.embeddings:
        check_embeddings_for(Path(args.embeddings), image)

    model = SamModel.load(args.model, weight_format=args.weight_format)
    with tqdm(total=2, desc="segment", disable=args.quiet) as bar:
        bar.set_postfix_str("embeddings")
        emb = load_embeddings_for(Path(args.embeddings), image, model) if args.embeddings \
            else compute_embeddings(model, image)
        bar.update()
        bar.set_postfix_str(f"{len(objects)} objects")
        if isinstance(emb, TiledEmbeddings):
            labels = label_objects_tiled(model, emb, objects)
        else:
            labels = label_objects(model, emb, objects)  # in batches: memory bounded for thousands of objects
        bar.update()
    write_labels(out.path, labels)
    print(f"wrote {args.out} ({int(labels.max())} objects)")
    if args.overlay:
        points = [o.points for o in objects if o.points is not None]
        pts = np.concatenate([np.reshape(p, (-1, 2)) for p in points]) if points else None
        write_overlay(Path(args.overlay), overlay(image, labels, points=pts))
        print(f"wrote {args.overlay}")
    return 0
