"""The nn.Modules inside our bioimage.io packages (also their pytorch_state_dict architectures).

- ``ImageEncoderModel``: raw image of any size and dtype range -> SAM embeddings. µSAM's per-channel
  uint8 normalisation, SAM's longest-side resize (Pillow-exact), mean/std normalisation and padding all
  live in the graph, so a host only has to hand over pixels.
- ``PromptDecoderModel``: embeddings + prompts in original-image coordinates -> predicted IoU and
  low-resolution mask logits for all four mask tokens. ONNX has no optional inputs, so every prompt kind
  is always present and switched off by sentinels, as in SAM's own ONNX decoder:
  point label -1 = padding point, 0 = negative, 1 = positive, 2 / 3 = box top-left / bottom-right
  corner; ``has_mask_input`` 0 or 1 per object.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usam_bioimageio import registry
from usam_bioimageio.modeling.build import build_sam
from usam_bioimageio.modeling.preprocess import SamPreprocess, longest_side_shape


class ImageEncoderModel(nn.Module):
    """image (b, 3, h, w) float32 raw pixel values -> embeddings (b, 256, N/16, N/16) for input size N
    (``image_size``, one of ``registry.IMAGE_SIZES``; (b, 256, 64, 64) at SAM's 1024)."""

    def __init__(self, model_type: str = "vit_b", image_size: int = registry.IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = registry.check_image_size(image_size)
        self.preprocess = SamPreprocess(self.image_size)
        self.image_encoder = build_sam(model_type, image_size=self.image_size).image_encoder

    def forward(self, image: Tensor) -> Tensor:
        return self.image_encoder(self.preprocess(image))


class PromptDecoderModel(nn.Module):
    """SAM's prompt encoder + mask decoder with fixed, host-friendly inputs.

    Inputs (o objects, p points per object), for input size N (``image_size``; 1024: E = 64, L = 256):
      embeddings (1, 256, E, E) with E = N / 16; point_coords (o, p, 2) as (x, y) in original image pixels;
      point_labels (o, p); mask_input (o, 1, L, L) low-res logits of a previous prediction, L = N / 4;
      has_mask_input (o, 1); orig_im_size (2,) as (h, w).
    Outputs: iou_predictions (o, 4) and low_res_masks (o, 4, L, L), the logits of all four mask tokens
    in the padded N x N frame at 1/4 resolution (token 0: single-mask output, 1..3: multimask).
    """

    def __init__(self, model_type: str = "vit_b", image_size: int = registry.IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = registry.check_image_size(image_size)
        sam = build_sam(model_type, image_size=self.image_size)
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def _embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        pe = self.prompt_encoder.pe_layer._pe_encoding((coords + 0.5) / self.image_size)
        labels = labels.unsqueeze(-1)
        # Multiplying by 0/1 masks adds exact zeros: the result equals SamPredictor's in-place indexing.
        emb = pe * (labels != -1).to(pe.dtype)
        emb = emb + self.prompt_encoder.not_a_point_embed.weight * (labels == -1).to(pe.dtype)
        for i in range(len(self.prompt_encoder.point_embeddings)):
            emb = emb + self.prompt_encoder.point_embeddings[i].weight * (labels == i).to(pe.dtype)
        return emb

    def forward(
        self,
        embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        # Coordinates: ResizeLongestSide.apply_coords computes in float64 and SamPredictor casts to float32.
        hw = orig_im_size.to(torch.float64)
        new_h, new_w = longest_side_shape(hw[0], hw[1], self.image_size)
        scale = torch.stack([new_w / hw[1], new_h / hw[0]])
        coords = (point_coords.to(torch.float64) * scale).to(torch.float32)
        sparse = self._embed_points(coords, point_labels)

        # Image tokens (h * w, C) throughout: the mask prompt's last (1 x 1) convolution is a product on
        # channels-last pixels, so no per-object (C, h, w) tensor is transposed (see MaskDecoder._upscaled_masks).
        downscaling = self.prompt_encoder.mask_downscaling
        mask_features = downscaling[:-1](mask_input)
        mask_tokens = F.linear(mask_features.flatten(2).transpose(1, 2), downscaling[-1].weight.flatten(1),
                               downscaling[-1].bias)
        has_mask = has_mask_input.reshape(-1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, 1, -1)
        dense = has_mask * mask_tokens + (1 - has_mask) * no_mask

        masks, iou = self.mask_decoder.predict_masks_tokens(
            keys=embeddings.flatten(2).transpose(1, 2) + dense,
            key_pe=self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2),
            sparse_prompt_embeddings=sparse,
            grid=tuple(self.prompt_encoder.image_embedding_size),
        )
        return iou, masks


def encoder_state(sam_state: dict) -> dict:
    """The ImageEncoderModel state dict from a SAM state dict (buffers of the preprocessing are not saved)."""
    return {k: v for k, v in sam_state.items() if k.startswith("image_encoder.")}


def decoder_state(sam_state: dict) -> dict:
    """The PromptDecoderModel state dict from a SAM state dict."""
    return {k: v for k, v in sam_state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}


# --------------------------------------------------------------------------------------------------------------
# automatic instance segmentation (AIS): µSAM's UNETR decoder
# --------------------------------------------------------------------------------------------------------------


class AisModel(nn.Module):
    """End to end AIS: image (1, 3, h, w) float32 raw pixel values -> maps (1, 3, h, w).

    µSAM's ``InstanceSegmentationWithDecoder.initialize``: the image encoder's preprocessing and ViT
    (as :class:`ImageEncoderModel`), the UNETR decoder (:class:`usam_bioimageio.modeling.unetr.AisDecoder`)
    and ``postprocess_masks`` (crop of SAM's padding, bilinear resize to the input size), all in one graph.
    Output channels: foreground probability, centre distances, boundary distances (sigmoid, 0..1), the
    input of :func:`usam_bioimageio.automatic.ais.postprocess.instances_from_maps`.

    State dict: ``image_encoder.*`` (SAM's keys) and ``unetr.*`` (µSAM's ``decoder_state`` keys).
    ``use_conv_transpose``: the decoder variant (``unetr.uses_conv_transpose(decoder_state)``);
    ``batch_statistics``: BatchNorm as µSAM's inference runs it (see ``unetr.BatchNorm2d``).
    """

    def __init__(self, model_type: str = "vit_b", use_conv_transpose: bool = False,
                 batch_statistics: bool = True, image_size: int = registry.IMAGE_SIZE) -> None:
        super().__init__()
        from usam_bioimageio.modeling.unetr import build_ais_decoder

        self.image_size = registry.check_image_size(image_size)
        self.preprocess = SamPreprocess(self.image_size)
        self.image_encoder = build_sam(model_type, image_size=self.image_size).image_encoder
        self.unetr = build_ais_decoder(model_type, use_conv_transpose=use_conv_transpose,
                                       batch_statistics=batch_statistics)

    def forward(self, image: Tensor) -> Tensor:
        from usam_bioimageio.modeling.unetr import maps_to_original

        maps = self.unetr(self.image_encoder(self.preprocess(image)))
        return maps_to_original(maps, image)


class AisHeadModel(nn.Module):
    """AIS decoder on precomputed embeddings: embeddings (1, 256, N/16, N/16) -> maps (1, 3, N, N) for input
    size N (``image_size``; (1, 256, 64, 64) -> (1, 3, 1024, 1024) at SAM's 1024).

    The maps are in SAM's padded N x N frame, like the prompt decoder's masks: the image occupies
    the top-left ``longest_side_shape(h, w)`` block. To get µSAM's maps of an (h, w) image, crop that block
    and resize it bilinearly (align_corners=False, no antialiasing) to (h, w); the runtime does this with
    ``usam_bioimageio.automatic.ais.decoder.maps_to_original`` (exact interpolation matrices), and
    :class:`AisModel` does it in its graph. Output channels as :class:`AisModel`.

    State dict: ``unetr.*`` (µSAM's ``decoder_state`` keys). ``model_type`` and ``image_size`` are recorded
    only: all SAM model types share the decoder, and it upsamples any embedding grid 16 times.
    """

    def __init__(self, model_type: str = "vit_b", use_conv_transpose: bool = False,
                 batch_statistics: bool = True, image_size: int = registry.IMAGE_SIZE) -> None:
        super().__init__()
        from usam_bioimageio.modeling.unetr import build_ais_decoder

        self.image_size = registry.check_image_size(image_size)

        self.unetr = build_ais_decoder(model_type, use_conv_transpose=use_conv_transpose,
                                       batch_statistics=batch_statistics)

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.unetr(embeddings)


def ais_state(sam_state: dict, ais_decoder_state: dict) -> dict:
    """The AisModel state dict from a SAM state dict and µSAM's ``decoder_state``."""
    return {**encoder_state(sam_state), **ais_head_state(ais_decoder_state)}


def ais_head_state(ais_decoder_state: dict) -> dict:
    """The AisHeadModel state dict from µSAM's ``decoder_state``."""
    return {f"unetr.{k}": v for k, v in ais_decoder_state.items()}
