"""Environment variables, each read when it is needed (never at import): the only place that reads them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from usam_bioimageio.errors import SettingError

__all__ = [
    "CACHE_ENV_VAR", "MAX_RATIO_ENV_VAR", "MAX_UNPACKED_ENV_VAR", "THREADS_ENV_VAR", "cache_dir",
    "max_compression_ratio", "max_unpacked_bytes", "num_threads",
    "MAX_PIXELS_ENV_VAR", "max_pixels",
]

CACHE_ENV_VAR = "USAM_CACHE_DIR"
THREADS_ENV_VAR = "USAM_NUM_THREADS"
MAX_PIXELS_ENV_VAR = "USAM_MAX_PIXELS"
# 2^30 pixels (a 32768 x 32768 plane, 1024 slices of 1024 x 1024): real microscopy up to ~20k x 20k passes, while a
# few-KB file declaring billions of pixels is refused before a byte is allocated
DEFAULT_MAX_PIXELS = 2**30
MAX_UNPACKED_ENV_VAR = "USAM_MAX_UNPACKED_BYTES"
MAX_RATIO_ENV_VAR = "USAM_MAX_COMPRESSION_RATIO"
# the largest package, vit_h's encoder in three weight formats, unpacks to ~7.7 GB (3 x 2.5 GB): 16 GiB leaves
# room and still stops a zip bomb filling the disk
DEFAULT_MAX_UNPACKED_BYTES = 16 * 2**30
# deflate reaches ~1000:1 only on degenerate data; real weights and test tensors compress less than 10:1
DEFAULT_MAX_COMPRESSION_RATIO = 200.0


def cache_dir() -> Path:
    """The download cache: ``$USAM_CACHE_DIR`` if set, else ``~/.cache/usam_bioimageio``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "usam_bioimageio"


def num_threads() -> Optional[int]:
    """Threads per package session: ``$USAM_NUM_THREADS`` if set to a positive integer, else None (the backend's
    default)."""
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    try:
        return int(value) if value and int(value) > 0 else None
    except ValueError:
        return None


def _positive(name: str, default: float, kind: type) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(float(value))  # "2e10" too
    except (ValueError, OverflowError):
        number = 0
    if not number > 0:
        raise SettingError(f"${name} must be a positive number, not {value!r}")
    return number


def max_unpacked_bytes() -> int:
    """The most bytes one package zip may unpack to: ``$USAM_MAX_UNPACKED_BYTES`` (e.g. ``2e10``), default 16 GiB."""
    return int(_positive(MAX_UNPACKED_ENV_VAR, DEFAULT_MAX_UNPACKED_BYTES, int))


def max_compression_ratio() -> float:
    """The largest uncompressed / compressed size of a zip member (of more than 1 MiB):
    ``$USAM_MAX_COMPRESSION_RATIO``, default 200."""
    return float(_positive(MAX_RATIO_ENV_VAR, DEFAULT_MAX_COMPRESSION_RATIO, float))


def max_pixels() -> int:
    """The most pixels an input image may have (y * x, times z for a stack; channels not counted), checked before
    it is decoded: ``$USAM_MAX_PIXELS`` (a positive integer, e.g. ``4e9``), default 2^30."""
    value = os.environ.get(MAX_PIXELS_ENV_VAR, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        number = int(float(value))
    except (ValueError, OverflowError):
        number = 0
    if number <= 0:
        raise SettingError(f"${MAX_PIXELS_ENV_VAR} must be a positive number of pixels, not {value!r}")
    return number
