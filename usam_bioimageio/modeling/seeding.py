"""Random test weights that are the same bits on every CPU.

torch's ``randn`` takes a different code path by CPU capability (its AVX2 Box-Muller differs from the scalar one
in the last bits), so a seeded torch draw is not portable between machines, and the tests check reference
fixtures made elsewhere against the sha256 of the weights. numpy's PCG64 + ziggurat draws float64 values from
integer arithmetic and fixed tables; they are scaled in float64 and rounded to the parameter's dtype once.
"""

from __future__ import annotations

import numpy as np
import torch


class SeededDraws:
    """Normal draws from ``numpy.random.Generator(PCG64(seed))``, written into tensors in call order."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def normal_(self, t: torch.Tensor, std: float = 1.0, mean: float = 0.0) -> None:
        """Fill ``t`` with N(mean, std^2) values."""
        values = self._rng.standard_normal(tuple(t.shape)) * std + mean
        t.copy_(torch.from_numpy(values).to(t.dtype))

    def lognormal_(self, t: torch.Tensor, sigma: float) -> None:
        """Fill ``t`` with exp(N(0, sigma^2)): positive values around 1 (BatchNorm running variances)."""
        values = np.exp(self._rng.standard_normal(tuple(t.shape)) * sigma)
        t.copy_(torch.from_numpy(values).to(t.dtype))
