"""The generic package writer (usam_exporters.specs / usam_exporters.writer) on toy modules.

Every package written here is run through bioimageio.core.test_model for each weight format, which
takes a few seconds per package: the positive packages are built once per module.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

import bioimageio.core  # noqa: E402,F401  (the gate: missing is an error, never a skip)
import onnxruntime  # noqa: E402,F401
import torch  # noqa: E402

from toy_modules import NoisyConv, TinyConv, ToyPromptDecoder  # noqa: E402  (tests/ is on sys.path)

from usam_exporters.specs import (  # noqa: E402
    ANY,
    SAM_DOI,
    USAM_DOI,
    ArchitectureSpec,
    Batch,
    DataDependent,
    Index,
    Param,
    Ref,
    Space,
    TensorSpec,
    axis_to_v05,
    channel,
)
from usam_exporters.writer import PackageTestError, validate_package, write_package  # noqa: E402

TOY_FILE = Path(__file__).with_name("toy_modules.py")
FORMATS = ("torchscript", "onnx", "pytorch_state_dict")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    # nothing here needs the network or the user's cache
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path_factory.getbasetemp() / "bioimageio_cache"))


def _conv_specs(seed: int = 0, size=(12, 10)):
    rng = np.random.default_rng(seed)
    image = rng.random((1, 3) + tuple(size), dtype=np.float32)
    inputs = [
        TensorSpec(
            "image",
            "an RGB image",
            [Batch(), channel("r", "g", "b"), Space("y", ANY), Space("x", ANY)],
            data=image,
        )
    ]
    outputs = [
        TensorSpec(
            "prediction",
            "two maps of the image's size",
            [Batch(), channel("a", "b"), Space("y", Ref("image", "y")), Space("x", Ref("image", "x"))],
        )
    ]
    return inputs, outputs


def _write_conv(module, out: Path, **kw):
    torch.manual_seed(0)
    inputs, outputs = _conv_specs()
    kw.setdefault("architecture", ArchitectureSpec(callable=type(module).__name__, import_from="toy_modules"))
    return write_package(
        module=module,
        inputs=inputs,
        outputs=outputs,
        output_path=out,
        name="Tiny conv toy",
        description="A tiny convolutional network for testing the package writer.",
        authors=[{"name": "Test Author", "affiliation": "Nowhere"}],
        tags=["test", "toy"],
        **kw,
    )


C, E = 8, 4  # embedding channels and size of the toy decoder
M = 4 * E  # mask size


def _decoder_specs(n_objects: int = 2, n_points: int = 3):
    rng = np.random.default_rng(1)
    o = Ref("point_coords", "o")
    inputs = [
        TensorSpec(
            "embeddings",
            "image embeddings",
            [Batch(1), channel(*[f"e{i}" for i in range(C)]), Space("y", E), Space("x", E)],
            data=rng.standard_normal((1, C, E, E)).astype(np.float32),
        ),
        TensorSpec(
            "point_coords",
            "point prompts (x, y) per object",
            [Index("o", ANY, "objects"), Index("p", ANY, "points"), channel("x", "y")],
            data=(rng.random((n_objects, n_points, 2)) * 64).astype(np.float32),
        ),
        TensorSpec(
            "point_labels",
            "point labels",
            [Index("o", o), Index("p", Ref("point_coords", "p"))],
            data=rng.choice([0.0, 1.0], (n_objects, n_points)).astype(np.float32) + 0.5,
        ),
        TensorSpec(
            "mask_input",
            "mask prompt (logits)",
            [Index("o", o), channel("mask"), Space("y", M), Space("x", M)],
            data=rng.standard_normal((n_objects, 1, M, M)).astype(np.float32),
        ),
        TensorSpec(
            "has_mask_input", "1 if mask_input is used", [Index("o", o), channel("flag")],
            data=np.ones((n_objects, 1), np.float32),
        ),
        TensorSpec("orig_im_size", "image height and width", [channel("h", "w")], data=np.array([40, 50], np.float32)),
    ]
    outputs = [
        TensorSpec("iou_predictions", "predicted IoU per mask", [Index("o", o), channel("m0", "m1", "m2", "m3")]),
        TensorSpec(
            "low_res_masks",
            "mask logits",
            [Index("o", o), channel("m0", "m1", "m2", "m3"), Space("y", M), Space("x", M)],
        ),
    ]
    return inputs, outputs


@pytest.fixture(scope="module")
def conv_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "tiny_conv.zip"
    torch.manual_seed(0)
    path = _write_conv(
        TinyConv(),
        out,
        config={"model_type": "toy", "numbers": (1, 2), "mean": np.float32(0.5)},
        documentation="# Tiny conv\n\nA toy.\n",
        sample_tensors=True,
    )
    return path


DECODER_SUMMARIES = []


@pytest.fixture(scope="module")
def decoder_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder") / "toy_decoder.zip"
    torch.manual_seed(0)
    inputs, outputs = _decoder_specs()
    return write_package(
        on_summary=DECODER_SUMMARIES.append,
        module=ToyPromptDecoder(embed_dim=C, embed_size=E),
        inputs=inputs,
        outputs=outputs,
        output_path=out,
        name="Toy prompt decoder",
        description="Mirrors the inputs and outputs of SAM's prompt decoder.",
        authors=["Test Author"],
        # the architecture from a file that goes into the package
        architecture=ArchitectureSpec(
            callable="ToyPromptDecoder", source=TOY_FILE, kwargs={"embed_dim": C, "embed_size": E}
        ),
        config={"model_type": "toy", "part": "decoder"},
    )


def _only_entries(directory: Path):
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------
# packages that pass
# --------------------------------------------------------------------------------------------------


def test_conv_package_written_and_loads(conv_package: Path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    assert conv_package.is_file()
    assert _only_entries(conv_package.parent) == [conv_package.name]  # no temp files left
    descr = load_description(conv_package, perform_io_checks=True)
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.format()
    assert set(descr.weights.available_formats) == set(FORMATS)
    assert descr.weights.pytorch_state_dict.parent is None
    assert descr.weights.torchscript.parent == "pytorch_state_dict"
    assert descr.weights.onnx.parent == "pytorch_state_dict"
    assert descr.weights.onnx.opset_version == 17
    assert descr.config.model_extra["usam"] == {"model_type": "toy", "numbers": [1, 2], "mean": 0.5}
    assert {str(c.doi) for c in descr.cite} >= {USAM_DOI, SAM_DOI}
    assert str(descr.license) == "MIT"
    assert descr.covers and descr.inputs[0].sample_tensor is not None
    (y, x) = descr.inputs[0].axes[2:]
    assert isinstance(y.size, v0_5.ParameterizedSize) and (y.size.min, y.size.step) == (1, 1)
    assert isinstance(descr.outputs[0].axes[3].size, v0_5.SizeReference)


def test_conv_package_contents(conv_package: Path):
    with zipfile.ZipFile(conv_package) as z:
        names = set(z.namelist())
        readme = z.read("README.md").decode()
        cover = z.read("cover.png")
    assert {"rdf.yaml", "README.md", "cover.png", "weights.pt", "weights_torchscript.pt", "weights.onnx"} <= names
    assert {"test_input_image.npy", "test_output_prediction.npy"} <= names
    assert readme.startswith("# Tiny conv")
    assert "\n# Validation\n" in readme
    assert "Apache-2.0" in readme and USAM_DOI in readme and SAM_DOI in readme
    assert cover.startswith(b"\x89PNG")


def test_onnx_ir_version_and_dynamic_axes(conv_package: Path):
    import onnx

    with zipfile.ZipFile(conv_package) as z:
        model = onnx.load_model_from_string(z.read("weights.onnx"))
    assert model.ir_version <= 8
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "image_y", "image_x"]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 2, "image_y", "image_x"]


def test_validate_package(conv_package: Path):
    torch.use_deterministic_algorithms(False)
    summary = validate_package(conv_package, allow_code=True)  # toy_modules: our test code, not modeling's
    assert summary == {f: "passed" for f in FORMATS}, summary.errors
    assert summary.passed and summary.status == "passed" and not summary.errors
    # bioimageio's enable_determinism is undone afterwards
    assert not torch.are_deterministic_algorithms_enabled()


def test_validate_broken_package(conv_package: Path, tmp_path: Path):
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(conv_package) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-4] + b"\0\0\0\0" if item.filename == "weights.onnx" else data)
    summary = validate_package(broken, allow_code=True)
    assert summary == {"description": "failed"} and not summary.passed
    assert any("weights.onnx" in e or "sha256" in e.lower() for e in summary.errors), summary.errors


def test_decoder_package_multi_input(decoder_package: Path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    descr = load_description(decoder_package, perform_io_checks=True)
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.format()
    assert [str(t.id) for t in descr.inputs] == [
        "embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"
    ]
    assert [str(t.id) for t in descr.outputs] == ["iou_predictions", "low_res_masks"]
    # no batch axis where SAM's decoder has none; objects and points are index axes
    assert [a.type for a in descr.inputs[1].axes] == ["index", "index", "channel"]
    assert [a.type for a in descr.inputs[5].axes] == ["channel"]
    for t in descr.outputs:
        o = t.axes[0]
        assert isinstance(o, v0_5.IndexOutputAxis)
        assert (str(o.size.tensor_id), str(o.size.axis_id)) == ("point_coords", "o")
    p = descr.inputs[2].axes[1]
    assert (str(p.size.tensor_id), str(p.size.axis_id)) == ("point_coords", "p")
    (summary,) = DECODER_SUMMARIES
    assert summary.passed and summary == {f: "passed" for f in FORMATS}
    arch = descr.weights.pytorch_state_dict.architecture
    assert isinstance(arch, v0_5.ArchitectureFromFileDescr) and arch.kwargs == {"embed_dim": C, "embed_size": E}
    with zipfile.ZipFile(decoder_package) as z:
        assert "toy_modules.py" in z.namelist()
        assert "# Validation" in z.read("README.md").decode()


def test_onnx_external_data(tmp_path: Path):
    out = _write_conv(TinyConv(), tmp_path / "ext.zip", formats=("onnx",), onnx_external_data=True, architecture=None)
    with zipfile.ZipFile(out) as z:
        assert {"weights.onnx", "weights.onnx.data"} <= set(z.namelist())
    assert _only_entries(tmp_path) == ["ext.zip"]


# --------------------------------------------------------------------------------------------------
# packages that are refused
# --------------------------------------------------------------------------------------------------


def test_refuses_deviating_torchscript(tmp_path: Path):
    module = TinyConv()
    other = TinyConv()  # different random weights
    inputs, _ = _conv_specs()
    scripted = torch.jit.trace(other.eval(), (torch.from_numpy(inputs[0].data),))
    out = tmp_path / "bad.zip"
    with pytest.raises(PackageTestError) as err:
        _write_conv(module, out, torchscript=scripted)
    summary = err.value.summary
    assert summary == {"torchscript": "failed", "onnx": "passed", "pytorch_state_dict": "passed"}
    assert not summary.passed and any("[torchscript]" in e for e in summary.errors)
    assert "torchscript" in str(err.value)
    assert not out.exists()
    assert _only_entries(tmp_path) == []


def test_given_test_outputs_are_used_and_gated(tmp_path: Path, monkeypatch):
    """Outputs given with data (the caller's forward pass) are the test outputs: the module is not run again,
    and the gate refuses given outputs that the weights do not reproduce."""
    import usam_exporters.writer as package

    module = TinyConv().eval()
    inputs, outputs = _conv_specs()
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs[0].data)).numpy()

    def no_rerun(*args, **kwargs):
        raise AssertionError("the module was run again")

    monkeypatch.setattr(package, "run_module", no_rerun)
    kw = dict(module=module, inputs=inputs, name="Tiny conv toy", description="given outputs", formats=("onnx",),
              authors=[{"name": "Test Author", "affiliation": "Nowhere"}],
              architecture=ArchitectureSpec(callable="TinyConv", import_from="toy_modules"))
    outputs[0].data = expected
    out = write_package(outputs=outputs, output_path=tmp_path / "ok.zip", **kw)
    with zipfile.ZipFile(out) as zf:
        name = next(n for n in zf.namelist() if "test_output" in n and n.endswith(".npy"))
        with zf.open(name) as f:
            np.testing.assert_array_equal(np.load(f), expected)
    outputs[0].data = expected + 0.5
    with pytest.raises(PackageTestError):
        write_package(outputs=outputs, output_path=tmp_path / "bad.zip", **kw)
    assert not (tmp_path / "bad.zip").exists()


def test_refuses_nondeterministic_module(tmp_path: Path):
    out = tmp_path / "noisy.zip"
    with pytest.raises(PackageTestError) as err:
        _write_conv(NoisyConv(), out, formats=("pytorch_state_dict", "onnx"))
    assert err.value.summary == {"pytorch_state_dict": "failed", "onnx": "failed"}
    assert not out.exists()
    assert _only_entries(tmp_path) == []


def test_refuses_all_zero_test_tensor(tmp_path: Path):
    inputs, outputs = _decoder_specs()
    inputs[3].data = np.zeros_like(inputs[3].data)  # an empty mask prompt is refused by bioimageio.spec
    with pytest.raises(ValueError, match="mask_input"):
        write_package(
            module=ToyPromptDecoder(embed_dim=C, embed_size=E),
            inputs=inputs,
            outputs=outputs,
            output_path=tmp_path / "zero.zip",
            name="Toy prompt decoder",
            description="toy",
            authors=["Test Author"],
            formats=("onnx",),
        )
    assert _only_entries(tmp_path) == []


class _IgnoresSecondInput(torch.nn.Module):
    def forward(self, a, b):
        return a * 2.0


def test_onnx_dropping_an_unused_input_is_an_error(tmp_path: Path):
    spec = lambda n: TensorSpec(n, n, [Index("i", ANY)], data=np.arange(1, 4, dtype=np.float32))  # noqa: E731
    with pytest.raises(ValueError, match="does not use|must be used"):
        write_package(
            module=_IgnoresSecondInput(),
            inputs=[spec("a"), spec("b")],
            outputs=[TensorSpec("c", "c", [Index("i", Ref("a", "i"))])],
            output_path=tmp_path / "unused.zip",
            name="Unused input",
            description="toy",
            authors=["Test Author"],
            formats=("onnx",),
        )
    assert _only_entries(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# tensor and axis descriptions (no export)
# --------------------------------------------------------------------------------------------------


def test_tensor_spec_checks():
    axes = [Batch(1), channel("r", "g", "b"), Space("y", Param(16, 8)), Space("x", 32)]
    TensorSpec("image", "", axes, data=np.ones((1, 3, 24, 32), np.float32))
    with pytest.raises(ValueError, match="channel"):
        TensorSpec("image", "", axes, data=np.ones((1, 2, 24, 32), np.float32))
    with pytest.raises(ValueError, match="16 \\+ n\\*8"):
        TensorSpec("image", "", axes, data=np.ones((1, 3, 20, 32), np.float32))
    with pytest.raises(ValueError, match="expected 32"):
        TensorSpec("image", "", axes, data=np.ones((1, 3, 24, 31), np.float32))
    with pytest.raises(ValueError, match="axes"):
        TensorSpec("image", "", axes, data=np.ones((3, 24, 32), np.float32))
    with pytest.raises(ValueError, match="lower case"):
        TensorSpec("Image", "", axes)
    with pytest.raises(ValueError, match="batch"):
        Batch(2)


def test_dynamic_dims_share_names_through_references():
    coords = TensorSpec("point_coords", "", [Index("o", ANY), Index("p", ANY), channel("x", "y")])
    labels = TensorSpec("point_labels", "", [Index("o", Ref("point_coords", "o")), Index("p", Ref("point_coords", "p"))])
    image = TensorSpec("image", "", [Batch(), channel("r", "g", "b"), Space("y", ANY), Space("x", 64)])
    assert coords.dynamic_dims == {0: "point_coords_o", 1: "point_coords_p"}
    assert labels.dynamic_dims == {0: "point_coords_o", 1: "point_coords_p"}
    assert image.dynamic_dims == {0: "batch", 2: "image_y"}


def test_axis_conversion_rules():
    from bioimageio.spec.model import v0_5

    assert isinstance(axis_to_v05(Index("o", ANY), output=False).size, v0_5.ParameterizedSize)
    assert isinstance(axis_to_v05(Index("o", DataDependent()), output=True).size, v0_5.DataDependentSize)
    with pytest.raises(ValueError, match="inputs only"):
        axis_to_v05(Space("y", ANY), output=True)
    with pytest.raises(ValueError, match="outputs only"):
        axis_to_v05(Index("o", DataDependent()), output=False)
    assert axis_to_v05(Batch(), output=False).id == "batch"


def test_write_package_argument_checks(tmp_path: Path):
    inputs, outputs = _conv_specs()
    common = dict(
        module=TinyConv(), inputs=inputs, outputs=outputs, name="Tiny conv toy", description="t", authors=["A B"]
    )
    with pytest.raises(ValueError, match=".zip"):
        write_package(output_path=tmp_path / "x.tar", formats=("onnx",), **common)
    with pytest.raises(ValueError, match="architecture"):
        write_package(output_path=tmp_path / "x.zip", **common)
    with pytest.raises(ValueError, match="formats"):
        write_package(output_path=tmp_path / "x.zip", formats=("keras_hdf5",), **common)
    assert _only_entries(tmp_path) == []
