"""Cost benchmark on the CPU: wall time per image against euler at equal NFE, solver overhead, batched-call memory.

* time: a tiny real SD1.5-architecture UNet (random weights) through ComfyUI's sampling path, one 4x8x8 latent,
  the bundled analytic NFE-10 EPD table (K = 3) against euler and dpmpp_2m at the same NFE; median of several
  repetitions, the samplers taking turns, as a ratio to euler;
* overhead: the solver's own time per step with a near-free denoiser (``x -> 0.9 x``) on a 4x64x64 latent, core only;
* memory: ComfyUI's own estimate for one model call of two batched points against a single point, at 4x64x64 (a
  512x512 image).

    python -m bench.cost [--reps 7]   -> bench/results/cost.json and cost.md     (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from epd_core import EPDParams, load_params, make_schedule, sample
from epd_core.files import write_atomic
from epd_dev import ROOT, comfy_harness
from epd_dev.tiny_models import conditioning, tiny_model

RESULTS = ROOT / "bench" / "results"


def median_times(fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None] | None = None) -> dict:
    """Each function's median wall time over ``reps`` rounds, the functions taking turns within a round (after one
    warm-up each): a change of the machine's load or clock during the measurement then reaches every sampler alike,
    where timing one sampler's repetitions after another's would read it as a difference between the samplers.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        fn()  # warm-up (loads the model onto the device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def wall_time(reps: int, nfe_table: str = "analytic-sd15-reference-nfe10.safetensors") -> list[dict]:
    import comfy.sample
    import comfy.samplers

    nodes = comfy_harness.setup()
    model = tiny_model("eps")
    params = load_params(ROOT / "weights" / "demo" / nfe_table)
    ms = model.get_model_object("model_sampling")
    pos, neg = conditioning(1, 1), conditioning(1, 2)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    epd_sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, False).result[0]
    epd = nodes["EPDSampler"].execute(params, "batched", True, "comfyui").result[0]
    runs = {"epd": (epd, epd_sigmas)}
    for name in ("euler", "dpmpp_2m"):
        runs[name] = (comfy.samplers.sampler_object(name), comfy.samplers.calculate_sigmas(ms, "karras", params.nfe))

    def go(sampler, sigmas) -> Callable[[], object]:
        return lambda: comfy.sample.sample_custom(model, noise, 4.0, sampler, sigmas, pos, neg, latent,
                                                  disable_pbar=True, seed=0)  # fmt: skip

    medians = median_times({name: go(*run) for name, run in runs.items()}, reps)
    out = [{"sampler": name, "nfe": params.nfe, "seconds_per_image": t} for name, t in medians.items()]
    base = next(r["seconds_per_image"] for r in out if r["sampler"] == "euler")
    for r in out:
        r["ratio_to_euler"] = r["seconds_per_image"] / base
    return out


def solver_overhead(reps: int) -> dict:
    params = EPDParams.start(11, 2, schedule_type="polynomial", schedule_rho=7.0)
    grid = make_schedule(params)
    x = torch.randn(1, 4, 64, 64)

    def free(x, sigma):
        return 0.9 * x

    t = median_times({"epd": lambda: sample(free, x, grid, params)}, reps)["epd"]
    return {"steps": params.num_steps - 1, "microseconds_per_step": 1e6 * t / (params.num_steps - 1)}


def batched_memory() -> dict:
    model = tiny_model("eps")
    base = model.model
    shape = [2, 4, 64, 64]  # cond + uncond of one 512x512 image
    single = base.memory_required(shape)
    batched = base.memory_required([2 * shape[0]] + shape[1:])  # K = 2 points
    return {"latent": "4x64x64 (512x512 image)", "one_point_bytes": int(single), "two_points_bytes": int(batched),
            "ratio": batched / single}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    comfy_harness.setup()
    result = {"device": "cpu", "wall_time": wall_time(args.reps), "overhead": solver_overhead(args.reps),
              "memory": batched_memory()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(json.dumps(result, indent=1).encode(), args.out / "cost.json", overwrite=True)
    lines = ["| sampler | NFE | seconds per image | ratio to euler |", "|---|---|---|---|"]
    for r in result["wall_time"]:
        cells = [r["sampler"], r["nfe"], f"{r['seconds_per_image']:.4f}", f"{r['ratio_to_euler']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    o, m = result["overhead"], result["memory"]
    lines += [
        "",
        f"EPD solver overhead: {o['microseconds_per_step']:.0f} us per step (near-free denoiser).",
        f"ComfyUI's memory estimate for one call with both points: {m['ratio']:.2f}x a single point's.",
    ]
    write_atomic(("\n".join(lines) + "\n").encode(), args.out / "cost.md", overwrite=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
