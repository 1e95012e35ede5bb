"""Load our bioimage.io packages and families of them.

A *package* is one bioimage.io model (image encoder, prompt decoder, AIS ...); a *family* is the set of
packages exported from one checkpoint. Packages are read from a folder, a zip, a URL (zip or rdf.yaml)
or a bioimage.io id. Zips are unpacked once into the cache, keyed by their sha256.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Mapping, Optional, Union
from urllib.parse import urljoin, urlparse

import yaml

from usam_bioimageio.errors import PackageError
from usam_bioimageio.io.download import fetch, sha256_of
from usam_bioimageio.settings import cache_dir

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
FAMILY_FILE = "family.yaml"
KINDS = ("image_encoder", "prompt_decoder", "ais", "ais_head")
IDENTITY_FORMATS = ("onnx", "torchscript", "pytorch_state_dict")
# the packages that take the image encoder's embeddings (the end-to-end ``ais`` holds its own encoder)
EMBEDDING_CONSUMERS = ("prompt_decoder", "ais_head")
# bioimage.io resolves an id to its rdf.yaml here (bioimageio.spec settings.collection_http_pattern).
BIOIMAGEIO_RDF_URL = "https://hypha.aicell.io/bioimage-io/artifacts/{id}/files/rdf.yaml"


@dataclass(frozen=True)
class Package:
    """An unpacked package: its folder, its parsed rdf and our ``config.usam`` section."""

    root: Path
    rdf: Mapping
    source: str

    @property
    def config(self) -> Mapping:
        return self.rdf.get("config", {}).get("usam", {})

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.rdf.get("name", ""))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def weight_formats(self) -> tuple:
        return tuple(self.rdf.get("weights", {}))

    def weights_path(self, weight_format: str) -> Path:
        entry = self.rdf.get("weights", {}).get(weight_format)
        if entry is None:
            raise PackageError(
                f"package {self.name!r} has no {weight_format!r} weights; it has {list(self.weight_formats)}"
            )
        return self.root / entry["source"]

    def weights_sha256(self, weight_format: str) -> str:
        return str(self.rdf["weights"][weight_format].get("sha256", ""))

    @property
    def identity(self) -> str:
        """What embeddings and siblings are checked against: the sha256 of the package's weights, of the first
        format it has of ONNX, torchscript, pytorch_state_dict (an ONNX-holding encoder: its ONNX weights)."""
        for fmt in IDENTITY_FORMATS:
            if fmt in self.weight_formats and self.weights_sha256(fmt):
                return self.weights_sha256(fmt)
        raise PackageError(f"package {self.name!r} has no weights with a sha256 (rdf.yaml weights)")

    @property
    def encoder_identity(self) -> str:
        """The identity of the image encoder this decoder was exported for ("" if it records none)."""
        recorded = self.config.get("image_encoder", {})
        return str(recorded.get("identity") or recorded.get("onnx_sha256") or "")  # onnx_sha256: before 0.1.1


@dataclass(frozen=True)
class Family:
    """The packages exported from one checkpoint, by kind."""

    packages: Dict[str, Package] = field(default_factory=dict)

    def get(self, kind: str) -> Package:
        if kind not in self.packages:
            raise PackageError(f"this model family has no {kind!r} package; it has {sorted(self.packages)}")
        return self.packages[kind]

    def __contains__(self, kind: str) -> bool:
        return kind in self.packages


def _find_rdf(folder: Path) -> Path:
    for name in RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise PackageError(f"{folder} holds no rdf.yaml / bioimageio.yaml: not a bioimage.io package")


def _read_rdf(path: Path) -> dict:
    try:
        rdf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise PackageError(f"cannot read {path}: {err}") from err
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise PackageError(f"{path} is not a bioimage.io model description")
    return rdf


def _check_weights(package: Package) -> None:
    for fmt, entry in package.rdf.get("weights", {}).items():
        path = package.root / entry["source"]
        if not path.is_file():
            raise PackageError(f"package {package.name!r}: {fmt} weights {entry['source']} are missing")


def _safe_members(zf: zipfile.ZipFile) -> list:
    members = zf.namelist()
    for name in members:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            raise PackageError(f"refusing zip member with unsafe path {name!r}")
    return members


def _unpack_zip(path: Path) -> Path:
    digest = sha256_of(path)
    target = cache_dir() / "packages" / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise PackageError(f"{path} is corrupt (member {bad!r} fails its CRC check)")
            zf.extractall(tmp, members=_safe_members(zf))
        os.replace(tmp, target)
    except zipfile.BadZipFile as err:
        raise PackageError(f"{path} is not a valid zip (truncated or corrupt): {err}") from err
    except OSError as err:
        if target.is_dir():  # another process unpacked it first
            return target
        raise PackageError(f"cannot unpack {path}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch_rdf_package(url: str, *, sha256: Optional[str]) -> Path:
    """Download an rdf.yaml and the weights it references (hash-checked) into one cached folder."""
    import hashlib

    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    folder = cache_dir() / "urls" / key
    rdf_path = fetch(url, sha256=sha256, filename=f"{key}-rdf.yaml", progress=False)
    rdf = _read_rdf(rdf_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
    try:
        shutil.copyfile(rdf_path, tmp / "rdf.yaml")
        for entry in rdf.get("weights", {}).values():
            source = PurePosixPath(entry["source"])
            if source.is_absolute() or ".." in source.parts:
                raise PackageError(f"{url}: refusing weights with unsafe path {entry['source']!r}")
            local = fetch(urljoin(url, entry["source"]), sha256=entry.get("sha256"), filename=f"{key}-{source.name}")
            (tmp / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, tmp / source)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_package(source: Union[str, os.PathLike], *, sha256: Optional[str] = None) -> Package:
    """Load a package from a folder, a .zip, a URL (of a zip or an rdf.yaml) or a bioimage.io id.

    ``sha256`` checks the zip (or rdf.yaml) before it is used.
    """
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        root = path
    elif path.is_file():
        if sha256 is not None and sha256_of(path) != sha256:
            raise PackageError(f"{path}: sha256 {sha256_of(path)} differs from the expected {sha256}")
        if path.suffix == ".zip" or zipfile.is_zipfile(path):
            root = _unpack_zip(path)
        elif path.name in RDF_NAMES:
            root = path.parent
        else:
            raise PackageError(f"{path} is neither a package folder, a zip nor an rdf.yaml")
    elif urlparse(src).scheme in ("http", "https", "file"):
        if src.endswith((".yaml", ".yml")):
            root = _fetch_rdf_package(src, sha256=sha256)
        else:
            root = _unpack_zip(fetch(src, sha256=sha256))
    elif "/" not in src and src and not path.suffix:
        root = _fetch_rdf_package(BIOIMAGEIO_RDF_URL.format(id=src), sha256=sha256)
    else:
        raise FileNotFoundError(f"no package at {src!r} (not a folder, file, URL or bioimage.io id)")
    package = Package(root=root, rdf=_read_rdf(_find_rdf(root)), source=src)
    if package.kind not in KINDS:
        raise PackageError(f"{src}: not a usam-bioimageio package (config.usam.kind is {package.kind!r})")
    _check_weights(package)
    return package


def load_family(source: Union[str, os.PathLike]) -> Family:
    """Load every package of a family from a folder (with family.yaml, or all zips/packages in it).

    family.yaml lists each member's file and sha256; a member whose hash differs is refused. Members
    must agree on the image encoder they were exported with.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        package = load_package(source)
        return Family({package.kind: package})
    packages: Dict[str, Package] = {}
    manifest = folder / FAMILY_FILE
    if manifest.is_file():
        entries = (yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}).get("packages", {})
        for kind, entry in entries.items():
            packages[kind] = load_package(folder / entry["file"], sha256=entry.get("sha256"))
    else:
        candidates = sorted(folder.glob("*.zip")) + sorted(p.parent for p in folder.glob("*/rdf.yaml"))
        for candidate in candidates:
            package = load_package(candidate)
            if package.kind in packages:
                raise PackageError(f"{folder} holds two {package.kind} packages; add a {FAMILY_FILE}")
            packages[package.kind] = package
    if not packages:
        raise PackageError(f"{folder} holds no usam-bioimageio packages")
    family = Family(packages)
    check_siblings(family)
    return family


def check_encoder(package: Package, identity: str, what: str) -> None:
    """Refuse ``package`` (a decoder) with embeddings of (or next to) an image encoder of another ``identity``.

    ``identity`` "" (embeddings from micro-sam's caches, which record none of our packages) is not checked;
    a decoder that records no encoder identity is refused: without it no check could be made.
    """
    expected = package.encoder_identity
    if not expected:
        raise PackageError(f"{package.name!r} records no image encoder identity (config.usam.image_encoder."
                           "identity): re-export it with `usam export`")
    if identity and identity != expected:
        raise PackageError(f"{package.name!r} was exported for another image encoder ({expected[:12]}...) than "
                           f"{what} ({identity[:12]}...): packages of different models are mixed")


def check_siblings(family: Family) -> None:
    """Refuse a family whose decoders were exported for another image encoder than the one present."""
    if "image_encoder" not in family:
        return
    encoder = family.get("image_encoder")
    for kind, package in family.packages.items():
        if kind in EMBEDDING_CONSUMERS:
            check_encoder(package, encoder.identity, f"the family's encoder {encoder.name!r}")
