"""AIS post-processing (usam_bioimageio.automatic.ais.postprocess) against micro-sam 1.8.14's own output.

The fixtures in tests/data/ais_reference/ were written by scripts/regenerate_ais_reference.sh, which runs
micro-sam's ``InstanceSegmentationWithDecoder.generate`` (bioimage-cpp 0.9.0, AVX2 code path) on decoder-like
maps made from real ground-truth label crops; see scripts/ais_reference.py and each fixture's ``meta``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from usam_bioimageio.automatic.ais.postprocess import (
    AIS_PRESETS,
    AisParameters,
    gaussian_smoothing,
    instances_from_maps,
    instances_to_masks,
    seeded_watershed,
)

FIXTURES = sorted((Path(__file__).parent / "data" / "ais_reference").glob("*.npz"))


def _load(path: Path):
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    maps = data["maps_u16"].astype(np.float32) / np.float32(65535)
    return data, meta, maps


def _cases():
    for path in FIXTURES:
        data, meta, _ = _load(path)
        for index, params in enumerate(meta["params"]):
            yield pytest.param(path, index, id=f"{path.stem}-{index}")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Same background and the same objects, whatever the label ids."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _blobs(shape=(96, 96), seed=0) -> np.ndarray:
    """Decoder-like maps for a few discs (foreground 1 inside; distances 0 at centres, 1 at the rims)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    foreground = np.zeros(shape)
    center = np.ones(shape)
    for _ in range(12):
        cy, cx, r = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8), rng.uniform(3, 10)
        d = np.hypot(yy - cy, xx - cx) / r
        inside = d < 1
        foreground[inside] = 1
        center[inside] = np.minimum(center[inside], d[inside])
    return np.stack([foreground, center, center]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Against micro-sam's output
# ----------------------------------------------------------------------------------------------------

def test_fixtures_present_and_from_micro_sam():
    assert len(FIXTURES) >= 5
    total = sum(path.stat().st_size for path in FIXTURES)
    assert total < 1024 * 1024
    for path in FIXTURES:
        _, meta, maps = _load(path)
        assert meta["versions"]["micro_sam"] == "1.8.14"
        assert "InstanceSegmentationWithDecoder" in meta["reference"]
        assert meta["bioimage_cpp_convolution_backend"] == "avx2"  # what our gaussian_smoothing reproduces
        assert meta["source"].startswith("shared/data/")
        assert maps.shape[0] == 3 and maps.shape[1:] == tuple(meta["crop_shape"])


@pytest.mark.parametrize("path, index", list(_cases()))
def test_matches_micro_sam(path, index):
    data, meta, maps = _load(path)
    params = AisParameters(**meta["params"][index])
    expected = data[f"labels_{index}"].astype(np.int64)
    labels = instances_from_maps(maps, params=params)
    assert labels.dtype == np.uint32 and labels.shape == expected.shape
    assert same_partition(labels.astype(np.int64), expected)
    # Stronger: the label ids are µSAM's too (row-major seed order, sequential after the size filter).
    np.testing.assert_array_equal(labels, expected)
    assert labels.max() == meta["n_objects"][index]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_binary_mask_output_matches_micro_sam(path):
    data, meta, maps = _load(path)
    masks = instances_to_masks(instances_from_maps(maps, params=AisParameters(**meta["params"][0])))
    rows = np.array([[m["seg_id"], m["area"], *m["bbox"]] for m in masks], dtype=np.int64).reshape(-1, 6)
    np.testing.assert_array_equal(rows, data["masks_0"])
    height, width = maps.shape[1:]
    for m in masks:
        assert m["crop_box"] == [0, width, 0, height]
        assert m["segmentation"].dtype == bool and m["segmentation"].sum() == m["area"]


def test_gaussian_smoothing_bit_identical_to_bioimage_cpp():
    smoothed = [p for p in FIXTURES if "smoothed_boundary_sigma1.6" in np.load(p).files]
    assert smoothed, "no fixture with bioimage_cpp smoothing outputs"
    data, _, maps = _load(smoothed[0])
    np.testing.assert_array_equal(gaussian_smoothing(maps[0], 1.0), data["smoothed_foreground_sigma1.0"])
    np.testing.assert_array_equal(gaussian_smoothing(maps[2], 1.6), data["smoothed_boundary_sigma1.6"])


# ----------------------------------------------------------------------------------------------------
# Gaussian smoothing and watershed details
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 1.6, 2.0])
@pytest.mark.parametrize("backend", ["avx2", "scalar"])
def test_gaussian_close_to_scipy_mirror(sigma, backend):
    image = np.random.default_rng(1).random((40, 53)).astype(np.float32)
    ours = gaussian_smoothing(image, sigma, backend=backend)
    scipy_result = ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="mirror", truncate=3.0)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, scipy_result, atol=2e-6)


def test_gaussian_window_is_ceil_three_sigma():
    impulse = np.zeros((1, 31), np.float32)
    impulse[0, 15] = 1
    support = np.flatnonzero(gaussian_smoothing(impulse, 1.4)[0])
    assert support.min() == 10 and support.max() == 20  # radius ceil(4.2) = 5, not scipy's int(4.7) = 4


def test_gaussian_float64_and_tiny_images():
    image = np.random.default_rng(2).random((5, 7))
    out = gaussian_smoothing(image, 1.6)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, gaussian_smoothing(image.astype(np.float32), 1.6))
    assert gaussian_smoothing(np.full((1, 1), 0.25, np.float32), 2.0)[0, 0] == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError):
        gaussian_smoothing(np.array([[np.nan, 1.0]]), 1.0)


def test_watershed_flat_map_breaks_ties_like_bioimage_cpp():
    # bioimage-cpp floods a level depth-first (LIFO), the last seed first: on a flat map it takes almost all.
    flat = np.zeros((1, 5), np.float32)
    np.testing.assert_array_equal(seeded_watershed(flat, np.array([[1, 0, 0, 0, 2]]), np.ones((1, 5), bool)),
                                  [[1, 2, 2, 2, 2]])
    seeds = np.zeros((3, 3), int)
    seeds[0, 0], seeds[2, 2] = 1, 2
    np.testing.assert_array_equal(seeded_watershed(np.zeros((3, 3)), seeds, np.ones((3, 3), bool)),
                                  [[1, 2, 2], [2, 2, 2], [2, 2, 2]])


def test_watershed_is_4_connected_and_seeds_8_connected():
    diagonal = np.array([[1, 0], [0, 1]], bool)
    flooded = seeded_watershed(np.zeros((2, 2)), np.array([[1, 0], [0, 0]]), diagonal)
    np.testing.assert_array_equal(flooded, [[1, 0], [0, 0]])
    # Seeds touching diagonally are one object (8-connected components).
    maps = np.zeros((3, 3, 3), np.float32)
    maps[0] = 1
    maps[1:] = 1
    maps[1:, 0, 0] = maps[1:, 1, 1] = 0
    labels = instances_from_maps(maps, params=AisParameters(foreground_smoothing=0, distance_smoothing=0))
    np.testing.assert_array_equal(labels, np.ones((3, 3)))


def test_watershed_height_is_the_boundary_map():
    # Two seeds; the boundary map has a ridge at column 6, the centre map one at column 3.
    fg = np.ones((1, 10), np.float32)
    boundary = np.array([[0, .2, .4, .6, .8, .9, 1, .9, .4, 0]], np.float32)
    center = np.array([[0, .9, .9, 1, .9, .9, .9, .9, .9, 0]], np.float32)
    labels = instances_from_maps(np.stack([fg, center, boundary]),
                                 params=AisParameters(foreground_smoothing=0, distance_smoothing=0))
    np.testing.assert_array_equal(labels, [[1, 1, 1, 1, 1, 1, 1, 2, 2, 2]])


# ----------------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------------

def test_empty_foreground_gives_zeros():
    maps = _blobs()
    maps[0] = 0
    labels = instances_from_maps(maps)
    assert labels.dtype == np.uint32 and labels.shape == maps.shape[1:] and not labels.any()


@pytest.mark.parametrize("fg", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dist", [0.0, 0.5, 1.0])
def test_constant_maps(fg, dist):
    maps = np.stack([np.full((20, 30), fg), np.full((20, 30), dist), np.full((20, 30), dist)]).astype(np.float32)
    labels = instances_from_maps(maps)
    if fg == 0.0 or dist == 1.0:  # no foreground, or no seed
        assert not labels.any()
    elif fg == 1.0 and dist == 0.0:  # one seed region covering the image
        np.testing.assert_array_equal(labels, np.ones((20, 30)))
    else:  # values at the thresholds: smoothing's float32 rounding decides; just a valid result
        assert labels.max() <= 1


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (2, 2)])
def test_tiny_images(shape):
    fg, dist = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    np.testing.assert_array_equal(instances_from_maps(np.stack([fg, dist, dist])), np.ones(shape))
    np.testing.assert_array_equal(instances_from_maps(np.stack([fg * 0, dist, dist])), np.zeros(shape))
    assert instances_from_maps(np.stack([fg, dist, dist]), params=AisParameters(min_size=100)).max() == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("channel", [0, 1, 2])
def test_non_finite_maps_rejected(bad, channel):
    maps = _blobs((16, 16))
    maps[channel, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        instances_from_maps(maps)
    with pytest.raises(ValueError, match="NaN or infinite"):  # also without smoothing
        instances_from_maps(maps, params=AisParameters(foreground_smoothing=0, distance_smoothing=0))


@pytest.mark.parametrize("shape", [(2, 8, 8), (4, 8, 8), (8, 8), (3, 8, 8, 1), (3, 0, 8), (3, 8, 0), (3,)])
def test_wrong_shape_rejected(shape):
    with pytest.raises(ValueError, match="shape"):
        instances_from_maps(np.zeros(shape, np.float32))


def test_other_dtypes():
    maps = _blobs((40, 40))
    expected = instances_from_maps(maps)
    assert (instances_from_maps(maps.astype(np.float64)) > 0).sum() > 0
    as_int = (maps > 0.5).astype(np.uint8)  # 0/1 maps as integers are converted to float32
    np.testing.assert_array_equal(instances_from_maps(as_int), instances_from_maps(as_int.astype(np.float32)))
    with pytest.raises(ValueError):
        instances_from_maps(maps.astype(np.complex64))
    with pytest.raises(TypeError):
        instances_from_maps(maps, params={"min_size": 3})
    assert expected.max() > 0


def test_many_objects():
    # 256 x 256 seeds on a grid of isolated pixels in one foreground region: 65,536 objects (> uint16).
    shape = (512, 512)
    center = np.ones(shape, np.float32)
    center[::2, ::2] = 0
    maps = np.stack([np.ones(shape, np.float32), center, center])
    labels = instances_from_maps(maps, params=AisParameters(foreground_smoothing=0, distance_smoothing=0))
    assert labels.dtype == np.uint32
    assert labels.max() == 256 * 256 and labels.min() == 1
    assert len(np.unique(labels)) == 256 * 256
    assert labels[0, 0] == 1 and labels[0, 2] == 2 and labels[2, 0] == 257  # row-major seed order


def test_random_maps_never_crash():
    rng = np.random.default_rng(5)
    for trial in range(20):
        shape = tuple(int(s) for s in rng.integers(1, 40, size=2))
        maps = rng.random((3,) + shape).astype(np.float32)
        if trial % 3 == 0:
            maps = np.round(maps * 3) / 3
        params = AisParameters(
            center_distance_threshold=float(rng.uniform(0, 1)), boundary_distance_threshold=float(rng.uniform(0, 1)),
            foreground_threshold=float(rng.uniform(0, 1)), foreground_smoothing=float(rng.choice([0, 1.0])),
            distance_smoothing=float(rng.choice([0, 1.6, 8.0])), min_size=int(rng.choice([0, 3])))
        labels = instances_from_maps(maps, params=params)
        ids = np.unique(labels)
        np.testing.assert_array_equal(ids[ids > 0], np.arange(1, labels.max() + 1))


# ----------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------

def test_defaults_are_micro_sams():
    assert AisParameters() == AisParameters(
        center_distance_threshold=0.5, boundary_distance_threshold=0.5, foreground_threshold=0.5,
        foreground_smoothing=1.0, distance_smoothing=1.6, min_size=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AisParameters().min_size = 3  # type: ignore[misc]


def test_presets_are_micro_sams_ais_settings():
    # micro_sam/_model_settings.py AIS_SETTINGS in 1.8.14: (center, boundary, distance_smoothing, min_size)
    expected = {
        "vit_t_lm": (0.5, 0.5, 2.0, 100), "vit_b_lm": (0.4, 0.5, 2.0, 100),
        "vit_l_lm": (0.4, 0.4, 1.6, 100), "vit_h_lm": (0.5, 0.5, 1.4, 100),
        "vit_t_em_organelles": (0.4, 0.5, 1.2, 100), "vit_b_em_organelles": (0.3, 0.4, 1.2, 100),
        "vit_l_em_organelles": (0.3, 0.4, 1.2, 100), "vit_h_em_organelles": (0.3, 0.4, 1.2, 100),
    }
    assert set(AIS_PRESETS) == set(expected)
    for name, (center, boundary, smoothing, min_size) in expected.items():
        p = AIS_PRESETS[name]
        assert (p.center_distance_threshold, p.boundary_distance_threshold, p.distance_smoothing, p.min_size) == \
            (center, boundary, smoothing, min_size)
        assert (p.foreground_threshold, p.foreground_smoothing) == (0.5, 1.0)


@pytest.mark.parametrize("kwargs", [
    dict(min_size=-1), dict(min_size=2.5), dict(min_size=True), dict(foreground_threshold=float("nan")),
    dict(distance_smoothing=-1.0), dict(foreground_smoothing=float("inf")), dict(center_distance_threshold="0.5"),
])
def test_invalid_parameters(kwargs):
    with pytest.raises((ValueError, TypeError)):
        AisParameters(**kwargs)


def _objects(labels: np.ndarray) -> set:
    return {frozenset(np.flatnonzero(labels == i).tolist()) for i in range(1, int(labels.max()) + 1)}


def test_min_size_removes_small_objects_only():
    maps = _load(FIXTURES[0])[2] if FIXTURES else _blobs()
    base = instances_from_maps(maps)
    sizes = np.bincount(base.ravel())[1:]
    previous = base.max()
    for min_size in (1, int(np.median(sizes)), int(sizes.max()), int(sizes.max()) + 1):
        labels = instances_from_maps(maps, params=AisParameters(min_size=min_size))
        kept = np.bincount(labels.ravel())[1:]
        assert labels.max() == np.count_nonzero(sizes >= min_size) <= previous
        assert (kept >= min_size).all()
        assert _objects(labels) <= _objects(base)  # the survivors are unchanged, only renumbered
        previous = labels.max()
    assert previous == 0


def test_foreground_threshold_shrinks_foreground():
    maps = _blobs()
    maps[0] = ndimage.gaussian_filter(maps[0], 2)
    areas = [(instances_from_maps(maps, params=AisParameters(foreground_threshold=t)) > 0).sum()
             for t in (0.2, 0.5, 0.8)]
    assert areas[0] > areas[1] > areas[2]


def test_seed_thresholds_change_the_number_of_objects():
    maps = _blobs()
    few = instances_from_maps(maps, params=AisParameters(center_distance_threshold=0.05,
                                                         boundary_distance_threshold=0.05)).max()
    many = instances_from_maps(maps).max()
    none = instances_from_maps(maps, params=AisParameters(center_distance_threshold=0.0)).max()
    assert none == 0 and few <= many and many > 0


def test_smoothing_switch():
    maps = _blobs(seed=3)
    maps += np.random.default_rng(0).normal(0, 0.2, maps.shape).astype(np.float32)
    raw = instances_from_maps(maps, params=AisParameters(foreground_smoothing=0, distance_smoothing=0))
    smooth = instances_from_maps(maps)
    assert raw.max() > smooth.max()  # noise makes many seeds without smoothing
