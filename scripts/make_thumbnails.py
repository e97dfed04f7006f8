"""Thumbnails for the template browser: the *result* of each example workflow, at a size the browser's cards show
readably (640x480 JPEG, ``example_workflows/<title>.jpg``, beside the workflow).

The workflows that need no download run on a real ComfyUI server (no browser needed): the demo's image grid, the
other examples' latents drawn as tiles (first three channels). The examples that need checkpoints cannot run here;
their card says what they need instead of showing a result this machine did not produce.

python -m scripts.make_thumbnails     (from the repository root)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from epd_dev import ROOT
from epd_dev.comfy_server import ComfyServer
from scripts.make_workflows import API, EXAMPLES, ui_path

SIZE = (640, 480)
NEEDS_CHECKPOINTS = ("epd_sd15", "epd_sd3", "epd_flux")
_spec = importlib.util.spec_from_file_location("epd_image_grid", ROOT / "nodes" / "image_grid.py")
grid_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid_module)


def _card(image: Image.Image | None, lines: list[str]) -> Image.Image:
    """``image`` fitted into a white 640x480 card under ``lines`` of text."""
    card = Image.new("RGB", SIZE, "white")
    draw, font = ImageDraw.Draw(card), grid_module._font(22)
    y = 12
    for line in lines:
        draw.text((16, y), line, fill="black", font=font)
        y += 30
    if image is not None:
        room = (SIZE[0] - 16, SIZE[1] - y - 12)
        scale = min(room[0] / image.width, room[1] / image.height)
        fitted = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        card.paste(fitted, ((SIZE[0] - fitted.width) // 2, y + (room[1] - fitted.height) // 2))
    return card


def _tiles(latents: list[torch.Tensor], labels: list[str]) -> Image.Image:
    """4x8x8 latents as 8x8 RGB tiles (first three channels), enlarged 8x, one labelled row per batch."""
    rows = []
    for lat in latents:
        rgb = lat[:8, :3].float().clamp(-2.5, 2.5).add(2.5).div(5.0)
        rows.append(rgb.repeat_interleave(8, 2).repeat_interleave(8, 3).permute(0, 2, 3, 1))
    pixels = grid_module.labelled_grid(rows, labels, font_size=20)[0]
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())


def _saved_latents(base: Path, graph: dict) -> tuple[list[torch.Tensor], list[str]]:
    latents, labels = [], []
    for node in graph.values():
        if node["class_type"] == "SaveLatent":
            prefix = node["inputs"]["filename_prefix"]
            (path,) = sorted((base / "output").glob(f"{prefix}_*.latent"))
            latents.append(load_file(str(path))["latent_tensor"])
            sampler = graph[node["inputs"]["samples"][0]]
            kind = sampler["class_type"]
            names = {"KSampler": f"KSampler {sampler['inputs'].get('sampler_name')}", "EPDKSampler": "EPD KSampler"}
            labels.append(names.get(kind, "EPD"))
    return latents, labels


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp) / "base", frontend=False) as server:
        for example in EXAMPLES:
            name, title = example["id"], example["title"]
            header = [title.split(" ", 1)[1]]
            if name in NEEDS_CHECKPOINTS:
                needs = example["note"].split("\n\n")[1]
                card = _card(None, [*header, "", *_wrap(needs, 48)])
            else:
                graph = json.loads((API / f"{name}.json").read_text())
                entry = server.run(graph)
                if entry["status"]["status_str"] != "success":
                    print(json.dumps(entry["status"], indent=1))
                    return 1
                previews = [o["images"][0] for o in entry["outputs"].values() if o.get("images")]
                if previews:
                    image = Image.open(server.base / previews[0]["type"] / previews[0]["subfolder"]
                                       / previews[0]["filename"]).convert("RGB")  # fmt: skip
                else:
                    image = _tiles(*_saved_latents(server.base, graph))
                card = _card(image, header)
            card.save(ui_path(name).with_suffix(".jpg"), quality=90)
            print(f"wrote example_workflows/{ui_path(name).with_suffix('.jpg').name}")
    return 0


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]


if __name__ == "__main__":
    sys.exit(main())
