"""MobileSAM's TinyViT image encoder (vit_t), inference only.

Parameter names and shapes follow ``mobile_sam.modeling.TinyViT`` (including its unused classifier head)
so that MobileSAM / µSAM vit_t checkpoints load strictly. Drop path and gradient checkpointing are training
features and are left out.

Layout at img_size 1024: a stride-4 conv stem (256 x 256), one MBConv stage, then three windowed-attention
stages at 128, 64 and 64: MobileSAM's last patch merging keeps the resolution so that the output grid is
64 x 64, SAM's embedding size.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from usam_bioimageio.modeling.common import LayerNorm2d, window_partition, window_unpartition


class Conv2dBN(nn.Sequential):
    """Bias-free convolution ``c`` followed by BatchNorm ``bn`` (eval: running statistics)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convolutions, (B, 3, H, W) -> (B, embed_dim, H / 4, W / 4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, activation."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2dBN(chans, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, chans)
        self.act3 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """(B, C, H, W) or (B, H * W, C) tokens -> (B, H' * W', out_dim) tokens, H' = H / stride."""

    def __init__(self, input_resolution: Tuple[int, int], dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:  # tokens from an attention stage
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Pre-norm MLP ``fc2(act(fc1(norm(x))))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _offset_index(resolution: Tuple[int, int]) -> Tensor:
    """(N, N) index of the learned bias for each token pair of a window, N = h * w.

    The bias depends on the absolute offset (|dy|, |dx|) only; TinyViT numbers offsets by first occurrence,
    which for a rectangular window is |dy| * w + |dx|.
    """
    h, w = resolution
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * w + (xs[:, None] - xs[None, :]).abs()


class Attention(nn.Module):
    """Pre-norm multi-head attention within a window, with a learned bias per head and offset (LeViT)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: Tuple[int, int], attn_ratio: float = 1.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution[0] * resolution[1]))
        self.register_buffer("attention_bias_idxs", _offset_index(resolution), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        # qkv is laid out per head: [q_h, k_h, v_h] for h = 0 .. heads-1.
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        # Gather the bias every call rather than caching it, so it never goes stale after load_state_dict.
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.dh)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise 3x3 conv, MLP; tokens (B, H * W, C) in and out."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(dim, dim // num_heads, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def _windowed_attention(self, x: Tensor) -> Tensor:
        h, w = self.input_resolution
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x)
        c = x.shape[-1]
        # Padding happens before the attention's own LayerNorm, so padded tokens enter it as zeros.
        windows, pad_hw = window_partition(x.view(-1, h, w, c), ws, (h, w))
        out = self.attn(windows.view(-1, ws * ws, c)).view(-1, ws, ws, c)
        return window_unpartition(out, ws, pad_hw, (h, w)).view(-1, h * w, c)

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.input_resolution
        c = x.shape[-1]
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(-1, c, h, w)).view(-1, c, h * w).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage of MBConv blocks, optionally followed by patch merging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class BasicLayer(nn.Module):
    """Stage of TinyViT blocks, optionally followed by patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: Optional[PatchMerging],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """(B, 3, img_size, img_size) normalised image -> (B, out_chans, img_size / 16, img_size / 16)."""

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        # Every patch merging halves the grid except the last one (MobileSAM: keep 1/16 of the input).
        n_stages = len(depths)
        resolutions = [img_size // 4]
        for i in range(1, n_stages):
            resolutions.append(resolutions[-1] if i == n_stages - 1 else resolutions[-1] // 2)
        self.out_resolution = resolutions[-1]

        self.layers = nn.ModuleList()
        for i in range(n_stages):
            res = (resolutions[i], resolutions[i])
            downsample = None
            if i < n_stages - 1:
                stride = 1 if i + 1 == n_stages - 1 else 2
                downsample = PatchMerging(res, embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, downsample)
            else:
                layer = BasicLayer(
                    embed_dims[i], res, depths[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size, downsample
                )
            self.layers.append(layer)

        # Unused image-classification head of TinyViT, kept so that checkpoints load strictly.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_resolution, self.out_resolution, c).permute(0, 3, 1, 2)
        return self.neck(x)
