"""Sample the MNIST demo models with ComfyUI's KSampler and CFG, score them, and draw a grid of samples.

python -m scripts.make_mnist_grid                       # docs/mnist_samples.png, 100 samples per class per model
python -m scripts.make_mnist_grid --per-class 10 --out /tmp/grid.png

For each model (eps, flow) and digit 0-9: EmptyLatentImage 112x112, EPD MNIST Class (digit, and its no_class output
as negative), KSampler (``--sampler``, ``--steps``, ``--cfg``, scheduler normal, seed = digit), EPD MNIST Decode.
Prints the class accuracy (the classifier of ``epd_dev.mnist_metrics``) and the digits FID against the 1,000
held-out digits, next to the FID of as many real training digits and of uniform noise, and writes them as JSON
beside the grid. The grid shows the first 10 samples of each digit (rows) for each model (eps left, flow right).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from epd_dev import mnist_data, mnist_metrics
from scripts.train_mnist import KINDS, harness

ROOT = Path(__file__).resolve().parents[1]


def sample_model(kind: str, per_class: int, sampler: str, steps: int, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded samples ``[10 * per_class, 28, 28]`` in [0, 1] and their prompted digits."""
    h = harness()
    mn = h.pack_module("nodes.nodes_mnist")
    import nodes

    (model,) = mn.EPDMnistModel.execute(kind).result
    images, labels = [], []
    for digit in range(10):
        positive, negative = mn.EPDMnistClass.execute(str(digit)).result
        (latent,) = nodes.EmptyLatentImage().generate(112, 112, per_class)
        (out,) = nodes.KSampler().sample(model, digit, steps, cfg, sampler, "normal", positive, negative, latent)
        (decoded,) = mn.EPDMnistDecode.execute(out, 1).result
        images.append(decoded[..., 0])
        labels.append(torch.full((per_class,), digit))
    return torch.cat(images), torch.cat(labels)


def grid(panels: list[torch.Tensor], columns: int = 10, scale: int = 2, gap: int = 8) -> Image.Image:
    """Panels of ``[10 * n, 28, 28]`` images (digit-major) as one picture: a row per digit, ``columns`` per panel."""
    blocks = []
    for images in panels:
        per_class = len(images) // 10
        shown = min(columns, per_class)  # a row holds its own digit's samples only
        rows = [torch.cat(list(images[d * per_class : d * per_class + shown]), dim=1) for d in range(10)]
        blocks.append(torch.cat(rows, dim=0))
        blocks.append(torch.full((blocks[-1].shape[0], gap), 0.5))
    picture = torch.cat(blocks[:-1], dim=1)
    pixels = (picture.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="L")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--kinds", nargs="+", default=[k for k in KINDS if k != "classifier"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mnist_samples.png")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.per_class < 1:
        ap.error("--per-class must be at least 1")
    torch.set_num_threads(args.threads)
    classifier = mnist_metrics.load_classifier()
    held, _ = mnist_data.split("heldout")
    train, _ = mnist_data.split("train")
    n = 10 * args.per_class
    real = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]]
    noise = torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(0))
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "threads")},
        "fid_real_train_digits": mnist_metrics.digits_fid(real, held, classifier),
        "fid_noise": mnist_metrics.digits_fid(noise, held, classifier),
    }
    panels = []
    for kind in args.kinds:
        t0 = time.perf_counter()
        images, labels = sample_model(kind, args.per_class, args.sampler, args.steps, args.cfg)
        accuracy = mnist_metrics.class_accuracy(images, labels, classifier)
        per_class = [
            round(mnist_metrics.class_accuracy(images[labels == d], labels[labels == d], classifier), 3)
            for d in range(10)
        ]
        fid = mnist_metrics.digits_fid(images, held, classifier)
        report[kind] = {
            "accuracy": round(accuracy, 4),
            "accuracy_per_class": per_class,
            "fid": round(fid, 3),
            "sampling_s": round(time.perf_counter() - t0, 1),
        }
        print(f"{kind}: accuracy {accuracy:.4f} {per_class}, digits FID {fid:.3f}", flush=True)
        panels.append(images)
    print(f"real training digits FID {report['fid_real_train_digits']:.3f}, noise FID {report['fid_noise']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")  # the scores first: they cost most
    grid(panels).save(args.out)
    return report


if __name__ == "__main__":
    main()
