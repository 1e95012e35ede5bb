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
    from usam_bioimageio.training.recipe import STAGES, RecipeConfig
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
    parser.add_argument("--image-size", type=int, default=1024, choices=[256, 512, 1024],
                        help="the model's input size (SAM: 1024); embeddings are N / 16, low-res masks N / 4")
    parser.add_argument("--stage", choices=list(STAGES), default=None,
                        help="train from scratch in stages (usam_bioimageio.training.recipe): 'ais' = image encoder "
                             "+ AIS decoder on random native-resolution crops; 'prompts' = the prompt decoder on "
                             "the --checkpoint of stage 'ais' (class-balanced BCE, µSAM's corrective points). "
                             "Without --stage: µSAM's finetuning (usam_bioimageio.training.trainer)")
    # None: the default of the chosen trainer (TrainConfig or RecipeConfig)
    for name in ("n_iterations", "n_objects", "batch_size", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("epochs", "steps_per_epoch", "early_stopping"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--mask-prob", type=float, default=None)
    parser.add_argument("--train-encoder", action="store_true", help="also train the image encoder (slow on CPU)")
    recipe = parser.add_argument_group("with --stage")
    recipe.add_argument("--steps", type=int, default=RecipeConfig.steps, help="optimiser steps in total")
    recipe.add_argument("--checkpoint-every", type=int, default=RecipeConfig.checkpoint_every,
                        help="write latest.pt (exact resumption state) and the curves every N steps")
    recipe.add_argument("--val-every", type=int, default=RecipeConfig.val_every, help="validate every N steps")
    recipe.add_argument("--warmup", type=int, default=RecipeConfig.warmup, help="linear learning-rate warm-up steps")
    recipe.add_argument("--weight-decay", type=float, default=RecipeConfig.weight_decay)
    recipe.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    recipe.add_argument("--no-progress", action="store_true", help="no progress bar")
    recipe.add_argument("--frame-prob", type=float, default=RecipeConfig.frame_prob,
                        help="share of samples in the runtime's frame (the whole image resized to --image-size, as "
                             "usam ais / segment see it untiled); the rest are native-resolution crops. Validation "
                             "then runs in that frame too")
    recipe.add_argument("--mask-dice", type=float, default=RecipeConfig.mask_dice,
                        help="stage prompts: weight of µSAM's Dice loss added to the class-balanced BCE of each mask "
                             "(the BCE starts an untrained decoder; Dice then rewards overlap, what IoU measures)")
    recipe.add_argument("--bf16", action="store_true",
                        help="training steps under bfloat16 autocast (faster on CPUs with bf16 instructions and on "
                             "GPUs; weights, optimiser, validation and the checkpoints stay float32)")
    recipe.add_argument("--encoder-batchnorm", choices=("batch", "frozen"), default=RecipeConfig.encoder_batchnorm,
                        help="the image encoder's BatchNorm in training: 'batch' statistics (recalibrated before "
                             "each validation) or 'frozen' running statistics (set when the run starts), the "
                             "normalisation inference uses")
    recipe.add_argument("--scale", type=float, default=RecipeConfig.scale,
                        help="native-resolution crops from the images enlarged by this factor (frame samples unaffected)")
    recipe.add_argument("--val-msa", action="store_true",
                        help="stage ais: keep best.pt by the AIS mSA of the validation images (runtime frame; "
                             "without --frame-prob: their centre crops at --scale) instead of the AIS loss")
    parser.add_argument("--no-ais-decoder", action="store_true",
                        help="do not train µSAM's AIS (UNETR) decoder jointly (trained by default, as in µSAM)")
    parser.add_argument("--ais-min-size", type=int, default=None,
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
    given = {k: getattr(args, k) for k in ("n_iterations", "n_objects", "batch_size", "seed", "lr", "mask_prob")
             if getattr(args, k) is not None}
    if args.stage is not None:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        config = RecipeConfig(stage=args.stage, model_type=args.model_type, image_size=args.image_size,
                              steps=args.steps, checkpoint_every=args.checkpoint_every, val_every=args.val_every,
                              warmup=args.warmup, weight_decay=args.weight_decay, device=args.device,
                              ais_crop=args.ais_crop, train_encoder=args.train_encoder,
                              frame_prob=args.frame_prob, val_msa=args.val_msa, bf16=args.bf16,
                              mask_dice=args.mask_dice, encoder_batchnorm=args.encoder_batchnorm,
                              scale=args.scale,
                              **({"ais_min_size": args.ais_min_size} if args.ais_min_size is not None else {}),
                              **given)
    else:
        config = TrainConfig(model_type=args.model_type, image_size=args.image_size, epochs=args.epochs,
                             steps_per_epoch=args.steps_per_epoch, early_stopping=args.early_stopping,
                             freeze_encoder=not args.train_encoder, device=args.device,
                             train_ais_decoder=not args.no_ais_decoder, ais_min_size=args.ais_min_size or 0,
                             ais_crop=args.ais_crop, ais_separate_step=not args.joint_step,
                             mask_bce=args.mask_bce, **given)
    if args.data is not None:
        from usam_bioimageio.io.datasets import read_split

        train_pairs = read_split(args.data, args.train_split)
        val = read_split(args.data, args.val_split, args.val_limit) if args.val_split else ()
    else:
        train_pairs = read_pairs(args.train_images, args.train_labels)
        val = read_pairs(args.val_images, args.val_labels) if args.val_images else ()
    if args.stage is not None:
        return _train_stage(config, train_pairs, val, args)
    trainer = train(train_pairs, val, config=config, checkpoint_dir=args.output, initial_weights=args.checkpoint)
    print(f"best validation metric {trainer.best_metric:.4f}; checkpoints in {args.output}")
    return 0


def _train_stage(config, train_pairs, val, args) -> int:
    """One stage of the recipe: resumed when --checkpoint is this stage's latest.pt in --output (then it
    continues exactly), else started from --checkpoint's weights (or from scratch)."""
    import torch

    from usam_bioimageio.training.recipe import STATE_KEY, RecipeTrainer

    resume = None
    initial = args.checkpoint
    if args.checkpoint is not None and Path(args.checkpoint).is_file() and _is_within(Path(args.checkpoint), args.output):
        raw = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and raw.get(STATE_KEY, {}).get("stage") == config.stage:
            resume, initial = Path(args.checkpoint), None
            done = int(raw[STATE_KEY].get("step", 0))
            if done >= config.steps:  # a finished stage of a build that is rerun: no data preparation
                print(f"stage {config.stage}: {resume} is at step {done} of {config.steps}; nothing to do")
                return 0
        del raw
    trainer = RecipeTrainer(train_pairs, val, config, initial_weights=initial)
    if resume is not None:
        trainer.resume(resume)
        print(f"resumed from {resume} at step {trainer.step}")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    trainer.fit(args.output, progress=not args.no_progress)
    print(f"stage {config.stage}: {trainer.step} steps, {trainer.cpu_seconds / 3600:.2f} CPU-hours in total, best "
          f"validation metric {trainer.best_metric:.4f}; checkpoints and curves in {args.output}")
    return 0
