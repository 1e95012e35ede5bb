"""SAM's ViT image encoder (vit_b / vit_l / vit_h): a ViTDet-style backbone plus a conv neck.

Parameter names and shapes follow ``segment_anything.modeling.ImageEncoderViT`` so that the published
checkpoints load strictly.
"""

from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import Tensor, nn

from usam_bioimageio.modeling.common import LayerNorm2d, MLPBlock, window_partition, window_unpartition


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns channels-last (B, H, W, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_positions(rel_pos: Tensor, size: int) -> Tensor:
    """Table (size, size, C) of the embeddings of the offsets ``q - k`` along one axis of length ``size``.

    ``rel_pos`` has ``2 * size - 1`` rows, row 0 for offset -(size - 1).
    """
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


class Attention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) grid with decomposed relative position bias (MViTv2)."""

    def __init__(self, dim: int, num_heads: int, input_size: Tuple[int, int], qkv_bias: bool = True,
                 per_head: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.input_size = input_size
        # global attention one head at a time: the same numbers (each head's products are the same GEMMs), but
        # one (N, N) attention map at a time instead of heads x N x N (vit_b: 67 MB instead of 805 MB per map;
        # measured, ONNX Runtime's peak for the encoder 6.9 -> 2.7 GB with default session options)
        self.per_head = per_head
        self.head_dim = head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # One table per axis instead of one per (dy, dx) pair: the bias is rel_h[dy] + rel_w[dx].
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        # Sizes come from the configuration, the batch axis is left free (-1): a traced graph holds no shape
        # arithmetic.
        h, w = self.input_size
        n, heads, head_dim = h * w, self.num_heads, self.head_dim
        # (B, H, W, 3 * C) -> 3 x (B * heads, N, head_dim)
        qkv = self.qkv(x).reshape(-1, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, -1, n, head_dim).unbind(0)

        # Decomposed bias: the (unscaled) query dotted with the row-offset and the column-offset embeddings.
        q_grid = q.reshape(-1, h, w, head_dim)
        bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, relative_positions(self.rel_pos_h, h))
        bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, relative_positions(self.rel_pos_w, w))
        if self.per_head:  # (B * heads, ...) viewed as (B, heads, ...), head i sliced out
            split = [q.reshape(-1, heads, n, head_dim), k.reshape(-1, heads, n, head_dim),
                     v.reshape(-1, heads, n, head_dim), bias_h.reshape(-1, heads, h, w, h),
                     bias_w.reshape(-1, heads, h, w, w)]
            x = torch.stack([self._attend(*(t[:, i] for t in split)) for i in range(heads)], 1)
        else:
            x = self._attend(q, k, v, bias_h, bias_w)
        x = x.view(-1, heads, h, w, head_dim).permute(0, 2, 3, 1, 4).reshape(-1, h, w, heads * head_dim)
        return self.proj(x)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias_h: Tensor, bias_w: Tensor) -> Tensor:
        """(M, N, head_dim) queries, keys, values and their (M, H, W, H) / (M, H, W, W) biases -> (M, N, head_dim)."""
        h, w = self.input_size
        n = h * w
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = (attn.view(-1, h, w, h, w) + bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]).view(-1, n, n)
        return attn.softmax(dim=-1) @ v


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when ``window_size > 0``, else global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_size: Tuple[int, int],
        window_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.input_size = input_size
        self.norm1 = norm_layer(dim, eps=norm_eps)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, attn_size, qkv_bias=qkv_bias, per_head=window_size == 0)
        self.norm2 = norm_layer(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            # Pad after the norm: padded tokens are zeros inside the attention, as in SAM.
            x, pad_hw = window_partition(x, self.window_size, self.input_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, self.input_size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """(B, 3, img_size, img_size) normalised image -> (B, out_chans, img_size / patch, img_size / patch)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Tuple[int, ...] = (),
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                input_size=(grid, grid),
                window_size=0 if i in global_attn_indexes else window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
