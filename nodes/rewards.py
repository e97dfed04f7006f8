"""Rewards for EPD RDPO in ComfyUI: a CLIP score from the user's own VAE, CLIP vision and CLIP text models.

A reward here is ``reward(latents, context) -> scores``: ``latents`` are the rollouts' final latents in
ComfyUI's LATENT format (what VAE Decode takes), ``context`` each rollout's index into the iteration's noises
(its group's under grouping "noise", its own under "prompt"); one score per rollout, higher is better.

The CLIP score is ``100 * cosine(image embedding, prompt embedding)`` in CLIP's joint space, so both models
must be the two towers of one CLIP and the text model must carry its projection. Pairs that work in ComfyUI:
an SD2.x checkpoint's CLIP with CLIP-ViT-H-14-laion2B-s32B-b79K (1024), an SDXL checkpoint's CLIP (its
CLIP-G pooled output) with CLIP-ViT-bigG-14 / clip_vision_g (1280), a standalone clip_l.safetensors with
OpenAI's CLIP ViT-L/14 vision model (768). An SD1.5 checkpoint stores no text projection for its CLIP-L.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .comfy_types import CLIP, VAE, ClipVision
from .features import vae_of_the_model

Reward = Callable[[torch.Tensor, Any], torch.Tensor]


def prompt_embedding(clip: CLIP, prompt: str) -> torch.Tensor:
    """The prompt's pooled text embedding projected into CLIP's joint space, ``[D]`` (float32).

    ``CLIP.encode_from_tokens(return_pooled=True)`` projects only where the model's default says so (SD2's
    CLIP-H, SDXL's CLIP-G), not for CLIP-L (SD1.5's or a standalone clip_l), so the projection is asked for.
    A checkpoint without the projection (SD1.5) leaves ComfyUI's weight uninitialised, often zeros: an
    embedding that is not finite or a thousand times shorter than the unprojected one is refused.
    """
    tokens = clip.tokenize(prompt)
    clip.load_model()
    text, plain = (_pooled(clip, tokens, projected) for projected in (True, False))
    if text is None:
        raise ValueError("clip_score: this CLIP text model gives no pooled embedding")
    if not torch.isfinite(text).all() or (plain is not None and float(text.norm()) < 1e-3 * float(plain.norm())):
        raise ValueError(
            "clip_score: this CLIP text model lacks its projection into the joint text-image space (an SD1.5 "
            "checkpoint's CLIP-L has none; load clip_l.safetensors with a CLIP loader instead)"
        )
    return text


def _pooled(clip, tokens: dict, projected: bool) -> torch.Tensor | None:
    """The first prompt's pooled output ``[D]``, projected or not."""
    encoder = clip.cond_stage_model
    encoder.reset_clip_options()
    encoder.set_clip_options({"projected_pooled": projected})
    try:
        with torch.no_grad():
            pooled = encoder.encode_token_weights(tokens)[1]
    finally:
        encoder.reset_clip_options()
    return None if pooled is None else pooled.float().reshape(-1, pooled.shape[-1])[0]


def image_embeddings(clip_vision: ClipVision, images: torch.Tensor, reward: str = "clip_score") -> torch.Tensor:
    """Projected image embeddings ``[B, D]`` (float32) of images ``[B, H, W, 3]`` in 0..1; ComfyUI's
    ``encode_image`` resizes, centre-crops and normalises. ``reward`` names the reward in errors."""
    embeds = clip_vision.encode_image(images, crop=True)["image_embeds"]
    if embeds.ndim != 2:
        raise ValueError(
            f"{reward}: this CLIP vision model gives no pooled image embedding (shape {tuple(embeds.shape)}); "
            "use a CLIP vision model (SigLIP gives one embedding per patch)"
        )
    return embeds.float()


def frame_scores(images: torch.Tensor, latents: torch.Tensor, reward: str,
                 score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``score`` of each rollout's decoded image, or the mean over its frames for a video VAE (images
    ``[B, T, H, W, 3]``, as ComfyUI's VAE Decode gives for Wan and HunyuanVideo latents)."""
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[0] != latents.shape[0] or images.shape[-1] < 3:
        raise ValueError(f"{reward} scores images; this VAE decoded to shape {tuple(images.shape)}")
    batch, frames = images.shape[:2]
    return score(images[..., :3].flatten(0, 1)).reshape(batch, frames).mean(dim=1)


def decoded_reward(vae: VAE, name: str, score: Callable[[torch.Tensor], torch.Tensor]) -> Reward:
    """The reward ``name``: each rollout's latents decoded with ``vae`` and their image (a video's frames: their
    mean) scored by ``score(images [N, H, W, 3]) -> [N]``."""

    def reward(latents: torch.Tensor, context: Any) -> torch.Tensor:
        with torch.no_grad():
            with vae_of_the_model(vae, latents, name):
                images = vae.decode(latents)
            scores = frame_scores(images, latents, name, score)
        return scores.to(latents.device)

    reward.__name__ = reward.__qualname__ = name
    return reward


def clip_score_reward(vae: VAE, clip_vision: ClipVision, clip: CLIP, prompt: str) -> Reward:
    """A reward: decode the latents with ``vae``, score ``100 * cosine(image, prompt)`` with the CLIP models.

    The prompt is encoded once here; the dimensions of both embeddings are checked before any training.
    """
    if not prompt.strip():
        raise ValueError("clip_score needs a prompt")
    text = prompt_embedding(clip, prompt)
    size = int(getattr(clip_vision, "image_size", 224))
    with torch.no_grad():
        vision_dim = image_embeddings(clip_vision, torch.zeros(1, size, size, 3)).shape[-1]
    if vision_dim != text.shape[-1]:
        raise ValueError(
            f"clip_score: the CLIP text embedding has {text.shape[-1]} dimensions but the CLIP vision embedding "
            f"{vision_dim}; use the text and vision towers of the same CLIP model"
        )

    def cosine(images: torch.Tensor) -> torch.Tensor:
        embeds = image_embeddings(clip_vision, images)
        return 100.0 * torch.nn.functional.cosine_similarity(embeds, text.to(embeds.device)[None], dim=-1)

    return decoded_reward(vae, "clip_score", cosine)


HEAD_FORMAT = "epd-reward-head-v1"
ACTIVATIONS = {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU}


def load_reward_head(path: str) -> tuple[torch.nn.Sequential, bool]:
    """A preference head from a safetensors file (never a pickle): ``layers.<i>.weight`` / ``layers.<i>.bias`` of
    Linear layers applied in order, the metadata's ``activation`` (none, relu, gelu) between them, ending in one
    output; ``normalize`` "true": the image embedding is L2-normalised first. Returns the head and ``normalize``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name).float() for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"preference: cannot read the reward head ({exc})") from None
    if meta.get("format") != HEAD_FORMAT or meta.get("activation", "none") not in ACTIVATIONS:
        raise ValueError(f"preference: the reward head needs metadata format {HEAD_FORMAT!r} and an activation in "
                         f"{sorted(ACTIVATIONS)}")  # fmt: skip
    count = len(tensors) // 2
    if not count or set(tensors) != {f"layers.{i}.{p}" for i in range(count) for p in ("weight", "bias")}:
        raise ValueError("preference: the reward head holds layers.<i>.weight and layers.<i>.bias, i = 0, 1, ...")
    layers: list[torch.nn.Module] = []
    for i in range(count):
        weight, bias = tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]
        if (
            weight.ndim != 2
            or bias.shape != weight.shape[:1]
            or (layers and weight.shape[1] != layers[-2].out_features)
        ):
            raise ValueError(f"preference: layer {i} of the reward head has mismatched shapes")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        layers += [linear, ACTIVATIONS[meta.get("activation", "none")]()]
    if layers[-2].out_features != 1:
        raise ValueError("preference: the reward head's last layer must have one output")
    return torch.nn.Sequential(*layers[:-1]).eval(), meta.get("normalize", "true") == "true"


def preference_reward(vae: VAE, clip_vision: ClipVision, path: str) -> Reward:
    """A reward: decode with ``vae``, embed with ``clip_vision``, score with the preference head in ``path``
    (:func:`load_reward_head`; e.g. the LAION aesthetic predictor on CLIP ViT-L/14 image embeddings). Its input
    width is checked against the vision model's before any training."""
    head, normalize = load_reward_head(path)
    size = int(getattr(clip_vision, "image_size", 224))
    with torch.no_grad():
        width = image_embeddings(clip_vision, torch.zeros(1, size, size, 3), "preference").shape[-1]
    if head[0].in_features != width:
        raise ValueError(f"preference: the reward head takes {head[0].in_features}-dimensional embeddings but the "
                         f"CLIP vision model gives {width}")  # fmt: skip

    def rate(images: torch.Tensor) -> torch.Tensor:
        embeds = image_embeddings(clip_vision, images, "preference")
        if normalize:
            embeds = torch.nn.functional.normalize(embeds, dim=-1)
        return head.to(embeds.device)(embeds)[:, 0]

    return decoded_reward(vae, "preference", rate)
