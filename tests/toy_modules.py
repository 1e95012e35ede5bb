"""Tiny torch modules for the package-writer tests (importable as ``toy_modules`` from tests/)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyConv(nn.Module):
    """(b, 3, y, x) -> (b, 2, y, x) for any y, x >= 1."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Conv2d(4, out_channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(image)))


class ToyPromptDecoder(nn.Module):
    """The input structure of SAM's ONNX prompt decoder at a small scale.

    embeddings (1, C, E, E), point_coords (o, p, 2), point_labels (o, p), mask_input (o, 1, M, M),
    has_mask_input (o, 1), orig_im_size (2,) -> iou_predictions (o, 4), low_res_masks (o, 4, M, M)
    with M = 4 * E.
    """

    def __init__(self, embed_dim: int = 8, embed_size: int = 4):
        super().__init__()
        self.mask_size = 4 * embed_size
        self.emb_head = nn.Linear(embed_dim, 4)
        self.point_head = nn.Linear(2, 4)
        self.mask_conv = nn.Conv2d(embed_dim, 4, 1)

    def forward(self, embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        pooled = self.emb_head(embeddings.mean(dim=(2, 3)))  # (1, 4)
        points = self.point_head((point_coords / 100.0 * point_labels[..., None]).mean(dim=1))  # (o, 4)
        mask_feat = mask_input.mean(dim=(2, 3)) * has_mask_input  # (o, 1)
        scale = orig_im_size.sum() / 1000.0
        iou = pooled + points + mask_feat + scale  # (o, 4)
        up = F.interpolate(embeddings, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)
        masks = self.mask_conv(up) + iou[:, :, None, None] + mask_input  # (o, 4, M, M)
        return iou, masks


class NoisyConv(TinyConv):
    """TinyConv plus fresh noise on every call: not reproducible."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = super().forward(image)
        return out + torch.rand_like(out)
