"""Feature encoders for EPD Distill's final-step feature loss (the authors' Inception loss, with the user's encoder).

The authors judge the student's last step on decoded images: ``alpha * mean((f(student) - f(teacher))^2)`` with
``f`` Inception features, in place of the squared distance of the latents. Here ``f`` is an ``EPD_ENCODER``: a
function from LATENT-format latents (what VAE Decode takes) to features ``[B, D]`` that keeps the autograd graph,
so the loss reaches the table through the decoder and the encoder. In ComfyUI it is the user's VAE and CLIP vision
model (:func:`clip_vision_encoder`); on the MNIST demo models the demo classifier (``nodes_mnist``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import comfy.model_management
import torch

from .autograd import make_differentiable, saved_copies
from .comfy_types import VAE, ClipVision

FeatureLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Encoder:
    """An ``EPD_ENCODER``: ``embed(latents) -> [B, D]`` features of the decoded images, differentiable."""

    name: str
    embed: Callable[[torch.Tensor], torch.Tensor]


def final_feature_loss(encoder: Encoder, weight: float, latent_out: Callable[[torch.Tensor], torch.Tensor],
                       reload: Callable[[], None]) -> FeatureLoss:  # fmt: skip
    """The final step's loss for :func:`epd_core.distill.distill`: ``weight`` times the mean squared distance of
    the features of student and teacher (the teacher's without a graph). ``latent_out`` maps the model's internal
    latents to the LATENT format; ``reload`` loads the sampled model back after the encoder ran."""

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        try:
            with torch.no_grad():
                reference = encoder.embed(latent_out(target)).float()
            student = encoder.embed(latent_out(x)).float()
        finally:
            reload()
        if student.ndim != 2 or student.shape != reference.shape:
            raise ValueError(f"feature encoder {encoder.name!r} gave features of shape {list(student.shape)}; "
                             "it must give one vector per image")  # fmt: skip
        return weight * ((student - reference.to(student.device)) ** 2).mean()

    return loss


@contextmanager
def vae_of_the_model(vae: VAE, latents: torch.Tensor, who: str) -> Iterator[None]:
    """Name a VAE of another latent format (an SD1.5 VAE on SD3's latents), where torch's channel error names none;
    a failure of a VAE whose channels match is left as it is."""
    try:
        yield
    except RuntimeError as exc:
        channels = getattr(vae, "latent_channels", None)
        if isinstance(exc, torch.OutOfMemoryError) or channels is None or latents.shape[1] == channels:
            raise
        raise ValueError(f"{who}: this VAE decodes latents of {channels} channels and the model's have "
                         f"{latents.shape[1]}; connect the VAE that belongs to the model") from exc  # fmt: skip


def decode(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """``vae``'s frames ``[B, T, H, W, 3]`` in ``[0, 1]`` of LATENT-format ``latents`` (T = 1 for an image VAE; a
    video VAE such as Wan's gives T frames), keeping the graph (ComfyUI's ``VAE.decode`` writes into buffers in
    place)."""
    comfy.model_management.load_models_gpu([vae.patcher])
    make_differentiable(vae.first_stage_model)
    with saved_copies(), vae_of_the_model(vae, latents, "feature loss"):
        out = vae.first_stage_model.decode(latents.to(vae.device, vae.vae_dtype))
    if out.ndim == 4:
        out = out.unsqueeze(2)
    if out.ndim != 5 or out.shape[1] < 3:
        raise ValueError(f"feature loss: this VAE decodes to shape {list(out.shape)}; an image or video VAE is needed")
    return ((out[:, :3].float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 4, 1)


def clip_pixels(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP's preprocessing of images ``[B, H, W, 3]``: shorter side to ``size`` (bicubic, antialiased), centre
    crop, normalise. ComfyUI's ``clip_preprocess`` without its rounding to 8 bits, which would stop the gradient."""
    x = images.movedim(-1, 1)
    if x.shape[2] != size or x.shape[3] != size:
        scale = size / min(x.shape[2], x.shape[3])
        x = torch.nn.functional.interpolate(x, size=(round(scale * x.shape[2]), round(scale * x.shape[3])),
                                            mode="bicubic", antialias=True)  # fmt: skip
        h, w = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, h : h + size, w : w + size]
    x = x.clamp(0.0, 1.0)
    mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


def clip_vision_encoder(vae: VAE, clip_vision: ClipVision) -> Encoder:
    """Decode with ``vae``, embed with ``clip_vision`` (its projected image embedding, as ``encode_image``)."""
    kind = getattr(clip_vision, "model_type", "clip_vision_model")
    if kind == "siglip2_vision_model":
        raise ValueError("feature loss: SigLIP 2 vision models (variable patch count) are not supported; use a "
                         "CLIP or SigLIP vision model")  # fmt: skip

    def embed(latents: torch.Tensor) -> torch.Tensor:
        frames = decode(vae, latents)
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        pixels = clip_pixels(frames.flatten(0, 1).to(clip_vision.load_device), int(clip_vision.image_size),
                             clip_vision.image_mean, clip_vision.image_std)  # fmt: skip
        make_differentiable(clip_vision.model)
        with saved_copies():
            features = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[2]
        if features.ndim == 3:  # SigLIP: one embedding per patch token, no pooled one
            features = features.mean(dim=1)
        return features.reshape(frames.shape[0], -1)  # a video's frames side by side: one vector per sample

    return Encoder("clip_vision", embed)
