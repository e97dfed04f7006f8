"""The main job: a real ComfyUI server runs the demo workflow (example_workflows/api/epd_mnist_demo.json): EPD
next to ComfyUI's best built-in samplers at the same NFE and the exact ODE solution, on the class-conditional
MNIST model bundled with the pack, ending in a labelled image grid.

Writes output/epd_demo.png (the grid the workflow's PreviewImage shows; copied to docs/epd_demo.png for the
README) and prints each sampler's error against the exact ODE solution (RMSE over the 4x14x14 latents, which are
the digits' pixels in [-1, 1]).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from epd_dev import ROOT
from epd_dev.comfy_server import ComfyServer
from scripts.make_workflows import MNIST_LABELS

WORKFLOW = ROOT / "example_workflows" / "api" / "epd_mnist_demo.json"


def _latent(base: Path, prefix: str) -> torch.Tensor:
    (path,) = sorted((base / "output" / "latents").glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"].to(torch.float64)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    base = ROOT / ".comfy-base"
    shutil.rmtree(base / "output", ignore_errors=True)
    graph = json.loads(WORKFLOW.read_text())
    grid_id = next(k for k, v in graph.items() if v["class_type"] == "EPDImageGrid")
    preview_id = next(k for k, v in graph.items() if v["class_type"] == "PreviewImage")
    decodes = [graph[grid_id]["inputs"][f"row_{i + 1}"][0] for i in range(len(MNIST_LABELS))]
    rows = [graph[d]["inputs"]["samples"][0] for d in decodes]  # the sampler of each row
    exact_id = rows[0]
    # Only for this script: each sampler's latent is saved, and the exact solution is checked against twice its steps.
    check = {"class_type": "KSampler", "inputs": dict(graph[exact_id]["inputs"])}
    check["inputs"]["steps"] *= 2
    graph["check"] = check
    for i, sampler in enumerate([*rows, "check"]):
        graph[f"save{i}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [sampler, 0], "filename_prefix": f"latents/demo_{i}"}}  # fmt: skip
    with ComfyServer(base) as server:
        entry = server.run(graph)
    if entry["status"]["status_str"] != "success":
        print(json.dumps(entry["status"], indent=1))
        return 1
    (image,) = entry["outputs"][preview_id]["images"]
    out = ROOT / "output"
    out.mkdir(exist_ok=True)
    shutil.copy(base / image["type"] / image.get("subfolder", "") / image["filename"], out / "epd_demo.png")
    shutil.copy(out / "epd_demo.png", ROOT / "docs" / "epd_demo.png")
    latents = [_latent(base, f"demo_{i}") for i in range(len(rows) + 1)]
    exact = latents[0]
    rmse = lambda a: float(((a - exact) ** 2).mean().sqrt())  # noqa: E731
    table = graph[graph[rows[1]]["inputs"]["epd_params"][0]]["inputs"]["table_name"]
    cfg = graph[exact_id]["inputs"]["cfg"]
    print(f"ComfyUI ran {WORKFLOW.name}: digits 0-9 from the MNIST EPS model (cfg {cfg:g}), the same noise for "
          f"every sampler; EPD table {table}")  # fmt: skip
    print(f"  {MNIST_LABELS[0]}: the reference (vs {check['inputs']['steps']} steps: RMSE {rmse(latents[-1]):.1e})")
    errors = {label: rmse(lat) for label, lat in zip(MNIST_LABELS[1:], latents[1:-1], strict=True)}
    for label, err in errors.items():
        print(f"  {label:<16} RMSE {err:.4f}")
    best = min((v, k) for k, v in errors.items() if not k.startswith("EPD"))
    epd = next(v for k, v in errors.items() if k.startswith("EPD"))
    verdict = "lower" if epd < best[0] else "HIGHER"
    print(f"  EPD vs the best built-in ({best[1]}): {best[0] / epd:.2f}x {verdict} error")
    print(f"  image: {out / 'epd_demo.png'} (also docs/epd_demo.png; rows: {', '.join(MNIST_LABELS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
