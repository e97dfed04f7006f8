"""A labelled grid of image batches (the demo's comparison picture): one row per batch, its label on the left.

Plain torch and PIL (which ComfyUI already has); no ComfyUI import, so it is tested on its own.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MAX_ROWS = 8
# Fonts that PIL finds in the system's font folders by name, for labels beyond ASCII (accents, Greek, dashes):
# PIL's bundled font draws every other character as a box.
WIDE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")


def _font(size: int, labels: list[str] = ()) -> ImageFont.ImageFont:
    """PIL's bundled font at ``size`` pixels (Pillow >= 10.1), else its small bitmap font; the first of
    :data:`WIDE_FONTS` found when a label is not plain ASCII."""
    if any(ord(c) > 126 for text in labels for c in text):
        for name in WIDE_FONTS:
            try:
                return ImageFont.truetype(name, size)
            except OSError:
                continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no sizes
        return ImageFont.load_default()


def labelled_grid(rows: list[torch.Tensor], labels: list[str], gap: int = 4, font_size: int = 18) -> torch.Tensor:
    """ComfyUI IMAGEs ``[B_i, H, W, C]`` (same H, W, C; any B_i) -> one IMAGE ``[1, H', W', 3]``: row i holds the
    images of batch i side by side on a white background, ``labels[i]`` written left of it."""
    if not rows or len(rows) > MAX_ROWS:
        raise ValueError(f"an image grid takes 1 to {MAX_ROWS} image batches, got {len(rows)}")
    if len(labels) != len(rows):
        raise ValueError(f"{len(rows)} image rows but {len(labels)} labels (one label per line, one line per row)")
    shapes = {tuple(r.shape[1:3]) for r in rows}
    if len(shapes) != 1 or any(r.ndim != 4 or r.shape[0] < 1 for r in rows):
        raise ValueError(f"the rows' images must all have one size; got {[list(r.shape) for r in rows]}")
    (h, w), font = shapes.pop(), _font(font_size, labels)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(text, font=font)) for text in labels) + 3 * gap
    columns = max(r.shape[0] for r in rows)
    canvas = Image.new("RGB", (label_w + columns * (w + gap), len(rows) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (batch, text) in enumerate(zip(rows, labels, strict=True)):
        y = gap + i * (h + gap)
        draw.text((gap, y + h // 2), text, fill="black", font=font, anchor="lm")
        rgb = batch[..., :3] if batch.shape[-1] >= 3 else batch[..., :1].expand(-1, -1, -1, 3)
        pixels = (rgb.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for j, image in enumerate(pixels):
            canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (label_w + j * (w + gap), y))
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
