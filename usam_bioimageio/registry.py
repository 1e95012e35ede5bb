"""One place for model facts: architectures, SAM geometry and the published µSAM models.

Pure data: importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# SAM geometry and normalisation (segment_anything.modeling.Sam defaults).
IMAGE_SIZE = 1024  # longest side after resizing; the encoder input is padded to IMAGE_SIZE x IMAGE_SIZE
EMBEDDING_DIM = 256
EMBEDDING_SIZE = 64  # IMAGE_SIZE // 16
LOW_RES_MASK_SIZE = 256  # mask decoder output, 4 x EMBEDDING_SIZE
NUM_MASK_OUTPUTS = 4  # mask 0: single-mask output; masks 1..3: multimask output
PIXEL_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0


@dataclass(frozen=True)
class Architecture:
    """Image-encoder hyper-parameters of one SAM model type."""

    model_type: str
    encoder: str  # "vit" (SAM ImageEncoderViT) or "tiny_vit" (MobileSAM TinyViT)
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    global_attn_indexes: Tuple[int, ...] = ()
    # TinyViT only
    embed_dims: Tuple[int, ...] = ()
    depths: Tuple[int, ...] = ()
    tiny_num_heads: Tuple[int, ...] = ()
    window_sizes: Tuple[int, ...] = ()


ARCHITECTURES: Dict[str, Architecture] = {
    "vit_b": Architecture("vit_b", "vit", embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": Architecture("vit_l", "vit", embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": Architecture("vit_h", "vit", embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_t": Architecture(
        "vit_t",
        "tiny_vit",
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        tiny_num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
    ),
}


def architecture(model_type: str) -> Architecture:
    """Return the architecture of ``model_type`` or raise a ValueError naming the known ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"Unknown model type {model_type!r}; known: {sorted(ARCHITECTURES)}") from None
