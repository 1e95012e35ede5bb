"""Automatic tracking: AIS on every frame of a time series, then the linker (:func:`usam_bioimageio.tracking.linking.link`),
giving tracks in the Cell Tracking Challenge's form.

Each frame is segmented as a 2D image of its own (as a slice in :mod:`usam_bioimageio.volumes.automatic`), so
frames with no objects are empty frames of the result, never an error. micro-sam's automatic tracking links with
Trackastra (a learned model); this one links the AIS objects by their (motion-compensated) overlaps: see
:mod:`usam_bioimageio.tracking.linking`.
"""

from __future__ import annotations

from typing import Optional

from usam_bioimageio.automatic.ais.postprocess import AisParameters
from usam_bioimageio.embeddings.types import PairLike
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.tracking.ctc import CtcTracks
from usam_bioimageio.tracking.linking import LinkingParams, link
from usam_bioimageio.volumes.automatic import SliceEmbeddings, segment_slices

__all__ = ["track_frames"]


def track_frames(model: SamModel, frames, *, params: AisParameters = AisParameters(),
                 embeddings: Optional[SliceEmbeddings] = None, solver: str = "auto",
                 linking: LinkingParams = LinkingParams(), tile_shape: Optional[PairLike] = None,
                 halo: Optional[PairLike] = None, progress: bool = False) -> CtcTracks:
    """Tracks of a time series ``frames`` (t, y, x) or (t, y, x, c): AIS per frame (``params``; ``embeddings``
    one per frame, else each frame is encoded, tiled with ``tile_shape`` / ``halo`` when given; a bar over the
    frames with ``progress``), then :func:`~usam_bioimageio.tracking.linking.link` (``solver`` "auto", "motile"
    or "greedy"; ``linking`` its settings). Masks are labelled by track id, ``tracks`` the ``L B E P`` table."""
    segmentation = segment_slices(model, frames, method="ais", params=params, embeddings=embeddings,
                                  tile_shape=tile_shape, halo=halo, progress=progress, desc="Segment frames")
    return link(segmentation=segmentation, solver=solver, params=linking, progress=progress)
