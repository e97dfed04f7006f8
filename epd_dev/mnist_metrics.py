"""MNIST metrics for the demo models: a small classifier trained here, class accuracy, and a "digits FID".

The classifier (``demo_models/mnist-classifier.safetensors``, trained by ``python -m scripts.train_mnist --kind
classifier`` on the 9,000 training digits of ``epd_dev.mnist_data``) is a plain PyTorch CNN; no ComfyUI needed.
Its penultimate layer (128 ReLU features) is the feature space of :func:`frechet_distance`, the Frechet distance
between Gaussians fitted to two sets of features, as FID does with Inception features; the reference set is the
1,000 held-out real digits.

Images are ``[N, 28, 28]`` grey levels in ``[0, 1]``, white digit on black (``nodes.mnist_model.latent_to_images``
of a sample, or ``mnist_data.split``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "demo_models" / "mnist-classifier.safetensors"
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
        raise FileNotFoundError(f"{path} not found; train it with python -m scripts.train_mnist --kind classifier")
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


_LOADED: dict[str, Classifier] = {}


def _default(classifier: Classifier | None) -> Classifier:
    if classifier is not None:
        return classifier
    if "default" not in _LOADED:
        _LOADED["default"] = load_classifier()
    return _LOADED["default"]


def features(images: torch.Tensor, classifier: Classifier | None = None, batch: int = 500) -> torch.Tensor:
    """Penultimate features ``[N, 128]`` (float64) of images ``[N, 28, 28]`` in ``[0, 1]``."""
    net = _default(classifier)
    with torch.no_grad():
        return torch.cat([net.features(images[i : i + batch]) for i in range(0, len(images), batch)]).double()


def predict(images: torch.Tensor, classifier: Classifier | None = None, batch: int = 500) -> torch.Tensor:
    """Predicted classes ``[N]`` of images ``[N, 28, 28]``."""
    net = _default(classifier)
    with torch.no_grad():
        return torch.cat([net(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier | None = None) -> float:
    """Share of ``images`` that the classifier labels as ``labels`` (the prompted classes)."""
    return (predict(images, classifier) == labels.to(torch.int64)).double().mean().item()


def _gaussian(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = feats.double()
    mean = feats.mean(0)
    centred = feats - mean
    return mean, centred.T @ centred / max(1, len(feats) - 1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (symmetric PSD square roots, float64)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two feature sets [N, D] of the same D and N >= 2, got {list(a.shape)}, {list(b.shape)}")
    mu_a, s_a = _gaussian(a)
    mu_b, s_b = _gaussian(b)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root_a @ s_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def digits_fid(images: torch.Tensor, reference: torch.Tensor, classifier: Classifier | None = None) -> float:
    """The "digits FID" of ``images`` against ``reference`` images (both ``[N, 28, 28]`` in ``[0, 1]``)."""
    return frechet_distance(features(images, classifier), features(reference, classifier))
