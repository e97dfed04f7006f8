"""Distil EPD tables for the demo digits UNet (node EPD Demo Digits Model) through ComfyUI, as a user would
with the EPD Distill node, and store them in weights/ (each records its command and options in its metadata).

python scripts/make_digits_tables.py                   # digits-nfe5 and digits-nfe10
python scripts/make_digits_tables.py --iterations 5 --out-dir /tmp/x   # a quick check
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_harness  # noqa: E402

NODES = comfy_harness.setup()
training = comfy_harness.pack_module("nodes.training")
files = comfy_harness.pack_module("epd_core.files")
time_points_for_nfe = comfy_harness.pack_module("epd_core.params").time_points_for_nfe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--teacher-m", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nfe", type=int, nargs="*", default=[5, 10])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, cond = NODES["EPDDigitsModel"].execute().result
    latent = torch.zeros(1, 4, 8, 8)
    command = "python scripts/make_digits_tables.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    for nfe in args.nfe:
        steps, afs = time_points_for_nfe(nfe)
        start = training.start_table(model.get_model_object("model_sampling"), steps, args.points, afs)
        params = training.distill_on_model(
            model, cond, cond, 1.0, latent, start, iterations=args.iterations, batch=args.batch,
            teacher="heun", teacher_m=args.teacher_m, seed=args.seed, learn_grid=True, weighting="snr",
            metadata={"model": "digits UNet (weights/digits-unet.safetensors)", "command": command},
        )  # fmt: skip
        out = args.out_dir / f"digits-nfe{nfe}.safetensors"
        files.save_params(params, out)
        print(f"wrote {out}: NFE {params.nfe}, loss {params.metadata['distilled']['first_loss']:.4f} -> "
              f"{params.metadata['distilled']['final_loss']:.4f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
