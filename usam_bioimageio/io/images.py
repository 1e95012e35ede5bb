"""Reading images from files."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np


def read_image(path: Union[str, Path]) -> np.ndarray:
    """TIFF via tifffile, everything else via imageio; RGBA drops alpha; shape (H, W) or (H, W, C)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            image = iio.imread(path)
    except Exception as err:  # the readers raise many types for unreadable files
        raise ValueError(f"cannot read image {path}: {err}") from err
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    return np.asarray(image)
