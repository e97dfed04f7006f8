"""The analytic mixture's denoiser against Tweedie's formula, isotropic and anisotropic (per-dimension spreads)."""

from __future__ import annotations

import math

import pytest
import torch

from epd_core import GaussianMixture

pytestmark = pytest.mark.core


def anisotropic(seed: int = 5) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) + torch.tensor([0.7, -0.5]).view(2, 1, 1)
    weights = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    std = torch.exp(torch.empty(5, 2, 3, 3, dtype=torch.float64).uniform_(math.log(0.1), math.log(0.8), generator=g))
    return GaussianMixture(means, weights, std)


def log_density(gm: GaussianMixture, x: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` for ``x = a x0 + n eps`` (summed over the batch), written out per component."""
    flat, mu = x.flatten(1), gm.means.flatten(1)
    std = gm.std.flatten(1) if isinstance(gm.std, torch.Tensor) else torch.full_like(mu, gm.std)
    var = a[:, None, None] ** 2 * std[None] ** 2 + n[:, None, None] ** 2  # [N, K, D]
    log_n = -0.5 * ((flat[:, None] - a[:, None, None] * mu[None]) ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
    return torch.logsumexp(torch.log(gm.weights)[None] + log_n, dim=1).sum()


def tweedie(gm: GaussianMixture, x: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``E[x0 | x] = (x + n^2 grad log p(x)) / a``."""
    x = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(log_density(gm, x, a, n), x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x.detach() + n.view(shape) ** 2 * score) / a.view(shape)


@pytest.mark.parametrize("kind", ["isotropic", "anisotropic"])
def test_denoisers_follow_tweedie(kind):
    gm = anisotropic()
    if kind == "isotropic":
        gm = GaussianMixture(gm.means, gm.weights, 0.4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, *gm.shape, generator=g, dtype=torch.float64) * 2  # more than one 512-sample chunk
    sigma = torch.exp(torch.empty(700, dtype=torch.float64).uniform_(-3, 3, generator=g))
    t = torch.empty(700, dtype=torch.float64).uniform_(0.02, 0.98, generator=g)
    assert torch.allclose(gm.denoise_ve(x, sigma), tweedie(gm, x, torch.ones_like(sigma), sigma), atol=1e-10)
    assert torch.allclose(gm.denoise_flow(x, t), tweedie(gm, x, 1 - t, t), atol=1e-10)


def test_shared_noise_levels_take_the_same_values():
    """A sampler's batch shares its noise level: those samples go through matrix products, the same values."""
    gm = anisotropic()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, *gm.shape, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.7, 9.0], dtype=torch.float64)[torch.randint(0, 3, (1024,), generator=g)]
    t = sigma / 10
    assert torch.allclose(gm.denoise_ve(x, sigma), tweedie(gm, x, torch.ones_like(sigma), sigma), atol=1e-10)
    assert torch.allclose(gm.denoise_flow(x, t), tweedie(gm, x, 1 - t, t), atol=1e-10)
    grad_sigma = sigma.clone().requires_grad_(True)  # a gradient to the levels takes the element-wise path
    assert torch.allclose(gm.denoise_ve(x, grad_sigma), gm.denoise_ve(x, sigma), atol=1e-12)


def test_equal_spreads_sample_as_the_isotropic_mixture():
    gm = GaussianMixture.reference()
    same = GaussianMixture(gm.means, gm.weights, torch.full_like(gm.means, gm.std))
    x = torch.randn(600, *gm.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    sigma = torch.linspace(0.01, 14.6, 600, dtype=torch.float64)
    assert torch.allclose(same.denoise_ve(x, sigma), gm.denoise_ve(x, sigma), atol=1e-11)
    assert torch.equal(same.component(x), gm.component(x))


def test_component_uses_each_components_spread():
    """A point nearer a tight component's mean than a broad one's can still be the broad one's."""
    means = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    gm = GaussianMixture(means, torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([[2.0], [0.05]]))
    x = torch.tensor([[0.6], [0.98]], dtype=torch.float64)
    assert gm.component(x).tolist() == [0, 1]
    assert GaussianMixture(means, gm.weights, 0.3).component(x).tolist() == [1, 1]
