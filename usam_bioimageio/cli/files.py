"""The files the CLI reads and writes: the one output rule (checked before any computation), atomic label / overlay
writes, images (one reader, one stack rule) and the embeddings given with --embeddings.

The output rule, the same for every command: an output is never one of the command's inputs (compared as resolved
paths and, for files that exist, ``os.path.samefile``) nor another output; its format follows its extension and
must hold the result; it is not an existing folder; its folder (or the nearest one that exists) is writable; an
existing output is replaced only with ``--overwrite``. Files are written to a hidden ``.part`` file beside the
output and moved into place, and the ``.part`` file is removed when writing fails.

A folder of results (``usam track``'s CTC folder) follows the same rule as a whole: a new or empty folder is
written; an existing non-empty one is replaced only with ``--overwrite`` and only when it holds nothing but such
results (so no other file is ever deleted); it is written beside as a hidden ``.part`` folder and swapped in.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

from usam_bioimageio.errors import OutputError, UsageError
from usam_bioimageio.evaluation.report import REPORT_FILES
from usam_bioimageio.io.images import is_stack, read_image, read_image_2d

__all__ = ["IMAGE_SUFFIXES", "Output", "atomic_write", "check_embeddings_for", "check_label_count", "check_outputs",
           "check_stack_embeddings_for", "is_stack", "load_embeddings_for", "load_stack_embeddings_for", "read_image",
           "read_image_2d", "write_ctc_folder", "write_labels", "write_overlay"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
LABEL_FORMATS = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG"}
OVERLAY_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}
MAX_PNG_LABEL = 65535  # 16-bit PNG


class TileShapeAction(argparse.Action):
    """``--tile-shape Y X`` (two integers) or ``--tile-shape auto`` (the tiling derived from the model's input size:
    ``usam_bioimageio.embeddings.types.resolve_tiling``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from usam_bioimageio.embeddings.types import AUTO_TILING

        if list(values) == [AUTO_TILING]:
            setattr(namespace, self.dest, AUTO_TILING)
            return
        try:
            if len(values) != 2:
                raise ValueError
            setattr(namespace, self.dest, [int(v) for v in values])
        except ValueError:
            parser.error(f"argument {option_string}: give two integers Y X or '{AUTO_TILING}', got {' '.join(values)}")


def add_model_options(p) -> None:
    """--model, --weight-format, --device and --encoder-precision: the model a verb runs, and where."""
    p.add_argument("--model", required=True, help="family folder, package zip/folder, URL or bioimage.io id")
    p.add_argument("--weight-format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where the packages run (default cpu; cuda: ONNX Runtime's CUDA provider from "
                        "onnxruntime-gpu, or torch's GPU for torchscript; auto: cuda where available, else cpu)")
    p.add_argument("--encoder-precision", default="fp32", choices=["fp32", "int8", "fp16"],
                   help="the family's reduced-precision image encoder instead of the fp32 one (faster, not equal to "
                        "it: its measured loss is in its README; written by usam export --encoder-variants)")


def load_model(args):
    """The SamModel of the options added by :func:`add_model_options`."""
    from usam_bioimageio.runtime.model import SamModel

    return SamModel.load(args.model, weight_format=args.weight_format, device=args.device,
                         encoder_precision=args.encoder_precision)


def add_tile_options(p, tile_help: str, halo_help: str) -> None:
    """The ``--tile-shape`` / ``--halo`` options of ``usam embed``, ``ais`` and ``amg``."""
    p.add_argument("--tile-shape", nargs="+", action=TileShapeAction, metavar="Y X | auto", default=None,
                   help=tile_help + "; 'auto': tiles of the model's input size N (outer tiles N x N with a halo of "
                                    "N / 8, for images larger than N; smaller images are not tiled)")
    p.add_argument("--halo", type=int, nargs=2, metavar=("Y", "X"), default=None, help=halo_help)


def check_tile_options(args) -> None:
    """Usage errors of the options :func:`add_tile_options` adds: --halo without --tile-shape, and tiling given with
    --embeddings (where the command has it), whose cache records its own."""
    if args.halo is not None and args.tile_shape is None:
        raise UsageError("--halo needs --tile-shape")
    if getattr(args, "embeddings", None) and args.tile_shape is not None:
        raise UsageError("--tile-shape and --halo are read from the embedding cache; do not give them with "
                         "--embeddings")


@dataclass(frozen=True)
class Output:
    """An output the command will write: ``kind`` is labels, overlay, npz, report (a folder), folder (of outputs),
    cache (a folder that is resumed, never replaced) or ctc (a CTC result folder, replaced as a whole)."""

    option: str
    path: Path
    kind: str


def _identity(path: Path):
    """(device, inode) of an existing path (the same file under two names: os.path.samefile), else None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_format(out: Output) -> None:
    suffix = out.path.suffix.lower()
    if out.kind == "labels" and suffix not in LABEL_FORMATS:
        raise OutputError(f"{out.option} {out.path}: label images are written as TIFF (.tif, .tiff) or PNG (.png, "
                          f"up to {MAX_PNG_LABEL} labels), not {suffix or 'a file without suffix'}")
    if out.kind == "overlay" and suffix not in OVERLAY_FORMATS:
        raise OutputError(f"{out.option} {out.path}: overlays are written as PNG (.png) or TIFF (.tif, .tiff), not "
                          f"{suffix or 'a file without suffix'}")
    if out.kind == "npz" and suffix != ".npz":
        raise OutputError(f"{out.option} {out.path}: embeddings are written as .npz, not "
                          f"{suffix or 'a file without suffix'}")


def _check_writable(out: Output, checked: set) -> None:
    """The nearest existing folder of ``out`` must be a folder we can create files in (a real probe: root passes
    every permission check, not a read-only file system)."""
    folder = out.path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder in checked:
        return
    checked.add(folder)
    if not folder.is_dir():
        raise OutputError(f"{out.option} {out.path}: {folder} is a file, not a folder; choose another output path")
    probe = folder / f".usam-write-test.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        probe.open("xb").close()
    except OSError as err:
        raise OutputError(f"{out.option} {out.path}: cannot write in {folder} ({err.strerror or err}); choose a "
                          "folder you can write to") from None
    else:
        probe.unlink(missing_ok=True)


# what a CTC result folder holds (tracking.ctc.write_ctc): only such a folder is ever replaced
CTC_RESULT_FILE = re.compile(r"^(?:mask\d+\.tiff?|res_track\.txt)$")


def _check_ctc_folder(out: Output, overwrite: bool) -> None:
    path = out.path
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{out.option} {path} exists and is not a folder: give a folder for the CTC result")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"{out.option} {path} is not empty: pass --overwrite to replace the CTC result in it, or "
                          "choose a new folder")
    foreign = sorted(p.name for p in path.iterdir() if not (p.is_file() and CTC_RESULT_FILE.match(p.name)))
    if foreign:
        raise OutputError(f"{out.option} {path} holds other files than a CTC result ({', '.join(foreign[:3])}): "
                          "--overwrite only replaces a CTC result folder; choose a new folder")


def check_outputs(outputs: Iterable[Output], inputs: Iterable[Tuple[str, Optional[os.PathLike]]], *,
                  overwrite: bool) -> None:
    """The output rule (module doc) for every output, before anything is computed; OutputError names the option,
    the path and what to do. ``inputs``: (option, path or None) of every file or folder the command reads."""
    outputs = list(outputs)
    known: dict = {}  # resolved path or (device, inode) -> ("input" | "output", option)
    for option, p in inputs:
        if p is not None:
            for key in (Path(p).resolve(), _identity(Path(p))):
                if key is not None:
                    known.setdefault(key, ("input", option))
    checked: set = set()
    for out in outputs:
        _check_format(out)
        for key in (out.path.resolve(), _identity(out.path)):
            if key is None or key not in known:
                continue
            role, option = known[key]
            if role == "input":
                raise OutputError(f"{out.option} {out.path} is the {option} input: usam never writes over its "
                                  "inputs; choose another output path")
            raise OutputError(f"{out.option} and {option} are the same file {out.path}: give them different paths")
        for key in (out.path.resolve(), _identity(out.path)):
            if key is not None:
                known[key] = ("output", out.option)
        path = out.path
        if out.kind == "ctc":
            _check_ctc_folder(out, overwrite)
        elif out.kind in ("report", "cache", "folder"):
            if path.exists() and not path.is_dir():
                raise OutputError(f"{out.option} {path} is a file; it must be a folder (a new path, or an existing "
                                  "folder)")
            if out.kind == "report" and not overwrite and any((path / name).exists() for name in REPORT_FILES):
                raise OutputError(f"{out.option} {path} holds a report already: pass --overwrite to replace it, "
                                  "or choose another folder")
        elif path.is_dir():
            raise OutputError(f"{out.option} {path} is a folder; give a file path (e.g. {path / 'labels.tif'})"
                              if out.kind == "labels" else f"{out.option} {path} is a folder; give a file path")
        elif (path.exists() or path.is_symlink()) and not overwrite:
            raise OutputError(f"{out.option} {path} exists: pass --overwrite to replace it, or choose another path")
        _check_writable(out, checked)


def check_label_count(out: Output, n_labels: int) -> None:
    """A PNG holds labels up to 65535; refuse before computing when the count is known (``usam segment``)."""
    if out.path.suffix.lower() == ".png" and n_labels > MAX_PNG_LABEL:
        raise OutputError(f"{out.option} {out.path}: {n_labels} objects do not fit a 16-bit PNG (at most "
                          f"{MAX_PNG_LABEL} labels): write a .tif instead")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a hidden ``.part`` file beside ``path``, then move it into place; the ``.part`` file is
    removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_labels(path: Path, labels: np.ndarray, option: str = "--out") -> None:
    """Labels as TIFF (.tif / .tiff; uint32, zlib) or PNG (.png; 16-bit, only up to 65535 labels)."""
    path = Path(path)
    fmt = LABEL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        _check_format(Output(option, path, "labels"))
    if fmt == "PNG":
        top = int(labels.max()) if labels.size else 0
        if top > MAX_PNG_LABEL:
            raise OutputError(f"{option} {path}: {top} labels do not fit a 16-bit PNG (at most {MAX_PNG_LABEL}): "
                              "write a .tif instead")

        def write(tmp: Path) -> None:
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)).save(tmp, format="PNG")
    else:
        def write(tmp: Path) -> None:
            import tifffile

            tifffile.imwrite(tmp, labels, compression="zlib")
    atomic_write(path, write)


def write_ctc_folder(path: Path, tracks, *, overwrite: bool, option: str = "--out") -> None:
    """``tracks`` (``CtcTracks``) as a CTC result folder at ``path``: written to a hidden ``.part`` folder beside it,
    then swapped in (an old result is renamed aside and removed only once the new one is in place); the rule of
    the module doc is checked again first (the folder may have changed while the command ran)."""
    from usam_bioimageio.tracking.ctc import write_ctc

    path = Path(path)
    out = Output(option, path, "ctc")
    _check_ctc_folder(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    staging = path.with_name(f".{path.name}.{tag}.part")
    old = path.with_name(f".{path.name}.{tag}.old")
    try:
        write_ctc(folder=staging, tracks=tracks)
        _check_ctc_folder(out, overwrite)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_overlay(path: Path, rgb: np.ndarray) -> None:
    """An RGB overlay as PNG or TIFF, by the extension."""
    path = Path(path)

    def write(tmp: Path) -> None:
        if OVERLAY_FORMATS.get(path.suffix.lower()) == "TIFF":
            import tifffile

            tifffile.imwrite(tmp, rgb, photometric="rgb")
        else:
            from PIL import Image

            Image.fromarray(rgb).save(tmp, format="PNG")
    atomic_write(path, write)


def check_embeddings_for(path: Path, image: np.ndarray) -> None:
    """--embeddings: refuse, before any model is loaded, an .npz or cache of another image (or that cannot be read)."""
    from usam_bioimageio.embeddings.npz import load_embeddings
    from usam_bioimageio.errors import InputError

    path = Path(path)
    if not path.exists():
        raise InputError(f"no embeddings at {path}: give an .npz of `usam embed --out` or a cache folder of "
                         "`usam embed --cache`")
    if not path.is_dir():
        emb = load_embeddings(path, image=image)
        _check_shape(path, emb.original_shape, image)
        return
    from usam_bioimageio.embeddings.cache import EmbeddingCache, check_micro_sam_cache, data_sha256, is_micro_sam_cache

    if is_micro_sam_cache(path):
        check_micro_sam_cache(path, image)  # the sha1 micro-sam records; shapes are checked once loaded
        return
    cache = EmbeddingCache.read(path)
    if cache.signature.get("data_sha256") != data_sha256(image):
        raise InputError(f"the embedding cache {path} was computed for another image than {image.shape} "
                         f"{image.dtype} read from the --image file: give that image's cache, or compute one with "
                         "`usam embed --cache`")
    if cache.signature.get("kind") == "stack":
        raise InputError(f"{path} holds embeddings of a stack; this command segments one 2D image")


def _check_shape(path: Path, shape: Sequence[int], image: np.ndarray) -> None:
    if tuple(shape) != image.shape[:2]:
        from usam_bioimageio.errors import InputError

        raise InputError(f"embeddings {path} are for an image of shape {tuple(shape)}, not {image.shape[:2]}")


def load_embeddings_for(path: Path, image: np.ndarray, model):
    """--embeddings: an .npz of ``usam embed --out`` or a cache folder (ours or micro-sam's), checked against the
    image (``check_embeddings_for``)."""
    from usam_bioimageio.embeddings.cache import load_cache
    from usam_bioimageio.embeddings.npz import load_embeddings
    from usam_bioimageio.errors import InputError

    path = Path(path)
    check_embeddings_for(path, image)
    if not path.is_dir():
        return load_embeddings(path, image=image)
    stack = load_cache(path, model=model)
    if stack.is_stack:
        raise InputError(f"{path} holds embeddings of a stack; this command segments one 2D image")
    emb = stack[0]
    if tuple(emb.original_shape) != image.shape[:2]:
        raise InputError(f"embeddings {path} are for an image of shape {tuple(emb.original_shape)}, not "
                         f"{image.shape[:2]}")
    return emb


def check_stack_embeddings_for(path: Path, stack: np.ndarray) -> None:
    """--embeddings of a stack (a volume or time series): refuse, before any model is loaded, anything but a stack
    cache of this stack: an .npz or a 2D image's cache, another slice count, another slice shape, other data.
    micro-sam's caches by the data_signature they record, their shapes once loaded
    (:func:`load_stack_embeddings_for`)."""
    from usam_bioimageio.embeddings.cache import EmbeddingCache, check_micro_sam_cache, data_sha256, is_micro_sam_cache
    from usam_bioimageio.errors import InputError

    path = Path(path)
    n = int(stack.shape[0])
    if not path.exists():
        raise InputError(f"no embeddings at {path}: give a stack cache of `usam embed --cache PATH --stack`")
    if not path.is_dir():
        raise InputError(f"{path} holds the embeddings of one 2D image; a stack of {n} slices needs a stack cache "
                         "of `usam embed --cache PATH --stack`")
    if is_micro_sam_cache(path):
        check_micro_sam_cache(path, stack)
        return
    cache = EmbeddingCache.read(path)
    if cache.signature.get("kind") != "stack":
        raise InputError(f"{path} holds the embeddings of one 2D image; a stack of {n} slices needs a stack cache "
                         "of `usam embed --cache PATH --stack`")
    if int(cache.meta["n_slices"]) != n:
        raise InputError(f"the embedding cache {path} holds {cache.meta['n_slices']} slices, the --image stack "
                         f"{n}: give this stack's cache (usam embed --cache PATH --stack)")
    if tuple(cache.meta["image_shape"]) != tuple(stack.shape[1:3]):
        raise InputError(f"the embedding cache {path} holds slices of shape {tuple(cache.meta['image_shape'])}, the "
                         f"--image stack's are {tuple(stack.shape[1:3])}")
    if cache.signature.get("data_sha256") != data_sha256(stack):
        raise InputError(f"the embedding cache {path} was computed for another stack than {stack.shape} "
                         f"{stack.dtype} read from the --image file: give that stack's cache, or compute one with "
                         "`usam embed --cache PATH --stack`")


def load_stack_embeddings_for(path: Path, stack: np.ndarray, model):
    """--embeddings of a stack: our stack cache or micro-sam's 3D cache, checked against the stack
    (:func:`check_stack_embeddings_for`); a ``StackEmbeddings`` of one item per slice."""
    from usam_bioimageio.embeddings.cache import load_cache
    from usam_bioimageio.errors import InputError

    path = Path(path)
    check_stack_embeddings_for(path, stack)
    emb = load_cache(path, model=model)
    if not emb.is_stack or len(emb) != int(stack.shape[0]):
        raise InputError(f"the embedding cache {path} holds {len(emb)} slices, the --image stack {stack.shape[0]}: "
                         "give this stack's cache (usam embed --cache PATH --stack)")
    if tuple(emb.image_shape) != tuple(stack.shape[1:3]):
        raise InputError(f"the embedding cache {path} holds slices of shape {tuple(emb.image_shape)}, the --image "
                         f"stack's are {tuple(stack.shape[1:3])}")
    return emb
