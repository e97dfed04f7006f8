"""Stage 1: distil an EPD table from a many-step teacher (the authors' recipe).

Per iteration: draw a batch of starting noises; a teacher solver with ``M``
extra points inside every student interval gives the reference state at each
student grid point; the student takes one EPD step from its *own* current
state; the loss is the squared distance to the teacher at the matching time,
summed over steps (the student continues from its detached output). Adam with
a cosine learning-rate schedule. Optionally the interior grid points are
learned too (the table then carries its grid), and the final step's loss can
be replaced by a caller's feature loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from .bases import Base
from .checkpoint import RunState, interruptible, run_checkpointer
from .config import DistillConfig
from .params import TABLE_NAMES, EPDParams, decode
from .plugin import placement
from .schedules import make_schedule
from .solver import Denoiser, epd_step, evaluate_points
from .teachers import subdivide, teacher_trajectory

__all__ = ["distill", "student_loss"]


def _grid_from_logits(ends: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A decreasing grid between the fixed ``ends`` whose log-gaps are ``softmax(logits)`` of the whole span."""
    fractions = torch.cumsum(torch.softmax(logits, 0), 0)
    log_ends = torch.log(ends)
    inner = torch.exp(log_ends[0] + (log_ends[1] - log_ends[0]) * fractions[:-1])
    return torch.cat([ends[:1], inner, ends[1:]])


class _FiniteDifferenceDenoise(torch.autograd.Function):
    """``D(x + c * direction, s)`` with gradients for ``c`` and ``s`` from forward differences.

    The table only moves a point along ``direction`` (through ``c = tau - t_cur``) and its time ``s``, so
    these two directional derivatives are all training needs: two extra (batched) model calls, no backprop
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


def _evaluate_points_fd(denoiser, x, direction, offset, sigma, tau, parallel=True, eps=1e-3):
    """:func:`~epd_core.solver.evaluate_points` with finite-difference gradients through the model (all K in
    one call, point-major)."""
    k, b = offset.shape[-1], x.shape[0]
    c, s = offset.to(x.dtype).repeat_interleave(b), sigma.to(x.dtype).repeat_interleave(b)
    xk, dk = x.repeat(k, *([1] * (x.ndim - 1))), direction.repeat(k, *([1] * (x.ndim - 1)))
    out = _FiniteDifferenceDenoise.apply(c, s, xk, dk.detach(), denoiser, eps)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return list(((xk + c.reshape(shape) * dk - out) / tau.to(x.dtype).repeat_interleave(b).reshape(shape)).split(b))


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
    feature_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's distance to the teacher under ``config``; returns (loss, student's final state).

    ``objective``: ``local`` (the authors'): the sum over steps of the mean squared distance at each grid
    point, every step taken from the student's detached state; ``global``: only the final state's distance,
    backpropagated through the whole student trajectory (every step's table answers for the end result).

    ``gradient``: ``autograd`` backpropagates through the denoiser; ``fd`` uses finite differences.
    ``weighting``: ``uniform`` (the authors') or ``snr``: each step's error divided by ``1 + t_next^2``, i.e.
    measured at the model's input scale, so the early high-noise steps that decide the image's layout count
    as much as the late ones.
    ``plugin_base``: the base solver the table will run under as an EPD Plugin: its method places the points,
    the step stays EPD's (see :mod:`epd_core.plugin`).
    ``final_estimate``: the last step is extended to sigma 0 (sampling with ``final="estimate"``); ``targets[-1]``
    is then the teacher's denoised end point.
    """
    config = config or DistillConfig()
    autograd, final_estimate, plugin_base = config.gradient == "autograd", config.final_estimate, config.plugin_base
    evaluate = evaluate_points if autograd else _evaluate_points_fd
    model = denoiser if autograd else _no_grad(denoiser)
    local = config.objective == "local"
    table = decode(*(raw[name] for name in TABLE_NAMES), params.scale_dir, params.scale_time, params.fcn)
    history: list[torch.Tensor] = []
    placer = Base(plugin_base, grid.detach()) if plugin_base != "euler" else None
    total = x.new_zeros(())
    steps = grid.shape[0] - 1
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        afs = params.afs and i == 0
        place = placement(placer, i, x, t_cur) if placer is not None else None
        d_eff, history = epd_step(model, x, t_cur, t_next, table, i, params, history, afs, evaluate=evaluate,
                                  place=place)  # fmt: skip
        if final_estimate and i == steps - 1:
            x_next = x - t_cur.to(x.dtype) * d_eff
        else:
            x_next = x + (t_next - t_cur).to(x.dtype) * d_eff
        if placer is not None and local:
            placer.past = [h.detach() for h in placer.past]
        if feature_loss is not None and i == steps - 1:
            total = total + feature_loss(x_next, targets[i + 1])
        elif local or i == steps - 1:
            t_end = 0.0 if final_estimate and i == steps - 1 else t_next.to(x.dtype)
            w = 1.0 / (1.0 + t_end**2) if config.weighting == "snr" else 1.0
            total = total + w * ((x_next - targets[i + 1]) ** 2).mean()
        history = [h.detach() for h in history] if local else history
        x = x_next.detach() if local else x_next
    return total, x


def distill(
    denoiser: Denoiser,
    start: EPDParams,
    shape: tuple[int, ...],
    config: DistillConfig | None = None,
    *,
    grid: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    feature_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    metadata: dict[str, Any] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> EPDParams:
    """Fit ``start``'s tables (and, with ``config.learn_grid``, its interior grid points) to a teacher.

    ``denoiser(x, sigma)`` may close over conditioning and guidance; it gets batches of ``K * batch``
    (point-major) for the student's points. ``shape`` is one sample's shape. Deterministic for a seed.
    ``progress(iteration, iterations, loss)`` is called after every iteration (raise to stop; nothing is kept).
    See :class:`~epd_core.config.DistillConfig` for the hyper-parameters (its defaults when ``config`` is None).
    ``check_interrupt()`` runs before every model call, the teacher's included (raise to stop).
    ``checkpoint``: a file the run's state is saved to every ``checkpoint_every`` iterations and resumed
    from (see :mod:`epd_core.checkpoint`): a resumed run ends with the same table as an uninterrupted one.
    """
    config = config or DistillConfig()
    denoiser = interruptible(denoiser, check_interrupt)
    # A copy, so that a grid made under inference mode (ComfyUI's) can be saved for backward.
    base_grid = make_schedule(start) if grid is None else torch.as_tensor(grid, dtype=torch.float64).clone()
    base_grid = base_grid.to(device)
    if base_grid.shape[0] != start.num_steps:
        raise ValueError(f"the grid has {base_grid.shape[0]} points; the table has {start.num_steps}")
    fine_fixed = None
    if not config.learn_grid and grid is None and start.t_steps is None:
        fine = make_schedule(start, num_steps=(config.teacher_m + 1) * (start.num_steps - 1) + 1).to(device)
        if torch.allclose(fine[:: config.teacher_m + 1], base_grid, rtol=1e-9):
            fine_fixed = fine  # the authors' teacher grid: the same schedule with (M + 1)x the steps

    raw = {name: getattr(start, name).to(device, dtype).clone().requires_grad_(True) for name in TABLE_NAMES}
    trainable = [raw["r_params"], raw["weight_s"]]
    trainable += [raw["scale_dir_params"]] if start.scale_dir else []
    trainable += [raw["scale_time_params"]] if start.scale_time else []
    ends = base_grid[[0, -1]]
    logits = torch.log(-torch.diff(torch.log(base_grid))).clone().requires_grad_(config.learn_grid)
    if config.learn_grid:
        trainable.append(logits)
    opt = torch.optim.Adam(trainable, lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.iterations)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    x = None
    ckpt = None
    if checkpoint is not None:
        state = RunState({**raw, "grid_logits": logits}, opt, sched, gen)
        ckpt = run_checkpointer(checkpoint, checkpoint_every, state, denoiser, start, shape, base_grid, dtype, device,
                             {**config.provenance(), "feature_loss": feature_loss is not None})  # fmt: skip
        first, history = ckpt.resume()
        if first and progress is not None:
            progress(first, config.iterations, history[-1])

    for it in range(ckpt.resumed_at if ckpt else 0, config.iterations):
        grid_now = _grid_from_logits(ends, logits) if config.learn_grid else base_grid
        noise = torch.randn((config.batch, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
        x = noise if start.is_flow else noise * grid_now[0].detach().to(dtype)
        with torch.no_grad():
            fine = fine_fixed if fine_fixed is not None else subdivide(grid_now.detach(), config.teacher_m)
            targets = teacher_trajectory(denoiser, x, fine, config.teacher)[:: config.teacher_m + 1]
            if config.final_estimate:
                end = fine[-1].expand(x.shape[0]).to(x.dtype)
                targets = torch.cat([targets[:-1], denoiser(targets[-1], end).unsqueeze(0)])
        with torch.enable_grad():
            loss, _ = student_loss(denoiser, start, raw, grid_now, x, targets, config, feature_loss)
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                for p in trainable:
                    if p.grad is not None:
                        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(it + 1, config.iterations, history[-1])
        if ckpt is not None:
            ckpt.step(it + 1, history, config.iterations)

    tables = {name: raw[name].detach().to("cpu", torch.float32) for name in TABLE_NAMES}
    learned = _grid_from_logits(ends, logits).detach().cpu() if config.learn_grid else None
    tail = [v for v in history[-max(1, config.iterations // 10) :] if math.isfinite(v)]
    provenance = {
        **dict(start.metadata),
        **(metadata or {}),
        **({"plugin_base": config.plugin_base} if config.plugin_base != "euler" else {}),
        "distilled": {**config.provenance(), "first_loss": history[0], "final_loss": sum(tail) / max(1, len(tail))},
    }
    return start.replace(
        **tables, t_steps=learned, teacher=config.teacher, teacher_steps_m=config.teacher_m, metadata=provenance
    )
