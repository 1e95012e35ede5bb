"""Large images, stacks and the embedding cache: micro-sam's tiling, tiled prompting, the zarr cache.

Encoder calls are the cost here (a seeded random vit_t, one call per tile or slice, each a 1024 x 1024
forward pass): the module fixtures compute the real embeddings once and the tests share them; geometry that
needs many tiles runs on a stand-in encoder that records its input instead.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, DSB, dsb_test_ids

from usam_bioimageio.errors import CacheMismatchError
from usam_bioimageio.embeddings.cache import EmbeddingCache, load_cache, load_micro_sam_embeddings
from usam_bioimageio.embeddings.compute import cached_embeddings
from usam_bioimageio.embeddings.types import Embeddings
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.io.prompt_files import ObjectPrompt
from usam_bioimageio.prompting.predict import segment_from_prompts
from usam_bioimageio.prompting.tiled import (
    label_objects_tiled,
    segment_from_prompts_tiled,
    segment_objects_tiled,
)
from usam_bioimageio.embeddings.types import StackEmbeddings, TiledEmbeddings, Tiling
from usam_bioimageio.embeddings.compute import compute_stack_embeddings, compute_tiled_embeddings

ROOT = Path(__file__).resolve().parents[1]
GONUCLEAR = DATA / "gonuclear3d"


# -- helpers --------------------------------------------------------------------------------------------

class CountingRunner:
    """Wraps a runner and counts its calls."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0
        self.input_names = runner.input_names

    def __call__(self, **inputs):
        self.calls += 1
        return self.runner(**inputs)


@contextmanager
def counting_encoder(model: SamModel):
    original = model.runner("image_encoder")
    counter = CountingRunner(original)
    model._runners["image_encoder"] = counter
    try:
        yield counter
    finally:
        model._runners["image_encoder"] = original


class StandInEncoder:
    """An image encoder stand-in that costs nothing: features record the input's shape and content."""

    input_names = ("image",)

    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        f = np.zeros((1, 256, 64, 64), np.float32)
        f[0, 0, 0, :2] = image.shape[2:]
        f[0, 1] = image.mean()
        f[0, 2, :8, :8] = image[0, :, :8, :8].mean(axis=0)[:8, :8] if min(image.shape[2:]) >= 8 else 0
        f[0, 3] = image.std()
        return {"features": f}


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image[..., :3].mean(axis=-1).round().astype(image.dtype)


def build_mosaic(size: int = 2048):
    """size x size from real 520 x 696 DSB2018 test images (twelve, repeated and flipped when more are needed;
    cropped at the edge) and the stitched labels: tile borders at multiples of 1024 run through images, so
    objects cross them."""
    import tifffile

    from usam_bioimageio.io.images import read_image

    picked = []
    for sid in dsb_test_ids():
        image = read_image(DSB / "images" / f"{sid}.png")
        if image.shape[:2] == (520, 696):
            picked.append((gray(image), tifffile.imread(DSB / "labels" / f"{sid}.tif")))
        if len(picked) == 12:
            break
    assert len(picked) == 12
    mosaic = np.zeros((size, size), np.uint8)
    labels = np.zeros((size, size), np.uint32)
    offset = 0
    n_cols = -(-size // 696)
    for k in range(-(-size // 520) * n_cols):
        image, lab = picked[k % 12]
        if k >= 12:  # a repeated image: flipped, so no two neighbours are equal
            image, lab = image[::-1, ::(-1) ** (k // 12)], lab[::-1, ::(-1) ** (k // 12)]
        y0, x0 = (k // n_cols) * 520, (k % n_cols) * 696
        h, w = min(520, size - y0), min(696, size - x0)
        mosaic[y0:y0 + h, x0:x0 + w] = image[:h, :w]
        lab = lab[:h, :w].astype(np.uint32)
        labels[y0:y0 + h, x0:x0 + w] = np.where(lab > 0, lab + offset, 0)
        offset += int(lab.max())
    return mosaic, labels


def crossing_boxes(labels: np.ndarray, border: int = 1024):
    """(x0, y0, x1, y1) boxes of two objects: one crossing x = border in the top half, one crossing y = border."""
    from scipy import ndimage

    boxes = []
    for axis in (1, 0):
        best = None
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            lo, hi = sl[axis].start, sl[axis].stop
            other = sl[1 - axis]
            if lo < border - 5 and hi > border + 5 and other.stop < border - 50 and other.start > 50:
                size = (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start)
                if best is None or size > best[0]:
                    best = (size, sl)
        assert best is not None, "no object crosses the tile border"
        sl = best[1]
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
    return np.asarray(boxes, dtype=float)


def decode_in_tile(model, tiled: TiledEmbeddings, box, shape):
    """What micro-sam does for one box, written out: tile of the box centre, box in its frame, paste back."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    tile = tiled.tiling.tile_at(int(np.round(cy)), int(np.round(cx)))
    (oy, ox), (h, w) = tile.outer_begin, tile.outer_shape
    local = [max(box[0] - ox, 0), max(box[1] - oy, 0), min(box[2] - ox, w), min(box[3] - oy, h)]
    result = segment_from_prompts(model, tiled.tile_embeddings(tile.index), boxes=np.asarray(local))
    full = np.zeros(shape, bool)
    full[tile.outer_slices] = result.masks[0, 0]
    return tile, np.asarray(local), full


# -- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(vit_t_family):
    family, _ = vit_t_family
    return SamModel.load(family)


@pytest.fixture
def fake_model(vit_t_family):
    """The family with the stand-in encoder (the prompt decoder is real)."""
    family, _ = vit_t_family
    m = SamModel.load(family)
    m._runners["image_encoder"] = StandInEncoder()
    return m


@pytest.fixture(scope="module")
def small(model, tmp_path_factory):
    """A real 256 x 256 image, its untiled embeddings through a cache (one encoder call) and the cache path."""
    import tifffile

    image = tifffile.imread(DATA / "stardist_samples" / "tests_img2d.tif")
    cache = tmp_path_factory.mktemp("small") / "stardist.zarr"
    with counting_encoder(model) as counter:
        stack = cached_embeddings(model, image, cache, progress=False)
    assert counter.calls == 1
    assert isinstance(stack, StackEmbeddings) and len(stack) == 1 and not stack.is_stack  # one type, one slice
    return image, stack[0], cache


@pytest.fixture(scope="module")
def mosaic(model, tmp_path_factory):
    """The 2048 x 2048 mosaic, its labels, its tiled embeddings (tile 1024, halo 256) in a cache."""
    image, labels = build_mosaic()
    cache = tmp_path_factory.mktemp("mosaic") / "mosaic.zarr"
    with counting_encoder(model) as counter:
        tiled = compute_tiled_embeddings(model, image, tile_shape=1024, halo=256, cache=cache, progress=False)
    assert counter.calls == 4
    return image, labels, cache, tiled


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    """Three slices of a real GoNuclear 3D stack, their embeddings in a cache (three encoder calls)."""
    import tifffile

    volume = tifffile.imread(GONUCLEAR / "1135_mini_raw.tif")[48:51]
    labels = tifffile.imread(GONUCLEAR / "1135_mini_labels.tif")[48:51]
    cache = tmp_path_factory.mktemp("stack") / "gonuclear.zarr"
    with counting_encoder(model) as counter:
        emb = compute_stack_embeddings(model, volume, cache=cache, progress=False)
    assert counter.calls == 3
    return volume, labels, cache, emb


# -- tiling geometry -------------------------------------------------------------------------------------

# bioimage_cpp 0.9.0 (micro-sam 1.8.14's Blocking): Blocking([0, 0], (7, 10), (3, 4)).get_block_with_halo(i,
# (2, 5)) -> inner begin, inner end, outer begin, outer end
BLOCKING_7x10 = [
    [[0, 0], [3, 4], [0, 0], [5, 9]], [[0, 4], [3, 8], [0, 0], [5, 10]], [[0, 8], [3, 10], [0, 3], [5, 10]],
    [[3, 0], [6, 4], [1, 0], [7, 9]], [[3, 4], [6, 8], [1, 0], [7, 10]], [[3, 8], [6, 10], [1, 3], [7, 10]],
    [[6, 0], [7, 4], [4, 0], [7, 9]], [[6, 4], [7, 8], [4, 0], [7, 10]], [[6, 8], [7, 10], [4, 3], [7, 10]],
]
BLOCKING_2048 = [
    [[0, 0], [1024, 1024], [0, 0], [1280, 1280]], [[0, 1024], [1024, 2048], [0, 768], [1280, 2048]],
    [[1024, 0], [2048, 1024], [768, 0], [2048, 1280]], [[1024, 1024], [2048, 2048], [768, 768], [2048, 2048]],
]


@pytest.mark.parametrize("shape,tile_shape,halo,expected", [
    ((7, 10), (3, 4), (2, 5), BLOCKING_7x10),
    ((2048, 2048), 1024, 256, BLOCKING_2048),
    ((5, 5), (8, 8), (3, 3), [[[0, 0], [5, 5], [0, 0], [5, 5]]]),
])
def test_tiling_is_micro_sams_blocking(shape, tile_shape, halo, expected):
    tiling = Tiling.create(shape, tile_shape, halo)
    got = [[list(t.begin), list(t.end), list(t.outer_begin), list(t.outer_end)] for t in tiling.tiles()]
    assert got == expected
    # coordinates_to_block_id: the tile whose inner block holds the pixel
    for t in tiling.tiles():
        assert tiling.tile_at(t.begin[0], t.begin[1]).index == t.index
        assert tiling.tile_at(t.end[0] - 1, t.end[1] - 1).index == t.index
        ys, xs = t.inner_local_slices
        assert (ys.stop - ys.start, xs.stop - xs.start) == (t.end[0] - t.begin[0], t.end[1] - t.begin[1])
    with pytest.raises(ValueError, match="outside"):
        tiling.tile_at(shape[0], 0)


@pytest.mark.parametrize("tile_shape,halo,message", [
    (0, 0, "tile_shape must be >= 1"), ((10, 10, 10), 0, "tile_shape must be one int"),
    (10, -1, "halo must be >= 0"), (10.5, 0, "integers"),
])
def test_tiling_rejects_bad_settings(tile_shape, halo, message):
    with pytest.raises(ValueError, match=message):
        Tiling.create((100, 100), tile_shape, halo)


def test_tiles_are_embedded_as_images_of_their_own(fake_model):
    image = np.random.default_rng(0).integers(0, 4000, (300, 500)).astype(np.uint16)
    tiled = compute_tiled_embeddings(fake_model, image, tile_shape=(128, 200), halo=(16, 32), progress=False)
    assert len(tiled) == 9 and fake_model.runner("image_encoder").calls == 9
    for t in range(len(tiled)):
        tile = tiled.tiling.tile(t)
        crop = compute_embeddings(fake_model, image[tile.outer_slices])
        assert np.array_equal(tiled.features[t], crop.features)
        assert tiled.tile_embeddings(t).original_shape == crop.original_shape == tile.outer_shape


def test_single_tile_equals_untiled(model, small):
    image, untiled, _ = small
    tiled = compute_tiled_embeddings(model, image, tile_shape=512, halo=64, progress=False)
    assert len(tiled) == 1 and tiled.tiling.tile(0).outer_shape == image.shape
    assert np.array_equal(tiled.features[0], untiled.features)
    boxes = np.array([[40.0, 60, 90, 120], [150, 10, 200, 70]])
    points, labels = np.array([[[100.0, 100], [30, 40]]]), np.array([[1, 0]])
    for prompts in ({"boxes": boxes}, {"points": points, "point_labels": labels}):
        ref = segment_from_prompts(model, untiled, multimask_output=True, **prompts)
        got = segment_from_prompts_tiled(model, tiled, multimask_output=True, **prompts)
        assert np.array_equal(got.masks, ref.masks)
        np.testing.assert_array_equal(got.scores, ref.scores)
        np.testing.assert_array_equal(got.low_res_logits, ref.low_res_logits)


# -- prompting on tiled embeddings -----------------------------------------------------------------------

def test_box_across_a_tile_border_is_answered_by_its_tile(model, mosaic):
    image, labels, _, tiled = mosaic
    boxes = crossing_boxes(labels)
    result = segment_from_prompts_tiled(model, tiled, boxes=boxes)
    assert result.masks.shape == (2, 1, 2048, 2048)
    for i, box in enumerate(boxes):
        tile, local, expected = decode_in_tile(model, tiled, box, image.shape)
        assert result.tiles[i] == tile.index
        # the whole box lies in the tile with its halo: nothing is clipped
        assert np.allclose(local, box - np.tile(tile.outer_begin[::-1], 2))
        assert np.array_equal(result.masks[i, 0], expected)
        outside = np.ones(image.shape, bool)
        outside[tile.outer_slices] = False
        assert not result.masks[i, 0][outside].any()
    # the same through ObjectPrompt lists (the CLI path), masks and labels
    objects = [ObjectPrompt(box=b) for b in boxes]
    masks = segment_objects_tiled(model, tiled, objects)
    assert np.array_equal(masks, result.masks[:, 0])
    lab = label_objects_tiled(model, tiled, objects)
    expected_labels = np.zeros(image.shape, np.uint32)
    for i, m in enumerate(masks, start=1):
        expected_labels[m] = i
    assert np.array_equal(lab, expected_labels)


def test_tiled_prompt_equals_untiled_prompt_on_the_tile_crop(model, mosaic):
    """End to end: a tile's embeddings are those of its outer crop, so the box gives the same mask as the
    untiled embeddings of that crop (one more encoder call)."""
    image, labels, _, tiled = mosaic
    box = crossing_boxes(labels)[0]
    result = segment_from_prompts_tiled(model, tiled, boxes=box)
    tile = tiled.tiling.tile(int(result.tiles[0]))
    crop = compute_embeddings(model, image[tile.outer_slices])
    assert np.array_equal(crop.features, tiled.features[tile.index])
    local = box - np.tile(tile.outer_begin[::-1], 2)
    ref = segment_from_prompts(model, crop, boxes=local)
    assert np.array_equal(result.masks[0, 0][tile.outer_slices], ref.masks[0, 0])


def test_points_pick_the_tile_of_their_mean_and_drop_points_outside_it(fake_model):
    image = np.random.default_rng(1).integers(0, 255, (200, 300)).astype(np.uint8)
    tiled = compute_tiled_embeddings(fake_model, image, tile_shape=100, halo=20, progress=False)
    # mean (105, 60) -> tile 1 (inner x 100..200, y 0..100); outer x 80..220, y 0..120
    points = np.array([[[90.0, 50], [120, 70]], [[250.0, 150], [260, 160]]])
    labels = np.array([[1, 0], [1, 1]])
    result = segment_from_prompts_tiled(fake_model, tiled, points=points, point_labels=labels)
    assert result.tiles.tolist() == [1, 5]
    for i in range(2):
        tile = tiled.tiling.tile(int(result.tiles[i]))
        local = points[i] - tile.outer_begin[::-1]
        ref = segment_from_prompts(fake_model, tiled.tile_embeddings(tile.index), points=local, point_labels=labels[i])
        assert np.array_equal(result.masks[i, 0][tile.outer_slices], ref.masks[0, 0])
    # a point farther from the mean than the tile's halo is dropped, as micro-sam does
    with pytest.warns(UserWarning, match="dropped"):
        far = segment_from_prompts_tiled(fake_model, tiled, points=np.array([[5.0, 5], [150, 95], [150, 95]]),
                                         point_labels=np.array([1, 1, 1]))
    tile = tiled.tiling.tile(int(far.tiles[0]))
    ref = segment_from_prompts(fake_model, tiled.tile_embeddings(tile.index),
                               points=np.array([[150.0, 95], [150, 95]]) - tile.outer_begin[::-1],
                               point_labels=np.array([1, 1]))
    assert np.array_equal(far.masks[0, 0][tile.outer_slices], ref.masks[0, 0])
    with pytest.raises(ValueError, match="outside the image"):
        segment_from_prompts_tiled(fake_model, tiled, boxes=np.array([0.0, 0, 400, 50]))
    with pytest.raises(ValueError, match="points or a box"):
        segment_from_prompts_tiled(fake_model, tiled, mask_inputs=np.zeros((256, 256), np.float32))


# -- the cache -------------------------------------------------------------------------------------------

def test_second_run_makes_no_encoder_call(model, mosaic, small):
    image, _, cache, tiled = mosaic
    with counting_encoder(model) as counter:
        again = compute_tiled_embeddings(model, image, tile_shape=(1024, 1024), halo=(256, 256), cache=cache,
                                         progress=False)
        loaded = load_cache(cache)[0]
        small_again = cached_embeddings(model, small[0], small[2], progress=False)[0]
    assert counter.calls == 0
    assert isinstance(loaded, TiledEmbeddings) and loaded.tiling == tiled.tiling
    for t in range(4):
        assert np.array_equal(again.features[t], tiled.features[t])
        assert np.array_equal(loaded.features[t], tiled.features[t])
    assert isinstance(small_again, Embeddings) and np.array_equal(small_again.features, small[1].features)
    assert small_again.encoder == model.encoder_identity


def test_cache_refuses_other_image_tiling_or_encoder(model, mosaic, monkeypatch):
    image, _, cache, _ = mosaic
    other = image.copy()
    other[0, 0] ^= 1
    with counting_encoder(model) as counter:
        with pytest.raises(CacheMismatchError, match=r"image data \(sha256\)"):
            compute_tiled_embeddings(model, other, tile_shape=1024, halo=256, cache=cache, progress=False)
        with pytest.raises(CacheMismatchError, match=r"image dtype"):
            compute_tiled_embeddings(model, image.astype(np.uint16), tile_shape=1024, halo=256, cache=cache,
                                     progress=False)
        with pytest.raises(CacheMismatchError, match=r"tile_shape: cache \[1024, 1024\], now \[512, 1024\]"):
            compute_tiled_embeddings(model, image, tile_shape=(512, 1024), halo=256, cache=cache, progress=False)
        with pytest.raises(CacheMismatchError, match=r"halo"):
            compute_tiled_embeddings(model, image, tile_shape=1024, halo=128, cache=cache, progress=False)
        with pytest.raises(CacheMismatchError, match=r"tile_shape: cache \[1024, 1024\], now null"):
            cached_embeddings(model, image, cache, progress=False)
        with pytest.raises(CacheMismatchError, match=r"kind of data"):
            compute_stack_embeddings(model, image[None], tile_shape=1024, halo=256, cache=cache, progress=False)
        monkeypatch.setattr(SamModel, "encoder_identity", property(lambda self: "0" * 64))
        with pytest.raises(CacheMismatchError, match=r"image encoder \(ONNX weights sha256\)"):
            compute_tiled_embeddings(model, image, tile_shape=1024, halo=256, cache=cache, progress=False)
    assert counter.calls == 0


def test_cache_path_must_be_a_cache(fake_model, tmp_path):
    image = np.zeros((64, 64), np.uint8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cached_embeddings(fake_model, image, tmp_path / "file", progress=False)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an embedding cache"):
        cached_embeddings(fake_model, image, tmp_path / "folder", progress=False)
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing.zarr")


KILLED_CHILD = r"""
import sys, time
from pathlib import Path
import numpy as np
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.embeddings.compute import compute_tiled_embeddings
family, image, cache, marker = sys.argv[1:5]
model = SamModel.load(family)
runner = model.runner("image_encoder")

class Hook:
    input_names = runner.input_names
    calls = 0
    def __call__(self, **inputs):
        self.calls += 1
        if self.calls == 2:  # the first tile is written and flagged by now
            Path(marker).write_text("1")
            time.sleep(600)
        return runner(**inputs)

model._runners["image_encoder"] = Hook()
compute_tiled_embeddings(model, np.load(image), tile_shape=1024, halo=256, cache=cache, progress=False)
"""


def test_killed_computation_resumes_and_equals_an_uninterrupted_one(model, mosaic, vit_t_family, tmp_path):
    image, _, reference_cache, reference = mosaic
    np.save(tmp_path / "mosaic.npy", image)
    cache, marker = tmp_path / "resumed.zarr", tmp_path / "first-tile-written"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(vit_t_family[0]), str(tmp_path / "mosaic.npy"), str(cache),
         str(marker)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended before the kill: {child.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the child never reached its second tile"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()

    store = EmbeddingCache.read(cache)
    assert store.completed().tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError, match="incomplete: 3 of 4 items missing"):
        load_cache(cache)
    with pytest.raises(ValueError, match="not complete"):
        store.get(0, 1)
    with counting_encoder(model) as counter:
        resumed = compute_tiled_embeddings(model, image, tile_shape=1024, halo=256, cache=cache, progress=False)
    assert counter.calls == 3
    for t in range(4):
        np.testing.assert_array_equal(resumed.features[t], reference.features[t])
    assert EmbeddingCache.read(cache).signature == EmbeddingCache.read(reference_cache).signature


def test_item_written_but_not_flagged_is_recomputed(fake_model, tmp_path, monkeypatch):
    image = np.random.default_rng(2).integers(0, 255, (100, 260)).astype(np.uint8)
    cache = tmp_path / "c.zarr"
    mark_complete = EmbeddingCache._mark_complete

    def interrupted(self, z, t):  # killed between an item's data and its flag
        if t == 1:
            raise KeyboardInterrupt
        mark_complete(self, z, t)

    monkeypatch.setattr(EmbeddingCache, "_mark_complete", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_tiled_embeddings(fake_model, image, tile_shape=100, halo=10, cache=cache, progress=False)
    monkeypatch.undo()
    assert EmbeddingCache.read(cache).completed().tolist() == [[True, False, False]]
    encoder = fake_model.runner("image_encoder")
    before = encoder.calls
    resumed = compute_tiled_embeddings(fake_model, image, tile_shape=100, halo=10, cache=cache, progress=False)
    assert encoder.calls - before == 2
    direct = compute_tiled_embeddings(fake_model, image, tile_shape=100, halo=10, progress=False)
    for t in range(3):
        assert np.array_equal(resumed.features[t], direct.features[t])


# -- stacks ----------------------------------------------------------------------------------------------

def test_stack_embeddings_per_slice_and_prompting(model, stack):
    volume, labels, cache, emb = stack
    assert isinstance(emb, StackEmbeddings) and len(emb) == 3 and emb.image_shape == (100, 100)
    with counting_encoder(model) as counter:
        again = compute_stack_embeddings(model, volume, cache=cache, progress=False)
        direct = compute_embeddings(model, volume[1])
    assert counter.calls == 1
    assert np.array_equal(again[1].features, direct.features) and np.array_equal(emb[1].features, direct.features)
    # a point prompt on every labelled object of slice 1: the slice's embeddings are ordinary 2D embeddings
    from scipy import ndimage

    ids = [i for i in np.unique(labels[1]) if i][:5]
    centres = np.array(ndimage.center_of_mass(labels[1] > 0, labels[1], ids))[:, ::-1]
    points, point_labels = centres[:, None], np.ones((len(ids), 1))
    got = segment_from_prompts(model, emb[1], points=points, point_labels=point_labels)
    ref = segment_from_prompts(model, direct, points=points, point_labels=point_labels)
    assert got.masks.shape == (len(ids), 1, 100, 100) and np.array_equal(got.masks, ref.masks)
    loaded = load_cache(cache)
    assert isinstance(loaded, StackEmbeddings) and loaded.is_stack
    assert np.array_equal(loaded[2].features, emb[2].features)
    with pytest.raises(ValueError, match="give tile_shape and halo together"):
        compute_stack_embeddings(model, volume, tile_shape=64, progress=False)


def test_tiled_stack_through_a_cache(fake_model, tmp_path):
    volume = np.random.default_rng(3).integers(0, 255, (3, 90, 70, 2)).astype(np.uint8)
    memory = compute_stack_embeddings(fake_model, volume, tile_shape=(64, 64), halo=(8, 8), progress=False)
    cached = compute_stack_embeddings(fake_model, volume, tile_shape=(64, 64), halo=(8, 8), cache=tmp_path / "s.zarr",
                                      progress=False)
    assert isinstance(cached[0], TiledEmbeddings) and len(cached[0]) == 4
    for z in range(3):
        for t in range(4):
            crop = volume[z][cached.tiling.tile(t).outer_slices]
            assert np.array_equal(cached[z].features[t], compute_embeddings(fake_model, crop).features)
            assert np.array_equal(memory[z].features[t], cached[z].features[t])
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        compute_stack_embeddings(fake_model, volume[0, ..., 0], progress=False)


# -- micro-sam's caches ----------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def micro_sam_caches(tmp_path_factory):
    """micro-sam's caches, committed (scripts/micro_sam_cache_fixture.py regenerates them with micro-sam 1.8.14),
    copied so that no test can change them."""
    out = tmp_path_factory.mktemp("micro-sam") / "caches"
    shutil.copytree(ROOT / "tests" / "data" / "micro_sam_caches", out)
    return out


def test_reads_micro_sam_caches(micro_sam_caches):
    """micro-sam's own caches (2D, tiled, tiled with a mask, 3D, 3D tiled) read back as the features it
    computed for the outer tiles of our tiling: same tile ids, same halos, same slices."""
    expected = np.load(micro_sam_caches / "expected.npz")
    seen = 0
    for name in ("2d", "2d_tiled", "2d_tiled_mask", "3d", "3d_tiled"):
        emb = load_micro_sam_embeddings(micro_sam_caches / f"{name}.zarr")
        assert isinstance(load_cache(micro_sam_caches / f"{name}.zarr"), StackEmbeddings)
        assert emb.is_stack == name.startswith("3d")
        planes = [emb[z] for z in range(len(emb))]
        assert len(planes) == (1 if name.startswith("2d") else 3)
        for z, plane in enumerate(planes):
            assert plane.encoder == ""
            if isinstance(plane, TiledEmbeddings):
                for t in range(len(plane)):
                    if name == "2d_tiled_mask" and t > 0:  # outside the mask: micro-sam skipped them
                        assert plane.features[t] is None
                        with pytest.raises(ValueError, match="mask"):
                            plane.tile_embeddings(t)
                        continue
                    assert np.array_equal(plane.features[t], expected[f"{name}/{z}/{t}"])
                    seen += 1
            else:
                assert np.array_equal(plane.features, expected[f"{name}/{z}/0"])
                assert plane.original_shape == ((300, 500) if name == "2d" else (90, 70))
                seen += 1
    assert seen == 1 + 9 + 1 + 3 + 12


def test_micro_sam_cache_is_checked_against_the_image(micro_sam_caches):
    """micro-sam records ``data_signature`` (sha1 of the array's bytes) in its root attrs; the same is computed from
    the image read, and a cache of other data is refused (segment / ais / amg --embeddings) before a model loads."""
    from usam_bioimageio.cli.files import check_embeddings_for
    from usam_bioimageio.embeddings.cache import check_micro_sam_cache

    rng = np.random.default_rng(0)  # the fixture's image and volume (scripts/micro_sam_cache_fixture.py)
    image = rng.integers(0, 4000, (300, 500)).astype(np.uint16)
    volume = rng.integers(0, 255, (3, 90, 70)).astype(np.uint8)
    for name in ("2d", "2d_tiled", "2d_tiled_mask"):
        check_embeddings_for(micro_sam_caches / f"{name}.zarr", image)
        with pytest.raises(CacheMismatchError, match=f"{name}.zarr.*data_signature"):
            check_embeddings_for(micro_sam_caches / f"{name}.zarr", image + 1)
    for name in ("3d", "3d_tiled"):
        check_micro_sam_cache(micro_sam_caches / f"{name}.zarr", volume)
        with pytest.raises(CacheMismatchError, match="data_signature"):
            check_micro_sam_cache(micro_sam_caches / f"{name}.zarr", volume[:2])
    with pytest.raises(CacheMismatchError, match="data_signature"):  # a 2D cache for one slice of the volume
        check_embeddings_for(micro_sam_caches / "2d.zarr", volume[0])


def test_micro_sam_cache_is_not_reused_as_ours(micro_sam_caches, fake_model):
    image = np.zeros((300, 500), np.uint16)
    with pytest.raises(ValueError, match="micro-sam"):
        cached_embeddings(fake_model, image, micro_sam_caches / "2d.zarr", progress=False)


# -- command line ----------------------------------------------------------------------------------------

def test_cli_embed_and_segment_with_caches(model, mosaic, stack, small, vit_t_family, tmp_path, capsys):
    import tifffile

    from usam_bioimageio.cli.main import main

    family = str(vit_t_family[0])
    image, labels, mosaic_cache, tiled = mosaic
    # a 3D TIFF is a stack; the cache of the same three slices is complete already: no encoder call
    tifffile.imwrite(tmp_path / "stack.tif", stack[0], photometric="minisblack")
    assert main(["embed", "--model", family, "--image", str(tmp_path / "stack.tif"), "--cache", str(stack[2]),
                 "--quiet"]) == 0
    assert "a stack of 3 slices" in capsys.readouterr().out
    # a folder of images: one NAME.zarr per image (the small image's cache is there already)
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "stardist.tif", small[0])
    assert main(["embed", "--model", family, "--image", str(folder), "--cache", str(small[2].parent), "--quiet"]) == 0
    assert "stardist.tif: an image of shape (256, 256)" in capsys.readouterr().out
    # a tiled cache -> usam segment --embeddings CACHE
    tifffile.imwrite(tmp_path / "mosaic.tif", image)
    assert main(["embed", "--model", family, "--image", str(tmp_path / "mosaic.tif"), "--cache", str(mosaic_cache),
                 "--tile-shape", "1024", "1024", "--halo", "256", "256", "--quiet"]) == 0
    boxes = crossing_boxes(labels)
    (tmp_path / "prompts.json").write_text(json.dumps({"objects": [{"box": b.tolist()} for b in boxes]}))
    assert main(["segment", "--model", family, "--image", str(tmp_path / "mosaic.tif"), "--prompts",
                 str(tmp_path / "prompts.json"), "--embeddings", str(mosaic_cache), "--out",
                 str(tmp_path / "labels.tif"), "--quiet"]) == 0
    got = tifffile.imread(tmp_path / "labels.tif")
    assert np.array_equal(got, label_objects_tiled(model, tiled, [ObjectPrompt(box=b) for b in boxes]))
    # mistakes are errors with a message, not tracebacks
    capsys.readouterr()
    assert main(["embed", "--model", family, "--image", str(tmp_path / "mosaic.tif"), "--out",
                 str(tmp_path / "x.npz"), "--tile-shape", "512", "512"]) == 2
    assert "--cache" in capsys.readouterr().err
    assert main(["embed", "--model", family, "--image", str(tmp_path / "mosaic.tif"), "--cache", str(mosaic_cache),
                 "--quiet"]) == 1
    assert "tile_shape" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "other.tif", image[::-1])
    assert main(["segment", "--model", family, "--image", str(tmp_path / "other.tif"), "--prompts",
                 str(tmp_path / "prompts.json"), "--embeddings", str(mosaic_cache), "--out",
                 str(tmp_path / "labels2.tif"), "--quiet"]) == 1
    assert "another image" in capsys.readouterr().err


# -- automatic segmentation on tiles (AIS, AMG) --------------------------------------------------------

from usam_bioimageio.automatic.amg.params import AmgParameters
from usam_bioimageio.automatic.amg.generator import automatic_mask_generation, generate_masks
from usam_bioimageio.automatic.amg.labels import masks_to_label_image
from usam_bioimageio.automatic.ais.postprocess import instances_from_maps  # noqa: E402
from usam_bioimageio.automatic.ais.decoder import ais_maps, automatic_instance_segmentation  # noqa: E402
from usam_bioimageio.training.targets import distance_targets  # noqa: E402

# random weights: NMS off within a crop and a low stability threshold, so that many masks come through
LOOSE_AMG = AmgParameters(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.1, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def ais_model(vit_t_ais_family):
    return SamModel.load(vit_t_ais_family[0])


def test_single_tile_ais_and_amg_equal_untiled(ais_model, small):
    image = small[0]
    emb = compute_embeddings(ais_model, image)
    tiled = TiledEmbeddings(Tiling.create(image.shape, 512, 64), [emb.features], emb.encoder)
    assert len(tiled) == 1
    maps = ais_maps(ais_model, embeddings=emb)
    assert np.array_equal(ais_maps(ais_model, embeddings=tiled), maps)
    labels = automatic_instance_segmentation(ais_model, image, embeddings=tiled)
    assert labels.max() > 1 and np.array_equal(labels, instances_from_maps(maps))
    untiled = generate_masks(ais_model, image, embeddings=emb, params=LOOSE_AMG)
    got = generate_masks(ais_model, image, embeddings=tiled, params=LOOSE_AMG)
    assert len(untiled) > 3 and len(got) == len(untiled)
    for a, b in zip(got, untiled):
        assert np.array_equal(a["segmentation"], b["segmentation"]) and a["bbox"] == b["bbox"]
    # the label image painted from box crops equals the one painted from the full-size records
    for kwargs in ({}, {"min_object_size": 20}, {"with_background": False}):
        assert np.array_equal(automatic_mask_generation(ais_model, image, embeddings=tiled, params=LOOSE_AMG,
                                                        **kwargs),
                              masks_to_label_image(untiled, image.shape, **kwargs))


def test_tiled_ais_maps_are_the_tiles_interiors(ais_model, vit_t_ais_family, mosaic):
    """Stitched maps equal, tile by tile, the decoder's maps for the outer tile as an image of its own (here:
    the eager torch module and torch's crop + resize, not the package and the runtime's numpy resize), on the
    inner block."""
    import torch

    from usam_bioimageio.modeling.unetr import load_ais_decoder, maps_to_original

    image, tiled = mosaic[0], mosaic[3]
    maps = ais_maps(ais_model, embeddings=tiled)
    assert maps.shape == (3,) + image.shape
    decoder = load_ais_decoder("vit_t", vit_t_ais_family[1])
    tiles = list(tiled.tiling.tiles())
    assert len(tiles) == 4
    for tile in (tiles[0], tiles[3]):  # opposite corners: every inner border of the 2 x 2 grid is seen once
        with torch.no_grad():
            padded = decoder(torch.from_numpy(np.asarray(tiled.features[tile.index])))
            tile_maps = maps_to_original(padded, torch.zeros(tile.outer_shape))[0].numpy()
        expected = tile_maps[(slice(None),) + tile.inner_local_slices]
        assert np.abs(maps[(slice(None),) + tile.inner_slices] - expected).max() <= 1e-4, tile
    # (automatic_instance_segmentation is instances_from_maps of these maps: not run again, 4 more head runs)


def tile_naming_features(tiling: Tiling) -> list:
    """Stand-in tile embeddings: feature [0, 0, 0, 0] holds the tile id, so a stand-in decoder knows its tile."""
    features = []
    for t in range(len(tiling)):
        f = np.zeros((1, 256, 64, 64), np.float32)
        f[0, 0, 0, 0] = t
        features.append(f)
    return features


def _to_padded_frame(region: np.ndarray, size: int) -> np.ndarray:
    """(C, h, w) -> (C, size, size): resized as SAM resizes (longest side to ``size``), zero-padded."""
    from skimage.transform import resize

    from usam_bioimageio.runtime.geometry import longest_side_shape

    h, w = longest_side_shape(*region.shape[1:])
    h, w = -(-h * size // 1024), -(-w * size // 1024)
    out = np.zeros((region.shape[0], size, size), np.float32)
    out[:, :h, :w] = resize(region.astype(np.float32), (region.shape[0], h, w), order=1, anti_aliasing=size < 1024)
    return out


class IdealHead:
    """Stands in for the ais_head package: given maps (e.g. the training targets of the ground truth) of the
    features' tile (outer block), in SAM's padded 1024 x 1024 frame as the real head's output is."""

    input_names = ("embeddings",)

    def __init__(self, maps: np.ndarray, tiling: Tiling):
        self.maps, self.tiling, self.calls = maps, tiling, 0

    def __call__(self, embeddings):
        self.calls += 1
        tile = self.tiling.tile(int(embeddings[0, 0, 0, 0]))
        return {"padded_maps": _to_padded_frame(self.maps[(slice(None),) + tile.outer_slices], 1024)[None]}


class IdealDecoder:
    """Stands in for the prompt decoder package: for a box, the ground-truth object whose bounding box in the
    features' tile matches it best; else the object under the first point; as low-resolution logits.
    Predicted IoU 0.99 (0 on background, which AMG's IoU filter then drops before any upscaling)."""

    input_names = ("embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")

    def __init__(self, labels: np.ndarray, tiling: Tiling, package):
        self.labels, self.tiling, self.package = labels, tiling, package
        self._cache, self._boxes = {}, {}

    def _logits(self, tile, object_id: int) -> np.ndarray:
        key = (tile.index, object_id)
        if key not in self._cache:
            region = self.labels[tile.outer_slices]
            mask = (region == object_id) if object_id else np.zeros(region.shape, bool)
            low = _to_padded_frame(mask[None], 256)[0]
            self._cache[key] = (low - 0.5) * 20
        return self._cache[key]

    def _box_object(self, tile, box: np.ndarray) -> int:
        from scipy import ndimage

        if tile.index not in self._boxes:
            self._boxes[tile.index] = ndimage.find_objects(self.labels[tile.outer_slices])
        x0, y0, x1, y1 = box

        def overlap(sl) -> float:
            ix = max(0.0, min(x1, sl[1].stop) - max(x0, sl[1].start))
            iy = max(0.0, min(y1, sl[0].stop) - max(y0, sl[0].start))
            union = (x1 - x0) * (y1 - y0) + (sl[1].stop - sl[1].start) * (sl[0].stop - sl[0].start) - ix * iy
            return ix * iy / union

        scores = [(overlap(sl), i) for i, sl in enumerate(self._boxes[tile.index], start=1) if sl is not None]
        return max(scores)[1] if scores and max(scores)[0] > 0 else 0

    def __call__(self, embeddings, point_coords, point_labels, **_):
        tile = self.tiling.tile(int(embeddings[0, 0, 0, 0]))
        region = self.labels[tile.outer_slices]
        low = np.zeros((len(point_coords), 4, 256, 256), np.float32)
        iou = np.zeros((len(point_coords), 4), np.float32)
        for i, (coords, labels) in enumerate(zip(point_coords, point_labels)):
            if (labels == 2).any():
                object_id = self._box_object(tile, np.concatenate([coords[labels == 2][0], coords[labels == 3][0]]))
            else:
                x, y = coords[0]
                object_id = int(region[min(int(y), region.shape[0] - 1), min(int(x), region.shape[1] - 1)])
            low[i] = self._logits(tile, object_id)
            iou[i] = 0.99 if object_id else 0.0
        return {"iou_predictions": iou, "low_res_masks": low}


def _objects_crossing_borders(labels: np.ndarray, tile: int, min_pixels: int = 30):
    """(id, rows, cols) of the objects with >= min_pixels pixels that cross a tile border (multiples of tile)."""
    from scipy import ndimage

    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        ys, xs = np.nonzero(labels[box] == i)
        ys, xs = ys + box[0].start, xs + box[1].start
        if len(ys) >= min_pixels and (len(np.unique(ys // tile)) > 1 or len(np.unique(xs // tile)) > 1):
            yield i, ys, xs


def _best_iou(result: np.ndarray, sizes: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """IoU of an object (its pixels) with the label covering most of it (0 if that is background);
    ``sizes``: pixel counts of ``result``'s labels."""
    ids, counts = np.unique(result[ys, xs], return_counts=True)
    best = ids[np.argmax(counts)]
    if best == 0:
        return 0.0
    return counts.max() / (len(ys) + sizes[best] - counts.max())


def test_objects_across_tile_borders_get_one_label_on_a_4096_mosaic(ais_model):
    """A 4096 x 4096 mosaic of real DSB2018 ground truth, 16 tiles (1024, halo 128): with maps as a perfect
    decoder gives them per tile, the stitched maps and one post-processing segment the objects that cross
    tile borders whole (one label each), as the untiled ground truth has them."""
    _, labels = build_mosaic(4096)
    tiling = Tiling.create(labels.shape, 1024, 128)
    head = IdealHead(distance_targets(labels), tiling)  # what a perfect µSAM decoder is trained to give
    ais_model._runners["ais_head"] = head
    try:
        result = automatic_instance_segmentation(ais_model, embeddings=TiledEmbeddings(tiling,
                                                 tile_naming_features(tiling), ""))
    finally:
        del ais_model._runners["ais_head"]
    assert head.calls == 16
    sizes = np.bincount(result.ravel())
    ious = [_best_iou(result, sizes, ys, xs) for _, ys, xs in _objects_crossing_borders(labels, 1024)]
    assert len(ious) >= 20 and min(ious) >= 0.8, sorted(ious)[:5]


def test_boxes_across_tile_borders_on_a_4096_mosaic(ais_model):
    """Box prompts of the objects that cross tile borders of a 4096 x 4096 mosaic (16 tiles, halo 256), with a
    decoder that answers with the ground-truth object at the box centre in the tile it is given: each object
    comes back whole in full-image coordinates, so the tile choice and the coordinate mapping are right."""
    _, labels = build_mosaic(4096)
    tiling = Tiling.create(labels.shape, 1024, 256)
    ids, objects = [], []
    for i, ys, xs in _objects_crossing_borders(labels, 1024, 100):
        if ys.max() - ys.min() < 200 and xs.max() - xs.min() < 200:  # fits in a tile's halo
            ids.append(i)
            objects.append(ObjectPrompt(box=np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)))
    assert len(objects) >= 20
    objects = objects[:30]
    tiled = TiledEmbeddings(tiling, tile_naming_features(tiling), "")
    original = ais_model.runner("prompt_decoder")
    ais_model._runners["prompt_decoder"] = IdealDecoder(labels, tiling, original.package)
    ious = []
    try:
        for i, obj in zip(ids, objects):
            got = segment_from_prompts_tiled(ais_model, tiled, boxes=obj.box).masks[0, 0]
            gt = labels == i
            ious.append(np.count_nonzero(gt & got) / np.count_nonzero(gt | got))
    finally:
        ais_model._runners["prompt_decoder"] = original
    # the stand-in's masks pass through SAM's 256 x 256 low-resolution frame: a few pixels off at the border
    assert min(ious) >= 0.6 and np.median(ious) >= 0.85, sorted(ious)[:5]


def test_tiled_amg_finds_objects_across_tiles_once(ais_model, mosaic):
    """µSAM's tiled AMG on the 2048 mosaic (4 tiles, halo 256) with a decoder that answers every point with
    the ground-truth object under it: objects crossing tile borders come back whole, and an object seen by
    several tiles (in their halos) comes back once."""
    image, labels = mosaic[0], mosaic[1]
    tiling = Tiling.create(labels.shape, 1024, 256)
    original = ais_model.runner("prompt_decoder")
    ais_model._runners["prompt_decoder"] = IdealDecoder(labels, tiling, original.package)
    try:
        params = AmgParameters(points_per_side=28, pred_iou_thresh=0.88, stability_score_thresh=0.5)
        records = generate_masks(ais_model, image, embeddings=TiledEmbeddings(tiling, tile_naming_features(tiling),
                                                                              ""), params=params)
    finally:
        ais_model._runners["prompt_decoder"] = original
    assert len({tuple(r["crop_box"]) for r in records}) == 4  # masks from every tile
    matched, sizes = {}, np.bincount(labels.ravel())
    for r in records:
        ids, counts = np.unique(labels[r["segmentation"]], return_counts=True)
        best = ids[np.argmax(counts)]
        if best:
            iou = counts.max() / (r["area"] + sizes[best] - counts.max())
            if iou > 0.5:
                matched.setdefault(int(best), []).append(iou)
    assert max(len(v) for v in matched.values()) == 1  # no object twice
    crossing = [(i, matched[int(i)][0]) for i, _, _ in _objects_crossing_borders(labels, 1024, 100)
                if int(i) in matched]
    assert len(crossing) >= 5 and min(iou for _, iou in crossing) >= 0.7, crossing
    with pytest.raises(ValueError, match="crop layers"):
        generate_masks(ais_model, image, embeddings=mosaic[3], params=AmgParameters(crop_n_layers=1))


def test_cli_ais_and_amg(ais_model, vit_t_ais_family, vit_t_family, small, tmp_path, capsys):
    import tifffile

    from usam_bioimageio.automatic.ais.postprocess import AisParameters
    from usam_bioimageio.cli.main import main
    from usam_bioimageio.io.images import read_image

    family = str(vit_t_ais_family[0])
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "stardist.tif", small[0])
    sid = dsb_test_ids()[2]
    (folder / f"{sid}.png").write_bytes((DSB / "images" / f"{sid}.png").read_bytes())
    assert main(["ais", "--model", family, "--image", str(folder), "--out", str(tmp_path / "ais"),
                 "--overlay", str(tmp_path / "overlays"), "--min-size", "10", "--quiet"]) == 0
    for name in ("stardist", sid):  # both written; one compared with the API (each AIS costs ~10 s)
        assert (tmp_path / "overlays" / f"{name}.png").is_file()
    rgb = read_image(folder / f"{sid}.png")
    got = tifffile.imread(tmp_path / "ais" / f"{sid}.tif")
    assert got.shape == rgb.shape[:2] and got.dtype == np.uint32
    assert np.array_equal(got, automatic_instance_segmentation(ais_model, rgb, params=AisParameters(min_size=10)))
    assert tifffile.imread(tmp_path / "ais" / "stardist.tif").shape == small[0].shape
    # tiled: a tiled cache written by `usam embed`; AIS with tiles computed on the fly equals the API's AIS on
    # that cache (the same tiles), AMG reads the cache
    from usam_bioimageio.embeddings.cache import load_cache

    image, path, cache = small[0], folder / "stardist.tif", tmp_path / "stardist.zarr"
    assert main(["embed", "--model", family, "--image", str(path), "--cache", str(cache), "--tile-shape", "256",
                 "128", "--halo", "0", "32", "--quiet"]) == 0
    tiled = load_cache(cache, model=ais_model)[0]
    assert len(tiled) == 2
    assert main(["ais", "--model", family, "--image", str(path), "--out", str(tmp_path / "tiled.tif"),
                 "--tile-shape", "256", "128", "--halo", "0", "32", "--quiet"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "tiled.tif"),
                          automatic_instance_segmentation(ais_model, image, embeddings=tiled))
    assert main(["amg", "--model", family, "--image", str(path), "--embeddings", str(cache), "--out",
                 str(tmp_path / "amg.tif"), "--points-per-side", "6", "--pred-iou-thresh", "0",
                 "--stability-score-thresh", "0.1", "--box-nms-thresh", "1", "--quiet"]) == 0
    params = AmgParameters(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.1, box_nms_thresh=1.0)
    expected = automatic_mask_generation(ais_model, image, embeddings=tiled, params=params)
    assert np.array_equal(tifffile.imread(tmp_path / "amg.tif"), expected)
    # mistakes: an error message, exit status 1 (options that do not go together: 2), nothing written
    capsys.readouterr()
    assert main(["ais", "--model", str(vit_t_family[0]), "--image", str(path), "--out",
                 str(tmp_path / "none.tif"), "--quiet"]) == 1
    assert "no AIS decoder" in capsys.readouterr().err and not (tmp_path / "none.tif").exists()
    assert main(["ais", "--model", family, "--image", str(folder), "--out", str(tmp_path / "x.tif"), "--quiet"]) == 2
    assert "must be a folder" in capsys.readouterr().err
    assert main(["amg", "--model", family, "--image", str(path), "--embeddings", str(cache),
                 "--out", str(tmp_path / "y.tif"), "--tile-shape", "512", "512", "--quiet"]) == 2
    assert "read from the embedding cache" in capsys.readouterr().err


def test_plain_prompting_refuses_tiled_embeddings(fake_model):
    """segment_from_prompts / segment_objects take one image's Embeddings; tiled ones get a clear error naming
    the tiled entry point, never a Python object handed to ONNX Runtime."""
    from usam_bioimageio.io.prompt_files import ObjectPrompt
    from usam_bioimageio.prompting.predict import segment_objects

    image = np.random.default_rng(2).integers(0, 255, (120, 150)).astype(np.uint8)
    tiled = compute_tiled_embeddings(fake_model, image, tile_shape=100, halo=10, progress=False)
    with pytest.raises(TypeError, match="segment_from_prompts_tiled"):
        segment_from_prompts(fake_model, tiled, boxes=[10, 10, 40, 40])
    with pytest.raises(TypeError, match="segment_from_prompts_tiled"):
        segment_objects(fake_model, tiled, [ObjectPrompt(box=np.array([10, 10, 40, 40]))])
