"""Masks -> an instance label image as µSAM's AMG writes it (micro_sam.util.mask_data_to_segmentation)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np


LABEL_BLOCK = 512  # micro_sam.util.mask_data_to_segmentation: elf.parallel blocks of 512 x 512


def _label_components(segmentation: np.ndarray) -> np.ndarray:
    """``elf.parallel.label(segmentation, block_shape=(512, 512))`` (python-elf 0.9.2, bioimage-cpp 0.9.0):
    4-connected components of equal labels (0 = background), with elf's numbering, step by step:

    1. each 512 x 512 block (C order) is labelled on its own (``bioimage_cpp.segmentation.label``, which
       numbers components 1..n in raster order of their first pixel, as ``skimage.measure.label``), ids
       offset by the number of components of the blocks before it;
    2. for each block in order and each axis (rows, then columns), the pairs (id here, id in the lower
       neighbour) of equal labels across the shared face, ``np.unique``-sorted, are merged in sequence by
       ``bioimage_cpp.utils.UnionFind`` (union by rank, ties keep the first id's root);
    3. the roots are renumbered consecutively in increasing order (``relabel_sequential``).
    """
    from skimage.measure import label as sk_label

    h, w = segmentation.shape
    n_by, n_bx = -(-h // LABEL_BLOCK), -(-w // LABEL_BLOCK)
    ids = np.zeros((h, w), dtype=np.int64)
    total = 0
    blocks = []
    for by in range(n_by):
        for bx in range(n_bx):
            sl = (slice(by * LABEL_BLOCK, min((by + 1) * LABEL_BLOCK, h)),
                  slice(bx * LABEL_BLOCK, min((bx + 1) * LABEL_BLOCK, w)))
            local = sk_label(segmentation[sl], background=0, connectivity=1).astype(np.int64)
            ids[sl] = np.where(local > 0, local + total, 0)
            total += int(local.max())
            blocks.append((by, bx, sl))
    if len(blocks) == 1 or total == 0:
        return ids.astype(segmentation.dtype)

    parent: Dict[int, int] = {}
    rank: Dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for by, bx, (rows, cols) in blocks:
        faces = []
        if by > 0:
            faces.append(((rows.start, cols), (rows.start - 1, cols)))
        if bx > 0:
            faces.append(((rows, cols.start), (rows, cols.start - 1)))
        for face, neighbour in faces:
            here, there = segmentation[face], segmentation[neighbour]
            same = (here != 0) & (there != 0) & (here == there)
            if not same.any():
                continue
            pairs = np.unique(np.stack([ids[face][same], ids[neighbour][same]], axis=1), axis=0)
            for a, b in pairs.tolist():
                ra, rb = find(a), find(b)
                if ra == rb:
                    continue
                rank_a, rank_b = rank.get(ra, 0), rank.get(rb, 0)
                if rank_a < rank_b:
                    parent[ra] = rb
                elif rank_a > rank_b:
                    parent[rb] = ra
                else:
                    parent[rb] = ra
                    rank[ra] = rank_a + 1
    roots = np.arange(total + 1, dtype=np.int64)
    for x in list(parent):
        roots[x] = find(x)
    kept = np.unique(roots)  # relabel_sequential: sorted roots -> 0, 1, 2, ... (0 stays 0)
    lookup = np.searchsorted(kept, roots)
    return lookup[ids].astype(segmentation.dtype)


def masks_to_label_image(
    masks: Sequence[Dict[str, Any]],
    shape: Optional[Tuple[int, int]] = None,
    *,
    with_background: bool = True,
    min_object_size: int = 0,
) -> np.ndarray:
    """AMG records -> an instance label image (uint32), as µSAM's AMG makes one.

    ``micro_sam.util.mask_data_to_segmentation`` with the arguments of ``AutomaticMaskGenerator.generate``
    (``output_mode="instance_segmentation"``: ``with_background=True``, ``merge_exclusively=False``,
    ``label_masks=True``): the masks are painted in order of decreasing area (stable), each with the next
    id, smaller masks overwriting larger ones (masks with an ``area`` below ``min_object_size`` are
    skipped); the label image is split into 4-connected components of equal ids (numbered as µSAM's
    blockwise ``elf.parallel.label`` numbers them, see :func:`_label_components`); components with fewer
    than ``min_object_size`` pixels are removed and, with ``with_background``, so is the largest region,
    background (0) included (so nothing when the background is largest); the remaining ids are renumbered
    consecutively in order (when no pixel is 0, µSAM's renumbering maps the smallest id to 0 as well).
    ``shape`` is needed when ``masks`` is empty.
    """
    check_min_object_size(min_object_size)
    masks = list(masks)
    if shape is None:
        if not masks:
            raise ValueError("no masks: give the shape of the label image")
        shape = np.asarray(masks[0]["segmentation"]).shape
    shape = tuple(int(v) for v in shape)

    def paint(i: int, segmentation: np.ndarray, seg_id: int) -> None:
        mask = np.asarray(masks[i]["segmentation"], dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask of shape {mask.shape} does not fit the label image of shape {shape}")
        segmentation[mask] = seg_id

    areas = np.asarray([m["area"] for m in masks], dtype=np.int64)
    return paint_label_image(areas, paint, shape, with_background, min_object_size)


def check_min_object_size(min_object_size: int) -> None:
    if isinstance(min_object_size, bool) or not isinstance(min_object_size, (int, np.integer)) or min_object_size < 0:
        raise ValueError(f"min_object_size must be an integer >= 0, got {min_object_size!r}")


def paint_label_image(areas: np.ndarray, paint: Callable[[int, np.ndarray, int], None], shape: Tuple[int, int],
                 with_background: bool, min_object_size: int) -> np.ndarray:
    """``masks_to_label_image`` on masks given by their areas and a function that paints mask i."""
    segmentation = np.zeros(shape, dtype=np.uint32)
    seg_id = 0
    for i in np.argsort(-areas, kind="stable"):  # decreasing area, ties in order (Python's stable sort)
        if areas[i] < min_object_size:  # skipped before painting, without using up an id
            continue
        seg_id += 1
        paint(int(i), segmentation, seg_id)
    segmentation = _label_components(segmentation)
    ids, sizes = np.unique(segmentation, return_counts=True)
    drop = ids[sizes < min_object_size]
    if with_background:
        drop = np.concatenate([drop, [ids[np.argmax(sizes)]]])
    if len(drop):
        segmentation[np.isin(segmentation, drop)] = 0
    # elf.parallel.relabel_consecutive(start_label=0, keep_zeros=True): sorted ids -> 0, 1, 2, ...;
    # 0 stays 0 (when there is no background at all, µSAM maps the smallest id to 0 as well)
    ids = np.unique(segmentation)
    lookup = np.zeros(int(ids[-1]) + 1, dtype=np.uint32)
    lookup[ids] = np.arange(len(ids), dtype=np.uint32)
    return lookup[segmentation]
