"""Build SAM models by model type, seed them for tests, and recognise the model type of a state dict."""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from usam_bioimageio import registry
from usam_bioimageio.modeling.common import LayerNorm2d
from usam_bioimageio.modeling.image_encoder import Attention as ViTAttention
from usam_bioimageio.modeling.image_encoder import ImageEncoderViT
from usam_bioimageio.modeling.mask_decoder import MaskDecoder
from usam_bioimageio.modeling.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from usam_bioimageio.modeling.sam import Sam
from usam_bioimageio.modeling.seeding import SeededDraws
from usam_bioimageio.modeling.tiny_vit import Attention as TinyViTAttention
from usam_bioimageio.modeling.tiny_vit import TinyViT
from usam_bioimageio.modeling.transformer import TwoWayTransformer

# Hyper-parameters shared by all SAM model types (segment_anything.build_sam).
PATCH_SIZE = registry.PATCH_SIZE
VIT_WINDOW_SIZE = 14
MLP_RATIO = 4.0
MASK_IN_CHANS = 16
DECODER_DEPTH = 2
DECODER_MLP_DIM = 2048
DECODER_NUM_HEADS = 8
IOU_HEAD_DEPTH = 3
IOU_HEAD_HIDDEN_DIM = 256


def _image_encoder(arch: registry.Architecture, image_size: int) -> nn.Module:
    if arch.encoder == "vit":
        return ImageEncoderViT(
            img_size=image_size,
            patch_size=PATCH_SIZE,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=MLP_RATIO,
            out_chans=registry.EMBEDDING_DIM,
            window_size=VIT_WINDOW_SIZE,
            global_attn_indexes=arch.global_attn_indexes,
        )
    if arch.encoder == "tiny_vit":
        return TinyViT(
            img_size=image_size,
            embed_dims=arch.embed_dims,
            depths=arch.depths,
            num_heads=arch.tiny_num_heads,
            window_sizes=arch.window_sizes,
            mlp_ratio=MLP_RATIO,
            out_chans=registry.EMBEDDING_DIM,
        )
    raise ValueError(f"Unknown encoder kind {arch.encoder!r} for model type {arch.model_type!r}")


def build_sam(model_type: str, *, image_size: int = registry.IMAGE_SIZE) -> Sam:
    """An untrained ``Sam`` of ``model_type`` ("vit_t", "vit_b", "vit_l", "vit_h") taking ``image_size`` x
    ``image_size`` inputs (one of ``registry.IMAGE_SIZES``), in eval mode.

    Its state_dict has the keys of segment_anything's (mobile_sam's for vit_t) model, and at 1024 their
    shapes too, so published checkpoints load with ``load_state_dict(..., strict=True)``. At other sizes
    only the ViT's position embedding and global-attention relative-position tables change shape.
    """
    arch = registry.architecture(model_type)
    image_size = registry.check_image_size(image_size)
    dim = registry.EMBEDDING_DIM
    side = registry.embedding_size(image_size)
    sam = Sam(
        image_encoder=_image_encoder(arch, image_size),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(side, side),
            input_image_size=(image_size, image_size),
            mask_in_chans=MASK_IN_CHANS,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=DECODER_DEPTH, embedding_dim=dim, num_heads=DECODER_NUM_HEADS, mlp_dim=DECODER_MLP_DIM
            ),
            num_multimask_outputs=registry.NUM_MASK_OUTPUTS - 1,
            iou_head_depth=IOU_HEAD_DEPTH,
            iou_head_hidden_dim=IOU_HEAD_HIDDEN_DIM,
        ),
        pixel_mean=registry.PIXEL_MEAN,
        pixel_std=registry.PIXEL_STD,
    )
    return sam.eval()


# seeded_sam: scales of the random values (see there).
_ADDITIVE_STD = 0.02  # biases, position embeddings, attention biases
_NORM_WEIGHT_STD = 0.1  # around 1


def _fan_in(module: nn.Module) -> int:
    """Number of inputs that contribute to one output of a linear / conv layer."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.ConvTranspose2d):
        # Each output pixel sees kernel_numel / stride_numel input pixels per input channel.
        k = module.kernel_size[0] * module.kernel_size[1]
        s = module.stride[0] * module.stride[1]
        return max(1, module.in_channels // module.groups * k // s)
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    raise TypeError(type(module).__name__)


@torch.no_grad()
def seeded_sam(model_type: str, *, seed: int = 0, image_size: int = registry.IMAGE_SIZE) -> Sam:
    """``build_sam(model_type, image_size=image_size)`` with every parameter and persistent buffer drawn from a seeded generator.

    A test model, not a trained one: parameters that SAM initialises to constants (position embeddings,
    relative position tables, TinyViT attention biases, norm weights and biases, BatchNorm statistics) get
    small random values too, so that every code path contributes to the outputs. Weights are drawn with
    variance 1 / fan_in so activations stay O(1). The same bits for a given seed on every machine
    (:class:`~usam_bioimageio.modeling.seeding.SeededDraws`); returned in eval mode.
    """
    with torch.random.fork_rng(devices=[]):  # build_sam's default init must not move the global RNG
        sam = build_sam(model_type, image_size=image_size)
    draws = SeededDraws(seed)
    normal = draws.normal_
    seeded = set()
    for module in sam.modules():
        handled = True
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            normal(module.weight, 1.0 / math.sqrt(_fan_in(module)))
            if module.bias is not None:
                normal(module.bias, _ADDITIVE_STD)
        elif isinstance(module, (nn.LayerNorm, LayerNorm2d, nn.BatchNorm2d)):
            normal(module.weight, _NORM_WEIGHT_STD, 1.0)
            normal(module.bias, _ADDITIVE_STD)
            if isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, _ADDITIVE_STD)
                draws.lognormal_(module.running_var, 0.2)  # positive, around 1
        elif isinstance(module, nn.Embedding):
            normal(module.weight)  # as nn.Embedding's own init: N(0, 1)
        elif isinstance(module, ImageEncoderViT):
            normal(module.pos_embed, _ADDITIVE_STD)
        elif isinstance(module, ViTAttention):
            normal(module.rel_pos_h, _ADDITIVE_STD)
            normal(module.rel_pos_w, _ADDITIVE_STD)
        elif isinstance(module, TinyViTAttention):
            normal(module.attention_biases, _ADDITIVE_STD)
        elif isinstance(module, PositionEmbeddingRandom):
            normal(module.positional_encoding_gaussian_matrix)  # SAM's scale: N(0, 1)
        else:
            handled = False
        if handled:
            seeded.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in sam.named_parameters() if id(p) not in seeded]
    if missed:  # a new module type without a seeding rule above
        raise RuntimeError(f"seeded_sam has no rule for parameters {missed[:5]}")
    return sam.eval()


_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _shape(value: Any) -> Tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _count(keys: Any, pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (a regex with one group) among ``keys``."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def model_type_from_state_dict(state_dict: Mapping[str, Any]) -> str:
    """The SAM model type ("vit_t", "vit_b", "vit_l" or "vit_h") of a SAM state dict.

    Recognised from the image encoder's parameter shapes and block counts; raises ValueError when
    ``state_dict`` is not the state dict of one of the known SAM architectures.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"Not a SAM state dict: expected a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    keys = list(state_dict)
    missing = [p for p in _SAM_PREFIXES if not any(k.startswith(p) for k in keys)]
    if missing:
        sample = ", ".join(repr(k) for k in keys[:3]) or "no keys"
        raise ValueError(
            f"Not a SAM state dict: no keys starting with {', '.join(repr(p) for p in missing)} (found {sample}). "
            "Checkpoints that wrap the state dict (e.g. under 'model_state') must be unwrapped first."
        )

    found: Dict[str, Any] = {}
    if "image_encoder.patch_embed.proj.weight" in state_dict:
        found = {
            "encoder": "vit",
            "embed_dim": _shape(state_dict["image_encoder.patch_embed.proj.weight"])[:1],
            "depth": _count(keys, r"image_encoder\.blocks\.(\d+)\."),
        }
        for arch in registry.ARCHITECTURES.values():
            if arch.encoder == "vit" and found["embed_dim"] == (arch.embed_dim,) and found["depth"] == arch.depth:
                return arch.model_type
    elif "image_encoder.patch_embed.seq.2.c.weight" in state_dict:
        n_stages = _count(keys, r"image_encoder\.layers\.(\d+)\.")
        depths = tuple(_count(keys, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_stages))
        # Stage 0 is convolutional: its width is the stem's output; later stages have an MLP LayerNorm.
        dims = [_shape(state_dict["image_encoder.patch_embed.seq.2.c.weight"])[:1]]
        dims += [_shape(state_dict.get(f"image_encoder.layers.{i}.blocks.0.mlp.norm.weight"))[:1] for i in range(1, n_stages)]
        found = {"encoder": "tiny_vit", "embed_dims": tuple(d[0] if d else None for d in dims), "depths": depths}
        for arch in registry.ARCHITECTURES.values():
            if arch.encoder == "tiny_vit" and found["embed_dims"] == arch.embed_dims and found["depths"] == arch.depths:
                return arch.model_type
    else:
        raise ValueError(
            "Not a SAM state dict: the image encoder has neither a ViT ('image_encoder.patch_embed.proj.weight') "
            "nor a TinyViT ('image_encoder.patch_embed.seq.2.c.weight') patch embedding"
        )
    raise ValueError(f"SAM state dict of an unknown architecture {found}; known model types: {sorted(registry.ARCHITECTURES)}")
