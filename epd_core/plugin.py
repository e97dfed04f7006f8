"""EPD as a plugin for another solver ("EPD-Plugin").

A base solver (Euler, DPM-Solver++(2M), iPNDM, ...) walks the grid and asks
for one x0 prediction per grid point. :class:`PluginDenoiser` answers the
request at grid point ``t_cur`` with the EPD ensemble's prediction::

    denoised_eff = x - t_cur * sum_k weight_k * scale_dir_k * d_k

(the K points in one batched call; for an ``ipndm`` table the points come from
Adams-Bashforth extrapolation of the past first directions). Euler's update
``x + (t_next - t_cur) * (x - denoised_eff) / t_cur`` is then exactly one EPD
step, and multistep bases combine EPD directions with their own history.

A request at the grid's last point (the step to sigma 0, if any) is a plain
model call. Any other request, between grid points or twice at the same point,
means the base evaluates the model several times per step: that would be a
different algorithm, so it raises :class:`PluginMisuse`.
"""

from __future__ import annotations

import torch

from .params import EPDParams
from .solver import Denoiser, epd_step, grid_offset

__all__ = ["PluginDenoiser", "PluginMisuse"]


class PluginMisuse(ValueError):
    """The base solver asked for a model evaluation the plugin cannot answer faithfully."""


class PluginDenoiser:
    """Stateful answer to a base solver's model calls along ``sigmas`` (one sampling run)."""

    def __init__(self, params: EPDParams, sigmas: torch.Tensor, parallel: bool | int = True) -> None:
        self.params = params
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        self.offset, self.to_zero = grid_offset(params, self.sigmas)
        self.grid = self.sigmas[:-1] if self.to_zero else self.sigmas
        self.table = params.decoded(torch.float64)
        self.parallel = parallel
        self.history: list[torch.Tensor] = []
        self.next_index = 0

    def _index(self, sigma: torch.Tensor) -> int:
        s = sigma.detach().reshape(-1).to("cpu", torch.float64)
        if not torch.allclose(s, s[:1].expand_as(s)):
            raise PluginMisuse("EPD Plugin needs one sigma for the whole batch")
        match = torch.isclose(self.grid, s[:1].expand_as(self.grid), rtol=1e-5, atol=0.0).nonzero()
        if match.numel() == 0:
            raise PluginMisuse(
                f"the base sampler evaluated the model at sigma {float(s[0]):.6g}, between the table's grid points; "
                "it takes several model calls per step, which EPD Plugin does not support"
            )
        return int(match[0, 0])

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i = self._index(sigma)
        if i != self.next_index:
            raise PluginMisuse(
                f"the base sampler evaluated grid point {i} when point {self.next_index} was due; "
                "EPD Plugin supports samplers with exactly one model call per step"
            )
        self.next_index += 1
        last = i == self.grid.shape[0] - 1
        if last:
            return denoiser(x, sigma)
        step = self.offset + i
        t_cur, t_next = self.grid[i], self.grid[i + 1]
        afs = self.params.afs and step == 0
        d_eff, self.history = epd_step(
            denoiser, x, t_cur, t_next, self.table, step, self.params, self.history, afs, self.parallel
        )
        return x - t_cur.to(x.dtype) * d_eff
