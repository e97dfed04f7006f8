"""RDPO rewards on the class-conditional MNIST models: prompt adherence from the classifier, and realism.

Both follow the reward interface of ``nodes.rewards`` / ``epd_core.rdpo``: ``reward(latents, context) -> [B]``,
higher is better, on the rollouts' final latents (the MNIST models' latent format is the identity, so the
LATENT-format latents a ComfyUI reward gets are the denoiser's own). Rollout ``j`` was prompted with
``classes[j % len(classes)]``: ComfyUI tiles a conditioning batch over the latent batch by index, and EPD MNIST
Class "0-9" is the batch of the ten digits.

* ``classifier``: ``log p(prompted class | image)`` under :mod:`epd_dev.mnist_metrics`' classifier.
* ``realism``: the per-sample part of the digits FID's Gaussian model: ``-d^2 / D`` with ``d`` the Mahalanobis
  distance of the image's classifier features (``D`` = 128) to a Gaussian fitted to the 9,000 *training* digits
  (the held-out digits stay for the FID). About -1 for real digits; it falls for images off the real-digit
  feature distribution, which a reward that only asks for the class could push samples to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import mnist_data, mnist_metrics

Reward = Callable[[torch.Tensor, Any], torch.Tensor]
DIGITS = tuple(range(10))


def _images(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, 4, 14, 14]`` (grey levels in [-1, 1], pixel-unshuffled) as images ``[B, 28, 28]`` in [0, 1]."""
    grey = torch.nn.functional.pixel_shuffle(latents.float().cpu(), 2)[:, 0]
    return ((grey + 1) / 2).clamp(0, 1)


class FeatureGaussian:
    """A Gaussian over classifier features (shrunk towards a multiple of the identity so it inverts)."""

    def __init__(self, feats: torch.Tensor, shrink: float = 1e-3) -> None:
        feats = feats.double()
        self.mean = feats.mean(0)
        centred = feats - self.mean
        cov = centred.T @ centred / (len(feats) - 1)
        cov = cov + shrink * cov.trace() / len(cov) * torch.eye(len(cov), dtype=cov.dtype)
        self.precision = torch.linalg.inv(cov)

    def realism(self, feats: torch.Tensor) -> torch.Tensor:
        d = feats.double() - self.mean
        return -((d @ self.precision) * d).sum(-1) / d.shape[-1]


def classifier_reward(
    classes: Sequence[int] = DIGITS, realism: float = 0.0, classifier: mnist_metrics.Classifier | None = None
) -> Reward:
    """``log p(classes[j % C] | image_j) + realism * realism_j`` (see the module docstring); named
    ``classifier`` or ``classifier+realism<weight>``."""
    net = mnist_metrics._default(classifier)
    labels = torch.tensor(list(classes), dtype=torch.int64)
    gauss = FeatureGaussian(mnist_metrics.features(mnist_data.split("train")[0], net)) if realism else None

    def reward(latents: torch.Tensor, context: Any) -> torch.Tensor:
        with torch.no_grad():
            images = _images(latents)
            feats = net.features(images)
            logp = torch.log_softmax(net.fc2(feats), -1)
            prompted = labels[torch.arange(len(images)) % len(labels)]
            score = logp.gather(1, prompted[:, None])[:, 0].double()
            if gauss is not None:
                score = score + realism * gauss.realism(feats)
        return score.to(latents.device)

    reward.__name__ = f"classifier+realism{realism:g}" if realism else "classifier"
    return reward
