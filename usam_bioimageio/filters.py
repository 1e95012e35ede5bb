"""bioimage_cpp's filters as µSAM runs them, reproduced bit for bit in numpy: Gaussian smoothing (AIS post-processing,
points from a mask).

Ties between maxima decide µSAM's seeds and points, so a float64 filter (1e-7 off) is not enough.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gaussian_smoothing"]



def _gaussian_kernel_half(sigma: float) -> np.ndarray:
    """Half kernel h[0..r], r = max(1, ceil(3 sigma)): exp(-k^2 / (2 sigma^2)) in double precision,
    normalised so that the full kernel (h[r]..h[0]..h[r]) sums to 1, then rounded to float32."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    inv_2sigma2 = 0.5 * (1.0 / (sigma * sigma))
    raw = [math.exp(-float(k) * float(k) * inv_2sigma2) for k in range(radius + 1)]
    total = raw[0]
    for value in raw[1:]:
        total += 2.0 * value
    scale = 1.0 / total
    return np.array([value * scale for value in raw], dtype=np.float32)


def _mirror_indices(n: int, radius: int) -> np.ndarray:
    """Indices -radius..n-1+radius reflected without repeating the edge pixel (scipy mode="mirror")."""
    x = np.arange(-radius, n + radius)
    if n <= 1:
        return np.zeros_like(x)
    period = 2 * (n - 1)
    r = np.mod(x, period)
    return np.where(r >= n, period - r, r)


def _fma32(a: np.float32, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add a * b + c: a * b is exact in float64; the sum is rounded to float64, then to
    float32, which equals the single rounding of a hardware FMA except in rare halfway cases (~2**-29)."""
    return (np.float64(a) * b.astype(np.float64) + c).astype(np.float32)


_SIMD_WIDTH = 8  # float32 lanes of an AVX2 register
_MAX_SPECIALISED_RADIUS = 12  # larger kernels take the reference's generic (runtime-radius) code


def _convolve_rows(work: np.ndarray, half: np.ndarray, contiguous: bool, fused: bool) -> np.ndarray:
    """Correlate along axis 0 of ``work`` (n, m) with the symmetric kernel ``half``, float32.

    Unfused (the reference's scalar code): acc = h0*x, then acc = acc + h[k]*(x[i-k] + x[i+k]).
    Fused (its AVX2 code, x86-64 CPUs with AVX2 + FMA): acc = fma(h[k], x[i-k] + x[i+k], acc), except in the
    scalar remainder between the 8-wide vector loop and the border, where the compiler fuses the first
    product instead: acc = fma(h0, x, h1*(x[i-1] + x[i+1])), then fma for k >= 2. ``contiguous`` says whether
    axis 0 is the image's innermost axis (it decides where that remainder lies).
    """
    radius = half.shape[0] - 1
    n, m = work.shape
    padded = work[_mirror_indices(n, radius)]

    def pair(k: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
        return padded[radius - k:radius - k + n][rows, cols] + padded[radius + k:radius + k + n][rows, cols]

    acc = half[0] * work
    if not fused:
        for k in range(1, radius + 1):
            acc = acc + half[k] * pair(k)
        return acc
    for k in range(1, radius + 1):
        acc = _fma32(half[k], pair(k), acc)
    # The remainder: the reference convolves positions [prologue_end, epilogue_start) with vectors of 8.
    prologue_end = min(radius, n)
    epilogue_start = max(prologue_end, n - radius)
    if contiguous and n == 1:  # a one-pixel-wide image: its border loop rounds as the remainder loop (measured)
        rows, cols = slice(0, 1), slice(None)
    elif contiguous:
        start = prologue_end + (epilogue_start - prologue_end) // _SIMD_WIDTH * _SIMD_WIDTH
        rows, cols = slice(start, epilogue_start), slice(None)
    else:
        rows, cols = slice(prologue_end, epilogue_start), slice(m // _SIMD_WIDTH * _SIMD_WIDTH, m)
    if acc[rows, cols].size:
        tail = _fma32(half[0], work[rows, cols], half[1] * pair(1, rows, cols))
        for k in range(2, radius + 1):
            tail = _fma32(half[k], pair(k, rows, cols), tail)
        acc[rows, cols] = tail
    return acc


def gaussian_smoothing(image: np.ndarray, sigma: float, *, backend: str = "avx2") -> np.ndarray:
    """Gaussian smoothing of a 2D map as ``bioimage_cpp.filters.gaussian_smoothing`` (which µSAM uses).

    Kernel radius ``max(1, ceil(3 sigma))``, float32 taps summing to 1, mirror border (reflection without
    repeating the edge pixel, scipy's ``mode="mirror"``), separable: first along y, then along x, float32
    arithmetic. A float64 input is computed in float32 and returned as float64, like the reference.

    bioimage-cpp picks its code at run time: ``backend="avx2"`` reproduces what it computes on x86-64 CPUs
    with AVX2 and FMA (nearly all since 2015; fused multiply-adds), ``"scalar"`` what it computes elsewhere
    or with ``BIOIMAGE_CPP_FILTERS_FORCE_SCALAR=1``. Both are bit-identical to bioimage-cpp 0.9.0. ``scipy.ndimage.gaussian_filter(image, sigma,
    mode="mirror", truncate=3)`` is the same filter up to a few float32 ulps, except where its window
    ``int(3 sigma + 0.5)`` differs from ``ceil(3 sigma)`` (e.g. sigma 1.4: radius 4 vs 5).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"gaussian_smoothing: expected a 2D image, got shape {image.shape}")
    if not float(sigma) > 0:
        raise ValueError(f"gaussian_smoothing: sigma must be > 0, got {sigma!r}")
    if backend not in ("avx2", "scalar"):
        raise ValueError(f"gaussian_smoothing: backend must be 'avx2' or 'scalar', got {backend!r}")
    out_dtype = np.float64 if image.dtype == np.float64 else np.float32
    work = np.ascontiguousarray(image, dtype=np.float32)
    if work.size and not np.isfinite(work).all():
        raise ValueError("gaussian_smoothing: image must contain only finite values")
    half = _gaussian_kernel_half(float(sigma))
    fused = backend == "avx2" and half.shape[0] - 1 <= _MAX_SPECIALISED_RADIUS
    smoothed = _convolve_rows(work, half, contiguous=False, fused=fused)
    smoothed = _convolve_rows(np.ascontiguousarray(smoothed.T), half, contiguous=True, fused=fused).T
    return np.ascontiguousarray(smoothed).astype(out_dtype, copy=False)
