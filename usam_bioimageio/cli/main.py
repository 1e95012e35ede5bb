"""The ``usam`` command: its parser and its one error policy; each verb group lives in a module of its own
(packages: export / validate, embed, segment, automatic: ais / amg (2D and 3D), track, evaluate; train
(the training itself: usam_bioimageio.training))."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from usam_bioimageio import __version__
from usam_bioimageio.cli.automatic import add_automatic_parsers
from usam_bioimageio.cli.embed import cmd_embed
from usam_bioimageio.cli.evaluate import cmd_evaluate
from usam_bioimageio.cli.files import add_model_options, add_tile_options
from usam_bioimageio.cli.scale import add_scale_option
from usam_bioimageio.cli.packages import cmd_export, cmd_validate
from usam_bioimageio.cli.segment import cmd_segment
from usam_bioimageio.cli.track import add_track_parser
from usam_bioimageio.errors import UsageError, UsamError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usam", description="Segment Anything for Microscopy as bioimage.io packages.")
    parser.add_argument("--version", action="version", version=f"usam {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message (before the command: "
                             "usam --debug segment ...)")
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
    p.add_argument("--encoder-variants", nargs="+", choices=["int8", "fp16"], default=[],
                   help="also write reduced-precision image encoders (ONNX; never the default; see "
                        "usam_exporters.precision), listed in family.yaml, used with --encoder-precision")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", add_help=False, help="finetune with µSAM's iterative prompting (usam train --help)")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("validate", help="run bioimageio.core's test on packages (every weight format)")
    p.add_argument("packages", nargs="+")
    p.set_defaults(func=cmd_validate)

    for name, func, helptext in (("embed", cmd_embed, "compute image embeddings (.npz, or a cache for large "
                                                       "images, stacks and folders)"),
                                 ("segment", cmd_segment, "segment objects from prompts -> label image (TIFF or PNG)")):
        p = sub.add_parser(name, help=helptext)
        add_model_options(p)
        if name == "embed":
            p.add_argument("--image", required=True,
                           help="2D image (TIFF, PNG, ...), 3D TIFF stack / time series, or a folder of images")
            p.add_argument("--out", default=None, help="output .npz (one 2D image, no tiling)")
            p.add_argument("--cache", default=None,
                           help="embedding cache folder (zarr) to create or resume; for a folder of images, a "
                                "folder holding one NAME.zarr cache per image")
            add_tile_options(p, "tile the image(s) (micro-sam's tiling); needs --cache",
                             "overlap added around each tile (default 0 0; N / 8 with --tile-shape auto)")
            p.add_argument("--stack", action="store_true",
                           help="read the image as a stack (z, y, x[, c]) and embed each slice (automatic for "
                                "4D arrays and 3D arrays whose last axis is longer than 4)")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        else:
            p.add_argument("--image", required=True, help="2D image (TIFF, PNG, ...)")
            p.add_argument("--out", required=True, help="label image: .tif (uint32, 0 = background) or .png (16-bit, "
                                                        "up to 65535 objects)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        p.set_defaults(func=func)
    p.add_argument("--prompts", required=True, help="prompts as JSON or CSV (see usam_bioimageio.prompting.predict.read_prompts)")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings: .npz from `usam embed --out`, or a cache folder from "
                        "`usam embed --cache` (tiled too) or micro-sam's precompute_image_embeddings")
    p.add_argument("--overlay", default=None, help="also write an overlay of the labels (.png or .tif)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tile_options(p, "compute tiled embeddings (micro-sam's tiling; each object is answered from the tile holding "
                        "its prompts' centre)", "overlap around each tile; should cover the largest object (default "
                        "0 0; N / 8 with --tile-shape auto)")
    add_scale_option(p, "each mask shrunk back to the image")
    from usam_bioimageio.volumes.interactive import (DEFAULT_BOX_EXTENSION, DEFAULT_IOU_THRESHOLD, DEFAULT_PROJECTION,
                                                     PROJECTION_MODES)

    g = p.add_argument_group("volumes (µSAM's interactive 3D; defaults: its annotator's)")
    g.add_argument("--volume", action="store_true",
                   help="--image is a stack (z, y, x): each object is prompted on its slice (\"z\" in the prompt "
                        "file) and projected up and down through the stack -> a 3D label TIFF; --embeddings: a stack "
                        "cache (usam embed --cache PATH --stack)")
    g.add_argument("--projection", default=DEFAULT_PROJECTION, choices=PROJECTION_MODES,
                   help=f"prompts from the previous slice's mask (default {DEFAULT_PROJECTION})")
    g.add_argument("--iou-threshold", type=float, default=DEFAULT_IOU_THRESHOLD,
                   help=f"stop where the IoU with the previous slice drops below this (default {DEFAULT_IOU_THRESHOLD})")
    g.add_argument("--box-extension", type=float, default=DEFAULT_BOX_EXTENSION,
                   help=f"box from the mask grown by this fraction (default {DEFAULT_BOX_EXTENSION})")
    add_automatic_parsers(sub)
    add_track_parser(sub)

    from usam_bioimageio.evaluation.report import MODES

    p = sub.add_parser("evaluate", help="interactive, AIS, AMG and baseline evaluation on a dataset -> report",
                       description="Evaluate a model family on a dataset with splits.json, images/, labels/ (the "
                                   "layout of ../shared/data/dsb2018): AIS / AMG thresholds by grid search on the "
                                   "validation split, everything scored on the test split; writes report.md, "
                                   "results.json and plots.")
    add_model_options(p)
    p.add_argument("--data", required=True, help="dataset folder (splits.json, images/, labels/)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", default="test")
    p.add_argument("--limit", type=int, default=None, help="use the first N images of each split")
    p.add_argument("--n-iterations", type=int, default=8, help="interactive rounds (start + corrections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")).strip()
    return text or type(err).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """``usam``: one error policy for every verb. Errors a user can cause (our ``UsamError``s, bad values,
    files: ``ValueError``, ``OSError``) are one line on stderr and exit status 1; options that do not go together
    exit with 2, as argparse's usage errors do. Anything else is a bug of ours: one line saying so, exit 1.
    ``usam --debug ...`` re-raises every error, to show its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = False
    while argv[:1] == ["--debug"]:  # a global flag, before the verb (train has a parser of its own)
        debug, argv = True, argv[1:]
    if argv[:1] == ["train"]:  # its own parser (argparse REMAINDER would swallow nothing before --help)
        command = "train"

        def run() -> int:
            from usam_bioimageio.cli.train import train_main

            return train_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]
        command = args.command

        def run() -> int:
            return args.func(args)
    try:
        return run()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"usam {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, UsageError):
            print(f"usam {command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, (UsamError, ValueError, OSError)):
            print(f"usam {command}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        if isinstance(err, MemoryError):
            print(f"usam {command}: error: out of memory (a smaller image, or tiles with --tile-shape, need less)",
                  file=sys.stderr)
            return 1
        print(f"usam {command}: internal error: {type(err).__name__}: {_one_line(err)} (a bug in usam; run "
              f"`usam --debug {command} ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
