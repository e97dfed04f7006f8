"""RDPO on the class-conditional MNIST eps model from its Stage-1 NFE-5 table, with the classifier reward.

For each training seed: ``nodes.training.rdpo_on_model`` (what EPD RDPO runs) on EPD MNIST Model "eps" with the
ten digits as one conditioning batch (EPD MNIST Class "0-9") against "none", cfg 3, the reward of
``epd_dev.mnist_rewards`` (log-probability of the prompted class, optionally plus the realism term), guarded by
the digits FID of the policy's mean table on fixed held-out noises. The start table and each trained table are
then measured on held-out noises (seed :data:`EVAL_SEED`, used neither in training nor by the guard), sample
``j`` prompted with digit ``j % 10``, through ComfyUI's sampling with EPD Sampler / EPD Scheduler: the reward's
mean and standard error, and the digits FID against the 1,000 held-out real digits. Writes
``bench/results/rdpo.json`` (a list of runs; ``--out`` elsewhere) and, with ``--save``, the seed-0 table.

    python -m bench.rdpo                                     # small sizes (a few minutes per seed on 1 core)
    python -m bench.rdpo --iterations 60 --groups 20 --seeds 0 1 2 --eval 1000
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from bench.accuracy import PARALLEL
from bench.neural import CFG, run, setup
from epd_core import load_params
from epd_core.config import RDPOConfig, add_arguments, rdpo_preset
from epd_core.files import write_atomic
from epd_dev import ROOT, comfy_harness, mnist_data, mnist_metrics, mnist_rewards

START = ROOT / "weights" / "demo" / "mnist-eps-nfe5-epd.safetensors"  # the Stage-1 table the recorded runs started from
OUT = ROOT / "bench" / "results" / "rdpo.json"
EVAL_SEED = 2**30 + 11


def sampler_for(nodes, model, params):
    """EPD Scheduler's sigmas (final denoise) and EPD Sampler for ``params``, as a user samples it."""
    sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, True).result[0]
    sampler = nodes["EPDSampler"].execute(params, PARALLEL, True, "comfyui", "denoise").result[0]
    return sampler, sigmas


def measure(nodes, model, positive, negative, params, noise, reward, real) -> dict:
    """Held-out reward (mean, standard error, per sample) and digits FID of ``params``."""
    out, _ = run(model, positive, negative, *sampler_for(nodes, model, params), noise)
    scores = reward(out, None).double()
    images = mnist_rewards._images(out)
    fid = mnist_metrics.frechet_distance(mnist_metrics.features(images), real)
    labels = torch.arange(len(out)) % 10
    return {"mean": float(scores.mean()), "se": float(scores.std() / math.sqrt(len(scores))), "fid": fid,
            "accuracy": mnist_metrics.class_accuracy(images, labels), "scores": scores, "images": images}  # fmt: skip


def digit_major(images: torch.Tensor, per: int) -> torch.Tensor:
    """The first ``10 * per`` images (sample ``j`` of digit ``j % 10``) ordered digit by digit."""
    return images[: 10 * per].reshape(per, 10, 28, 28).transpose(0, 1).reshape(-1, 28, 28)


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> dict:
    """The RDPOConfig options that override the preset: those given in ``argv``, whatever their value, and
    this benchmark's own sizes (``set_defaults``). A flag equal to RDPOConfig's default (``--grouping noise`` with the
    authors' preset) was taken for not given, so the preset's value won."""
    names = [f.name for f in fields(RDPOConfig) if f.name != "seed"]
    blank = argparse.Namespace(**{name: argparse.SUPPRESS for name in names})
    parsed = parser.parse_known_args(argv, namespace=blank)[0]
    given = {name for name in names if getattr(parsed, name) is not argparse.SUPPRESS}
    given |= {name for name in names if parser.get_default(name) != RDPOConfig.default(name)}
    return {name: getattr(args, name) for name in names if name in given}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    ap.add_argument("--preset", choices=("ours", "authors"), default="ours", help="RDPOConfig defaults to start from")
    ap.add_argument("--realism", type=float, default=0.0, help="weight of the realism term in the reward")
    ap.add_argument("--eval", type=int, default=500, help="held-out noises for the before/after measurement")
    ap.add_argument("--guard-samples", type=int, default=200, help="held-out noises of the guard's digits FID")
    ap.add_argument("--start", type=Path, default=START)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--append", action="store_true", help="add the runs to those already in --out")
    ap.add_argument("--save", type=Path, default=None, help="save the first seed's table here")
    ap.add_argument("--grid", type=Path, default=None, help="draw the first seed's before/after samples here (PNG)")
    ap.add_argument("--threads", type=int, default=1)
    add_arguments(ap, RDPOConfig, skip=("seed",))
    ap.set_defaults(iterations=20, groups=10, k=4, guard_every=5)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m bench.rdpo " + shlex.join(argv)
    nodes, model, positive, negative = setup("eps")
    training = comfy_harness.pack_module("nodes.training")
    start = load_params(args.start)
    reward = mnist_rewards.classifier_reward(realism=args.realism)
    real = mnist_metrics.features(mnist_data.split("heldout")[0])

    def digits_fid(latents: torch.Tensor) -> float:
        return mnist_metrics.frechet_distance(mnist_metrics.features(mnist_rewards._images(latents)), real)

    noise = torch.randn(args.eval, 4, 14, 14, generator=torch.Generator().manual_seed(EVAL_SEED))
    before = measure(nodes, model, positive, negative, start, noise, reward, real)
    print(f"start: reward {before['mean']:.4f} +- {before['se']:.4f}, FID {before['fid']:.3f}, "
          f"accuracy {before['accuracy']:.3f}", flush=True)  # fmt: skip
    runs = []
    for seed in args.seeds:
        config = rdpo_preset(args.preset, seed=seed, **given_options(ap, args, argv))
        t0 = time.time()
        params, curve = training.rdpo_on_model(
            model, positive, negative, CFG, torch.zeros(1, 4, 14, 14), start, config, reward=reward,
            metadata={"tool": "bench/rdpo.py", "model": "demo_models/mnist-eps", "cfg": CFG, "command": command},
            guard=digits_fid, guard_samples=args.guard_samples,
        )  # fmt: skip
        seconds = time.time() - t0
        after = measure(nodes, model, positive, negative, params, noise, reward, real)
        diff = after["scores"] - before["scores"]
        info = params.metadata["rdpo"]
        runs.append({
            "model": "mnist-eps", "reward": reward.__name__, "start": args.start.name, "nfe": 5, "cfg": CFG,
            "reward_start_mean": before["mean"], "reward_start_se": before["se"],
            "reward_end_mean": after["mean"], "reward_end_se": after["se"],
            "gain_paired_se": float(diff.std() / math.sqrt(len(diff))),
            "fid_start": before["fid"], "fid_end": after["fid"],
            "accuracy_start": before["accuracy"], "accuracy_end": after["accuracy"],
            "seeds": [seed], "preset": args.preset, "eval_noises": args.eval, "eval_seed": EVAL_SEED,
            "config": config.provenance(),
            "train_reward_first": curve[0], "train_reward_last": info["final_reward"],
            "kl_to_start": info["kl_to_start"],
            "guard": info["guard"], "stopped_at": info["stopped_at"], "seconds": round(seconds), "command": command,
        })  # fmt: skip
        print(f"seed {seed}: reward {after['mean']:.4f} +- {after['se']:.4f} (paired gain "
              f"{float(diff.mean()):.4f} +- {runs[-1]['gain_paired_se']:.4f}), FID {after['fid']:.3f}, accuracy "
              f"{after['accuracy']:.3f}, KL {info['kl_to_start']:.3g}, stopped {info['stopped_at']}, {seconds:.0f} s",
              flush=True)  # fmt: skip
        if args.save is not None and seed == args.seeds[0]:
            comfy_harness.pack_module("epd_core.files").save_params(params, args.save, overwrite=True)
        if args.grid is not None and seed == args.seeds[0]:
            from scripts.make_mnist_grid import grid

            per = min(10, len(noise) // 10)  # a row per digit, the same held-out noises left (start) and right
            panels = [digit_major(r["images"], per) for r in (before, after)]
            grid(panels, columns=per).save(args.grid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.is_file():
        runs = json.loads(args.out.read_text()) + runs
    write_atomic((json.dumps(runs, indent=1) + "\n").encode(), args.out, overwrite=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
