"""GPU latency: batch-1 wall time of EPD (K = 2 and K = 3, the K points in one batched call, and K = 2 one call per
point) against dpmpp_2m and euler at equal NFE, on a mid-size SD1.5-architecture UNet (random weights, 228M
parameters, 512x512 image = 64x64 latent, cfg 4, float16 on a GPU), through ComfyUI's sampling path. Run it where a
GPU is lent; on a CPU use ``--size tiny --latent 8 --reps 1 --out DIR`` (a smoke test).

    python -m bench.gpu_latency [--reps 20] [--nfe 6 10]   -> bench/results/gpu_latency.json (cost.json's format)

(from the repository root; ComfyUI starts in-process on the GPU when there is one).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cost import median_times
from epd_core import EPDParams
from epd_core.files import write_atomic
from epd_core.params import time_points_for_nfe
from epd_dev import ROOT, comfy_harness
from epd_dev.tiny_models import UNET, _init

RESULTS = ROOT / "bench" / "results"
SIZES = {
    "mid": dict(UNET, model_channels=192, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                transformer_depth=[1] * 6, transformer_depth_output=[1] * 9,
                context_dim=768, num_head_channels=64),
    "tiny": dict(UNET),
}  # fmt: skip


def unet(size: str):
    """A ModelPatcher of an SD1.5-architecture UNet of the given size, random weights, on ComfyUI's device."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = {k: list(v) if isinstance(v, list) else v for k, v in SIZES[size].items()}
    model_config = comfy.supported_models.SD15(config)
    device = comfy.model_management.get_torch_device()
    if device.type == "cuda":
        model_config.set_inference_dtype(torch.float16, None)
    model = comfy.model_base.BaseModel(model_config)
    _init(model.diffusion_model, 0)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def latency(size: str, nfe: int, reps: int, hw: int) -> list[dict]:
    import comfy.sample
    import comfy.samplers

    nodes = comfy_harness.setup()
    model = unet(size)
    ms = model.get_model_object("model_sampling")
    context = SIZES[size]["context_dim"]
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, context, generator=g), {}]]
    neg = [[torch.randn(1, 77, context, generator=g), {}]]
    latent = torch.zeros(1, 4, hw, hw)
    noise = torch.randn(1, 4, hw, hw, generator=g)
    # timing does not depend on the table's values: untrained tables with NFE = nfe (even: no analytic first step)
    steps, afs = time_points_for_nfe(nfe)
    runs = {}
    for name, k, mode in (("epd", 2, "batched"), ("epd_sequential", 2, "sequential"), ("epd_k3", 3, "batched")):
        params = EPDParams.start(steps, k, afs=afs, schedule_type="discrete", schedule_rho=1.0, backend="ldm")
        runs[name] = (nodes["EPDSampler"].execute(params, mode, True, "comfyui").result[0],
                      nodes["EPDScheduler"].execute(model, params, 1.0, False).result[0])  # fmt: skip
    for name in ("euler", "dpmpp_2m"):
        runs[name] = (comfy.samplers.sampler_object(name), comfy.samplers.calculate_sigmas(ms, "karras", nfe))

    def go(sampler, sigmas) -> Callable[[], object]:
        return lambda: comfy.sample.sample_custom(model, noise, 4.0, sampler, sigmas, pos, neg, latent,
                                                  disable_pbar=True, seed=0)  # fmt: skip

    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    medians = median_times({name: go(*run) for name, run in runs.items()}, reps, sync)
    out = [{"sampler": name, "nfe": nfe, "seconds_per_image": t} for name, t in medians.items()]
    base = {r["sampler"]: r["seconds_per_image"] for r in out}
    for r in out:
        r["ratio_to_euler"] = r["seconds_per_image"] / base["euler"]
        r["ratio_to_dpmpp_2m"] = r["seconds_per_image"] / base["dpmpp_2m"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--nfe", type=int, nargs="+", default=[6, 10])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = a 512x512 image)")
    ap.add_argument("--out", type=Path, help="default bench/results, on a GPU only (it holds the GPU's figures)")
    args = ap.parse_args(argv)
    if args.out is None and not torch.cuda.is_available():
        ap.error("no GPU here: give --out (bench/results/gpu_latency.json holds the GPU measurement the README cites)")
    args.out = args.out or RESULTS
    if any(n % 2 for n in args.nfe):
        ap.error("--nfe must be even (EPD without the analytic first step: two rounds per step)")
    comfy_harness.setup(cpu=not torch.cuda.is_available())  # the device is fixed by ComfyUI's first start
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    params = sum(p.numel() for p in unet(args.size).model.diffusion_model.parameters())
    dtype = "float16" if device.type == "cuda" else "float32"
    result = {"device": name, "model": f"SD1.5-architecture UNet '{args.size}', {params / 1e6:.0f}M parameters",
              "batch": 1, "latent": f"4x{args.latent}x{args.latent}", "cfg": 4.0, "dtype": dtype,
              "torch": torch.__version__, "reps": args.reps,
              "wall_time": [r for n in args.nfe for r in latency(args.size, n, args.reps, args.latent)]}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(json.dumps(result, indent=1).encode(), args.out / "gpu_latency.json", overwrite=True)
    for r in result["wall_time"]:
        print(f"{r['sampler']:>15}  NFE {r['nfe']}  {1000 * r['seconds_per_image']:8.1f} ms  "
              f"x{r['ratio_to_dpmpp_2m']:.2f} dpmpp_2m")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
