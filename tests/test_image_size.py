"""A model of input size 256 end to end (issue 13, part 1): a seeded vit_t at 256 with an AIS decoder, exported
(gated by bioimageio.core like every family) and run through every package kind and runtime path, against the
torch model run directly (``seeded_sam("vit_t", image_size=256)``: Pillow's resize, normalisation and padding,
encoder, prompt encoder + mask decoder, ``postprocess_masks``; the AIS decoder and its crop + resize).

Tolerances are the 1024 tests' (tests/test_end_to_end.py, tests/test_ais_packages.py): embeddings 1e-4, mask
agreement 0.9999, scores 1e-4, low-res logits 1e-3, AIS maps 1e-4.

CI time: the family is exported with ONNX weights (gated by bioimageio.core, all four packages; the
pytorch_state_dict architecture with its image_size is checked without bioimageio.core); the slow test exports all
three formats, gated, and checks the torchscript weights too.
"""

from __future__ import annotations

import dataclasses
import types
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import real_images
from reference import usam_to_image

from usam_bioimageio import registry
from usam_bioimageio.embeddings.compute import cached_embeddings, compute_embeddings, compute_tiled_embeddings
from usam_bioimageio.embeddings.types import Embeddings, auto_tiling, resolve_tiling
from usam_bioimageio.errors import CacheMismatchError, PackageError
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.runtime.packages import Family

SIZE = 256
PIXEL_SCALE = 2.0  # the test model records it as the pixel scale it was trained at (`usam ais` runs it so by default)
SEED, AIS_SEED = 0, 3
CI_FORMATS = ("onnx",)  # the format exported (and gated) for the fast tests; the slow test gates all three
TILING = dict(tile_shape=(192, 192), halo=(32, 32))  # the auto tiling at 256


@pytest.fixture(scope="module")
def torch_sam():
    from usam_bioimageio.modeling import seeded_sam

    return seeded_sam("vit_t", seed=SEED, image_size=SIZE)


@pytest.fixture(scope="module")
def ais_state():
    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state

    return seeded_ais_decoder_state("vit_t", AIS_SEED, use_conv_transpose=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, torch_sam, ais_state):
    from usam_bioimageio.training.checkpoints import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt-256") / "vit_t_256.pt"
    return save_checkpoint(path, sam_state=torch_sam.state_dict(), decoder_state=ais_state, image_size=SIZE,
                           pixel_scale=PIXEL_SCALE)


def _export(tmp_path_factory, checkpoint, formats):
    """``usam export`` of the 256 checkpoint: all four packages, each format gated by bioimageio.core (the export
    fails unless every package passes); the exporter's synthetic 256 x 256 sample image as test input."""
    from usam_bioimageio.cli.main import main

    out = tmp_path_factory.mktemp("family-256") / "family"
    assert main(["export", str(checkpoint), "--out", str(out), "--formats", *formats, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory, usam_cache, data_dir, checkpoint):
    return _export(tmp_path_factory, checkpoint, CI_FORMATS)


@pytest.fixture(scope="module")
def model(family):
    return SamModel.load(family)


@pytest.fixture(scope="module")
def dsb_image():
    return real_images()[2][1]  # a DSB2018 RGB image (larger than 256: downscaled)


# --------------------------------------------------------------------------------------------------------------
# the torch reference: the model run directly, as SamPredictor with ResizeLongestSide(256) runs it
# --------------------------------------------------------------------------------------------------------------


def _resized(h, w):
    scale = SIZE / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@torch.no_grad()
def _torch_features(sam, image):
    from PIL import Image

    u8 = usam_to_image(image)
    new_h, new_w = _resized(*u8.shape[:2])
    resized = np.asarray(Image.fromarray(u8).resize((new_w, new_h), Image.BILINEAR))  # segment_anything's resize
    x = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
    return sam.image_encoder(sam.preprocess(x)[None])


@torch.no_grad()
def _torch_predict(sam, features, shape, *, points=None, labels=None, box=None, mask=None, multimask=False):
    """SamPredictor.predict with ResizeLongestSide(256): (masks (k, H, W) bool, scores (k,), low-res (k, 64, 64))."""
    h, w = shape
    new_h, new_w = _resized(h, w)
    scale = np.array([new_w / w, new_h / h])
    pts = None
    if points is not None:
        coords = torch.as_tensor(np.asarray(points, float) * scale, dtype=torch.float)[None]
        pts = (coords, torch.as_tensor(np.asarray(labels), dtype=torch.int)[None])
    boxes = None if box is None else torch.as_tensor((np.asarray(box, float).reshape(2, 2) * scale).reshape(1, 4),
                                                     dtype=torch.float)
    masks = None if mask is None else torch.as_tensor(mask, dtype=torch.float).reshape(1, 1, *mask.shape[-2:])
    sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=masks)
    low, iou = sam.mask_decoder(image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)
    full = sam.postprocess_masks(low, (new_h, new_w), (h, w)) > sam.mask_threshold
    return full[0].numpy(), iou[0].numpy(), low[0].numpy()


def _agreement(a, b) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


# --------------------------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_records_its_size(checkpoint):
    from usam_bioimageio.training.checkpoints import load_checkpoint

    assert torch.load(checkpoint, weights_only=True)["image_size"] == SIZE
    assert load_checkpoint(checkpoint).image_size == SIZE and load_checkpoint(checkpoint).pixel_scale == PIXEL_SCALE


def _rdf(family, kind):
    with zipfile.ZipFile(family / f"{kind}.zip") as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _axes(tensor):
    return {a.get("id", a["type"]): a.get("size") for a in tensor["axes"]}


def test_every_package_records_the_size(family, model):
    """rdf axes and config.usam say 256: embeddings 16 x 16, masks and mask prompts 64 x 64,
    AIS head maps 256 x 256; the whole-image note and the documentation name 256."""
    manifest = yaml.safe_load((family / "family.yaml").read_text())
    assert manifest["image_size"] == SIZE and set(manifest["packages"]) == {"image_encoder", "prompt_decoder", "ais",
                                                                            "ais_head"}
    for kind in manifest["packages"]:
        rdf = _rdf(family, kind)
        usam = rdf["config"]["usam"]
        assert usam["image_size"] == SIZE and usam["embedding_shape"] == [256, 16, 16], kind
        assert usam["pixel_scale"] == PIXEL_SCALE, kind
        assert usam["resize"].startswith("longest side to 256,"), kind
        assert set(rdf["weights"]) == set(CI_FORMATS), kind
        if "whole_image" in usam:
            assert "longer side is 256 pixels" in usam["whole_image"]
        embeddings = [t for t in rdf["inputs"] + rdf["outputs"] if t["id"] == "embeddings"]
        for t in embeddings:
            assert _axes(t)["y"] == 16 and _axes(t)["x"] == 16, kind
    decoder = _rdf(family, "prompt_decoder")
    tensors = {t["id"]: t for t in decoder["inputs"] + decoder["outputs"]}
    assert _axes(tensors["mask_input"])["y"] == 64 and _axes(tensors["low_res_masks"])["x"] == 64
    head = _rdf(family, "ais_head")
    assert _axes(head["outputs"][0])["y"] == SIZE
    with zipfile.ZipFile(family / "image_encoder.zip") as zf:
        doc = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".md"))
    assert "resize to 256" in doc and "256 x 16 x 16" in doc
    assert model.image_size == SIZE and model.family.image_size == SIZE
    assert model.pixel_scale == PIXEL_SCALE
    for kind in ("ais", "ais_head"):
        with zipfile.ZipFile(family / f"{kind}.zip") as zf:
            doc = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".md"))
        assert "## Pixel scale 2\n" in doc and "enlarge the image 2 times" in doc, kind


def test_pytorch_state_dict_architectures_take_the_size(checkpoint, family):
    """What bioimageio.core builds from a package's pytorch_state_dict architecture (its kwargs carry image_size 256)
    loads the checkpoint's weights strictly and reproduces the package's test outputs (the fast tests export ONNX
    only; the slow test gates every format)."""
    from usam_exporters import modules

    from usam_bioimageio.modeling import packaged
    from usam_bioimageio.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    built = {"ImageEncoderModel": modules.image_encoder(ckpt), "PromptDecoderModel": modules.prompt_decoder(ckpt)}
    for name, module in built.items():
        spec = modules.architecture(name, model_type="vit_t", image_size=SIZE)
        assert spec.kwargs == {"model_type": "vit_t", "image_size": SIZE} and module.image_size == SIZE
        rebuilt = getattr(packaged, name)(**spec.kwargs)
        rebuilt.load_state_dict(module.state_dict(), strict=True)
        built[name] = rebuilt
    assert modules.architecture("ImageEncoderModel", model_type="vit_t").kwargs == {"model_type": "vit_t"}  # 1024
    # the encoder built from those kwargs gives the package's test output
    rdf = _rdf(family, "image_encoder")
    encoder = built["ImageEncoderModel"]
    with zipfile.ZipFile(family / "image_encoder.zip") as zf:
        names = {n.rsplit("/", 1)[-1]: n for n in zf.namelist()}
        x = np.load(zf.open(names[rdf["inputs"][0]["test_tensor"]["source"]]))
        y = np.load(zf.open(names[rdf["outputs"][0]["test_tensor"]["source"]]))
    with torch.no_grad():
        assert float(np.abs(encoder.eval()(torch.from_numpy(x)).numpy() - y).max()) <= 1e-4


# --------------------------------------------------------------------------------------------------------------
# the runtime against the torch model
# --------------------------------------------------------------------------------------------------------------


def _check_embeddings(model, torch_sam, images):
    for name, image in images:
        ref = _torch_features(torch_sam, image).numpy()
        emb = compute_embeddings(model, image)
        assert emb.features.shape == (1, 256, 16, 16)
        diff = float(np.abs(emb.features - ref).max())
        assert diff <= 1e-4, f"{model.weight_format} {name}: max abs diff {diff}"


def test_embeddings_equal_torch(model, torch_sam):
    """Gray, RGB and a large image (1305 x 1009, downscaled 5x by Pillow's antialiased resize)."""
    images = real_images()
    _check_embeddings(model, torch_sam, [images[0], images[2], images[3]])


@pytest.fixture(scope="module")
def dsb_setup(model, torch_sam, dsb_image):
    return _torch_features(torch_sam, dsb_image), compute_embeddings(model, dsb_image)


@pytest.fixture(scope="module")
def dsb_tiled(model, dsb_image):
    return compute_tiled_embeddings(model, dsb_image, **TILING, progress=False)


def _check_prompts(model, embeddings, torch_sam, features, image, kind):
    shape = image.shape[:2]
    h, w = shape
    c = np.array([0.4 * w, 0.55 * h])
    b = np.concatenate([c - [0.1 * w, 0.08 * h], c + [0.1 * w, 0.08 * h]])
    neg = c + [0.0, 0.13 * h]
    prompts = {
        "point": dict(points=c[None], labels=[1]),
        "box": dict(box=b),
        "points_and_box": dict(points=np.stack([c, c + 2]), labels=[1, 1], box=b),
        "negative_point": dict(points=np.stack([c, neg]), labels=[1, 0]),
        "multimask": dict(points=c[None], labels=[1], multimask=True),
    }.get(kind)
    if prompts is None:  # refinement: the previous low-res mask as a prompt (64 x 64 at 256)
        _, _, low = _torch_predict(torch_sam, features, shape, points=c[None], labels=[1])
        prompts = dict(mask=low)
        if kind == "all":
            prompts.update(points=np.stack([c, neg]), labels=[1, 0], box=b)
    ref_masks, ref_scores, ref_low = _torch_predict(torch_sam, features, shape, **prompts)
    from usam_bioimageio.prompting.predict import segment_from_prompts

    ours = segment_from_prompts(model, embeddings, points=prompts.get("points"),
                                point_labels=prompts.get("labels"), boxes=prompts.get("box"),
                                mask_inputs=prompts.get("mask"), multimask_output=prompts.get("multimask", False))
    assert ours.low_res_logits.shape == (1, len(ref_masks), 64, 64)
    for k in range(len(ref_masks)):
        assert _agreement(ours.masks[0, k], ref_masks[k]) >= 0.9999
    np.testing.assert_allclose(ours.scores[0], ref_scores, atol=1e-4)
    np.testing.assert_allclose(ours.low_res_logits[0], ref_low, atol=1e-3)


PROMPT_KINDS = ["point", "box", "points_and_box", "negative_point", "mask", "all", "multimask"]


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_prompts_equal_torch(model, torch_sam, dsb_image, dsb_setup, kind):
    _check_prompts(model, dsb_setup[1], torch_sam, dsb_setup[0], dsb_image, kind)


def test_segment_from_mask_uses_64_mask_prompts(model, dsb_setup, dsb_image):
    from usam_bioimageio.prompting.from_mask import logits_from_mask, segment_from_mask
    from usam_bioimageio.prompting.predict import segment_from_prompts

    emb = dsb_setup[1]
    mask = np.zeros(dsb_image.shape[:2], np.uint8)
    mask[100:160, 200:280] = 1
    assert logits_from_mask(mask=mask, image_size=SIZE).shape == (64, 64)
    ours = segment_from_mask(model, emb, mask=mask)
    direct = segment_from_prompts(model, emb, boxes=[200, 100, 280, 160],
                                  mask_inputs=logits_from_mask(mask=mask, image_size=SIZE)[None])
    assert np.array_equal(ours.masks, direct.masks)
    empty = segment_from_mask(model, emb, mask=np.zeros_like(mask), allow_empty=True)  # µSAM's empty-mask decode
    assert empty.low_res_logits.shape == (1, 1, 64, 64)


def test_tiled_prompts_are_their_tiles(model, dsb_image, dsb_tiled):
    """Tiled embeddings at 256 (the auto tiling: tiles 192, halo 32): each object is decoded from its tile, i.e.
    equals segment_from_prompts on the embeddings of that tile's outer block, pasted at its place."""
    from usam_bioimageio.prompting.predict import segment_from_prompts
    from usam_bioimageio.prompting.tiled import segment_from_prompts_tiled

    tile_shape, halo = resolve_tiling("auto", None, dsb_image.shape, SIZE)
    assert dict(tile_shape=tile_shape, halo=halo) == TILING
    tiled = dsb_tiled
    assert len(tiled) > 1 and tiled.features[0].shape == (1, 256, 16, 16)
    boxes = np.array([[30, 40, 90, 100], [300, 250, 360, 300]], float)
    res = segment_from_prompts_tiled(model, tiled, boxes=boxes)
    assert res.masks.shape == (2, 1) + dsb_image.shape[:2] and res.low_res_logits.shape == (2, 1, 64, 64)
    for i, box in enumerate(boxes):
        tile = tiled.tiling.tile(int(res.tiles[i]))
        (y0, x0), (ys, xs) = tile.outer_begin, tile.outer_slices
        alone = segment_from_prompts(model, compute_embeddings(model, dsb_image[ys, xs]), boxes=box - [x0, y0, x0, y0])
        expected = np.zeros(dsb_image.shape[:2], bool)
        expected[ys, xs] = alone.masks[0, 0]
        assert _agreement(res.masks[i, 0], expected) >= 0.9999


def _torch_ais_maps(torch_sam, ais_state, image):
    from usam_bioimageio.modeling.unetr import load_ais_decoder, postprocess_like_torch_em

    features = _torch_features(torch_sam, image)
    with torch.no_grad():
        padded = load_ais_decoder("vit_t", ais_state)(features)
        assert padded.shape == (1, 3, SIZE, SIZE)
        return features, postprocess_like_torch_em(padded, image.shape[:2])[0].numpy()


def _check_end_to_end_ais(model, image, ref):
    """A family of the end-to-end package alone runs it on the image: the torch decoder's maps ``ref``."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps

    end_to_end = SamModel(Family({"ais": model.family.get("ais")}), weight_format=model.weight_format)
    diff = float(np.abs(ais_maps(end_to_end, image) - ref).max())
    assert diff <= 1e-4, f"{model.weight_format}: {diff}"


def test_ais_equals_torch(model, torch_sam, ais_state, dsb_image, dsb_setup, dsb_tiled):
    """AIS head on the embeddings (maps 256 x 256, cropped and resized here) and the end-to-end AIS package both
    give the torch decoder's maps; labels and tiled AIS come out at the image size."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps, automatic_instance_segmentation

    features, ref = _torch_ais_maps(torch_sam, ais_state, dsb_image)
    head = ais_maps(model, embeddings=Embeddings(features.numpy(), dsb_image.shape[:2], model.encoder_identity))
    assert float(np.abs(head - ref).max()) <= 1e-4
    _check_end_to_end_ais(model, dsb_image, ref)
    labels = automatic_instance_segmentation(model, dsb_image, embeddings=dsb_setup[1])
    assert labels.shape == dsb_image.shape[:2] and labels.max() > 0
    assert automatic_instance_segmentation(model, dsb_image, embeddings=dsb_tiled).shape == dsb_image.shape[:2]


def _torch_bilinear(image: np.ndarray, shape) -> np.ndarray:
    """(H, W) or (H, W, C) -> float32 of ``shape`` (+ C), torch's bilinear interpolation."""
    hwc = image if image.ndim == 3 else image[..., None]
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(hwc, -1, 0), np.float32))[None]
    out = torch.nn.functional.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False)[0].numpy()
    out = np.moveaxis(out, 0, -1)
    return out if image.ndim == 3 else out[..., 0]


def test_ais_at_a_pixel_scale_equals_torch(model, torch_sam, ais_state, dsb_image):
    """ais_maps(scale=2): the torch model's maps of the image enlarged 2x (torch's bilinear resize), resized back
    to the image (torch's bilinear); a 100 x 120 crop, enlarged to 200 x 240, fits the model's input untiled."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps

    crop = dsb_image[100:200, 150:270]
    _, big_maps = _torch_ais_maps(torch_sam, ais_state, _torch_bilinear(crop, (200, 240)))
    ref = _torch_bilinear(np.moveaxis(big_maps, 0, -1), (100, 120))
    maps = ais_maps(model, crop, scale=2)
    assert maps.shape == (3, 100, 120)
    assert float(np.abs(maps - np.moveaxis(ref, -1, 0)).max()) <= 1e-4
    assert float(np.abs(maps - ais_maps(model, crop)).max()) > 0.01  # the scale changes what the model sees
    with pytest.raises(ValueError, match="with a scale needs the image"):
        ais_maps(model, embeddings=compute_embeddings(model, crop), scale=2)


_REFUSED = "this model runs at pixel scale 2 (config.usam.pixel_scale), which {} cannot; give --scale 1 to segment " \
           "at the image's own scale"


def test_cli_ais_at_a_pixel_scale(model, family, dsb_image, tmp_path, capsys):
    """`usam ais --tile-shape auto` of a model trained at pixel scale 2 (config.usam.pixel_scale): the image enlarged
    2x, tiled at the model's size, the maps resized back: the API's labels at scale 2, at the image's size (as
    `--scale 2`); a bad scale, --scale with --embeddings, and the model's scale with embeddings or a stack are usage
    errors."""
    import tifffile

    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation
    from usam_bioimageio.automatic.ais.postprocess import AisParameters
    from usam_bioimageio.cli.main import main
    from usam_bioimageio.embeddings.compute import compute_image_embeddings
    from usam_bioimageio.runtime.pixel_scale import scale_image

    crop = dsb_image[:200, :180]  # 400 x 360 at scale 2: 3 x 2 tiles of 192 (+ halo 32)
    tifffile.imwrite(tmp_path / "img.tif", crop)
    assert main(["ais", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "labels.tif"), "--tile-shape", "auto", "--boundary-distance-threshold",
                 "0.7", "--quiet"]) == 0  # the seeded decoder's maps give seeds there
    tiled = compute_image_embeddings(model, scale_image(crop, 2), tile_shape="auto", progress=False)
    assert len(tiled) == 6
    expected = automatic_instance_segmentation(model, crop, embeddings=tiled, scale=2,
                                               params=AisParameters(boundary_distance_threshold=0.7))
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == crop.shape[:2] and labels.max() > 0 and np.array_equal(labels, expected)
    assert main(["ais", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "explicit.tif"), "--tile-shape", "auto", "--scale", "2", "--boundary-distance-threshold",
                 "0.7", "--quiet"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "explicit.tif"), labels)
    assert main(["embed", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--cache",
                 str(tmp_path / "e.zarr"), "--quiet"]) == 0
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([crop] * 2))
    capsys.readouterr()
    refused = _REFUSED
    for image, extra, message in (
            ("img.tif", ["--scale", "0"], "--scale: scale must be > 0 and at most 8, got 0"),
            ("img.tif", ["--scale", "2", "--embeddings", str(tmp_path / "e.zarr")],
             "--scale encodes the resized image; do not give --embeddings with it"),
            ("img.tif", ["--embeddings", str(tmp_path / "e.zarr")],
             refused.format("embeddings (of the image as it is)")),
            ("stack.tif", [], refused.format("a stack (3D segmentation)"))):
        assert main(["ais", "--model", str(family), "--image", str(tmp_path / image), "--out",
                     str(tmp_path / "never.tif"), "--quiet", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"usam ais: error: {message}"
    assert not (tmp_path / "never.tif").exists()


def test_usam_evaluate_runs_ais_at_the_models_pixel_scale(model, monkeypatch, tmp_path):
    """`usam evaluate` (run_evaluation): AIS and the prompts at the model's pixel scale (embeddings of the enlarged
    images, shared), AMG at scale 1 (the images' own); the report names the scale."""
    import usam_bioimageio.evaluation.automatic as automatic
    import usam_bioimageio.evaluation.interactive as interactive_module
    from usam_bioimageio.evaluation.report import run_evaluation, write_report

    seen = {}

    def evaluate(model, val_pairs, test_pairs, *, mode, progress, embed, scale=1.0):
        seen[mode] = (scale, embed)
        return {"best": {"min_size": 5}, "val_table": [{"msa": 0.25}], "test": {"msa": 0.5, "sa50": 0.6, "sa75": 0.4}}

    def interactive(model, pairs, *, start, n_iterations, seed, embed, progress, scale=1.0):
        seen[start] = (scale, embed)
        return {"msa": [0.25, 0.5], "sa50": [0.3, 0.6], "sa75": [0.2, 0.4], "n_images": 1}

    monkeypatch.setattr(automatic, "evaluate_automatic", evaluate)
    monkeypatch.setattr(interactive_module, "evaluate_interactive", interactive)
    results = run_evaluation(model, [], [], modes=["ais", "amg", "interactive"], n_iterations=2, progress=False)
    assert {k: v[0] for k, v in seen.items()} == {"ais": PIXEL_SCALE, "amg": 1.0, "box": PIXEL_SCALE,
                                                  "point": PIXEL_SCALE}
    image = np.zeros((40, 30), np.uint8)
    image[10:20, 5:15] = 200
    # prompts and AIS share the embeddings of the enlarged image, AMG has the image's own
    assert seen["ais"][1](image) is seen["box"][1](image) is seen["point"][1](image)
    assert seen["ais"][1](image).original_shape == (80, 60) and seen["amg"][1](image).original_shape == (40, 30)
    assert results["ais"]["pixel_scale"] == PIXEL_SCALE and results["amg"]["pixel_scale"] == 1.0
    assert results["interactive"]["box"]["pixel_scale"] == PIXEL_SCALE
    report = write_report(results, tmp_path / "report", title="t", command="c").read_text()
    assert "| AIS (µSAM decoder) at pixel scale 2; val-chosen min_size 5 | 0.500 |" in report
    assert "| AMG (point grid); val-chosen min_size 5 | 0.500 |" in report
    assert "| interactive from a box at pixel scale 2, after 1 corrections | 0.500 |" in report


def _shrunk_torch(mask: np.ndarray, shape) -> np.ndarray:
    """A mask of the enlarged image back at the image's size: torch's bilinear resize, >= 0.5."""
    return _torch_bilinear(mask.astype(np.float32), shape) >= 0.5


def test_prompts_at_a_pixel_scale_equal_torch(model, torch_sam, dsb_image):
    """segment_from_prompts_scaled(scale=2): the torch model prompted on the image enlarged 2x (torch's bilinear
    resize) with the prompts moved 2x, its masks shrunk back by torch's bilinear resize (>= 0.5); a 100 x 120 crop,
    enlarged to 200 x 240, fits the model's input untiled. Point and box prompts, one and three masks."""
    from usam_bioimageio.prompting.scaled import segment_from_prompts_scaled
    from usam_bioimageio.runtime.pixel_scale import scale_image

    crop = dsb_image[100:200, 150:270]
    features = _torch_features(torch_sam, _torch_bilinear(crop, (200, 240)))
    emb = compute_embeddings(model, scale_image(crop, 2))
    box, point = np.array([30.0, 20.0, 70.0, 60.0]), np.array([[50.0, 40.0]])
    for prompts, multimask in ((dict(box=box), False), (dict(points=point, labels=[1]), True)):
        ref_masks, ref_scores, _ = _torch_predict(
            torch_sam, features, (200, 240), box=None if "box" not in prompts else box * 2,
            points=None if "points" not in prompts else point * 2, labels=prompts.get("labels"), multimask=multimask)
        ours = segment_from_prompts_scaled(model, emb, shape=crop.shape[:2], scale=2, boxes=prompts.get("box"),
                                           points=None if "points" not in prompts else point[None],
                                           point_labels=None if "points" not in prompts else [[1]],
                                           multimask_output=multimask)
        assert ours.masks.shape == (1, len(ref_masks), 100, 120)
        for k in range(len(ref_masks)):
            assert _agreement(ours.masks[0, k], _shrunk_torch(ref_masks[k], (100, 120))) >= 0.9999
        np.testing.assert_allclose(ours.scores[0], ref_scores, atol=1e-4)
    with pytest.raises(ValueError, match=r"not of the \(100, 120\) image enlarged 2 times \(200, 240\)"):
        segment_from_prompts_scaled(model, compute_embeddings(model, crop), shape=crop.shape[:2], scale=2, boxes=box)


def _scaled_objects():
    from usam_bioimageio.io.prompt_files import ObjectPrompt

    return [ObjectPrompt(box=np.array([20.0, 30.0, 60.0, 70.0])),
            ObjectPrompt(points=np.array([[150.0, 150.0]]), point_labels=np.array([1])),
            ObjectPrompt(box=np.array([40.0, 40.0, 90.0, 90.0])),  # drawn over the first where they overlap
            ObjectPrompt(points=np.array([[100.0, 30.0], [110.0, 60.0]]), point_labels=np.array([1, 0]))]


def test_tiled_prompts_at_a_pixel_scale(model, dsb_image):
    """label_objects_scaled on tiles of the enlarged image (each object from its tile, only the pixels it reaches
    shrunk back) equals the labels of segment_from_prompts_scaled's full masks, later objects on top; at scale 1 it
    is label_objects_tiled."""
    from usam_bioimageio.embeddings.compute import compute_image_embeddings
    from usam_bioimageio.io.overlay import masks_to_labels
    from usam_bioimageio.prompting.scaled import label_objects_scaled, segment_from_prompts_scaled
    from usam_bioimageio.prompting.tiled import label_objects_tiled
    from usam_bioimageio.runtime.pixel_scale import scale_image

    crop = dsb_image[:200, :180]  # 400 x 360 at scale 2: 3 x 2 tiles of 192 (+ halo 32)
    tiled = compute_image_embeddings(model, scale_image(crop, 2), tile_shape="auto", progress=False)
    assert len(tiled) == 6
    objects = _scaled_objects()
    labels = label_objects_scaled(model, tiled, objects, shape=crop.shape[:2], scale=2, batch_size=1)
    masks = []
    for o in objects:
        r = segment_from_prompts_scaled(model, tiled, shape=crop.shape[:2], scale=2, boxes=o.box,
                                        points=None if o.points is None else o.points[None],
                                        point_labels=None if o.points is None else o.point_labels[None])
        masks.append(r.masks[0, 0])
    assert np.array_equal(labels, masks_to_labels(np.stack(masks)))
    assert len(np.unique(labels)) > 2
    with pytest.raises(ValueError, match="object 1 has a mask prompt .* cannot be moved to another pixel scale"):
        label_objects_scaled(model, tiled, [objects[0], dataclasses.replace(objects[2], mask=np.zeros((64, 64)))],
                             shape=crop.shape[:2], scale=2)
    native = compute_tiled_embeddings(model, dsb_image, **TILING, progress=False)
    assert np.array_equal(label_objects_scaled(model, native, objects, shape=dsb_image.shape[:2], scale=1),
                          label_objects_tiled(model, native, objects))


def test_cli_segment_at_a_pixel_scale(model, family, dsb_image, tmp_path, capsys):
    """`usam segment --tile-shape auto` of a model trained at pixel scale 2 prompts the image enlarged 2x, tiled at
    the model's size, each mask shrunk back: the API's labels at scale 2 (as `--scale 2`); `--scale 1` prompts the
    image as it is; refusals: a bad scale, --scale or the model's scale with --embeddings, --scale or --tile-shape
    with --volume, --halo without --tile-shape (nothing is written)."""
    import json

    import tifffile

    from usam_bioimageio.cli.main import main
    from usam_bioimageio.embeddings.compute import compute_image_embeddings
    from usam_bioimageio.prompting.predict import label_objects
    from usam_bioimageio.prompting.scaled import label_objects_scaled
    from usam_bioimageio.runtime.pixel_scale import scale_image

    crop = dsb_image[:200, :180]
    tifffile.imwrite(tmp_path / "img.tif", crop)
    objects = _scaled_objects()
    (tmp_path / "p.json").write_text(json.dumps({"objects": [
        {"box": o.box.tolist()} if o.box is not None else
        {"points": o.points.tolist(), "labels": o.point_labels.tolist()} for o in objects]}))
    common = ["segment", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--prompts",
              str(tmp_path / "p.json"), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "labels.tif"), "--tile-shape", "auto"]) == 0
    tiled = compute_image_embeddings(model, scale_image(crop, 2), tile_shape="auto", progress=False)
    expected = label_objects_scaled(model, tiled, objects, shape=crop.shape[:2], scale=2)
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == crop.shape[:2] and np.array_equal(labels, expected)
    assert main([*common, "--out", str(tmp_path / "explicit.tif"), "--tile-shape", "auto", "--scale", "2"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "explicit.tif"), labels)
    assert main([*common, "--out", str(tmp_path / "one.tif"), "--tile-shape", "auto", "--scale", "1"]) == 0
    one = tifffile.imread(tmp_path / "one.tif")  # 200 x 180 fits the input: untiled
    assert np.array_equal(one, label_objects(model, compute_embeddings(model, crop), objects))
    assert not np.array_equal(one, labels)
    assert main(["embed", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "e.npz"), "--quiet"]) == 0
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([crop] * 2))
    capsys.readouterr()
    refused = _REFUSED
    for extra, code, message in (
            (["--scale", "0"], 2, "--scale: scale must be > 0 and at most 8, got 0"),
            (["--scale", "2", "--embeddings", str(tmp_path / "e.npz")], 2,
             "--scale encodes the resized image; do not give --embeddings with it"),
            (["--embeddings", str(tmp_path / "e.npz")], 2, refused.format("embeddings (of the image as it is)")),
            (["--halo", "8", "8"], 2, "--halo needs --tile-shape"),
            (["--tile-shape", "auto", "--embeddings", str(tmp_path / "e.npz")], 2,
             "--tile-shape and --halo are read from the embedding cache; do not give them with --embeddings"),
            (["--volume", "--scale", "2"], 2, "--scale is for 2D images; --volume segments a stack at its own scale")):
        assert main([*common, "--out", str(tmp_path / "never.tif"), *extra]) == code, extra
        assert capsys.readouterr().err.strip() == f"usam segment: error: {message}"
    (tmp_path / "zp.json").write_text(json.dumps({"objects": [{"box": [20, 30, 60, 70], "z": 0}]}))
    assert main([*common[:4], str(tmp_path / "stack.tif"), "--prompts", str(tmp_path / "zp.json"), "--volume",
                 "--quiet", "--out", str(tmp_path / "never.tif")]) == 2
    assert capsys.readouterr().err.strip() == f"usam segment: error: {refused.format('a stack (3D segmentation)')}"
    assert not (tmp_path / "never.tif").exists()


def test_interactive_evaluation_at_a_pixel_scale(model, dsb_image):
    """interactive_segmentation(scale=2) on tiles of the enlarged image: each round's masks are
    segment_from_prompts_scaled's of that round's prompts (in the image's pixels), scored at the image's size."""
    from usam_bioimageio.embeddings.compute import compute_image_embeddings
    from usam_bioimageio.evaluation.interactive import _label_image, interactive_segmentation
    from usam_bioimageio.prompting.scaled import segment_from_prompts_scaled
    from usam_bioimageio.runtime.pixel_scale import scale_image

    crop = dsb_image[:200, :180]
    gt = np.zeros(crop.shape[:2], np.uint32)
    gt[20:60, 30:70], gt[120:170, 100:140] = 1, 2
    tiled = compute_image_embeddings(model, scale_image(crop, 2), tile_shape="auto", progress=False)
    rounds = interactive_segmentation(model, crop, gt, start="point", n_iterations=2, embeddings=tiled, scale=2)
    for k, r in enumerate(rounds):
        res = segment_from_prompts_scaled(model, tiled, shape=gt.shape, scale=2, points=r.points,
                                          point_labels=r.point_labels, multimask_output=k == 0)
        best = res.masks[np.arange(2), np.argmax(res.scores, axis=1)]
        assert np.array_equal(r.labels, _label_image(best, gt.shape))
    assert rounds[1].points.shape == (2, 3, 2)  # the start + one positive and one negative correction


def test_amg_masks_are_the_decoders(model, dsb_setup, dsb_image, dsb_tiled):
    """AMG's point grid in the 256 frame: each record is the multimask output of its point, upscaled from 64 x 64."""
    from usam_bioimageio.automatic.amg.generator import AmgParameters, automatic_mask_generation, generate_masks
    from usam_bioimageio.prompting.predict import segment_from_prompts

    emb = dsb_setup[1]
    params = AmgParameters(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    records = generate_masks(model, dsb_image, embeddings=emb, params=params)
    assert records and all(r["segmentation"].shape == dsb_image.shape[:2] for r in records)
    for r in records[:5]:
        res = segment_from_prompts(model, emb, points=np.array(r["point_coords"]), point_labels=[1],
                                   multimask_output=True)
        assert max(_agreement(r["segmentation"], m) for m in res.masks[0]) >= 0.9999
    labels = automatic_mask_generation(model, dsb_image, embeddings=emb, params=AmgParameters(points_per_side=6))
    assert labels.shape == dsb_image.shape[:2]
    assert automatic_mask_generation(model, dsb_image, embeddings=dsb_tiled,
                                     params=AmgParameters(points_per_side=4)).shape == dsb_image.shape[:2]


# --------------------------------------------------------------------------------------------------------------
# caches and mismatched sizes
# --------------------------------------------------------------------------------------------------------------


def test_cache_round_trip_and_another_size_is_refused(model, dsb_image, dsb_tiled, tmp_path):
    from usam_bioimageio.embeddings.cache import EmbeddingCache, load_cache

    path = tmp_path / "c.zarr"
    cached = cached_embeddings(model, dsb_image, path, **TILING, progress=False)
    direct = dsb_tiled
    assert EmbeddingCache.read(path).signature["image_size"] == SIZE
    for t in range(len(direct)):
        assert np.array_equal(cached[0].features[t], direct.features[t])
        assert np.array_equal(load_cache(path, model=model)[0].features[t], direct.features[t])
    # the same encoder identity but another input size: the size alone refuses the cache, naming it
    other = types.SimpleNamespace(encoder_identity=model.encoder_identity, image_size=1024, model_type="vit_t")
    with pytest.raises(CacheMismatchError, match=r"model input size: cache 256, now 1024") as err:
        cached_embeddings(other, dsb_image, path, **TILING, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(CacheMismatchError, match="input size 256; this model takes 1024"):
        load_cache(path, model=other)


def test_caches_without_a_size_are_1024(model, image, tmp_path):
    """Caches written before the size was recorded (no image_size in the signature) are of 1024 models."""
    import zarr

    from usam_bioimageio.embeddings.cache import ATTR, load_cache

    path = tmp_path / "old.zarr"
    cached_embeddings(model, image, path, progress=False)
    group = zarr.open_group(str(path), mode="a")
    meta = dict(group.attrs[ATTR])
    meta["signature"] = {k: v for k, v in meta["signature"].items() if k != "image_size"}
    group.attrs[ATTR] = meta
    with pytest.raises(CacheMismatchError, match=r"model input size: cache 1024, now 256"):
        cached_embeddings(model, image, path, progress=False)
    with pytest.raises(CacheMismatchError, match="input size 1024; this model takes 256"):
        load_cache(path, model=model)


def test_micro_sam_caches_and_1024_embeddings_are_refused(model, tmp_path):
    """micro-sam's caches (1024: features 64 x 64, no encoder identity) are refused by a 256 model, and so are
    embeddings of the wrong grid given directly."""
    import shutil
    from pathlib import Path

    from usam_bioimageio.automatic.ais.decoder import ais_maps
    from usam_bioimageio.embeddings.cache import load_cache
    from usam_bioimageio.prompting.predict import segment_from_prompts

    caches = Path(__file__).parent / "data" / "micro_sam_caches"
    for name in ("2d.zarr", "2d_tiled.zarr"):
        shutil.copytree(caches / name, tmp_path / name)
        with pytest.raises(CacheMismatchError, match="input size 1024 .*this model takes 256"):
            load_cache(tmp_path / name, model=model)
    foreign = Embeddings(np.zeros((1, 256, 64, 64), np.float32), (300, 500), "")
    for call in (lambda: segment_from_prompts(model, foreign, boxes=[0, 0, 10, 10]),
                 lambda: ais_maps(model, embeddings=foreign)):
        with pytest.raises(ValueError, match=r"model of input size 1024; .* takes input size 256") as err:
            call()
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# sizes: detection, the auto tiling, bad values
# --------------------------------------------------------------------------------------------------------------


def test_a_512_vit_checkpoint_tells_its_size(tmp_path):
    """A ViT's position embedding gives its size (no image_size key needed), and the exported geometry follows."""
    from usam_bioimageio.modeling import build_sam
    from usam_bioimageio.training.checkpoints import load_checkpoint

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_sam("vit_b", image_size=512).state_dict().items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    assert state["image_encoder.pos_embed"].shape == (1, 32, 32, 768)
    torch.save({"model_state": state}, tmp_path / "vit_b_512.pt")
    ckpt = load_checkpoint(tmp_path / "vit_b_512.pt")
    assert (ckpt.model_type, ckpt.image_size) == ("vit_b", 512)
    torch.save({"model_state": state, "image_size": 1024}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="records image size 1024, but its position embedding is for 512"):
        load_checkpoint(tmp_path / "bad.pt")


def test_auto_tiling():
    assert auto_tiling(1024) == ((768, 768), (128, 128))
    assert auto_tiling(256) == ((192, 192), (32, 32))
    assert auto_tiling(256, halo=(16, 64)) == ((224, 128), (16, 64))  # outer tiles stay 256 x 256
    assert resolve_tiling("auto", None, (256, 200), 256) == (None, None)  # fits the model's input: not tiled
    assert resolve_tiling("auto", None, (257, 200), 256) == ((192, 192), (32, 32))
    assert resolve_tiling([100, 100], [8, 8], (999, 999), 256) == ([100, 100], [8, 8])
    assert resolve_tiling(None, None, (999, 999), 256) == (None, None)  # the default: the whole image
    with pytest.raises(ValueError, match="halo must be below 128"):
        auto_tiling(256, halo=128)


def test_cli_auto_tiling(model, family, dsb_image, dsb_tiled, tmp_path, capsys):
    """`usam ais --tile-shape auto` tiles a 256 model's large image with tiles 192 + halo 32 (the API's result);
    `usam embed --tile-shape auto` records that tiling in the cache."""
    import tifffile

    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation
    from usam_bioimageio.cli.main import main
    from usam_bioimageio.embeddings.cache import EmbeddingCache

    tifffile.imwrite(tmp_path / "img.tif", dsb_image)
    assert main(["ais", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "labels.tif"), "--tile-shape", "auto", "--scale", "1", "--quiet"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "labels.tif"),
                          automatic_instance_segmentation(model, dsb_image, embeddings=dsb_tiled))
    tifffile.imwrite(tmp_path / "crop.tif", dsb_image[:300, :300])  # 2 x 2 tiles of 192 (+ halo 32)
    assert main(["embed", "--model", str(family), "--image", str(tmp_path / "crop.tif"), "--cache",
                 str(tmp_path / "c.zarr"), "--tile-shape", "auto", "--quiet"]) == 0
    meta = EmbeddingCache.read(tmp_path / "c.zarr").meta
    assert meta["tiling"] == {"shape": [300, 300], "tile_shape": [192, 192], "halo": [32, 32]}
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--model", str(family), "--image", str(tmp_path / "img.tif"), "--cache",
              str(tmp_path / "d.zarr"), "--tile-shape", "7"])
    assert exit_info.value.code == 2 and "give two integers Y X or 'auto'" in capsys.readouterr().err


def test_bad_sizes_are_one_line_errors(family, tmp_path, capsys):
    from usam_bioimageio.cli.main import main
    from usam_bioimageio.modeling import build_sam
    from usam_bioimageio.modeling.packaged import ImageEncoderModel
    from usam_bioimageio.prompting.inputs import build_decoder_inputs
    from usam_bioimageio.runtime.packages import load_package
    from usam_bioimageio.training.checkpoints import save_checkpoint

    for bad in (300, 2048, 256.0, "256", True):
        with pytest.raises(ValueError) as err:
            registry.check_image_size(bad)
        assert "\n" not in str(err.value) and "[256, 512, 1024]" in str(err.value)
    with pytest.raises(ValueError, match="image size 300 is not supported"):
        build_sam("vit_t", image_size=300)
    with pytest.raises(ValueError, match="image size 100 is not supported"):
        ImageEncoderModel("vit_t", image_size=100)
    with pytest.raises(ValueError, match=r"mask_inputs must be low-resolution logits of shape \(objects, 64, 64\) "
                                         r"for a model of input size 256, got \(1, 256, 256\)"):
        build_decoder_inputs((100, 100), mask_inputs=np.zeros((1, 256, 256)), image_size=SIZE)
    # an rdf recording an unsupported size; a family whose packages disagree
    mixed = tmp_path / "mixed"
    for kind in ("image_encoder", "prompt_decoder"):
        with zipfile.ZipFile(family / f"{kind}.zip") as zf:
            zf.extractall(mixed / kind)
    folder = mixed / "prompt_decoder"
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    rdf["config"]["usam"]["image_size"] = 300
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(PackageError, match=r"config.usam.image_size: image size 300 is not supported") as err:
        _ = load_package(folder).image_size
    assert "\n" not in str(err.value)
    rdf["config"]["usam"]["image_size"] = 512
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(PackageError, match=r"different input sizes \(image_encoder 256, prompt_decoder 512\)"):
        SamModel.load(mixed)
    rdf["config"]["usam"]["image_size"] = SIZE
    for scale, error in ((0, r"config.usam.pixel_scale: scale must be > 0"),
                         (3, r"different pixel scales \(image_encoder 2, prompt_decoder 3\)")):
        rdf["config"]["usam"]["pixel_scale"] = scale
        (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
        with pytest.raises(PackageError, match=error) as err:
            SamModel.load(mixed)
        assert "\n" not in str(err.value)
    # a checkpoint recording one: `usam export` fails with one line and exit status 1
    from usam_bioimageio.modeling import seeded_sam

    path = tmp_path / "bad_size.pt"
    save_checkpoint(path, sam_state=seeded_sam("vit_t", image_size=SIZE).state_dict(), image_size=SIZE)
    obj = torch.load(path, weights_only=True)
    obj["image_size"] = 300
    torch.save(obj, path)
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "never"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'image_size': image size 300 is not supported" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # ~5 min on 2 shared cores: every format of the four packages exported and gated
def test_every_format_is_gated_and_torchscript_equals_torch(tmp_path_factory, usam_cache, data_dir, checkpoint,
                                                            torch_sam, ais_state, dsb_image):
    from usam_exporters.writer import DEFAULT_FORMATS

    family = _export(tmp_path_factory, checkpoint, DEFAULT_FORMATS)
    for kind in ("image_encoder", "prompt_decoder", "ais", "ais_head"):
        kwargs = _rdf(family, kind)["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
        assert kwargs["image_size"] == SIZE, kind
    scripted = SamModel.load(family, weight_format="torchscript")
    _check_embeddings(scripted, torch_sam, real_images())
    emb = compute_embeddings(scripted, dsb_image)
    features = _torch_features(torch_sam, dsb_image)
    for kind in PROMPT_KINDS:
        _check_prompts(scripted, emb, torch_sam, features, dsb_image, kind)
    _check_end_to_end_ais(scripted, dsb_image, _torch_ais_maps(torch_sam, ais_state, dsb_image)[1])
