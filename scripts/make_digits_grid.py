"""Draw 16 samples of the demo digits model (ComfyUI's KSampler, euler, 30 steps) as docs/digits_samples.png.

python -m scripts.make_digits_grid [--weights PATH] [--steps 30] [--seed 0] [--out docs/digits_samples.png]

Runs inside a real ComfyUI (CPU): EmptyLatentImage 64x64 x16 -> KSampler(euler, normal, cfg 1) on the model
from the EPD Demo Digits Model node; each latent is decoded with ``latent_to_grey`` (16x16 grey) and upscaled
with PIL nearest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from epd_dev import ROOT, comfy_harness


def sample_digits(weights: Path | None = None, count: int = 16, steps: int = 30, seed: int = 0) -> torch.Tensor:
    """``count`` latents from ComfyUI's KSampler (euler, normal scheduler, cfg 1) on the digits model."""
    nodes_by_id = comfy_harness.setup()
    import nodes

    dm = comfy_harness.pack_module("nodes.digits_model")
    if weights is None:
        model, cond = nodes_by_id["EPDDigitsModel"].execute().result
    else:
        model, cond = dm.digits_model_patcher(weights), [[torch.zeros(1, 1, 8), {}]]
    (latent,) = nodes.EmptyLatentImage().generate(64, 64, count)
    (out,) = nodes.KSampler().sample(model, seed, steps, 1.0, "euler", "normal", cond, cond, latent, denoise=1.0)
    return out["samples"]


def grid_image(latents: torch.Tensor, cols: int = 4, scale: int = 8, pad: int = 1) -> Image.Image:
    mm = comfy_harness.pack_module("nodes.mnist_model")
    images = (mm.latent_to_grey(latents) * 255).round().to(torch.uint8)
    rows = -(-len(images) // cols)
    side = 16 * scale
    grid = Image.new("L", (cols * (side + pad) + pad, rows * (side + pad) + pad), 96)
    for i, img in enumerate(images):
        tile = Image.fromarray(img.numpy(), mode="L").resize((side, side), Image.NEAREST)
        grid.paste(tile, (pad + (i % cols) * (side + pad), pad + (i // cols) * (side + pad)))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="another weights file (default: the bundled one)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "digits_samples.png")
    args = ap.parse_args()
    latents = sample_digits(args.weights, 16, args.steps, args.seed)
    grid_image(latents).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
