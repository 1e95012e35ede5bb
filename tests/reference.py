"""The reference implementations: segment_anything's and mobile_sam's SamPredictor, and µSAM's input
normalisation. Imported by tests and benchmarks only.

torchvision / timm are replaced by the stand-ins in tests/_shims when they cannot be imported (README there).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from micro_sam_env import setup_imports  # noqa: E402  (the one stand-in loader, shared with the scripts)


def segment_anything():
    """The real ``segment_anything`` package (vit_b / vit_l / vit_h)."""
    setup_imports(stub_missing=False)
    return importlib.import_module("segment_anything")


def mobile_sam():
    """The real ``mobile_sam`` package (vit_t)."""
    setup_imports(stub_missing=False)
    return importlib.import_module("mobile_sam")


def build_reference_sam(model_type: str, state_dict=None, *, architecture=None):
    """Build the reference ``Sam`` for ``model_type`` and optionally load ``state_dict`` strictly.

    ``architecture`` (a ``registry.Architecture`` of a ViT encoder): build segment_anything's SAM with these
    encoder hyper-parameters instead of the registry's (e.g. vit_b cut to fewer blocks)."""
    if model_type == "vit_t":
        pkg = mobile_sam()
        model = pkg.sam_model_registry["vit_t"]()
    elif architecture is not None:
        segment_anything()  # the stand-ins first
        builder = importlib.import_module("segment_anything.build_sam")
        model = builder._build_sam(encoder_embed_dim=architecture.embed_dim, encoder_depth=architecture.depth,
                                   encoder_num_heads=architecture.num_heads,
                                   encoder_global_attn_indexes=list(architecture.global_attn_indexes))
    else:
        pkg = segment_anything()
        model = pkg.sam_model_registry[model_type]()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def reference_predictor(model):
    """``SamPredictor`` of the package that ``model`` comes from."""
    pkg = mobile_sam() if type(model).__module__.startswith("mobile_sam") else segment_anything()
    return pkg.SamPredictor(model)


def usam_to_image(image: np.ndarray) -> np.ndarray:
    """micro_sam 1.8.14 ``util._to_image``: channels to RGB, then per-channel min-max to uint8 (float32)."""
    x = image
    if x.ndim == 2:
        x = np.concatenate([x[..., None]] * 3, axis=-1)
    elif x.ndim == 3 and x.shape[-1] == 1:
        x = np.concatenate([x] * 3, axis=-1)
    elif x.ndim == 3 and x.shape[-1] == 2:
        x = np.concatenate([x, np.zeros(x.shape[:2] + (1,), dtype=x.dtype)], axis=-1)
    elif x.ndim == 3 and x.shape[-1] > 3:
        warnings.warn("more than three channels: using the first three")
        x = x[..., :3]
    x = x.astype("float32")
    x -= x.min(axis=(0, 1))[None, None]
    x /= x.max(axis=(0, 1))[None, None] + 1e-7
    return np.array((x * 255).astype("uint8"))
