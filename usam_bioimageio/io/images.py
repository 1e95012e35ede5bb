"""Reading images from files: one reader for every command, with one stack / channel rule, a pixel budget checked
before decoding, and value checks (no NaN / inf, no range that collapses in float32).

The rules (README "Security and limits"):

* Axes: (y, x) gray; (y, x, c) with c <= 4 channels (RGBA drops alpha); a 3D array whose last axis is longer than
  4 is a stack (z, y, x); 4D is a stack (z, y, x, c) with c <= 4. Anything else is refused.
* Pixel budget: y * x (times z for a stack; channels not counted) must not exceed ``settings.max_pixels()``
  ($USAM_MAX_PIXELS, default 2^30). TIFF shapes are read from tifffile's series metadata and PNG / JPEG sizes from
  PIL's header, both before the pixel data is decoded.
* Values: numeric (bool, int, uint, float); finite; and, since the encoder computes in float32, after conversion
  to float32 the range max - min must be finite and at least 256 float32 steps (the spacing of float32 at the
  image's largest magnitude) wide, so the min-max normalisation keeps at least 8-bit resolution. A constant image
  is fine (it gives a constant embedding). Refused, e.g.: float64 near 1e300 (inf in float32), float64 values all
  near 1e-300 (0 in float32), uint32 values near 4e9 spanning less than 256 * 256.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np

from usam_bioimageio.errors import InputError, UsageError, UsamError

TIFF_SUFFIXES = (".tif", ".tiff")
MAX_CHANNELS = 4
# float32 steps the range must span: the package normalises min-max to 0..255, so fewer would lose 8-bit resolution
MIN_FLOAT32_STEPS = 256


def channels_last(shape: Sequence[int]) -> bool:
    """Whether the last axis of an array of ``shape`` is channels (the stack / channel rule)."""
    return len(shape) == 4 or (len(shape) == 3 and int(shape[-1]) <= MAX_CHANNELS)


def is_stack(image, forced: bool = False) -> bool:
    """A stack (z, y, x[, c]): with ``forced`` (--stack), a 3D or 4D array; else a 4D array, or a 3D array whose
    last axis is too long for channels (> 4)."""
    shape = tuple(getattr(image, "shape", image))
    if forced:
        if len(shape) not in (3, 4):
            raise UsageError(f"--stack needs a (z, y, x) or (z, y, x, c) image, got shape {shape}")
        return True
    return len(shape) == 4 or (len(shape) == 3 and shape[-1] > MAX_CHANNELS)


def pixel_count(shape: Sequence[int]) -> int:
    """y * x (times z for a stack): the shape without its channel axis (Python ints: no overflow)."""
    shape = [int(s) for s in shape]
    if channels_last(shape):
        shape = shape[:-1]
    n = 1
    for s in shape:
        n *= s
    return n


def check_shape(path: Path, shape: Sequence[int], dtype) -> None:
    """The axes, dtype and pixel budget of an image declared as ``shape`` / ``dtype``, before it is decoded."""
    from usam_bioimageio.settings import MAX_PIXELS_ENV_VAR, max_pixels

    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3, 4):
        raise InputError(f"image {path} has shape {shape}: images are (y, x), (y, x, c) with c <= {MAX_CHANNELS}, "
                         "or stacks (z, y, x) / (z, y, x, c)")
    if len(shape) == 4 and shape[-1] > MAX_CHANNELS:
        raise InputError(f"image {path} has shape {shape}: a 4D image must be (z, y, x, c) with at most "
                         f"{MAX_CHANNELS} channels last; save it with channels last or one channel per file")
    if 0 in shape:
        raise InputError(f"image {path} is empty: shape {shape}")
    if np.dtype(dtype).kind not in "biuf":
        raise InputError(f"image {path} has dtype {np.dtype(dtype)}: images must be numeric (bool, int, uint, float)")
    budget, pixels = max_pixels(), pixel_count(shape)
    if pixels > budget:
        raise InputError(f"image {path} declares {pixels:,} pixels (shape {shape}), more than the pixel budget "
                         f"of {budget:,}: raise ${MAX_PIXELS_ENV_VAR} if the image is real")


def check_values(image: np.ndarray, what: Union[str, Path] = "image") -> None:
    """Refuse non-finite values and value ranges that collapse in float32 (the module's rule)."""
    image = np.asarray(image)
    if image.dtype.kind == "b" or image.size == 0:
        return
    lo, hi = image.min(), image.max()  # NaN propagates through min / max
    if image.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{what} holds NaN or infinite values: replace them (e.g. with 0) before segmenting")
    with np.errstate(over="ignore", invalid="ignore"):
        lo32, hi32 = np.float32(lo), np.float32(hi)
        span = np.float32(hi32 - lo32)
    if not (np.isfinite(lo32) and np.isfinite(hi32)):
        raise InputError(f"{what} holds values from {lo:g} to {hi:g}, beyond float32 (about 3.4e38), which the "
                         "encoder computes in: rescale the image")
    if lo == hi:
        return  # constant: a constant embedding
    step = np.spacing(max(abs(lo32), abs(hi32)))
    if not np.isfinite(span) or span < MIN_FLOAT32_STEPS * step:
        raise InputError(f"{what} holds values from {lo!r} to {hi!r}, a range that collapses in float32 (the "
                         f"encoder's precision; less than {MIN_FLOAT32_STEPS} float32 steps): subtract the minimum "
                         "or rescale the image")


def _tiff_series(tif, path: Path):
    """The first series of an open TiffFile, its declared shape checked."""
    if not tif.series:
        raise InputError(f"image {path} holds no image data")
    series = tif.series[0]
    check_shape(path, series.shape, series.dtype)
    return series


@contextlib.contextmanager
def _pil_image(path: Path):
    """PIL's image of ``path`` (its header; pixels decoded only on access), its declared size checked."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our budget is checked instead; PIL's own (89 Mpx) would refuse real images
    try:
        with Image.open(path) as img:
            width, height = img.size
            check_shape(path, (height, width), np.uint8)
            yield img
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# PIL modes -> the dtype imageio decodes them to (others: uint8)
_PIL_DTYPES = {"I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32, "F": np.float32,
               "1": np.bool_}


@contextlib.contextmanager
def _reading(path: Path):
    """The one error policy of reading an image file: InputError naming the file for whatever a reader raises."""
    if not path.is_file():
        raise InputError(f"no image at {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        yield
    except UsamError:
        raise
    except MemoryError:
        raise InputError(f"not enough memory to read image {path}: lower the pixel budget or use a smaller image")
    except Exception as err:  # the readers raise many types for unreadable files
        raise InputError(f"cannot read image {path}: {type(err).__name__}: {err}".rstrip(": ")) from err


def read_image_header(path: Union[str, Path]) -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape, dtype) an image file declares, read from its header only (TIFF: tifffile's first series; others:
    PIL's size and bands) and checked with :func:`check_shape`; the pixels are not decoded. For checking many
    files before any is read (``usam ais`` / ``amg`` on a folder)."""
    path = Path(path)
    with _reading(path):
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = _tiff_series(tif, path)
                return tuple(int(n) for n in series.shape), np.dtype(series.dtype)
        with _pil_image(path) as img:
            bands = len(img.getbands())
            shape = (img.size[1], img.size[0]) + ((bands,) if bands > 1 else ())
            shape = shape if img.mode != "RGBA" else shape[:2] + (3,)  # read_image drops alpha
            return shape, np.dtype(_PIL_DTYPES.get(img.mode, np.uint8))


def read_image(path: Union[str, Path]) -> np.ndarray:
    """An image file -> (y, x), (y, x, c) or a stack (z, y, x[, c]); TIFF via tifffile (its first series), others
    via PIL / imageio; RGBA drops alpha. Checks the module's rules; raises InputError naming the file."""
    path = Path(path)
    with _reading(path):
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                image = np.asarray(_tiff_series(tif, path).asarray())
        else:
            import imageio.v3 as iio

            with _pil_image(path):
                image = np.asarray(iio.imread(path, plugin="pillow"))  # the decoder whose header was checked
    check_shape(path, image.shape, image.dtype)  # what was decoded (a reader may add axes)
    if image.ndim == 3 and image.shape[-1] == 4:  # RGBA
        image = image[..., :3]
    check_values(image, f"image {path}")
    return image


def _refuse_stack(path, shape: Sequence[int], command: str) -> None:
    if is_stack(shape):
        raise InputError(f"{path} holds a stack of {shape[0]} slices (shape {tuple(shape)}), not a 2D image: "
                         f"{command} segments one 2D image; save one slice per file (or embed the stack with "
                         "`usam embed --cache`); if the first axis holds channels, save them last (y, x, c)")


def check_image_header_2d(path: Union[str, Path], command: str = "usam segment") -> Tuple[int, ...]:
    """:func:`read_image_header` for commands that segment one 2D image: a stack is refused (as
    :func:`read_image_2d` does) without decoding a pixel. Returns the declared shape."""
    shape, _ = read_image_header(path)
    _refuse_stack(path, shape, command)
    return shape


def read_image_2d(path: Union[str, Path], command: str = "usam segment") -> np.ndarray:
    """``read_image`` for commands that segment one 2D image: a stack is refused, never read as channels."""
    image = read_image(path)
    _refuse_stack(path, image.shape, command)
    return image
