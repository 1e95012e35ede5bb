"""`usam train`: its options, and its output rule (checked before any data is read or training starts); the
training itself is :mod:`usam_bioimageio.training`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Tuple

from usam_bioimageio.cli.files import Output, check_outputs
from usam_bioimageio.errors import InputError, OutputError

CHECKPOINT_FILES = ("best.pt", "latest.pt")


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_train_output(output: Path, inputs: Sequence[Tuple[str, Optional[Path]]], checkpoint: Optional[str], *,
                       overwrite: bool) -> None:
    """``usam train --output``, before any data is read or a model is built (the CLI's output rule,
    ``cli.files.check_outputs``): a folder, writable, never an input (best.pt in --train-images would be read as
    an image next time); the input folders exist; an existing non-empty folder only with --overwrite
    (training writes best.pt / latest.pt and nothing else: --overwrite replaces those two, never another file),
    except when resuming: --checkpoint is a file in --output (its latest.pt or best.pt), read once before the
    first checkpoint is written."""
    output = Path(output)
    for option, path in inputs:
        if path is None:
            continue
        if not Path(path).is_dir():
            raise InputError(f"{option} {path}: no such folder" + (" (a file)" if Path(path).exists() else ""))
    local = Path(checkpoint) if checkpoint is not None and Path(checkpoint).exists() else None
    check_outputs([Output("--output", output, "folder")],
                  list(inputs) + [("--checkpoint", local)], overwrite=overwrite)
    if overwrite or not output.is_dir() or not any(output.iterdir()):
        return
    if local is not None and local.is_file() and _is_within(local, output):
        return  # resuming from a checkpoint of this run
    held = [name for name in CHECKPOINT_FILES if (output / name).exists()]
    what = f"holds checkpoints ({', '.join(held)})" if held else "is not empty"
    resume = f", resume with --checkpoint {output / 'latest.pt'}" if "latest.pt" in held else ""
    raise OutputError(f"--output {output} {what}: pass --overwrite to replace best.pt / latest.pt{resume}, or "
                      "choose a new folder")


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``usam train``: finetune on a dataset folder or on folders of images and label images matched by file
    stem; the output is checked before any data is read or a model is built."""
    from usam_bioimageio.training.trainer import TrainConfig, read_pairs, train

    parser = argparse.ArgumentParser(prog="usam train", description="Finetune SAM with µSAM's iterative prompting.")
    parser.add_argument("--data", type=Path, help="a dataset folder (splits.json, images/, labels/), instead of "
                        "--train-images/--train-labels/--val-images/--val-labels")
    parser.add_argument("--train-split", default="train", help="with --data: the split to train on")
    parser.add_argument("--val-split", default="val", help="with --data: the validation split")
    parser.add_argument("--val-limit", type=int, default=None, help="with --data: the first N validation images")
    parser.add_argument("--train-images", type=Path)
    parser.add_argument("--train-labels", type=Path)
    parser.add_argument("--val-images", type=Path)
    parser.add_argument("--val-labels", type=Path)
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for best.pt / latest.pt: new or empty, or with --overwrite (only those two "
                             "files are replaced), or resumed with --checkpoint OUTPUT/latest.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace best.pt / latest.pt in --output")
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--checkpoint", help="initial SAM / µSAM weights: a file (µSAM's layouts, compact int8 "
                        "files), URL or registry name, as usam export reads them (default: untrained)")
    defaults = TrainConfig()
    for name in ("n_iterations", "n_objects", "batch_size", "epochs", "steps_per_epoch", "early_stopping", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--mask-prob", type=float, default=defaults.mask_prob)
    parser.add_argument("--train-encoder", action="store_true", help="also train the image encoder (slow on CPU)")
    parser.add_argument("--no-ais-decoder", action="store_true",
                        help="do not train µSAM's AIS (UNETR) decoder jointly (trained by default, as in µSAM)")
    parser.add_argument("--ais-min-size", type=int, default=defaults.ais_min_size,
                        help="objects smaller than this are left out of the AIS targets")
    parser.add_argument("--ais-crop", type=int, default=None,
                        help="AIS loss on a random block of N x N embedding cells (16 N pixels of SAM's frame) "
                             "instead of the whole frame: about (64 / N)^2 times less decoder work")
    parser.add_argument("--joint-step", action="store_true",
                        help="one optimiser step on the sum of the prompt and AIS losses (µSAM: two steps)")
    parser.add_argument("--mask-bce", type=float, default=defaults.mask_bce,
                        help="weight of a binary cross-entropy term added to the masks' Dice loss (0: µSAM's Dice "
                             "alone; use about 1 when the prompt decoder starts untrained)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    folders = (args.train_images, args.train_labels, args.val_images, args.val_labels)
    if args.data is not None and any(f is not None for f in folders):
        parser.error("--data replaces --train-images/--train-labels/--val-images/--val-labels")
    if args.data is None and (args.train_images is None or args.train_labels is None):
        parser.error("give --data, or --train-images and --train-labels")
    if (args.val_images is None) != (args.val_labels is None):
        parser.error("--val-images and --val-labels go together")
    check_train_output(args.output, [("--data", args.data), ("--train-images", args.train_images),
                                     ("--train-labels", args.train_labels), ("--val-images", args.val_images),
                                     ("--val-labels", args.val_labels)], args.checkpoint, overwrite=args.overwrite)
    config = TrainConfig(model_type=args.model_type, n_iterations=args.n_iterations, n_objects=args.n_objects,
                         batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                         early_stopping=args.early_stopping, seed=args.seed, lr=args.lr, mask_prob=args.mask_prob,
                         freeze_encoder=not args.train_encoder, device=args.device,
                         train_ais_decoder=not args.no_ais_decoder, ais_min_size=args.ais_min_size,
                         ais_crop=args.ais_crop, ais_separate_step=not args.joint_step,
                         mask_bce=args.mask_bce)
    if args.data is not None:
        from usam_bioimageio.io.datasets import read_split

        train_pairs = read_split(args.data, args.train_split)
        val = read_split(args.data, args.val_split, args.val_limit) if args.val_split else ()
    else:
        train_pairs = read_pairs(args.train_images, args.train_labels)
        val = read_pairs(args.val_images, args.val_labels) if args.val_images else ()
    trainer = train(train_pairs, val, config=config, checkpoint_dir=args.output, initial_weights=args.checkpoint)
    print(f"best validation metric {trainer.best_metric:.4f}; checkpoints in {args.output}")
    return 0
