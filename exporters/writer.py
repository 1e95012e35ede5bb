"""Write a torch module as a tested bioimage.io model package (a .zip).

:func:`write_package` exports the module to TorchScript, ONNX and a PyTorch state dict, computes the
test outputs with the module itself (eval mode, no grad), writes documentation and a cover, packages
everything with ``bioimageio.spec.save_bioimageio_package`` and runs ``bioimageio.core.test_model``
(determinism "full") on the written zip. Only a package whose every weight format passed is moved
(atomically) to ``output_path``; otherwise :class:`PackageTestError` is raised and nothing is left
behind.

:func:`validate_package` runs the same test on an existing package and returns a per-format summary. A package
from elsewhere is untrusted: before bioimageio.core sees it, its rdf.yaml is read and checked by our own loader
(``usam_bioimageio.runtime.packages.read_package_rdf``), which refuses architectures outside
``usam_bioimageio.modeling``, code files, files outside the package and zip bombs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .specs import (
    DEFAULT_CITATIONS,
    DEFAULT_LICENSE,
    SAM_LICENSE_NOTE,
    WEIGHT_FORMATS,
    ArchitectureSpec,
    Batch,
    Channel,
    Index,
    Param,
    Ref,
    Space,
    TensorSpec,
    build_model_descr,
    check_size_references,
    check_test_tensor_values,
    environment_yaml,
)

DEFAULT_FORMATS: Tuple[str, ...] = ("torchscript", "onnx", "pytorch_state_dict")
ONNX_OPSET = 17
# protobuf cannot serialise a single ONNX file of 2 GiB or more
_ONNX_SINGLE_FILE_LIMIT = 2**31 - 2**20


class PackageTestError(RuntimeError):
    """A package failed ``bioimageio.core.test_model`` for at least one weight format.

    ``summary`` is the :class:`PackageSummary` of the test.
    """

    def __init__(self, message: str, summary: "PackageSummary"):
        super().__init__(message)
        self.summary = summary


# --------------------------------------------------------------------------------------------------
# testing
# --------------------------------------------------------------------------------------------------


@contextmanager
def _restore_global_state() -> Iterator[None]:
    """``bioimageio.core.enable_determinism`` seeds torch/numpy and switches on
    ``torch.use_deterministic_algorithms`` for the whole process: undo that afterwards."""
    try:
        import torch
    except ImportError:  # an ONNX-only environment
        torch = None  # type: ignore[assignment]
    if torch is not None:
        det = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        rng = torch.get_rng_state()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        if torch is not None:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.set_rng_state(rng)
        np.random.set_state(np_state)


class PackageSummary(Dict[str, str]):
    """The result of testing one package: ``{weight format: "passed" | "failed"}``, plus the entry
    ``"description": "failed"`` when something outside the weight formats failed (an invalid RDF, a
    missing file). Details are attributes: ``source``, ``status`` (bioimageio's overall status),
    ``errors`` (one line each), ``messages`` (per format: bioimageio's reproduction reports) and
    ``seconds`` (the test's run time).
    """

    def __init__(
        self,
        statuses: Mapping[str, str],
        *,
        source: str,
        status: str,
        errors: Sequence[str] = (),
        messages: Optional[Mapping[str, List[str]]] = None,
        seconds: float = 0.0,
    ):
        super().__init__(statuses)
        self.source = source
        self.status = status
        self.errors = list(errors)
        self.messages = dict(messages or {})
        self.seconds = seconds

    @property
    def formats(self) -> Dict[str, str]:
        return {k: v for k, v in self.items() if k != "description"}

    @property
    def passed(self) -> bool:
        return self.status == "passed" and bool(self.formats) and all(v == "passed" for v in self.values())

    def __repr__(self) -> str:
        return f"PackageSummary({dict(self)!r}, status={self.status!r}, errors={self.errors!r})"


def _summarize(vs: Any, source: Union[str, Path], seconds: float) -> PackageSummary:
    """Per-weight-format status of a ``bioimageio.spec.ValidationSummary``."""
    formats: Dict[str, str] = {}
    messages: Dict[str, List[str]] = {}
    errors: List[str] = []
    other_failed = False
    for d in vs.details:
        loc = tuple(str(x) for x in d.loc)
        fmt = loc[1] if len(loc) >= 2 and loc[0] == "weights" else None
        if fmt is not None:
            if d.status == "failed" or formats.get(fmt) == "failed":
                formats[fmt] = "failed"
            else:
                formats[fmt] = "passed"
            messages.setdefault(fmt, []).extend(w.msg for w in d.warnings)
        if d.status == "failed":
            other_failed |= fmt is None
            where = f"[{fmt}] " if fmt else ""
            if d.errors:
                errors.extend(f"{where}{d.name}: {e.msg}" for e in d.errors)
            else:
                errors.append(f"{where}{d.name}: failed")
    if other_failed or (vs.status != "passed" and all(v == "passed" for v in formats.values())):
        formats["description"] = "failed"
    return PackageSummary(
        formats, source=str(source), status=vs.status, errors=errors, messages=messages, seconds=round(seconds, 2)
    )


def _check_architectures(rdf: Mapping[str, Any], where: str) -> None:
    """Each architecture (already restricted to ``usam_bioimageio.modeling`` by name) must be a torch module class
    defined there: not a function or an object that module merely imports (``os``, ``Path``)."""
    import importlib
    import inspect

    import torch

    from usam_bioimageio.errors import UntrustedPackageError
    from usam_bioimageio.runtime.packages import TRUSTED_ARCHITECTURE_MODULE

    for fmt, entry in rdf["weights"].items():
        arch = entry.get("architecture")
        if arch is None:
            continue
        module, name = (arch["import_from"], arch["callable"]) if isinstance(arch, dict) else arch.rpartition(".")[::2]
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            obj = None
        if not (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
                and obj.__module__.startswith(TRUSTED_ARCHITECTURE_MODULE)):
            raise UntrustedPackageError(f"{where}: architecture {module}.{name} is not a model class of "
                                        f"{TRUSTED_ARCHITECTURE_MODULE}: refusing to run it")


def validate_package(
    path: Union[str, Path],
    *,
    weight_format: Optional[str] = None,
    devices: Optional[Sequence[str]] = None,
    determinism: str = "full",
    allow_code: bool = False,
) -> PackageSummary:
    """Test a bioimage.io package with ``bioimageio.core.test_model`` (all its weight formats unless
    ``weight_format`` is given).

    Returns a :class:`PackageSummary`: ``{weight format: "passed" | "failed"}`` (plus
    ``"description": "failed"`` if the package itself is broken); ``summary.passed`` tells whether all
    passed, ``summary.errors`` why not.

    Raises:
        usam_bioimageio.errors.PackageError: the rdf.yaml is unreadable, or asks for code outside
            ``usam_bioimageio.modeling`` (an ``UntrustedPackageError``), a file outside the package or more than
            the zip limits; nothing of the package has been imported or run. ``allow_code`` lifts the
            architecture rule, for a package written from the caller's own module (:func:`write_package`).
    """
    from usam_bioimageio.runtime.packages import read_package_rdf

    rdf = read_package_rdf(path, allow_code=allow_code)
    if not allow_code:
        _check_architectures(rdf, str(path))
    from bioimageio.core import test_model

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        # determinism "full" = torch.use_deterministic_algorithms(True), under which cuBLAS refuses to
        # run unless this is set (before the first cuBLAS call)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    t0 = time.perf_counter()
    with _restore_global_state():
        vs = test_model(
            Path(path),
            weight_format=weight_format,  # type: ignore[arg-type]
            devices=None if devices is None else list(devices),
            determinism=determinism,  # type: ignore[arg-type]
        )
    return _summarize(vs, path, time.perf_counter() - t0)


def format_summary(summary: PackageSummary) -> str:
    lines = [f"{summary.source}: {summary.status}"]
    for fmt, status in summary.items():
        lines.append(f"  {fmt}: {status}")
    for e in summary.errors:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# exports
# --------------------------------------------------------------------------------------------------


def _as_tuple(out: Any) -> Tuple[Any, ...]:
    if isinstance(out, (tuple, list)):
        return tuple(out)
    return (out,)


def run_module(module: Any, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Outputs of ``module`` (eval mode, no grad) for numpy ``inputs``, as numpy arrays."""
    import torch

    module.eval()
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
    ret = []
    for i, o in enumerate(_as_tuple(out)):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"module output {i} is a {type(o).__name__}, expected a tensor")
        ret.append(o.detach().cpu().numpy())
    return ret


def _export_state_dict(module: Any, path: Path) -> None:
    import torch

    # plain tensors only: bioimageio.core loads with torch.load(weights_only=True)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, path)


def _export_torchscript(module: Any, example_inputs: Tuple[Any, ...], path: Path, scripted: Any) -> None:
    import torch

    if scripted is None:
        with torch.no_grad():
            scripted = torch.jit.trace(module, example_inputs, check_trace=False)
    torch.jit.save(scripted, str(path))


def _export_onnx(
    module: Any,
    example_inputs: Tuple[Any, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Any],
    opset: int,
    external_data: Optional[bool],
    fixed_dims: Optional[Mapping[str, Mapping[int, int]]] = None,
) -> Optional[Path]:
    """Export to ``path`` (one file); with ``external_data`` (default: only if the model is >= 2 GiB)
    the weights go to ``<path>.data``, which is returned. ``fixed_dims``: tensor -> {axis: size} written
    into the graph's input and output shapes (the exporter leaves e.g. an output's batch axis symbolic
    when an input has dynamic axes)."""
    import onnx
    import torch

    export_dir = path.parent / "_onnx_export"
    export_dir.mkdir()
    tmp = export_dir / path.name
    with torch.no_grad():
        torch.onnx.export(
            module,
            example_inputs,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) if isinstance(v, Mapping) else list(v) for k, v in dynamic_axes.items()},
            do_constant_folding=True,
        )
    model = onnx.load(str(tmp), load_external_data=True)
    graph_inputs = [i.name for i in model.graph.input]
    if graph_inputs != list(input_names):
        raise ValueError(
            f"the ONNX graph has inputs {graph_inputs}, expected {list(input_names)}: the exporter drops "
            "inputs the module does not use; every described input must be used"
        )
    graph_outputs = [o.name for o in model.graph.output]
    if graph_outputs != list(output_names):
        raise ValueError(f"the ONNX graph has outputs {graph_outputs}, expected {list(output_names)}")
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, size in (fixed_dims or {}).get(value.name, {}).items():
            if dims[axis].HasField("dim_value") and dims[axis].dim_value != size:
                raise ValueError(f"ONNX {value.name} axis {axis} has size {dims[axis].dim_value}, described {size}")
            dims[axis].dim_value = size
    # opset 17 needs only IR version 8 (onnx 1.12); keep the IR version as low as the opset allows
    ir_for_opset = {opset_: ir for _, ir, opset_, *_ in onnx.helper.VERSION_TABLE}
    max_ir = ir_for_opset.get(opset)
    if max_ir is not None and model.ir_version > max_ir:
        model.ir_version = max_ir
    if external_data is None:
        external_data = model.ByteSize() >= _ONNX_SINGLE_FILE_LIMIT
    data_path: Optional[Path] = None
    if external_data:
        data_path = path.with_name(path.name + ".data")
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=0,
        )
        onnx.checker.check_model(str(path))
        if not data_path.exists():  # no initializers at all
            data_path = None
    else:
        onnx.save_model(model, str(path))
        onnx.checker.check_model(model)
    del model
    shutil.rmtree(export_dir)
    return data_path


def default_dynamic_axes(specs: Sequence[TensorSpec]) -> Dict[str, Dict[int, str]]:
    """ONNX dynamic axes from the axis descriptions: every axis whose size is not fixed."""
    return {t.name: t.dynamic_dims for t in specs if t.dynamic_dims}


# --------------------------------------------------------------------------------------------------
# documentation and cover
# --------------------------------------------------------------------------------------------------


def _axis_text(a: Any) -> str:
    if isinstance(a, Batch):
        return "batch (any)" if a.size is None else f"batch ({a.size})"
    if isinstance(a, Channel):
        return f"{a.id} [{', '.join(a.names)}]"
    size = a.size
    if isinstance(size, int):
        s = str(size)
    elif isinstance(size, Param):
        s = f"{size.min} + n*{size.step}"
    elif isinstance(size, Ref):
        s = f"= {size.tensor}.{size.axis}" + (f" {size.offset:+d}" if size.offset else "")
    else:
        s = "data dependent"
    kind = "index" if isinstance(a, Index) else "space" if isinstance(a, Space) else type(a).__name__
    return f"{a.id} ({kind}: {s})"


def _tensor_table(specs: Sequence[TensorSpec], data: Sequence[np.ndarray]) -> str:
    rows = ["| tensor | axes | test tensor | description |", "| --- | --- | --- | --- |"]
    for t, d in zip(specs, data):
        axes = ", ".join(_axis_text(a) for a in t.axes)
        rows.append(f"| `{t.name}` | {axes} | {d.dtype} {tuple(d.shape)} | {t.description} |")
    return "\n".join(rows)


_VALIDATION_RE = re.compile(r"^#+\s*.*validation", re.IGNORECASE | re.MULTILINE)


def validation_section(formats: Sequence[str], tested: bool = True) -> str:
    fmts = ", ".join(f"`{f}`" for f in formats)
    if not tested:
        return (
            "# Validation\n\n"
            f"This package (weight formats {fmts}) was written without running bioimageio's model test. "
            "Test it with `usam validate <package>.zip` (or `bioimageio test <package>.zip`) before use.\n"
        )
    return (
        "# Validation\n\n"
        f"This package was tested when it was written, for every weight format it holds ({fmts}), with "
        "`bioimageio.core.test_model(..., determinism=\"full\")`: each format reproduces the test outputs "
        "(computed with the original PyTorch module in eval mode) from the test inputs within the tolerance "
        "of `config.bioimageio.reproducibility_tolerance` (bioimageio's default: relative and absolute "
        "tolerance 1e-3, at most 100 mismatched elements per million), and runs on inputs of other valid "
        "sizes with outputs of the described shapes. A package that failed for any format was not written.\n\n"
        "To repeat the test:\n\n"
        "```\nusam validate <package>.zip\n```\n\n"
        "or `bioimageio test <package>.zip` with bioimageio.core installed.\n"
    )


def make_documentation(
    *,
    name: str,
    description: str,
    inputs: Sequence[TensorSpec],
    input_data: Sequence[np.ndarray],
    outputs: Sequence[TensorSpec],
    output_data: Sequence[np.ndarray],
    formats: Sequence[str],
    text: Optional[str] = None,
    cite: Sequence[Mapping[str, Any]] = (),
    license: str = DEFAULT_LICENSE,
    tested: bool = True,
) -> str:
    """The package's README.md: ``text`` (or a generated overview), always with a ``# Validation``
    section (appended if ``text`` has none), the tensors, the license note and the citations."""
    parts: List[str] = []
    if text is not None:
        parts.append(text.rstrip() + "\n")
    else:
        parts.append(f"# {name}\n\n{description}\n")
    parts.append("## Inputs\n\n" + _tensor_table(inputs, input_data) + "\n")
    parts.append("## Outputs\n\n" + _tensor_table(outputs, output_data) + "\n")
    parts.append(
        "## Weights\n\n"
        + "\n".join(f"- `{f}`" for f in formats)
        + "\n\nAll weight formats compute the same function; ONNX and TorchScript need no Python model code.\n"
    )
    parts.append(f"## License\n\nThis package: {license}. {SAM_LICENSE_NOTE}\n")
    cites = list(DEFAULT_CITATIONS) + [dict(c) for c in cite if isinstance(c, Mapping)]
    seen = set()
    lines = []
    for c in cites:
        key = c.get("doi") or c.get("text")
        if key in seen:
            continue
        seen.add(key)
        doi = f" doi:{c['doi']}" if c.get("doi") else ""
        lines.append(f"- {c['text']}{doi}")
    parts.append("## Citation\n\nIf you use this model, please cite:\n\n" + "\n".join(lines) + "\n")
    if text is None or not _VALIDATION_RE.search(text):
        parts.append(validation_section(formats, tested))
    return "\n".join(parts)


def _to_image(spec: TensorSpec, arr: np.ndarray) -> Optional[np.ndarray]:
    """A 2d grey or (h, w, 3) RGB view of a tensor with two space axes (first batch/index entry,
    RGB for three channels, else the first channel); None without two space axes."""
    space = [i for i, a in enumerate(spec.axes) if isinstance(a, Space)]
    if len(space) < 2:
        return None
    y, x = space[-2], space[-1]
    index: List[Any] = []
    channel_axis = None
    for i, a in enumerate(spec.axes):
        if i in (y, x):
            index.append(slice(None))
        elif isinstance(a, Channel) and channel_axis is None:
            channel_axis = i
            index.append(slice(None) if arr.shape[i] == 3 else slice(0, 1))
        else:
            index.append(arr.shape[i] // 2 if isinstance(a, Space) else 0)
    img = np.asarray(arr[tuple(index)], dtype=np.float64)
    kept = [i for i, s in enumerate(index) if isinstance(s, slice)]
    order = [kept.index(y), kept.index(x)] + ([kept.index(channel_axis)] if channel_axis in kept else [])
    img = np.transpose(img, order)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    lo, hi = np.percentile(img, 1), np.percentile(img, 99)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    img = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    img = (img * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img


def make_cover(
    path: Path,
    inputs: Sequence[TensorSpec],
    input_data: Sequence[np.ndarray],
    outputs: Sequence[TensorSpec],
    output_data: Sequence[np.ndarray],
    panel: int = 256,
) -> Path:
    """A 2:1 PNG: the first input with two space axes (left) beside the first such output (right)."""
    from PIL import Image

    def first(specs: Sequence[TensorSpec], data: Sequence[np.ndarray]) -> Optional[np.ndarray]:
        for s, d in zip(specs, data):
            img = _to_image(s, d)
            if img is not None:
                return img
        return None

    panels = []
    for img in (first(inputs, input_data), first(outputs, output_data)):
        if img is None:
            img = np.full((panel, panel, 3), 128, dtype=np.uint8)
        panels.append(np.asarray(Image.fromarray(img).resize((panel, panel), Image.Resampling.BILINEAR)))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------------

# The rdf.yaml form every parser we support reads (README, "Decision: the rdf.yaml form"): bioimageio.spec
# 0.5.12 writes ``documentation`` / ``covers`` as {source, sha256}, which spec 0.5.10 (bioimageio.core 0.10.4,
# BioEngine's) refuses, while 0.5.12+ refuses plain file names under format_version 0.5.12. Format 0.5.10 with
# plain names is read by 0.5.10 natively and converted by 0.5.12 and 0.5.14; nothing we write is newer.
RDF_FORMAT_VERSION = "0.5.10"
_PLAIN_FILE_FIELDS = ("documentation", "covers")


def write_portable_rdf(zip_path: Path) -> None:
    """Rewrite the package's rdf.yaml in the form every supported parser reads (in place, atomically)."""
    import zipfile

    import yaml

    with zipfile.ZipFile(zip_path) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    rdf_index = next(i for i, (info, _) in enumerate(members) if info.filename == "rdf.yaml")
    text = members[rdf_index][1].decode("utf-8")
    rdf = yaml.safe_load(text)
    for key in _PLAIN_FILE_FIELDS:
        if isinstance(rdf.get(key), list):
            rdf[key] = [v["source"] if isinstance(v, dict) else v for v in rdf[key]]
        elif isinstance(rdf.get(key), dict):
            rdf[key] = rdf[key]["source"]
    rdf["format_version"] = RDF_FORMAT_VERSION
    header = "%YAML 1.2\n---\n" if text.startswith("%YAML") else ""
    body = header + yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True, width=100)
    members[rdf_index] = (members[rdf_index][0], body.encode("utf-8"))
    tmp = zip_path.with_name(zip_path.name + ".part")
    with zipfile.ZipFile(tmp, "w") as z:
        for info, data in members:
            # level 1, as bioimageio.spec writes the zip: zlib's default level 6 takes several times as long on
            # weights, which hardly compress (it was a fifth of a vit_b export)
            z.writestr(info, data, compresslevel=1)
    os.replace(tmp, zip_path)


def write_package(
    *,
    module: Any,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    output_path: Union[str, Path],
    name: str,
    description: str,
    authors: Sequence[Any],
    example_inputs: Optional[Sequence[Any]] = None,
    architecture: Optional[ArchitectureSpec] = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    onnx_dynamic_axes: Optional[Mapping[str, Any]] = None,
    onnx_opset: int = ONNX_OPSET,
    onnx_external_data: Optional[bool] = None,
    torchscript: Any = None,
    cite: Sequence[Any] = (),
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = (),
    documentation: Union[str, Path, None] = None,
    covers: Sequence[Union[str, Path]] = (),
    config: Optional[Mapping[str, Any]] = None,
    reproducibility_tolerance: Sequence[Mapping[str, Any]] = (),
    version: Optional[str] = None,
    maintainers: Sequence[Any] = (),
    attachments: Sequence[Union[str, Path]] = (),
    sample_tensors: bool = False,
    test: bool = True,
    devices: Optional[Sequence[str]] = None,
    on_summary: Optional[Callable[[PackageSummary], None]] = None,
) -> Path:
    """Export ``module`` as a bioimage.io model package at ``output_path`` (a ``.zip``) and return it.

    Args:
        module: the model; called as ``module(*inputs)`` and returning one tensor or a tuple in the
            order of ``outputs``.
        inputs: input specs, each with its test tensor as ``data`` (e.g. from a real image).
        outputs: output specs; their test tensors are computed by running ``module`` (eval, no grad), unless
            every output has ``data``: the caller's outputs of ``module`` (eval mode) on the inputs' data, used
            as they are (``test=True`` checks them against the exported weights).
        example_inputs: tensors to trace/export with (default: the test inputs).
        architecture: how to rebuild the module for ``pytorch_state_dict`` weights.
        formats: weight formats to write, any of ``torchscript``, ``onnx``, ``pytorch_state_dict``.
        onnx_dynamic_axes: ``torch.onnx.export`` dynamic axes (default: every axis without a fixed size).
        onnx_external_data: weights in ``weights.onnx.data`` (default: only for models >= 2 GiB).
        torchscript: a prebuilt ``torch.jit.ScriptModule`` to ship instead of tracing ``module``.
        documentation: markdown text or a ``.md`` file; a ``# Validation`` section is appended if missing.
        covers: cover images (default: one made from the test input and output).
        config: our metadata, stored as ``config.usam``.
        sample_tensors: also ship every test tensor as a ``.tif`` sample tensor (bioimageio's FAIR
            checks ask for them; it roughly doubles the size taken by test data).
        test: run ``bioimageio.core.test_model`` for every format and refuse the package unless all pass.
        devices: devices for the test (default: bioimageio's choice, a GPU if there is one).
        on_summary: called with the :class:`PackageSummary` of a package
            that passed, before it is moved to ``output_path``.

    Raises:
        PackageTestError: a weight format failed the test (nothing is written to ``output_path``).
    """
    import torch

    output_path = Path(output_path)
    if output_path.suffix != ".zip":
        raise ValueError(f"output_path must end in .zip: {output_path}")
    formats = tuple(dict.fromkeys(formats))
    unknown = set(formats) - set(WEIGHT_FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {WEIGHT_FORMATS}, got {formats}")
    if "pytorch_state_dict" in formats and architecture is None:
        raise ValueError("pytorch_state_dict weights need an architecture")
    if torchscript is not None and "torchscript" not in formats:
        raise ValueError("a torchscript module was given, but 'torchscript' is not among the formats")
    input_data = []
    for t in inputs:
        if t.data is None:
            raise ValueError(f"input {t.name!r} has no test tensor (data)")
        input_data.append(np.ascontiguousarray(t.data))

    if not isinstance(module, torch.nn.Module):
        raise TypeError("module must be a torch.nn.Module")
    devices_used = {t.device.type for t in list(module.parameters()) + list(module.buffers())}
    if devices_used - {"cpu"}:
        raise ValueError(
            f"the module is on {sorted(devices_used)}: export from the CPU (tracing can bake the device "
            "into TorchScript, and the test outputs are computed on the CPU)"
        )
    module.eval()
    given = [t.data is not None for t in outputs]
    if all(given):  # the caller's forward pass of this module (a large encoder's costs ~20 s): not repeated
        output_data = [np.ascontiguousarray(t.data) for t in outputs]
    elif any(given):
        raise ValueError("give the test outputs (data) of all outputs or of none")
    else:
        output_data = run_module(module, input_data)
    if len(output_data) != len(outputs):
        raise ValueError(f"the module returned {len(output_data)} outputs, {len(outputs)} are described")
    for t, d in zip(outputs, output_data):
        t.check(d, what="module output")
    check_size_references(inputs, outputs, output_data)
    for t, d in list(zip(inputs, input_data)) + list(zip(outputs, output_data)):
        check_test_tensor_values(t.name, d)

    if example_inputs is None:
        example = tuple(torch.from_numpy(a) for a in input_data)
    else:
        example = tuple(torch.as_tensor(a) for a in example_inputs)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    # work next to output_path so that the final os.replace is atomic (same file system)
    work = Path(tempfile.mkdtemp(prefix=f".{output_path.stem}.", suffix=".tmp", dir=output_path.parent))
    try:
        files = work / "files"
        files.mkdir()
        test_tensors: Dict[str, Path] = {}
        for t, d in zip(inputs, input_data):
            test_tensors[t.name] = files / f"test_input_{t.name}.npy"
            np.save(test_tensors[t.name], d)
        for t, d in zip(outputs, output_data):
            test_tensors[t.name] = files / f"test_output_{t.name}.npy"
            np.save(test_tensors[t.name], d)

        samples: Dict[str, Path] = {}
        if sample_tensors:
            import tifffile

            for t, d in list(zip(inputs, input_data)) + list(zip(outputs, output_data)):
                samples[t.name] = files / f"sample_{t.name}.tif"
                tifffile.imwrite(samples[t.name], d.astype(np.uint8) if d.dtype == np.bool_ else d)

        weights: Dict[str, Path] = {}
        if "pytorch_state_dict" in formats:
            weights["pytorch_state_dict"] = files / "weights.pt"
            _export_state_dict(module, weights["pytorch_state_dict"])
        if "torchscript" in formats:
            weights["torchscript"] = files / "weights_torchscript.pt"
            _export_torchscript(module, example, weights["torchscript"], torchscript)
        if "onnx" in formats:
            weights["onnx"] = files / "weights.onnx"
            data_file = _export_onnx(
                module,
                example,
                weights["onnx"],
                input_names=[t.name for t in inputs],
                output_names=[t.name for t in outputs],
                dynamic_axes=default_dynamic_axes(list(inputs) + list(outputs))
                if onnx_dynamic_axes is None
                else onnx_dynamic_axes,
                opset=onnx_opset,
                external_data=onnx_external_data,
                fixed_dims={t.name: t.fixed_dims for t in list(inputs) + list(outputs)},
            )
            if data_file is not None:
                weights["onnx_data"] = data_file

        if documentation is not None and not isinstance(documentation, str):
            doc_text: Optional[str] = Path(documentation).read_text(encoding="utf-8")
        else:
            doc_text = documentation
        doc_path = files / "README.md"
        doc_path.write_text(
            make_documentation(
                name=name,
                description=description,
                inputs=inputs,
                input_data=input_data,
                outputs=outputs,
                output_data=output_data,
                formats=[f for f in WEIGHT_FORMATS if f in formats],
                text=doc_text,
                cite=[c for c in cite if isinstance(c, Mapping)],
                license=license,
                tested=test,
            ),
            encoding="utf-8",
        )

        cover_paths: List[Path] = []
        for i, c in enumerate(covers):
            c = Path(c)
            cover_paths.append(files / f"cover{i}{c.suffix.lower()}")
            shutil.copyfile(c, cover_paths[-1])
        if not cover_paths:
            cover_paths.append(make_cover(files / "cover.png", inputs, input_data, outputs, output_data))

        attachment_paths: List[Path] = []
        for a in attachments:
            a = Path(a)
            attachment_paths.append(files / a.name)
            if attachment_paths[-1].exists():
                raise ValueError(f"attachment {a.name!r} collides with a file of the package")
            shutil.copyfile(a, attachment_paths[-1])

        arch = architecture
        if arch is not None and arch.source is not None:
            src = files / Path(arch.source).name
            shutil.copyfile(arch.source, src)
            arch = ArchitectureSpec(callable=arch.callable, source=src, kwargs=arch.kwargs,
                                    requirements=arch.requirements)
        environment = None
        if arch is not None and arch.requirements and "pytorch_state_dict" in formats:
            environment = files / "environment.yaml"
            environment.write_text(environment_yaml(re.sub(r"[^a-z0-9_-]+", "-", name.lower()), arch.requirements),
                                   encoding="utf-8")

        descr = build_model_descr(
            name=name,
            description=description,
            inputs=inputs,
            outputs=outputs,
            test_tensors=test_tensors,
            sample_tensors=samples,
            weights=weights,
            architecture=arch,
            authors=authors,
            cite=cite,
            license=license,
            tags=tags,
            documentation=doc_path,
            covers=cover_paths,
            config=config,
            onnx_opset=onnx_opset,
            reproducibility_tolerance=reproducibility_tolerance,
            version=version,
            maintainers=maintainers,
            attachments=attachment_paths,
            dependencies=environment,
        )

        from bioimageio.spec import save_bioimageio_package

        zip_path = save_bioimageio_package(descr, output_path=work / output_path.name)
        write_portable_rdf(zip_path)
        if test:
            # the architecture is the caller's own code, already running in this process
            summary = validate_package(zip_path, devices=devices, allow_code=True)
            if not summary.passed or set(summary.formats) != set(formats):
                summary.source = str(output_path)
                raise PackageTestError(
                    f"refusing to write {output_path}: bioimageio.core.test_model did not pass\n"
                    + format_summary(summary),
                    summary,
                )
            if on_summary is not None:
                on_summary(summary)
        os.replace(zip_path, output_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output_path
