"""µSAM + SamPredictor input preprocessing as one torch graph.

What µSAM (micro_sam 1.8.14 ``util._to_image``) and segment_anything's ``SamPredictor.set_image`` do to an
image before the ViT, reproduced bit for bit for inputs of any size, in ops that ``torch.jit.script``,
``torch.jit.trace`` and the ONNX exporter (opset 17, dynamic height / width) all keep dynamic:

1. :func:`usam_to_uint8`: per image and channel ``trunc((x - min) / (max(x - min) + 1e-7) * 255)`` in float32.
2. :func:`longest_side_shape` + :func:`pil_bilinear_resize`: ``ResizeLongestSide(1024).apply_image``, i.e.
   Pillow's ``Image.resize((neww, newh), BILINEAR)`` on 8-bit data (libImaging/Resample.c, 8bpc path):
   separable, two passes (horizontal first, except that Pillow >= 13 goes vertical first when the height
   shrinks by more than twice as many pixels as the width, see :func:`vertical_pass_first`); each pass a
   triangle filter stretched by
   ``max(in / out, 1)`` (antialiasing when shrinking), its window clipped to the image and its weights
   divided by their (sequential) sum, then converted to 22-bit fixed point
   (``int(0.5 + w * 2**22)``); every output pixel is ``clip8((2**21 + sum(pixel * weight)) >> 22)``, so the
   intermediate image is 8-bit again. A pass whose size does not change is an exact identity here (Pillow
   skips it; its weights would be ``[1, 0]``).
3. :func:`normalize_and_pad`: ``(x - pixel_mean) / pixel_std`` in float32 and zero padding bottom / right.

The weight matrices are built in the graph from ``torch.arange`` over the dynamic input sizes. Host runtimes
lack float64 kernels (ONNX Runtime 1.13.1 has no float64 ``Floor``; 1.15-1.25 fuse float64 MatMul + Transpose
into a ``FusedMatMul`` without a float64 kernel), so the graph keeps float64 to the element-wise weight
arithmetic that must repeat Pillow's doubles (Add, Sub, Mul, Div, Abs, comparisons, Where, CumSum), rounds
by casting to int64 (a C truncation, as Pillow's ``(int)`` casts) and does the products in float32:
the 22-bit weights are split into ``hi = w >> 6`` and ``lo = w & 63``, so that both ``sum(pixel * hi)``
(< 255 * (2**16 + k / 128)) and ``sum(pixel * lo)`` (< 255 * 63 * k) stay below 2**24 for windows of
``k <= 1044`` pixels (a downscaling factor up to ~520): every partial sum is an integer float32 holds
exactly, in any summation order, and :func:`_clip8` recombines them exactly in float32.
Their output axis always has ``image_size`` (1024) rows; rows past the resized size are zero, so the
resized image comes out already zero-padded to 1024 x 1024 and no op in the graph has an output shape
that depends on the data.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from usam_bioimageio.registry import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

__all__ = [
    "PRECISION_BITS",
    "SamPreprocess",
    "bilinear_weights",
    "longest_side_shape",
    "normalize_and_pad",
    "pil_bilinear_resize",
    "split_weights",
    "trunc_nonnegative",
    "usam_to_uint8",
    "vertical_pass_first",
]

PRECISION_BITS = 22  # Resample.c: 32 - 8 (result) - 2 (sign / overflow)
# TorchScript does not read module-level floats, so the functions below spell these out:
# 2**22 = 4194304.0 (fixed-point one), 2**21 = 2097152.0 (the accumulators' start, rounding),
# 2**-22 = 2.384185791015625e-07 (exact: a power of two).


def usam_to_uint8(x: Tensor) -> Tensor:
    """µSAM's per-channel min-max normalisation to uint8 values, for ``x`` of shape (..., H, W).

    float32 throughout, as micro_sam: ``x -= min; x /= max + 1e-7; (x * 255).astype(uint8)``. Min and max
    are taken over the last two axes, per image and channel. Returns float32 holding integers 0..255.
    """
    x = x.to(torch.float32)
    x = x - torch.amin(x, dim=[-2, -1], keepdim=True)
    x = x / (torch.amax(x, dim=[-2, -1], keepdim=True) + 1e-7)
    # uint8 conversion truncates; x * 255 is in [0, 255] here, so floor == trunc
    return torch.floor(x * 255.0)


def trunc_nonnegative(x: Tensor) -> Tensor:
    """``floor`` of a non-negative float tensor (C's ``(int)`` truncation of any), as a cast to int64 and back.

    Host runtimes have no float64 ``Floor`` (ONNX Runtime 1.13.1); a Cast has kernels for every dtype.
    """
    return x.to(torch.int64).to(x.dtype)


def longest_side_shape(h: Tensor, w: Tensor, target: int = IMAGE_SIZE) -> Tuple[Tensor, Tensor]:
    """``ResizeLongestSide.get_preprocess_shape`` on float64 tensors.

    ``scale = target / max(h, w)``; ``(int(h * scale + 0.5), int(w * scale + 0.5))``: the same IEEE double
    operations as SAM's Python code, so the same result. Returns float64 tensors holding integers. The one
    graph version of this, used by every package that needs the resized size.
    """
    h = h.to(torch.float64)
    w = w.to(torch.float64)
    # a tensor / tensor division: ``scalar / tensor`` would be ``reciprocal(t) * scalar`` (two roundings)
    scale = torch.full_like(h, float(target)) / torch.maximum(h, w)
    return trunc_nonnegative(h * scale + 0.5), trunc_nonnegative(w * scale + 0.5)


def bilinear_weights(in_size: Tensor, out_size: Tensor, index_in: Tensor, rows: int) -> Tensor:
    """Pillow's 8-bit BILINEAR fixed-point weights for one axis, as a dense (rows, in) float64 matrix.

    ``in_size`` / ``out_size`` are float64 tensors (one element) with the sizes, ``index_in`` is
    ``arange(in)`` in float64. Row ``i < out_size`` holds the integer weights of output pixel ``i``
    (``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Resample.c, same operation order); rows
    ``>= out_size`` are zero.
    """
    index_out = torch.arange(rows, dtype=torch.float64, device=index_in.device).unsqueeze(1)  # (rows, 1)
    j = index_in.unsqueeze(0)  # (1, in)
    out_safe = torch.clamp(out_size, min=1.0)  # avoid inf / nan when the resized size would be 0
    scale = in_size / out_safe
    filterscale = torch.clamp(scale, min=1.0)
    support = filterscale  # BILINEAR support is 1.0
    ss = torch.ones_like(filterscale) / filterscale
    center = (index_out + 0.5) * scale
    # (int)(v + 0.5) truncates; for v < 0 the clamp to 0 follows, so truncation and floor agree
    xmin = torch.clamp(trunc_nonnegative((center - support) + 0.5), min=0.0)
    xmax = torch.minimum(trunc_nonnegative((center + support) + 0.5), in_size)
    t = torch.abs(((j - center) + 0.5) * ss)
    w = torch.where(t < 1.0, 1.0 - t, torch.zeros_like(t))
    inside = (j >= xmin) & (j < xmax) & (index_out < out_size)
    w = torch.where(inside, w, torch.zeros_like(w))
    # Pillow sums the window's weights left to right; a cumulative sum adds them (and exact zeros) in that
    # order. The total is the last column.
    ww = torch.cumsum(w, dim=1)[:, -1:]
    w = w / torch.where(ww != 0.0, ww, torch.ones_like(ww))
    # all weights are >= 0: (int)(0.5 + w * 2**22); w * 2**22 is exact
    return trunc_nonnegative(w * 4194304.0 + 0.5)


def split_weights(weights: Tensor) -> Tensor:
    """(R, in) integer weights below 2**23 -> float32 (2R, in): ``hi = w >> 6`` stacked over ``lo = w & 63``.

    ``sum(pixel * w) = 64 * sum(pixel * hi) + sum(pixel * lo)``, both sums exact in float32 (module notes).
    """
    hi = trunc_nonnegative(weights * 0.015625)  # / 64, exact (a power of two)
    lo = weights - hi * 64.0
    return torch.cat([hi, lo], dim=0).to(torch.float32)


def _clip8(hi: Tensor, lo: Tensor) -> Tensor:
    """``clip8((2**21 + acc) >> 22)`` for ``acc = 64 * hi + lo``, in float32.

    ``hi``, ``lo``: float32 integers below 2**24 (so ``acc`` needs 30 bits, more than float32 holds).
    With ``hi = 2**16 a1 + a0`` and ``lo = 2**22 b1 + b0``: ``acc + 2**21 = 2**22 (a1 + b1) + (64 a0 + b0 +
    2**21)``, whose last term is below 2**24, so every step is exact.
    """
    a1 = torch.floor(hi * 1.52587890625e-05)  # 2**-16
    a0 = hi - a1 * 65536.0
    b1 = torch.floor(lo * 2.384185791015625e-07)  # 2**-22
    b0 = lo - b1 * 4194304.0
    rest = torch.floor((a0 * 64.0 + b0 + 2097152.0) * 2.384185791015625e-07)
    return torch.clamp(a1 + b1 + rest, min=0.0, max=255.0)


def _resample_cols(x: Tensor, weights: Tensor) -> Tensor:
    """One horizontal pass: float32 (..., R, W) x split weights (2C, W) -> 8-bit (..., R, C)."""
    acc = torch.matmul(x, weights.transpose(0, 1))
    c = weights.shape[0] // 2
    return _clip8(acc[..., :c], acc[..., c:])


def _resample_rows(x: Tensor, weights: Tensor) -> Tensor:
    """One vertical pass: split weights (2R, H) x float32 (..., H, C) -> 8-bit (..., R, C)."""
    acc = torch.matmul(weights, x)
    r = weights.shape[0] // 2
    return _clip8(acc[..., :r, :], acc[..., r:, :])


def vertical_pass_first(in_h: Tensor, in_w: Tensor, out_h: Tensor, out_w: Tensor) -> Tensor:
    """Pillow 13's choice of pass order (python-pillow/Pillow#9549), as a bool tensor.

    Pillow >= 13 runs the vertical pass first when the height shrinks and loses more than twice as many
    pixels as the width: ``out_h < in_h and in_h - out_h > 2 * (in_w - out_w)``. Pillow <= 12 always runs
    the horizontal pass first. As the intermediate image is 8-bit, the order changes some pixels by 1.
    """
    return (out_h < in_h) & ((in_h - out_h) > 2.0 * (in_w - out_w))


def pil_bilinear_resize(
    x: Tensor,
    out_h: Tensor,
    out_w: Tensor,
    rows: int = IMAGE_SIZE,
    cols: int = IMAGE_SIZE,
    pillow13_pass_order: bool = True,
) -> Tensor:
    """Pillow's ``resize((out_w, out_h), BILINEAR)`` of 8-bit images, zero-padded to (rows, cols).

    ``x``: (..., H, W) holding integers 0..255 (any float dtype). ``out_h`` / ``out_w``: one-element
    tensors, ``<= rows`` / ``<= cols``. Returns float32 (..., rows, cols) whose top-left out_h x out_w block
    is exactly Pillow's result and whose remainder is 0.

    ``pillow13_pass_order``: pick the pass order as Pillow >= 13 does (:func:`vertical_pass_first`);
    False: always horizontal first (Pillow <= 12). Eager and scripted code run only the chosen order;
    under ``torch.jit.trace`` (and so the ONNX exporter given an ``nn.Module``) both orders are computed and
    the result selected with ``torch.where``, which keeps the choice dynamic at twice the cost.
    """
    x = x.to(torch.float32)
    index_y = torch.arange(x.shape[-2], dtype=torch.float64, device=x.device)
    index_x = torch.arange(x.shape[-1], dtype=torch.float64, device=x.device)
    size = torch._shape_as_tensor(x).to(device=x.device, dtype=torch.float64)
    in_h = size[-2:-1]
    in_w = size[-1:]
    out_h = out_h.to(torch.float64)
    out_w = out_w.to(torch.float64)
    weights_x = split_weights(bilinear_weights(in_w, out_w, index_x, cols))  # (2 cols, W)
    weights_y = split_weights(bilinear_weights(in_h, out_h, index_y, rows))  # (2 rows, H)
    if not pillow13_pass_order:
        return _resample_rows(_resample_cols(x, weights_x), weights_y)
    vertical_first = vertical_pass_first(in_h, in_w, out_h, out_w)
    if torch.jit.is_tracing():
        horizontal = _resample_rows(_resample_cols(x, weights_x), weights_y)
        vertical = _resample_cols(_resample_rows(x, weights_y), weights_x)
        return torch.where(vertical_first, vertical, horizontal)
    if bool(vertical_first):
        return _resample_cols(_resample_rows(x, weights_y), weights_x)
    return _resample_rows(_resample_cols(x, weights_x), weights_y)


def normalize_and_pad(x: Tensor, h: Tensor, w: Tensor, pixel_mean: List[float], pixel_std: List[float]) -> Tensor:
    """``Sam.preprocess`` for an image already zero-padded to its final size.

    ``x``: (B, C, S, S) whose top-left h x w block is the resized uint8-valued image; ``h`` / ``w``:
    one-element tensors. Returns float32 ``(x - pixel_mean) / pixel_std`` there (float32 operands, as
    SAM's buffers) and exactly 0 elsewhere (SAM's ``F.pad``).
    """
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    y = (x.to(torch.float32) - mean) / std
    # float32 indices: exact below 2**24
    index_y = torch.arange(x.shape[-2], dtype=torch.float32, device=x.device).unsqueeze(1)
    index_x = torch.arange(x.shape[-1], dtype=torch.float32, device=x.device).unsqueeze(0)
    valid = (index_y < h.to(torch.float32)) & (index_x < w.to(torch.float32))
    return torch.where(valid, y, torch.zeros_like(y))


class SamPreprocess(nn.Module):
    """Raw image (B, 3, H, W), any value range, any H and W -> SAM encoder input (B, 3, 1024, 1024).

    Exactly ``SamPredictor.set_image(micro_sam.util._to_image(image))`` up to the image encoder, per
    image of the batch (all of one size); channels must already be mapped to three (the runtime's
    ``usam_bioimageio.runtime.geometry.to_rgb``). No parameters or buffers; scriptable and traceable.

    ONNX (opset 17, dynamic height / width): exporting the ``nn.Module`` (traced by the exporter) computes
    both Pillow pass orders and selects one with ``Where``; exporting ``torch.jit.script(module)`` gives an
    ``If`` that runs only the chosen one. Both are exact. ``pillow13_pass_order=False`` reproduces
    Pillow <= 12 (always horizontal first) instead.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, pillow13_pass_order: bool = True) -> None:
        super().__init__()
        self.image_size = image_size
        self.pillow13_pass_order = pillow13_pass_order
        self.pixel_mean: List[float] = [float(v) for v in PIXEL_MEAN]
        self.pixel_std: List[float] = [float(v) for v in PIXEL_STD]

    def forward(self, image: Tensor) -> Tensor:
        x = usam_to_uint8(image)
        size = torch._shape_as_tensor(x).to(device=x.device, dtype=torch.float64)
        new_h, new_w = longest_side_shape(size[-2:-1], size[-1:], self.image_size)
        x = pil_bilinear_resize(x, new_h, new_w, self.image_size, self.image_size, self.pillow13_pass_order)
        return normalize_and_pad(x, new_h, new_w, self.pixel_mean, self.pixel_std)
