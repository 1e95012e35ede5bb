"""Load our bioimage.io packages and families of them.

A *package* is one bioimage.io model (image encoder, prompt decoder, AIS ...); a *family* is the set of
packages exported from one checkpoint. Packages are read from a folder, a zip, a URL (zip or rdf.yaml)
or a bioimage.io id. Zips are unpacked once into the cache, keyed by their sha256.

Packages are untrusted input. Before anything is unpacked, fetched or run, the rdf.yaml is read (yaml.safe_load)
and checked (:func:`check_rdf`): its structure (a broken one is one PackageError), its architectures (only
``usam_bioimageio.modeling``'s callables, never a code file), its weight formats, and every file it names (a plain
relative path inside the package, never absolute, ``..``, ``file://`` or another URL). Zips are bounded in size
and compression ratio (``settings.max_unpacked_bytes``, ``settings.max_compression_ratio``); weights are checked
against their rdf sha256 when a runner loads them (:func:`verified_weights`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote, urljoin, urlparse

import yaml

from usam_bioimageio import registry, settings
from usam_bioimageio.errors import ChecksumError, PackageError, UntrustedPackageError, UsageError
from usam_bioimageio.io.download import fetch, sha256_of
from usam_bioimageio.settings import cache_dir

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
# the names bioimageio.spec takes for a description, in its order (also any file ending in "." + one of them)
BIOIMAGEIO_RDF_NAMES = ("rdf.yaml", "bioimageio.yaml", "model.yaml")
FAMILY_FILE = "family.yaml"
KINDS = ("image_encoder", "prompt_decoder", "ais", "ais_head")
ENCODER_PRECISIONS = ("fp32", "int8", "fp16")
IDENTITY_FORMATS = ("onnx", "torchscript", "pytorch_state_dict")
# the packages that take the image encoder's embeddings (the end-to-end ``ais`` holds its own encoder)
EMBEDDING_CONSUMERS = ("prompt_decoder", "ais_head")
# bioimage.io resolves an id to its rdf.yaml here (bioimageio.spec settings.collection_http_pattern).
BIOIMAGEIO_RDF_URL = "https://hypha.aicell.io/bioimage-io/artifacts/{id}/files/rdf.yaml"
# the only module whose callables a package's pytorch_state_dict architecture may name
TRUSTED_ARCHITECTURE_MODULE = "usam_bioimageio.modeling"
# the weight formats we (and our packages) use; others can run code when loaded (keras Lambda layers, TF graphs)
SUPPORTED_WEIGHT_FORMATS = ("onnx", "torchscript", "pytorch_state_dict")
MAX_RDF_BYTES = 16 * 2**20  # our rdf.yaml files are ~10 kB; a huge one is not a description
_RATIO_MIN_BYTES = 1 << 20  # tiny members (a 0-byte file, a small mask) compress far better than 200:1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
# what reading a broken zip raises besides BadZipFile: a corrupt deflate stream, an encrypted member
# (RuntimeError), an unknown compression method (NotImplementedError), a truncated member (EOFError)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Package:
    """An unpacked package: its folder, its parsed rdf and our ``config.usam`` section."""

    root: Path
    rdf: Mapping
    source: str

    @property
    def config(self) -> Mapping:
        return (self.rdf.get("config") or {}).get("usam") or {}

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
    def image_size(self) -> int:
        """The model's input size N (``config.usam.image_size``; 1024 for packages that record none, as every
        package exported before sizes other than SAM's existed)."""
        value = self.config.get("image_size", registry.IMAGE_SIZE)
        try:
            return registry.check_image_size(value)
        except ValueError as err:
            raise PackageError(f"package {self.name!r}: config.usam.image_size: {err}") from None

    @property
    def pixel_scale(self) -> float:
        """The pixel scale the model was trained at (``config.usam.pixel_scale``; 1 for packages that record none):
        it segments best on images enlarged this many times (``runtime.pixel_scale``)."""
        from usam_bioimageio.runtime.pixel_scale import check_scale

        try:
            return check_scale(self.config.get("pixel_scale", 1.0))
        except (TypeError, ValueError) as err:
            raise PackageError(f"package {self.name!r}: config.usam.pixel_scale: {err}") from None

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
    def precision(self) -> str:
        """"fp32", or the reduced precision of an encoder variant (``config.usam.precision``: int8, fp16)."""
        return str(self.config.get("precision", "fp32"))

    @property
    def identity(self) -> str:
        """What embeddings and siblings are checked against: the sha256 of the package's weights, of the first
        format it has of ONNX, torchscript, pytorch_state_dict (an ONNX-holding encoder: its ONNX weights). A
        reduced-precision encoder variant: its fp32 encoder's identity + "+int8" (or "+fp16"), so that the
        family's decoders take its embeddings while caches keep them apart from the fp32 encoder's."""
        if self.precision != "fp32":
            reference = str(self.config.get("reference_identity") or "")
            if not reference:
                raise PackageError(f"package {self.name!r} is a {self.precision} variant that records no "
                                   "reference_identity (config.usam)")
            return f"{reference}+{self.precision}"
        for fmt in IDENTITY_FORMATS:
            if fmt in self.weight_formats and self.weights_sha256(fmt):
                return self.weights_sha256(fmt)
        raise PackageError(f"package {self.name!r} has no weights with a sha256 (rdf.yaml weights)")

    @property
    def encoder_identity(self) -> str:
        """The identity of the image encoder this decoder was exported for ("" if it records none)."""
        recorded = self.config.get("image_encoder") or {}
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

    @property
    def image_size(self) -> int:
        """The input size N of the family's model (its packages agree: :func:`check_siblings`)."""
        return next(iter(self.packages.values())).image_size

    @property
    def pixel_scale(self) -> float:
        """The pixel scale the family's model was trained at (its packages agree: :func:`check_siblings`)."""
        return next(iter(self.packages.values())).pixel_scale


def _find_rdf(folder: Path) -> Path:
    for name in RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise PackageError(f"{folder} holds no rdf.yaml / bioimageio.yaml: not a bioimage.io package")


def parse_rdf(data: bytes, where: str, *, runtime: bool = True, allow_code: bool = False) -> dict:
    """The rdf.yaml ``data`` (of ``where``) parsed with yaml.safe_load and checked with :func:`check_rdf`."""
    if len(data) > MAX_RDF_BYTES:
        raise PackageError(f"{where} is {len(data)} bytes, more than an rdf.yaml holds (at most {MAX_RDF_BYTES})")
    try:
        rdf = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:  # deep nesting: RecursionError
        first = " ".join(str(err).split())[:300]
        raise PackageError(f"cannot read {where}: not valid YAML ({first})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise PackageError(f"{where} is not a bioimage.io model description (no 'type: model')")
    check_rdf(rdf, where, runtime=runtime, allow_code=allow_code)
    return rdf


def _read_rdf(path: Path, *, runtime: bool = True, allow_code: bool = False) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RDF_BYTES + 1)
    except OSError as err:
        raise PackageError(f"cannot read {path}: {err}") from err
    return parse_rdf(data, str(path), runtime=runtime, allow_code=allow_code)


# ----------------------------------------------------------------------------------------------------------------
# what an rdf.yaml may ask for
# ----------------------------------------------------------------------------------------------------------------


def _file_sources(rdf: Mapping, where: str) -> Iterator[Tuple[str, Any]]:
    """(field, value) for every file the rdf names (formats 0.4 and 0.5): weights, external data, environments,
    test and sample tensors, documentation, covers, attachments, a file icon."""

    def source(value: Any) -> Any:
        return value.get("source") if isinstance(value, dict) else value

    for fmt, entry in rdf.get("weights", {}).items():
        yield f"weights.{fmt}.source", entry.get("source")
        for key in ("external_data", "dependencies"):
            if entry.get(key) is not None:
                value = source(entry[key])
                if isinstance(value, str) and key == "dependencies" and value.startswith("conda:"):
                    value = value[len("conda:"):]  # format 0.4: "conda:environment.yaml"
                yield f"weights.{fmt}.{key}", value
    for group in ("inputs", "outputs"):
        for i, tensor in enumerate(rdf.get(group, [])):
            for key in ("test_tensor", "sample_tensor"):
                if tensor.get(key) is not None:
                    yield f"{group}[{i}].{key}", source(tensor[key])
    for key in ("test_inputs", "test_outputs", "sample_inputs", "sample_outputs", "covers"):  # lists (0.4: all)
        values = rdf.get(key)
        if values is not None:
            if not isinstance(values, list):
                raise PackageError(f"{where}: {key} must be a list of file names, not {type(values).__name__}")
            for i, value in enumerate(values):
                yield f"{key}[{i}]", source(value)
    if rdf.get("documentation") is not None:
        yield "documentation", source(rdf["documentation"])
    attachments = rdf.get("attachments")
    if isinstance(attachments, dict):  # format 0.4: {files: [...]}
        attachments = attachments.get("files")
    if attachments is not None:
        if not isinstance(attachments, list):
            raise PackageError(f"{where}: attachments must be a list, not {type(attachments).__name__}")
        for i, value in enumerate(attachments):
            yield f"attachments[{i}]", source(value)
    icon = rdf.get("icon")
    if isinstance(icon, str) and len(icon) > 2:  # one or two characters: an emoji, else a file or URL
        yield "icon", icon


def check_source(value: Any, field: str, where: str) -> PurePosixPath:
    """``value`` as a relative path inside the package; anything else (absolute, ``..``, a URL of any scheme,
    backslashes) is refused: a package never makes us read or fetch a file outside itself."""
    if not isinstance(value, str) or not value.strip():
        raise PackageError(f"{where}: {field} must be a file name, not {value!r}")
    path = PurePosixPath(value)
    # a colon in the first part: a URL scheme (file:, http:) or a drive letter
    if (value.startswith("/") or "\\" in value or "\0" in value or not path.parts or ":" in path.parts[0]
            or ".." in path.parts):
        raise UntrustedPackageError(f"{where}: {field} {value!r} is not a file inside the package (absolute paths, "
                                    "'..', 'file://' and other URLs are refused): refusing to read it")
    return path


def _check_architecture(fmt: str, entry: Mapping, where: str) -> None:
    arch = entry.get("architecture")
    if arch is None:
        if fmt == "pytorch_state_dict":
            raise PackageError(f"{where}: the pytorch_state_dict weights name no architecture")
        return
    if isinstance(arch, str):  # format 0.4: "module.path.Callable" or "file.py:Callable"
        if ":" in arch:
            file, _, name = arch.rpartition(":")
            arch = {"source": file, "callable": name}
        else:
            module, _, name = arch.rpartition(".")
            arch = {"import_from": module, "callable": name}
    if not isinstance(arch, dict):
        raise PackageError(f"{where}: weights.{fmt}.architecture must be a mapping, not {type(arch).__name__}")
    name = arch.get("callable")
    module = arch.get("import_from")
    if arch.get("source") is not None:
        raise UntrustedPackageError(
            f"{where}: architecture {name} comes from the code file {arch['source']!r} in the package, not from "
            f"{TRUSTED_ARCHITECTURE_MODULE}: refusing to run it")
    if not isinstance(name, str) or not isinstance(module, str):
        raise PackageError(f"{where}: weights.{fmt}.architecture needs the strings 'callable' and 'import_from'")
    if module != TRUSTED_ARCHITECTURE_MODULE and not module.startswith(TRUSTED_ARCHITECTURE_MODULE + "."):
        raise UntrustedPackageError(f"{where}: architecture {module}.{name} is not one of "
                                    f"{TRUSTED_ARCHITECTURE_MODULE}'s: refusing to run it")
    if not name.isidentifier() or name.startswith("_") or not all(p.isidentifier() for p in module.split(".")):
        raise UntrustedPackageError(f"{where}: architecture {module}.{name} is not a public callable of "
                                    f"{TRUSTED_ARCHITECTURE_MODULE}: refusing to run it")
    if arch.get("kwargs") is not None and not isinstance(arch["kwargs"], dict):
        raise PackageError(f"{where}: weights.{fmt}.architecture.kwargs must be a mapping")


def check_rdf(rdf: Mapping, where: str, *, runtime: bool = True, allow_code: bool = False) -> None:
    """Refuse an rdf whose structure we cannot use (one PackageError), or which asks for code outside
    ``usam_bioimageio.modeling``, a weight format we do not support, or a file outside the package
    (an UntrustedPackageError). Reads and runs nothing.

    ``runtime``: also what the runtime needs (tensor ids, a sha256 for every weights file); ``usam validate``
    leaves those to bioimageio.core. ``allow_code``: any architecture (the exporter testing a package it has just
    written from its caller's own module); never for a package from elsewhere."""
    for key, kind in (("weights", dict), ("inputs", list), ("outputs", list)):
        if not isinstance(rdf.get(key), kind) or not rdf[key]:
            found = "missing" if key not in rdf else f"a {type(rdf[key]).__name__}" if rdf[key] else "empty"
            raise PackageError(f"{where}: '{key}' must be a non-empty {'mapping' if kind is dict else 'list'} "
                               f"({found})")
    for key in ("config",):
        if rdf.get(key) is not None and not isinstance(rdf[key], dict):
            raise PackageError(f"{where}: '{key}' must be a mapping, not {type(rdf[key]).__name__}")
    usam = (rdf.get("config") or {}).get("usam")
    if usam is not None and not isinstance(usam, dict):
        raise PackageError(f"{where}: config.usam must be a mapping, not {type(usam).__name__}")
    if usam is not None and not isinstance(usam.get("image_encoder") or {}, dict):
        raise PackageError(f"{where}: config.usam.image_encoder must be a mapping")
    for group in ("inputs", "outputs"):
        for i, tensor in enumerate(rdf[group]):
            if not isinstance(tensor, dict) or (runtime and not isinstance(tensor.get("id"), str)):
                raise PackageError(f"{where}: {group}[{i}] must be a mapping with a string 'id'")
    for fmt, entry in rdf["weights"].items():
        if fmt not in SUPPORTED_WEIGHT_FORMATS:
            raise UntrustedPackageError(f"{where}: weights format {fmt!r} is not one of {SUPPORTED_WEIGHT_FORMATS} "
                                        "(other formats can run code when loaded): refusing it")
        if not isinstance(entry, dict):
            raise PackageError(f"{where}: weights.{fmt} must be a mapping, not {type(entry).__name__}")
        external = entry.get("external_data")
        if external is not None and not isinstance(external, dict):
            raise PackageError(f"{where}: weights.{fmt}.external_data must be a mapping with a source and a sha256")
        for key, value in ((f"weights.{fmt}", entry), (f"weights.{fmt}.external_data", external)):
            digest = None if value is None else value.get("sha256")
            if runtime and value is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
                raise PackageError(f"{where}: {key} has no sha256 (64 hex digits): unchecked weights are refused")
        if not allow_code:
            _check_architecture(fmt, entry, where)
    for name, value in _file_sources(rdf, where):
        check_source(value, name, where)


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())  # a symlink out of the package does not count
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False
    return True


def _check_weights(package: Package) -> None:
    for fmt, entry in package.rdf["weights"].items():
        files = [entry["source"]] + ([entry["external_data"]["source"]] if entry.get("external_data") else [])
        for name in files:
            path = package.root / name
            try:
                found, inside = path.is_file(), _inside(path, package.root)
            except (OSError, RuntimeError) as err:  # a name too long, a symlink loop
                raise PackageError(f"package {package.name!r}: cannot read its {fmt} weights {name}: {err}") from None
            if not found:
                raise PackageError(f"package {package.name!r}: {fmt} weights {name} are missing")
            if not inside:
                raise UntrustedPackageError(f"package {package.name!r}: {fmt} weights {name} lead outside the "
                                            f"package ({path.resolve()}): refusing them")


# (resolved path, size, mtime_ns) -> sha256: a vit_b encoder (~360 MB) is hashed once per process, not per runner
_HASHED: Dict[Tuple[str, int, int], str] = {}


def _sha256_memo(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_of(path)
    return _HASHED[key]


def verified_weights(package: Package, weight_format: str) -> Path:
    """The path of ``package``'s ``weight_format`` weights, once their sha256 (and their external data's) is the
    one in rdf.yaml: swapped, tampered or corrupt weights (cached copies included) are refused, never run."""
    path = package.weights_path(weight_format)
    entry = package.rdf["weights"][weight_format]
    checks = [(path, entry.get("sha256"))]
    if entry.get("external_data"):
        checks.append((package.root / entry["external_data"]["source"], entry["external_data"].get("sha256")))
    for file, expected in checks:
        if not expected:
            raise PackageError(f"weights {file.name} of package {package.name!r} have no sha256 in rdf.yaml")
        try:
            actual = _sha256_memo(file)
        except OSError as err:
            raise PackageError(f"cannot read weights {file} of package {package.name!r}: {err}") from err
        if actual != str(expected).lower():
            raise ChecksumError(f"weights {file.name} of package {package.name!r} ({package.root}) do not match the "
                                f"sha256 in rdf.yaml (tampered or corrupt): refusing them")
    return path


# ----------------------------------------------------------------------------------------------------------------
# zips
# ----------------------------------------------------------------------------------------------------------------


def check_zip(zf: zipfile.ZipFile, where: str) -> List[zipfile.ZipInfo]:
    """The members of ``zf`` once their names are safe (relative, no ``..``, no duplicates) and their declared
    sizes are within the limits (``settings.max_unpacked_bytes``, ``settings.max_compression_ratio``)."""
    limit, ratio = settings.max_unpacked_bytes(), settings.max_compression_ratio()
    members = zf.infolist()
    seen = set()
    total = 0
    for info in members:
        p = PurePosixPath(info.filename)
        if (not p.parts or p.is_absolute() or ".." in p.parts or "\\" in info.filename or ":" in info.filename
                or "\0" in info.filename):
            raise UntrustedPackageError(f"refusing zip member with unsafe path {info.filename!r} in {where}")
        if info.filename in seen:
            raise UntrustedPackageError(f"{where} holds {info.filename!r} twice: refusing it")
        seen.add(info.filename)
        total += info.file_size
        _check_bounds(info, info.file_size, total, where, limit, ratio)
    return members


def _check_bounds(info: zipfile.ZipInfo, size: int, total: int, where: str, limit: int, ratio: float) -> None:
    if total > limit:
        raise UntrustedPackageError(
            f"{where} unpacks to more than {limit} bytes (${settings.MAX_UNPACKED_ENV_VAR}): refusing it (a zip bomb?)")
    if size > _RATIO_MIN_BYTES and size > ratio * max(info.compress_size, 1):
        raise UntrustedPackageError(
            f"{where}: member {info.filename!r} is compressed more than {ratio:g}:1 ({size} bytes from "
            f"{info.compress_size}; ${settings.MAX_RATIO_ENV_VAR}): refusing it (a zip bomb?)")


def _rdf_in_zip(zf: zipfile.ZipFile, where: str, *, runtime: bool = True, allow_code: bool = False) -> dict:
    names = set(zf.namelist())
    for name in RDF_NAMES:
        if name in names:
            return _parse_member(zf, name, where, runtime=runtime, allow_code=allow_code)
    raise PackageError(f"{where} holds no rdf.yaml / bioimageio.yaml: not a bioimage.io package")


def _parse_member(zf: zipfile.ZipFile, name: str, where: str, **checks: bool) -> dict:
    info = zf.getinfo(name)
    if info.file_size > MAX_RDF_BYTES:
        raise PackageError(f"{where}: {name} is {info.file_size} bytes, more than an rdf.yaml holds")
    return parse_rdf(zf.read(info), f"{where}: {name}", **checks)


def _bioimageio_candidates(names) -> List[str]:
    """Every name bioimageio.spec could take for the description (identify_bioimageio_yaml_file_name), its pick
    first: all are checked, so that no second description slips past ours."""
    names = sorted(names)
    return list(dict.fromkeys(n for rdf_name in BIOIMAGEIO_RDF_NAMES for n in names
                              if n == rdf_name or n.endswith("." + rdf_name)))


def read_package_rdf(source: Union[str, os.PathLike], *, allow_code: bool = False) -> dict:
    """The checked rdf (:func:`check_rdf`, ``runtime=False``) of a local package (folder, zip or rdf.yaml), read
    without unpacking or running anything: what ``usam validate`` looks at before bioimageio.core may import
    anything."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = _bioimageio_candidates(p.name for p in path.iterdir() if p.is_file())
        if not found:
            raise PackageError(f"{path} holds no rdf.yaml / bioimageio.yaml: not a bioimage.io package")
        rdfs = [_read_rdf(path / name, runtime=False, allow_code=allow_code) for name in found]  # each checked
        for name, rdf in zip(found, rdfs):
            for field_name, value in _file_sources(rdf, name):
                file = path / value
                if (file.exists() or file.is_symlink()) and not _inside(file, path):  # a zip holds no symlinks
                    raise UntrustedPackageError(f"{path / name}: {field_name} {value!r} leads outside the package "
                                                f"({file.resolve()}): refusing to read it")
        return rdfs[0]
    if not path.is_file():
        raise PackageError(f"no package at {path}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                check_zip(zf, str(path))
                found = _bioimageio_candidates(zf.namelist())
                if not found:
                    raise PackageError(f"{path} holds no rdf.yaml / bioimageio.yaml: not a bioimage.io package")
                rdfs = [_parse_member(zf, name, str(path), runtime=False, allow_code=allow_code) for name in found]
                return rdfs[0]
        except (*_ZIP_ERRORS, OSError) as err:  # OSError: a seek to an offset a corrupt header gives
            raise PackageError(f"{path} is not a valid zip (truncated or corrupt): {err}") from err
    if path.suffix == ".zip":
        raise PackageError(f"{path} is not a valid zip (truncated or corrupt)")
    return _read_rdf(path, runtime=False, allow_code=allow_code)


def _extract(zf: zipfile.ZipFile, members: List[zipfile.ZipInfo], target: Path, where: str) -> None:
    """Unpack ``members`` into ``target``, counting the bytes written: the declared sizes are not trusted."""
    limit, ratio = settings.max_unpacked_bytes(), settings.max_compression_ratio()
    total = 0
    for info in members:
        dest = target / info.filename
        if info.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(dest, "xb") as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                written += len(chunk)
                total += len(chunk)
                if written > info.file_size:
                    raise UntrustedPackageError(f"{where}: member {info.filename!r} unpacks to more than its "
                                                f"declared {info.file_size} bytes: refusing it")
                _check_bounds(info, written, total, where, limit, ratio)
                out.write(chunk)


def _unpack_zip(path: Path) -> Path:
    digest = sha256_of(path)
    target = cache_dir() / "packages" / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(path) as zf:
            members = check_zip(zf, str(path))
            _rdf_in_zip(zf, str(path))  # refused before a byte is unpacked
            _extract(zf, members, tmp, str(path))  # zipfile checks each member's CRC
        os.replace(tmp, target)
    except _ZIP_ERRORS as err:
        raise PackageError(f"{path} is not a valid zip (truncated or corrupt): {err}") from err
    except OSError as err:
        if target.is_dir():  # another process unpacked it first
            return target
        raise PackageError(f"cannot unpack {path}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _downloaded(path: Path) -> bool:
    return _inside(path, cache_dir())


def _drop_download(path: Path, url: str, err: PackageError) -> PackageError:
    """``err`` about the download of ``url`` at ``path``, which is removed from the cache so that the next run
    downloads it again (an HTML error page saved by a proxy must not be reused forever)."""
    path.unlink(missing_ok=True)
    return type(err)(f"{err}; removed the download of {url} from the cache ({path}): the next run downloads it again")


def _fetch_zip(url: str, *, sha256: Optional[str]) -> Path:
    local = fetch(url, sha256=sha256)
    try:
        if not zipfile.is_zipfile(local):
            with open(local, "rb") as f:
                head = f.read(16)
            hint = " (an HTML or text page?)" if head.lstrip()[:1] in (b"<", b"{") else ""
            raise PackageError(f"{url} is not a package zip: it starts with {head!r}{hint}")
        return _unpack_zip(local)
    except PackageError as err:
        if _downloaded(local) and urlparse(url).scheme in ("http", "https"):
            raise _drop_download(local, url, err) from None
        raise


def _fetch_rdf_package(url: str, *, sha256: Optional[str]) -> Path:
    """Download an rdf.yaml and the weights it references (hash-checked) into one cached folder."""
    key = hashlib.sha256(url.encode()).hexdigest()[:32]
    folder = cache_dir() / "urls" / key
    rdf_path = fetch(url, sha256=sha256, filename=f"{key}-rdf.yaml", progress=False)
    try:
        rdf = _read_rdf(rdf_path)  # checked: every source is a relative path inside the package
    except PackageError as err:
        if _downloaded(rdf_path) and urlparse(url).scheme in ("http", "https"):
            raise _drop_download(rdf_path, url, err) from None
        raise
    base = urljoin(url, ".")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
    try:
        shutil.copyfile(rdf_path, tmp / "rdf.yaml")
        for entry in rdf["weights"].values():
            for file in [entry] + ([entry["external_data"]] if entry.get("external_data") else []):
                source = PurePosixPath(file["source"])
                remote = urljoin(base, quote(str(source)))  # quoted: "%2e%2e" stays a name on the server too
                if not remote.startswith(base):  # the same origin and folder as the rdf.yaml, nothing else
                    raise UntrustedPackageError(f"{url}: refusing weights {file['source']!r} outside the package")
                local = fetch(remote, sha256=file["sha256"], filename=f"{key}-{source.name}")
                (tmp / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, tmp / source)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_package(source: Union[str, os.PathLike], *, sha256: Optional[str] = None) -> Package:
    """Load a package from a folder, a .zip, a URL (of a zip or an rdf.yaml) or a bioimage.io id.

    ``sha256`` checks the zip (or rdf.yaml) before it is used. The rdf is checked (:func:`check_rdf`) before
    anything is unpacked or fetched; the weights' hashes are checked when a runner loads them.
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
            root = _fetch_zip(src, sha256=sha256)
    elif "/" not in src and src and not path.suffix:
        root = _fetch_rdf_package(BIOIMAGEIO_RDF_URL.format(id=src), sha256=sha256)
    else:
        raise FileNotFoundError(f"no package at {src!r} (not a folder, file, URL or bioimage.io id)")
    package = Package(root=root, rdf=_read_rdf(_find_rdf(root)), source=src)
    if package.kind not in KINDS:
        raise PackageError(f"{src}: not a usam-bioimageio package (config.usam.kind is {package.kind!r})")
    _check_weights(package)
    return package


def load_family(source: Union[str, os.PathLike], *, encoder_precision: str = "fp32") -> Family:
    """Load every package of a family from a folder (with family.yaml, or all zips/packages in it).

    family.yaml lists each member's file and sha256; a member whose hash differs is refused. Members
    must agree on the image encoder they were exported with. ``encoder_precision`` "int8" / "fp16": the
    family's reduced-precision encoder variant (family.yaml ``variants``, written by ``usam export
    --encoder-variants``) in place of its fp32 encoder.
    """
    if encoder_precision not in ENCODER_PRECISIONS:
        raise UsageError(f"encoder precision must be one of {', '.join(ENCODER_PRECISIONS)}, not {encoder_precision!r}")
    folder = Path(source).expanduser()
    if not folder.is_dir():
        package = load_package(source)
        return Family({package.kind: package})
    packages: Dict[str, Package] = {}
    manifest = folder / FAMILY_FILE
    if not manifest.is_file() and any((folder / name).is_file() for name in RDF_NAMES):  # one unpacked package
        package = load_package(folder)
        return Family({package.kind: package})
    if manifest.is_file():
        for kind, (file, digest) in _read_manifest(manifest).items():
            packages[kind] = load_package(folder / file, sha256=digest)
    else:
        candidates = sorted(folder.glob("*.zip")) + sorted(p.parent for p in folder.glob("*/rdf.yaml"))
        for candidate in candidates:
            package = load_package(candidate)
            if package.kind in packages:
                raise PackageError(f"{folder} holds two {package.kind} packages; add a {FAMILY_FILE}")
            packages[package.kind] = package
    if not packages:
        raise PackageError(f"{folder} holds no usam-bioimageio packages")
    if encoder_precision != "fp32":
        packages["image_encoder"] = _encoder_variant(folder, packages.get("image_encoder"), encoder_precision)
    family = Family(packages)
    check_siblings(family)
    return family


def _encoder_variant(folder: Path, encoder: Optional[Package], precision: str) -> Package:
    """The ``precision`` variant of the family's fp32 ``encoder`` listed in family.yaml (``variants``)."""
    manifest = folder / FAMILY_FILE
    data = yaml.safe_load(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
    entry = ((data or {}).get("variants") or {}).get("image_encoder", {}).get(precision) if isinstance(data, dict) \
        else None
    if encoder is None or not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise PackageError(f"{folder} has no {precision} image encoder (family.yaml variants; written by "
                           "`usam export --encoder-variants`)")
    check_source(entry["file"], f"variants.image_encoder.{precision}.file", str(manifest))
    variant = load_package(folder / entry["file"], sha256=entry.get("sha256"))
    if variant.kind != "image_encoder" or variant.precision != precision:
        raise PackageError(f"{entry['file']} is not a {precision} image encoder (kind {variant.kind!r}, precision "
                           f"{variant.precision!r})")
    if variant.identity.split("+")[0] != encoder.identity:
        raise PackageError(f"{entry['file']} is a variant of another image encoder than the family's")
    return variant


def _read_manifest(manifest: Path) -> Dict[str, Tuple[str, Optional[str]]]:
    """kind -> (file, sha256 or None) from family.yaml; a broken manifest is one PackageError naming it."""
    try:
        data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise PackageError(f"cannot read {manifest}: {' '.join(str(err).split())[:300]}") from None
    entries = data.get("packages") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise PackageError(f"{manifest}: expected a mapping 'packages: {{kind: {{file, sha256}}}}'")
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    for kind, entry in entries.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(file, str) or (digest is not None and not isinstance(digest, str)):
            raise PackageError(f"{manifest}: packages.{kind} needs a 'file' (and a 'sha256') string")
        check_source(file, f"packages.{kind}.file", str(manifest))
        out[str(kind)] = (file, digest)
    return out


def check_encoder(package: Package, identity: str, what: str) -> None:
    """Refuse ``package`` (a decoder) with embeddings of (or next to) an image encoder of another ``identity``.

    ``identity`` "" (embeddings from micro-sam's caches, which record none of our packages) is not checked;
    a decoder that records no encoder identity is refused: without it no check could be made.
    """
    expected = package.encoder_identity
    if not expected:
        raise PackageError(f"{package.name!r} records no image encoder identity (config.usam.image_encoder."
                           "identity): re-export it with `usam export`")
    if identity and identity.split("+")[0] != expected:  # "+int8": a reduced-precision variant of that encoder
        raise PackageError(f"{package.name!r} was exported for another image encoder ({expected[:12]}...) than "
                           f"{what} ({identity[:12]}...): packages of different models are mixed")


def check_embeddings(package: Package, embeddings, what: str = "these embeddings come from") -> None:
    """:func:`check_encoder` for ``embeddings`` (``Embeddings``: ``features`` and ``encoder``), and refuse features
    whose grid is not the one of ``package``'s input size (micro-sam's caches record no encoder identity, so this is
    what refuses their 1024 embeddings for a model of another size)."""
    check_encoder(package, embeddings.encoder, what)
    side = registry.embedding_size(package.image_size)
    features = embeddings.features
    if not hasattr(features, "shape"):  # tiled embeddings: their first tile with features (all are alike)
        features = next((f for f in features if f is not None), None)
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) < 2 or shape[-2:] != (side, side):
        size = f"input size {shape[-1] * registry.PATCH_SIZE}" if len(shape) >= 2 else "no model"
        raise ValueError(f"embeddings of shape {shape} are of a model of {size}; {package.name!r} takes input size "
                         f"{package.image_size}, i.e. embeddings (1, {registry.EMBEDDING_DIM}, {side}, {side}): "
                         "compute them with this model")


def check_siblings(family: Family) -> None:
    """Refuse a family whose decoders were exported for another image encoder than the one present, or whose
    packages record different input sizes or pixel scales."""
    for fact, differ in (("image_size", "are for different input sizes"),
                         ("pixel_scale", "record different pixel scales")):
        values = {kind: getattr(package, fact) for kind, package in family.packages.items()}
        if len(set(values.values())) > 1:
            raise PackageError(f"the packages of this family {differ} ("
                               + ", ".join(f"{kind} {value:g}" for kind, value in values.items())
                               + "): packages of different models are mixed")
    if "image_encoder" not in family:
        return
    encoder = family.get("image_encoder")
    for kind, package in family.packages.items():
        if kind in EMBEDDING_CONSUMERS:
            check_encoder(package, encoder.identity, f"the family's encoder {encoder.name!r}")
