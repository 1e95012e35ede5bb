"""Preprocessing against µSAM + segment_anything: the in-graph encoder preprocessing (torch, ONNX) and the
numpy runtime geometry (channels, prompts, mask upscaling).

Exactness claims are asserted with ``array_equal`` / a max abs diff of 0: the resized uint8 image against
``ResizeLongestSide.apply_image`` (Pillow), the encoder input against the tensor ``SamPredictor.set_image``
hands to the image encoder.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from reference import segment_anything, usam_to_image
from usam_bioimageio import registry
from usam_bioimageio.runtime import geometry as rt
from usam_bioimageio.modeling import preprocess as pp

# torch >= 2.10 deprecates torch.jit.script; the bioimage.io torchscript weights still need it
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

sa = segment_anything()
from segment_anything.modeling import Sam  # noqa: E402  (after the stand-ins are on the path)
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

RESIZE = ResizeLongestSide(registry.IMAGE_SIZE)


# ---------------------------------------------------------------------------------------------------------
# references


class _CapturingEncoder:
    img_size = registry.IMAGE_SIZE

    def __call__(self, x):
        self.input = x
        return x


def _fake_sam():
    """The parts of ``Sam`` that ``SamPredictor.set_image`` uses, with Sam's own ``preprocess``."""
    model = SimpleNamespace(
        image_format="RGB",
        image_encoder=_CapturingEncoder(),
        device=torch.device("cpu"),
        # as Sam.__init__ registers them
        pixel_mean=torch.Tensor(list(registry.PIXEL_MEAN)).view(-1, 1, 1),
        pixel_std=torch.Tensor(list(registry.PIXEL_STD)).view(-1, 1, 1),
    )
    model.preprocess = lambda x: Sam.preprocess(model, x)
    return model


def reference_encoder_input(image: np.ndarray) -> torch.Tensor:
    """What µSAM's ``SamPredictor.set_image(_to_image(image))`` passes to the image encoder."""
    model = _fake_sam()
    predictor = sa.SamPredictor(model)
    predictor.set_image(usam_to_image(image))
    return model.image_encoder.input


def reference_postprocess_masks(low_res: np.ndarray, original_shape) -> np.ndarray:
    holder = SimpleNamespace(image_encoder=SimpleNamespace(img_size=registry.IMAGE_SIZE))
    input_size = RESIZE.get_preprocess_shape(original_shape[0], original_shape[1], registry.IMAGE_SIZE)
    out = Sam.postprocess_masks(holder, torch.from_numpy(low_res), input_size, tuple(original_shape[:2]))
    return out.numpy()


def _chw(image: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) raw image -> (1, 3, H, W) float32, channels mapped as µSAM (the runtime's job)."""
    return torch.from_numpy(rt.to_rgb(image).astype(np.float32)).permute(2, 0, 1)[None].contiguous()


def _t(v: float) -> torch.Tensor:
    return torch.tensor([float(v)], dtype=torch.float64)


def _pillow(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return np.array(Image.fromarray(img).resize((out_w, out_h), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------------------
# data


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (../shared/data beside the checkout)")
    return path


def _tif(path: Path, **kwargs) -> np.ndarray:
    import tifffile

    return tifffile.imread(_need(path), **kwargs)


def _dsb(pred) -> np.ndarray:
    import imageio.v3 as iio

    index = json.loads(_need(DATA / "dsb2018" / "index.json").read_text())
    entry = next(e for e in index if pred(e))
    return iio.imread(DATA / "dsb2018" / "images" / f"{entry['id']}.png")


REAL_IMAGES = {
    "stardist_256_uint8": lambda: _tif(DATA / "stardist_samples" / "tests_img2d.tif"),
    "stardist_512_uint16": lambda: _tif(DATA / "stardist_samples" / "img2d.tif"),
    "dsb_rgb_256x320": lambda: _dsb(lambda e: len(e["shape"]) == 3),
    "dsb_gray_520x696": lambda: _dsb(lambda e: e["shape"] == [520, 696]),
    "isbi_em_crop_512x383": lambda: _tif(DATA / "isbi2012_em" / "train_volume.tif", key=0)[:, 64:447],
}

# (H, W): edge cases, up / down scaling, tall images (vertical pass first in Pillow >= 13), odd sizes
SIZES = [(1, 1), (7, 1500), (1500, 1100), (2048, 900), (1024, 1024), (300, 1024), (1100, 300), (333, 517)]


def _synthetic(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish float image with a non-trivial range (negative values, large offset)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 1000.0 * np.sin(yy / 37.0) * np.cos(xx / 23.0) - 250.0
    return (base[..., None] + rng.normal(0, 300, (h, w, 3))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# in-graph preprocessing (torch)


@pytest.mark.parametrize("name", sorted(REAL_IMAGES))
def test_usam_to_uint8_matches_usam(name):
    image = REAL_IMAGES[name]()
    ours = pp.usam_to_uint8(_chw(image))[0].permute(1, 2, 0).numpy()
    ref = usam_to_image(image)
    assert ours.dtype == np.float32 and np.array_equal(ours, ref.astype(np.float32))


def test_usam_to_uint8_synthetic_and_constant():
    for image in [_synthetic(61, 45), np.full((5, 7), 3.5, np.float32), np.zeros((3, 4, 3), np.uint16)]:
        ours = pp.usam_to_uint8(_chw(image))[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, usam_to_image(image).astype(np.float32))


def test_longest_side_shape_matches_sam():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 2048), (2048, 1), (1024, 1024), (1023, 1025), (3, 1535), (3, 1536)]
    sizes += [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(300)]
    h = torch.tensor([s[0] for s in sizes], dtype=torch.float64)
    w = torch.tensor([s[1] for s in sizes], dtype=torch.float64)
    th, tw = pp.longest_side_shape(h, w)
    for i, (hh, ww) in enumerate(sizes):
        expected = RESIZE.get_preprocess_shape(hh, ww, registry.IMAGE_SIZE)
        assert (int(th[i]), int(tw[i])) == expected, (hh, ww)
        assert rt.longest_side_shape(hh, ww) == expected, (hh, ww)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pil_bilinear_resize_exact(size):
    h, w = size
    img = np.random.default_rng(h * 7919 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    new_h, new_w = RESIZE.get_preprocess_shape(h, w, registry.IMAGE_SIZE)
    ref = RESIZE.apply_image(img)
    assert ref.shape == (new_h, new_w, 3)
    out = pp.pil_bilinear_resize(torch.from_numpy(img).permute(2, 0, 1)[None], _t(new_h), _t(new_w))
    out = out[0].permute(1, 2, 0).numpy()
    assert out.shape == (registry.IMAGE_SIZE, registry.IMAGE_SIZE, 3)
    assert np.array_equal(out[:new_h, :new_w], ref.astype(np.float32))
    assert not out[new_h:].any() and not out[:, new_w:].any()


def test_pil_bilinear_resize_any_sizes_and_pass_order():
    """General out sizes (not only SAM's), both pass orders, single-channel images, against Pillow."""
    rng = np.random.default_rng(1)
    cases = [(100, 64, 99, 65), (1024, 300, 1021, 299), (1024, 300, 1022, 299), (1024, 300, 1023, 299)]
    cases += [(40, 16, 23, 8), (40, 16, 24, 8), (3, 3, 1, 1), (1, 9, 5, 2), (17, 1, 3, 4)]
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        cases.append((h, w, int(rng.integers(1, 120)), int(rng.integers(1, 120))))
    n_vertical_first = 0
    for h, w, out_h, out_w in cases:
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        x = torch.from_numpy(img)[None, None]
        out = pp.pil_bilinear_resize(x, _t(out_h), _t(out_w), out_h + 2, out_w + 3)[0, 0].numpy()
        assert np.array_equal(out[:out_h, :out_w], _pillow(img, out_h, out_w)), (h, w, out_h, out_w)
        assert not out[out_h:].any() and not out[:, out_w:].any()
        # Pillow <= 12 order: horizontal pass, then vertical (two Pillow calls reproduce it)
        old = pp.pil_bilinear_resize(x, _t(out_h), _t(out_w), out_h, out_w, pillow13_pass_order=False)[0, 0]
        horizontal_first = _pillow(_pillow(img, h, out_w), out_h, out_w)
        assert np.array_equal(old.numpy(), horizontal_first)
        n_vertical_first += bool(pp.vertical_pass_first(_t(h), _t(w), _t(out_h), _t(out_w)))
    assert n_vertical_first >= 5


def test_pillow_weights_match_resample_c():
    """Fixed-point weights against a line-by-line port of Resample.c precompute_coeffs/normalize_coeffs."""

    def resample_c(in_size, out_size):
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = 1.0 * filterscale
        weights = np.zeros((out_size, in_size), np.int64)
        for xx in range(out_size):
            center = 0.0 + (xx + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size) - xmin
            k, ww = [], 0.0
            for x in range(xmax):
                t = abs((x + xmin - center + 0.5) * (1.0 / filterscale))
                k.append(1.0 - t if t < 1.0 else 0.0)
                ww += k[-1]
            for x in range(xmax):
                weights[xx, x + xmin] = int(0.5 + (k[x] / ww if ww != 0.0 else k[x]) * (1 << 22))
        return weights

    for in_size, out_size in [(1, 1024), (7, 5), (1500, 1024), (1100, 751), (900, 450), (333, 1024), (5000, 1024)]:
        ours = pp.bilinear_weights(_t(in_size), _t(out_size), torch.arange(in_size, dtype=torch.float64), 1024)
        assert np.array_equal(ours.numpy()[:out_size].astype(np.int64), resample_c(in_size, out_size))
        assert not ours[out_size:].any()


@pytest.mark.parametrize("name", sorted(REAL_IMAGES))
def test_sam_preprocess_matches_predictor_real(name):
    image = REAL_IMAGES[name]()
    ref = reference_encoder_input(image)
    ours = pp.SamPreprocess()(_chw(image))
    assert ours.shape == ref.shape == (1, 3, registry.IMAGE_SIZE, registry.IMAGE_SIZE)
    assert ours.dtype == ref.dtype == torch.float32
    assert (ours - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("size", [(1, 1), (7, 1500), (2048, 900), (300, 1024), (1100, 300)], ids=str)
def test_sam_preprocess_matches_predictor_synthetic(size):
    image = _synthetic(*size)
    ref = reference_encoder_input(image)
    ours = pp.SamPreprocess()(_chw(image))
    assert (ours - ref).abs().max().item() == 0.0


def test_sam_preprocess_batch():
    images = [_synthetic(150, 97, seed=s) for s in range(2)]
    images[1] = images[1] * 50 + 7  # a different range per image: normalisation is per image
    batch = torch.cat([_chw(im) for im in images])
    out = pp.SamPreprocess()(batch)
    for i, image in enumerate(images):
        assert (out[i : i + 1] - reference_encoder_input(image)).abs().max().item() == 0.0


def test_sam_preprocess_script_and_trace():
    module = pp.SamPreprocess()
    scripted = torch.jit.script(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (torch.rand(1, 3, 50, 70) * 100,))
    for h, w in [(33, 80), (1100, 300), (64, 64)]:
        x = _chw(_synthetic(h, w))
        expected = module(x)
        assert torch.equal(scripted(x), expected)
        assert torch.equal(traced(x), expected)  # traced at another size: sizes and pass order stay dynamic


def _export_onnx(module, example):
    import onnx

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            f,
            opset_version=17,
            dynamo=False,
            input_names=["image"],
            output_names=["input_image"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
        )
    proto = onnx.load_from_string(f.getvalue())
    ops = set()
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            ops.add(node.op_type)
            stack.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    return f.getvalue(), ops


def float64_ops(model: bytes) -> set:
    """Op types of the nodes with a float64 output (shape inference; subgraphs included)."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(model))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input)}
    found = set()
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        types.update({v.name: v.type.tensor_type.elem_type for v in graph.value_info})
        for node in graph.node:
            if any(types.get(o) == onnx.TensorProto.DOUBLE for o in node.output):
                found.add(node.op_type)
            stack.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    return found


ONNX_OPS = {
    "Abs", "Add", "And", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "CumSum", "Div", "Equal", "Floor",
    "Gather", "Greater", "GreaterOrEqual", "If", "Less", "MatMul", "Max", "Min", "Mul", "Neg", "Not",
    "Range", "ReduceMax", "ReduceMin", "Shape", "Slice", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
}  # fmt: skip


@pytest.mark.parametrize("mode", ["nn_module", "scripted"])
def test_sam_preprocess_onnx_dynamic(mode):
    import onnxruntime as ort
    module = pp.SamPreprocess()
    exported = torch.jit.script(module) if mode == "scripted" else module
    model, ops = _export_onnx(exported, _chw(_synthetic(40, 60)))
    assert ops <= ONNX_OPS, ops - ONNX_OPS
    assert "MatMul" in ops and "CumSum" in ops
    # ONNX Runtime 1.13.1 has no float64 Floor; 1.15-1.25 fuse float64 MatMul + Transpose into a kernel-less
    # FusedMatMul (the host check runs them; this names the cause when it fails)
    assert not float64_ops(model) & {"Floor", "Ceil", "Round", "MatMul", "Gemm"}, float64_ops(model)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for batch, (h, w) in [(1, (1, 1)), (2, (1100, 300)), (1, (7, 1500)), (1, (333, 517))]:
        x = torch.cat([_chw(_synthetic(h, w, seed=s)) for s in range(batch)])
        out = session.run(None, {"image": x.numpy()})[0]
        assert out.shape == (batch, 3, registry.IMAGE_SIZE, registry.IMAGE_SIZE)
        assert np.array_equal(out, module(x).numpy()), (mode, batch, h, w)
    # and one image against the reference itself
    image = REAL_IMAGES["dsb_gray_520x696"]()
    out = session.run(None, {"image": _chw(image).numpy()})[0]
    assert np.array_equal(out, reference_encoder_input(image).numpy())


# ---------------------------------------------------------------------------------------------------------
# runtime side (numpy)


def test_to_rgb_channel_mapping():
    rng = np.random.default_rng(0)
    cases = {
        "2d": rng.integers(0, 4000, (9, 11), dtype=np.uint16),
        "hw1": rng.random((9, 11, 1)).astype(np.float32),
        "hw2": rng.integers(0, 255, (9, 11, 2), dtype=np.uint8),
        "hw3": rng.normal(size=(9, 11, 3)),
        "hw4": rng.integers(-5, 5, (9, 11, 4), dtype=np.int32),
        "bool": rng.random((9, 11)) > 0.5,
    }
    for name, image in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rgb = rt.to_rgb(image)
        assert rgb.shape == (9, 11, 3) and rgb.dtype == image.dtype, name
        assert (len(caught) == 1) == (name == "hw4"), name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(usam_to_image(rgb), usam_to_image(image)), name
    assert np.array_equal(rt.to_rgb(cases["hw2"])[..., 2], np.zeros((9, 11), np.uint8))
    assert np.array_equal(rt.to_rgb(cases["2d"])[..., 1], cases["2d"])


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((0, 5)), "empty"),
        (np.zeros((4, 0, 3)), "empty"),
        (np.zeros(7), "2D"),
        (np.zeros((2, 3, 4, 5)), "2D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]], np.float32), "infinite"),
        (np.zeros((3, 3), complex), "numeric"),
        (np.array([["a", "b"]]), "numeric"),
        (np.zeros((1, 3000)), "elongated"),
    ],
)
def test_to_rgb_rejects(image, match):
    with pytest.raises(ValueError, match=match):
        rt.to_rgb(image)


@pytest.mark.parametrize("shape", [(1, 1), (256, 256), (7, 1500), (1500, 1100), (2048, 900), (333, 517)], ids=str)
def test_transform_coords_and_boxes(shape):
    rng = np.random.default_rng(0)
    coords = rng.random((5, 3, 2)) * np.array([shape[1], shape[0]])
    assert np.array_equal(rt.transform_coords(coords, shape), RESIZE.apply_coords(coords, shape))
    points = np.array([[0, 0], [shape[1] - 1, shape[0] - 1]])  # integer input gives float output
    assert np.array_equal(rt.transform_coords(points, shape), RESIZE.apply_coords(points, shape))
    boxes = rng.random((4, 4)) * np.array([shape[1], shape[0]] * 2)
    assert np.array_equal(rt.transform_boxes(boxes, shape), RESIZE.apply_boxes(boxes, shape))
    assert coords.shape == (5, 3, 2) and not np.shares_memory(rt.transform_coords(coords, shape), coords)


def _smooth_logits(n: int, k: int, seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, k, 256, 256))
    smooth = gaussian_filter(noise, sigma=(0, 0, 6, 6))
    return (smooth / smooth.std() * 8.0).astype(np.float32)


MASK_SHAPES = [(1, 1), (256, 256), (512, 512), (7, 1500), (1500, 1100), (2048, 900), (1024, 1024), (300, 1024)]
MASK_SHAPES += [(333, 517)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_upscale_masks_matches_postprocess_masks(shape):
    low = _smooth_logits(1, 4, seed=shape[0] + shape[1])
    ref = reference_postprocess_masks(low, shape)
    ours = rt.upscale_masks(low, shape)
    assert ours.shape == ref.shape == (1, 4) + tuple(shape) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()) / 10)
    agree = np.mean((ours > registry.MASK_THRESHOLD) == (ref > registry.MASK_THRESHOLD))
    assert agree >= 0.9999, agree


def test_upscale_masks_rejects_bad_shapes():
    with pytest.raises(ValueError, match="256"):
        rt.upscale_masks(np.zeros((1, 1, 128, 128), np.float32), (10, 10))
    with pytest.raises(ValueError, match="original_shape"):
        rt.upscale_masks(np.zeros((1, 1, 256, 256), np.float32), (10,))


def test_preprocess_module_is_numpy_only():
    import subprocess
    import sys

    code = "import sys, usam_bioimageio.runtime.geometry; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("shape", [(1305, 1009), (256, 256), (100, 2000), (1024, 700)])
def test_upscale_masks_binary_equals_thresholded_upscale(shape):
    from usam_bioimageio.runtime.geometry import upscale_masks, upscale_masks_binary

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    blobs = np.stack([
        8.0 - np.hypot(yy - rng.uniform(0, 256), xx - rng.uniform(0, 256)) / rng.uniform(1, 6) for _ in range(5)
    ])
    noise = rng.normal(-2, 1.5, (2, 256, 256))
    low = np.concatenate([blobs, noise, np.full((1, 256, 256), -1.0)]).astype(np.float32)
    full = upscale_masks(low, shape) > 0
    sparse = upscale_masks_binary(low, shape)
    assert sparse.shape == full.shape and sparse.dtype == bool
    assert np.mean(sparse == full) >= 0.99999
    assert not sparse[-1].any()
