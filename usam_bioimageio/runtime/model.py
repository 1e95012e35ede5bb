"""A loaded model family with its runners: the handle every runtime function takes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

from usam_bioimageio.errors import UsageError
from usam_bioimageio.runtime.backends import Runner, resolve_device
from usam_bioimageio.runtime.packages import Family, load_family


@dataclass
class SamModel:
    """The packages of one model and lazily created runners for them (ONNX by default, on the CPU by default;
    ``device``: see ``runtime.backends``)."""

    family: Family
    weight_format: str = "onnx"
    num_threads: Optional[int] = None
    device: str = "cpu"
    _runners: Dict[str, Runner] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, source: Union[str, os.PathLike], *, weight_format: str = "onnx", num_threads: Optional[int] = None,
             device: str = "cpu", encoder_precision: str = "fp32"):
        """Load a family folder (or a single package) from ``source``; see ``packages.load_family``. ``device``
        ("cpu", "cuda", "auto") is checked here, before any package is read. ``encoder_precision`` "int8" or
        "fp16": the family's reduced-precision encoder variant (ONNX only) instead of its fp32 encoder."""
        resolve_device(device, weight_format)
        if encoder_precision != "fp32" and weight_format != "onnx":
            raise UsageError(f"the {encoder_precision} image encoder has ONNX weights only, not {weight_format}")
        family = load_family(source, encoder_precision=encoder_precision)
        return cls(family, weight_format=weight_format, num_threads=num_threads, device=device)

    def runner(self, kind: str) -> Runner:
        if kind not in self._runners:
            self._runners[kind] = Runner(
                self.family.get(kind), weight_format=self.weight_format, num_threads=self.num_threads,
                device=self.device)
        return self._runners[kind]

    @property
    def encoder_identity(self) -> str:
        return self.family.get("image_encoder").identity

    @property
    def image_size(self) -> int:
        """The model's input size N: the encoder resizes an image's longer side to N and pads it to N x N;
        embeddings are (1, 256, N/16, N/16), low-resolution masks and mask prompts N/4, AIS head maps N x N."""
        return self.family.image_size

    @property
    def pixel_scale(self) -> float:
        """The pixel scale the model was trained at (``config.usam.pixel_scale``, 1 unless recorded): pass it as the
        ``scale`` of ``automatic_instance_segmentation`` / ``ais_maps``, as ``usam ais`` does by default."""
        return self.family.pixel_scale

    @property
    def model_type(self) -> str:
        return next(iter(self.family.packages.values())).model_type
