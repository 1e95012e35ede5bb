"""µSAM's automatic instance segmentation decoder (UNETR) as packages: numerics against µSAM, the two packages
(end to end ``ais`` and ``ais_head``) in every weight format, the runtime.

The µSAM reference (tests/data/ais_decoder_reference/maps.npz, written by scripts/ais_decoder_reference.py in
micro-sam's own environment) holds only maps and seeds: the weights are rebuilt here from the same seeds and
checked by their sha256. Every decoder run costs tens of seconds on a CPU (the decoder works at 1024 x 1024
whatever the image size), so the maps are computed once per session and shared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DATA, DSB, dsb_test_ids

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "ais_decoder_reference" / "maps.npz"
TOL = 1e-4
CASE = "stardist_256"  # the reference case whose weights the exported packages carry


def _reference_script():
    path = ROOT / "scripts" / "ais_decoder_reference.py"
    spec = importlib.util.spec_from_file_location("ais_decoder_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _reference_script()


@pytest.fixture(scope="session")
def reference():
    with np.load(REFERENCE) as z:
        meta = json.loads(str(z["meta"]))
        maps = {name: z[f"maps_{name}"].astype(np.float32) / np.float32(meta["scale"]) for name in meta["cases"]}
    return meta, maps


@pytest.fixture(scope="session")
def sam_state(reference):
    from usam_bioimageio.modeling import seeded_sam

    meta, _ = reference
    state = seeded_sam(meta["model_type"], seed=meta["sam_seed"]).state_dict()
    assert REF.state_sha256(state) == meta["sam_state_sha256"], "seeded SAM weights differ from the reference's"
    return state


def _decoder_state(meta, name):
    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state

    case = meta["cases"][name]
    state = seeded_ais_decoder_state(meta["model_type"], case["decoder_seed"],
                                     use_conv_transpose=case["use_conv_transpose"])
    assert REF.state_sha256(state) == case["decoder_state_sha256"], f"{name}: seeded decoder weights differ"
    return state


def _case_image(meta, name):
    case = meta["cases"][name]
    return REF.load_case_image(DATA, case["file"], case["crop"])


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _eager_maps(sam_state, decoder_state, model_type, image):
    from usam_bioimageio.embeddings.compute import image_to_input
    from usam_bioimageio.modeling.packaged import AisModel, ais_state
    from usam_bioimageio.modeling.unetr import uses_conv_transpose

    model = AisModel(model_type, use_conv_transpose=uses_conv_transpose(decoder_state))
    model.load_state_dict(ais_state(sam_state, decoder_state), strict=True)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(image_to_input(image)))[0].numpy()


@pytest.fixture(scope="session")
def eager_maps(reference, sam_state, data_dir):
    """name -> maps of our torch AisModel for every reference case (computed once)."""
    meta, _ = reference
    cache = {}

    def get(name):
        if name not in cache:
            image = _case_image(meta, name)
            cache[name] = _eager_maps(sam_state, _decoder_state(meta, name), meta["model_type"], image)
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------------------------
# (a) the decoder itself, against µSAM (torch_em's UNETR as micro-sam 1.8.14 builds and runs it)
# --------------------------------------------------------------------------------------------------------------


def test_decoder_state_layout_is_musams(reference):
    from usam_bioimageio.modeling.unetr import build_ais_decoder, decoder_state_layout

    meta, _ = reference
    for variant, conv_t in (("interpolation", False), ("conv_transpose", True)):
        decoder = build_ais_decoder("vit_t", use_conv_transpose=conv_t)
        ours = {k: list(v) for k, v in decoder_state_layout(decoder).items()}
        assert ours == meta["layout"][variant], variant


def test_seeded_decoder_state_is_deterministic_and_loads_strictly(reference):
    from usam_bioimageio.modeling.unetr import load_ais_decoder, seeded_ais_decoder_state, uses_conv_transpose

    a = seeded_ais_decoder_state("vit_t", 5)
    b = seeded_ais_decoder_state("vit_t", 5)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert not torch.equal(a["out_conv.weight"], seeded_ais_decoder_state("vit_t", 6)["out_conv.weight"])
    assert not uses_conv_transpose(a)
    assert uses_conv_transpose(seeded_ais_decoder_state("vit_t", 5, use_conv_transpose=True))
    load_ais_decoder("vit_b", a)  # strict
    with pytest.raises(RuntimeError):
        load_ais_decoder("vit_b", {k: v for k, v in a.items() if k != "out_conv.bias"})
    with pytest.raises(ValueError):
        seeded_ais_decoder_state("vit_x", 0)


@pytest.mark.parametrize("name", ["stardist_256", "dsb_rgb_crop", "stardist_crop_convtranspose"])
def test_maps_equal_musam(reference, eager_maps, name):
    """Our AisModel (preprocessing, encoder, UNETR, crop + resize) == µSAM's InstanceSegmentationWithDecoder."""
    meta, ref = reference
    ours = eager_maps(name)
    assert ours.shape == (3,) + tuple(meta["cases"][name]["image_shape"][:2])
    diff = _max_diff(ours, ref[name])
    print(f"{name}: max |ours - µSAM| = {diff:.2e}")
    assert diff <= TOL


def test_batchnorm_uses_batch_statistics_like_musam():
    """µSAM never calls eval() on the UNETR: its BatchNorm layers normalise with batch statistics."""
    from usam_bioimageio.modeling.unetr import BatchNorm2d

    torch.manual_seed(0)
    bn = BatchNorm2d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    x = torch.randn(1, 4, 9, 7) * 3 + 1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    train = torch.nn.BatchNorm2d(4)
    train.load_state_dict(bn.state_dict())
    train.train()
    assert torch.allclose(bn.eval()(x), train(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())  # no running-stat updates
    running = BatchNorm2d(4, batch_statistics=False)
    running.load_state_dict(before)
    ref = torch.nn.BatchNorm2d(4)
    ref.load_state_dict(before)
    assert torch.allclose(running.eval()(x), ref.eval()(x), atol=1e-6)


@pytest.mark.parametrize("shape", [(256, 256), (200, 250), (96, 128), (1, 1), (1, 7), (1024, 1024), (1500, 37),
                                   (517, 1309)])
def test_crop_and_resize_equal_torch_em(shape):
    """The graph's (interpolation matrices) and the runtime's (numpy) crop + resize == torch_em's
    postprocess_masks (F.interpolate)."""
    from usam_bioimageio.automatic.ais.decoder import maps_to_original as numpy_maps_to_original
    from usam_bioimageio.modeling.unetr import maps_to_original, postprocess_like_torch_em

    padded = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(sum(shape)))
    expected = postprocess_like_torch_em(padded, shape)
    graph = maps_to_original(padded, torch.zeros(1, 3, *shape))
    runtime = numpy_maps_to_original(padded[0].numpy(), shape)
    assert graph.shape == expected.shape == (1, 3) + shape
    # float32 source coordinates up to ~1000 (ulp 6e-5) round differently in torch's kernel (fused
    # multiply-add): interpolation weights differ by up to ~3e-5 there
    assert _max_diff(graph, expected) < 5e-5
    assert _max_diff(runtime, expected[0]) < 5e-5
    assert _max_diff(runtime, graph[0]) < 5e-5


# --------------------------------------------------------------------------------------------------------------
# the exported packages
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ais_family(vit_t_family, reference, sam_state, tmp_path_factory):
    """A copy of the session's vit_t family (same SAM weights as the reference) with the two AIS packages of
    the reference case's decoder weights added by ``write_ais_packages`` (gated by bioimageio.core's test
    for every weight format), and family.yaml updated. Returns (folder, decoder_state, write seconds)."""
    import time

    from usam_bioimageio.io.download import sha256_of
    from usam_bioimageio.runtime.packages import FAMILY_FILE, load_package
    from usam_exporters import modules
    from usam_bioimageio.training.checkpoints import Checkpoint
    from usam_exporters.ais import write_ais_packages
    from usam_exporters.samples import load_sample

    meta, _ = reference
    base, state = vit_t_family
    assert all(torch.equal(state[k], sam_state[k]) for k in state)
    folder = tmp_path_factory.mktemp("ais-family") / "family"
    shutil.copytree(base, folder)
    manifest = yaml.safe_load((folder / FAMILY_FILE).read_text())
    decoder_state = _decoder_state(meta, CASE)
    if "ais" not in manifest["packages"]:
        ckpt = Checkpoint(model_type="vit_t", sam_state=sam_state, decoder_state=decoder_state, source="seeded")
        sid = dsb_test_ids()[0]
        sample = load_sample(DSB / "images" / f"{sid}.png", DSB / "labels" / f"{sid}.tif")
        from usam_bioimageio.embeddings.compute import image_to_input

        with torch.no_grad():
            embeddings = modules.image_encoder(ckpt)(torch.from_numpy(image_to_input(sample.image))).numpy()
        encoder_sha = load_package(folder / "image_encoder.zip").identity
        work = tmp_path_factory.mktemp("ais-work")
        t0 = time.perf_counter()
        files = write_ais_packages(ckpt, sample, embeddings, encoder_sha, "vit_t_random", folder,
                                   ("torchscript", "onnx", "pytorch_state_dict"), work)
        seconds = time.perf_counter() - t0
        for kind in ("ais", "ais_head"):
            manifest["packages"][kind] = {"file": files[kind].name, "sha256": sha256_of(files[kind])}
        (folder / FAMILY_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
    else:  # export_family already writes them: its checkpoint must then carry our decoder weights
        seconds = None
    return folder, decoder_state, seconds


@pytest.mark.slow  # exports and gates both AIS packages (12+ full-size decoder runs)
def test_packages_written_and_described(ais_family):
    """(b) write_package writes a package only after bioimageio.core's test passed for every format."""
    from usam_bioimageio.automatic.ais.postprocess import AisParameters
    from usam_bioimageio.runtime.packages import load_family

    folder, _, seconds = ais_family
    if seconds is not None:
        print(f"write_ais_packages (both packages, 3 formats, gated): {seconds:.0f} s")
    family = load_family(folder)  # sibling check: ais_head was exported for this image encoder
    for kind in ("ais", "ais_head"):
        package = family.get(kind)
        assert set(package.weight_formats) == {"torchscript", "onnx", "pytorch_state_dict"}
        assert package.model_type == "vit_t"
        cfg = package.config
        assert cfg["ais_parameters"] == {k: getattr(AisParameters(), k) for k in cfg["ais_parameters"]}
        assert set(cfg["ais_parameters"]) == set(AisParameters.__dataclass_fields__)
        assert cfg["channels"] == ["foreground", "center_distances", "boundary_distances"]
        arch = package.rdf["weights"]["pytorch_state_dict"]["architecture"]
        assert arch["callable"] == ("AisModel" if kind == "ais" else "AisHeadModel")
        assert arch["kwargs"] == {"model_type": "vit_t", "use_conv_transpose": False, "batch_statistics": True}
    head = family.get("ais_head")
    assert head.config["image_encoder"]["identity"] == family.get("image_encoder").identity
    assert [t["id"] for t in head.rdf["inputs"]] == ["embeddings"]
    ais = family.get("ais")
    assert [t["id"] for t in ais.rdf["inputs"]] == ["image"] and [t["id"] for t in ais.rdf["outputs"]] == ["maps"]
    y_axis = [a for a in ais.rdf["outputs"][0]["axes"] if a.get("id") == "y"][0]
    assert y_axis["size"] == {"tensor_id": "image", "axis_id": "y", "offset": 0}


@pytest.fixture(scope="session")
def stardist_image(reference):
    meta, _ = reference
    return _case_image(meta, CASE)


@pytest.fixture(scope="session")
def runtime_maps(ais_family, stardist_image):
    """weight format -> (maps, embeddings) of the runtime (image encoder + ais_head packages)."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel

    folder, _, _ = ais_family
    out = {}
    for fmt in ("onnx", "torchscript"):
        model = SamModel.load(folder, weight_format=fmt)
        embeddings = compute_embeddings(model, stardist_image)
        out[fmt] = (ais_maps(model, stardist_image, embeddings=embeddings), embeddings)
    return out


def _run_isolated(code: str, *args) -> None:
    """``python -I -c code args``: no project code on the path; fails if torch / our packages got imported
    where they should not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("OMP_NUM_THREADS", "2")
    result = subprocess.run([sys.executable, "-I", "-c", code, *map(str, args)], capture_output=True, text=True,
                            env=env, cwd=str(Path(args[-1]).parent), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]


ONNX_ONLY = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
(maps,) = session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[2])})
np.save(sys.argv[3], maps)
forbidden = ("torch", "usam_bioimageio", "usam_exporters", "bioimageio")
bad = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
assert not bad, bad
"""

TORCH_ONLY = """
import sys, numpy as np, torch
module = torch.jit.load(sys.argv[1], map_location="cpu").eval()
with torch.no_grad():
    maps = module(torch.from_numpy(np.load(sys.argv[2])))
np.save(sys.argv[3], maps.numpy())
forbidden = ("onnxruntime", "usam_bioimageio", "usam_exporters", "bioimageio")
bad = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
assert not bad, bad
"""


@pytest.fixture(scope="session")
def standalone_maps(ais_family, stardist_image, tmp_path_factory):
    """(d) The end-to-end package run with nothing but onnxruntime + numpy, and nothing but torch + numpy."""
    from usam_bioimageio.embeddings.compute import image_to_input
    from usam_bioimageio.runtime.packages import load_package

    folder, _, _ = ais_family
    package = load_package(folder / "ais.zip")
    work = tmp_path_factory.mktemp("standalone")
    np.save(work / "image.npy", image_to_input(stardist_image))
    out = {}
    for fmt, code in (("onnx", ONNX_ONLY), ("torchscript", TORCH_ONLY)):
        _run_isolated(code, package.weights_path(fmt), work / "image.npy", work / f"maps_{fmt}.npy")
        out[fmt] = np.load(work / f"maps_{fmt}.npy")
        assert out[fmt].shape == (1, 3) + stardist_image.shape[:2]
    return out


@pytest.mark.slow  # exports and gates both AIS packages (12+ full-size decoder runs)
def test_runtime_maps_equal_torch_module_and_musam(runtime_maps, eager_maps, reference):
    """(c) ais_head (ONNX, torchscript) through the runtime == our torch module == µSAM."""
    _, ref = reference
    eager = eager_maps(CASE)
    diffs = {fmt: _max_diff(maps, eager) for fmt, (maps, _) in runtime_maps.items()}
    diffs["onnx vs torchscript"] = _max_diff(runtime_maps["onnx"][0], runtime_maps["torchscript"][0])
    diffs.update({f"{fmt} vs µSAM": _max_diff(maps, ref[CASE]) for fmt, (maps, _) in runtime_maps.items()})
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL


@pytest.mark.slow  # exports and gates both AIS packages (12+ full-size decoder runs)
def test_standalone_end_to_end_equals_runtime(standalone_maps, runtime_maps, eager_maps, reference):
    """(c, d) the end-to-end package, run without project code, == the runtime's maps == torch == µSAM."""
    _, ref = reference
    diffs = {}
    for fmt, maps in standalone_maps.items():
        diffs[f"ais {fmt} vs runtime onnx"] = _max_diff(maps[0], runtime_maps["onnx"][0])
        diffs[f"ais {fmt} vs torch module"] = _max_diff(maps[0], eager_maps(CASE))
        diffs[f"ais {fmt} vs µSAM"] = _max_diff(maps[0], ref[CASE])
    diffs["ais onnx vs torchscript"] = _max_diff(standalone_maps["onnx"], standalone_maps["torchscript"])
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL


# --------------------------------------------------------------------------------------------------------------
# (e) the runtime: labels, edge cases, errors
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ais_model_onnx(ais_family):
    from usam_bioimageio.runtime.model import SamModel

    return SamModel.load(ais_family[0])


@pytest.mark.slow  # exports and gates both AIS packages (12+ full-size decoder runs)
def test_automatic_instance_segmentation_real_image(ais_model_onnx, runtime_maps, stardist_image):
    from usam_bioimageio.automatic.ais.postprocess import AisParameters, instances_from_maps
    from usam_bioimageio.automatic.ais.decoder import automatic_instance_segmentation

    maps, embeddings = runtime_maps["onnx"]
    params = AisParameters(min_size=5)
    labels = automatic_instance_segmentation(ais_model_onnx, stardist_image, embeddings=embeddings, params=params)
    assert labels.shape == stardist_image.shape and labels.dtype == np.uint32
    assert labels.max() >= 1
    np.testing.assert_array_equal(labels, instances_from_maps(maps, params=params))


@pytest.fixture(scope="session")
def head_model(vit_t_ais_family):
    """The runtime on an (ungated) AIS head package: fast, for the runtime's edge cases and errors in CI."""
    from usam_bioimageio.runtime.model import SamModel

    return SamModel.load(vit_t_ais_family[0])


def test_edge_case_images(head_model):
    """A constant image (µSAM's normalisation maps it to 0) and a 1-pixel image give maps and labels."""
    from usam_bioimageio.automatic.ais.decoder import ais_maps, automatic_instance_segmentation

    ais_model_onnx = head_model
    maps = ais_maps(ais_model_onnx, np.full((40, 30), 7, np.uint16))
    assert maps.shape == (3, 40, 30) and np.isfinite(maps).all() and (maps >= 0).all() and (maps <= 1).all()
    labels = automatic_instance_segmentation(ais_model_onnx, np.array([[3.5]], np.float32))
    assert labels.shape == (1, 1) and labels.dtype == np.uint32


def test_errors(head_model, vit_t_family, stardist_image):
    from dataclasses import replace

    from usam_bioimageio.automatic.ais.decoder import ais_maps, automatic_instance_segmentation
    from usam_bioimageio.embeddings.compute import compute_embeddings
    from usam_bioimageio.runtime.model import SamModel
    from usam_bioimageio.errors import PackageError

    ais_model_onnx = head_model
    embeddings = compute_embeddings(head_model, stardist_image)
    with pytest.raises(ValueError, match="image or its embeddings"):
        ais_maps(ais_model_onnx)
    with pytest.raises(ValueError, match="shape"):
        ais_maps(ais_model_onnx, stardist_image[:100], embeddings=embeddings)
    with pytest.raises(PackageError, match="another image encoder"):
        ais_maps(ais_model_onnx, embeddings=replace(embeddings, encoder="0" * 64))
    with pytest.raises(ValueError):
        ais_maps(ais_model_onnx, np.zeros((0, 5)))
    with pytest.raises(ValueError):
        ais_maps(ais_model_onnx, np.zeros((3, 4, 5, 6)))
    with pytest.raises(TypeError):
        automatic_instance_segmentation(ais_model_onnx, embeddings=embeddings, params={"min_size": 3})
    no_ais = SamModel.load(vit_t_family[0])
    assert "ais_head" not in no_ais.family
    with pytest.raises(PackageError, match="no AIS decoder"):
        ais_maps(no_ais, stardist_image)


def test_checkpoint_with_decoder_state_round_trip(tmp_path, sam_state, reference):
    """A µSAM-layout checkpoint with decoder_state -> Checkpoint.decoder_state -> both modules, strictly."""
    from usam_bioimageio.training.checkpoints import load_checkpoint, save_checkpoint
    from usam_exporters.ais import ais_head_model, ais_model

    meta, _ = reference
    decoder_state = _decoder_state(meta, "stardist_crop_convtranspose")
    path = save_checkpoint(tmp_path / "with_decoder.pt", sam_state=sam_state, decoder_state=decoder_state)
    ckpt = load_checkpoint(path)
    assert ckpt.has_decoder
    model, head = ais_model(ckpt), ais_head_model(ckpt)
    assert model.unetr.use_conv_transpose and head.unetr.use_conv_transpose
    for k, v in decoder_state.items():
        assert torch.equal(head.state_dict()[f"unetr.{k}"], v)
