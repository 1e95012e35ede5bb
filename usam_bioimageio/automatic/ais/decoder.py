"""Automatic instance segmentation (AIS) with the packaged µSAM decoder: image -> maps -> labels.

:func:`ais_maps` runs µSAM's UNETR decoder (``InstanceSegmentationWithDecoder.initialize``): with embeddings
(given, or computed with the family's image encoder) through the ``ais_head`` package, whose maps are in
SAM's padded N x N frame (N the model's input size, 1024 for SAM) and are brought back to the image size here
(:func:`maps_to_original`), or,
for a family that has only the end-to-end ``ais`` package, through that one. :func:`automatic_instance_segmentation`
adds µSAM's post-processing (:func:`usam_bioimageio.automatic.ais.postprocess.instances_from_maps`).

Tiled embeddings (:class:`usam_bioimageio.embeddings.types.TiledEmbeddings`) give the maps of µSAM's
``TiledInstanceSegmentationWithDecoder``: each tile's maps are computed for its outer block (tile + halo) and
only its inner block is written into the image's maps, so no seam is left where the halo covers the objects;
the post-processing then runs once over the whole image, so objects crossing tile borders get one label.

numpy and the package runners only: no torch import on the ONNX path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Union

import numpy as np

from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.embeddings.compute import compute_embeddings, image_to_input
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.errors import PackageError
from usam_bioimageio.runtime.packages import check_embeddings
from usam_bioimageio.runtime.geometry import interpolation_matrix, longest_side_shape
from usam_bioimageio.registry import IMAGE_SIZE
from usam_bioimageio.embeddings.types import TiledEmbeddings
from usam_bioimageio.progress import progress_bar
from usam_bioimageio.runtime.pixel_scale import check_scale, resize_maps, scale_image
from usam_bioimageio.automatic.ais.postprocess import AisParameters, instances_from_maps

__all__ = ["ais_maps", "automatic_instance_segmentation", "maps_to_original"]


@lru_cache(maxsize=32)
def _resize_matrix(original_size: int, resized_size: int) -> np.ndarray:
    """(original, resized) float32 bilinear (align_corners=False) matrix; read-only (cached)."""
    matrix = interpolation_matrix(resized_size, original_size).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def maps_to_original(maps: np.ndarray, original_shape: Sequence[int], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """µSAM's ``postprocess_masks`` for maps in SAM's padded frame of a model of input size N (``image_size``):
    (..., N, N) -> float32 (..., H, W).

    Crops the top-left ``longest_side_shape(H, W, N)`` block (SAM's padding removed) and resizes it bilinearly
    (``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing) to (H, W), as two matrix
    products; equal to torch's interpolation to float32 rounding.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim < 2 or maps.shape[-2:] != (image_size, image_size):
        raise ValueError(f"maps must have shape (..., {image_size}, {image_size}) for a model of input size "
                         f"{image_size}, got {maps.shape}")
    h, w = int(original_shape[0]), int(original_shape[1])
    new_h, new_w = longest_side_shape(h, w, image_size)
    rows = _resize_matrix(h, new_h)  # (H, new_h)
    cols = _resize_matrix(w, new_w)  # (W, new_w)
    cropped = maps[..., :new_h, :new_w]
    if h * new_w * (new_h + w) <= new_h * w * (new_w + h):  # the cheaper order of the two products
        return np.matmul(np.matmul(rows, cropped), cols.T)
    return np.matmul(rows, np.matmul(cropped, cols.T))


def _tiled_maps(model: SamModel, tiled: TiledEmbeddings, progress: bool) -> np.ndarray:
    """Maps stitched from the tiles' inner blocks; tiles without features (micro-sam skips tiles outside
    its mask) stay 0 = background, as in µSAM."""
    maps = np.zeros((3,) + tuple(tiled.original_shape), dtype=np.float32)
    with progress_bar(len(tiled), 0, "AIS decoder (tiles)", progress) as bar:
        for tile in tiled.tiling.tiles():
            if tiled.features[tile.index] is not None:
                tile_maps = ais_maps(model, embeddings=tiled.tile_embeddings(tile.index))
                maps[(slice(None),) + tile.inner_slices] = tile_maps[(slice(None),) + tile.inner_local_slices]
            bar.update()
    return maps


def ais_maps(model: SamModel, image: Optional[np.ndarray] = None, *,
             embeddings: Optional[Union[Embeddings, TiledEmbeddings]] = None, progress: bool = False,
             scale: float = 1.0) -> np.ndarray:
    """µSAM's AIS decoder maps of a 2D image: float32 (3, H, W) = foreground probability, centre distances,
    boundary distances (each 0..1), as ``InstanceSegmentationWithDecoder.initialize`` computes them.

    Give ``embeddings`` (from :func:`usam_bioimageio.embeddings.compute.compute_embeddings`; then ``image`` is optional
    and only checked against their shape) to reuse them, e.g. for prompt-based segmentation of the same image;
    otherwise ``image`` (H, W) or (H, W, C) is encoded first. A family without an ``ais_head`` package but
    with the end-to-end ``ais`` package runs that one on ``image``. ``embeddings`` may be tiled
    (``compute_tiled_embeddings`` or a cache): then the maps are stitched from the tiles' inner blocks
    (``progress`` shows a bar over the tiles).

    ``scale`` (:mod:`usam_bioimageio.runtime.pixel_scale`): the image is resized by this factor before it is
    encoded (a model trained on enlarged images, ``usam train --scale``) and the maps are resized back to
    (H, W); ``image`` is then required, and ``embeddings``, if given, are those of the resized image
    (``scale_image(image, scale)``, tiled or not).

    Raises:
        ValueError: neither image nor embeddings, an invalid image or scale, or embeddings of another image size.
        PackageError: the family has no AIS package, or the embeddings are from another image encoder.
    """
    if check_scale(scale) != 1.0:
        if image is None:
            raise ValueError("ais_maps with a scale needs the image")
        image = np.asarray(image)
        maps = ais_maps(model, scale_image(image, scale), embeddings=embeddings, progress=progress)
        return resize_maps(maps, image.shape[:2])
    if image is None and embeddings is None:
        raise ValueError("ais_maps needs an image or its embeddings")
    if image is not None:
        image = np.asarray(image)
        x = image_to_input(image, model.image_size)  # validates the image
        if embeddings is not None and tuple(embeddings.original_shape) != tuple(x.shape[2:]):
            raise ValueError(f"the embeddings are for an image of shape {tuple(embeddings.original_shape)}, "
                             f"not {tuple(x.shape[2:])}")
    family = model.family
    if embeddings is None and "ais_head" not in family and "ais" in family:
        runner = model.runner("ais")
        (maps,) = runner(**{runner.input_names[0]: x}).values()
        return np.ascontiguousarray(maps[0], dtype=np.float32)
    if "ais_head" not in family:
        kinds = sorted(family.packages)
        raise PackageError(f"this model family has no AIS decoder ('ais_head' package); it has {kinds}. "
                           "Only checkpoints with a decoder_state (µSAM's *_lm / *_em_organelles models) have one.")
    if isinstance(embeddings, TiledEmbeddings):
        return _tiled_maps(model, embeddings, progress)
    if embeddings is None:
        embeddings = compute_embeddings(model, image)
    check_embeddings(model.family.get("ais_head"), embeddings)
    runner = model.runner("ais_head")
    features = np.ascontiguousarray(embeddings.features, dtype=np.float32)
    (padded,) = runner(**{runner.input_names[0]: features}).values()
    return maps_to_original(padded[0], embeddings.original_shape, model.image_size)


def automatic_instance_segmentation(model: SamModel, image: Optional[np.ndarray] = None, *,
                                    embeddings: Optional[Union[Embeddings, TiledEmbeddings]] = None,
                                    params: AisParameters = AisParameters(), progress: bool = False,
                                    scale: float = 1.0) -> np.ndarray:
    """µSAM's automatic instance segmentation with its decoder (2D, tiled or not): labels (H, W) uint32,
    0 = background, objects 1..n numbered as µSAM numbers them. :func:`ais_maps` + ``instances_from_maps``;
    ``params`` default to µSAM's ``InstanceSegmentationWithDecoder.generate`` defaults. ``scale``: as in
    :func:`ais_maps` (the post-processing runs on the maps at the image's size, so ``params`` are in its pixels)."""
    if not isinstance(params, AisParameters):
        raise TypeError(f"params must be an AisParameters, got {type(params).__name__}")
    maps = ais_maps(model, image, embeddings=embeddings, progress=progress, scale=scale)
    return instances_from_maps(maps, params=params)
