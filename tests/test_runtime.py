"""Runtime: loading packages from folders, zips, URLs and ids; clear errors for bad input; the CLI."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import tifffile
from loopback import serve

from usam_bioimageio.cli import main as cli
from usam_bioimageio.embeddings.compute import compute_embeddings
from usam_bioimageio.runtime.model import SamModel
from usam_bioimageio.errors import PackageError
from usam_bioimageio.runtime.packages import load_family, load_package
from usam_bioimageio.prompting.inputs import build_decoder_inputs
from usam_bioimageio.io.prompt_files import read_prompts
from usam_bioimageio.prompting.predict import segment_from_prompts


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (root folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with serve(root) as (base, _):
        yield root, base


def test_family_from_folder_has_both_packages(vit_t_family):
    family = load_family(vit_t_family[0])
    assert set(family.packages) >= {"image_encoder", "prompt_decoder"}
    assert family.get("prompt_decoder").config["image_encoder"]["identity"] == family.get("image_encoder").identity


def test_package_from_zip_url_and_rdf_url(vit_t_family, http_root, model, image, embeddings):
    family_dir, _ = vit_t_family
    root, base = http_root
    shutil.copy(family_dir / "image_encoder.zip", root / "encoder.zip")
    from_zip_url = load_package(f"{base}/encoder.zip")
    assert from_zip_url.kind == "image_encoder"
    with zipfile.ZipFile(family_dir / "prompt_decoder.zip") as zf:
        zf.extractall(root / "decoder")
    from_rdf_url = load_package(f"{base}/decoder/rdf.yaml")
    assert from_rdf_url.kind == "prompt_decoder"
    assert from_rdf_url.weights_path("onnx").is_file()
    # a model assembled from downloaded packages gives the same masks
    from usam_bioimageio.runtime.packages import Family

    remote = SamModel(Family({"image_encoder": from_zip_url, "prompt_decoder": from_rdf_url}))
    box = np.array([60.0, 60.0, 140.0, 150.0])
    a = segment_from_prompts(model, embeddings, boxes=box).masks
    b = segment_from_prompts(remote, compute_embeddings(remote, image), boxes=box).masks
    assert np.array_equal(a, b)


def test_package_from_bioimageio_id(vit_t_family, http_root, monkeypatch):
    """An id resolves to <collection>/<id>/files/rdf.yaml (served here from 127.0.0.1)."""
    from usam_bioimageio.runtime import packages

    root, base = http_root
    with zipfile.ZipFile(vit_t_family[0] / "image_encoder.zip") as zf:
        zf.extractall(root / "affable-encoder" / "files")
    monkeypatch.setattr(packages, "BIOIMAGEIO_RDF_URL", base + "/{id}/files/rdf.yaml")
    package = load_package("affable-encoder")
    assert package.kind == "image_encoder"
    assert package.identity == load_package(vit_t_family[0] / "image_encoder.zip").identity


def test_wrong_sha256_is_refused(vit_t_family, tmp_path):
    zip_path = vit_t_family[0] / "image_encoder.zip"
    with pytest.raises(PackageError, match="sha256"):
        load_package(zip_path, sha256="0" * 64)
    family = tmp_path / "family"
    shutil.copytree(vit_t_family[0], family)
    manifest = (family / "family.yaml").read_text().replace(
        (family / "family.yaml").read_text().split("sha256: ")[1].split()[0], "f" * 64
    )
    (family / "family.yaml").write_text(manifest)
    with pytest.raises(PackageError, match="sha256"):
        load_family(family)


def test_truncated_zip_is_refused_and_leaves_nothing(vit_t_family, tmp_path, usam_cache):
    data = (vit_t_family[0] / "prompt_decoder.zip").read_bytes()
    bad = tmp_path / "truncated.zip"
    bad.write_bytes(data[: len(data) // 2])
    before = set((usam_cache / "packages").iterdir()) if (usam_cache / "packages").exists() else set()
    with pytest.raises(PackageError, match="zip|package"):
        load_package(bad)
    after = set((usam_cache / "packages").iterdir()) if (usam_cache / "packages").exists() else set()
    assert after == before


def test_not_a_package(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PackageError):
        load_package(tmp_path)
    with pytest.raises(PackageError):
        load_package(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        load_package(tmp_path / "missing" / "x.zip")


def test_mixed_family_is_refused(vit_t_family, tmp_path):
    """A decoder exported for another encoder must not be paired with this one."""
    import yaml

    family = tmp_path / "mixed"
    shutil.copytree(vit_t_family[0], family)
    folder = family / "decoder"
    with zipfile.ZipFile(family / "prompt_decoder.zip") as zf:
        zf.extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    rdf["config"]["usam"]["image_encoder"]["identity"] = "a" * 64
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    (family / "prompt_decoder.zip").unlink()
    (family / "family.yaml").unlink()
    with pytest.raises(PackageError, match="different models"):
        load_family(family)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((4, 5, 6, 7), np.uint8), "dimension|shape"),
        (np.zeros((10,), np.uint8), "dimension|shape"),
        (np.full((16, 16), np.nan, np.float32), "NaN|finite"),
    ],
)
def test_bad_images_get_clear_errors(model, bad, match):
    with pytest.raises(ValueError, match=match):
        compute_embeddings(model, bad)


def test_bad_prompts_get_clear_errors(model, embeddings):
    shape = embeddings.original_shape
    with pytest.raises(ValueError, match="outside"):
        segment_from_prompts(model, embeddings, points=[[shape[1] + 5, 3]], point_labels=[1])
    with pytest.raises(ValueError, match="outside"):
        segment_from_prompts(model, embeddings, boxes=[-10, 0, 20, 20])
    with pytest.raises(ValueError, match="match"):
        segment_from_prompts(model, embeddings, points=[[3, 3], [4, 4]], point_labels=[1])
    with pytest.raises(ValueError, match="point_labels"):
        segment_from_prompts(model, embeddings, points=[[3, 3]])
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1"):
        segment_from_prompts(model, embeddings, points=[[3, 3]], point_labels=[5])
    with pytest.raises(ValueError, match="x1 >= x0"):
        segment_from_prompts(model, embeddings, boxes=[20, 20, 10, 10])
    with pytest.raises(ValueError, match="number of objects"):
        segment_from_prompts(model, embeddings, boxes=[[0, 0, 5, 5]] * 2, points=[[[1, 1]]] * 3, point_labels=[[1]] * 3)
    with pytest.raises(ValueError, match="at least one prompt"):
        segment_from_prompts(model, embeddings)
    with pytest.raises(ValueError, match="NaN"):
        segment_from_prompts(model, embeddings, boxes=[0, 0, np.nan, 5])
    with pytest.raises(ValueError, match="mask_inputs"):
        segment_from_prompts(model, embeddings, mask_inputs=np.zeros((64, 64)))


def test_decoder_inputs_follow_sampredictor_padding():
    no_box = build_decoder_inputs((100, 200), points=[[10, 20]], point_labels=[1])
    assert no_box["point_labels"].tolist() == [[1, -1]]
    with_box = build_decoder_inputs((100, 200), points=[[10, 20]], point_labels=[1], boxes=[0, 0, 50, 50])
    assert with_box["point_labels"].tolist() == [[1, 2, 3]]
    mask_only = build_decoder_inputs((100, 200), mask_inputs=np.ones((256, 256)))
    assert mask_only["point_coords"].shape == (1, 0, 2)
    assert mask_only["has_mask_input"].tolist() == [[1.0]]


def test_prompt_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"objects": [{"points": [[1, 2], [3, 4]], "labels": [1, 0]},
                                                              {"box": [0, 0, 5, 5]}]}))
    objects = read_prompts(tmp_path / "p.json")
    assert [o.signature() for o in objects] == [(2, False, False), (0, True, False)]
    (tmp_path / "p.csv").write_text("object,kind,x,y,label,x1,y1\na,point,1,2,1,,\na,box,0,0,,5,5\nb,point,3,3,0,,\n")
    objects = read_prompts(tmp_path / "p.csv")
    assert [o.signature() for o in objects] == [(1, True, False), (1, False, False)]
    (tmp_path / "bad.json").write_text(json.dumps([{"points": [[1, 2]], "labels": [1, 1]}]))
    with pytest.raises(ValueError, match="labels"):
        read_prompts(tmp_path / "bad.json")


def test_cli_embed_and_segment(vit_t_family, image, tmp_path, capsys):
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, image)
    (tmp_path / "prompts.json").write_text(json.dumps({"objects": [
        {"box": [60, 60, 140, 150]}, {"points": [[200, 40]], "labels": [1]},
        {"points": [[100, 200], [10, 10]], "labels": [1, 0], "box": [80, 170, 130, 230]}]}))
    family = str(vit_t_family[0])
    assert cli.main(["embed", "--model", family, "--image", str(img), "--out", str(tmp_path / "e.npz")]) == 0
    rc = cli.main(["segment", "--model", family, "--image", str(img), "--prompts", str(tmp_path / "prompts.json"),
                   "--embeddings", str(tmp_path / "e.npz"), "--out", str(tmp_path / "labels.tif"),
                   "--overlay", str(tmp_path / "overlay.png"), "--quiet"])
    assert rc == 0
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == image.shape and labels.max() <= 3
    assert (tmp_path / "overlay.png").stat().st_size > 0
    # the same without precomputed embeddings and with torchscript gives the same labels
    rc = cli.main(["segment", "--model", family, "--image", str(img), "--prompts", str(tmp_path / "prompts.json"),
                   "--out", str(tmp_path / "labels2.tif"), "--weight-format", "torchscript", "--quiet"])
    assert rc == 0
    assert np.mean(tifffile.imread(tmp_path / "labels2.tif") == labels) >= 0.9999


def test_cli_errors_are_clear(vit_t_family, tmp_path, capsys):
    rc = cli.main(["segment", "--model", str(vit_t_family[0]), "--image", str(tmp_path / "missing.tif"),
                   "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "x.tif")])
    assert rc == 1  # a file the user named is missing: exit 1, one line
    err = capsys.readouterr().err
    assert "no image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.tif").exists()
    with pytest.raises(SystemExit):
        cli.main(["--help"])


def test_cli_one_error_policy(tmp_path, capsys):
    """usam --version; every verb (train included) turns a user's mistake into one line on stderr and exit 1;
    options that do not go together exit 2, as argparse's usage errors."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and "usam 0." in capsys.readouterr().out
    assert cli.main(["train", "--output", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("usam train: error:") and len(err.strip().splitlines()) == 1
    assert cli.main(["embed", "--model", str(tmp_path), "--image", "x.tif", "--halo", "4", "4"]) == 2
    assert "--halo needs --tile-shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["embed", "--no-such-option"])
    assert exit_info.value.code == 2


def _rewrite_rdf(package_zip, edit):
    """Unpack a package zip into a folder of the same stem, edit its rdf (a dict) in place, drop the zip."""
    import yaml

    folder = package_zip.with_suffix("")
    with zipfile.ZipFile(package_zip) as zf:
        zf.extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    edit(rdf)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    package_zip.unlink()


def test_sibling_check_holds_for_every_weight_format(vit_t_family, tmp_path):
    """Package identity exists without ONNX weights (the torchscript sha256 then), so the sibling check never
    switches itself off; a decoder that records no encoder identity is refused."""
    family = tmp_path / "torchscript_only"
    shutil.copytree(vit_t_family[0], family)
    (family / "family.yaml").unlink()
    _rewrite_rdf(family / "image_encoder.zip", lambda rdf: rdf["weights"].pop("onnx"))
    encoder = load_package(family / "image_encoder")
    assert encoder.identity == encoder.weights_sha256("torchscript") != ""
    with pytest.raises(PackageError, match="another image encoder"):  # the decoder names the ONNX identity
        load_family(family)
    _rewrite_rdf(family / "prompt_decoder.zip",
                 lambda rdf: rdf["config"]["usam"]["image_encoder"].update(identity=encoder.identity))
    assert load_family(family).get("prompt_decoder").encoder_identity == encoder.identity
    shutil.rmtree(family / "prompt_decoder")
    shutil.copy(vit_t_family[0] / "prompt_decoder.zip", family)
    _rewrite_rdf(family / "prompt_decoder.zip", lambda rdf: rdf["config"]["usam"].pop("image_encoder"))
    with pytest.raises(PackageError, match="records no image encoder identity"):
        load_family(family)


def test_validate_prints_why_a_check_failed(tmp_path, capsys, monkeypatch):
    """usam validate names the failing checks' reasons, one line each, and exits 1."""
    import usam_exporters.writer as writer

    summary = writer.PackageSummary({"onnx": "failed"}, source="p.zip", status="failed",
                                    errors=["[onnx] Reproduce test outputs: max abs diff 0.5 > 1e-3"])
    monkeypatch.setattr(writer, "validate_package", lambda path: summary)
    assert cli.main(["validate", str(tmp_path / "p.zip")]) == 1
    out = capsys.readouterr().out
    assert "onnx: failed" in out and "failed: [onnx] Reproduce test outputs: max abs diff 0.5" in out


def test_device_choice_and_its_errors(vit_t_family, model, image, embeddings, tmp_path, capsys):
    """--device / SamModel(device=): cpu is the default; auto runs where CUDA is, else on the CPU with the CPU's
    numbers; cuda without a CUDA backend is one line naming what to install (exit 2), before anything is read."""
    from usam_bioimageio.errors import UsageError
    from usam_bioimageio.runtime.backends import cuda_available, resolve_device

    assert model.device == "cpu" and resolve_device("cpu", "onnx") == "cpu"
    for fmt in ("onnx", "torchscript"):
        assert resolve_device("auto", fmt) == ("cuda" if cuda_available(fmt) else "cpu")
    with pytest.raises(UsageError, match="device must be one of"):
        resolve_device("gpu", "onnx")
    box = np.array([60.0, 60.0, 140.0, 150.0])
    auto = SamModel.load(vit_t_family[0], device="auto")
    if auto.runner("prompt_decoder").device == "cpu":
        assert np.array_equal(segment_from_prompts(auto, compute_embeddings(auto, image), boxes=box).masks,
                              segment_from_prompts(model, embeddings, boxes=box).masks)
    if not cuda_available("onnx"):
        with pytest.raises(UsageError, match="onnxruntime-gpu"):
            SamModel.load(tmp_path / "not-read", device="cuda")  # checked before the (missing) family is read
        img = tmp_path / "img.tif"
        tifffile.imwrite(img, image)
        assert cli.main(["embed", "--model", str(vit_t_family[0]), "--image", str(img), "--out",
                         str(tmp_path / "e.npz"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "onnxruntime-gpu" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "e.npz").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_gpu_path_matches_the_cpu(vit_t_family, model, image, embeddings, fmt):
    """On a CUDA GPU: embeddings and masks of the GPU path next to the CPU's (GPU kernels round differently)."""
    from usam_bioimageio.runtime.backends import cuda_available

    if not cuda_available(fmt):
        pytest.skip(f"no CUDA device for {fmt} on this machine: the GPU path is tested where one is")
    gpu = SamModel.load(vit_t_family[0], weight_format=fmt, device="cuda")
    assert gpu.runner("image_encoder").device == "cuda"
    emb = compute_embeddings(gpu, image)
    assert np.abs(emb.features - embeddings.features).max() <= 1e-2 * np.abs(embeddings.features).max()
    box = np.array([60.0, 60.0, 140.0, 150.0])
    a = segment_from_prompts(gpu, emb, boxes=box).masks
    b = segment_from_prompts(model, embeddings, boxes=box).masks
    assert (a != b).mean() < 0.01
