"""One place for model facts: architectures, SAM geometry and the published µSAM models.

Pure data: importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
import numbers
from typing import Dict, Optional, Tuple

# SAM geometry and normalisation (segment_anything.modeling.Sam defaults).
IMAGE_SIZE = 1024  # longest side after resizing; the encoder input is padded to IMAGE_SIZE x IMAGE_SIZE
EMBEDDING_DIM = 256
EMBEDDING_SIZE = 64  # IMAGE_SIZE // 16
LOW_RES_MASK_SIZE = 256  # mask decoder output, 4 x EMBEDDING_SIZE
NUM_MASK_OUTPUTS = 4  # mask 0: single-mask output; masks 1..3: multimask output
PIXEL_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0

# Input sizes of SAM-family models: the encoder takes N x N (the image's longest side resized to N, then
# padded), embeddings are N / 16 and low-resolution masks N / 4 on a side. SAM / µSAM use 1024; smaller
# SAM-family models (and the demo model trained on CPU) use 512 or 256. A model's size is carried by its
# checkpoint and by every package's rdf; 1024 is the default wherever none is recorded.
IMAGE_SIZES: Tuple[int, ...] = (256, 512, 1024)
PATCH_SIZE = IMAGE_SIZE // EMBEDDING_SIZE  # 16: image pixels per embedding cell at every input size
MASK_UPSCALE = LOW_RES_MASK_SIZE // EMBEDDING_SIZE  # 4: low-res mask pixels per embedding cell


def check_image_size(image_size: object) -> int:
    """``image_size`` as an int if it is one of :data:`IMAGE_SIZES`, else a ValueError naming them."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise ValueError(f"image size must be an integer, one of {list(IMAGE_SIZES)}; got {image_size!r}")
    size = int(image_size)
    if size not in IMAGE_SIZES:
        raise ValueError(f"image size {size} is not supported; SAM-family models take one of {list(IMAGE_SIZES)}")
    return size


def embedding_size(image_size: int = IMAGE_SIZE) -> int:
    """Side of the embedding grid of a model with input ``image_size`` (64 for 1024)."""
    return check_image_size(image_size) // PATCH_SIZE


def low_res_mask_size(image_size: int = IMAGE_SIZE) -> int:
    """Side of the prompt decoder's low-resolution masks for input ``image_size`` (256 for 1024)."""
    return embedding_size(image_size) * MASK_UPSCALE


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


# ---------------------------------------------------------------------------------------------------------
# Published models
#
# Source: micro_sam 1.8.14 (PyPI wheel), micro_sam/util.py `models()`: the pooch registry of model name ->
# xxh128 hash and model name -> URL, plus `<name>_decoder` entries for the models that ship an automatic
# instance segmentation (AIS) decoder. micro-sam records xxh128 hashes only ("xxh128:<hex>"); they are copied
# here verbatim (without the prefix). Model type = the first five characters of the name, as in
# micro_sam.util.get_sam_model (`model_type[:5]`).
#
# sha256: recorded only where a source records it. micro-sam itself recorded sha256 for vit_h, vit_l, vit_b and
# vit_t (same URLs, same xxh128 as 1.8.14) until its commit 37dae572 ("Update embedding signature", April 2024)
# dropped the sha256 fallback registry; the three SAM values are also the ones published widely for the
# dl.fbaipublicfiles.com files, and the vit_t value is the sha256 of MobileSAM's weights/mobile_sam.pt.
# micro-sam never recorded sha256 for its current (v2+/bioimage.io) finetuned models or decoders.
#
# SAM URLs: segment-anything README, "Model Checkpoints" (facebookresearch/segment-anything).
# vit_t: MobileSAM (ChaoningZhang/MobileSAM) weights, as mirrored by micro-sam on owncloud.gwdg.de.
# bioimage.io ids: micro-sam doc/finetuned_models.md ("<id> on BioImage.IO") and the ids in the
# uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/<id>/<version>/files/ URLs; the histopathology and
# medical-imaging models are hosted on owncloud.gwdg.de and micro-sam names no bioimage.io id for them.
#
# Decoder files: a separate torch file holding the plain UNETR decoder state dict (micro-sam fetches
# `<name>_decoder` next to the model, loads it and puts it under state["decoder_state"]); the model file is a
# plain SAM state dict.
# ---------------------------------------------------------------------------------------------------------

PUBLISHED_MODELS_SOURCE = "micro_sam 1.8.14, micro_sam/util.py models(); segment-anything README"

_SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
_ZOO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"
_OWNCLOUD = "https://owncloud.gwdg.de/index.php/s"


@dataclass(frozen=True)
class PublishedModel:
    """One published SAM / µSAM checkpoint (and its AIS decoder, if it has one)."""

    name: str
    model_type: str  # architecture: vit_t, vit_b, vit_l, vit_h
    url: str
    xxh128: Optional[str]  # hex digest as micro-sam records it (algorithm: xxh128)
    sha256: Optional[str] = None  # hex digest, only where a source records one
    decoder_url: Optional[str] = None  # AIS (UNETR) decoder state dict, a separate file
    decoder_xxh128: Optional[str] = None
    decoder_sha256: Optional[str] = None  # no source records one for the published decoders
    bioimageio_id: Optional[str] = None
    bioimageio_version: Optional[str] = None
    description: str = ""

    @property
    def has_decoder(self) -> bool:
        """Whether the model ships an automatic instance segmentation decoder."""
        return self.decoder_url is not None

    @property
    def checksums(self) -> Dict[str, str]:
        """Recorded hashes of the model file, algorithm -> hex digest."""
        out = {}
        if self.xxh128:
            out["xxh128"] = self.xxh128
        if self.sha256:
            out["sha256"] = self.sha256
        return out


def _zoo(name, model_type, rdf_id, version, xxh, dec_xxh, description):
    base = f"{_ZOO}/{rdf_id}/{version}/files/{model_type}"
    return PublishedModel(
        name, model_type, f"{base}.pt", xxh, decoder_url=f"{base}_decoder.pt", decoder_xxh128=dec_xxh,
        bioimageio_id=rdf_id, bioimageio_version=version, description=description,
    )


def _owncloud(name, model_type, share, xxh, dec_share, dec_xxh, description):
    return PublishedModel(
        name, model_type, f"{_OWNCLOUD}/{share}/download", xxh,
        decoder_url=f"{_OWNCLOUD}/{dec_share}/download", decoder_xxh128=dec_xxh, description=description,
    )


_PUBLISHED = (
    # The original Segment Anything models (segment-anything README) and MobileSAM.
    PublishedModel(
        "vit_h", "vit_h", f"{_SAM_BASE}/sam_vit_h_4b8939.pth", "97698fac30bd929c2e6d8d8cc15933c2",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        description="Segment Anything, ViT-H",
    ),
    PublishedModel(
        "vit_l", "vit_l", f"{_SAM_BASE}/sam_vit_l_0b3195.pth", "a82beb3c660661e3dd38d999cc860e9a",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        description="Segment Anything, ViT-L",
    ),
    PublishedModel(
        "vit_b", "vit_b", f"{_SAM_BASE}/sam_vit_b_01ec64.pth", "6923c33df3637b6a922d7682bfc9a86b",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        description="Segment Anything, ViT-B",
    ),
    PublishedModel(
        "vit_t", "vit_t", f"{_OWNCLOUD}/TuDzuwVDHd1ZDnQ/download", "8eadbc88aeb9d8c7e0b4b60c3db48bd0",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        description="MobileSAM (TinyViT encoder), micro-sam's mirror of weights/mobile_sam.pt",
    ),
    # µSAM light microscopy generalists.
    _zoo("vit_l_lm", "vit_l", "idealistic-rat", "1.2", "017f20677997d628426dec80a8018f9d",
         "2faeafa03819dfe03e7c46a44aaac64a", "µSAM light microscopy (cells and nuclei), ViT-L"),
    _zoo("vit_b_lm", "vit_b", "diplomatic-bug", "1.2", "fe9252a29f3f4ea53c15a06de471e186",
         "708b15ac620e235f90bb38612c4929ba", "µSAM light microscopy (cells and nuclei), ViT-B"),
    _zoo("vit_t_lm", "vit_t", "faithful-chicken", "1.1", "72ec5074774761a6e5c05a08942f981e",
         "3e914a5f397b0312cdd36813031f8823", "µSAM light microscopy (cells and nuclei), ViT-T"),
    # µSAM electron microscopy organelle generalists.
    _zoo("vit_l_em_organelles", "vit_l", "humorous-crab", "1.2", "810b084b6e51acdbf760a993d8619f2d",
         "334877640bfdaaabce533e3252a17294", "µSAM electron microscopy (mitochondria and nuclei), ViT-L"),
    _zoo("vit_b_em_organelles", "vit_b", "noisy-ox", "1.2", "f3bf2ed83d691456bae2c3f9a05fb438",
         "bb6398956a6b0132c26b631c14f95ce2", "µSAM electron microscopy (mitochondria and nuclei), ViT-B"),
    _zoo("vit_t_em_organelles", "vit_t", "greedy-whale", "1", "253474720c497cce605e57c9b1d18fd9",
         "8f897c7bb93174a4d1638827c4dd6f44", "µSAM electron microscopy (mitochondria and nuclei), ViT-T"),
    # PathoSAM histopathology generalists.
    _owncloud("vit_b_histopathology", "vit_b", "sBB4H8CTmIoBZsQ", "ffd1a2cd84570458b257bd95fdd8f974",
              "KO9AWqynI7SFOBj", "6a66194dcb6e36199cbee2214ecf7213", "PathoSAM histopathology (nuclei), ViT-B"),
    _owncloud("vit_l_histopathology", "vit_l", "IZgnn1cpBq2PHod", "b591833c89754271023e901281dee3f2",
              "oIs6VSmkOp7XrKF", "46aab7765d4400e039772d5a50b55c04", "PathoSAM histopathology (nuclei), ViT-L"),
    _owncloud("vit_h_histopathology", "vit_h", "L7AcvVz7DoWJ2RZ", "bd1856dafc156a43fb3aa705f1a6e92e",
              "1qAKxy5H0jgwZvM", "3ed9f87e46ad5e16935bd8d722c8dc47", "PathoSAM histopathology (nuclei), ViT-H"),
    # MedicoSAM medical imaging.
    _owncloud("vit_b_medical_imaging", "vit_b", "f5Ol4FrjPQWfjUF", "40169f1e3c03a4b67bff58249c176d92",
              "ahd3ZhZl2e0RIwz", "9e498b12f526f119b96c88be76e3b2ed", "MedicoSAM medical imaging, ViT-B"),
)

PUBLISHED_MODELS: Dict[str, PublishedModel] = {m.name: m for m in _PUBLISHED}


def published_model(name: str) -> PublishedModel:
    """Return the published model ``name`` or raise a ValueError naming the known ones."""
    try:
        return PUBLISHED_MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown published model {name!r}; known: {sorted(PUBLISHED_MODELS)}") from None
