"""`usam track`: tracking of a time series (a folder of frames or a 3D TIFF) into a Cell Tracking Challenge result
folder: automatic (AIS per frame, linked), or interactive with ``--prompts`` (objects prompted on their frames and
followed through time as µSAM's tracking annotator does), and its options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import numpy as np

from usam_bioimageio.cli.automatic import AIS_OPTIONS, add_ais_options, override
from usam_bioimageio.cli.files import (
    check_tile_options,
    IMAGE_SUFFIXES,
    Output,
    add_model_options,
    check_embeddings_for,
    check_outputs,
    check_stack_embeddings_for,
    is_stack,
    load_embeddings_for,
    load_model,
    load_stack_embeddings_for,
    read_image,
    read_image_2d,
    write_ctc_folder,
)
from usam_bioimageio.errors import InputError, UsageError


class _FrameEmbeddings:
    """The per-frame embeddings of a folder of frames (one NAME.zarr / NAME.npz per frame), loaded on access."""

    def __init__(self, paths: List[Path], frames: np.ndarray, model):
        self.paths, self.frames, self.model = paths, frames, model

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, t: int):
        return load_embeddings_for(self.paths[t], self.frames[t], self.model)


def _frame_files(source: Path) -> List[Path]:
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no frames ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    return files


def read_frames(source: Path) -> np.ndarray:
    """The time series of ``usam track``: a folder of 2D frames (sorted by name, all of one shape) or a 3D TIFF
    read as (t, y, x) (the stack rule of ``read_image``); one 2D image is refused (there is nothing to link)."""
    if source.is_dir():
        frames = []
        for path in _frame_files(source):
            frame = read_image_2d(path, "usam track (a folder of frames)")
            if frames and frame.shape != frames[0].shape:
                raise InputError(f"frame {path.name} has shape {frame.shape}, the first frame {frames[0].shape}: "
                                 "the frames of a time series must have one shape")
            frames.append(frame)
        return np.stack(frames)
    image = read_image(source)
    if not is_stack(image):
        raise InputError(f"{source} is one 2D image (shape {image.shape}): usam track needs a time series, a "
                         "folder of 2D frames or a 3D TIFF (t, y, x); segment one image with `usam ais`")
    return image


def _frame_embedding_paths(folder: Path, files: List[Path]) -> List[Path]:
    paths = []
    for path in files:  # a folder as `usam embed --cache FOLDER` writes it for a folder of frames
        candidates = [folder / f"{path.stem}{ext}" for ext in (".zarr", ".npz")]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise InputError(f"no embeddings for frame {path.name} in {folder} (expected {candidates[0].name})")
        paths.append(found)
    return paths


def _track_prompted(args: argparse.Namespace) -> int:
    """``--prompts``: objects prompted on their frames ("t", "track", "division", "parent" in the prompt file),
    followed through time (µSAM's track_from_prompts) -> a CTC result folder."""
    from usam_bioimageio.embeddings.compute import compute_stack_embeddings
    from usam_bioimageio.tracking.interactive import tracks_from_frame_prompts
    from usam_bioimageio.tracking.prompt_file import check_track_prompts, read_track_prompts

    if args.tile_shape is not None or args.halo is not None:
        raise UsageError("--tile-shape / --halo: interactive tracking (--prompts) runs on untiled embeddings")
    if args.embeddings and Path(args.image).is_dir():
        raise UsageError("--prompts with --embeddings needs a 3D TIFF and its stack cache "
                         "(`usam embed --cache PATH --stack`); for a folder of frames leave --embeddings out")
    source, out = Path(args.image), Path(args.out)
    check_outputs([Output("--out", out, "ctc")], [("--image", source), ("--prompts", args.prompts),
                                                 ("--embeddings", args.embeddings)], overwrite=args.overwrite)
    prompts = read_track_prompts(args.prompts)
    frames = read_frames(source)
    if frames.shape[0] < 2:
        raise InputError(f"{source} holds one frame: there is nothing to track")
    check_track_prompts(prompts, frames.shape[0], frames.shape[1:3], args.prompts)
    if args.embeddings:
        check_stack_embeddings_for(Path(args.embeddings), frames)
    model = load_model(args)
    embeddings = load_stack_embeddings_for(Path(args.embeddings), frames, model) if args.embeddings \
        else compute_stack_embeddings(model, frames, progress=not args.quiet)
    tracks = tracks_from_frame_prompts(model, embeddings, prompts=prompts, projection=args.projection,
                                       iou_threshold=args.iou_threshold, motion_smoothing=args.motion_smoothing,
                                       box_extension=args.box_extension, progress=not args.quiet)
    write_ctc_folder(out, tracks, overwrite=args.overwrite)
    n_div = len(set(tracks.parents().values()))
    print(f"wrote {out}: {tracks.n_frames} frames, {len(tracks.tracks)} tracks, {n_div} divisions")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from usam_bioimageio.automatic.ais.postprocess import AIS_PRESETS, AisParameters
    from usam_bioimageio.tracking.automatic import track_frames
    from usam_bioimageio.tracking.linking import motile_available

    if args.prompts:
        return _track_prompted(args)
    check_tile_options(args)
    if args.solver == "motile" and not motile_available():
        raise UsageError("--solver motile needs motile and ilpy (pip install 'usam-bioimageio[tracking]'); or use "
                         "--solver greedy")
    params = override(AIS_PRESETS[args.preset] if args.preset else AisParameters(), args, AIS_OPTIONS)
    source, out = Path(args.image), Path(args.out)
    # the output folder and every input are checked before the model is loaded or anything is computed
    check_outputs([Output("--out", out, "ctc")], [("--image", source), ("--embeddings", args.embeddings)],
                  overwrite=args.overwrite)
    frames = read_frames(source)
    emb_paths: Optional[List[Path]] = None
    if args.embeddings and source.is_dir():
        emb_paths = _frame_embedding_paths(Path(args.embeddings), _frame_files(source))
        for path, frame in zip(emb_paths, frames):
            check_embeddings_for(path, frame)
    elif args.embeddings:
        check_stack_embeddings_for(Path(args.embeddings), frames)
    model = load_model(args)
    if emb_paths is not None:
        embeddings = _FrameEmbeddings(emb_paths, frames, model)
    elif args.embeddings:
        embeddings = load_stack_embeddings_for(Path(args.embeddings), frames, model)
    else:
        embeddings = None
    halo = args.halo if args.halo is not None or args.tile_shape is None else (0, 0)
    tracks = track_frames(model, frames, params=params, embeddings=embeddings, solver=args.solver,
                          tile_shape=args.tile_shape, halo=halo, progress=not args.quiet)
    write_ctc_folder(out, tracks, overwrite=args.overwrite)
    n_div = len(set(tracks.parents().values()))
    print(f"wrote {out}: {tracks.n_frames} frames, {len(tracks.tracks)} tracks, {n_div} divisions")
    return 0


def add_track_parser(sub) -> None:
    from usam_bioimageio.automatic.ais.postprocess import AIS_PRESETS

    text = ("automatic tracking: AIS on every frame (the family's AIS packages), linked with divisions (motile when "
            "installed, else a greedy linker) -> a Cell Tracking Challenge result folder (maskTTT.tif + "
            "res_track.txt); with --prompts, interactive tracking: objects prompted on their frames, followed "
            "through time as µSAM's tracking annotator does")
    p = sub.add_parser("track", help=text, description=text)
    add_model_options(p)
    p.add_argument("--image", required=True,
                   help="the time series: a folder of 2D frames (sorted by name) or a 3D TIFF read as (t, y, x); "
                        "one 2D image is refused")
    p.add_argument("--out", required=True,
                   help="CTC result folder (new or empty; with --overwrite an earlier CTC result is replaced)")
    p.add_argument("--embeddings", default=None,
                   help="precomputed embeddings: for a 3D TIFF a stack cache (`usam embed --cache PATH --stack`), "
                        "for a folder of frames the folder holding NAME.zarr (or NAME.npz) per frame")
    p.add_argument("--solver", default="auto", choices=["auto", "motile", "greedy"],
                   help="linker: motile's exact ILP, or the greedy frame-by-frame linker (auto: motile when "
                        "installed)")
    p.add_argument("--tile-shape", type=int, nargs=2, metavar=("Y", "X"), default=None,
                   help="compute tiled embeddings of every frame (micro-sam's tiling)")
    p.add_argument("--halo", type=int, nargs=2, metavar=("Y", "X"), default=None,
                   help="overlap around each tile (default 0 0)")
    p.add_argument("--preset", default=None, choices=sorted(AIS_PRESETS),
                   help="µSAM's per-model AIS settings (default: µSAM's library defaults)")
    add_ais_options(p)
    from usam_bioimageio.tracking.interactive import (DEFAULT_BOX_EXTENSION, DEFAULT_IOU_THRESHOLD,
                                                      DEFAULT_MOTION_SMOOTHING, DEFAULT_PROJECTION)
    from usam_bioimageio.volumes.interactive import PROJECTION_MODES

    g = p.add_argument_group("interactive tracking (µSAM's track_from_prompts; defaults: its tracking annotator's)")
    g.add_argument("--prompts", default=None,
                   help="track prompted objects instead of AIS: a JSON prompt file whose objects name their frame "
                        "\"t\" and \"track\" (and \"division\", \"parent\", \"stop\"; see "
                        "usam_bioimageio.tracking.prompt_file); --embeddings: a stack cache of a 3D TIFF")
    g.add_argument("--projection", default=DEFAULT_PROJECTION, choices=PROJECTION_MODES,
                   help=f"prompts from the previous frame's mask (default {DEFAULT_PROJECTION})")
    g.add_argument("--iou-threshold", type=float, default=DEFAULT_IOU_THRESHOLD,
                   help="after the last prompted frame, stop where the IoU with the (shifted) previous mask drops "
                        f"below this (default {DEFAULT_IOU_THRESHOLD})")
    g.add_argument("--motion-smoothing", type=float, default=DEFAULT_MOTION_SMOOTHING,
                   help=f"weight of the old motion in the smoothed centre shift (default {DEFAULT_MOTION_SMOOTHING})")
    g.add_argument("--box-extension", type=float, default=DEFAULT_BOX_EXTENSION,
                   help=f"box from the mask grown by this fraction (default {DEFAULT_BOX_EXTENSION})")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier CTC result in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_track)
