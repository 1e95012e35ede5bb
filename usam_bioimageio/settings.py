"""Environment variables, each read when it is needed (never at import): the only place that reads them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["CACHE_ENV_VAR", "THREADS_ENV_VAR", "cache_dir", "num_threads"]

CACHE_ENV_VAR = "USAM_CACHE_DIR"
THREADS_ENV_VAR = "USAM_NUM_THREADS"


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
