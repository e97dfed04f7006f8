"""GPU check of the core (run on a CUDA machine): reference parity on the device, batched vs sequential,
and the wall time of one EPD step's K points batched vs one call per point on a mid-size conv net.

    EPD_SHARED=path/to/shared python -m scripts.gpu_check     (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from epd_core import GaussianMixture, load_params, make_schedule, sample
from epd_dev.shared_data import SHARED


def parity(device: str) -> list[dict]:
    rows = []
    gm = GaussianMixture.reference().to(device)
    for path in sorted((SHARED / "epd_reference").glob("*.safetensors")):
        if path.name == "gmm.safetensors":
            continue
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
        ref = load_file(str(path))
        tables = list((SHARED / "epd_official").glob(f"*/{meta['predictor_file']}"))
        if len(tables) != 1:
            raise SystemExit(f"{path}: its table {meta['predictor_file']!r} is in {len(tables)} folders of "
                             f"{SHARED / 'epd_official'}, not one")  # fmt: skip
        (table,) = tables
        p = load_params(table)
        kw = {"sigma_min": meta["sigma_min"], "sigma_max": meta["sigma_max"]} if meta["net_kind"] == "edm" else {}
        grid = make_schedule(p, **kw)
        flow = meta["net_kind"] in ("sd3", "flux")
        den = gm.denoise_flow if flow else gm.denoise_ve
        x = ref["latents"] if flow else ref["latents"] * grid[0]
        row = {"file": path.stem}
        for dtype in (torch.float64, torch.float32):
            out = sample(den, x.to(device, dtype), grid, p).double().cpu()
            row[str(dtype)] = ((out - ref["final"]).abs().max() / ref["final"].abs().max()).item()
        seq = sample(den, x.to(device), grid, p, parallel=False).cpu()
        row["batched_vs_sequential"] = (seq - sample(den, x.to(device), grid, p).cpu()).abs().max().item()
        rows.append(row)
    if not rows:
        raise SystemExit(f"no reference trajectories in {SHARED / 'epd_reference'} (set EPD_SHARED)")
    return rows


def timing(device: str, k: int = 2, batch: int = 1) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        *[m for _ in range(8) for m in (torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.SiLU())]
    ).to(device, torch.float16)
    xs = [torch.randn(batch, 256, 64, 64, device=device, dtype=torch.float16) for _ in range(k)]

    def run(batched: bool) -> float:
        for _ in range(3):
            net(torch.cat(xs)) if batched else [net(x) for x in xs]
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            net(torch.cat(xs)) if batched else [net(x) for x in xs]
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        b, s = run(True), run(False)
    return {"k": k, "batch": batch, "batched_ms": b * 1e3, "sequential_ms": s * 1e3, "ratio": s / b}


if __name__ == "__main__":
    argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0]).parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "parity": parity(device)}
    if device == "cuda":
        result["timing"] = [timing(device, k, b) for k in (2, 4) for b in (1, 4)]
    print(json.dumps(result, indent=1))
