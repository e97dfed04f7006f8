"""Teacher solvers for distillation (the authors' choices), on any ``denoiser(x, sigma)``.

Each solves ``dx/dt = (x - D(x, t)) / t`` along a decreasing grid of positive
times and returns the state at every grid point (``[len(grid), *x.shape]``):

* ``heun``: EDM's second-order Heun (two calls per step);
* ``dpm2``: DPM-Solver-2, midpoint at the geometric mean of the two times (two calls per step);
* ``dpmpp_2m``: DPM-Solver++(2M), multistep data prediction in ``lambda = -log t`` (one call per step).
"""

from __future__ import annotations

import torch

from .solver import Denoiser
from .updates import derivative, dpmpp_2m_update, heun_step

__all__ = ["TEACHERS", "teacher_trajectory", "teacher_end", "subdivide"]

TEACHERS = ("heun", "dpm2", "dpmpp_2m")


def teacher_trajectory(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, teacher: str = "heun") -> torch.Tensor:
    """States of the teacher solver at every point of ``grid`` (``grid[0]`` is the start)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    states = [x]
    old = None
    for i in range(grid.shape[0] - 1):
        t, t_next = grid[i], grid[i + 1]
        if teacher == "heun":
            x = heun_step(denoiser, x, t, t_next)
        elif teacher == "dpm2":
            t_mid = (t * t_next).sqrt()
            x_mid = x + (t_mid - t).to(x.dtype) * derivative(denoiser, x, t)[0]
            x = x + (t_next - t).to(x.dtype) * derivative(denoiser, x_mid, t_mid)[0]
        else:
            _, denoised = derivative(denoiser, x, t)
            x = dpmpp_2m_update(x, denoised, t, t_next, old, grid[i - 1] if i else None)
            old = denoised
        states.append(x)
    return torch.stack(states)


@torch.no_grad()
def teacher_end(
    denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, teacher: str, denoised: bool = False
) -> torch.Tensor:  # fmt: skip
    """The teacher's state at ``grid[-1]``; with ``denoised`` the model's answer there, the end a table fitted to
    finish on its last step's estimate is compared with."""
    end = teacher_trajectory(denoiser, x, grid, teacher)[-1]
    if denoised:
        end = denoiser(end, grid[-1].expand(x.shape[0]).to(x.device, x.dtype))
    return end


def subdivide(grid: torch.Tensor, m: int) -> torch.Tensor:
    """Insert ``m`` points log-uniformly inside every interval of ``grid`` (the teacher's finer grid)."""
    log = torch.log(grid)
    parts = [
        torch.exp(log[i] + (log[i + 1] - log[i]) * torch.arange(m + 1, dtype=grid.dtype, device=grid.device) / (m + 1))
        for i in range(grid.shape[0] - 1)
    ]
    return torch.cat(parts + [grid[-1:]])
