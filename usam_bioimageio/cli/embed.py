"""`usam embed`: embeddings of an image (.npz) or of images, stacks and tiles into a cache."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from usam_bioimageio.embeddings.types import resolve_tiling
from usam_bioimageio.errors import UsageError
from usam_bioimageio.cli.files import (IMAGE_SUFFIXES, Output, check_outputs, check_tile_options, is_stack, load_model,
                                      read_image)


def _embed_to_cache(model, image: np.ndarray, cache: Path, args: argparse.Namespace, name: str) -> str:
    from usam_bioimageio.embeddings.compute import cached_embeddings

    stack = is_stack(image, args.stack)
    plane = image.shape[1:3] if stack else image.shape[:2]
    tile_shape, halo = resolve_tiling(args.tile_shape, args.halo, plane, model.image_size)
    if tile_shape is not None and halo is None:
        halo = (0, 0)
    emb = cached_embeddings(model, image, cache, tile_shape=tile_shape, halo=halo, stack=stack,
                            progress=not args.quiet)
    what = f"a stack of {len(emb)} slices" if stack else f"an image of shape {image.shape[:2]}"
    tiles = f", {len(emb.tiling)} tiles per image" if emb.tiling is not None else ""
    return f"{name}: {what}{tiles} -> {cache}"


def _check_cache_data(cache: Path, image: np.ndarray) -> None:
    """An existing cache of ours computed for other data is refused before the model is loaded (the full
    signature, encoder included, is checked when the cache is opened)."""
    from usam_bioimageio.embeddings.cache import EmbeddingCache, data_sha256, is_micro_sam_cache
    from usam_bioimageio.errors import CacheMismatchError, InputError

    if not cache.is_dir() or not any(cache.iterdir()) or is_micro_sam_cache(cache):
        return
    try:
        stored = EmbeddingCache.read(cache).signature
    except InputError:
        raise
    except (FileNotFoundError, ValueError):
        return  # not a cache of ours: EmbeddingCache.open says why
    if stored.get("data_sha256") != data_sha256(image):
        raise CacheMismatchError(f"embedding cache {cache} was computed for another image (image data sha256 "
                                 "differs). Use another cache path, or delete this one to recompute it")


def cmd_embed(args: argparse.Namespace) -> int:
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.embeddings.npz import save_embeddings

    check_tile_options(args)
    source = Path(args.image)
    if args.cache is None:
        if args.out is None:
            raise UsageError("give --out FILE.npz (one 2D image) or --cache PATH (any image, stack or folder)")
        if args.tile_shape is not None or args.stack or source.is_dir():
            raise UsageError("tiled embeddings, stacks and folders of images are written to a cache: "
                             "pass --cache PATH")
    elif args.out is not None:
        raise UsageError("give --out or --cache, not both")

    # inputs and outputs are checked before the model is loaded: a mistake costs no encoder run
    if args.cache is None:
        image = read_image(args.image)
        if is_stack(image, False):
            raise UsageError(f"{args.image} holds a stack of shape {image.shape}: pass --cache PATH")
        check_outputs([Output("--out", Path(args.out), "npz")], [("--image", source)], overwrite=args.overwrite)
        model = load_model(args)
        emb = compute_embeddings(model, image)
        save_embeddings(Path(args.out), emb, image=image)
        print(f"wrote embeddings {emb.features.shape} to {args.out}")
        return 0
    cache = Path(args.cache)
    # a cache is resumed (or refused when it was computed for something else), never replaced: no --overwrite
    check_outputs([Output("--cache", cache, "cache")], [("--image", source)], overwrite=False)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        model = load_model(args)
        cache.mkdir(parents=True, exist_ok=True)
        for path in files:
            print(_embed_to_cache(model, read_image(str(path)), cache / f"{path.stem}.zarr", args, path.name))
        return 0
    image = read_image(args.image)
    is_stack(image, args.stack)  # --stack on a 2D image: refused before the model is loaded
    _check_cache_data(cache, image)
    model = load_model(args)
    print(_embed_to_cache(model, image, cache, args, source.name))
    return 0
