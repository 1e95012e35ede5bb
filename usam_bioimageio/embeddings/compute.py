"""Computing embeddings with the family's image encoder: of one 2D image, tiled, per slice, and through a
persistent cache (``usam_bioimageio.embeddings.cache``). Compute them once, pass them to every segmentation
call (``usam_bioimageio.embeddings.types`` are values)."""

from __future__ import annotations

import os
from typing import List, Optional, Union

import numpy as np

from usam_bioimageio.embeddings.cache import EmbeddingCache, make_signature
from usam_bioimageio.embeddings.types import (
    Embeddings,
    PairLike,
    StackEmbeddings,
    TiledEmbeddings,
    Tiling,
    check_image_2d,
    check_stack,
    item_input,
    iterate_items,
    resolve_tiling,
)
from usam_bioimageio.progress import progress_bar
from usam_bioimageio.registry import IMAGE_SIZE
from usam_bioimageio.runtime.geometry import to_rgb
from usam_bioimageio.runtime.model import SamModel


def image_to_input(image: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """A 2D image (H, W) or (H, W, C) -> the encoder package input (1, 3, H, W) float32.

    Channels follow µSAM: gray is replicated, 2 channels get a zero third, more than 3 keep the first 3.
    The intensity normalisation happens inside the package (and the resize to the model's ``image_size``,
    which only the check of too elongated images needs here).
    """
    rgb = to_rgb(np.asarray(image), image_size)
    return np.ascontiguousarray(rgb.astype(np.float32).transpose(2, 0, 1)[None])


def compute_embeddings(model: SamModel, image: np.ndarray) -> Embeddings:
    """Run the image encoder package on a 2D image: features (1, 256, N/16, N/16) for the model's input size N."""
    x = image_to_input(image, model.image_size)
    runner = model.runner("image_encoder")
    (features,) = runner(**{runner.input_names[0]: x}).values()
    return Embeddings(features=features, original_shape=(int(x.shape[2]), int(x.shape[3])), encoder=model.encoder_identity)


def encode(model: SamModel, image) -> np.ndarray:
    """One image (tile or slice) -> its (1, 256, N/16, N/16) features; reads only that region of ``image``."""
    return compute_embeddings(model, np.asarray(image)).features


def compute_tiled_embeddings(model: SamModel, image, *, tile_shape: PairLike, halo: PairLike, cache=None,
                             progress: bool = True) -> TiledEmbeddings:
    """Embeddings of a 2D image (H, W) or (H, W, C), one per tile, in micro-sam's tiling.

    tile_shape, halo: (y, x) or one int for both. cache: a path (or an open ``EmbeddingCache``) of a
    persistent embedding cache (see ``usam_bioimageio.embeddings.cache``): tiles already there are reused, the others
    computed and written one at a time; the result then reads tiles from the cache on access.
    ``image`` may be any array-like with ``shape``, ``dtype`` and slicing (numpy, memmap, zarr): only one
    outer tile is read at a time (except for the cache's data hash, which reads it in blocks).
    """
    check_image_2d(image)
    tiling = Tiling.create(image.shape[:2], tile_shape, halo)
    if cache is not None:
        return cached_embeddings(model, image, cache, tile_shape=tiling.tile_shape, halo=tiling.halo,
                                 progress=progress)[0]
    features = []
    with progress_bar(len(tiling), 0, "embeddings (tiles)", progress) as bar:
        for t in range(len(tiling)):
            features.append(encode(model, item_input(image, None, tiling, t)))
            bar.update()
    return TiledEmbeddings(tiling, features, model.encoder_identity)


def compute_image_embeddings(model: SamModel, image, *, tile_shape=None, halo: Optional[PairLike] = None,
                             progress: bool = True) -> Union[Embeddings, TiledEmbeddings]:
    """Embeddings of a 2D image as ``usam ais`` / ``amg`` compute them: untiled for ``tile_shape`` None; tiled
    with ``halo`` (default 0) for a (y, x) or int ``tile_shape``; for :data:`AUTO_TILING` untiled where the image
    fits the model's input, else the model's automatic tiling (``resolve_tiling``)."""
    if tile_shape is None:
        return compute_embeddings(model, image)
    tile_shape, halo = resolve_tiling(tile_shape, halo, np.shape(image), model.image_size)
    if tile_shape is None:  # AUTO_TILING and the image fits the model's input
        return compute_embeddings(model, image)
    return compute_tiled_embeddings(model, image, tile_shape=tile_shape, halo=(0, 0) if halo is None else halo,
                                    progress=progress)


def compute_stack_embeddings(model: SamModel, volume, *, tile_shape: Optional[PairLike] = None,
                             halo: Optional[PairLike] = None, cache=None, progress: bool = True) -> StackEmbeddings:
    """Embeddings of a 3D stack or time series (z, y, x) / (z, y, x, c): one per slice, optionally tiled.

    Each slice is embedded as a 2D image of its own (micro-sam's ``precompute_image_embeddings`` for 3D
    data); ``tile_shape`` and ``halo`` (both or neither) tile every slice alike. ``cache`` as in
    ``compute_tiled_embeddings``; only one slice (or tile) is read from ``volume`` at a time.
    """
    check_stack(volume)
    if (tile_shape is None) != (halo is None):
        raise ValueError("give tile_shape and halo together (halo 0 for tiles without overlap), or neither")
    tiling = None if tile_shape is None else Tiling.create(volume.shape[1:3], tile_shape, halo)
    if cache is not None:
        return cached_embeddings(model, volume, cache, stack=True,
                                 tile_shape=None if tiling is None else tiling.tile_shape,
                                 halo=None if tiling is None else tiling.halo, progress=progress)
    n = int(volume.shape[0])
    per_slice = 1 if tiling is None else len(tiling)
    features: List[List[np.ndarray]] = [[] for _ in range(n)]
    with progress_bar(n * per_slice, 0, "embeddings (slices)", progress) as bar:
        for z, t in iterate_items(n, tiling):
            features[z].append(encode(model, item_input(volume, z, tiling, t)))
            bar.update()
    return StackEmbeddings.in_memory(features, tuple(volume.shape[1:3]), tiling, model.encoder_identity)


def cached_embeddings(model: SamModel, data, cache: Union[str, os.PathLike], *, tile_shape=None, halo=None,
                      stack: bool = False, progress: bool = True) -> StackEmbeddings:
    """Embeddings of ``data`` through the cache at ``cache``: reuse complete items, compute the missing ones.

    data: a 2D image (H, W[, C]) or, with ``stack=True``, a stack (z, y, x[, c]). tile_shape / halo: tile
    each image (both or neither). Returns ``StackEmbeddings`` reading from the cache on access (one type for
    every cache: a 2D image's is one slice with ``is_stack`` False, and ``[0]`` its ``Embeddings`` or
    ``TiledEmbeddings``). Raises CacheMismatchError (a ValueError) when
    the cache holds embeddings of other data, another encoder or other settings.
    """
    if stack:
        check_stack(data)
        n_slices, image_shape = int(data.shape[0]), tuple(int(s) for s in data.shape[1:3])
    else:
        check_image_2d(data)
        n_slices, image_shape = 1, tuple(int(s) for s in data.shape[:2])
    if (tile_shape is None) != (halo is None):
        raise ValueError("give tile_shape and halo together (halo 0 for tiles without overlap), or neither")
    tiling = None if tile_shape is None else Tiling.create(image_shape, tile_shape, halo)
    signature = make_signature(model, data, stack=stack, tiling=tiling)
    store = EmbeddingCache.open(cache, signature=signature, n_slices=n_slices, image_shape=image_shape, tiling=tiling)
    missing = store.missing()
    if missing:
        done = store.n_items - len(missing)
        with progress_bar(store.n_items, done, f"embeddings -> {store.path.name}", progress) as bar:
            for z, t in missing:
                store.write(z, t, encode(model, item_input(data, z if stack else None, tiling, t)))
                bar.update()
    return store.value()
