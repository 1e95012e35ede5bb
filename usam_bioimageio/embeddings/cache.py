"""A persistent embedding cache (zarr) that the user names explicitly, and reading micro-sam's caches.

Computing into a cache is ``usam_bioimageio.embeddings.compute.cached_embeddings``; this module stores,
checks and reads.

Layout of a cache (a zarr group; zarr 3 writes format 3, zarr 2 format 2)::

    attrs["usam_embedding_cache"] = {format, format_version, signature, n_slices, n_tiles, image_shape, tiling}
    complete   uint8 (n_slices, n_tiles), one chunk per item, 0 = missing
    checksums  uint32 (n_slices, n_tiles), one chunk per item: crc32 of the item's float32 features (little-endian)
    features   float32 (n_slices, n_tiles, 1, 256, N/16, N/16), one chunk per item (created with the first item)

An item is one slice (z) of one tile (t); a 2D image has one slice, an untiled image one tile. The
signature (data sha256 / shape / dtype, kind, encoder identity, the model's input size N, tile_shape, halo,
preprocessing and package versions; caches written before N was recorded are of 1024 models) is written when the
cache is created and checked on every later use: anything that differs raises :class:`CacheMismatchError` naming
it. Each item's features are written first and its ``complete`` flag second, so an interrupted computation (killed process) leaves only finished items
flagged; the next call with the same arguments computes the missing ones. Reading a cache as finished
embeddings (:func:`load_cache`) refuses one with missing items. Every item read is checked against its checksum
(written between its features and its flag): zarr reads a deleted chunk as fill values, which would otherwise be
taken as features (:class:`CacheDamagedError`). Caches written before the checksums existed are read unchecked. Writers are not locked: do not compute into
one cache from two processes at once.

micro-sam's own caches (``precompute_image_embeddings(save_path=...)``) are read by
:func:`load_micro_sam_embeddings`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from usam_bioimageio.embeddings.types import StackEmbeddings, Tiling
from usam_bioimageio.errors import CacheDamagedError, CacheMismatchError, InputError
from usam_bioimageio.registry import IMAGE_SIZE, PATCH_SIZE
from usam_bioimageio.runtime.model import SamModel

ATTR = "usam_embedding_cache"
FORMAT = "usam-embedding-cache"
FORMAT_VERSION = 1
# What turns an image into encoder input: µSAM's channel mapping (preprocess.to_rgb) and the per-image
# (per tile / slice) min-max normalisation inside the encoder package. Bump when that changes.
PREPROCESSING_VERSION = "1"
SIGNATURE_KEYS = ("data_sha256", "data_shape", "data_dtype", "kind", "encoder", "image_size", "tile_shape", "halo",
                  "preprocessing", "usam_bioimageio")
# what a signature written without a key means (caches from before the key existed)
_SIGNATURE_DEFAULTS = {"image_size": IMAGE_SIZE}
_DESCRIPTIONS = {
    "data_sha256": "image data (sha256)",
    "data_shape": "image shape",
    "data_dtype": "image dtype",
    "kind": "kind of data",
    "encoder": "image encoder (ONNX weights sha256)",
    "image_size": "model input size",
    "tile_shape": "tile_shape",
    "halo": "halo",
    "preprocessing": "preprocessing version",
    "usam_bioimageio": "usam-bioimageio version",
}
_HASH_BLOCK_BYTES = 64 << 20


def _zarr():
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is installed wherever the cache is used
        raise ImportError("the embedding cache needs zarr: pip install zarr") from err
    return zarr


def data_sha256(data) -> str:
    """sha256 over the shape, dtype and C-order bytes of an array, read in blocks of rows (no full copy)."""
    shape, dtype = tuple(int(s) for s in data.shape), np.dtype(data.dtype)
    h = hashlib.sha256(json.dumps({"shape": list(shape), "dtype": dtype.str}).encode())
    if not shape or 0 in shape:
        return h.hexdigest()
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _HASH_BLOCK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        block = np.ascontiguousarray(np.asarray(data[start:start + step]), dtype=dtype)
        h.update(memoryview(block).cast("B"))
    return h.hexdigest()


def micro_sam_data_signature(data) -> str:
    """micro-sam's ``data_signature`` of an array: the sha1 hex digest of its C-order bytes (nothing else: no shape
    or dtype), read in blocks of rows as :func:`data_sha256`."""
    h = hashlib.sha1()
    shape, dtype = tuple(int(s) for s in data.shape), np.dtype(data.dtype)
    if not shape:
        return hashlib.sha1(np.asarray(data).tobytes()).hexdigest()
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _HASH_BLOCK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        h.update(memoryview(np.ascontiguousarray(np.asarray(data[start:start + step]), dtype=dtype)).cast("B"))
    return h.hexdigest()


def _checksum(features: np.ndarray) -> int:
    """crc32 of an item's features as little-endian float32 (cheap: about 1 ms for 4 MB)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(features, dtype="<f4")).cast("B"))


def make_signature(model: SamModel, data, *, stack: bool, tiling: Optional[Tiling]) -> dict:
    from usam_bioimageio import __version__

    return {
        "data_sha256": data_sha256(data),
        "data_shape": [int(s) for s in data.shape],
        "data_dtype": np.dtype(data.dtype).str,
        "kind": "stack" if stack else "image",
        "encoder": model.encoder_identity,
        "image_size": model.image_size,
        "tile_shape": None if tiling is None else list(tiling.tile_shape),
        "halo": None if tiling is None else list(tiling.halo),
        "preprocessing": PREPROCESSING_VERSION,
        "usam_bioimageio": __version__,
    }


def _short(value) -> str:
    text = json.dumps(value)
    return text[:19] + "…\"" if isinstance(value, str) and len(value) > 16 else text


def _signature_differences(stored: dict, current: dict) -> list:
    return [k for k in SIGNATURE_KEYS if stored.get(k, _SIGNATURE_DEFAULTS.get(k)) != current.get(k)]


def _is_zarr_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def _create_array(group, name, shape, chunks, dtype):
    if hasattr(group, "create_array"):  # zarr 3
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)  # zarr 2


class EmbeddingCache:
    """An open embedding cache: which items are complete, writing and reading them. See the module doc."""

    def __init__(self, path: Path, group, meta: dict):
        self.path, self._group, self.meta = path, group, meta
        self.tiling = Tiling.create(**meta["tiling"]) if meta.get("tiling") else None

    # -- opening --------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, *, signature: dict, n_slices: int, image_shape: Tuple[int, int],
             tiling: Optional[Tiling]) -> "EmbeddingCache":
        """Open the cache at ``path`` for this computation, creating it if needed; refuse a mismatch."""
        zarr = _zarr()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"embedding cache {path} is a file; a cache is a folder (zarr): choose another path")
        if path.is_dir() and any(path.iterdir()) and not _is_zarr_dir(path):
            raise ValueError(f"{path} exists and is not an embedding cache; choose a new path for the cache")
        group = zarr.open_group(str(path), mode="a")
        attrs = group.attrs.asdict() if hasattr(group.attrs, "asdict") else dict(group.attrs)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "signature": signature,
            "n_slices": int(n_slices),
            "n_tiles": 1 if tiling is None else len(tiling),
            "image_shape": [int(s) for s in image_shape],
            "tiling": None if tiling is None else tiling.to_dict(),
        }
        if ATTR not in attrs:
            if "data_signature" in attrs or "features" in group:
                raise ValueError(f"{path} is a micro-sam embedding cache or another zarr container, not a usam "
                                 "cache: read micro-sam caches with load_micro_sam_embeddings, or choose a new path")
            if list(group.keys()):
                raise ValueError(f"{path} is a zarr container but not an embedding cache; choose a new path")
            group.attrs[ATTR] = meta  # the signature goes first: a resumed run checks it
            _create_array(group, "checksums", shape=(meta["n_slices"], meta["n_tiles"]), chunks=(1, 1),
                          dtype="uint32")
            _create_array(group, "complete", shape=(meta["n_slices"], meta["n_tiles"]), chunks=(1, 1), dtype="uint8")
            return cls(path, group, meta)
        stored = attrs[ATTR]
        cls._check_format(path, stored)
        differences = _signature_differences(stored.get("signature", {}), signature)
        if differences:
            details = "; ".join(
                f"{_DESCRIPTIONS[k]}: cache {_short(stored['signature'].get(k, _SIGNATURE_DEFAULTS.get(k)))}, "
                f"now {_short(signature.get(k))}"
                for k in differences)
            raise CacheMismatchError(
                f"embedding cache {path} was computed for something else ({details}). Use another cache path, "
                "or delete this one to recompute it")
        for key in ("n_slices", "n_tiles", "image_shape", "tiling"):
            if stored.get(key) != meta[key]:
                raise ValueError(f"embedding cache {path} is inconsistent: {key} is {stored.get(key)}, "
                                 f"expected {meta[key]}; delete it and recompute")
        if "complete" not in group:  # created, then interrupted before the flags existed
            if "checksums" not in group:
                _create_array(group, "checksums", shape=(meta["n_slices"], meta["n_tiles"]), chunks=(1, 1),
                              dtype="uint32")
            _create_array(group, "complete", shape=(meta["n_slices"], meta["n_tiles"]), chunks=(1, 1), dtype="uint8")
        return cls(path, group, stored)

    @staticmethod
    def _check_format(path: Path, meta: dict) -> None:
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"embedding cache {path} has format {meta.get('format')} "
                             f"{meta.get('format_version')}; this version reads {FORMAT} {FORMAT_VERSION}")

    @classmethod
    def read(cls, path) -> "EmbeddingCache":
        """Open an existing cache for reading (no signature to check it against)."""
        path = Path(path)
        if not (path.is_dir() and _is_zarr_dir(path)):
            raise FileNotFoundError(f"no embedding cache at {path}")
        group, attrs = _open_for_reading(path)
        if ATTR not in attrs:
            raise ValueError(f"{path} is not a usam embedding cache")
        cls._check_format(path, attrs[ATTR])
        return cls(path, group, attrs[ATTR])

    # -- items ----------------------------------------------------------------------------------------
    @property
    def signature(self) -> dict:
        return dict(self.meta["signature"])

    @property
    def n_items(self) -> int:
        return self.meta["n_slices"] * self.meta["n_tiles"]

    def _flag(self, z: int, t: int) -> bool:
        try:
            return bool(self._group["complete"][z, t])
        except Exception:  # an unreadable flag (a write cut short without atomic writes) is no flag
            return False

    def completed(self) -> np.ndarray:
        """(n_slices, n_tiles) bool: which items are complete."""
        try:
            return np.asarray(self._group["complete"][...]).astype(bool)
        except Exception:
            z, t = self.meta["n_slices"], self.meta["n_tiles"]
            return np.array([[self._flag(i, j) for j in range(t)] for i in range(z)], dtype=bool).reshape(z, t)

    def missing(self) -> list:
        done = self.completed()
        return [(int(z), int(t)) for z, t in zip(*np.nonzero(~done))]

    def write(self, z: int, t: int, features: np.ndarray) -> None:
        """Store item (z, t): the features first, then their checksum, then its completion flag."""
        features = np.asarray(features, dtype=np.float32)
        if "features" not in self._group:
            shape = (self.meta["n_slices"], self.meta["n_tiles"]) + features.shape
            _create_array(self._group, "features", shape=shape, chunks=(1, 1) + features.shape, dtype="float32")
        array = self._group["features"]
        if array.shape[2:] != features.shape:
            raise ValueError(f"features of shape {features.shape} do not fit cache items of {array.shape[2:]}")
        array[z, t] = features
        if "checksums" in self._group:  # not in caches written before the checksums existed
            self._group["checksums"][z, t] = _checksum(features)
        self._mark_complete(z, t)

    def _mark_complete(self, z: int, t: int) -> None:
        self._group["complete"][z, t] = 1

    def get(self, z: int, t: int) -> np.ndarray:
        if not self._flag(z, t):
            raise ValueError(f"embedding cache {self.path}: item (slice {z}, tile {t}) is not complete; "
                             "run the computation again with this cache to finish it")
        try:
            features = np.asarray(self._group["features"][z, t])
            expected = int(self._group["checksums"][z, t]) if "checksums" in self._group else None
        except Exception as err:  # a damaged chunk: the codecs raise many types
            raise CacheDamagedError(f"embedding cache {self.path}: item (slice {z}, tile {t}) cannot be read "
                                    f"({type(err).__name__}: {err}); delete the cache and compute it again") from None
        # a deleted chunk reads as zeros (zarr's fill value), a changed one as other numbers: neither is an error
        # of zarr's, only the checksum shows it
        if expected is not None and _checksum(features) != expected:
            raise CacheDamagedError(f"embedding cache {self.path}: item (slice {z}, tile {t}) is flagged complete but "
                                    "its features are missing or changed (a chunk file deleted or edited?): delete "
                                    "the cache and compute it again")
        return features

    def value(self) -> StackEmbeddings:
        """The cached embeddings (read on access); ValueError if items are missing."""
        missing = self.missing()
        if missing:
            raise ValueError(
                f"embedding cache {self.path} is incomplete: {len(missing)} of {self.n_items} items missing "
                f"(first: slice {missing[0][0]}, tile {missing[0][1]}); run the same computation "
                "(e.g. `usam embed ... --cache`) again to resume it")
        sig = self.meta["signature"]
        return StackEmbeddings(self.meta["n_slices"], tuple(self.meta["image_shape"]), self.tiling, sig["encoder"],
                               self.get, is_stack=sig["kind"] == "stack")


def _open_for_reading(path: Path):
    """(group, attrs) of the zarr group at ``path``; InputError for damaged metadata."""
    try:
        group = _zarr().open_group(str(path), mode="r")
        return group, (group.attrs.asdict() if hasattr(group.attrs, "asdict") else dict(group.attrs))
    except Exception as err:  # zarr raises many types for damaged or foreign metadata
        raise InputError(f"embedding cache {path} cannot be opened ({type(err).__name__}: {err}); delete it and "
                         "compute it again") from None


def is_micro_sam_cache(path) -> bool:
    path = Path(path)
    if not (path.is_dir() and _is_zarr_dir(path)):
        return False
    group, attrs = _open_for_reading(path)
    return ATTR not in attrs and "features" in group


def check_micro_sam_cache(path, data, what: str = "the --image file") -> None:
    """Refuse a micro-sam cache computed for other data than ``data``: micro-sam records its ``data_signature``
    (:func:`micro_sam_data_signature`) in the root attrs; a cache without one is unfinished (micro-sam writes it
    last)."""
    path = Path(path)
    _, attrs = _open_for_reading(path)
    stored = attrs.get("data_signature")
    if not isinstance(stored, str) or "input_size" not in attrs:
        raise InputError(f"micro-sam cache {path} is incomplete (no signature written): recompute it with micro-sam")
    if stored != micro_sam_data_signature(data):
        raise CacheMismatchError(
            f"micro-sam cache {path} was computed for other data than the {tuple(data.shape)} {np.dtype(data.dtype)} "
            f"image read from {what} (its data_signature, a sha1 of the pixels, differs): give that image's cache, or "
            "compute one with micro-sam or `usam embed --cache`")


def load_cache(path, *, model: Optional[SamModel] = None) -> StackEmbeddings:
    """Embeddings from a finished cache: ours, or micro-sam's (see :func:`load_micro_sam_embeddings`); always a
    :class:`StackEmbeddings` (a 2D image's: one slice, ``is_stack`` False, ``[0]`` its embeddings)."""
    if is_micro_sam_cache(path):
        return load_micro_sam_embeddings(path, model=model)
    store = EmbeddingCache.read(path)
    if model is not None:
        stored = store.signature.get("image_size", IMAGE_SIZE)
        if stored != model.image_size:
            raise CacheMismatchError(f"embedding cache {store.path} was computed by a model of input size {stored}; "
                                     f"this model takes {model.image_size}: compute a cache with this model")
    return store.value()


def load_micro_sam_embeddings(path, *, model: Optional[SamModel] = None) -> StackEmbeddings:
    """Read a cache written by micro-sam's ``precompute_image_embeddings(save_path=path)`` (1.8.x layout).

    Its layouts: 2D untiled: dataset ``features`` (1, 256, 64, 64), attrs ``original_size`` /
    ``input_size``; 3D untiled: ``features`` (z, 1, 256, 64, 64); tiled: group ``features`` with attrs
    ``shape``, ``tile_shape``, ``halo`` (and ``tiles_in_mask`` when a mask skipped tiles) holding one dataset
    per tile id, (1, 256, 64, 64) in 2D or (z, 1, 256, 64, 64) in 3D, each with attrs ``original_size``
    (the outer tile's shape) and ``input_size``. The root attrs hold micro-sam's signature (``data_signature``
    = sha1 of the data, ``tile_shape``, ``halo``, ``model_type``, ``model_name``, ``model_hash``,
    ``micro_sam_version``); micro-sam writes them last, so ``input_size`` among them marks a finished cache.

    micro-sam records no identity of our packages, so the returned embeddings have ``encoder=""``: they are
    not checked against the prompt decoder. With ``model``, the architecture (``model_type``) and the input size
    (micro-sam's models take 1024: embeddings (1, 256, 64, 64)) are checked.
    Tiles that micro-sam skipped (outside its mask) read as None.
    """
    zarr = _zarr()
    path = Path(path)
    if not (path.is_dir() and _is_zarr_dir(path)):
        raise FileNotFoundError(f"no zarr embedding cache at {path}")
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict() if hasattr(group.attrs, "asdict") else dict(group.attrs)
    if "features" not in group:
        raise ValueError(f"{path} holds no 'features': not a micro-sam embedding cache")
    if "input_size" not in attrs or "data_signature" not in attrs:
        raise ValueError(f"micro-sam cache {path} is incomplete (no signature written): recompute it with micro-sam")
    if model is not None and attrs.get("model_type") and model.model_type \
            and attrs["model_type"] != model.model_type:
        raise ValueError(f"micro-sam cache {path} was computed with a {attrs['model_type']} model, "
                         f"this model is {model.model_type}")
    features = group["features"]
    if model is not None:
        first = features if hasattr(features, "shape") else next(iter(features.arrays()))[1]
        size = int(first.shape[-1]) * PATCH_SIZE
        if size != model.image_size:
            raise CacheMismatchError(f"micro-sam cache {path} holds embeddings of a model of input size {size} "
                                     f"(features {tuple(first.shape)}); this model takes {model.image_size}")
    if attrs.get("tile_shape") is None:
        original = tuple(int(s) for s in attrs["original_size"])
        if features.ndim == 4:
            return StackEmbeddings(1, original, None, "", lambda z, t: np.asarray(features[...], dtype=np.float32),
                                   is_stack=False)
        if features.ndim == 5:
            return StackEmbeddings(int(features.shape[0]), original, None, "",
                                   lambda z, t: np.asarray(features[z], dtype=np.float32))
        raise ValueError(f"micro-sam cache {path}: unexpected features of shape {features.shape}")
    fattrs = features.attrs.asdict() if hasattr(features.attrs, "asdict") else dict(features.attrs)
    tiling = Tiling.create(fattrs["shape"], fattrs["tile_shape"], fattrs["halo"])
    present = sorted(int(k) for k in features.array_keys())
    if not present:
        raise ValueError(f"micro-sam cache {path} holds no tiles")
    for t in present:
        stored = tuple(int(s) for s in features[str(t)].attrs["original_size"])
        if stored != tiling.tile(t).outer_shape:
            raise ValueError(f"micro-sam cache {path}: tile {t} has shape {stored}, this tiling gives "
                             f"{tiling.tile(t).outer_shape}")
    ndim = features[str(present[0])].ndim
    present_set = set(present)

    def get(z: Optional[int], t: int):
        if t not in present_set:
            return None
        array = features[str(t)]
        return np.asarray(array[...] if z is None else array[z], dtype=np.float32)

    if ndim == 4:
        return StackEmbeddings(1, tiling.shape, tiling, "", lambda z, t: get(None, t), is_stack=False)
    n_slices = int(features[str(present[0])].shape[0])
    return StackEmbeddings(n_slices, tiling.shape, tiling, "", get)
