"""Classic one-step updates of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t``.

Shared by the distillation teachers (:mod:`epd_core.teachers`) and the analytic reference solutions
(:mod:`epd_core.analytic`), so each method is written once:

* :func:`euler_step` and :func:`heun_step` (EDM's second-order Heun, two calls);
* :func:`dpmpp_2m_update`: DPM-Solver++(2M) in ``lambda = -log t`` from x0
  predictions, first order without history and straight to ``denoised`` at ``t = 0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .solver import Denoiser

__all__ = ["derivative", "euler_step", "heun_step", "dpmpp_2m_update"]


def derivative(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - D(x, t)) / t`` and ``D(x, t)`` for one time ``t`` shared by the batch."""
    denoised = denoiser(x, t.to(x.dtype).expand(x.shape[0]))
    return (x - denoised) / t.to(x.dtype), denoised


def euler_step(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """``x + (t_next - t) * d(x, t)``."""
    return x + (t_next - t).to(x.dtype) * derivative(denoiser, x, t)[0]


def heun_step(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """EDM's Heun step: the mean of the slopes at ``x`` and at the Euler prediction."""
    h = (t_next - t).to(x.dtype)
    d, _ = derivative(denoiser, x, t)
    d_next, _ = derivative(denoiser, x + h * d, t_next)
    return x + h * (d + d_next) / 2


def dpmpp_2m_update(
    x: torch.Tensor,
    denoised: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    old_denoised: torch.Tensor | None = None,
    t_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) from ``t`` to ``t_next`` given ``denoised = D(x, t)`` and the previous step's prediction
    ``old_denoised`` at ``t_prev`` (first order without it)."""
    if t_next == 0:
        return denoised
    ratio = (t_next / t).to(x.dtype)
    if old_denoised is not None:
        lam, lam_prev, lam_next = -torch.log(t), -torch.log(t_prev), -torch.log(t_next)
        r = ((lam - lam_prev) / (lam_next - lam)).to(x.dtype)
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x + (1 - ratio) * denoised
