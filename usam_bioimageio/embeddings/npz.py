"""Embeddings of one 2D image as an .npz file (``usam embed --out x.npz``), with the sha256 of the image they were
computed from, so that they are never used for another image."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

import numpy as np

from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.errors import InputError

KEYS = ("features", "original_shape", "encoder", "data_sha256")


def save_embeddings(path, embeddings: Embeddings, *, image: Optional[np.ndarray] = None,
                    image_sha256: Optional[str] = None) -> None:
    """Write embeddings to an .npz file atomically (a hidden ``.part`` file beside it, removed on failure) with the
    image's sha256 (``cache.data_sha256``: shape, dtype and bytes): give ``image`` or its ``image_sha256``."""
    from usam_bioimageio.embeddings.cache import data_sha256

    if image_sha256 is None:
        if image is None:
            raise ValueError("save_embeddings needs the image (or its sha256): the file records which image it is of")
        image_sha256 = data_sha256(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "xb") as f:  # a file object: np.savez adds no suffix
            np.savez(f, features=embeddings.features, original_shape=np.asarray(embeddings.original_shape),
                     encoder=np.asarray(embeddings.encoder), data_sha256=np.asarray(image_sha256))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_embeddings(path, *, image: Optional[np.ndarray] = None) -> Embeddings:
    """Read embeddings written by ``save_embeddings``; with ``image``, refuse them unless they were computed from
    it. InputError names the file: truncated or foreign files, files of another image, files of an older usam."""
    from usam_bioimageio.embeddings.cache import data_sha256

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no embeddings file at {path}")
    redo = "re-run `usam embed --out` for this image"
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an .npz archive")
            missing = [k for k in KEYS[:3] if k not in data.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            features = np.asarray(data["features"])
            shape = np.asarray(data["original_shape"])
            encoder = str(data["encoder"])
            stored = str(data["data_sha256"]) if "data_sha256" in data.files else None
    except Exception as err:  # damaged archives raise many types (BadZipFile, zlib.error, EOFError, ValueError)
        raise InputError(f"cannot read embeddings {path} ({type(err).__name__}: {err}): not a complete file of "
                         f"`usam embed --out`; {redo}") from None
    if features.dtype != np.float32 or features.ndim != 4 or shape.shape != (2,) or shape.dtype.kind not in "iu":
        raise InputError(f"embeddings {path} hold features {features.dtype} {features.shape} and original_shape "
                         f"{shape.tolist()}: not a file of `usam embed --out`; {redo}")
    if image is not None:
        if stored is None:
            raise InputError(f"embeddings {path} record no image hash (written by an older usam), so they cannot be "
                             f"checked against the image: {redo}")
        if stored != data_sha256(image):
            raise InputError(f"embeddings {path} were computed for another image than the one given "
                             f"({image.shape} {image.dtype}): {redo}, or give the image they belong to")
    return Embeddings(features=features, original_shape=tuple(int(v) for v in shape), encoder=encoder)
