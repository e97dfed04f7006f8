"""EPD as a plugin for another solver ("EPD-Plugin").

A base solver (Euler, DPM-Solver++(2M), iPNDM, ...) walks the grid and asks for one x0 prediction per grid
point. At grid point ``t_cur`` :class:`PluginDenoiser` takes one EPD step (the authors' EPD-Plugin):

1. the plain prediction ``D(x, t_cur)`` (the first round; none on an AFS first step, nor on a ``carry`` table's
   later steps, whose ``d`` is the direction carried from the previous step) and its direction ``d``;
2. the K points are placed on a proposed step, ``x_k = x + (tau_k - t_cur) * direction``, and evaluated in one
   batched call (the second round). The table says which method proposes it (:func:`table_placement`): a table
   distilled for a base (``DistillConfig.plugin_base``) uses that base's own update, fed the plain predictions
   of the past grid points (the history it is made for); an EPD table uses Euler's direction ``d``; an
   ``ipndm`` table its own Adams-Bashforth extrapolation (the authors' EPD-Plugin);
3. the step is EPD's: ``x_next = x + (t_next - t_cur) * sum_k weight_k * scale_dir_k * d_k``;
4. the answer is the x0 for which the base's own update, with the base's own history, lands on ``x_next``
   (:meth:`epd_core.bases.Base.answer`; over Euler that is the ensemble's ``x - t_cur * sum_k w_k c_k d_k``).

So the trajectory is the table's EPD trajectory over every supported base, taken by the base's own update
with its own history: **Euler + plugin is exactly the EPD solver**, and so is dpmpp_2m + plugin with an EPD
table (the wrapped sampler's update and history stay consistent; a multistep base no longer adds its history
correction on top of a step that already integrates the interval).

A request at the grid's last point (the step to sigma 0, if any) is answered so that the base lands on the plain
prediction there (``final = "denoise"``, one more call) or on the last EPD step's own x0 estimate (``"estimate"``,
no call, as :func:`epd_core.solver.sample`). Any other request, between grid points or twice at the same point,
means the base evaluates the model several times per step: that would be a different algorithm, so it raises
:class:`PluginMisuse`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bases import Base, placement, table_placement, table_placer
from .params import EPDParams
from .solver import FINAL_STEPS, Denoiser, epd_step, grid_offset

__all__ = ["PluginDenoiser", "PluginMisuse", "placement", "table_placement"]


class PluginMisuse(ValueError):
    """The base solver asked for a model evaluation the plugin cannot answer faithfully."""


class PluginDenoiser:
    """Stateful answer to a base solver's model calls along ``sigmas`` (one sampling run); ``final`` and
    ``finish`` as in :func:`~epd_core.solver.sample`."""

    def __init__(
        self, params: EPDParams, sigmas: torch.Tensor, parallel: bool | int = True, base: str = "euler",
        final: str = "denoise", finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):  # fmt: skip
        if final not in FINAL_STEPS:
            raise ValueError(f"final must be one of {FINAL_STEPS}, got {final!r}")
        self.params, self.final, self.estimate, self.finish = params, final, None, finish
        self.x0: torch.Tensor | None = None  # the x0 estimate at the last call (what a preview shows), not the answer
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        self.offset, self.to_zero = grid_offset(params, self.sigmas)
        self.grid = self.sigmas[:-1] if self.to_zero else self.sigmas
        self.table = params.decoded(torch.float64)
        self.parallel = parallel
        self.history: list[torch.Tensor] = []
        self.next_index = 0
        self.placer = table_placer(params, self.sigmas)  # places the points as the table was fitted
        self.base = Base(base, self.sigmas)  # mirrors the real base sampler's state: turns steps into answers

    def _index(self, sigma: torch.Tensor) -> int:
        # a sigma in a half-precision latent's dtype (ComfyUI 0.3.75 passes it so) is the grid's to a few of its ulps
        rtol = max(1e-5, 4 * torch.finfo(sigma.dtype).eps) if sigma.dtype.is_floating_point else 1e-5
        s = sigma.detach().reshape(-1).to("cpu", torch.float64)
        if not torch.allclose(s, s[:1].expand_as(s), rtol=rtol):
            raise PluginMisuse("EPD Plugin needs one sigma for the whole batch")
        match = torch.isclose(self.grid, s[:1].expand_as(self.grid), rtol=rtol, atol=0.0).nonzero()
        if match.numel() == 0:
            raise PluginMisuse(
                f"the base sampler evaluated the model at sigma {float(s[0]):.6g}, between the table's grid points; "
                "it takes several model calls per step, which EPD Plugin does not support"
            )
        found = match[:, 0].tolist()
        return self.next_index if self.next_index in found else found[0]  # at a coarse dtype, the point that is due

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i = self._index(sigma)
        if i != self.next_index:
            raise PluginMisuse(
                f"the base sampler evaluated grid point {i} when point {self.next_index} was due; "
                "EPD Plugin supports samplers with exactly one model call per step"
            )
        self.next_index += 1
        if i == self.grid.shape[0] - 1:
            if self.final != "estimate" or self.estimate is None:
                self.x0 = denoiser(x, sigma)
            else:
                self.x0 = self.estimate if self.finish is None else self.finish(self.estimate, sigma)
            return self.base.answer(i, x, self.x0)
        step = self.offset + i
        t_cur, t_next = self.grid[i], self.grid[i + 1]
        place = self.placer(i, x, t_cur) if self.placer is not None else None
        d_eff, self.history = epd_step(
            denoiser, x, t_cur, t_next, self.table, step, self.params, self.history, self.parallel, place=place
        )
        self.estimate = x - t_cur.to(x.dtype) * d_eff  # the ensemble's x0 estimate, as the EPD solver's
        self.x0 = self.estimate if self.finish is None else self.finish(self.estimate, sigma)  # what previews show
        if self.base.name == "euler":
            self.base.step(i, x, self.estimate)
            return self.estimate
        return self.base.answer(i, x, x + (t_next - t_cur).to(x.dtype) * d_eff)
