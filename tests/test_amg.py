"""Automatic mask generation (usam_bioimageio.automatic.amg.generator) against segment_anything's.

The reference is MobileSAM's ``SamAutomaticMaskGenerator`` (the same code as segment_anything's) with the
same seeded random vit_t weights, given µSAM's 8-bit version of the image as µSAM does. A random model's
predicted IoUs are all negative and its masks are large and ragged (every box spans the image), so the
tests turn the IoU filter off (``pred_iou_thresh=0``, SAM's "no filter"), use a stability threshold that
keeps 10 to 200 masks, and keep box NMS from collapsing them (``box_nms_thresh=1.0``) where the point is
to compare many masks; NMS itself is compared with torchvision's on boxes that do overlap.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import DATA, DSB, dsb_test_ids
from reference import build_reference_sam, mobile_sam, usam_to_image
from usam_bioimageio.automatic.amg import generator as amg
from usam_bioimageio.automatic.amg import geometry
from usam_bioimageio.automatic.amg.params import AMG_PRESETS, AmgParameters
from usam_bioimageio.automatic.amg.generator import automatic_mask_generation, generate_masks
from usam_bioimageio.automatic.amg.labels import masks_to_label_image
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.geometry import to_rgb

STARDIST = DATA / "stardist_samples" / "tests_img2d.tif"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _fake_cv2() -> types.ModuleType:
    """A stand-in for the one OpenCV call of segment_anything's ``remove_small_regions``.

    ``connectedComponentsWithStats(image, 8)``: 8-connected components of the non-zero pixels, numbered in
    raster order of their first pixel, label 0 = the zero pixels; of the stats only the area column (the
    last) is read. (amg's scipy version of remove_small_regions, which labels the same way, gave the same
    masks as SAM's with opencv-python-headless 5.0 on 3000 random masks when this was written.)
    """
    module = types.ModuleType("cv2")

    def connected_components_with_stats(image, connectivity):
        structure = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
        labels, n = ndimage.label(np.asarray(image) != 0, structure=structure)
        stats = np.zeros((n + 1, 5), dtype=np.int32)
        stats[:, -1] = np.bincount(labels.ravel(), minlength=n + 1)
        return n + 1, labels.astype(np.int32), stats, np.zeros((n + 1, 2))

    module.connectedComponentsWithStats = connected_components_with_stats
    return module


@pytest.fixture
def cv2_module(monkeypatch):
    try:
        import cv2  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "cv2", _fake_cv2())


def reference_masks(sam, image: np.ndarray, params: AmgParameters) -> list:
    """MobileSAM's SamAutomaticMaskGenerator with ``params``.

    With crop layers each crop is normalised on its own, as the packaged encoder does (see amg's module
    docstring): the generator gets the raw RGB image and its predictor µSAM's 8-bit version of each crop.
    """
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    generator = mobile_sam().SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **fields)
    predictor = generator.predictor
    set_image = predictor.set_image
    predictor.set_image = lambda crop, image_format="RGB": set_image(usam_to_image(crop), image_format)
    with torch.no_grad():
        return generator.generate(to_rgb(image))


def mask_ious(a: list, b: list) -> np.ndarray:
    x = np.stack([m["segmentation"].ravel() for m in a]).astype(np.float32)
    y = np.stack([m["segmentation"].ravel() for m in b]).astype(np.float32)
    inter = x @ y.T
    union = x.sum(1)[:, None] + y.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def assert_same_masks(ours: list, ref: list, min_iou: float = 0.99) -> dict:
    """Pair the masks one to one with IoU >= min_iou and compare the records up to the decoders' float
    differences. Both lists are in SAM's output order, so they are paired in order when that works;
    otherwise (near-equal scores sorted the other way) by an assignment that maximises the IoUs, with the
    prompt point and the predicted IoU breaking ties between identical masks. Returns a summary."""
    from scipy.optimize import linear_sum_assignment

    assert len(ours) == len(ref), f"{len(ours)} masks, reference {len(ref)}"
    if not ours:
        return {"n": 0, "min_iou": None, "in_order": True}
    ious = mask_ious(ours, ref)
    same_point = np.array([[a["point_coords"][0] == list(map(float, b["point_coords"][0])) for b in ref] for a in ours])
    pairing = np.arange(len(ours))
    in_order = bool(np.all(ious[pairing, pairing] >= min_iou) and np.all(same_point[pairing, pairing]))
    if not in_order:
        score_gap = np.abs(np.array([a["predicted_iou"] for a in ours])[:, None]
                           - np.array([b["predicted_iou"] for b in ref])[None, :])
        cost = (1.0 - ious) + 10.0 * ~same_point + score_gap
        rows, pairing = linear_sum_assignment(cost)
    matched = ious[np.arange(len(ours)), pairing]
    assert matched.min() >= min_iou, f"smallest IoU {matched.min():.4f}"
    for i, j in enumerate(pairing):
        a, b = ours[i], ref[j]
        assert a["segmentation"].dtype == bool and a["segmentation"].shape == b["segmentation"].shape
        assert a["area"] == int(a["segmentation"].sum())
        assert abs(a["area"] - b["area"]) <= max(2, 0.01 * b["area"])
        assert np.allclose(a["bbox"], b["bbox"], atol=2)
        assert a["point_coords"] == [list(map(float, b["point_coords"][0]))]
        assert a["crop_box"] == list(b["crop_box"])
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=2e-3)
    return {"n": len(ours), "min_iou": float(matched.min()), "in_order": in_order}


@pytest.fixture(scope="module")
def models(vit_t_family):
    family, state = vit_t_family
    return SamModel.load(family), build_reference_sam("vit_t", state)


def _dsb_image():
    from usam_bioimageio.io.images import read_image

    return read_image(DSB / "images" / f"{dsb_test_ids()[0]}.png")  # 256 x 320 RGB


def _stardist_image():
    import tifffile

    return tifffile.imread(STARDIST)  # 256 x 256 uint8


# --------------------------------------------------------------------------------------------------
# against segment_anything's generator
# --------------------------------------------------------------------------------------------------

def test_matches_reference_stardist(models, capsys):
    model, sam = models
    image = _stardist_image()
    params = AmgParameters(points_per_side=12, pred_iou_thresh=0.0, stability_score_thresh=0.1,
                           box_nms_thresh=1.0)  # 12 (not 32) points per side: the reference's time dominates CI
    ours = generate_masks(model, image, params=params)
    summary = assert_same_masks(ours, reference_masks(sam, image, params))
    assert summary["n"] >= 10
    with capsys.disabled():
        print(f"\nAMG stardist 256x256: {summary}")


@pytest.mark.slow  # 90-140 s on 2 cores; the stardist comparison covers the same path in CI
def test_matches_reference_dsb_small_regions(models, cv2_module, capsys):
    """An RGB, non-square image with embeddings given, min_mask_region_area (holes, islands, rescoring
    and re-sorting by NMS) and a stability threshold that lets ragged and solid masks through."""
    model, sam = models
    image = _dsb_image()
    params = AmgParameters(points_per_side=12, pred_iou_thresh=0.0, stability_score_thresh=0.05,
                           box_nms_thresh=1.0, min_mask_region_area=60)
    ours = generate_masks(model, embeddings=compute_embeddings(model, image), params=params)
    summary = assert_same_masks(ours, reference_masks(sam, image, params))
    assert summary["n"] >= 10
    bboxes = {tuple(m["bbox"]) for m in ours}
    assert len(bboxes) > 1, "small-region removal changed no box"
    with capsys.disabled():
        print(f"\nAMG dsb 256x320 (min_mask_region_area=60): {summary}")


def test_matches_reference_default_nms(models):
    """SAM's default NMS thresholds: with boxes that all span the image, one mask per crop survives."""
    model, sam = models
    image = _stardist_image()
    params = AmgParameters(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.05)
    ours = generate_masks(model, image, params=params)
    assert_same_masks(ours, reference_masks(sam, image, params))


@pytest.mark.slow
def test_matches_reference_crop_layers(models, capsys):
    """crop_n_layers=1: 1 + 4 crops, each encoded on its own, edge filter, NMS across crops."""
    model, sam = models
    image = _stardist_image()
    params = AmgParameters(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.05,
                           box_nms_thresh=1.0, crop_n_layers=1, crop_nms_thresh=1.0)
    ours = generate_masks(model, image, params=params)
    summary = assert_same_masks(ours, reference_masks(sam, image, params))
    assert summary["n"] >= 1
    with capsys.disabled():
        print(f"\nAMG crop layers: {summary}, crop boxes {sorted({tuple(m['crop_box']) for m in ours})}")


def test_empty_result(models):
    model, sam = models
    image = _stardist_image()
    params = AmgParameters(points_per_side=2, pred_iou_thresh=1.0, stability_score_thresh=1.0)
    assert generate_masks(model, image, params=params) == []
    assert reference_masks(sam, image, params) == []
    labels = automatic_mask_generation(model, image, params=params)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint32 and not labels.any()


def test_label_image_of_amg_masks(models):
    model, _ = models
    image = _stardist_image()
    params = AmgParameters(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    embeddings = compute_embeddings(model, image)
    masks = generate_masks(model, embeddings=embeddings, params=params)
    assert len(masks) == 27
    labels = automatic_mask_generation(model, None, embeddings=embeddings, params=params)
    np.testing.assert_array_equal(labels, masks_to_label_image(masks, image.shape))


# --------------------------------------------------------------------------------------------------
# pieces against their references
# --------------------------------------------------------------------------------------------------

def test_nms_matches_torchvision():
    """Against ``batched_nms`` (torchvision, or its stand-in in tests/_shims) for thresholds that float32
    represents exactly or rounds down (SAM's 0.7), where comparing the float32 IoU in float32 (the stand-in)
    and in double (torchvision's C++ kernel, ``ovr > iou_threshold`` with a double threshold) agree."""
    mobile_sam()  # puts torchvision (or its stand-in) on the path
    from torchvision.ops.boxes import batched_nms

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 80))
        xy = rng.integers(0, 60, size=(n, 2))
        wh = rng.integers(0, 40, size=(n, 2))  # zero widths / heights included
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.choice([0.5, 0.7, 0.9], size=n).astype(np.float32)  # many ties
        threshold = float(rng.choice([0.0, 0.25, 0.5, 0.7, 1.0]))
        expected = batched_nms(torch.as_tensor(boxes).float(), torch.as_tensor(scores), torch.zeros(n),
                               iou_threshold=threshold).numpy()
        np.testing.assert_array_equal(geometry.nms(boxes, scores, threshold), expected)
    assert geometry.nms(np.zeros((0, 4)), np.zeros(0), 0.7).shape == (0,)


def test_nms_compares_in_double():
    """IoU 288 / 960 is float32(0.3) = 0.3000000119 > 0.3: torchvision's kernel suppresses the box."""
    boxes = np.array([[15, 32, 43, 44], [19, 17, 43, 55]])
    np.testing.assert_array_equal(geometry.nms(boxes, np.array([0.9, 0.8]), 0.3), [0])
    np.testing.assert_array_equal(geometry.nms(boxes, np.array([0.9, 0.8]), 0.31), [0, 1])


def test_geometry_matches_segment_anything():
    mobile_sam()
    from mobile_sam.utils import amg as ref

    for n in (1, 2, 16, 32):
        np.testing.assert_array_equal(geometry.build_point_grid(n), ref.build_point_grid(n))
    for shape in [(256, 256), (256, 320), (1305, 1009), (37, 700)]:
        for layers in (0, 1, 2):
            assert geometry.generate_crop_boxes(shape, layers, 512 / 1500) == ref.generate_crop_boxes(shape, layers, 512 / 1500)
    rng = np.random.default_rng(1)
    masks = rng.random((6, 20, 30)) < 0.01
    masks[0] = False
    np.testing.assert_array_equal(geometry.boxes_of(masks), ref.batched_mask_to_box(torch.as_tensor(masks)).numpy())


def test_remove_small_regions_matches_segment_anything(cv2_module):
    """The box-window shortcut and the whole-image fallback against SAM's remove_small_regions."""
    mobile_sam()
    from mobile_sam.utils.amg import remove_small_regions

    rng = np.random.default_rng(2)
    n_changed = 0
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(4, 40, 2))
        low = rng.normal(size=(max(2, h // 4), max(2, w // 4)))
        mask = ndimage.zoom(low, (h / low.shape[0], w / low.shape[1]), order=1)[:h, :w] > rng.normal(0.3, 0.5)
        mask = np.pad(mask, [(0, h - mask.shape[0]), (0, w - mask.shape[1])])
        if trial % 2:
            mask ^= rng.random(mask.shape) < 0.03
        big_h, big_w = h + int(rng.integers(0, 8)), w + int(rng.integers(0, 8))
        oy, ox = int(rng.integers(0, big_h - h + 1)), int(rng.integers(0, big_w - w + 1))
        full = np.zeros((big_h, big_w), bool)
        full[oy:oy + h, ox:ox + w] = mask
        area = int(rng.integers(1, 40))
        expected, changed_holes = remove_small_regions(full, area, "holes")
        expected, changed_islands = remove_small_regions(expected, area, "islands")
        box = geometry.boxes_of(full[None])[0]
        masks = amg._Masks(box[None], [full[box[1]:box[3] + 1, box[0]:box[2] + 1].copy()],
                           np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros((1, 2)), np.zeros((1, 4), np.int64))
        new_box, new_crop, changed = amg._remove_small_regions(masks, 0, (big_h, big_w), area)
        assert changed == (changed_holes or changed_islands)
        got = np.zeros((big_h, big_w), bool)
        got[new_box[1]:new_box[1] + new_crop.shape[0], new_box[0]:new_box[0] + new_crop.shape[1]] = new_crop
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(new_box, geometry.boxes_of(expected[None])[0])
        n_changed += changed
    assert 50 < n_changed < 300


# --------------------------------------------------------------------------------------------------
# label image (micro_sam.util.mask_data_to_segmentation)
# --------------------------------------------------------------------------------------------------

def synthetic_masks(shape=(700, 1100), n=24, seed=3):
    """Ellipses (integer arithmetic: exact everywhere), every third cut in two; several cross the 512-pixel
    block borders of µSAM's labelling."""
    h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for i in range(n):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(20, h // 3), rng.integers(20, w // 3)
        m = (yy - cy) ** 2 * rx * rx + (xx - cx) ** 2 * ry * ry < (rx * ry) ** 2
        if i % 3 == 0:
            m &= np.abs(xx - cx) > 6
        masks.append({"segmentation": m, "area": int(m.sum())})
    return masks


# micro_sam 1.8.14 mask_data_to_segmentation(synthetic_masks(), shape=(700, 1100), with_background=True,
# merge_exclusively=False) (python-elf 0.9.2, bioimage-cpp 0.9.0): per label 1, 2, ...: (raster index of
# its first pixel, size). The ids follow elf's blockwise numbering, not the raster order.
USAM_LABELS = [
    (0, 28041), (56392, 40871), (236821, 15891), (284900, 35593), (304078, 1342), (319403, 4958),
    (319418, 4958), (321456, 2), (400672, 8553), (449, 16540), (745, 817), (44498, 8478), (51584, 1075),
    (54872, 10145), (64557, 45904), (75470, 3345), (56434, 10756), (123666, 47518), (140659, 17425),
    (195588, 5874), (240497, 226), (242684, 837), (244870, 29062), (253571, 1), (240134, 11689),
    (387959, 1432), (395414, 7964), (395433, 7964), (432949, 1774), (495529, 628), (504592, 4803),
    (509576, 54660), (758, 16540), (1054, 17373), (183699, 14207), (184797, 5022), (358435, 30539),
    (562176, 8272), (562201, 8450), (643588, 431), (655605, 617), (673503, 18710), (678849, 246),
    (682460, 1465), (684200, 13952), (754812, 2156), (486801, 39857), (303208, 32929), (548559, 710),
    (357257, 25312),
]


def _signature(labels: np.ndarray) -> list:
    ids, first = np.unique(labels.ravel(), return_index=True)
    sizes = np.bincount(labels.ravel())
    return [(int(f), int(sizes[i])) for i, f in zip(ids, first) if i > 0]


def test_label_image_matches_usam():
    masks = synthetic_masks()
    labels = masks_to_label_image(masks, (700, 1100))
    assert labels.dtype == np.uint32
    assert _signature(labels) == USAM_LABELS
    # min_object_size=2000 gave µSAM the same components less the small ones, renumbered in order
    small = masks_to_label_image(masks, (700, 1100), min_object_size=2000)
    assert _signature(small) == [entry for entry in USAM_LABELS if entry[1] >= 2000]


def test_label_image_rules():
    shape = (40, 50)
    big = np.zeros(shape, bool)
    big[2:38, 2:48] = True
    small = np.zeros(shape, bool)
    small[10:20, 10:20] = True
    split = np.zeros(shape, bool)
    split[25:30, 5:10] = split[25:30, 30:35] = True
    masks = [{"segmentation": m, "area": int(m.sum())} for m in (small, big, split)]
    # with_background: the largest region (here the big mask less the others) is removed
    labels = masks_to_label_image(masks)
    assert labels.max() == 3 and not labels[big & ~small & ~split].any()
    assert np.array_equal(labels > 0, small | split)
    # without: the big mask is painted first, smaller ones on top; the split mask gives two objects
    labels = masks_to_label_image(masks, with_background=False)
    assert labels.max() == 4 and np.array_equal(labels > 0, big)
    assert len(np.unique(labels[small])) == 1 and len(np.unique(labels[split])) == 2
    # masks smaller than min_object_size are not painted at all
    labels = masks_to_label_image(masks, with_background=False, min_object_size=60)
    assert np.array_equal(labels > 0, big) and len(np.unique(labels[split])) == 1
    # no background at all: µSAM's relabelling maps the smallest id to 0 as well; the components are numbered
    # in raster order, so the frame (first pixel 0) is id 1 and becomes background
    labels = masks_to_label_image([{"segmentation": big, "area": int(big.sum())},
                                   {"segmentation": ~big, "area": int((~big).sum())}], with_background=False)
    assert labels.max() == 1 and labels[big].min() == 1 and not labels[~big].any()
    assert not masks_to_label_image([], shape).any()
    with pytest.raises(ValueError, match="shape"):
        masks_to_label_image([])
    with pytest.raises(ValueError, match="does not fit"):
        masks_to_label_image(masks, (10, 10))
    with pytest.raises(ValueError, match="min_object_size"):
        masks_to_label_image(masks, min_object_size=-1)


# --------------------------------------------------------------------------------------------------
# parameters and inputs
# --------------------------------------------------------------------------------------------------

def test_parameter_defaults_and_presets():
    mobile_sam()
    import inspect

    from mobile_sam import SamAutomaticMaskGenerator

    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    for f in dataclasses.fields(AmgParameters):
        assert getattr(AmgParameters(), f.name) == signature[f.name].default, f.name
    assert AMG_PRESETS["vit_b_lm"].pred_iou_thresh == 0.65 and AMG_PRESETS["vit_b_lm"].stability_score_thresh == 0.7
    assert AMG_PRESETS["vit_t_lm"].points_per_side == 32
    assert all(p.pred_iou_thresh < 0.88 for p in AMG_PRESETS.values())


@pytest.mark.parametrize("changes, error", [
    ({"points_per_side": 0}, ValueError),
    ({"points_per_side": 16.0}, ValueError),
    ({"points_per_batch": True}, ValueError),
    ({"pred_iou_thresh": 1.5}, ValueError),
    ({"stability_score_thresh": -0.1}, ValueError),
    ({"box_nms_thresh": float("nan")}, ValueError),
    ({"crop_nms_thresh": "0.7"}, TypeError),
    ({"stability_score_offset": -1.0}, ValueError),
    ({"crop_n_layers": -1}, ValueError),
    ({"crop_overlap_ratio": 1.0}, ValueError),
    ({"crop_n_points_downscale_factor": 0}, ValueError),
    ({"min_mask_region_area": -5}, ValueError),
    ({"points_per_side": 4, "crop_n_layers": 2, "crop_n_points_downscale_factor": 4}, ValueError),
])
def test_parameter_validation(changes, error):
    with pytest.raises(error):
        AmgParameters(**changes)


def test_input_validation(models):
    model, _ = models
    image = _stardist_image()
    embeddings = compute_embeddings(model, image)
    with pytest.raises(ValueError, match="image or its embeddings"):
        generate_masks(model)
    with pytest.raises(ValueError, match="crop layers"):
        generate_masks(model, embeddings=embeddings, params=AmgParameters(crop_n_layers=1))
    with pytest.raises(ValueError, match="shape"):
        generate_masks(model, image[:100], embeddings=embeddings)
    with pytest.raises(ValueError):
        generate_masks(model, np.zeros((4, 5, 6, 7)))
    with pytest.raises(TypeError):
        generate_masks(model, image, params={"points_per_side": 4})
