"""The main job: a real ComfyUI server runs the analytic-model demo workflow (EPD next to Euler at equal NFE).

Writes output/epd_demo.png (rows: exact ODE solution, EPD, Euler, then both errors magnified 10x) and
prints each sampler's error against the exact answer.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from epd_core import GaussianMixture, load_params
from epd_core.analytic import ode_endpoint
from epd_core.schedules import sd15_alphas_cumprod
from epd_dev import ROOT
from epd_dev.comfy_server import ComfyServer

WORKFLOW = ROOT / "example_workflows" / "api" / "epd_analytic_demo.json"


def _latent(base: Path, prefix: str) -> torch.Tensor:
    (path,) = sorted((base / "output" / "latents").glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"].to(torch.float64)


def _tile(latents: torch.Tensor) -> Image.Image:
    """Each 4x8x8 latent as an 8x8 RGB tile (first three channels), upscaled, side by side."""
    rgb = latents[:, :3].clamp(-2.5, 2.5).add(2.5).div(5.0).mul(255).round().to(torch.uint8)
    row = torch.cat(list(rgb), dim=2).permute(1, 2, 0).numpy()
    return Image.fromarray(row).resize((row.shape[1] * 8, row.shape[0] * 8), Image.NEAREST)


def main() -> int:
    base = ROOT / ".comfy-base"
    shutil.rmtree(base / "output", ignore_errors=True)
    graph = json.loads(WORKFLOW.read_text())
    with ComfyServer(base) as server:
        entry = server.run(graph)
    if entry["status"]["status_str"] != "success":
        print(json.dumps(entry["status"], indent=1))
        return 1
    epd, euler = _latent(base, "epd_demo_epd"), _latent(base, "epd_demo_euler")
    batch = graph["3"]["inputs"]["batch_size"]
    noise = torch.randn([batch, 4, 8, 8], generator=torch.manual_seed(graph["4"]["inputs"]["seed"]))
    sigma_max = float(((1 - sd15_alphas_cumprod()) / sd15_alphas_cumprod()).sqrt()[-1].float())
    gm = GaussianMixture.reference()
    x = noise.double() * (1 + sigma_max**2) ** 0.5
    exact = ode_endpoint(gm.denoise_ve, x, sigma_max, steps=1000)
    check = ode_endpoint(gm.denoise_ve, x, sigma_max, steps=500)
    params = load_params(ROOT / "weights" / graph["2"]["inputs"]["table_name"])
    rmse = lambda a: float(((a - exact) ** 2).mean().sqrt())  # noqa: E731
    wrong = lambda a: int((gm.component(a) != gm.component(exact)).sum())  # noqa: E731
    out = ROOT / "output"
    out.mkdir(exist_ok=True)
    errors = [((a - exact).abs() * 10 - 2.5) for a in (epd, euler)]  # shown x10 on the same colour scale
    rows = [_tile(exact), _tile(epd), _tile(euler), _tile(errors[0]), _tile(errors[1])]
    img = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 8), "white")
    for i, r in enumerate(rows):
        img.paste(r, (0, i * (r.height + 4)))
    img.save(out / "epd_demo.png")
    print(f"ComfyUI ran {WORKFLOW.name}: {batch} samples of the analytic SD1.5-schedule model")
    print(f"  exact answer: Heun 1000 steps (vs 500 steps: RMSE {rmse(check):.2e})")
    nfe = params.nfe + int(graph["4"]["inputs"]["final_denoise"])
    euler_nfe = graph["6"]["inputs"]["steps"]
    print(f"  EPD   ({graph['2']['inputs']['table_name']}), NFE {nfe}: RMSE {rmse(epd):.4f}, "
          f"wrong mode {wrong(epd)}/{batch}")  # fmt: skip
    print(f"  Euler (normal scheduler), NFE {euler_nfe}: RMSE {rmse(euler):.4f}, wrong mode {wrong(euler)}/{batch}")
    print(f"  EPD's error is {rmse(euler) / rmse(epd):.1f}x lower at {'equal' if nfe == euler_nfe else 'unequal'} NFE")
    print(f"  image: {out / 'epd_demo.png'} (rows: exact, EPD, Euler, |EPD - exact| x10, |Euler - exact| x10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
