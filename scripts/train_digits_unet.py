"""Train the demo digits UNet (nodes/digits_model.py) on scikit-learn's bundled digits, on the CPU.

python scripts/train_digits_unet.py                                    # demo_models/digits-unet.safetensors
python scripts/train_digits_unet.py --quick --out /tmp/digits.safetensors   # a few iterations (the test)

The network is ComfyUI's own ``UNetModel``, built by the ComfyUI wrapper ``DigitsModel`` itself, and the loss is
the standard epsilon loss on exactly the parametrisation ComfyUI samples with: for a timestep ``t`` (continuous,
uniform in [0, 999]) ``sigma = model_sampling.sigma(t)`` (ComfyUI's ``ModelSamplingDiscrete``, SD1.5 linear
schedule), ``x = x0 + sigma * eps``, the network sees ``model_sampling.calculate_input(sigma, x)`` =
``x / sqrt(1 + sigma^2)`` and ``t``, and predicts ``eps``. The exported weights are an EMA of the trained ones.
Deterministic for a seed (same torch build and thread count; one thread by default). Needs scikit-learn
(requirements-dev.txt); the result is written atomically, with its command, seed, data and losses in the
safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_harness  # noqa: E402

DEFAULT_OUT = ROOT / "demo_models" / "digits-unet.safetensors"


def digits_module():
    """The pack's ``nodes.digits_model``, imported inside a real ComfyUI (CPU)."""
    comfy_harness.setup()
    return comfy_harness.pack_module("nodes.digits_model")


def init_weights(unet: torch.nn.Module) -> None:
    """ComfyUI builds its layers uninitialised: PyTorch's default init, and zero for the last conv of each
    residual branch and of the output (as in the original openaimodel), so training starts from eps = 0."""
    for module in unet.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm):
            if isinstance(module, base):
                base.reset_parameters(module)
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    zero = [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)] + [unet.out[-1]]
    with torch.no_grad():
        for conv in zero:
            conv.weight.zero_()
            conv.bias.zero_()


def eps_loss(unet, model_sampling, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Epsilon loss in ComfyUI's parametrisation (see the module docstring)."""
    sigma = model_sampling.sigma(t)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    pred = unet(model_sampling.calculate_input(sigma, x), t, transformer_options={})
    return torch.nn.functional.mse_loss(pred, eps)


def train(
    iterations: int, batch: int, lr: float, seed: int, ema_decay: float, log_every: int = 100
) -> tuple[dict[str, torch.Tensor], dict]:
    dm = digits_module()
    data, _ = dm.training_digits()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = dm.DigitsModel(device=torch.device("cpu"))
    unet, ms = model.diffusion_model, model.model_sampling
    init_weights(unet)
    unet.train()
    live = unet.state_dict()  # detached views of the parameters: they follow the optimiser's in-place updates
    ema = {k: v.clone() for k, v in live.items()}
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    warmup = max(1, min(100, iterations // 10))

    def schedule(i: int) -> float:  # linear warm-up, cosine decay to 5%
        if i < warmup:
            return (i + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iterations - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # a fixed evaluation batch (training digits, fixed t and noise): progress without the sampling noise
    eval_gen = torch.Generator().manual_seed(seed + 1)
    n_eval = 512
    eval_x0 = data[torch.randint(len(data), (n_eval,), generator=eval_gen)]
    eval_t = (torch.arange(n_eval) + 0.5) / n_eval * (ms.num_timesteps - 1)
    eval_eps = torch.randn(eval_x0.shape, generator=eval_gen)

    def evaluate(state: dict | None = None) -> float:
        saved = None
        if state is not None:
            saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
            unet.load_state_dict(state)
        unet.eval()
        with torch.no_grad():
            loss = sum(
                eps_loss(unet, ms, eval_x0[i : i + 128], eval_t[i : i + 128], eval_eps[i : i + 128]).item()
                for i in range(0, n_eval, 128)
            ) / math.ceil(n_eval / 128)
        if saved is not None:
            unet.load_state_dict(saved)
        unet.train()
        return loss

    eval_start = evaluate()
    losses = []
    t0 = time.perf_counter()
    for i in range(iterations):
        x0 = data[torch.randint(len(data), (batch,), generator=gen)]
        # stratified continuous timesteps over [0, 999]
        t = (torch.randperm(batch, generator=gen) + torch.rand(batch, generator=gen)) / batch * (ms.num_timesteps - 1)
        eps = torch.randn(x0.shape, generator=gen)
        loss = eps_loss(unet, ms, x0, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for k, v in live.items():
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
        losses.append(loss.item())
        if log_every and (i + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[train] {i + 1}/{iterations} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    tail = max(1, len(losses) // 10)
    stats = {
        "first_loss": sum(losses[:tail]) / tail,
        "final_loss": sum(losses[-tail:]) / tail,
        "eval_loss_start": eval_start,
        "eval_loss_final": evaluate(),
        "eval_loss_final_ema": evaluate(ema),
        "wall_time_s": round(wall, 1),
        "losses": losses,
    }
    return {k: v.contiguous() for k, v in ema.items()}, stats


def write_atomic(state: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the exported weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    ap.add_argument("--quick", action="store_true", help="30 iterations of batch 32 (for the test); needs --out")
    ap.add_argument("--out", type=Path, default=None, help=f"output file (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.quick:
        if args.out is None:
            ap.error("--quick needs --out (it never replaces the bundled weights)")
        args.iterations, args.batch = 30, 32
    out = args.out or DEFAULT_OUT
    torch.set_num_threads(args.threads)

    state, stats = train(args.iterations, args.batch, args.lr, args.seed, args.ema, log_every=0 if args.quick else 100)
    dm = digits_module()
    import sklearn

    metadata = {
        "format": dm.FORMAT,
        "unet_config": dm.config_json(),
        "sampling": json.dumps({"model_type": "EPS", **dm.SAMPLING_SETTINGS}),
        "command": shlex.join(["python", "scripts/train_digits_unet.py", *argv]),
        "seed": str(args.seed),
        "iterations": str(args.iterations),
        "batch": str(args.batch),
        "lr": str(args.lr),
        "ema_decay": str(args.ema),
        "threads": str(args.threads),
        "dataset": "sklearn.datasets.load_digits (1797 8x8 images, all used), bilinear to 16x16 in [-1, 1], "
        "pixel_unshuffle(2) to 4x8x8",
        "parametrisation": "eps loss; sigma = ModelSamplingDiscrete.sigma(t), t ~ U[0, 999] continuous (stratified); "
        "x = x0 + sigma*eps; input x/sqrt(1+sigma^2), timestep t",
        "final_loss": f"{stats['final_loss']:.5f}",
        "first_loss": f"{stats['first_loss']:.5f}",
        "eval_loss_start": f"{stats['eval_loss_start']:.5f}",
        "eval_loss_final": f"{stats['eval_loss_final']:.5f}",
        "eval_loss_final_ema": f"{stats['eval_loss_final_ema']:.5f}",
        "wall_time_s": str(stats["wall_time_s"]),
        "versions": f"torch {torch.__version__}, scikit-learn {sklearn.__version__}",
    }
    write_atomic(state, metadata, out)
    size = out.stat().st_size
    print(
        f"[train] wrote {out} ({size / 1e6:.2f} MB): loss {stats['first_loss']:.4f} -> {stats['final_loss']:.4f}, "
        f"eval {stats['eval_loss_start']:.4f} -> {stats['eval_loss_final']:.4f} "
        f"(EMA {stats['eval_loss_final_ema']:.4f}), {stats['wall_time_s']} s",
        flush=True,
    )
    return {**metadata, "path": str(out), "size": size, "losses": stats["losses"]}


if __name__ == "__main__":
    main()
