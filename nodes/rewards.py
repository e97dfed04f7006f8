"""Rewards for EPD RDPO in ComfyUI: a CLIP score from the user's own VAE, CLIP vision and CLIP text models.

A reward here is ``reward(latents, context) -> scores``: ``latents`` are the rollouts' final latents in
ComfyUI's LATENT format (what VAE Decode takes), ``context`` each rollout's group index; one score per
rollout, higher is better.

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

Reward = Callable[[torch.Tensor, Any], torch.Tensor]


def prompt_embedding(clip, prompt: str) -> torch.Tensor:
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


def image_embeddings(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings ``[B, D]`` (float32) of images ``[B, H, W, 3]`` in 0..1; ComfyUI's
    ``encode_image`` resizes, centre-crops and normalises."""
    embeds = clip_vision.encode_image(images, crop=True)["image_embeds"]
    if embeds.ndim != 2:
        raise ValueError(
            f"clip_score: this CLIP vision model gives no pooled image embedding (shape {tuple(embeds.shape)})"
        )
    return embeds.float()


def clip_score_reward(vae, clip_vision, clip, prompt: str) -> Reward:
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

    def clip_score(latents: torch.Tensor, context: Any) -> torch.Tensor:
        with torch.no_grad():
            images = vae.decode(latents)
            if images.ndim != 4 or images.shape[0] != latents.shape[0]:
                raise ValueError(f"clip_score scores images; this VAE decoded to shape {tuple(images.shape)}")
            embeds = image_embeddings(clip_vision, images)
            score = 100.0 * torch.nn.functional.cosine_similarity(embeds, text.to(embeds.device)[None], dim=-1)
        return score.to(latents.device)

    return clip_score
