"""Automatic 3D segmentation: AIS or AMG on every slice of a volume, merged across z as µSAM's
``automatic_3d_segmentation`` does (per-slice segmentation, then :func:`usam_bioimageio.volumes.merge.merge_slices`).

As micro-sam 1.8's ``multi_dimensional_segmentation._segment_slices``: each slice is segmented as a 2D image of
its own (its own embeddings, untiled or tiled alike on every slice) and its ids are offset so that they are unique
across slices; empty slices stay 0. Differences: the embeddings of a slice are computed when the slice is
segmented and dropped afterwards (micro-sam precomputes the whole stack first), so memory does not grow with the
number of slices; give ``embeddings`` (e.g. a stack cache of ``usam embed --cache --stack``) to reuse them.

A volume of one slice is that slice's labels: there is nothing to merge (micro-sam returns the slices unchanged
when there are no overlaps between slices, so neither gap closing nor the minimal z extent apply either).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from usam_bioimageio.automatic.ais.postprocess import AisParameters
from usam_bioimageio.automatic.amg.params import AmgParameters
from usam_bioimageio.embeddings.types import Embeddings, PairLike, TiledEmbeddings, check_stack
from usam_bioimageio.errors import InputError, UsageError
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.volumes.merge import merge_slices

__all__ = ["METHODS", "segment_slices", "segment_volume"]

METHODS = ("ais", "amg")

# Per-slice embeddings: a StackEmbeddings (a cache, compute_stack_embeddings) or any sequence of them.
SliceEmbeddings = Sequence[Union[Embeddings, TiledEmbeddings]]


def _check_params(method: str, params):
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    kind = AisParameters if method == "ais" else AmgParameters
    if params is None:
        return kind()
    if not isinstance(params, kind):
        raise UsageError(f"method {method!r} takes {kind.__name__} params, got {type(params).__name__}")
    return params


def _check_embeddings(embeddings: Optional[SliceEmbeddings], volume) -> None:
    """Embeddings of another number of slices or another slice shape are refused before any slice is segmented."""
    if embeddings is None:
        return
    n = int(volume.shape[0])
    if len(embeddings) != n:
        raise InputError(f"the embeddings hold {len(embeddings)} slices, the volume {n}: give the embeddings of "
                         "this volume (usam embed --cache PATH --stack)")
    shape = getattr(embeddings, "image_shape", None)  # StackEmbeddings know their slice shape without reading one
    if shape is not None and tuple(shape) != tuple(volume.shape[1:3]):
        raise InputError(f"the embeddings are of slices of shape {tuple(shape)}, the volume's are "
                         f"{tuple(volume.shape[1:3])}")


def _slice_embeddings(model: SamModel, plane: np.ndarray, z: int, embeddings: Optional[SliceEmbeddings],
                      tile_shape: Optional[PairLike], halo: Optional[PairLike]):
    from usam_bioimageio.embeddings.compute import compute_image_embeddings

    if embeddings is not None:
        emb = embeddings[z]
        if tuple(emb.original_shape) != plane.shape[:2]:
            raise InputError(f"the embeddings of slice {z} are for shape {tuple(emb.original_shape)}, the slice "
                             f"is {plane.shape[:2]}")
        return emb
    return compute_image_embeddings(model, plane, tile_shape=tile_shape, halo=halo, progress=False)


def segment_slices(model: SamModel, volume, *, method: str = "ais",
                   params: Optional[Union[AisParameters, AmgParameters]] = None,
                   embeddings: Optional[SliceEmbeddings] = None, min_object_size: int = 0,
                   tile_shape: Optional[PairLike] = None, halo: Optional[PairLike] = None,
                   progress: bool = False, desc: str = "Segment slices") -> np.ndarray:
    """Per-slice instance labels (z, y, x) uint32 of a volume (z, y, x) or (z, y, x, c): ``method`` "ais"
    (:func:`~usam_bioimageio.automatic.ais.decoder.automatic_instance_segmentation`, ``params`` an
    ``AisParameters``) or "amg" (:func:`~usam_bioimageio.automatic.amg.generator.automatic_mask_generation`, an
    ``AmgParameters``, with ``min_object_size``) on each slice; ids unique across slices (µSAM's offsets).

    ``embeddings``: one per slice (a ``StackEmbeddings``, e.g. ``load_cache`` of a stack cache); else each slice is
    encoded when it is segmented, tiled with ``tile_shape`` / ``halo`` when given. ``progress``: a bar over the
    slices (``desc``)."""
    from tqdm import tqdm

    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation
    from usam_bioimageio.automatic.amg.generator import automatic_mask_generation

    params = _check_params(method, params)
    check_stack(volume)
    if embeddings is not None and tile_shape is not None:
        raise UsageError("tile_shape and halo come with the embeddings; do not give them with embeddings")
    if halo is not None and tile_shape is None:
        raise UsageError("halo needs tile_shape")
    _check_embeddings(embeddings, volume)
    n = int(volume.shape[0])
    out = np.zeros((n,) + tuple(int(s) for s in volume.shape[1:3]), dtype=np.uint32)
    offset = 0
    for z in tqdm(range(n), desc=desc, unit="slice", disable=not progress, leave=False):
        plane = np.asarray(volume[z])
        emb = _slice_embeddings(model, plane, z, embeddings, tile_shape, halo)
        if method == "ais":
            labels = automatic_instance_segmentation(model, plane, embeddings=emb, params=params)
        else:
            labels = automatic_mask_generation(model, plane, embeddings=emb, params=params,
                                               min_object_size=min_object_size)
        top = int(labels.max()) if labels.size else 0
        if top:
            out[z] = np.where(labels > 0, labels.astype(np.uint32) + np.uint32(offset), 0)
            offset += top
    return out


def segment_volume(model: SamModel, volume, *, method: str = "ais",
                   params: Optional[Union[AisParameters, AmgParameters]] = None,
                   embeddings: Optional[SliceEmbeddings] = None, min_object_size: int = 0,
                   gap_closing: Optional[int] = None, min_z_extent: Optional[int] = None,
                   tile_shape: Optional[PairLike] = None, halo: Optional[PairLike] = None,
                   progress: bool = False) -> np.ndarray:
    """µSAM's ``automatic_3d_segmentation``: 3D instance labels (z, y, x) uint32 (1 .. N) of a volume:
    :func:`segment_slices` (``method``, ``params``, ``embeddings``, ``min_object_size``, tiling as there), then
    :func:`~usam_bioimageio.volumes.merge.merge_slices` with µSAM's defaults (beta 0.5; ``gap_closing`` and
    ``min_z_extent`` None = off, as in µSAM). A volume of one slice: that slice's labels (nothing to merge)."""
    for name, value in (("gap_closing", gap_closing), ("min_z_extent", min_z_extent)):
        if value is not None and value < 0:
            raise UsageError(f"{name} must be >= 0, got {value}")
    slices = segment_slices(model, volume, method=method, params=params, embeddings=embeddings,
                            min_object_size=min_object_size, tile_shape=tile_shape, halo=halo, progress=progress)
    if slices.shape[0] == 1:
        return slices
    return merge_slices(slice_segmentation=slices, gap_closing=gap_closing or None,
                        min_z_extent=min_z_extent or None, progress=progress)
