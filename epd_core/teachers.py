"""Teacher solvers for distillation (the authors' choices), on any ``denoiser(x, sigma)``.

Each solves ``dx/dt = (x - D(x, t)) / t`` along a decreasing grid of positive
times and returns the state at every grid point (``[len(grid), *x.shape]``):

* ``heun``: EDM's second-order Heun (two calls per step);
* ``dpm2``: DPM-Solver-2, midpoint at the geometric mean of the two times (two calls per step);
* ``dpmpp2m``: DPM-Solver++(2M), multistep data prediction in ``lambda = -log t`` (one call per step).
"""

from __future__ import annotations

import torch

from .solver import Denoiser

__all__ = ["TEACHERS", "teacher_trajectory", "subdivide"]

TEACHERS = ("heun", "dpm2", "dpmpp2m")


def _d(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    denoised = denoiser(x, t.to(x.dtype).expand(x.shape[0]))
    return (x - denoised) / t.to(x.dtype), denoised


def teacher_trajectory(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, teacher: str = "heun") -> torch.Tensor:
    """States of the teacher solver at every point of ``grid`` (``grid[0]`` is the start)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    states = [x]
    prev_denoised: torch.Tensor | None = None
    for i in range(grid.shape[0] - 1):
        t, t_next = grid[i], grid[i + 1]
        h = (t_next - t).to(x.dtype)
        if teacher == "heun":
            d, _ = _d(denoiser, x, t)
            x_euler = x + h * d
            d_next, _ = _d(denoiser, x_euler, t_next)
            x = x + h * (d + d_next) / 2
        elif teacher == "dpm2":
            d, _ = _d(denoiser, x, t)
            t_mid = (t * t_next).sqrt()
            x_mid = x + (t_mid - t).to(x.dtype) * d
            d_mid, _ = _d(denoiser, x_mid, t_mid)
            x = x + h * d_mid
        else:
            _, denoised = _d(denoiser, x, t)
            ratio = (t_next / t).to(x.dtype)
            if prev_denoised is None:
                x = ratio * x + (1 - ratio) * denoised
            else:
                lam, lam_prev, lam_next = -torch.log(t), -torch.log(grid[i - 1]), -torch.log(t_next)
                r = ((lam - lam_prev) / (lam_next - lam)).to(x.dtype)
                d_mix = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev_denoised
                x = ratio * x + (1 - ratio) * d_mix
            prev_denoised = denoised
        states.append(x)
    return torch.stack(states)


def subdivide(grid: torch.Tensor, m: int) -> torch.Tensor:
    """Insert ``m`` points log-uniformly inside every interval of ``grid`` (the teacher's finer grid)."""
    log = torch.log(grid)
    parts = [
        torch.exp(log[i] + (log[i + 1] - log[i]) * torch.arange(m + 1, dtype=grid.dtype) / (m + 1))
        for i in range(grid.shape[0] - 1)
    ]
    return torch.cat(parts + [grid[-1:]])
