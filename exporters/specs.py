"""Describe a model as a bioimage.io (format 0.5) model description.

Our own small, typed vocabulary for tensors and their axes (:class:`TensorSpec`, :class:`Batch`,
:class:`Channel`, :class:`Index`, :class:`Space`, with sizes ``int``, :class:`Param`, :class:`Ref` or
:class:`DataDependent`) and :func:`build_model_descr`, which turns it plus the files of a package
(weights, test tensors, documentation, covers) into a ``bioimageio.spec`` ``ModelDescr``.

Nothing here writes files; :mod:`usam_exporters.writer` writes them and calls :func:`build_model_descr`.

Offline notes (bioimageio.spec 0.5.12):

- URLs anywhere in the description (``cite[].url``, ``git_repo``, ...) are checked with an HTTP request
  whenever a description is validated with IO checks, which ``bioimageio.core.test_model`` always does.
  Our citations therefore carry DOIs only (a DOI is checked by pattern, not online).
- ``Author(github_user=...)`` is checked against the GitHub API unless the name is in
  ``bioimageio.spec._internal.constants.KNOWN_GITHUB_USERS`` (which holds e.g. ``anwai98`` and
  ``constantinpape``). Authors given here as strings or ``{"name": ...}`` carry no github_user.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from usam_bioimageio import registry

# --------------------------------------------------------------------------------------------------
# citations and license facts
# --------------------------------------------------------------------------------------------------

USAM_DOI = "10.1038/s41592-024-02580-4"
SAM_DOI = "10.1109/ICCV51070.2023.00371"
SAM_ARXIV = "2304.02643"

USAM_CITE_TEXT = (
    "Archit, A., Freckmann, L., Nair, S. et al. Segment Anything for Microscopy. "
    "Nature Methods 22, 579-591 (2025)."
)
SAM_CITE_TEXT = (
    "Kirillov, A., Mintun, E., Ravi, N. et al. Segment Anything. "
    f"IEEE/CVF International Conference on Computer Vision (ICCV), 2023. arXiv:{SAM_ARXIV}."
)

#: Citations every package of this project carries (DOIs only, see the module notes).
DEFAULT_CITATIONS: Tuple[Dict[str, str], ...] = (
    {"text": USAM_CITE_TEXT, "doi": USAM_DOI},
    {"text": SAM_CITE_TEXT, "doi": SAM_DOI},
)

DEFAULT_LICENSE = "MIT"
SAM_LICENSE_NOTE = (
    "The Segment Anything (SAM) model code and original weights by Meta AI are released under the "
    "Apache-2.0 license; the µSAM (micro-sam) code and finetuned weights are released under the MIT license."
)

WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
# the first of these present is the original weights entry, all others name it as their parent
_PARENT_PRIORITY = ("pytorch_state_dict", "torchscript", "onnx")

# --------------------------------------------------------------------------------------------------
# axis sizes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A parametrized size ``min + n * step`` (n = 0, 1, 2, ...): input axes only."""

    min: int = 1
    step: int = 1

    def __post_init__(self) -> None:
        if self.min < 1 or self.step < 1:
            raise ValueError(f"Param needs min >= 1 and step >= 1, got {self}")

    def accepts(self, size: int) -> bool:
        return size >= self.min and (size - self.min) % self.step == 0


#: "any size >= 1"
ANY = Param(1, 1)


@dataclass(frozen=True)
class Ref:
    """The size of axis ``axis`` of tensor ``tensor`` (plus ``offset``).

    The referenced axis must have a size of its own (an ``int`` or a :class:`Param`) and belong to an
    input tensor.
    """

    tensor: str
    axis: str
    offset: int = 0


@dataclass(frozen=True)
class DataDependent:
    """A size known only after inference (output index axes only)."""

    min: int = 1
    max: Optional[int] = None


Size = Union[int, Param, Ref, DataDependent]

# --------------------------------------------------------------------------------------------------
# axes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """The batch axis (id ``batch``). ``size=None``: any batch size; ``size=1``: exactly one."""

    size: Optional[int] = None
    description: str = ""

    @property
    def id(self) -> str:
        return "batch"

    def __post_init__(self) -> None:
        if self.size not in (None, 1):
            raise ValueError("a batch axis has size None (any) or 1")


@dataclass(frozen=True)
class Channel:
    """A channel axis with one name per channel (its size is the number of names)."""

    names: Tuple[str, ...]
    id: str = "channel"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise ValueError("a channel axis needs at least one channel name")

    @property
    def size(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Index:
    """An index axis, e.g. ``o`` (objects) or ``p`` (points)."""

    id: str
    size: Size
    description: str = ""


@dataclass(frozen=True)
class Space:
    """A space axis (``y``, ``x``, ``z``)."""

    id: str
    size: Size
    description: str = ""
    unit: Optional[str] = None
    scale: float = 1.0


AxisSpec = Union[Batch, Channel, Index, Space]


def channel(*names: str, id: str = "channel", description: str = "") -> Channel:
    """``channel("r", "g", "b")``"""
    return Channel(tuple(names), id=id, description=description)


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------

_DTYPES = ("float32", "float64", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")


@dataclass
class TensorSpec:
    """One input or output tensor.

    ``name`` becomes the tensor id (lower case letters, digits and ``_``). ``data`` is the test tensor:
    required for inputs; for outputs computed by :func:`usam_exporters.writer.write_package` unless given.
    ``data_descr`` (a ``bioimageio.spec.model.v0_5`` data description) overrides the one derived from
    the test tensor's dtype; ``preprocessing``/``postprocessing`` are v0_5 processing descriptions
    (default: none, i.e. only the implicit ``ensure_dtype``).
    """

    name: str
    description: str
    axes: Sequence[AxisSpec]
    data: Optional[np.ndarray] = None
    data_descr: Any = None
    preprocessing: Sequence[Any] = ()
    postprocessing: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"tensor name {self.name!r}: use lower case letters, digits and '_'")
        self.axes = tuple(self.axes)
        for a in self.axes:
            if not isinstance(a, (Batch, Channel, Index, Space)):
                raise TypeError(f"tensor {self.name!r}: axes are Batch, Channel, Index or Space, got {a!r}")
        ids = [a.id for a in self.axes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"tensor {self.name!r}: duplicate axis ids {ids}")
        if sum(isinstance(a, Batch) for a in self.axes) > 1:
            raise ValueError(f"tensor {self.name!r}: more than one batch axis")
        if self.data is not None:
            self.check(self.data)

    @property
    def dynamic_dims(self) -> Dict[int, str]:
        """ONNX dynamic axes of this tensor: every axis without a fixed size, named so that axes of
        equal size (size references) share one symbolic dimension."""
        ret: Dict[int, str] = {}
        for i, a in enumerate(self.axes):
            if isinstance(a, Batch):
                if a.size is None:
                    ret[i] = "batch"
            elif isinstance(a, Channel):
                continue
            elif isinstance(a.size, Param):
                ret[i] = f"{self.name}_{a.id}"
            elif isinstance(a.size, Ref):
                ref = f"{a.size.tensor}_{a.size.axis}"
                ret[i] = ref if a.size.offset == 0 else f"{self.name}_{a.id}"
            elif isinstance(a.size, DataDependent):
                ret[i] = f"{self.name}_{a.id}"
        return ret

    @property
    def fixed_dims(self) -> Dict[int, int]:
        """Axes of a fixed size (batch 1, channels, fixed index / space sizes): written into the ONNX graph's
        shapes, so that the graph says what the description says."""
        ret: Dict[int, int] = {}
        for i, a in enumerate(self.axes):
            if isinstance(a, Channel):
                ret[i] = len(a.names)
            elif isinstance(a.size, int):
                ret[i] = a.size
        return ret

    def check(self, data: np.ndarray, *, what: str = "test tensor") -> None:
        """Check ``data`` against the axes (count, fixed sizes, parametrized sizes, channel names)."""
        if not isinstance(data, np.ndarray):
            raise TypeError(f"{self.name}: {what} must be a numpy array, got {type(data)}")
        if data.ndim != len(self.axes):
            raise ValueError(
                f"{self.name}: {what} has shape {data.shape}, but {len(self.axes)} axes "
                f"{[a.id for a in self.axes]} are described"
            )
        if _dtype_name(data) not in _DTYPES + ("bool",):
            raise ValueError(f"{self.name}: unsupported dtype {data.dtype}")
        for a, s in zip(self.axes, data.shape):
            if isinstance(a, (Batch, Channel)):
                expected = a.size
                if expected is not None and s != expected:
                    raise ValueError(f"{self.name}: axis {a.id!r} has size {s}, expected {expected}")
            elif isinstance(a.size, int):
                if s != a.size:
                    raise ValueError(f"{self.name}: axis {a.id!r} has size {s}, expected {a.size}")
            elif isinstance(a.size, Param):
                if not a.size.accepts(s):
                    raise ValueError(
                        f"{self.name}: axis {a.id!r} has size {s}, expected {a.size.min} + n*{a.size.step}"
                    )
            elif isinstance(a.size, DataDependent):
                if s < a.size.min or (a.size.max is not None and s > a.size.max):
                    raise ValueError(f"{self.name}: axis {a.id!r} has size {s} outside {a.size}")

    def sizes(self, data: Optional[np.ndarray] = None) -> Dict[str, int]:
        data = self.data if data is None else data
        if data is None:
            raise ValueError(f"{self.name}: no data")
        return {a.id: s for a, s in zip(self.axes, data.shape)}


def check_test_tensor_values(name: str, data: np.ndarray) -> None:
    """bioimageio.spec refuses a test tensor (input or output) whose values all lie in (-1e-4, 1e-4),
    e.g. an all-zero ``mask_input``: check that early, with a clearer message."""
    if data.size == 0:
        raise ValueError(f"{name}: the test tensor is empty")
    if data.dtype == np.bool_:
        if not data.any():
            raise ValueError(f"{name}: an all-False test tensor is refused by bioimageio (values too small)")
        return
    if float(np.max(data)) < 1e-4 and float(np.min(data)) > -1e-4:
        raise ValueError(
            f"{name}: all test tensor values lie within (-1e-4, 1e-4) (e.g. all zeros), which bioimageio.spec "
            "refuses ('values too small for reliable testing'); use a test tensor with larger values"
        )


def check_size_references(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    output_data: Optional[Sequence[np.ndarray]] = None,
) -> None:
    """Check that every :class:`Ref` points to an input axis with an own size and that the test
    tensors (inputs, and ``output_data`` if given) agree with the references."""
    specs = {t.name: t for t in list(inputs) + list(outputs)}
    if len(specs) != len(inputs) + len(outputs):
        raise ValueError("tensor names must be unique across inputs and outputs")
    in_sizes = {t.name: t.sizes() for t in inputs if t.data is not None}
    out_sizes = {} if output_data is None else {t.name: t.sizes(d) for t, d in zip(outputs, output_data)}
    all_sizes = {**in_sizes, **out_sizes}
    input_names = {t.name for t in inputs}
    for t in list(inputs) + list(outputs):
        for a in t.axes:
            size = getattr(a, "size", None)
            if not isinstance(size, Ref):
                continue
            if size.tensor not in input_names:
                raise ValueError(f"{t.name}.{a.id}: reference to {size.tensor!r}, which is not an input")
            ref_axes = {x.id: x for x in specs[size.tensor].axes}
            ref_axis = ref_axes.get(size.axis)
            if ref_axis is None or isinstance(ref_axis, Batch):
                raise ValueError(f"{t.name}.{a.id}: no (non-batch) axis {size.tensor}.{size.axis}")
            if isinstance(getattr(ref_axis, "size", None), (Ref, DataDependent)):
                raise ValueError(f"{t.name}.{a.id}: the referenced axis {size.tensor}.{size.axis} has no own size")
            if t.name in all_sizes and size.tensor in all_sizes:
                expected = all_sizes[size.tensor][size.axis] + size.offset
                actual = all_sizes[t.name][a.id]
                if actual != expected:
                    raise ValueError(
                        f"{t.name}.{a.id} has size {actual}, but refers to {size.tensor}.{size.axis}"
                        f" ({expected} with offset {size.offset})"
                    )


# --------------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build the ``torch.nn.Module`` the ``pytorch_state_dict`` weights load into.

    Either ``import_from`` (``from <import_from> import <callable>``) or ``source`` (a Python file that
    is put into the package and defines ``callable``). ``requirements``: pip requirements the architecture
    needs beyond torch (e.g. the distribution that holds ``import_from``); written as the weights'
    ``dependencies`` (a conda environment file), so ``bioimageio test --runtime-env as-described`` can build it.
    """

    callable: str
    import_from: Optional[str] = None
    source: Optional[Path] = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    requirements: Sequence[str] = ()

    def __post_init__(self) -> None:
        if (self.import_from is None) == (self.source is None):
            raise ValueError("give exactly one of import_from and source")


# --------------------------------------------------------------------------------------------------
# conversion to bioimageio.spec
# --------------------------------------------------------------------------------------------------


def _dtype_name(a: np.ndarray) -> str:
    return "bool" if a.dtype == np.bool_ else str(a.dtype)


def _size_to_v05(size: Size, *, output: bool) -> Any:
    from bioimageio.spec.model import v0_5

    if isinstance(size, bool):
        raise TypeError("a size is an int, Param, Ref or DataDependent")
    if isinstance(size, int):
        return size
    if isinstance(size, Param):
        if output:
            raise ValueError("a parametrized size (Param) is for inputs only; outputs use Ref or int")
        return v0_5.ParameterizedSize(min=size.min, step=size.step)
    if isinstance(size, Ref):
        return v0_5.SizeReference(
            tensor_id=v0_5.TensorId(size.tensor), axis_id=v0_5.AxisId(size.axis), offset=size.offset
        )
    if isinstance(size, DataDependent):
        if not output:
            raise ValueError("a data dependent size is for outputs only")
        return v0_5.DataDependentSize(min=size.min, max=size.max)
    raise TypeError(f"unsupported size {size!r}")


def axis_to_v05(axis: AxisSpec, *, output: bool) -> Any:
    """One of our axes as a ``bioimageio.spec.model.v0_5`` axis."""
    from bioimageio.spec.model import v0_5

    if isinstance(axis, Batch):
        return v0_5.BatchAxis(size=axis.size, description=axis.description)
    if isinstance(axis, Channel):
        return v0_5.ChannelAxis(
            id=v0_5.AxisId(axis.id), channel_names=list(axis.names), description=axis.description
        )
    if isinstance(axis, Index):
        cls = v0_5.IndexOutputAxis if output else v0_5.IndexInputAxis
        return cls(id=v0_5.AxisId(axis.id), size=_size_to_v05(axis.size, output=output), description=axis.description)
    if isinstance(axis, Space):
        if isinstance(axis.size, DataDependent):
            raise ValueError("space axes have no data dependent size")
        cls = v0_5.SpaceOutputAxis if output else v0_5.SpaceInputAxis
        kw: Dict[str, Any] = {}
        if axis.unit is not None:
            kw["unit"] = axis.unit
        return cls(
            id=v0_5.AxisId(axis.id),
            size=_size_to_v05(axis.size, output=output),
            description=axis.description,
            scale=axis.scale,
            **kw,
        )
    raise TypeError(f"unsupported axis {axis!r}")


def _data_descr(spec: TensorSpec, dtype: Optional[str]) -> Any:
    from bioimageio.spec.model import v0_5

    if spec.data_descr is not None:
        return spec.data_descr
    if dtype is None:
        return v0_5.IntervalOrRatioDataDescr()
    if dtype == "bool":
        return v0_5.NominalOrOrdinalDataDescr(values=[False, True], type="bool")
    return v0_5.IntervalOrRatioDataDescr(type=dtype)


def _file(path: Union[str, Path]) -> Any:
    from bioimageio.spec.common import FileDescr

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(p)
    return FileDescr(source=p.absolute())


def environment_yaml(name: str, requirements: Sequence[str]) -> str:
    """A conda environment file: python, pip, torch and ``requirements`` from PyPI."""
    pip = "".join(f"      - {r}\n" for r in ["torch>=1.13", *requirements])
    return (f"name: {name}\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n  - python>=3.10\n"
            f"  - pip\n  - pip:\n{pip}")


def _author(a: Any) -> Any:
    from bioimageio.spec.model import v0_5

    if isinstance(a, v0_5.Author):
        return a
    if isinstance(a, str):
        return v0_5.Author(name=a)
    if isinstance(a, Mapping):
        return v0_5.Author(**a)
    raise TypeError(f"author: str, dict or Author, got {a!r}")


def _cite(c: Any) -> Any:
    from bioimageio.spec.model import v0_5

    if isinstance(c, v0_5.CiteEntry):
        return c
    if isinstance(c, Mapping):
        return v0_5.CiteEntry(**c)
    raise TypeError(f"cite: dict or CiteEntry, got {c!r}")


def citations(extra: Sequence[Any] = ()) -> List[Any]:
    """µSAM and SAM first, then ``extra`` (entries whose DOI is already there are dropped)."""
    ret = [_cite(c) for c in DEFAULT_CITATIONS]
    seen = {str(c.doi) for c in ret}
    for c in extra:
        ce = _cite(c)
        if ce.doi is not None and str(ce.doi) in seen:
            continue
        if ce.doi is not None:
            seen.add(str(ce.doi))
        ret.append(ce)
    return ret


def plain_yaml(value: Any, where: str = "config") -> Any:
    """``value`` with tuples as lists, numpy scalars/arrays as Python numbers/lists and paths as
    strings; anything else that YAML cannot hold is an error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            out[k] = plain_yaml(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [plain_yaml(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in YAML")


def installed_version(package: str) -> str:
    return importlib.metadata.version(package).split("+")[0]


def build_model_descr(
    *,
    name: str,
    description: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    test_tensors: Mapping[str, Union[str, Path]],
    weights: Mapping[str, Union[str, Path]],
    sample_tensors: Optional[Mapping[str, Union[str, Path]]] = None,
    architecture: Optional[ArchitectureSpec] = None,
    authors: Sequence[Any],
    cite: Sequence[Any] = (),
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = (),
    documentation: Union[str, Path],
    covers: Sequence[Union[str, Path]] = (),
    config: Optional[Mapping[str, Any]] = None,
    onnx_opset: int = 17,
    pytorch_version: Optional[str] = None,
    reproducibility_tolerance: Sequence[Mapping[str, Any]] = (),
    version: Optional[str] = None,
    maintainers: Sequence[Any] = (),
    packaged_by: Sequence[Any] = (),
    attachments: Sequence[Union[str, Path]] = (),
    git_repo: Optional[str] = None,
    dependencies: Optional[Union[str, Path]] = None,
) -> Any:
    """Build a ``bioimageio.spec.model.v0_5.ModelDescr``.

    Pure apart from reading the files it is given (hashes, test tensors, documentation).

    Args:
        name: model name (letters, digits, ``_+- ()``; 5 to 128 characters).
        inputs, outputs: tensor specs in the order the module takes/returns them.
        test_tensors: ``.npy`` file of every input and output, by tensor name.
        sample_tensors: optional sample files (readable by imageio, e.g. ``.tif``) by tensor name.
        weights: weight file by format (``pytorch_state_dict``, ``torchscript``, ``onnx``); for ONNX with
            external data give ``onnx`` (the graph) and ``onnx_data`` (the ``.data`` file).
        architecture: required with ``pytorch_state_dict``.
        authors: names, ``{"name": ..., "affiliation": ..., "orcid": ...}`` dicts or ``Author`` objects.
        cite: citations beyond µSAM and SAM, which are always included.
        config: our metadata, stored as ``config.usam``.
        reproducibility_tolerance: entries of ``config.bioimageio.reproducibility_tolerance``
            (``relative_tolerance``, ``absolute_tolerance``, ``mismatched_elements_per_million``,
            ``output_ids``, ``weights_formats``); bioimageio's default is 1e-3/1e-3/100 ppm.
        git_repo: note that URLs are checked online during validation.
        dependencies: conda environment file of the ``pytorch_state_dict`` weights.
    """
    from bioimageio.spec.model import v0_5

    unknown = set(weights) - set(WEIGHT_FORMATS) - {"onnx_data"}
    if unknown:
        raise ValueError(f"unknown weight formats {sorted(unknown)}; known: {WEIGHT_FORMATS}")
    if not any(f in weights for f in WEIGHT_FORMATS):
        raise ValueError("no weights given")
    check_size_references(inputs, outputs)

    def tensor_descr(spec: TensorSpec, output: bool) -> Any:
        if spec.name not in test_tensors:
            raise ValueError(f"no test tensor for {spec.name!r}")
        arr = np.load(test_tensors[spec.name], mmap_mode="r")
        spec.check(arr, what=f"test tensor {test_tensors[spec.name]}")
        axes = [axis_to_v05(a, output=output) for a in spec.axes]
        kw: Dict[str, Any] = dict(
            id=v0_5.TensorId(spec.name),
            description=spec.description,
            axes=axes,
            test_tensor=_file(test_tensors[spec.name]),
            data=_data_descr(spec, _dtype_name(arr)),
        )
        if spec.name in (sample_tensors or {}):
            kw["sample_tensor"] = _file(sample_tensors[spec.name])
        if output:
            return v0_5.OutputTensorDescr(**kw, postprocessing=list(spec.postprocessing))
        return v0_5.InputTensorDescr(**kw, preprocessing=list(spec.preprocessing))

    in_descrs = [tensor_descr(t, False) for t in inputs]
    out_descrs = [tensor_descr(t, True) for t in outputs]

    present = [f for f in _PARENT_PRIORITY if f in weights]
    root = present[0]
    torch_version = v0_5.Version(pytorch_version or installed_version("torch"))
    w: Dict[str, Any] = {}
    if "pytorch_state_dict" in weights:
        if architecture is None:
            raise ValueError("pytorch_state_dict weights need an architecture")
        if architecture.import_from is not None:
            arch = v0_5.ArchitectureFromLibraryDescr(
                import_from=architecture.import_from,
                callable=v0_5.Identifier(architecture.callable),
                kwargs=plain_yaml(dict(architecture.kwargs), "architecture.kwargs"),
            )
        else:
            assert architecture.source is not None
            arch = v0_5.ArchitectureFromFileDescr(
                source=Path(architecture.source).absolute(),
                callable=v0_5.Identifier(architecture.callable),
                kwargs=plain_yaml(dict(architecture.kwargs), "architecture.kwargs"),
            )
        w["pytorch_state_dict"] = v0_5.PytorchStateDictWeightsDescr(
            source=Path(weights["pytorch_state_dict"]).absolute(),
            architecture=arch,
            pytorch_version=torch_version,
            dependencies=None if dependencies is None else _file(dependencies),
        )
    if "torchscript" in weights:
        w["torchscript"] = v0_5.TorchscriptWeightsDescr(
            source=Path(weights["torchscript"]).absolute(),
            pytorch_version=torch_version,
            parent=None if root == "torchscript" else root,
        )
    if "onnx" in weights:
        w["onnx"] = v0_5.OnnxWeightsDescr(
            source=Path(weights["onnx"]).absolute(),
            opset_version=onnx_opset,
            parent=None if root == "onnx" else root,
            external_data=None if "onnx_data" not in weights else _file(weights["onnx_data"]),
        )

    cfg: Dict[str, Any] = {}
    if config:
        cfg["usam"] = plain_yaml(dict(config), "config.usam")
    if reproducibility_tolerance:
        cfg["bioimageio"] = v0_5.BioimageioConfig(
            reproducibility_tolerance=[v0_5.ReproducibilityTolerance(**dict(r)) for r in reproducibility_tolerance]
        )

    kw: Dict[str, Any] = {}
    if version is not None:
        kw["version"] = version
    if git_repo is not None:
        kw["git_repo"] = git_repo
    if maintainers:
        kw["maintainers"] = [m if isinstance(m, v0_5.Maintainer) else v0_5.Maintainer(**dict(m)) for m in maintainers]
    if packaged_by:
        kw["packaged_by"] = [_author(a) for a in packaged_by]

    return v0_5.ModelDescr(
        name=name,
        description=description,
        authors=[_author(a) for a in authors],
        cite=citations(cite),
        license=v0_5.LicenseId(license),
        tags=list(tags),
        documentation=_file(documentation),
        covers=[_file(c) for c in covers],
        attachments=[_file(a) for a in attachments],
        inputs=in_descrs,
        outputs=out_descrs,
        weights=v0_5.WeightsDescr(**w),
        config=v0_5.Config(**cfg),
        **kw,
    )


#: What a host must know before it tiles (README "What the packages expect"): stated in the documentation and
#: ``config.usam.whole_image`` of the image encoder and the end-to-end AIS package; :func:`whole_image_note`
#: gives it for a model of another input size.
def whole_image_note(image_size: int = registry.IMAGE_SIZE) -> str:
    return (
        "Give the whole image in one call, at any size. The package normalises each channel over the whole image "
        f"and resizes the image so that its longer side is {image_size} pixels, so a host that tiles the input (with "
        "or without a halo) gets other numbers: every tile would be normalised and resized on its own, and the ViT "
        "attends globally, so no halo makes tiles agree. No halo is declared for this reason. For large images use "
        "µSAM's tiling (`usam embed --tile-shape ... --halo ...`), which encodes each tile as micro-sam does."
    )


WHOLE_IMAGE_NOTE = whole_image_note()


def resize_note(image_size: int = registry.IMAGE_SIZE) -> str:
    """``config.usam.resize``: how the encoder brings an image to its N x N input."""
    return f"longest side to {image_size}, Pillow bilinear (antialiased), zero padding bottom/right"


def embedding_axes(image_size: int = registry.IMAGE_SIZE) -> list:
    """Axes of the (1, 256, N/16, N/16) embeddings tensor of a model with input size N ((1, 256, 64, 64) at
    1024), shared by every package that produces or reads it."""
    side = registry.embedding_size(image_size)
    return [Batch(1), channel(*[f"e{i}" for i in range(registry.EMBEDDING_DIM)]), Space("y", side), Space("x", side)]


def family_config(model_type: str, name: str, kind: str, *, image_size: int = registry.IMAGE_SIZE,
                  pixel_scale: float = 1.0, **extra) -> dict:
    """``config.usam`` of every package of a family: what it is and the SAM geometry it was exported with
    (``image_size``: the model's input size N; embeddings N/16, low-resolution masks N/4). ``pixel_scale``, recorded
    only when it is not 1 (a package of a SAM / µSAM checkpoint stays as it was): the model was trained on images
    enlarged that many times and segments best on images enlarged so (``usam ais`` does it by default)."""
    from usam_bioimageio import __version__
    from usam_bioimageio.runtime.pixel_scale import check_scale

    side = registry.embedding_size(image_size)
    scale = check_scale(pixel_scale)
    return {
        "kind": kind,
        "family": name,
        "model_type": model_type,
        "image_size": int(image_size),
        **({} if scale == 1.0 else {"pixel_scale": scale}),
        "embedding_shape": [registry.EMBEDDING_DIM, side, side],
        "pixel_mean": list(registry.PIXEL_MEAN),
        "pixel_std": list(registry.PIXEL_STD),
        "input_normalization": "per-channel min-max to 0..255, truncated (micro-sam 1.8.14 _to_image)",
        "resize": resize_note(image_size),
        "exporter_version": __version__,
        **extra,
    }
