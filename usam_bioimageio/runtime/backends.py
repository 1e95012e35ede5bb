"""Run one package's weights: ONNX Runtime (default, no torch needed) or torchscript, on the CPU or a CUDA GPU.

A runner loads only weights whose sha256 is the one in the package's rdf.yaml (``packages.verified_weights``).
Devices: ``cpu`` (the default: the numbers every equality test checks), ``cuda`` (ONNX Runtime's CUDA
execution provider, from ``onnxruntime-gpu``; torchscript on torch's CUDA device), ``auto`` (cuda where the
backend has it, else cpu). Inputs and outputs are numpy arrays on every device.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from usam_bioimageio import settings
from usam_bioimageio.errors import PackageError, UsageError
from usam_bioimageio.runtime.packages import Package, verified_weights

WEIGHT_FORMATS = ("onnx", "torchscript")
DEVICES = ("cpu", "cuda", "auto")
CUDA_PROVIDER = "CUDAExecutionProvider"


def cuda_available(weight_format: str) -> bool:
    """Whether the backend of ``weight_format`` can run on a CUDA GPU here."""
    if weight_format == "onnx":
        import onnxruntime as ort

        return CUDA_PROVIDER in ort.get_available_providers()
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(device: str, weight_format: str) -> str:
    """``device`` ("cpu", "cuda" or "auto") -> the device a runner uses; "cuda" where the backend lacks it is an
    error (one line naming what to install), "auto" falls back to "cpu"."""
    if device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return "cpu"
    if cuda_available(weight_format):
        return "cuda"
    if device == "auto":
        return "cpu"
    need = ("ONNX Runtime has no CUDA execution provider here (pip install onnxruntime-gpu, with an NVIDIA driver)"
            if weight_format == "onnx" else "torch sees no CUDA GPU here")
    raise UsageError(f"device cuda: {need}; use --device cpu or auto")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


class Runner:
    """Callable that runs a package: ``runner(name=array, ...) -> {output_name: array}``.

    Sessions are compute resources, not state: the same runner gives the same outputs for the same inputs.
    """

    def __init__(self, package: Package, *, weight_format: str = "onnx", num_threads: Optional[int] = None,
                 device: str = "cpu"):
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, not {weight_format!r}")
        self.package = package
        self.weight_format = weight_format
        self.device = resolve_device(device, weight_format)
        self.input_names: Tuple[str, ...] = tuple(t["id"] for t in package.rdf["inputs"])
        self.output_names: Tuple[str, ...] = tuple(t["id"] for t in package.rdf["outputs"])
        path = verified_weights(package, weight_format)
        what = f"the {weight_format} weights {path} of package {package.name!r}"
        threads = num_threads or settings.num_threads()
        if weight_format == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            # The default memory arena nearly doubles peak RSS for ViT encoders (measured-facts.md); for
            # the small decoders it saves a third of the time.
            options.enable_cpu_mem_arena = package.kind not in ("image_encoder", "ais")
            if threads:
                options.intra_op_num_threads = threads
            # no busy-waiting after a run: the runtime's numpy work (mask upscaling, post-processing) runs
            # between decoder calls, and spinning ONNX Runtime threads would take its cores (2 here)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                providers = ([CUDA_PROVIDER] if self.device == "cuda" else []) + ["CPUExecutionProvider"]
                self._session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
                raise PackageError(f"ONNX Runtime cannot load {what} (truncated or corrupt?): "
                                   f"{_first_line(err)}") from None
            # a graph of other tensors than the rdf describes would fail at the first run, with ONNX Runtime's error
            ins = [i.name for i in self._session.get_inputs()]
            outs = [o.name for o in self._session.get_outputs()]
            if set(ins) != set(self.input_names) or not set(self.output_names) <= set(outs):
                raise PackageError(f"{what} take {ins} and give {outs}, but its rdf.yaml describes "
                                   f"{list(self.input_names)} -> {list(self.output_names)}")
        else:
            try:
                import torch
            except ImportError as err:
                raise PackageError("torchscript weights need torch: pip install 'usam-bioimageio[torch]'") from err
            # torch's thread count is process-wide: a runner leaves it to the caller (torch.set_num_threads)
            try:
                self._module = torch.jit.load(str(path), map_location=self.device).eval()
            except Exception as err:  # RuntimeError for a truncated archive, ValueError, ...
                raise PackageError(f"torch cannot load {what} (truncated or corrupt?): {_first_line(err)}") from None

    def __call__(self, **inputs: np.ndarray) -> Dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)} for package {self.package.name!r}")
        if self.weight_format == "onnx":
            outs = self._session.run(list(self.output_names), {k: inputs[k] for k in self.input_names})
        else:
            import torch

            with torch.no_grad():
                result = self._module(*[torch.from_numpy(np.ascontiguousarray(inputs[k])).to(self.device)
                                        for k in self.input_names])
            outs = [r.cpu().numpy() for r in (result if isinstance(result, (tuple, list)) else (result,))]
        return dict(zip(self.output_names, outs))
