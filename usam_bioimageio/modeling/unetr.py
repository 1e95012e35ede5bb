"""µSAM's automatic instance segmentation (AIS) decoder: torch_em's UNETR decoder, in pure torch.

What micro_sam 1.8.14 builds (``instance_segmentation.get_unetr`` / ``get_decoder``) is
``torch_em.model.UNETR(backbone="sam", encoder=<SAM image encoder>, out_channels=3, use_sam_stats=True,
final_activation="Sigmoid", use_skip_connection=False, resize_input=True, use_conv_transpose=...)``
(torch_em 0.10.9), run through ``DecoderAdapter`` on precomputed image embeddings:

- **Inputs**: only the SAM image embeddings (B, 256, 64, 64) (``embed_dim`` 256: µSAM passes the SAM
  encoder, whose neck outputs 256 channels), plus two shapes for the output: the resized ("input") size
  ``ResizeLongestSide.get_preprocess_shape(h, w, 1024)`` and the original size. With
  ``use_skip_connection=False`` there is *no* branch from the (preprocessed) image and no intermediate ViT
  features: the full-resolution features ``z0`` come from the embeddings through the ``deconv1..4`` chain.
- **Layers** (``initial_features`` 64, ``features`` = [512, 256, 128, 64]):
  ``deconvK`` = upsampler x2 -> 3x3 conv -> BatchNorm2d -> ReLU, chained: z9 (512 @ 128), z6 (256 @ 256),
  z3 (128 @ 512), z0 (64 @ 1024); ``base`` = ConvBlock(256 -> 512) on the embeddings; ``decoder``: three
  levels ``x = block(cat(sampler(x), skip))`` with skips z9, z6, z3; ``deconv_out`` = upsampler x2;
  ``decoder_head`` = ConvBlock(128 -> 64) on ``cat(x, z0)``; ``out_conv`` 1x1 conv (64 -> 3); Sigmoid.
  A ConvBlock is InstanceNorm2d (no affine, no running stats) -> 3x3 conv -> ReLU -> InstanceNorm2d ->
  3x3 conv -> ReLU. The upsampler is ``F.interpolate(scale_factor=2, bilinear, align_corners=False)`` and
  a 1x1 conv, or with ``use_conv_transpose`` a 2x2 stride-2 ``ConvTranspose2d``.
- **Quirk kept**: torch_em's ``Decoder._concat`` center-crops the skip tensor to the decoder tensor's shape
  *including the channel axis*: the skips have twice the channels of the upsampled decoder tensor, so
  only their middle half of channels is used (z9[:, 128:384], z6[:, 64:192], z3[:, 32:96]).
- **BatchNorm in training mode**: µSAM never calls ``eval()`` on the UNETR it builds (``get_unetr``, and
  ``InstanceSegmentationWithDecoder`` does not either), so at inference its ``deconvK`` BatchNorm layers
  normalise with the statistics of the current input (and overwrite their running statistics, which
  then go unused). :class:`BatchNorm2d` does the same without touching the state (``batch_statistics``,
  default True); ``batch_statistics=False`` uses the running statistics, as µSAM's own bioimage.io export
  (``predictor.eval()``) and torch_em's validation do. InstanceNorm (no running statistics) is unaffected.
- **Norms written out**: :class:`InstanceNorm2d` and :class:`BatchNorm2d` compute their statistics as means
  of row means, which gives torch's values to float32 rounding; ONNX Runtime's ``InstanceNormalization``
  and single ``ReduceMean`` over a 1024 x 1024 plane are off by up to ~3e-3, which this avoids.
- **Output** ``UNETR.postprocess_masks``: the (B, 3, 1024, 1024) maps are interpolated to 1024 x 1024
  (bilinear, align_corners=False: an identity here), cropped to the resized size (SAM's padding removed)
  and interpolated bilinearly (align_corners=False, no antialiasing) to the original size.
  :func:`maps_to_original` does the crop and the resize as two interpolation matrices built in the graph
  from the dynamic sizes (traceable, scriptable, ONNX-exportable), equal to ``F.interpolate`` to float32
  rounding.
- **State dict**: the keys of the UNETR's state dict without the ``encoder.`` ones, i.e. µSAM's
  ``decoder_state`` (BatchNorm ``num_batches_tracked`` included): ``base.block.{1,4}.*``,
  ``decoder.blocks.{0,1,2}.block.{1,4}.*``, ``decoder.samplers.{0,1,2}.conv.*`` (``.block.*`` with
  transposed convolutions, which is how µSAM tells the two variants apart), ``deconv{1..4}.block.0.conv.*``
  (``.block.0.block.*``), ``deconv{1..4}.block.1.block.*``, ``deconv{1..4}.block.2.*`` (BatchNorm),
  ``deconv_out.conv.*`` (``deconv_out.block.*``), ``decoder_head.block.{1,4}.*``, ``out_conv.*``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam_bioimageio import registry
from usam_bioimageio.modeling.preprocess import longest_side_shape
from usam_bioimageio.modeling.seeding import SeededDraws

__all__ = [
    "AIS_OUT_CHANNELS",
    "AIS_CHANNEL_NAMES",
    "AisDecoder",
    "BatchNorm2d",
    "InstanceNorm2d",
    "build_ais_decoder",
    "load_ais_decoder",
    "maps_to_original",
    "resize_matrix",
    "seeded_ais_decoder_state",
    "uses_conv_transpose",
]

AIS_OUT_CHANNELS = 3
#: the three output maps, in µSAM's order (``InstanceSegmentationWithDecoder.initialize``)
AIS_CHANNEL_NAMES = ("foreground", "center_distances", "boundary_distances")
INITIAL_FEATURES = 64
DEPTH = 3
GAIN = 2


def _plane_mean(x: Tensor) -> Tensor:
    """Mean over the last two axes, as a mean of row means (keepdim).

    The same value as ``x.mean((2, 3))`` to float32 rounding, but ONNX Runtime's ``ReduceMean`` (and its
    ``InstanceNormalization``) sum large planes with growing float32 error (relative errors of 1e-3 over
    1024 x 1024 planes); two reductions of at most 1024 elements each stay within ~1e-6.
    """
    return torch.mean(torch.mean(x, dim=3, keepdim=True), dim=2, keepdim=True)


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d(c)`` (no affine, no running statistics: nothing in the state dict), written out as
    ``(x - mean) / sqrt(mean((x - mean)^2) + eps)`` over each image and channel with :func:`_plane_mean`,
    so that ONNX keeps torch's precision (see there)."""

    def forward(self, x: Tensor) -> Tensor:
        centered = x - _plane_mean(x)
        var = _plane_mean(centered * centered)
        return centered * torch.rsqrt(var + self.eps)


class ConvBlock2d(nn.Module):
    """torch_em ``ConvBlock2d`` with its default ``norm="InstanceNorm"``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            InstanceNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            InstanceNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Upsampler2d(nn.Module):
    """torch_em ``Upsampler2d``: bilinear x2 (align_corners=False), then a 1x1 convolution."""

    def __init__(self, scale_factor: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.scale_factor = float(scale_factor)
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return self.conv(x)


class SingleDeconv2DBlock(nn.Module):
    """torch_em ``SingleDeconv2DBlock``: a 2x2 stride-2 transposed convolution."""

    def __init__(self, scale_factor: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, padding=0,
                                        output_padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class SingleConv2DBlock(nn.Module):
    """torch_em ``SingleConv2DBlock``: a 'same' convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=1,
                               padding=(kernel_size - 1) // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


def _upsampler(use_conv_transpose: bool, in_channels: int, out_channels: int) -> nn.Module:
    if use_conv_transpose:
        return SingleDeconv2DBlock(2, in_channels, out_channels)
    return Upsampler2d(2, in_channels, out_channels)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same state dict) that, with ``batch_statistics``, always normalises with the
    statistics of its input, as a BatchNorm in training mode does, without updating the running statistics.

    µSAM runs its AIS decoder in training mode: ``get_unetr`` / ``get_decoder`` never call ``eval()`` on
    the UNETR, so its BatchNorm layers use the batch statistics (biased variance) at inference. Written out
    as reductions (mean, biased variance over batch and space) so that TorchScript and ONNX keep it.
    ``batch_statistics=False``: the running statistics, as after ``eval()`` (µSAM's own bioimage.io export).
    """

    def __init__(self, num_features: int, batch_statistics: bool = True) -> None:
        super().__init__(num_features)
        self.batch_statistics = batch_statistics

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not self.batch_statistics:
            # training: batch statistics, running statistics updated, as µSAM trains the decoder
            return super().forward(x)
        mean = torch.mean(_plane_mean(x), dim=0, keepdim=True)
        centered = x - mean
        var = torch.mean(_plane_mean(centered * centered), dim=0, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return centered * scale + self.bias.view(1, -1, 1, 1)


class Deconv2DBlock(nn.Module):
    """torch_em ``Deconv2DBlock``: upsampler x2 -> 3x3 conv -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, use_conv_transpose: bool, kernel_size: int = 3,
                 batch_statistics: bool = True) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _upsampler(use_conv_transpose, in_channels, out_channels),
            SingleConv2DBlock(out_channels, out_channels, kernel_size),
            BatchNorm2d(out_channels, batch_statistics),
            nn.ReLU(True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Decoder(nn.Module):
    """torch_em ``Decoder`` (no explicit skip channels): ``x = block(cat(sampler(x), crop(skip)))`` per level.

    ``crop`` is torch_em's center crop over every axis but the batch axis. The skips (z9, z6, z3) have the
    spatial size of the upsampled decoder tensor and ``features[i]`` channels against its ``features[i + 1]``,
    so the crop keeps channels ``(features[i] - features[i + 1]) // 2`` onwards; those offsets are fixed here
    (constants, so that tracing and ONNX export keep static channel counts).
    """

    def __init__(self, features: List[int], use_conv_transpose: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock2d(i, o) for i, o in zip(features[:-1], features[1:])])
        self.samplers = nn.ModuleList(
            [_upsampler(use_conv_transpose, i, o) for i, o in zip(features[:-1], features[1:])]
        )
        self.skip_starts: List[int] = [(i - o) // 2 for i, o in zip(features[:-1], features[1:])]
        self.skip_counts: List[int] = list(features[1:])

    def forward(self, x: Tensor, skips: List[Tensor]) -> Tensor:
        i = 0
        for block, sampler in zip(self.blocks, self.samplers):
            x = sampler(x)
            skip = skips[i].narrow(1, self.skip_starts[i], self.skip_counts[i])
            x = block(torch.cat([x, skip], dim=1))
            i += 1
        return x


class AisDecoder(nn.Module):
    """The UNETR decoder µSAM uses for AIS: embeddings (B, 256, E, E) -> sigmoid maps (B, 3, 16 E, 16 E) in SAM's
    padded N x N frame, N = 16 E the model's input size ((B, 256, 64, 64) -> (B, 3, 1024, 1024) at 1024;
    :func:`maps_to_original` crops and resizes them).

    Its state dict is µSAM's ``decoder_state``.
    """

    def __init__(self, *, use_conv_transpose: bool = False, batch_statistics: bool = True,
                 embed_dim: int = registry.EMBEDDING_DIM, out_channels: int = AIS_OUT_CHANNELS,
                 initial_features: int = INITIAL_FEATURES) -> None:
        super().__init__()
        self.use_conv_transpose = use_conv_transpose
        self.batch_statistics = batch_statistics
        f = [initial_features * GAIN ** i for i in range(DEPTH + 1)][::-1]  # [512, 256, 128, 64]
        self.decoder = Decoder(f, use_conv_transpose)
        self.deconv1 = Deconv2DBlock(embed_dim, f[0], use_conv_transpose, batch_statistics=batch_statistics)
        self.deconv2 = Deconv2DBlock(f[0], f[1], use_conv_transpose, batch_statistics=batch_statistics)
        self.deconv3 = Deconv2DBlock(f[1], f[2], use_conv_transpose, batch_statistics=batch_statistics)
        self.deconv4 = Deconv2DBlock(f[2], f[3], use_conv_transpose, batch_statistics=batch_statistics)
        self.base = ConvBlock2d(embed_dim, f[0])
        self.out_conv = nn.Conv2d(f[-1], out_channels, 1)
        self.deconv_out = _upsampler(use_conv_transpose, f[-1], f[-1])
        self.decoder_head = ConvBlock2d(2 * f[-1], f[-1])
        self.final_activation = nn.Sigmoid()

    def forward(self, embeddings: Tensor) -> Tensor:
        z12 = embeddings
        z9 = self.deconv1(z12)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.base(z12)
        x = self.decoder(x, [z9, z6, z3])
        x = self.deconv_out(x)
        x = torch.cat([x, z0], dim=1)
        x = self.decoder_head(x)
        x = self.out_conv(x)
        return self.final_activation(x)


def uses_conv_transpose(decoder_state: Mapping[str, Tensor]) -> bool:
    """µSAM's test (``get_unetr``): transposed convolutions iff a ``decoder.samplers`` key has ``.block.``."""
    return any(".block." in k for k in decoder_state if k.startswith("decoder.samplers"))


def build_ais_decoder(model_type: str = "vit_b", *, use_conv_transpose: bool = False,
                      batch_statistics: bool = True) -> AisDecoder:
    """An untrained AIS decoder for ``model_type`` (all SAM model types share it: 256-channel embeddings),
    in eval mode. ``use_conv_transpose``: see :func:`uses_conv_transpose`; ``batch_statistics``: BatchNorm
    as µSAM runs it (True, batch statistics) or with the running statistics (False), see :class:`BatchNorm2d`."""
    registry.architecture(model_type)  # validates the model type
    return AisDecoder(use_conv_transpose=use_conv_transpose, batch_statistics=batch_statistics).eval()


def load_ais_decoder(model_type: str, decoder_state: Mapping[str, Tensor], *,
                     batch_statistics: bool = True) -> AisDecoder:
    """:func:`build_ais_decoder` with µSAM ``decoder_state`` loaded strictly (the variant is read from its keys)."""
    decoder = build_ais_decoder(model_type, use_conv_transpose=uses_conv_transpose(decoder_state),
                                batch_statistics=batch_statistics)
    decoder.load_state_dict(dict(decoder_state), strict=True)
    return decoder.eval()


_ADDITIVE_STD = 0.02
_NORM_WEIGHT_STD = 0.1


def _fan_in(module: nn.Module) -> int:
    if isinstance(module, nn.ConvTranspose2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        s = module.stride[0] * module.stride[1]
        return max(1, module.in_channels * k // s)
    return module.in_channels * module.kernel_size[0] * module.kernel_size[1]


@torch.no_grad()
def seeded_ais_decoder_state(model_type: str = "vit_b", seed: int = 0, *,
                             use_conv_transpose: bool = False) -> Dict[str, Tensor]:
    """A test ``decoder_state`` drawn from ``SeededDraws(seed)``: the same bits on every machine.

    Convolutions feeding a ReLU get He-scaled weights (variance 2 / fan_in), the output convolution
    variance 1 / fan_in, so that the logits have a standard deviation near 1 and the sigmoid maps spread
    over (0, 1) (a few pixels saturate where the features peak, e.g. at the padding's edge); biases and
    BatchNorm statistics get small random values. The draw order is the module order of
    :class:`AisDecoder` (the state dict's order).
    """
    with torch.random.fork_rng(devices=[]):
        decoder = build_ais_decoder(model_type, use_conv_transpose=use_conv_transpose)
    draws = SeededDraws(seed)
    normal = draws.normal_
    for name, module in decoder.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            gain = 1.0 if name == "out_conv" else 2.0
            normal(module.weight, math.sqrt(gain / _fan_in(module)))
            normal(module.bias, _ADDITIVE_STD)
        elif isinstance(module, nn.BatchNorm2d):
            normal(module.weight, _NORM_WEIGHT_STD, 1.0)
            normal(module.bias, _ADDITIVE_STD)
            normal(module.running_mean, _ADDITIVE_STD)
            draws.lognormal_(module.running_var, 0.2)
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# back to the original image size
# --------------------------------------------------------------------------------------------------------------


def resize_matrix(in_size: Tensor, out_index: Tensor, cols: int) -> Tensor:
    """(out, cols) float32 matrix: ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis
    from the first ``in_size`` of ``cols`` entries to ``len(out_index)`` entries; columns >= ``in_size`` are 0.

    ``in_size``: a one-element float tensor; ``out_index``: ``arange(out)`` as float32. As torch's CPU
    kernel, in float32: ``scale = in / out``, ``src = max(scale * (i + 0.5) - 0.5, 0)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, in - 1)``, weights ``1 - l`` and ``l = min(src - i0, 1)``.
    """
    in_size = in_size.to(torch.float32)
    out_size = torch._shape_as_tensor(out_index).to(torch.float32)
    scale = in_size / out_size
    src = torch.clamp(scale * (out_index.unsqueeze(1) + 0.5) - 0.5, min=0.0)  # (out, 1)
    i0 = torch.floor(src)
    lam = torch.clamp(src - i0, max=1.0)
    i1 = torch.clamp(torch.minimum(i0 + 1.0, in_size - 1.0), min=0.0)
    j = torch.arange(cols, dtype=torch.float32, device=out_index.device).unsqueeze(0)  # (1, cols)
    zero = torch.zeros_like(lam)
    w = torch.where(j == i0, 1.0 - lam, zero) + torch.where(j == i1, lam, zero)
    return w


def maps_to_original(maps: Tensor, image: Tensor) -> Tensor:
    """``UNETR.postprocess_masks`` for maps in the padded frame: (B, C, S, S) -> (B, C, h, w), where (h, w)
    are the last two axes of ``image`` (only its shape is used). Crops to the longest-side-resized size of
    (h, w) and resizes bilinearly, as two matrix products. Traceable with dynamic sizes."""
    size = torch._shape_as_tensor(image).to(torch.float64)
    new_h, new_w = longest_side_shape(size[-2:-1], size[-1:], maps.shape[-1])  # the frame is the model's input size
    rows = resize_matrix(new_h, torch.arange(image.shape[-2], dtype=torch.float32, device=maps.device),
                         maps.shape[-2])
    cols = resize_matrix(new_w, torch.arange(image.shape[-1], dtype=torch.float32, device=maps.device),
                         maps.shape[-1])
    return torch.matmul(torch.matmul(rows, maps), cols.transpose(0, 1))


def postprocess_like_torch_em(maps: Tensor, original_shape: Tuple[int, int]) -> Tensor:
    """``torch_em.model.unetr.UNETRBase.postprocess_masks`` verbatim (eager, fixed sizes): for tests."""
    h, w = original_shape
    size = maps.shape[-1]  # the model's input size (torch_em's encoder.img_size)
    scale = size * 1.0 / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    maps = F.interpolate(maps, (size, size), mode="bilinear", align_corners=False)
    maps = maps[..., :new_h, :new_w]
    return F.interpolate(maps, (h, w), mode="bilinear", align_corners=False)


def decoder_state_layout(decoder: Optional[nn.Module] = None) -> Dict[str, Tuple[int, ...]]:
    """key -> shape of an AIS decoder's state dict (default: the interpolation variant)."""
    decoder = decoder if decoder is not None else build_ais_decoder("vit_b")
    return {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
