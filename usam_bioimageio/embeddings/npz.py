"""Embeddings of one 2D image as an .npz file (``usam embed --out x.npz``)."""

from __future__ import annotations

import numpy as np

from usam_bioimageio.embeddings.types import Embeddings


def save_embeddings(path, embeddings: Embeddings) -> None:
    """Write embeddings to an .npz file atomically."""
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, features=embeddings.features, original_shape=np.asarray(embeddings.original_shape),
             encoder=np.asarray(embeddings.encoder))
    os.replace(tmp, path)


def load_embeddings(path) -> Embeddings:
    """Read embeddings written by ``save_embeddings``."""
    with np.load(path) as data:
        return Embeddings(features=data["features"], original_shape=tuple(int(v) for v in data["original_shape"]),
                          encoder=str(data["encoder"]))
