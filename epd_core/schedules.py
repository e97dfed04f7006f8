"""Time grids, exactly as the authors build them.

Variance-exploding notation throughout: ``x = x0 + sigma * eps`` (``edm``,
``ldm``) or rectified flow ``x = (1 - t) * x0 + t * eps`` (``sd3``, ``flux``),
where the grid holds ``sigma`` or ``t``. Grids are largest first and end at
``sigma_min > 0`` with no trailing zero, as in the authors' sampler.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .params import EPDParams

__all__ = [
    "training_grid",
    "DEFAULT_FLOW_SHIFT",
    "SCHEDULE_TYPES",
    "sd15_alphas_cumprod",
    "DiscreteVP",
    "polynomial",
    "logsnr",
    "time_uniform",
    "discrete",
    "flowmatch",
    "make_schedule",
    "default_sigma_range",
]

SCHEDULE_TYPES = ("polynomial", "logsnr", "time_uniform", "discrete", "flowmatch")


def sd15_alphas_cumprod() -> torch.Tensor:
    """The Stable Diffusion 1.x/2.x/XL training schedule ("scaled linear", 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with linear extrapolation (DPM-Solver's ``interpolate_fn``)."""
    idx = torch.searchsorted(xp, x.clamp(min=xp[0], max=xp[-1])).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class DiscreteVP:
    """Continuous time over a discrete ``alphas_cumprod`` (DPM-Solver's ``NoiseScheduleVP('discrete')``).

    ``log_alpha(t)`` is piecewise linear through ``t_i = (i + 1) / N``,
    ``log_alpha_i = 0.5 * log(alphas_cumprod[i])``; ``sigma(t) = sqrt(1 - alpha^2) / alpha``.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1)")
        n = ac.numel()
        self.t_array = torch.arange(1, n + 1, dtype=torch.float64) / n
        self.log_alpha_array = 0.5 * torch.log(ac)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at the continuous time ``t`` in ``(0, 1]``, interpolating ``log(alpha)``."""
        log_alpha = _interp(torch.as_tensor(t, dtype=torch.float64), self.t_array, self.log_alpha_array)
        return torch.sqrt(torch.expm1(-2.0 * log_alpha))

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous time in ``(0, 1]`` of ``sigma`` (the inverse of :meth:`sigma`)."""
        log_alpha = -0.5 * torch.log1p(torch.as_tensor(sigma, dtype=torch.float64) ** 2)
        return _interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous index in ``[0, N - 1]`` matching ``sigma`` (model timestep units)."""
        return self.sigma_inv(sigma) * len(self.t_array) - 1.0


def polynomial(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule: uniform in ``sigma ** (1 / rho)``."""
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def logsnr(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in ``log sigma`` (DPM-Solver's uniform logSNR)."""
    return torch.exp(-torch.linspace(-math.log(sigma_max), -math.log(sigma_min), n, dtype=torch.float64))


def time_uniform(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Uniform in the time of the equivalent VP-SDE (linear beta), with ``epsilon_s = 1e-3``."""
    eps_s = 1e-3
    log_min = math.log(sigma_min**2 + 1)
    log_max = math.log(sigma_max**2 + 1)
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    beta_min = log_max - 0.5 * beta_d
    i = torch.arange(n, dtype=torch.float64)
    t = (1 + i / (n - 1) * (eps_s ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


def discrete(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, alphas_cumprod: torch.Tensor | None = None
) -> torch.Tensor:
    """Uniform in the continuous VP time of a discrete model (LDM / Stable Diffusion).

    The authors' formula raises only the end point to ``1 / rho``; for the
    released ``rho = 1`` tables that is plain uniform spacing.
    """
    vp = DiscreteVP(sd15_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    t_min = vp.sigma_inv(torch.tensor(sigma_min, dtype=torch.float64))
    t_max = vp.sigma_inv(torch.tensor(sigma_max, dtype=torch.float64))
    i = torch.arange(n, dtype=torch.float64)
    return vp.sigma((t_max + i / (n - 1) * (t_min ** (1 / rho) - t_max)) ** rho)


def _shift(sigma: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigma / (1 + (shift - 1) * sigma)


DEFAULT_FLOW_SHIFT = 3.0  # SD3's static shift: a flow grid's where neither the table nor the model gives one


def _time_shift(mu: float, sigma: np.ndarray) -> np.ndarray:
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flowmatch(
    n: int, shift: float | None = DEFAULT_FLOW_SHIFT, mu: float | None = None, base_sigma_min: float = 1e-3
) -> torch.Tensor:
    """diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` without the trailing 0.

    * static shift (SD3): the scheduler's ``sigma_min`` is already shifted
      and gets shifted once more, so the grid ends near ``0.0089`` for shift 3;
    * dynamic shift (FLUX, ``mu`` given): base grid ``linspace(1, base_sigma_min, n)``
      mapped through ``exp(mu) / (exp(mu) + (1 / t - 1))``.

    The scheduler works in float32; that rounding is kept.
    """
    if mu is not None:
        base = np.linspace(1.0, base_sigma_min, n)
        sigmas = _time_shift(mu, base)
    else:
        if shift is None:
            raise ValueError("flowmatch needs a shift or a mu")
        train = np.linspace(1, 1000, 1000, dtype=np.float64)[::-1].copy() / 1000
        train = torch.from_numpy(_shift(train, shift)).to(torch.float32)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        base = np.linspace(sigma_max * 1000, sigma_min * 1000, n) / 1000
        sigmas = _shift(base, shift)
    return torch.from_numpy(np.asarray(sigmas)).to(torch.float32).to(torch.float64)


def default_sigma_range(backend: str, alphas_cumprod: torch.Tensor | None = None) -> tuple[float, float]:
    """The ``(sigma_min, sigma_max)`` the authors use for a backend when a table does not say."""
    if backend in ("ldm", "sd15", "discrete"):
        vp = DiscreteVP(sd15_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
        ends = vp.sigma(torch.tensor([1e-3, 1.0], dtype=torch.float64))
        return float(ends[0]), float(ends[1])
    if backend in ("sd3", "flux"):
        return 1e-3, 1.0
    return 0.002, 80.0


def make_schedule(
    params: EPDParams,
    num_steps: int | None = None,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    shift: float | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The time grid (float64, ``num_steps`` points, largest first) for an :class:`EPDParams`.

    Arguments override what the table records: the number of steps, the
    sigma range, a model's ``alphas_cumprod`` (``discrete``), and a flow
    model's ``shift`` or ``mu`` (``flowmatch``). A table that carries its own
    grid (``params.t_steps``) returns it unless ``num_steps`` differs.
    """
    n = params.num_steps if num_steps is None else int(num_steps)
    if n < 2:
        raise ValueError(f"a schedule needs at least 2 points, got {n}")
    if params.t_steps is not None and n == params.num_steps and sigma_min is None and sigma_max is None:
        return params.t_steps.to(torch.float64).clone()
    kind = params.schedule_type
    rho = float(params.schedule_rho)
    if kind == "flowmatch":
        if sigma_min is not None or sigma_max is not None:
            raise ValueError(
                "a flowmatch grid runs from sigma 1 by its shift or mu; sigma_min / sigma_max do not apply"
            )
        if mu is None and shift is None:
            mu, shift = params.flowmatch_mu, params.flowmatch_shift or DEFAULT_FLOW_SHIFT
        if not (mu is not None and math.isfinite(mu) or mu is None and shift is not None and shift > 0):
            raise ValueError(f"a flowmatch grid needs a finite mu or a positive shift, got mu {mu}, shift {shift}")
        return flowmatch(n, shift=shift, mu=mu)
    lo, hi = default_sigma_range(params.backend, alphas_cumprod)
    lo = sigma_min if sigma_min is not None else params.sigma_min if params.sigma_min is not None else lo
    hi = sigma_max if sigma_max is not None else params.sigma_max if params.sigma_max is not None else hi
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
    if kind == "polynomial":
        return polynomial(n, lo, hi, rho)
    if kind == "logsnr":
        return logsnr(n, lo, hi)
    if kind == "time_uniform":
        return time_uniform(n, lo, hi, rho)
    if kind == "discrete":
        return discrete(n, lo, hi, rho, alphas_cumprod)
    raise ValueError(f"unknown schedule_type {kind!r}; expected one of {SCHEDULE_TYPES}")


def training_grid(params: EPDParams, grid: Any = None) -> torch.Tensor:
    """The time points a training run walks (float64, a copy: a grid made under inference mode can be saved for
    backward): the table's own schedule, or ``grid``, checked to be its ``num_steps`` positive, strictly decreasing
    sigmas (a sampling grid's final 0 is not one of them)."""
    if grid is None:
        return make_schedule(params)
    g = torch.as_tensor(grid, dtype=torch.float64).detach().clone()
    n = params.num_steps
    if g.ndim != 1:
        raise ValueError(f"the grid must be a 1-D sequence of sigmas, got shape {tuple(g.shape)}")
    if g.shape[0] and float(g[-1]) == 0.0:
        raise ValueError(f"the grid ends in 0 (a sampling grid): training walks the table's {n} time points, give "
                         "them without the final 0")  # fmt: skip
    if g.shape[0] != n:
        raise ValueError(f"the grid has {g.shape[0]} points; the table has {n}")
    if not bool(torch.isfinite(g).all() and (g > 0).all() and (g[1:] < g[:-1]).all()):
        raise ValueError("the grid's sigmas must be finite, positive and strictly decreasing")
    return g
