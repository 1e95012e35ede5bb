"""Small building blocks shared by the SAM modules."""

from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin2(act(lin1(x)))``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Written out (not F.layer_norm on a permuted tensor) to keep SAM's op order and rounding.
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def window_partition(x: Tensor, window_size: int, hw: Tuple[int, int]) -> Tuple[Tensor, Tuple[int, int]]:
    """Split (B, H, W, C) into (B * n_windows, window_size, window_size, C) windows.

    ``hw`` = (H, W) is passed as plain ints from the module's configuration, so that a traced graph holds no
    shape arithmetic (and the batch axis stays free). H and W are zero-padded at the bottom / right up to a
    multiple of ``window_size``; the padded tokens take part in attention (as in SAM and TinyViT), so the
    padding must happen exactly here. Returns the windows and the padded size (Hp, Wp).
    """
    h, w = hw
    c = x.shape[-1]
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(-1, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * n_windows, ws, ws, C) -> (B, H, W, C), padding removed."""
    hp, wp = pad_hw
    h, w = hw
    c = windows.shape[-1]
    x = windows.view(-1, hp // window_size, wp // window_size, window_size, window_size, c)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, hp, wp, c)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x
