"""export -> bioimageio.core gate -> load through the runtime -> results equal SamPredictor's.

The reference is the real segment_anything / mobile_sam SamPredictor fed with micro-sam's uint8 image.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_images
from reference import build_reference_sam, reference_predictor, usam_to_image

from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.prompting.inputs import batched_point_prompts
from usam_bioimageio.prompting.predict import segment_from_prompts

FORMATS = ("onnx", "torchscript")


def _reference(state, model_type, architecture=None):
    return reference_predictor(build_reference_sam(model_type, state, architecture=architecture))


def _objects(image, n=3, seed=0):
    """Deterministic prompts inside the image: positive points and boxes around them."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    centers = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h], size=(n, 2))
    half = rng.uniform(0.05, 0.15, size=(n, 2)) * [w, h]
    boxes = np.concatenate([centers - half, centers + half], axis=1)
    return centers, boxes


def _agreement(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(ours == ref))


def _check_embeddings(family, state, model_type, images, formats=FORMATS, architecture=None):
    """Embeddings of every format equal the predictor's for each image (one reference run per image).
    Returns the predictor (set to the last image) and the first format's model and embeddings of that image."""
    predictor = _reference(state, model_type, architecture)
    models = {fmt: SamModel.load(family, weight_format=fmt) for fmt in formats}
    for name, image in images:
        predictor.set_image(usam_to_image(image))
        ref = predictor.features.numpy()
        first = None
        for fmt, model in models.items():
            emb = compute_embeddings(model, image)
            diff = float(np.abs(emb.features - ref).max())
            assert diff <= 1e-4, f"{fmt} {name}: max abs diff {diff}"
            assert emb.original_shape == image.shape[:2]
            first = first or (model, emb)
    return predictor, first[0], first[1]


def test_vit_t_embeddings_equal_sampredictor(vit_t_family):
    family, state = vit_t_family
    _check_embeddings(family, state, "vit_t", real_images())


def _check_vit_b(family, state, architecture=None):
    images = real_images()
    # RGB 360^2 (upscaling); its predictor state and embeddings are then used for the masks (the antialiased
    # downscaling of large images is the same graph code for every model type: compared on vit_t's 4 images
    # here, and on vit_b's 1305x1009 image in the slow gated vit_b test)
    predictor, model, emb = _check_embeddings(family, state, "vit_b", [images[2]], formats=("onnx",),
                                              architecture=architecture)
    image = images[2][1]
    centers, boxes = _objects(image)
    for c, b in zip(centers, boxes):
        ref, _, _ = predictor.predict(point_coords=c[None], point_labels=np.array([1]), box=b, multimask_output=False)
        ours = segment_from_prompts(model, emb, points=c[None], point_labels=[1], boxes=b)
        assert _agreement(ours.masks[0], ref) >= 0.9999


def test_vit_encoder_embeddings_and_masks_equal_sampredictor(vit_b_two_block_family):
    """CI: the ViT encoders' export (vit_b / vit_l / vit_h share its code) on vit_b cut to two blocks."""
    from conftest import vit_b_two_blocks

    _check_vit_b(*vit_b_two_block_family, architecture=vit_b_two_blocks())


@pytest.mark.slow  # ~4.5 min on 2 cores (vit_b's ONNX export and two vit_b encoder runs); CI: the two-block vit_b
def test_vit_b_embeddings_and_masks_equal_sampredictor(vit_b_family):
    _check_vit_b(*vit_b_family)


@pytest.mark.slow  # ~9 min on 2 cores: vit_b exported with the bioimageio.core gate for both formats
def test_vit_b_export_is_gated(tmp_path_factory, usam_cache, data_dir):
    from conftest import _export

    family, state = _export(tmp_path_factory, "vit_b", formats=("onnx", "torchscript"))  # raises unless passed
    assert (family / "image_encoder.zip").is_file() and (family / "prompt_decoder.zip").is_file()
    _check_embeddings(family, state, "vit_b", [real_images()[3]], formats=("torchscript",))


@pytest.fixture(scope="module")
def vit_t_setup(vit_t_family):
    family, state = vit_t_family
    name, image = real_images()[2]  # a DSB2018 RGB image
    predictor = _reference(state, "vit_t")
    predictor.set_image(usam_to_image(image))
    models = {fmt: SamModel.load(family, weight_format=fmt) for fmt in FORMATS}
    embeddings = {fmt: compute_embeddings(m, image) for fmt, m in models.items()}
    return image, predictor, models, embeddings


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", ["point", "box", "points_and_box", "negative_point", "mask", "all"])
def test_masks_equal_sampredictor(vit_t_setup, fmt, multimask, kind):
    image, predictor, models, embeddings = vit_t_setup
    model, emb = models[fmt], embeddings[fmt]
    centers, boxes = _objects(image)
    c, b = centers[0], boxes[0]
    neg = c + [0.0, (b[3] - b[1]) * 0.8]
    prompts = {
        "point": dict(point_coords=c[None], point_labels=np.array([1])),
        "box": dict(box=b),
        "points_and_box": dict(point_coords=np.stack([c, c + 2]), point_labels=np.array([1, 1]), box=b),
        "negative_point": dict(point_coords=np.stack([c, neg]), point_labels=np.array([1, 0])),
        "mask": None,
        "all": None,
    }[kind]
    if prompts is None:  # refinement: a previous low-res mask as a prompt (alone or with points and box)
        _, _, low = predictor.predict(point_coords=c[None], point_labels=np.array([1]), multimask_output=False)
        prompts = dict(mask_input=low)
        if kind == "all":
            prompts.update(point_coords=np.stack([c, neg]), point_labels=np.array([1, 0]), box=b)
    ref_masks, ref_scores, ref_low = predictor.predict(multimask_output=multimask, **prompts)
    ours = segment_from_prompts(
        model,
        emb,
        points=prompts.get("point_coords"),
        point_labels=prompts.get("point_labels"),
        boxes=prompts.get("box"),
        mask_inputs=prompts.get("mask_input"),
        multimask_output=multimask,
    )
    assert ours.masks.shape == (1,) + ref_masks.shape
    for k in range(len(ref_masks)):
        assert _agreement(ours.masks[0, k], ref_masks[k]) >= 0.9999
    np.testing.assert_allclose(ours.scores[0], ref_scores, atol=1e-4)
    np.testing.assert_allclose(ours.low_res_logits[0], ref_low, atol=1e-3)


def test_many_objects_in_one_call_equal_single_calls(vit_t_setup):
    image, predictor, models, embeddings = vit_t_setup
    model, emb = models["onnx"], embeddings["onnx"]
    centers, boxes = _objects(image, n=6, seed=1)
    ours = segment_from_prompts(model, emb, boxes=boxes)
    assert ours.masks.shape[:2] == (6, 1)
    for i, b in enumerate(boxes):
        ref, _, _ = predictor.predict(box=b, multimask_output=False)
        assert _agreement(ours.masks[i, 0], ref[0]) >= 0.9999


def test_batched_positive_points_with_shared_negatives(vit_t_setup):
    """µSAM's batched mode: each positive point is an object, the negatives are shared."""
    image, predictor, models, embeddings = vit_t_setup
    emb = embeddings["onnx"]
    centers, _ = _objects(image, n=4, seed=2)
    negatives = np.array([[5.0, 5.0], [image.shape[1] - 5.0, image.shape[0] - 5.0]])
    points, labels = batched_point_prompts(centers, negatives)
    ours = segment_from_prompts(models["onnx"], emb, points=points, point_labels=labels)
    for i in range(len(centers)):
        ref, _, _ = predictor.predict(point_coords=points[i], point_labels=labels[i], multimask_output=False)
        assert _agreement(ours.masks[i, 0], ref[0]) >= 0.9999


def test_image_larger_than_1024_and_uint16(vit_t_family):
    """Prompts on a 1305x1009 image (downscaled, antialiased) and on a uint16 image."""
    family, state = vit_t_family
    predictor = _reference(state, "vit_t")
    model = SamModel.load(family)
    for name, image in (real_images()[3], real_images()[1]):
        predictor.set_image(usam_to_image(image))
        emb = compute_embeddings(model, image)
        _, boxes = _objects(image, n=2, seed=3)
        ours = segment_from_prompts(model, emb, boxes=boxes)
        for i, b in enumerate(boxes):
            ref, _, _ = predictor.predict(box=b, multimask_output=False)
            assert _agreement(ours.masks[i, 0], ref[0]) >= 0.9999, name
