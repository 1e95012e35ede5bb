"""Data sets laid out as ``../shared/data/dsb2018``: a split of (image, labels) pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np


Pair = Tuple[np.ndarray, np.ndarray]


def read_split(data_dir: Path, split: str, limit: Optional[int] = None) -> List[Pair]:
    """(image, labels) pairs of a split of a dataset laid out as ``../shared/data/dsb2018``: ``splits.json``
    ({"train": [ids], "val": [...], "test": [...]}), ``images/ID.*`` and ``labels/ID.tif``."""
    import tifffile

    from usam_bioimageio.io.images import read_image

    data_dir = Path(data_dir)
    splits = json.loads((data_dir / "splits.json").read_text())
    if split not in splits:
        raise ValueError(f"{data_dir}/splits.json has no split {split!r} (has {sorted(splits)})")
    pairs = []
    for sid in splits[split][:limit]:
        images = sorted((data_dir / "images").glob(f"{sid}.*"))
        if not images:
            raise FileNotFoundError(f"no image for {sid} in {data_dir / 'images'}")
        pairs.append((read_image(images[0]), tifffile.imread(data_dir / "labels" / f"{sid}.tif")))
    return pairs
