"""Trust and bad input (issue 15): untrusted packages run no code and read nothing outside themselves, tampered
weights and zip bombs are refused, broken downloads are not kept, broken descriptions are one error.

Every package here is a tiny fake (an rdf.yaml, a one-node ONNX, small test tensors) built in a temporary folder;
URLs are served from 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from loopback import serve

from usam_bioimageio.errors import ChecksumError, PackageError, UntrustedPackageError, UsamError
from usam_bioimageio.runtime import packages
from usam_bioimageio.runtime.backends import Runner
from usam_bioimageio.runtime.packages import load_family, load_package, read_package_rdf


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def _onnx_bytes(op: str = "Identity") -> bytes:
    """A valid one-node ONNX model y = op(x)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"])], f"tiny_{op}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _write_rdf(folder: Path, rdf: dict) -> None:
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False), encoding="utf-8")


def _rdf(folder: Path) -> dict:
    return yaml.safe_load((folder / "rdf.yaml").read_text(encoding="utf-8"))


def make_package(folder: Path, *, kind: str = "image_encoder", onnx: bytes = b"", **rdf_updates) -> Path:
    """A tiny usam package (ONNX weights y = x, test tensors, documentation) in ``folder``; ``rdf_updates``
    replace top-level rdf entries."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.onnx").write_bytes(onnx or _onnx_bytes())
    np.save(folder / "test_input_x.npy", np.ones((1, 4), np.float32))
    np.save(folder / "test_output_y.npy", np.ones((1, 4), np.float32))
    (folder / "README.md").write_text("# tiny\n")
    axes = [{"type": "batch", "size": 1}, {"type": "channel", "channel_names": ["a", "b", "c", "d"]}]
    rdf = {
        "format_version": "0.5.10", "type": "model", "name": "tiny package", "description": "a tiny test package",
        "authors": [{"name": "Test"}], "cite": [{"text": "x", "doi": "10.1000/xyz"}], "license": "MIT",
        "documentation": "README.md",
        "inputs": [{"id": "x", "axes": axes, "data": {"type": "float32"},
                    "test_tensor": {"source": "test_input_x.npy", "sha256": _sha(folder / "test_input_x.npy")}}],
        "outputs": [{"id": "y", "axes": axes, "data": {"type": "float32"},
                     "test_tensor": {"source": "test_output_y.npy", "sha256": _sha(folder / "test_output_y.npy")}}],
        "weights": {"onnx": {"source": "weights.onnx", "sha256": _sha(folder / "weights.onnx"), "opset_version": 17}},
        "config": {"usam": {"kind": kind, "model_type": "vit_t"}},
    }
    rdf.update(rdf_updates)
    _write_rdf(folder, rdf)
    return folder


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, file.name)
    return path


def _files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("USAM_CACHE_DIR", str(d))
    return d




def _image(tmp_path: Path) -> Path:
    import tifffile

    path = tmp_path / "image.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    return path


def _cli(argv, capsys):
    """(exit status, stderr) of ``usam ARGV``; stderr is one line."""
    from usam_bioimageio.cli.main import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


# --------------------------------------------------------------------------------------------------------------
# 1. architectures: nothing outside usam_bioimageio.modeling runs
# --------------------------------------------------------------------------------------------------------------


def _os_system_package(folder: Path, marker: Path) -> Path:
    """A package bioimageio.core would accept, whose pytorch_state_dict "architecture" is os.system creating
    ``marker`` (bioimageio.core's test_model calls it before it looks at what it returned)."""
    import torch

    make_package(folder)
    torch.save({}, folder / "weights.pt")
    rdf = _rdf(folder)
    rdf["weights"]["pytorch_state_dict"] = {
        "source": "weights.pt", "sha256": _sha(folder / "weights.pt"), "pytorch_version": "2.1",
        "architecture": {"callable": "system", "import_from": "os", "kwargs": {"command": f"touch {marker}"}},
    }
    _write_rdf(folder, rdf)
    return folder


def test_validate_refuses_os_system_architecture(tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = _os_system_package(tmp_path / "evil", marker)
    zipped = _zip(folder, tmp_path / "evil.zip")
    for package in (folder, zipped, folder / "rdf.yaml"):
        code, err = _cli(["validate", package], capsys)
        assert code == 1
        assert "os.system" in err and "refusing to run it" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()


def test_validate_checks_every_description_bioimageio_could_take(tmp_path, capsys):
    """bioimageio.spec takes the first of the sorted names that are or end in ".rdf.yaml" (then ".bioimageio.yaml",
    ".model.yaml"; in a zip at any depth): "a.rdf.yaml" before our "rdf.yaml". Every candidate is checked."""
    marker = tmp_path / "marker"
    evil = _os_system_package(tmp_path / "evil", marker)
    folder = make_package(tmp_path / "p")
    shutil.copy(evil / "weights.pt", folder)
    zipped = _zip(folder, tmp_path / "p.zip")
    with zipfile.ZipFile(zipped, "a") as zf:
        zf.write(evil / "rdf.yaml", "a.rdf.yaml")
    shutil.copy(evil / "rdf.yaml", folder / "a.rdf.yaml")
    for package in (zipped, folder):
        code, err = _cli(["validate", package], capsys)
        assert code == 1 and "os.system" in err, err
    assert not marker.exists()


def test_loader_refuses_os_system_architecture(tmp_path, cache):
    from usam_bioimageio.runtime.model import SamModel

    marker = tmp_path / "marker"
    folder = _os_system_package(tmp_path / "family" / "evil", marker)
    zipped = _zip(folder, tmp_path / "evil.zip")
    for source in (folder, zipped):
        with pytest.raises(UntrustedPackageError, match=r"architecture os\.system is not one of usam_bioimageio"):
            load_package(source)
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(UntrustedPackageError, match=r"os\.system"):
            SamModel.load(tmp_path / "family", weight_format=fmt).runner("image_encoder")
    assert not marker.exists()
    assert not _files(cache)  # the refused zip was not unpacked


@pytest.mark.parametrize("arch, what", [
    ({"callable": "Evil", "source": "evil.py"}, "code file 'evil.py'"),
    ({"callable": "SamImageEncoder", "import_from": "usam_bioimageio.modelingevil"}, "not one of"),
    ({"callable": "_private", "import_from": "usam_bioimageio.modeling"}, "not a public callable"),
    ("evil.py:Evil", "code file 'evil.py'"),  # format 0.4 strings
    ("subprocess.run", r"architecture subprocess\.run"),
])
def test_other_architectures_are_refused(tmp_path, capsys, arch, what):
    folder = make_package(tmp_path / "p")
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w')\nEvil = object\n")
    rdf = _rdf(folder)
    rdf["weights"]["pytorch_state_dict"] = {"source": "weights.onnx", "sha256": _sha(folder / "weights.onnx"),
                                            "architecture": arch}
    _write_rdf(folder, rdf)
    with pytest.raises(UntrustedPackageError, match=what):
        load_package(folder)
    code, err = _cli(["validate", folder], capsys)
    assert code == 1 and "refusing to run it" in err
    assert not (tmp_path / "marker").exists()


def test_validate_refuses_a_modeling_name_that_is_no_model_class(tmp_path):
    """The name check is by prefix; validate also checks the object: a torch module class defined there."""
    from usam_exporters.writer import validate_package

    folder = make_package(tmp_path / "p")
    rdf = _rdf(folder)
    rdf["weights"]["pytorch_state_dict"] = {"source": "weights.onnx", "sha256": _sha(folder / "weights.onnx"),
                                            "architecture": {"callable": "build_sam",
                                                             "import_from": "usam_bioimageio.modeling"}}
    _write_rdf(folder, rdf)
    with pytest.raises(UntrustedPackageError, match="build_sam is not a model class"):
        validate_package(folder)


def test_weight_formats_that_can_run_code_are_refused(tmp_path):
    folder = make_package(tmp_path / "p")
    rdf = _rdf(folder)
    rdf["weights"]["keras_hdf5"] = {"source": "weights.onnx", "sha256": _sha(folder / "weights.onnx")}
    _write_rdf(folder, rdf)
    for check in (load_package, read_package_rdf):
        with pytest.raises(UntrustedPackageError, match="keras_hdf5"):
            check(folder)


# --------------------------------------------------------------------------------------------------------------
# 2. no file outside the package
# --------------------------------------------------------------------------------------------------------------

OUTSIDE = ["/etc/passwd", "file:///etc/passwd", "../secret.onnx", "sub/../../secret.onnx", "http://127.0.0.1:9/x",
           "C:/x.onnx", "sub\\..\\..\\x", "."]


@pytest.mark.parametrize("source", OUTSIDE)
def test_weights_outside_the_package_are_refused(tmp_path, source):
    folder = make_package(tmp_path / "p")
    rdf = _rdf(folder)
    rdf["weights"]["onnx"]["source"] = source
    _write_rdf(folder, rdf)
    for check in (load_package, read_package_rdf):
        with pytest.raises(UntrustedPackageError, match="not a file inside the package"):
            check(folder)


@pytest.mark.parametrize("field", ["test_tensor", "sample_tensor", "documentation", "covers", "external_data",
                                   "attachments"])
def test_other_files_outside_the_package_are_refused(tmp_path, field):
    folder = make_package(tmp_path / "p")
    rdf = _rdf(folder)
    bad = {"source": "file:///etc/passwd", "sha256": "0" * 64}
    if field in ("test_tensor", "sample_tensor"):
        rdf["inputs"][0][field] = bad
    elif field == "external_data":
        rdf["weights"]["onnx"][field] = bad
    elif field == "attachments":
        rdf[field] = [bad]
    else:
        rdf[field] = "../../README.md" if field == "documentation" else ["/etc/cover.png"]
    _write_rdf(folder, rdf)
    for check in (load_package, read_package_rdf):
        with pytest.raises(UntrustedPackageError, match="not a file inside the package"):
            check(folder)


def test_weights_symlinked_out_of_the_package_are_refused(tmp_path):
    folder = make_package(tmp_path / "p")
    outside = tmp_path / "outside.onnx"
    shutil.move(folder / "weights.onnx", outside)
    (folder / "weights.onnx").symlink_to(outside)
    with pytest.raises(UntrustedPackageError, match="lead outside the package"):
        load_package(folder)


def test_validate_refuses_files_symlinked_out_of_the_package(tmp_path, capsys):
    folder = make_package(tmp_path / "p")
    secret = tmp_path / "secret.npy"
    shutil.move(folder / "test_input_x.npy", secret)
    (folder / "test_input_x.npy").symlink_to(secret)
    code, err = _cli(["validate", folder], capsys)
    assert code == 1 and "inputs[0].test_tensor 'test_input_x.npy' leads outside the package" in err, err


def test_remote_rdf_pointing_at_a_local_file_is_refused(tmp_path, cache):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(_onnx_bytes())
    www = tmp_path / "www"
    folder = make_package(www / "pkg")
    rdf = _rdf(folder)
    rdf["weights"]["onnx"] = {"source": secret.as_uri(), "sha256": _sha(secret)}
    _write_rdf(folder, rdf)
    with serve(www) as (base, requests):
        with pytest.raises(UntrustedPackageError, match="file://"):
            load_package(f"{base}/pkg/rdf.yaml")
    assert requests == ["/pkg/rdf.yaml"]  # nothing else was fetched
    assert not any(f.read_bytes() == secret.read_bytes() for f in _files(cache))
    assert not _files(cache)  # the refused rdf.yaml is not kept either


def test_remote_rdf_with_relative_sources_loads_and_runs(tmp_path, cache):
    www = tmp_path / "www"
    make_package(www / "pkg")
    with serve(www) as (base, requests):
        package = load_package(f"{base}/pkg/rdf.yaml")
    assert "/pkg/weights.onnx" in requests
    x = np.arange(4, dtype=np.float32)[None]
    np.testing.assert_array_equal(Runner(package)(x=x)["y"], x)


# --------------------------------------------------------------------------------------------------------------
# 3. weights are checked against their rdf sha256 when loaded
# --------------------------------------------------------------------------------------------------------------


def test_swapped_weights_are_refused(tmp_path, capsys):
    family = tmp_path / "family"
    folder = make_package(family / "image_encoder")
    (folder / "weights.onnx").write_bytes(_onnx_bytes("Neg"))  # another valid ONNX under the package's identity
    package = load_package(folder)
    with pytest.raises(ChecksumError, match=r"weights weights\.onnx of package 'tiny package' .* do not match the "
                                            r"sha256 in rdf\.yaml \(tampered or corrupt\)"):
        Runner(package)
    image = _image(tmp_path)
    code, err = _cli(["embed", "--model", family, "--image", image, "--out", tmp_path / "e.npz"], capsys)
    assert code == 1 and "tampered or corrupt" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e.npz").exists()


def test_tampered_cached_copy_is_refused(tmp_path, cache):
    zipped = _zip(make_package(tmp_path / "p"), tmp_path / "p.zip")
    package = load_package(zipped)
    Runner(package)
    assert cache in package.root.parents
    (package.root / "weights.onnx").write_bytes(_onnx_bytes("Neg"))
    again = load_package(zipped)  # the unpacked copy in the cache is reused...
    assert again.root == package.root
    with pytest.raises(ChecksumError, match="tampered or corrupt"):  # ...and checked
        Runner(again)


def test_weights_are_hashed_once_per_process(tmp_path, monkeypatch):
    calls = []
    real = packages.sha256_of
    monkeypatch.setattr(packages, "sha256_of", lambda p: calls.append(p) or real(p))
    package = load_package(make_package(tmp_path / "p"))
    Runner(package)
    Runner(package)
    assert len(calls) == 1
    weights = package.weights_path("onnx")
    weights.write_bytes(_onnx_bytes("Neg"))  # another size and mtime: hashed again, and refused
    with pytest.raises(ChecksumError):
        Runner(package)
    assert len(calls) == 2


def test_weights_without_sha256_are_refused(tmp_path):
    folder = make_package(tmp_path / "p")
    rdf = _rdf(folder)
    del rdf["weights"]["onnx"]["sha256"]
    _write_rdf(folder, rdf)
    with pytest.raises(PackageError, match="no sha256"):
        load_package(folder)


# --------------------------------------------------------------------------------------------------------------
# 4. zips are bounded
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A ~300 KB package zip whose member big.bin unpacks to 300 MiB of zeros."""
    folder = make_package(tmp_path_factory.mktemp("bomb") / "p")
    path = folder.parent / "bomb.zip"
    _zip(folder, path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("big.bin", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(300):
            f.write(chunk)
    assert path.stat().st_size < 400_000
    return path


def test_zip_bomb_is_refused_and_leaves_nothing(bomb, cache, capsys):
    with pytest.raises(UntrustedPackageError, match=r"big\.bin.*compressed more than 200:1"):
        load_package(bomb)
    assert not _files(cache) and not list((cache / "packages").glob(".unpack-*"))
    code, err = _cli(["validate", bomb], capsys)
    assert code == 1 and "zip bomb" in err


def test_zip_limits_come_from_the_environment(tmp_path, cache, monkeypatch):
    zipped = _zip(make_package(tmp_path / "p"), tmp_path / "p.zip")
    monkeypatch.setenv("USAM_MAX_UNPACKED_BYTES", "1000")
    with pytest.raises(UntrustedPackageError, match=r"more than 1000 bytes \(\$USAM_MAX_UNPACKED_BYTES\)"):
        load_package(zipped)
    assert not _files(cache)
    monkeypatch.setenv("USAM_MAX_UNPACKED_BYTES", "lots")
    with pytest.raises(UsamError, match="USAM_MAX_UNPACKED_BYTES must be a positive number"):
        load_package(zipped)
    monkeypatch.delenv("USAM_MAX_UNPACKED_BYTES")
    assert load_package(zipped).kind == "image_encoder"


def test_zip_whose_declared_sizes_lie_is_refused_while_unpacking(tmp_path, cache, monkeypatch):
    """The central directory says 1000 bytes, the member holds 2 MiB: unpacking stops at the declared size."""
    import struct

    folder = make_package(tmp_path / "p")
    path = _zip(folder, tmp_path / "p.zip")
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", np.random.default_rng(0).bytes(2 << 20))
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last central directory entry: big.bin
    struct.pack_into("<I", data, central + 24, 1000)
    local = data.rfind(b"PK\x03\x04", 0, central)
    struct.pack_into("<I", data, local + 22, 1000)
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="big.bin|corrupt"):
        load_package(path)
    assert not _files(cache)


# --------------------------------------------------------------------------------------------------------------
# 5. downloads that fail to parse are not kept
# --------------------------------------------------------------------------------------------------------------

HTML = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n"


def test_html_page_as_package_zip_is_removed_from_the_cache(tmp_path, cache):
    with serve(tmp_path, {"/model.zip": ("text/html", HTML)}) as (base, requests):
        for _ in range(2):
            with pytest.raises(PackageError, match=r"not a package zip.*removed the download .* from the cache"):
                load_package(f"{base}/model.zip")
            assert not _files(cache)
    assert requests == ["/model.zip", "/model.zip"]  # downloaded again, not reused


def test_html_page_as_rdf_is_removed_from_the_cache(tmp_path, cache):
    with serve(tmp_path, {"/pkg/rdf.yaml": ("text/html", HTML)}) as (base, requests):
        with pytest.raises(PackageError, match="removed the download"):
            load_package(f"{base}/pkg/rdf.yaml")
    assert not _files(cache)


def test_html_page_as_checkpoint_is_removed_from_the_cache(tmp_path, cache):
    from usam_bioimageio.training.checkpoints import load_checkpoint

    with serve(tmp_path, {"/vit_t.pt": ("text/html", HTML)}) as (base, requests):
        for _ in range(2):
            with pytest.raises(ValueError, match=r"HTML page.*removed the download .* from the cache"):
                load_checkpoint(f"{base}/vit_t.pt", progress=False)
            assert not _files(cache)
    assert requests == ["/vit_t.pt", "/vit_t.pt"]


def test_local_checkpoint_that_fails_to_parse_is_never_removed(tmp_path, cache):
    from usam_bioimageio.training.checkpoints import load_checkpoint

    path = tmp_path / "vit_t.pt"
    path.write_bytes(HTML)
    for source in (path, path.as_uri()):
        with pytest.raises(ValueError, match="not a torch checkpoint"):
            load_checkpoint(str(source), progress=False)
    assert path.read_bytes() == HTML


# --------------------------------------------------------------------------------------------------------------
# 6. broken descriptions and weights: one error, never a traceback
# --------------------------------------------------------------------------------------------------------------

BROKEN_RDFS = {
    "bad yaml": b"type: model\nweights: [\n",
    "not utf-8": b"type: model\nname: \xff\xfe\n",
    "a list": b"- type\n- model\n",
    "deep nesting": b"type: model\nweights: " + b"[" * 1000 + b"]" * 1000 + b"\n",
    "no weights": {"weights": None},
    "weights a list": {"weights": ["onnx"]},
    "weights entry a string": {"weights": {"onnx": "weights.onnx"}},
    "no source": {"weights": {"onnx": {"sha256": "0" * 64}}},
    "source a number": {"weights": {"onnx": {"source": 7, "sha256": "0" * 64}}},
    "no inputs": {"inputs": None},
    "inputs of strings": {"inputs": ["x"]},
    "config a list": {"config": [1, 2]},
    "usam a string": {"config": {"usam": "image_encoder"}},
    "image_encoder a list": {"config": {"usam": {"kind": "prompt_decoder", "image_encoder": [1]}}},
    "covers a string": {"covers": "cover.png"},
}


def _broken(folder: Path, case) -> Path:
    make_package(folder)
    if isinstance(case, bytes):
        (folder / "rdf.yaml").write_bytes(case)
    else:
        rdf = _rdf(folder)
        rdf.update(case)
        _write_rdf(folder, rdf)
    return folder


@pytest.mark.parametrize("name", list(BROKEN_RDFS))
def test_broken_rdf_is_one_package_error(tmp_path, capsys, name):
    folder = _broken(tmp_path / "p", BROKEN_RDFS[name])
    with pytest.raises(PackageError):
        load_package(folder)
    with pytest.raises(PackageError):
        load_package(_zip(folder, tmp_path / "p.zip"))
    code, err = _cli(["validate", folder], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "rdf.yaml" in err, err


@pytest.mark.parametrize("manifest", [
    "packages: [\n", "- a\n", "packages: 3\n", "packages:\n  image_encoder: enc.zip\n",
    "packages:\n  image_encoder:\n    sha256: abc\n", "packages:\n  image_encoder:\n    file: /etc/passwd\n",
    "packages:\n  image_encoder:\n    file: [1]\n",
])
def test_broken_family_yaml_is_one_package_error(tmp_path, capsys, manifest):
    family = tmp_path / "family"
    make_package(family / "image_encoder")
    (family / "family.yaml").write_text(manifest)
    with pytest.raises(PackageError, match="family.yaml"):
        load_family(family)
    image = _image(tmp_path)
    code, err = _cli(["embed", "--model", family, "--image", image, "--out", tmp_path / "e.npz"], capsys)
    assert code == 1 and "family.yaml" in err and len(err.splitlines()) == 1, err


def test_truncated_onnx_is_one_package_error(tmp_path, capsys):
    """Weights whose hash is right but which ONNX Runtime cannot read (broken when the package was made)."""
    family = tmp_path / "family"
    make_package(family / "image_encoder", onnx=_onnx_bytes()[:-20])
    with pytest.raises(PackageError, match=r"ONNX Runtime cannot load the onnx weights .*weights\.onnx"):
        Runner(load_package(family / "image_encoder"))
    image = _image(tmp_path)
    code, err = _cli(["embed", "--model", family, "--image", image, "--out", tmp_path / "e.npz"], capsys)
    assert code == 1 and "weights.onnx" in err and len(err.splitlines()) == 1, err


def test_onnx_of_other_tensors_than_described_is_one_package_error(tmp_path):
    folder = make_package(tmp_path / "p")
    rdf = _rdf(folder)
    rdf["inputs"][0]["id"] = "image"
    _write_rdf(folder, rdf)
    with pytest.raises(PackageError, match=r"take \['x'\] and give \['y'\], but its rdf.yaml describes"):
        Runner(load_package(folder))


def test_truncated_torchscript_is_one_package_error(tmp_path):
    folder = make_package(tmp_path / "p")
    (folder / "weights_torchscript.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    rdf = _rdf(folder)
    rdf["weights"]["torchscript"] = {"source": "weights_torchscript.pt",
                                     "sha256": _sha(folder / "weights_torchscript.pt")}
    _write_rdf(folder, rdf)
    with pytest.raises(PackageError, match="torch cannot load the torchscript weights"):
        Runner(load_package(folder), weight_format="torchscript")


# --------------------------------------------------------------------------------------------------------------
# 7. fuzzing the rdf loader
# --------------------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")  # in the test extra; a missing one is reported as a skip here only
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

KEYS = ["type", "weights", "onnx", "torchscript", "pytorch_state_dict", "source", "sha256", "architecture",
        "callable", "import_from", "kwargs", "inputs", "outputs", "id", "config", "usam", "kind", "image_encoder",
        "identity", "test_tensor", "covers", "documentation", "attachments", "external_data", "name", "files"]
LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
          | st.sampled_from(["model", "image_encoder", "weights.onnx", "../x", "file:///etc/passwd", "os", "0" * 64,
                             "usam_bioimageio.modeling", "conda:env.yaml"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
                      max_leaves=25)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_all(folder: Path) -> None:
    """load_package and what is read from a loaded package: only our errors may come out."""
    try:
        package = load_package(folder)
        package.identity, package.encoder_identity, package.kind, package.model_type, package.weight_formats
        for fmt in package.weight_formats:
            packages.verified_weights(package, fmt)
    except UsamError:
        pass


@FUZZ
@given(rdf=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8), model=st.booleans())
def test_fuzz_random_rdf(tmp_path, rdf, model):
    folder = make_package(tmp_path / "fuzz")
    if model:
        rdf["type"] = "model"
    _write_rdf(folder, rdf)
    _load_all(folder)


PATHS = [("weights",), ("weights", "onnx"), ("weights", "onnx", "source"), ("weights", "onnx", "sha256"),
         ("weights", "onnx", "external_data"), ("weights", "pytorch_state_dict"), ("inputs",), ("inputs", 0),
         ("inputs", 0, "id"), ("inputs", 0, "test_tensor"), ("outputs",), ("config",), ("config", "usam"),
         ("config", "usam", "kind"), ("config", "usam", "image_encoder"), ("documentation",), ("covers",),
         ("attachments",), ("name",), ("type",), ("icon",)]


@FUZZ
@given(path=st.sampled_from(PATHS), value=VALUES)
def test_fuzz_one_field_of_a_valid_rdf(tmp_path, path, value):
    folder = make_package(tmp_path / "fuzz")
    rdf = _rdf(folder)
    node = rdf
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _write_rdf(folder, rdf)
    _load_all(folder)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_rdf_text(tmp_path, text):
    folder = make_package(tmp_path / "fuzz")
    (folder / "rdf.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    _load_all(folder)
    family = tmp_path / "family"
    family.mkdir(exist_ok=True)
    (family / "family.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_family(family)
    except UsamError:
        pass


@functools.lru_cache(maxsize=None)
def _zip_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _zip(make_package(Path(tmp) / "p"), Path(tmp) / "p.zip").read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 10**6))
def test_fuzz_corrupted_package_zip(tmp_path, cache, edits, cut):
    data = bytearray(_zip_bytes())
    for index, value in edits:
        data[index % len(data)] = value
    path = tmp_path / "fuzz.zip"
    path.write_bytes(bytes(data[: None if cut is None else cut % len(data)]))
    for check in (load_package, read_package_rdf):
        try:
            check(path)
        except UsamError:
            pass
