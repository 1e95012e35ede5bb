"""The ``--scale`` option of ``usam ais`` and ``usam segment``: the pixel scale a run segments at.

A model trained on enlarged images (``usam train --scale S``) records S (``config.usam.pixel_scale``) and runs at
it by default: the image is enlarged S times before it is encoded (tiled with ``--tile-shape``), the results are
brought back to the image's size. Where that cannot happen (embeddings of the image as it is, a stack) the run is
refused unless ``--scale`` says which scale to use, rather than giving results of another scale silently."""

from __future__ import annotations

import argparse

from usam_bioimageio.errors import UsageError


def add_scale_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--scale", type=float, default=None,
                   help="resize the image by this factor before encoding (a model trained on enlarged images: "
                        f"`usam train --scale`), {what}; --tile-shape is then in the resized image's pixels (default: "
                        "the model's pixel scale, config.usam.pixel_scale, 1 unless recorded)")


def parse_scale(args: argparse.Namespace) -> None:
    """``args.scale`` checked (None stays None: the model's scale, known once it is loaded); a bad value or one
    given with --embeddings is a usage error."""
    from usam_bioimageio.runtime.pixel_scale import check_scale

    try:
        args.scale = None if args.scale is None else check_scale(args.scale)
    except ValueError as e:
        raise UsageError(f"--scale: {e}") from None
    if args.scale not in (None, 1.0) and args.embeddings:
        raise UsageError("--scale encodes the resized image; do not give --embeddings with it")


def run_scale(args: argparse.Namespace, model) -> float:
    """The pixel scale this run segments at: --scale if given, else the model's (``config.usam.pixel_scale``);
    1 for a command without --scale."""
    given = getattr(args, "scale", 1.0)
    return model.pixel_scale if given is None else given


def refuse_model_scale(args: argparse.Namespace, model, what: str) -> None:
    """A model trained at a pixel scale other than 1 runs at it by default, except on ``what`` (embeddings of the
    image as it is, a stack): the user decides with --scale 1 rather than getting labels of another scale silently."""
    if getattr(args, "scale", 1.0) is None and model.pixel_scale != 1.0:
        raise UsageError(f"this model runs at pixel scale {model.pixel_scale:g} (config.usam.pixel_scale), which "
                         f"{what} cannot; give --scale 1 to segment at the image's own scale")
