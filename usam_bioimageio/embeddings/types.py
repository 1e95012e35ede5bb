"""Embeddings as values: plain (one 2D image), tiled (micro-sam's tiling of a large image) and per-slice
(stacks, time series), and the tiling itself.

The tiling is micro-sam's (1.8.14 ``util.precompute_image_embeddings(tile_shape=..., halo=...)``, which uses
``bioimage_cpp.utils.Blocking([0, 0], shape, tile_shape).get_block_with_halo(tile_id, halo)``):

- inner tiles cover the image on a regular grid from the origin: tile ``(i, j)`` starts at
  ``(i * tile_h, j * tile_w)`` and ends there plus ``tile_shape``, clipped to the image (the last row /
  column of tiles is smaller when the image is not a multiple of ``tile_shape``);
- tile ids run in C order over that grid (the x index fastest): ``id = i * n_tiles_x + j``;
- the outer tile is the inner tile grown by ``halo`` on every side and clipped to the image
  (``max(begin - halo, 0)``, ``min(end + halo, shape)``): no padding, so edge tiles are smaller.

Each outer tile is embedded as an image of its own (micro-sam's ``_to_image(input_[outer_tile])``: the
per-channel min-max normalisation is per tile, which the image encoder package does in its graph), so a
tile's embeddings are exactly ``compute_embeddings(model, image[tile.outer_slices])``.

Everything is computed one tile (or slice) at a time: with a ``cache`` each result goes to disk as soon as
it is computed and the returned value reads tiles back on demand, so memory does not grow with the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

Pair = Tuple[int, int]
PairLike = Union[int, Sequence[int]]


@dataclass(frozen=True)
class Embeddings:
    """SAM image embeddings of one 2D image.

    features: (1, 256, N/16, N/16) float32 for a model of input size N ((1, 256, 64, 64) at 1024);
    original_shape: (h, w) of the image they were computed from; encoder: identity (ONNX weights sha256) of
    the image encoder, checked by the decoders (as the features' grid is against the model's input size).
    """

    features: np.ndarray
    original_shape: Tuple[int, int]
    encoder: str


def as_pair(value: PairLike, name: str, *, minimum: int) -> Pair:
    """An int or a (y, x) pair of ints -> (y, x); ValueError if not integral or below ``minimum``."""
    values = [value, value] if np.ndim(value) == 0 else list(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be one int or a (y, x) pair, got {value!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not float(v).is_integer():
            raise ValueError(f"{name} must hold integers, got {value!r}")
        if int(v) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        out.append(int(v))
    return out[0], out[1]


@dataclass(frozen=True)
class Tile:
    """One tile: its id, the inner block ``begin``..``end`` and the outer block (inner + halo, clipped to
    the image) ``outer_begin``..``outer_end``; all (y, x) pixel indices, ends exclusive."""

    index: int
    begin: Pair
    end: Pair
    outer_begin: Pair
    outer_end: Pair

    @property
    def inner_slices(self) -> Tuple[slice, slice]:
        return slice(self.begin[0], self.end[0]), slice(self.begin[1], self.end[1])

    @property
    def outer_slices(self) -> Tuple[slice, slice]:
        return slice(self.outer_begin[0], self.outer_end[0]), slice(self.outer_begin[1], self.outer_end[1])

    @property
    def outer_shape(self) -> Pair:
        return self.outer_end[0] - self.outer_begin[0], self.outer_end[1] - self.outer_begin[1]

    @property
    def inner_local_slices(self) -> Tuple[slice, slice]:
        """The inner block in the frame of the outer block."""
        (y0, x0), (oy, ox) = self.begin, self.outer_begin
        return slice(y0 - oy, self.end[0] - oy), slice(x0 - ox, self.end[1] - ox)


@dataclass(frozen=True)
class Tiling:
    """micro-sam's tiling of an image of ``shape`` (h, w) into ``tile_shape`` tiles with ``halo``."""

    shape: Pair
    tile_shape: Pair
    halo: Pair

    @classmethod
    def create(cls, shape: Sequence[int], tile_shape: PairLike, halo: PairLike) -> "Tiling":
        shape = as_pair(tuple(shape)[:2], "image shape", minimum=1)
        return cls(shape, as_pair(tile_shape, "tile_shape", minimum=1), as_pair(halo, "halo", minimum=0))

    @property
    def grid(self) -> Pair:
        """Number of tiles along y and x."""
        return math.ceil(self.shape[0] / self.tile_shape[0]), math.ceil(self.shape[1] / self.tile_shape[1])

    def __len__(self) -> int:
        ny, nx = self.grid
        return ny * nx

    def tile(self, index: int) -> Tile:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"tile {index} does not exist: this tiling has {n} tiles")
        grid_pos = divmod(int(index), self.grid[1])
        begin = tuple(p * t for p, t in zip(grid_pos, self.tile_shape))
        end = tuple(min(b + t, s) for b, t, s in zip(begin, self.tile_shape, self.shape))
        outer_begin = tuple(max(b - h, 0) for b, h in zip(begin, self.halo))
        outer_end = tuple(min(e + h, s) for e, h, s in zip(end, self.halo, self.shape))
        return Tile(int(index), begin, end, outer_begin, outer_end)

    def tiles(self) -> Tuple[Tile, ...]:
        return tuple(self.tile(i) for i in range(len(self)))

    def tile_at(self, y: int, x: int) -> Tile:
        """The tile whose inner block holds pixel (y, x) (micro-sam's ``coordinates_to_block_id``)."""
        if not (0 <= y < self.shape[0] and 0 <= x < self.shape[1]):
            raise ValueError(f"pixel (y={y}, x={x}) lies outside the image of shape {self.shape}")
        return self.tile((y // self.tile_shape[0]) * self.grid[1] + x // self.tile_shape[1])

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "tile_shape": list(self.tile_shape), "halo": list(self.halo)}


#: ``tile_shape`` value that derives the tiling from the model's input size (:func:`resolve_tiling`).
AUTO_TILING = "auto"


def auto_tiling(image_size: int, halo: Optional[PairLike] = None) -> Tuple[Pair, Pair]:
    """(tile_shape, halo) of the tiling derived from a model's input size N: halo N / 8 (unless given) and inner
    tiles of N - 2 halo, so that every interior tile's outer block (tile + halo) is exactly N x N and is encoded at
    its own resolution (no resize), the frame the model takes. 1024: tiles 768 with halo 128; 256: 192 with 32."""
    hy, hx = as_pair(image_size // 8 if halo is None else halo, "halo", minimum=0)
    if 2 * max(hy, hx) >= image_size:
        raise ValueError(f"halo {(hy, hx)} leaves no tile: with --tile-shape {AUTO_TILING} the outer tiles are "
                         f"{image_size} x {image_size} (the model's input size), so the halo must be below "
                         f"{image_size // 2}")
    return (image_size - 2 * hy, image_size - 2 * hx), (hy, hx)


def resolve_tiling(tile_shape, halo, image_shape: Sequence[int], image_size: int):
    """``(tile_shape, halo)`` with ``tile_shape`` :data:`AUTO_TILING` resolved for an image of ``image_shape`` and a
    model of input size ``image_size``: (None, None) (untiled) when the image fits the model's input (its longer
    side is at most N), else :func:`auto_tiling`. Other values are returned unchanged."""
    if not (isinstance(tile_shape, str) and tile_shape == AUTO_TILING):
        return tile_shape, halo
    if max(int(v) for v in tuple(image_shape)[:2]) <= image_size:
        return None, None
    return auto_tiling(image_size, halo)


class TileFeatures:
    """Read-only sequence of per-tile features: ``get(t)`` -> (1, 256, N/16, N/16) float32, loaded on access."""

    def __init__(self, n: int, get: Callable[[int], np.ndarray]):
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, t: int) -> np.ndarray:
        if not -self._n <= t < self._n:
            raise IndexError(f"tile {t} out of range for {self._n} tiles")
        return self._get(t % self._n)


@dataclass(frozen=True, eq=False)
class TiledEmbeddings:
    """SAM embeddings of a 2D image, one per tile of ``tiling``.

    ``features[t]`` is tile t's (1, 256, N/16, N/16) array (a list in memory, or read from a cache on access);
    ``encoder`` is the image encoder's identity (ONNX weights sha256), "" when unknown (micro-sam caches).
    """

    tiling: Tiling
    features: Sequence[np.ndarray]
    encoder: str

    def __post_init__(self):
        if len(self.features) != len(self.tiling):
            raise ValueError(f"{len(self.features)} tile features for a tiling of {len(self.tiling)} tiles")

    @property
    def original_shape(self) -> Pair:
        return self.tiling.shape

    def __len__(self) -> int:
        return len(self.tiling)

    def tile_embeddings(self, t: int) -> Embeddings:
        """Tile t as ordinary ``Embeddings`` of its outer block (prompts in the outer block's frame)."""
        features = self.features[t]
        if features is None:
            raise ValueError(f"tile {t} has no embeddings (micro-sam skips tiles outside its mask)")
        return Embeddings(features=np.asarray(features), original_shape=self.tiling.tile(t).outer_shape,
                          encoder=self.encoder)


@dataclass(frozen=True, eq=False)
class StackEmbeddings:
    """Embeddings of a stack of 2D images (z-slices or time points), computed per slice.

    ``stack[z]`` is slice z's ``Embeddings`` (``tiling`` None) or ``TiledEmbeddings``; slices are read on
    access when the stack comes from a cache. ``get(z, t)`` gives the features of slice z (tile t).
    Caches always read as this one type: a 2D image's cache is a stack of one slice with ``is_stack``
    False, whose ``stack[0]`` is the image's (plain or tiled) embeddings.
    """

    n_slices: int
    image_shape: Pair
    tiling: Optional[Tiling]
    encoder: str
    get: Callable[[int, int], np.ndarray]
    is_stack: bool = True

    def __len__(self) -> int:
        return self.n_slices

    def __getitem__(self, z: int) -> Union[Embeddings, TiledEmbeddings]:
        if not -self.n_slices <= z < self.n_slices:
            raise IndexError(f"slice {z} out of range for a stack of {self.n_slices} slices")
        z = int(z) % self.n_slices
        if self.tiling is None:
            return Embeddings(features=np.asarray(self.get(z, 0)), original_shape=self.image_shape,
                              encoder=self.encoder)
        return TiledEmbeddings(self.tiling, TileFeatures(len(self.tiling), lambda t: self.get(z, t)), self.encoder)

    @classmethod
    def in_memory(cls, features: List[List[np.ndarray]], image_shape: Pair, tiling: Optional[Tiling], encoder: str):
        return cls(len(features), tuple(image_shape), tiling, encoder, lambda z, t: features[z][t])


def check_image_2d(image, what: str = "image") -> None:
    """Cheap up-front checks of a 2D image (H, W) or (H, W, C); the full ones run per tile (``to_rgb``)."""
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{what} must be an array with shape and dtype, got {type(image).__name__}")
    if len(shape) not in (2, 3):
        raise ValueError(f"{what} must be 2D, (H, W) or (H, W, C) with channels last, got shape {tuple(shape)}; "
                         "for a 3D stack or time series use compute_stack_embeddings")
    if np.dtype(dtype).kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {dtype}")
    if 0 in tuple(shape):
        raise ValueError(f"{what} is empty: shape {tuple(shape)}")


def check_stack(volume) -> None:
    shape, dtype = getattr(volume, "shape", None), getattr(volume, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"volume must be an array with shape and dtype, got {type(volume).__name__}")
    if len(shape) not in (3, 4):
        raise ValueError(f"volume must be (z, y, x) or (z, y, x, c), got shape {tuple(shape)}")
    check_image_2d(volume[0], "each slice of the volume")


def iterate_items(n_slices: int, tiling: Optional[Tiling]) -> Iterable[Tuple[int, int]]:
    for z in range(n_slices):
        for t in range(1 if tiling is None else len(tiling)):
            yield z, t


def item_input(data, z: Optional[int], tiling: Optional[Tiling], t: int):
    """The region of ``data`` that item (z, t) is computed from (z None: ``data`` is one 2D image)."""
    plane = data if z is None else data[z]
    return plane if tiling is None else plane[tiling.tile(t).outer_slices]


