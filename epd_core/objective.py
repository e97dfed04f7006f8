"""The student's objective: the EPD table walking the grid from a batch of noises, and its distance to the teacher.

:func:`student_loss` is what Stage 1 minimises (:mod:`epd_core.distill` runs the optimisation). The ``global``
objective backpropagates the end point's distance through the whole rollout; ``local`` takes each step from the
student's detached state; ``authors`` keeps the rollout undetached and is stepped one student step at a time by the
training loop (:class:`Rollout`). Gradients through the model come from autograd (optionally with recomputed
activations, :func:`recomputed`) or from finite differences along the two directions a table moves a point.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.utils.checkpoint

from .bases import Base, placement
from .config import DistillConfig
from .params import TABLE_NAMES, Decoded, EPDParams, decode
from .solver import Denoiser, epd_step, evaluate_points

__all__ = ["FD_STEP", "Rollout", "distance", "fd_step", "recomputed", "student_loss"]

FD_STEP = 1e-3  # the finite-difference step, relative to the noise level, for a model computing in float32 or finer


def fd_step(dtype: torch.dtype) -> float:
    """The finite-difference step for a model computing in ``dtype``: :data:`FD_STEP`, or the square root of the
    dtype's machine epsilon where that is larger (0.031 in float16, 0.088 in bfloat16), which balances the model's
    rounding against the difference's truncation (at 1e-3 a bfloat16 model's gradient is off by 13x)."""
    return max(FD_STEP, torch.finfo(dtype).eps ** 0.5)


FeatureLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student's final state, teacher's) -> loss


class _FiniteDifferenceDenoise(torch.autograd.Function):
    """``D(x + c * direction, s)`` with gradients for ``c`` and ``s`` from forward differences.

    The table only moves a point along ``direction`` (through ``c = tau - t_cur``) and its time ``s``, so
    these two directional derivatives are all training needs: one extra model call of twice the batch, no backprop
    through the network (works for models with in-place ops, and needs no activation memory).
    """

    @staticmethod
    def forward(ctx, c, s, x, direction, denoiser, eps):
        shape = (-1,) + (1,) * (x.ndim - 1)
        with torch.no_grad():
            base = x + c.detach().reshape(shape) * direction
            out = denoiser(base, s.detach())
        ctx.save_for_backward(c.detach(), s.detach(), x, direction, out)
        ctx.denoiser, ctx.eps = denoiser, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        c, s, x, direction, out = ctx.saved_tensors
        shape = (-1,) + (1,) * (x.ndim - 1)
        hc = ctx.eps * s  # a step along the direction, in the units of the current noise level
        hs = ctx.eps * s
        with torch.no_grad():
            xs = torch.cat([x + (c + hc).reshape(shape) * direction, x + c.reshape(shape) * direction])
            both = ctx.denoiser(xs, torch.cat([s, s + hs]))
        n = x.shape[0]
        d_c = (both[:n] - out) / hc.reshape(shape)
        d_s = (both[n:] - out) / hs.reshape(shape)
        return (grad * d_c).flatten(1).sum(1), (grad * d_s).flatten(1).sum(1), None, None, None, None


def _evaluate_points_fd(denoiser, x, direction, offset, sigma, tau, parallel=True, eps=FD_STEP):
    """:func:`~epd_core.solver.evaluate_points` with finite-difference gradients through the model (all K in
    one call, point-major)."""
    k, b = offset.shape[-1], x.shape[0]
    c, s = offset.to(x.dtype).repeat_interleave(b), sigma.to(x.dtype).repeat_interleave(b)
    xk, dk = x.repeat(k, *([1] * (x.ndim - 1))), direction.repeat(k, *([1] * (x.ndim - 1)))
    out = _FiniteDifferenceDenoise.apply(c, s, xk, dk.detach(), denoiser, eps)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return list(((xk + c.reshape(shape) * dk - out) / tau.to(x.dtype).repeat_interleave(b).reshape(shape)).split(b))


def recomputed(denoiser: Denoiser) -> Denoiser:
    """``denoiser`` whose activations are not kept for the backward pass but recomputed there (activation
    checkpointing): backpropagating a rollout then holds one call's activations, not every step's, for a second
    forward pass per call. The same values and gradients."""

    def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return denoiser(x, sigma)
        return torch.utils.checkpoint.checkpoint(denoiser, x, sigma, use_reentrant=False)

    return call


def _no_grad(denoiser: Denoiser) -> Denoiser:
    """``denoiser`` evaluated without building a graph (finite-difference training never backpropagates it)."""

    def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return denoiser(x, sigma)

    return call


def student_loss(
    denoiser: Denoiser,
    params: EPDParams,
    raw: dict[str, torch.Tensor],
    grid: torch.Tensor,
    x: torch.Tensor,
    targets: torch.Tensor,
    config: DistillConfig | None = None,
    feature_loss: FeatureLoss | None = None,
    fd_step: float = FD_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's distance to the teacher under ``config``; returns (loss, student's final state).

    ``objective``: ``local``: the sum over steps of the mean squared distance at each grid point, every step
    taken from the student's detached state; ``global``: only the final state's distance, backpropagated
    through the whole student trajectory (every step's table answers for the end result); ``authors``: the
    per-step losses of the undetached rollout (the training loop then updates after every step, see
    :func:`distill`; here their sum, for evaluation).

    ``gradient``: ``autograd`` backpropagates through the denoiser; ``fd`` uses finite differences of step ``fd_step``
    (see :func:`fd_step`).
    ``weighting``: ``uniform`` (the authors') or ``snr``: each step's error divided by ``1 + t_next^2``, i.e.
    measured at the model's input scale, so the early high-noise steps that decide the image's layout count
    as much as the late ones.
    ``plugin_base``: the base solver the table will run under as an EPD Plugin: its method places the points,
    the step stays EPD's (see :mod:`epd_core.plugin`).
    ``final_estimate``: the last step is extended to sigma 0 (sampling with ``final="estimate"``); ``targets[-1]``
    is then the teacher's denoised end point.
    ``robust``: each step's distance is :func:`distance` with that pseudo-Huber scale (0: the squared error).
    """
    config = config or DistillConfig()
    rollout = Rollout(denoiser, params, raw, grid, x, config, fd_step)
    total = x.new_zeros(())
    for i in range(rollout.steps):
        loss = rollout.step(i, targets, feature_loss)
        if config.objective != "global" or i == rollout.steps - 1:
            total = total + loss
    return total, rollout.x


def distance(x: torch.Tensor, target: torch.Tensor, robust: float = 0.0) -> torch.Tensor:
    """The mean over samples of each sample's mean squared error ``e``; with ``robust = c > 0`` of the pseudo-Huber
    ``2c (sqrt(e + c^2) - c)`` instead (``e`` for small errors, ``2c sqrt(e)`` for large ones)."""
    err = ((x - target) ** 2).flatten(1).mean(1)
    if robust > 0:
        err = 2 * robust * (torch.sqrt(err + robust**2) - robust)
    return err.mean()


class Rollout:
    """The student walking the grid from ``x``, one step at a time, with each step's loss against the teacher."""

    def __init__(
        self, denoiser: Denoiser, params: EPDParams, raw: dict[str, torch.Tensor], grid: torch.Tensor, x: torch.Tensor,
        config: DistillConfig, fd_step: float = FD_STEP,
    ) -> None:  # fmt: skip
        autograd = config.gradient == "autograd"
        self.evaluate = evaluate_points if autograd else functools.partial(_evaluate_points_fd, eps=fd_step)
        self.model = denoiser if autograd else _no_grad(denoiser)
        self.params, self.raw, self.grid, self.x, self.config = params, raw, grid, x, config
        self.local = config.objective == "local"
        self.steps = grid.shape[0] - 1
        self.history: list[torch.Tensor] = []
        self.placer = Base(config.plugin_base, grid.detach()) if config.plugin_base != "euler" else None

    def table(self) -> Decoded:
        """The table as it stands now, decoded from its raw rows."""
        p = self.params
        return decode(*(self.raw[name] for name in TABLE_NAMES), p.scale_dir, p.scale_time, p.fcn)

    def step(self, i: int, targets: torch.Tensor, feature_loss: FeatureLoss | None = None) -> torch.Tensor:
        """Take step ``i`` (the table decoded afresh: the authors' loop updates it between steps); its loss."""
        config, x, grid = self.config, self.x, self.grid
        t_cur, t_next = grid[i], grid[i + 1]
        place = placement(self.placer, i, x, t_cur) if self.placer is not None else None
        d_eff, history = epd_step(self.model, x, t_cur, t_next, self.table(), i, self.params, self.history,
                                  evaluate=self.evaluate, place=place)  # fmt: skip
        last = i == self.steps - 1
        if config.final_estimate and last:
            x_next = x - t_cur.to(x.dtype) * d_eff
        else:
            x_next = x + (t_next - t_cur).to(x.dtype) * d_eff
        if self.placer is not None and self.local:
            self.placer.past = [h.detach() for h in self.placer.past]
        if feature_loss is not None and last:
            loss = feature_loss(x_next, targets[i + 1])
        else:
            t_end = 0.0 if config.final_estimate and last else t_next.to(x.dtype)
            w = 1.0 / (1.0 + t_end**2) if config.weighting == "snr" else 1.0
            loss = w * distance(x_next, targets[i + 1], config.robust)
        self.history = [h.detach() for h in history] if self.local else history
        self.x = x_next.detach() if self.local else x_next
        return loss
