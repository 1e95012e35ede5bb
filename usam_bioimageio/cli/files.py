"""The files the CLI reads and writes: images (atomic TIFF / PNG writes), stacks, embeddings given with --embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from usam_bioimageio.errors import UsageError


def write_tiff(path: Path, labels: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, labels, compression="zlib")
    tmp.replace(path)


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(rgb).save(tmp, format="PNG")
    tmp.replace(path)


def read_image(path: str) -> np.ndarray:
    from usam_bioimageio.io.images import read_image

    return read_image(path)


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


def is_stack(image: np.ndarray, forced: bool) -> bool:
    """A stack (z, y, x[, c]): with --stack, a 4D array, or a 3D array whose last axis is too long for channels."""
    if forced:
        if image.ndim not in (3, 4):
            raise UsageError(f"--stack needs a (z, y, x) or (z, y, x, c) image, got shape {image.shape}")
        return True
    return image.ndim == 4 or (image.ndim == 3 and image.shape[-1] > 4)


def load_embeddings_for(path: Path, image: np.ndarray, model):
    """--embeddings: an .npz of ``usam embed --out`` or a cache folder (ours or micro-sam's)."""
    from usam_bioimageio.embeddings.npz import load_embeddings

    if not path.is_dir():
        return load_embeddings(path)
    from usam_bioimageio.embeddings.cache import EmbeddingCache, data_sha256, is_micro_sam_cache, load_cache

    if not is_micro_sam_cache(path):
        signature = EmbeddingCache.read(path).signature
        if signature["data_sha256"] != data_sha256(image):
            raise ValueError(f"the embedding cache {path} was computed for another image than {image.shape} "
                             f"{image.dtype} read from the --image file")
    stack = load_cache(path, model=model)
    if stack.is_stack:
        raise ValueError(f"{path} holds embeddings of a stack; `usam segment` segments one 2D image")
    return stack[0]
