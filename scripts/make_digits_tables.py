"""Distil EPD tables for the demo digits UNet (node EPD Demo Digits Model) through ComfyUI, as a user would
with the EPD Distill node, then refine them with RDPO as the EPD RDPO node does (Stage 2, fidelity reward), and
store both in weights/demo/ (each records its command and options in its metadata).

python -m scripts.make_digits_tables                   # digits-nfe5, digits-nfe10 (Stage 1), digits-nfe5-rdpo
python -m scripts.make_digits_tables --stage rdpo      # only Stage 2, from the Stage 1 tables in --out-dir
python -m scripts.make_digits_tables --iterations 5 --rdpo-iterations 2 --out-dir /tmp/x   # a quick check
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from epd_dev import ROOT, comfy_harness


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--teacher-m", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nfe", type=int, nargs="*", default=[5, 10])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "weights" / "demo")
    ap.add_argument("--stage", choices=["both", "distill", "rdpo"], default="both")
    ap.add_argument("--rdpo-iterations", type=int, default=200)
    ap.add_argument("--rdpo-nfe", type=int, nargs="*", default=[5], help="the tables Stage 2 refines")
    ap.add_argument("--rdpo-teacher-m", type=int, default=8, help="DPM-Solver-2 teacher points per step (reward)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    nodes = comfy_harness.setup()
    training = comfy_harness.pack_module("nodes.training")
    files = comfy_harness.pack_module("epd_core.files")
    config = comfy_harness.pack_module("epd_core.config")
    time_points_for_nfe = comfy_harness.pack_module("epd_core.params").time_points_for_nfe
    model, cond = nodes["EPDDigitsModel"].execute().result
    latent = torch.zeros(1, 4, 8, 8)
    command = "python -m scripts.make_digits_tables " + shlex.join(argv if argv is not None else sys.argv[1:])
    for nfe in args.nfe:
        out = args.out_dir / f"digits-nfe{nfe}.safetensors"
        if args.stage != "rdpo":
            steps, afs = time_points_for_nfe(nfe)
            start = training.start_table(model.get_model_object("model_sampling"), steps, args.points, afs)
            # afs_mean off: the bundled tables were fitted before the mean-aware first step (AFS assumes mean 0)
            distill_config = config.DistillConfig(
                iterations=args.iterations, batch=args.batch, teacher="heun", teacher_m=args.teacher_m,
                seed=args.seed, learn_grid=True, weighting="snr", gradient="fd", afs_mean=False,
            )  # fmt: skip
            meta = {"model": "digits UNet (demo_models/digits-unet.safetensors)", "command": command}
            params = training.distill_on_model(model, cond, cond, 1.0, latent, start, distill_config, metadata=meta)
            files.save_params(params, out)
            print(f"wrote {out}: NFE {params.nfe}, loss {params.metadata['distilled']['first_loss']:.4f} -> "
                  f"{params.metadata['distilled']['final_loss']:.4f}", flush=True)  # fmt: skip
        if args.stage != "distill" and nfe in args.rdpo_nfe:
            start = files.load_params(out)
            rdpo_config = config.RDPOConfig(
                iterations=args.rdpo_iterations, groups=8, k=4, concentration=20.0, lr=3e-4, seed=args.seed
            )
            meta = {"model": "digits UNet (demo_models/digits-unet.safetensors)", "command": command,
                    "rdpo_start_file": out.name}  # fmt: skip
            params, curve = training.rdpo_on_model(model, cond, cond, 1.0, latent, start, rdpo_config,
                                                   teacher_m=args.rdpo_teacher_m, metadata=meta)  # fmt: skip
            refined = out.with_name(f"{out.stem}-rdpo.safetensors")
            files.save_params(params, refined)
            print(f"wrote {refined}: mean reward {curve[0]:.4f} -> {params.metadata['rdpo']['final_reward']:.4f}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
