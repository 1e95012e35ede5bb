"""The AIS packages of a family: µSAM's automatic instance segmentation decoder (UNETR), written with
``write_package`` (so gated by ``bioimageio.core.test_model`` for every weight format).

- ``ais.zip`` (kind ``ais``): end to end, image (1, 3, h, w) raw pixels -> maps (1, 3, h, w). One input, one
  output, nothing else to run: for hosts without our runtime (Java / ilastik / deepImageJ ...).
- ``ais_head.zip`` (kind ``ais_head``): embeddings (1, 256, N/16, N/16) of the family's image encoder -> maps
  (1, 3, N, N) in SAM's padded frame (N the model's input size: (1, 256, 64, 64) -> (1, 3, 1024, 1024) at
  1024). The runtime uses this one, so an image is encoded once for both
  prompt-based and automatic segmentation; it crops and resizes the maps (``automatic.segment.maps_to_original``).

``export_family`` calls :func:`write_ais_packages` when the checkpoint has a ``decoder_state``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

from usam_bioimageio import registry
from usam_bioimageio.automatic.ais.postprocess import AisParameters, instances_from_maps
from usam_bioimageio.automatic.ais.decoder import maps_to_original as padded_maps_to_original
from usam_bioimageio.embeddings.compute import image_to_input
from usam_bioimageio.modeling.packaged import AisHeadModel, AisModel, ais_head_state, ais_state
from usam_bioimageio.modeling.unetr import AIS_CHANNEL_NAMES, maps_to_original, uses_conv_transpose
from usam_bioimageio.io.overlay import overlay

from . import modules
from usam_bioimageio.training.checkpoints import Checkpoint
from .specs import ANY, Batch, Ref, Space, TensorSpec, channel, embedding_axes, family_config, whole_image_note
from .writer import write_package
from .samples import Sample

__all__ = ["AIS_KINDS", "ais_head_model", "ais_model", "script_ais_model", "write_ais_packages"]

AIS_KINDS = ("ais", "ais_head")
AUTHORS = [{"name": "usam-bioimageio developers"}]
CREDIT = (
    "Weights: Segment Anything (Kirillov et al. 2023, Apache-2.0) finetuned by µSAM (Archit et al., Nature "
    "Methods 2025) with µSAM's UNETR decoder for automatic instance segmentation. Architecture re-implemented "
    "in usam_bioimageio.modeling (UNETR decoder of torch_em, as micro-sam 1.8.14 builds it)."
)
#: µSAM runs the decoder with BatchNorm in training mode (batch statistics), see modeling.unetr.BatchNorm2d
BATCH_STATISTICS = True


def _decoder_state(ckpt: Checkpoint) -> Dict[str, torch.Tensor]:
    if ckpt.decoder_state is None:
        raise ValueError(f"checkpoint {ckpt.source} has no decoder_state: no AIS packages can be exported")
    return ckpt.decoder_state


def ais_model(ckpt: Checkpoint, *, batch_statistics: bool = BATCH_STATISTICS) -> AisModel:
    """The end-to-end AIS module of a checkpoint, weights loaded strictly, eval mode."""
    state = _decoder_state(ckpt)
    model = AisModel(ckpt.model_type, use_conv_transpose=uses_conv_transpose(state), batch_statistics=batch_statistics,
                     image_size=ckpt.image_size)
    model.load_state_dict(ais_state(ckpt.sam_state, state), strict=True)
    return model.eval()


def ais_head_model(ckpt: Checkpoint, *, batch_statistics: bool = BATCH_STATISTICS) -> AisHeadModel:
    """The AIS head module (decoder on embeddings) of a checkpoint, weights loaded strictly, eval mode."""
    state = _decoder_state(ckpt)
    model = AisHeadModel(ckpt.model_type, use_conv_transpose=uses_conv_transpose(state),
                         batch_statistics=batch_statistics, image_size=ckpt.image_size)
    model.load_state_dict(ais_head_state(state), strict=True)
    return model.eval()


class _ScriptedAis(torch.nn.Module):
    """Scripted preprocessing and resize back (dynamic image size) around a traced ViT and a traced UNETR
    decoder (both of fixed size: N x N in, N/16 x N/16 embeddings, N the model's input size)."""

    def __init__(self, preprocess: torch.nn.Module, vit: torch.nn.Module, unetr: torch.nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.image_encoder = vit
        self.unetr = unetr

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        maps = self.unetr(self.image_encoder(self.preprocess(image)))
        return maps_to_original(maps, image)


def script_ais_model(model: AisModel) -> torch.jit.ScriptModule:
    """torchscript of the end-to-end model that accepts any image size (tracing alone would fix the size)."""
    size = model.image_size
    emb = registry.embedding_size(size)
    with torch.no_grad():
        vit = torch.jit.trace(model.image_encoder, torch.zeros(1, 3, size, size), check_trace=False)
        unetr = torch.jit.trace(model.unetr, torch.zeros(1, registry.EMBEDDING_DIM, emb, emb), check_trace=False)
    return torch.jit.script(_ScriptedAis(model.preprocess, vit, unetr))


def _config(ckpt: Checkpoint, name: str, kind: str, use_conv_transpose: bool, **extra) -> dict:
    params = dataclasses.asdict(AisParameters())
    return family_config(ckpt.model_type, name, kind, image_size=ckpt.image_size, pixel_scale=ckpt.pixel_scale, **{
        "channels": list(AIS_CHANNEL_NAMES),
        "decoder": {
            "architecture": "torch_em UNETR decoder (micro-sam 1.8.14 get_unetr: out_channels 3, sigmoid, "
                            "use_skip_connection False, initial_features 64)",
            "use_conv_transpose": use_conv_transpose,
            "batchnorm": "batch statistics (µSAM runs the decoder in training mode)" if BATCH_STATISTICS
                         else "running statistics (eval mode)",
        },
        "ais_parameters": params,
        "postprocessing": (
            "micro-sam 1.8.14 InstanceSegmentationWithDecoder.generate: gaussian smoothing of the foreground "
            "(sigma foreground_smoothing) and of both distance maps (sigma distance_smoothing); foreground = "
            "foreground > foreground_threshold; seeds = 8-connected components of (center < "
            "center_distance_threshold) & (boundary < boundary_distance_threshold) & foreground; seeded "
            "watershed on the boundary distances inside the foreground; objects smaller than min_size removed"
        ),
        **extra,
    })


def _documentation(kind: str, name: str, model_type: str, image_size: int = registry.IMAGE_SIZE,
                   pixel_scale: float = 1.0) -> str:
    params = AisParameters()
    size = image_size
    scale_note = "" if pixel_scale == 1.0 else f"""
## Pixel scale {pixel_scale:g}

This model was trained on images enlarged {pixel_scale:g} times (`config.usam.pixel_scale`) and segments best at
that scale: enlarge the image {pixel_scale:g} times (bilinear) before it goes in, resize the maps back to the
image's size, then post-process them (the options below stay in the image's pixels). `usam ais` does this by
default (`--scale 1` runs the model on the image as it is).
"""
    common = f"""
## What the maps are

Three channels, each in 0..1 (sigmoid): `foreground` (probability), `center_distances` and
`boundary_distances` (per object normalised distances, 0 at the object's centre), as predicted by µSAM's
UNETR decoder (micro-sam 1.8.14 `InstanceSegmentationWithDecoder.initialize`).

## From maps to instances (µSAM's post-processing)

1. smooth the foreground with a Gaussian of sigma {params.foreground_smoothing}, both distance maps with
   sigma {params.distance_smoothing};
2. foreground mask: foreground > {params.foreground_threshold};
3. seeds: 8-connected components of (center_distances < {params.center_distance_threshold}) and
   (boundary_distances < {params.boundary_distance_threshold}) inside the foreground mask;
4. seeded watershed of the (smoothed) boundary distances inside the foreground mask;
5. objects smaller than `min_size` ({params.min_size}) pixels removed.

These defaults (`config.usam.ais_parameters`) are µSAM's `generate` defaults;
`usam_bioimageio.automatic.ais.decoder.automatic_instance_segmentation` does all of this (the watershed and
smoothing equal to µSAM's bioimage-cpp ones, label ids included).

## Notes

- µSAM runs this decoder with its BatchNorm layers in training mode (it never calls `eval()`), i.e. they
  normalise with the statistics of the input; the packaged graph does the same (the running statistics in
  the weights are unused).
- The end-to-end `ais` package: {whole_image_note(size)}
"""
    if kind == "ais":
        head = f"""# {name} automatic instance segmentation (end to end)

µSAM's automatic instance segmentation decoder ({model_type}) with its image encoder in one graph: a 2D image
of any size and value range (channels r, g, b; grey replicated) in, the three AIS maps at the image's size
out. Inside: µSAM's per-channel normalisation to 0..255, SAM's longest-side resize to {size} (Pillow-exact
bilinear) and zero padding, the image encoder, the UNETR decoder, the crop of the padding and a bilinear resize
(align_corners=False) back to the input size.
"""
    else:
        head = f"""# {name} automatic instance segmentation head

µSAM's automatic instance segmentation decoder ({model_type}) on precomputed embeddings of the family's image
encoder (`config.usam.image_encoder`): embeddings in, the three AIS maps in SAM's padded {size} x {size} frame out
(the model's input size, `config.usam.image_size`).

To get the maps of an image of height h and width w: with `scale = {size} / max(h, w)`, crop the top-left
`(int(h * scale + 0.5), int(w * scale + 0.5))` block and resize it to (h, w) bilinearly with half-pixel
centres and no antialiasing (`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`), as
µSAM's `postprocess_masks` does. The family's end-to-end `ais` package does this in its graph.
"""
    return head + scale_note + common


def _cover(sample: Sample, maps: np.ndarray, work: Path, stem: str) -> Path:
    """The maps as RGB beside the instances µSAM's post-processing makes of them, over the image."""
    from PIL import Image

    labels = instances_from_maps(maps)
    rgb = (np.clip(maps.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    cover = np.concatenate([rgb, overlay(sample.image, labels)], axis=1)
    path = work / f"{stem}_cover.png"
    Image.fromarray(cover).save(path)
    return path


def write_ais_packages(
    checkpoint: Checkpoint,
    sample: Sample,
    embeddings: np.ndarray,
    encoder_sha: str,
    name: str,
    folder: Path,
    formats: Sequence[str],
    work: Path,
    *,
    kinds: Sequence[str] = AIS_KINDS,
    test: bool = True,
) -> Dict[str, Path]:
    """Write ``ais.zip`` and ``ais_head.zip`` of ``checkpoint`` (which must have a ``decoder_state``).

    Args:
        checkpoint: the loaded checkpoint.
        sample: the family's sample image (test tensor of ``ais``, cover of both).
        embeddings: (1, 256, N/16, N/16) embeddings of ``sample`` from the family's image encoder module (test
            tensor of ``ais_head``).
        encoder_sha: the image encoder package's identity (``Package.identity``), recorded in ``ais_head``.
        name: the family name.
        folder: where ``ais.zip`` / ``ais_head.zip`` are written (the family's folder).
        formats: weight formats.
        work: scratch folder for covers.
        kinds: which of the two packages to write (default both).
        test: gate each package with bioimageio.core's test (default; ``False`` only for test fixtures).

    Returns ``{kind: path}`` of the packages written.
    """
    unknown = set(kinds) - set(AIS_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {AIS_KINDS}, got {tuple(kinds)}")
    state = _decoder_state(checkpoint)
    conv_t = uses_conv_transpose(state)
    files = {kind: Path(folder) / f"{kind}.zip" for kind in kinds}
    h, w = sample.image.shape[:2]
    arch_kwargs = {"model_type": checkpoint.model_type, "use_conv_transpose": conv_t,
                   "batch_statistics": BATCH_STATISTICS, "image_size": checkpoint.image_size}
    tags = ["segment-anything", "micro-sam", "automatic-instance-segmentation", "instance-segmentation",
            "unetr", checkpoint.model_type]
    maps_channels = channel(*AIS_CHANNEL_NAMES)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    # ais_head: embeddings -> maps in the padded frame
    head = ais_head_model(checkpoint)
    with torch.no_grad():
        padded = head(torch.from_numpy(embeddings)).numpy()
    size = checkpoint.image_size
    head_cover = _cover(sample, padded_maps_to_original(padded[0], (h, w), image_size=size), work, "ais_head")
    if "ais_head" in kinds:
        write_package(
            module=head,
            inputs=[TensorSpec("embeddings", "image embeddings from the family's image encoder",
                               embedding_axes(size), data=embeddings)],
            outputs=[TensorSpec("padded_maps", "AIS maps (foreground, centre / boundary distances; 0..1) in SAM's padded "
                                f"{size}x{size} frame; crop + resize: see the documentation",
                                [Batch(1), maps_channels, Space("y", size), Space("x", size)], data=padded)],
            output_path=files["ais_head"],
            name=f"{name} AIS head",
            description=f"µSAM automatic instance segmentation decoder ({checkpoint.model_type}) on the family's image "
                        f"embeddings -> foreground / centre distance / boundary distance maps. {CREDIT}",
            authors=AUTHORS,
            architecture=modules.architecture("AisHeadModel", **arch_kwargs),
            formats=formats,
            test=test,
            tags=tags + ["decoder"],
            documentation=_documentation("ais_head", name, checkpoint.model_type, size, checkpoint.pixel_scale),
            covers=[head_cover],
            config=_config(checkpoint, name, "ais_head", conv_t, output_frame="padded",
                           image_encoder={"name": f"{name} image encoder", "identity": encoder_sha}),
        )

    if "ais" in kinds:
        # ais: image -> maps at the image size
        # (the cover of ais_head shows the same maps: the head's, resized as the ais graph resizes them)
        model = ais_model(checkpoint)
        x = image_to_input(sample.image, checkpoint.image_size)
        write_package(
            module=model,
            torchscript=script_ais_model(model) if "torchscript" in formats else None,
            inputs=[TensorSpec("image", "2D image, channels r, g, b (gray replicated), raw pixel values of any range",
                               [Batch(1), channel("r", "g", "b"), Space("y", ANY), Space("x", ANY)], data=x)],
            outputs=[TensorSpec("maps", "AIS maps (foreground, centre / boundary distances; 0..1) at the image size, "
                                "the input of µSAM's post-processing",
                                [Batch(1), maps_channels, Space("y", Ref("image", "y")), Space("x", Ref("image", "x"))])],
            onnx_dynamic_axes={"image": {2: "y", 3: "x"}, "maps": {2: "y", 3: "x"}},
            output_path=files["ais"],
            name=f"{name} AIS",
            description=f"µSAM automatic instance segmentation ({checkpoint.model_type}), end to end: any 2D image "
                        f"(whole, not tiled) -> foreground / centre distance / boundary distance maps at the image size. {CREDIT}",
            authors=AUTHORS,
            architecture=modules.architecture("AisModel", **arch_kwargs),
            formats=formats,
            test=test,
            tags=tags,
            documentation=_documentation("ais", name, checkpoint.model_type, size, checkpoint.pixel_scale),
            covers=[head_cover],
            config=_config(checkpoint, name, "ais", conv_t, output_frame="image", sample=sample.source,
                           whole_image=whole_image_note(size)),
        )
    return files
