"""An exact denoiser: the posterior mean of a Gaussian mixture with diagonal covariances.

For data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` the optimal denoiser is known
in closed form, so a solver's error against the exact ODE solution can be
measured. Two forms, each ``x = a x0 + n eps``:

* variance exploding, ``x = x0 + sigma * eps``: ``a = 1``, ``n = sigma``;
* rectified flow, ``x = (1 - t) * x0 + t * eps``: ``a = 1 - t``, ``n = t``.

With ``var_k = a^2 s_k^2 + n^2`` (per dimension),
``g_k ∝ w_k N(x; a mu_k, diag(var_k))`` and
``E[x0 | x] = sum_k g_k (mu_k + (a s_k^2 / var_k) (x - a mu_k))``. The
bundled mixtures are isotropic (one ``s`` for all); a tensor ``std`` of shape
``[K, *shape]`` gives each component its own spread per dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .schedules import polynomial
from .updates import euler_step, heun_step

if TYPE_CHECKING:
    from .solver import Denoiser

__all__ = ["GaussianMixture", "MIXTURES", "heun", "rk4", "ode_endpoint", "ode_state"]

MIXTURES = ("reference", "wide", "multimodal")


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture components ``means [K, *shape]``, ``weights [K]`` and ``std``: one float shared by every component
    and dimension (isotropic), or a tensor ``[K, *shape]`` (anisotropic)."""

    means: torch.Tensor
    weights: torch.Tensor
    std: float | torch.Tensor

    @classmethod
    def reference(cls, dtype: torch.dtype = torch.float64) -> GaussianMixture:
        """The mixture of ``shared/epd_reference/gmm.safetensors``: 8 components over ``[4, 8, 8]``."""
        g = torch.Generator().manual_seed(1234)
        means = torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64) * 0.8
        logits = torch.randn(8, generator=g, dtype=torch.float64) * 0.5
        return cls(means.to(dtype), torch.softmax(logits, 0).to(dtype), 0.3)

    @classmethod
    def named(cls, name: str) -> GaussianMixture:
        """``reference`` (8 modes, std 0.3), ``wide`` (8 modes, std 0.6, closer to real data's spread) or
        ``multimodal`` (32 modes, std 0.2, harder)."""
        if name == "reference":
            return cls.reference()
        if name not in MIXTURES:
            raise ValueError(f"unknown mixture {name!r}; expected one of {MIXTURES}")
        g = torch.Generator().manual_seed({"wide": 4321, "multimodal": 777}[name])
        k = 8 if name == "wide" else 32
        means = torch.randn(k, 4, 8, 8, generator=g, dtype=torch.float64) * (0.6 if name == "wide" else 1.0)
        weights = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64) * 0.5, 0)
        return cls(means, weights, 0.6 if name == "wide" else 0.2)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample (``[C, H, W]``)."""
        return tuple(self.means.shape[1:])

    @property
    def isotropic(self) -> bool:
        """Whether every component has one scalar standard deviation."""
        return not isinstance(self.std, torch.Tensor)

    def _posterior_mean(self, x: torch.Tensor, a: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        mu = self.means.reshape(self.means.shape[0], -1).to(x)
        a = a.to(x).reshape(n, 1)
        noise_var = noise_var.to(x).reshape(n, 1)
        if not self.isotropic:
            return self._posterior_mean_diagonal(flat, mu, a, noise_var).reshape(x.shape)
        var = a**2 * self.std**2 + noise_var
        # |x - a mu_k|^2 = |x|^2 - 2 a x.mu_k + a^2 |mu_k|^2; the |x|^2 term cancels in the softmax
        dist = a**2 * (mu**2).sum(1)[None] - 2 * a * (flat @ mu.T)  # [N, K]
        g = torch.softmax(torch.log(self.weights.to(x))[None] - dist / (2 * var), dim=1)
        shrink = a * self.std**2 / var  # each component's posterior: mu_k + shrink * (x - a mu_k)
        return (shrink * flat + (1 - shrink * a) * (g @ mu)).reshape(x.shape)

    def _posterior_mean_diagonal(self, flat, mu, a, noise_var, chunk: int = 512) -> torch.Tensor:
        """The anisotropic case. Samples that share a noise level (a sampler's batch, EPD's K points) go through
        matrix products per level; with many levels or a gradient to the levels, element-wise ``[chunk, K, D]``."""
        s2 = self.std.reshape(mu.shape).to(flat) ** 2
        log_w = torch.log(self.weights.to(flat))
        levels, index = torch.unique(torch.cat([a, noise_var], 1).detach(), dim=0, return_inverse=True)
        if len(levels) * 64 <= flat.shape[0] and not (a.requires_grad or noise_var.requires_grad):
            out = torch.empty_like(flat)
            for j, (aj, vj) in enumerate(levels):
                rows = index == j
                f, prec = flat[rows], 1 / (aj**2 * s2 + vj)  # [n, D], [K, D]
                # sum_d (x - a mu)^2 / var + log var, expanded into products over d
                quad = f**2 @ prec.T - 2 * aj * f @ (mu * prec).T + (aj**2 * mu**2 * prec - torch.log(prec)).sum(1)
                g = torch.softmax(log_w[None] - 0.5 * quad, dim=1)  # [n, K]
                shrink = aj * s2 * prec  # each component's posterior: mu_k + shrink_k * (x - a mu_k)
                out[rows] = g @ (mu - aj * shrink * mu) + f * (g @ shrink)
            return out
        out = []
        for i in range(0, flat.shape[0], chunk):
            f, ai, ni = flat[i : i + chunk, None], a[i : i + chunk, :, None], noise_var[i : i + chunk, :, None]
            var = ai**2 * s2[None] + ni  # [c, K, D]
            r = f - ai * mu[None]
            g = torch.softmax(log_w[None] - 0.5 * (r**2 / var + torch.log(var)).sum(-1), dim=1)  # [c, K]
            out.append(torch.einsum("ck,ckd->cd", g, mu[None] + ai * s2[None] / var * r))
        return torch.cat(out)

    def denoise_ve(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x0 + sigma * eps = x]`` with one ``sigma`` per sample."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self._posterior_mean(x, torch.ones_like(sigma), sigma**2)

    def denoise_flow(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``E[x0 | (1 - t) x0 + t eps = x]`` with one ``t`` per sample."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self._posterior_mean(x, 1 - t, t**2)

    def component(self, x0: torch.Tensor) -> torch.Tensor:
        """Which mode each sample landed in: the nearest component mean, measured in each component's own spread
        when they differ (the component of highest density, ignoring the weights)."""
        flat = x0.reshape(x0.shape[0], -1)
        mu = self.means.reshape(self.means.shape[0], -1).to(flat)
        if self.isotropic:
            return torch.cdist(flat, mu).argmin(dim=1)
        s2 = self.std.reshape(mu.shape).to(flat) ** 2
        out = []
        for f in flat.split(512):
            log_p = -0.5 * ((f[:, None] - mu[None]) ** 2 / s2[None] + torch.log(s2[None])).sum(-1)
            out.append(log_p.argmax(dim=1))
        return torch.cat(out)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianMixture:
        """The same mixture with its tensors on ``device`` / in ``dtype``."""
        std = self.std if self.isotropic else self.std.to(device=device, dtype=dtype)
        return GaussianMixture(
            self.means.to(device=device, dtype=dtype), self.weights.to(device=device, dtype=dtype), std
        )

    def clone(self) -> GaussianMixture:
        """Ordinary copies of the tensors (a mixture made under inference mode can then take part in autograd)."""
        std = self.std if self.isotropic else self.std.clone()
        return GaussianMixture(self.means.clone(), self.weights.clone(), std)


def heun(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, order: int = 2) -> torch.Tensor:
    """Euler (``order=1``) or Heun (``order=2``) steps of ``dx/dt = (x - D(x, t)) / t`` along ``grid``."""
    step = heun_step if order == 2 else euler_step
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = step(denoiser, x, t_cur, t_next)
    return x


def rk4(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Classic fourth-order Runge-Kutta steps of ``dx/dt = (x - D(x, t)) / t`` along ``grid`` (midpoints in t)."""
    n = x.shape[0]

    def f(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (y - denoiser(y, t.expand(n))) / t

    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        h, t_mid = t_next - t_cur, (t_cur + t_next) / 2
        k1 = f(x, t_cur)
        k2 = f(x + h / 2 * k1, t_mid)
        k3 = f(x + h / 2 * k2, t_mid)
        k4 = f(x + h * k3, t_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def ode_endpoint(
    denoiser: Denoiser, x: torch.Tensor, sigma_max: float, steps: int = 2000, sigma_min: float = 1e-4
) -> torch.Tensor:
    """The probability-flow ODE solution at sigma 0 (VE form), by Heun on an EDM (rho 7) grid in float64.

    Accurate to far below solver errors for the mixtures here; compare two ``steps`` values to check.
    """
    x = ode_state(denoiser, x, sigma_max, sigma_min, steps)
    return denoiser(x, torch.tensor(sigma_min, dtype=torch.float64).expand(x.shape[0]))


def ode_state(
    denoiser: Denoiser, x: torch.Tensor, sigma_max: float, sigma_end: float, steps: int = 2000
) -> torch.Tensor:
    """The probability-flow ODE's state at ``sigma_end`` > 0 (VE form), by Heun on an EDM (rho 7) grid in
    float64: the exact end of a solver that stops there."""
    return heun(denoiser, x.to(torch.float64), polynomial(steps, sigma_end, sigma_max, 7.0))


# The table settings (EPDParams.start keywords) of each form of the analytic model: its schedule and backend.
ANALYTIC_FORMS = {
    "edm": dict(schedule_type="polynomial", schedule_rho=7.0, backend="edm"),
    "sd15": dict(schedule_type="discrete", schedule_rho=1.0, backend="ldm"),
    "sd3": dict(schedule_type="flowmatch", schedule_rho=1.0, backend="sd3", flowmatch_shift=3.0),
    "flux": dict(schedule_type="flowmatch", schedule_rho=1.0, backend="flux", flowmatch_mu=1.15),
}
