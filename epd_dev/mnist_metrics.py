"""MNIST metrics for the demo models: a small classifier trained here, class accuracy, and a "digits FID".

The classifier (``demo_models/mnist-classifier.safetensors``, defined in the pack's ``nodes/mnist_classifier.py``,
trained by ``python -m scripts.train_mnist --kind classifier``) is a plain PyTorch CNN; no ComfyUI needed.
Its penultimate layer (128 ReLU features) is the feature space of :func:`frechet_distance`, the Frechet distance
between Gaussians fitted to two sets of features, as FID does with Inception features; the reference set is the
1,000 held-out real digits.

Images are ``[N, 28, 28]`` grey levels in ``[0, 1]``, white digit on black (``nodes.mnist_model.latent_to_images``
of a sample, or ``mnist_data.split``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pack_module(name: str):
    """A plain-PyTorch module of the pack's ``nodes/`` by its file (``import nodes`` is ComfyUI's own module)."""
    spec = importlib.util.spec_from_file_location(f"epd_pack_{name}", ROOT / "nodes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_classifier = _pack_module("mnist_classifier")
Classifier, load_classifier = _classifier.Classifier, _classifier.load_classifier
CLASSIFIER, FORMAT, ARCHITECTURE, FEATURES = (_classifier.CLASSIFIER, _classifier.FORMAT, _classifier.ARCHITECTURE,
                                              _classifier.FEATURES)  # fmt: skip


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


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance (round-off's small negative eigenvalues taken as 0)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` in float64. The last trace is the sum of the
    singular values of ``S_a^1/2 S_b^1/2``: taking them directly, rather than square roots of the eigenvalues of
    its square, keeps the round-off of the (many) near-zero directions at 1e-13 instead of its square root."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two feature sets [N, D] of the same D and N >= 2, got {list(a.shape)}, {list(b.shape)}")
    mu_a, s_a = _gaussian(a)
    mu_b, s_b = _gaussian(b)
    cross = torch.linalg.svdvals(_psd_sqrt(s_a) @ _psd_sqrt(s_b)).sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def digits_fid(images: torch.Tensor, reference: torch.Tensor, classifier: Classifier | None = None) -> float:
    """The "digits FID" of ``images`` against ``reference`` images (both ``[N, 28, 28]`` in ``[0, 1]``)."""
    return frechet_distance(features(images, classifier), features(reference, classifier))
