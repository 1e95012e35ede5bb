"""SAM's mask decoder: image + prompt embeddings -> low-resolution mask logits and predicted IoUs."""

from __future__ import annotations

from typing import List, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam_bioimageio.modeling.common import LayerNorm2d


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks per prompt set with a two-way transformer.

    Mask token 0 is trained for the single-mask output, tokens 1.. for the ambiguity-aware multimask output.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        # One hypernetwork per mask token: token -> weights of a 1x1 conv over the upscaled embedding.
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> Tuple[Tensor, Tensor]:
        """Masks (B, 3 or 1, 4h, 4w) and IoU predictions (B, 3 or 1)."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected, :, :], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """All ``num_mask_tokens`` masks (B, T, 4h, 4w) and IoU predictions (B, T).

        image_embeddings / image_pe: (1 or B, C, h, w), the same image for the B prompt sets;
        sparse: (B, N, C); dense: (B, C, h, w).
        """
        h, w = dense_prompt_embeddings.shape[-2:]
        # SAM repeats the image per prompt set; a broadcast add gives the same sums without the copies.
        keys = (image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2)
        return self.predict_masks_tokens(keys, image_pe.flatten(2).transpose(1, 2), sparse_prompt_embeddings, (h, w))

    def predict_masks_tokens(
        self, keys: Tensor, key_pe: Tensor, sparse_prompt_embeddings: Tensor, grid: Tuple[int, int]
    ) -> Tuple[Tensor, Tensor]:
        """:meth:`predict_masks` on image tokens: keys = image + dense prompt embeddings (B, h * w, C) and
        key_pe (1 or B, h * w, C) in row-major order of the (h, w) ``grid``."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        hs, src = self.transformer.forward_tokens(keys, key_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in_list: List[Tensor] = [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)]
        masks = self._upscaled_masks(src, torch.stack(hyper_in_list, dim=1), grid)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def _upscaled_masks(self, src: Tensor, hyper_in: Tensor, grid: Tuple[int, int]) -> Tensor:
        """``output_upscaling`` of the image tokens src (B, h * w, C), then one mask per hypernetwork output
        hyper_in (B, T, C / 8): (B, T, 4h, 4w).

        The same products as SAM's two 2 x 2 stride-2 transposed convolutions, computed channels-last: a
        non-overlapping transposed convolution is a matrix product to 2 x 2 x C_out values per input pixel.
        Done per output row offset dy (one GEMM per dy, over all pixels), the values of each dy come out in
        row-major order within their rows: ``(y, x, dx)``. So the masks of the four (dy1, dy2) need only be
        stacked as rows 4y + 2 dy1 + dy2: no transposes of the wide image tensors (measured in ONNX
        Runtime: ConvTranspose ran at half the GEMM rate, NCHW needed a transpose of the tokens and a
        sub-pixel shuffle of the masks cost as much as a GEMM). LayerNorm over channels is F.layer_norm on
        the last axis (``LayerNorm2d``'s normalisation, rounded differently: ~1e-8 on the masks).
        """
        deconv1, norm, act1, deconv2, act2 = self.output_upscaling
        b, _, c = src.shape
        h, w = grid
        c1, c2 = deconv1.weight.shape[1], deconv2.weight.shape[1]
        rows = []
        for dy1 in range(2):
            # weight (C_in, C_out, dy, dx) at dy -> (C_in, dx * C_out), columns ordered (dx, c_out)
            w1 = deconv1.weight[:, :, dy1, :].permute(0, 2, 1).reshape(c, 2 * c1)
            x1 = F.linear(src, w1.t(), deconv1.bias.repeat(2)).reshape(b, h * w * 2, c1)  # rows (y, x, dx1)
            x1 = act1(F.layer_norm(x1, (c1,), norm.weight, norm.bias, norm.eps))
            for dy2 in range(2):
                w2 = deconv2.weight[:, :, dy2, :].permute(0, 2, 1).reshape(c1, 2 * c2)
                x2 = act2(F.linear(x1, w2.t(), deconv2.bias.repeat(2))).reshape(b, h * w * 4, c2)
                rows.append((hyper_in @ x2.transpose(1, 2)).reshape(b, -1, h, 4 * w))  # columns 4x + 2 dx1 + dx2
        return torch.stack(rows, dim=3).reshape(b, -1, 4 * h, 4 * w)
