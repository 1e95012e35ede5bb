"""Checkpoint -> a family of bioimage.io packages (image encoder + prompt decoder), written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import yaml
from tqdm import tqdm

from usam_bioimageio import __version__, registry
from usam_bioimageio.io.download import sha256_of
from usam_bioimageio.embeddings.compute import image_to_input
from usam_bioimageio.io.overlay import masks_to_labels, overlay
from usam_bioimageio.runtime.packages import FAMILY_FILE, load_package
from usam_bioimageio.runtime.geometry import upscale_masks
from usam_bioimageio.prompting.inputs import build_decoder_inputs

from . import modules
from usam_bioimageio.training.checkpoints import Checkpoint, as_micro_sam_infers, load_checkpoint
from .ais import write_ais_packages
from .specs import (ANY, Batch, Index, Ref, Space, TensorSpec, channel, embedding_axes, family_config,
                    whole_image_note)
from .writer import DEFAULT_FORMATS, write_package
from .samples import Sample, load_sample, synthetic_sample

AUTHORS = [{"name": "usam-bioimageio developers"}]
SAM_CREDIT = (
    "Weights: Segment Anything (Kirillov et al. 2023, Apache-2.0) finetuned by µSAM (Archit et al., Nature "
    "Methods 2025) where the checkpoint says so. Architecture re-implemented in usam_bioimageio.modeling."
)


def encoder_documentation(name: str, model_type: str, image_size: int = registry.IMAGE_SIZE) -> str:
    side = registry.embedding_size(image_size)
    return f"""# {name} image encoder

The SAM / µSAM image encoder ({model_type}, input size {image_size}) with all of its input preprocessing in the
graph: a 2D image of any size and value range (channels r, g, b; grey replicated, as µSAM does) in, SAM's
256 x {side} x {side} image embeddings out. Inside: µSAM's per-channel min-max normalisation to 0..255 (truncated,
micro-sam 1.8.14), SAM's longest-side resize to {image_size} (Pillow's antialiased bilinear, bit-exact), SAM's
mean / std normalisation and zero padding to {image_size} x {image_size}, then the ViT. The family's prompt decoder
(and AIS head) take these embeddings.

## Tiling

{whole_image_note(image_size)}
"""


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return path


def _encoder_package(ckpt: Checkpoint, sample: Sample, name: str, out: Path, formats: Sequence[str], work: Path,
                     test: bool = True) -> np.ndarray:
    model = modules.image_encoder(ckpt)
    x = image_to_input(sample.image, ckpt.image_size)
    with torch.no_grad():
        embeddings = model(torch.from_numpy(x)).numpy()
    # Cover: the image beside the first three principal components of its embeddings.
    feats = embeddings[0].reshape(registry.EMBEDDING_DIM, -1).T
    feats = feats - feats.mean(0)
    pcs = feats @ np.linalg.svd(feats, full_matrices=False)[2][:3].T
    side = registry.embedding_size(ckpt.image_size)
    pcs = pcs.reshape(side, side, 3)
    from usam_bioimageio.io.overlay import to_display

    cover_left = to_display(sample.image)
    cover_right = to_display(np.kron(pcs, np.ones((4, 4, 1))))
    h = cover_left.shape[0]
    from PIL import Image

    right = np.asarray(Image.fromarray(cover_right).resize((h, h)))
    cover = _save_png(work / "encoder_cover.png", np.concatenate([cover_left, right], axis=1))

    write_package(
        module=model,
        test=test,
        torchscript=modules.script_image_encoder(model) if "torchscript" in formats else None,
        inputs=[TensorSpec("image", "2D image, channels r, g, b (gray replicated), raw pixel values of any range",
                           [Batch(1), channel("r", "g", "b"), Space("y", ANY), Space("x", ANY)], data=x)],
        outputs=[TensorSpec("embeddings", "SAM image embeddings", embedding_axes(ckpt.image_size), data=embeddings)],
        onnx_dynamic_axes={"image": {2: "y", 3: "x"}},
        output_path=out,
        name=f"{name} image encoder",
        description=f"µSAM / SAM image encoder ({ckpt.model_type}): any 2D image (whole, not tiled) -> "
                    f"256x{side}x{side} embeddings. {SAM_CREDIT}",
        authors=AUTHORS,
        architecture=modules.architecture("ImageEncoderModel", model_type=ckpt.model_type, image_size=ckpt.image_size),
        formats=formats,
        tags=["segment-anything", "micro-sam", "image-encoder", "embeddings", ckpt.model_type],
        covers=[cover],
        documentation=encoder_documentation(name, ckpt.model_type, ckpt.image_size),
        config=family_config(ckpt.model_type, name, "image_encoder", image_size=ckpt.image_size,
                             pixel_scale=ckpt.pixel_scale, sample=sample.source,
                             whole_image=whole_image_note(ckpt.image_size)),
    )
    return embeddings


def _decoder_package(ckpt: Checkpoint, sample: Sample, embeddings: np.ndarray, encoder_sha: str, name: str,
                     out: Path, formats: Sequence[str], work: Path, test: bool = True) -> None:
    model = modules.prompt_decoder(ckpt)
    h, w = sample.image.shape[:2]
    inputs = build_decoder_inputs((h, w), points=sample.points, point_labels=np.ones(sample.points.shape[:2]),
                                  boxes=sample.boxes, image_size=ckpt.image_size)
    names = ("point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
    with torch.no_grad():
        _, low = model(torch.from_numpy(embeddings), *[torch.from_numpy(inputs[k]) for k in names])
    # The test tensors are a refinement step: the first prediction is the mask prompt (all-zero test
    # tensors are refused by the spec, and this way the gate also covers mask prompts).
    inputs["mask_input"] = np.ascontiguousarray(low[:, :1].numpy())
    inputs["has_mask_input"] = np.ones_like(inputs["has_mask_input"])
    masks = upscale_masks(low[:, :1].numpy(), (h, w), image_size=ckpt.image_size)[:, 0] > registry.MASK_THRESHOLD
    cover = _save_png(work / "decoder_cover.png", overlay(sample.image, masks_to_labels(masks), points=sample.points))

    size = ckpt.image_size
    o, m, n_tok = Ref("point_coords", "o"), registry.low_res_mask_size(size), registry.NUM_MASK_OUTPUTS
    tokens = channel(*[f"mask{i}" for i in range(n_tok)])
    write_package(
        module=model,
        test=test,
        inputs=[
            TensorSpec("embeddings", "image embeddings from the family's image encoder",
                       embedding_axes(size), data=embeddings),
            TensorSpec("point_coords", "prompt points (x, y) in original image pixels; box corners as two points",
                       [Index("o", ANY, "objects"), Index("p", ANY, "points per object"), channel("x", "y")],
                       data=inputs["point_coords"]),
            TensorSpec("point_labels", "1 positive, 0 negative, 2 box top-left, 3 box bottom-right, -1 padding",
                       [Index("o", o), Index("p", Ref("point_coords", "p"))], data=inputs["point_labels"]),
            TensorSpec("mask_input", "previous low-resolution mask logits (zeros if unused)",
                       [Index("o", o), channel("mask"), Space("y", m), Space("x", m)], data=inputs["mask_input"]),
            TensorSpec("has_mask_input", "1 where mask_input is used, else 0", [Index("o", o), channel("flag")],
                       data=inputs["has_mask_input"]),
            TensorSpec("orig_im_size", "original image height and width", [channel("h", "w")],
                       data=inputs["orig_im_size"]),
        ],
        outputs=[
            TensorSpec("iou_predictions", "predicted IoU of each mask token", [Index("o", o), tokens]),
            TensorSpec("low_res_masks", f"mask logits, {m}x{m} in the padded {size} frame (token 0: single mask, "
                       "1-3: multimask)", [Index("o", o), tokens, Space("y", m), Space("x", m)]),
        ],
        onnx_dynamic_axes={"point_coords": {0: "o", 1: "p"}, "point_labels": {0: "o", 1: "p"},
                           "mask_input": {0: "o"}, "has_mask_input": {0: "o"},
                           "iou_predictions": {0: "o"}, "low_res_masks": {0: "o"}},
        output_path=out,
        name=f"{name} prompt decoder",
        description=f"µSAM / SAM prompt encoder + mask decoder ({ckpt.model_type}): embeddings + points, boxes and "
                    f"mask prompts for many objects -> mask logits and predicted IoU. {SAM_CREDIT}",
        authors=AUTHORS,
        architecture=modules.architecture("PromptDecoderModel", model_type=ckpt.model_type, image_size=size),
        formats=formats,
        tags=["segment-anything", "micro-sam", "prompt-decoder", "interactive-segmentation", ckpt.model_type],
        covers=[cover],
        config=family_config(ckpt.model_type, name, "prompt_decoder", image_size=size, pixel_scale=ckpt.pixel_scale,
                             image_encoder={"name": f"{name} image encoder", "identity": encoder_sha}),
    )


def _check_replaceable(output_dir: Path, overwrite: bool) -> None:
    """The overwrite rule: a new or empty folder is written; an existing family (family.yaml) is replaced only with
    ``overwrite``; anything else (a file, a folder of other files) never, so no user file is deleted."""
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise FileExistsError(f"{output_dir} exists and is not a folder: choose another output folder")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not (output_dir / FAMILY_FILE).is_file():
        raise FileExistsError(f"{output_dir} holds files but no {FAMILY_FILE}: an export only replaces a family "
                              "folder (or an empty one); choose another output folder")
    if not overwrite:
        raise FileExistsError(f"{output_dir} holds a family already (pass --overwrite / overwrite=True to replace it)")


def _swap_in(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Move the finished family into place: the old folder (checked again: it may have changed during the export)
    is renamed aside first and removed only once the new one is in place, so a failure keeps the old family."""
    _check_replaceable(output_dir, overwrite)
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    old = output_dir.with_name(f".{output_dir.name}-old-{os.getpid()}")
    os.replace(output_dir, old)
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_family(
    *,
    checkpoint: Union[str, os.PathLike, Checkpoint],
    output_dir: Union[str, os.PathLike],
    name: Optional[str] = None,
    model_type: Optional[str] = None,
    sample_image: Optional[Union[str, os.PathLike]] = None,
    sample_labels: Optional[Union[str, os.PathLike]] = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    overwrite: bool = False,
    vit_t_attention_biases: str = "loaded",
    progress: bool = False,
    test: bool = True,
) -> Path:
    """Export the image encoder and prompt decoder packages of a checkpoint into ``output_dir`` (and the AIS
    packages when the checkpoint has a ``decoder_state``).

    Every package passes bioimageio.core's test for every format before it is written; the folder appears
    only when all packages and ``family.yaml`` are complete. Without a sample image, a synthetic one is used.
    ``vit_t_attention_biases``: "loaded" (default, the weights as trained) or "micro_sam" (zero, as micro-sam
    and MobileSAM's builder run vit_t at inference; see ``checkpoints.as_micro_sam_infers``).
    ``progress``: a progress bar over the packages. ``test=False`` skips the bioimageio.core gate: only for
    test fixtures and benchmarks of packages whose format is gated elsewhere; never for packages we ship.
    """
    if vit_t_attention_biases not in ("loaded", "micro_sam"):
        raise ValueError(f"vit_t_attention_biases must be 'loaded' or 'micro_sam', got {vit_t_attention_biases!r}")
    output_dir = Path(output_dir)
    _check_replaceable(output_dir, overwrite)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, model_type=model_type)
    if vit_t_attention_biases == "micro_sam":
        ckpt = as_micro_sam_infers(ckpt)
    name = name or (Path(str(checkpoint)).stem if not isinstance(checkpoint, Checkpoint) else ckpt.model_type)
    sample = load_sample(sample_image, sample_labels) if sample_image else synthetic_sample()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    work = Path(tempfile.mkdtemp(prefix="usam-export-"))
    try:
        files = {"image_encoder": staging / "image_encoder.zip", "prompt_decoder": staging / "prompt_decoder.zip"}
        steps = 3 if ckpt.decoder_state is not None else 2
        with tqdm(total=steps, desc=f"export {name}", unit="package", disable=not progress) as bar:
            bar.set_postfix_str("image encoder")
            embeddings = _encoder_package(ckpt, sample, name, files["image_encoder"], formats, work, test)
            encoder_sha = load_package(files["image_encoder"]).identity
            bar.update()
            bar.set_postfix_str("prompt decoder")
            _decoder_package(ckpt, sample, embeddings, encoder_sha, name, files["prompt_decoder"], formats, work,
                             test)
            bar.update()
            if ckpt.decoder_state is not None:  # µSAM checkpoints with an AIS decoder
                bar.set_postfix_str("AIS and AIS head")
                files.update(write_ais_packages(ckpt, sample, embeddings, encoder_sha, name, staging, formats, work,
                                                test=test))
                bar.update()
        manifest = {
            "name": name,
            "model_type": ckpt.model_type,
            "image_size": ckpt.image_size,
            "source": ckpt.source,
            "exporter_version": __version__,
            "packages": {kind: {"file": p.name, "sha256": sha256_of(p)} for kind, p in files.items()},
        }
        (staging / FAMILY_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private
        _swap_in(staging, output_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return output_dir
