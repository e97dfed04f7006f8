"""The MNIST RDPO rewards on real held-out digits: prompt adherence and realism tell right from wrong."""

from __future__ import annotations

import pytest
import torch

from epd_dev import mnist_data, mnist_rewards

pytestmark = pytest.mark.core


def _latents(images: torch.Tensor) -> torch.Tensor:
    """Digits ``[N, 28, 28]`` in [0, 1] as the MNIST models' latents ``[N, 4, 14, 14]``."""
    return torch.nn.functional.pixel_unshuffle(images[:, None] * 2 - 1, 2)


@pytest.fixture(scope="module")
def digits():
    """Ten held-out digits of each class, ordered so that sample j shows digit j % 10 (as a prompt batch)."""
    images, labels = mnist_data.split("heldout")
    order = torch.stack([torch.nonzero(labels == d)[:10, 0] for d in range(10)], 1).reshape(-1)
    return images[order], labels[order]


def test_classifier_reward_is_the_log_probability_of_the_prompted_digit(digits):
    images, labels = digits
    assert torch.equal(labels, torch.arange(100) % 10)
    latents = _latents(images)
    assert torch.allclose(mnist_rewards._images(latents), images, atol=1e-6)
    right = mnist_rewards.classifier_reward()
    wrong = mnist_rewards.classifier_reward(classes=[(d + 1) % 10 for d in range(10)])
    r, w = right(latents, None), wrong(latents, None)
    assert right.__name__ == "classifier" and r.shape == (100,) and (r <= 0).all()
    assert float(r.mean()) > -0.2 and float(w.mean()) < -5, (float(r.mean()), float(w.mean()))
    # five prompts: sample j is scored against digit j % 5 of the list
    five = mnist_rewards.classifier_reward(classes=[0, 1, 2, 3, 4])(latents[:5], None)
    torch.testing.assert_close(five, r[:5])


def test_realism_prefers_real_digits_to_noise_and_negatives(digits):
    images, _ = digits
    reward = mnist_rewards.classifier_reward(realism=1.0)
    plain = mnist_rewards.classifier_reward()
    real = reward(_latents(images), None) - plain(_latents(images), None)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    # (a 5x5 blur is not caught: the classifier's features of blurred digits stay typical)
    fake = [reward(_latents(x), None) - plain(_latents(x), None) for x in (noise, 1 - images)]
    assert reward.__name__ == "classifier+realism1"
    assert -3 < float(real.mean()) < -0.2, float(real.mean())
    for f in fake:
        assert float(f.mean()) < 4 * float(real.mean()), (float(f.mean()), float(real.mean()))
