"""Reduced-precision image encoders (usam_exporters.precision, issue 16): an int8 variant of a family's encoder,
gated by bioimageio.core, listed in family.yaml, taken by the family's decoders, kept apart by caches; an fp16
variant whose ViT runs in float16 around the float32 preprocessing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from usam_bioimageio.embeddings.compute import cached_embeddings, compute_embeddings
from usam_bioimageio.errors import CacheMismatchError, PackageError, UsageError
from usam_bioimageio.prompting.predict import segment_from_prompts
from usam_bioimageio.runtime.model import SamModel


@pytest.fixture(scope="module")
def int8_family(vit_t_family, tmp_path_factory):
    from usam_exporters.precision import write_encoder_variant

    folder = tmp_path_factory.mktemp("int8") / "family"
    shutil.copytree(vit_t_family[0], folder)
    path = write_encoder_variant(folder, "int8")  # bioimageio.core's test_model passed, or it raises
    assert path == folder / "image_encoder_int8.zip"
    return folder


def test_variant_is_listed_and_taken_by_the_decoders(int8_family, model, image, embeddings):
    manifest = yaml.safe_load((int8_family / "family.yaml").read_text())
    assert manifest["variants"]["image_encoder"]["int8"]["file"] == "image_encoder_int8.zip"
    int8 = SamModel.load(int8_family, encoder_precision="int8")
    encoder = int8.family.get("image_encoder")
    assert encoder.precision == "int8" and encoder.weight_formats == ("onnx",)
    assert int8.encoder_identity == f"{model.encoder_identity}+int8"
    emb = compute_embeddings(int8, image)
    err = np.abs(emb.features - embeddings.features)
    assert 0 < err.max() and err.mean() < 0.1 * np.abs(embeddings.features).mean()  # close, not equal
    box = np.array([60.0, 60.0, 140.0, 150.0])
    masks = segment_from_prompts(int8, emb, boxes=box).masks  # the family's decoder takes int8 embeddings
    assert masks.shape == (1, 1) + image.shape
    # the fp32 family is unchanged by default
    assert SamModel.load(int8_family).encoder_identity == model.encoder_identity


def test_caches_keep_the_precisions_apart(int8_family, model, image, tmp_path):
    int8 = SamModel.load(int8_family, encoder_precision="int8")
    cache = tmp_path / "int8.zarr"
    assert cached_embeddings(int8, image, cache, progress=False)[0].encoder.endswith("+int8")
    with pytest.raises(CacheMismatchError):
        cached_embeddings(model, image, cache, progress=False)  # the fp32 encoder's are other embeddings


def test_variant_errors(int8_family, vit_t_family):
    with pytest.raises(PackageError, match="no fp16 image encoder"):
        SamModel.load(int8_family, encoder_precision="fp16")
    with pytest.raises(PackageError, match="no int8 image encoder"):
        SamModel.load(vit_t_family[0], encoder_precision="int8")
    with pytest.raises(UsageError, match="ONNX weights only"):
        SamModel.load(int8_family, encoder_precision="int8", weight_format="torchscript")
    with pytest.raises(UsageError, match="encoder precision"):
        SamModel.load(int8_family, encoder_precision="int4")


def test_fp16_variant_runs_the_vit_in_float16(vit_t_family, model, image, embeddings, tmp_path):
    import onnx
    from usam_exporters.precision import write_encoder_variant

    folder = tmp_path / "family"
    shutil.copytree(vit_t_family[0], folder)
    write_encoder_variant(folder, "fp16")  # bioimageio.core's test_model passed, or it raises
    fp16 = SamModel.load(folder, encoder_precision="fp16")
    graph = onnx.load(str(fp16.family.get("image_encoder").weights_path("onnx"))).graph
    elem = onnx.TensorProto
    assert [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]] == [elem.FLOAT, elem.FLOAT]
    vit = {i.name: i.data_type for i in graph.initializer if i.name.startswith("image_encoder.")}
    assert vit and set(vit.values()) == {elem.FLOAT16}  # every ViT weight
    emb = compute_embeddings(fp16, image)
    err = np.abs(emb.features - embeddings.features)
    # float16 rounding (~1e-3 relative), not the NaNs of a float16 preprocessing
    assert np.isfinite(emb.features).all() and 0 < err.max() < 0.05 * np.abs(embeddings.features).max()
