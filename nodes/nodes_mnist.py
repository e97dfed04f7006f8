"""Nodes of the class-conditional MNIST demo models (nodes/mnist_model.py): model, class, decode, features."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .autograd import make_differentiable
from .digits_model import LATENT_SHAPE as DIGITS_LATENT_SHAPE
from .features import Encoder
from .inputs import EncoderType, check_declared
from .mnist_classifier import load_classifier
from .mnist_model import KINDS, class_token, latent_to_grey, latent_to_images, mnist_model_patcher, weights_path

CLASSES = [str(d) for d in range(10)] + ["none"]
ALL_DIGITS = "0-9"


class EPDMnistModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDMnistModel",
            display_name="EPD MNIST Model",
            category="advanced/model",
            description="A class-conditional diffusion model trained by this pack on real MNIST digits (ComfyUI's "
            "own UNet, 1-1.25M parameters, no download). eps: SD1.5 discrete schedule; flow: rectified flow on the SD3 "
            "schedule (shift 3). Use a 112x112 empty latent (4x14x14), EPD MNIST Class for positive (a digit) and "
            "negative (none), cfg about 3, and EPD MNIST Decode for the image.",
            inputs=[io.Combo.Input("which", options=list(KINDS), default="eps", tooltip="eps (SD1.5) or flow (SD3).")],
            outputs=[io.Model.Output(tooltip="The MNIST UNet as a ComfyUI model (demo_models/mnist-*.safetensors).")],
        )

    @classmethod
    def execute(cls, which: str) -> io.NodeOutput:
        weights_path(which)  # a clear error for an unknown kind
        return io.NodeOutput(mnist_model_patcher(which))


class EPDMnistClass(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDMnistClass",
            display_name="EPD MNIST Class",
            category="conditioning",
            description="The conditioning of an EPD MNIST model: a digit 0-9, or none (the unconditional branch; "
            "use it as negative for classifier-free guidance), or 0-9: a batch of the ten digits (use a latent batch "
            "of 10, or a multiple: sample i draws digit i mod 10; EPD Distill trains on all ten).",
            inputs=[
                io.Combo.Input(
                    "digit", options=[*CLASSES, ALL_DIGITS], default="7", tooltip="The digit to draw, none, or 0-9."
                )
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="Class tokens [B, 1, 10]."),
                io.Conditioning.Output(display_name="no_class", tooltip="The 'none' class, for the negative."),
            ],
        )

    @classmethod
    def execute(cls, digit: str) -> io.NodeOutput:
        if digit not in (*CLASSES, ALL_DIGITS):
            raise ValueError(f"digit must be one of {[*CLASSES, ALL_DIGITS]}, not {digit!r}")
        labels = list(range(10)) if digit == ALL_DIGITS else [None if digit == "none" else int(digit)]
        return io.NodeOutput([[class_token(labels), {}]], [[class_token([None]), {}]])


class EPDMnistDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDMnistDecode",
            display_name="EPD MNIST Decode",
            category="latent",
            description="Turns an EPD MNIST latent (4x14x14) into the 28x28 grey digit it encodes (pixel shuffle), "
            "or an EPD Demo Digits Model latent (4x8x8) into its 16x16 digit, enlarged by an integer factor (nearest "
            "neighbour).",
            inputs=[
                io.Latent.Input(
                    "samples",
                    tooltip="An EPD MNIST latent [B, 4, 14, 14] (from a sampler on EPD MNIST Model) or an EPD Demo "
                    "Digits Model latent [B, 4, 8, 8].",
                ),
                io.Int.Input("scale", default=4, min=1, max=16, tooltip="Enlargement: 4 gives 112x112 images."),
            ],
            outputs=[
                io.Image.Output(
                    tooltip="White digits on black, [B, 28*scale, 28*scale, 3] (16*scale for the demo digits)."
                )
            ],
        )

    @classmethod
    def execute(cls, samples: dict, scale: int = 4) -> io.NodeOutput:
        check_declared(cls, scale=scale)
        latent = samples["samples"]
        digits = latent.ndim == 4 and tuple(latent.shape[1:]) == DIGITS_LATENT_SHAPE
        grey = latent_to_grey(latent) if digits else latent_to_images(latent)
        if scale > 1:
            grey = grey.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        return io.NodeOutput(grey[..., None].expand(-1, -1, -1, 3).contiguous().to(torch.float32))


def mnist_encoder() -> Encoder:
    """The demo classifier's penultimate features (128) of the digits that MNIST latents encode."""
    net = load_classifier().requires_grad_(False)

    def embed(latents: torch.Tensor) -> torch.Tensor:
        make_differentiable(net.to(latents.device))
        return net.features(latent_to_images(latents))

    return Encoder("mnist_classifier", embed)


class EPDMnistFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDMnistFeatures",
            display_name="EPD MNIST Features",
            category="sampling/epd_training",
            description="The feature encoder of the MNIST demo models for EPD Distill's feature loss: the digits the "
            "latents encode, through the demo classifier (demo_models/mnist-classifier.safetensors) up to its "
            "penultimate layer, the features of the digits FID.",
            inputs=[],
            outputs=[EncoderType.Output(display_name="feature_encoder", tooltip="For EPD Distill's feature_encoder.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(mnist_encoder())


NODES = [EPDMnistModel, EPDMnistClass, EPDMnistDecode, EPDMnistFeatures]
