"""The reference environment's import set-up, shared by the scripts, benchmarks and tests that run micro-sam.

Run with the python of scripts/regenerate_ais_reference.sh's venv (micro-sam 1.8.14 and friends).
``setup_imports()``: torchvision / timm where they import, else the project's test-only stand-ins
(tests/_shims: PIL resize, NMS, DropPath, ...) plus stubs that raise if called for the torchvision modules
micro_sam / torch_em import at module level (training loggers). ``refresh_attention_bias_cache(sam)``: see
its docstring (MobileSAM's vit_t caches attention biases before micro-sam loads the weights).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last-resort stubs for torchvision submodules that tests/_shims does not provide."""

    def find_spec(self, name, path, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def __getattr__(attr, _module=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"{_module}.{attr} is a stub: torchvision is not installed")
            return unavailable

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def setup_imports(*, stub_missing: bool = True) -> str:
    """The one loader of the stand-ins: the real torchvision / timm if both import, else tests/_shims first on
    the path; ``stub_missing``: also stubs for the torchvision submodules tests/_shims lacks (micro-sam's
    module-level imports). Returns what is in use."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import torchvision  # noqa: F401
        import timm  # noqa: F401
        return f"torchvision {metadata.version('torchvision')}"
    except Exception:
        for m in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[m]
        if str(ROOT / "tests" / "_shims") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests" / "_shims"))
        if stub_missing and not any(isinstance(f, StubFinder) for f in sys.meta_path):
            sys.meta_path.append(StubFinder())
        return "tests/_shims stand-ins (torchvision / timm not importable with this torch)"


def refresh_attention_bias_cache(sam) -> float:
    """Recompute MobileSAM's cached attention bias tables (``ab``) from the loaded ``attention_biases``;
    returns the largest change (0 for models without the cache)."""
    import torch

    change = 0.0
    for module in sam.modules():
        if hasattr(module, "ab") and hasattr(module, "attention_biases"):
            fresh = module.attention_biases[:, module.attention_bias_idxs].detach()
            change = max(change, float((fresh - module.ab).abs().max()))
            with torch.no_grad():
                module.ab.copy_(fresh)
    return change
