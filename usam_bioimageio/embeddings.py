"""Image embeddings as values: compute them once, pass them to every segmentation call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .model import SamModel
from .preprocess import to_rgb


@dataclass(frozen=True)
class Embeddings:
    """SAM image embeddings of one 2D image.

    features: (1, 256, 64, 64) float32; original_shape: (h, w) of the image they were computed from;
    encoder: identity (ONNX weights sha256) of the image encoder, checked by the decoders.
    """

    features: np.ndarray
    original_shape: Tuple[int, int]
    encoder: str


def image_to_input(image: np.ndarray) -> np.ndarray:
    """A 2D image (H, W) or (H, W, C) -> the encoder package input (1, 3, H, W) float32.

    Channels follow µSAM: gray is replicated, 2 channels get a zero third, more than 3 keep the first 3.
    The intensity normalisation happens inside the package.
    """
    rgb = to_rgb(np.asarray(image))
    return np.ascontiguousarray(rgb.astype(np.float32).transpose(2, 0, 1)[None])


def compute_embeddings(model: SamModel, image: np.ndarray) -> Embeddings:
    """Run the image encoder package on a 2D image."""
    x = image_to_input(image)
    runner = model.runner("image_encoder")
    (features,) = runner(**{runner.input_names[0]: x}).values()
    return Embeddings(features=features, original_shape=(int(x.shape[2]), int(x.shape[3])), encoder=model.encoder_identity)


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
