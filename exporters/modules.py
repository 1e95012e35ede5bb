"""Checkpoint -> the package modules with their weights, and their torchscript forms."""

from __future__ import annotations

import torch

from usam_bioimageio import __version__, registry
from usam_bioimageio.modeling.packaged import ImageEncoderModel, PromptDecoderModel, decoder_state, encoder_state

from usam_bioimageio.training.checkpoints import Checkpoint
from .specs import ArchitectureSpec


def architecture(callable_name: str, *, image_size: int = registry.IMAGE_SIZE, **kwargs) -> ArchitectureSpec:
    """The pytorch_state_dict architecture of a package module: a class of ``usam_bioimageio.modeling.packaged``
    built with ``kwargs``, with this distribution (and its torch extra) as the weights' dependency.
    ``image_size`` is a kwarg only when it is not the classes' default 1024, so a 1024 package's rdf is as before."""
    if registry.check_image_size(image_size) != registry.IMAGE_SIZE:
        kwargs["image_size"] = image_size
    return ArchitectureSpec(callable=callable_name, import_from="usam_bioimageio.modeling.packaged", kwargs=kwargs,
                            requirements=(f"usam-bioimageio[torch]=={__version__}",))


def image_encoder(checkpoint: Checkpoint) -> ImageEncoderModel:
    model = ImageEncoderModel(checkpoint.model_type, image_size=checkpoint.image_size)
    model.load_state_dict(encoder_state(checkpoint.sam_state), strict=True)
    return model.eval()


def prompt_decoder(checkpoint: Checkpoint) -> PromptDecoderModel:
    model = PromptDecoderModel(checkpoint.model_type, image_size=checkpoint.image_size)
    model.load_state_dict(decoder_state(checkpoint.sam_state), strict=True)
    return model.eval()


class _ScriptedEncoder(torch.nn.Module):
    """Scripted preprocessing (dynamic image size) around a traced ViT (fixed N x N input, N the model's input size)."""

    def __init__(self, preprocess: torch.nn.Module, vit: torch.nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.image_encoder = vit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(self.preprocess(image))


def script_image_encoder(model: ImageEncoderModel) -> torch.jit.ScriptModule:
    """torchscript of the encoder that accepts any image size (tracing alone would fix the size)."""
    size = model.image_size
    with torch.no_grad():
        vit = torch.jit.trace(model.image_encoder, torch.zeros(1, 3, size, size), check_trace=False)
    return torch.jit.script(_ScriptedEncoder(model.preprocess, vit))
