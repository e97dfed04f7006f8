"""The EPD solver (Ensemble Parallel Directions) and its iPNDM-plugin student.

One step from ``t_cur`` to ``t_next``, with table values ``r, weight, scale_dir,
scale_time`` for K points (see :mod:`epd_core.params`)::

    d     = (x - D(x, t_cur)) / t_cur                 # AFS on the first step: x / sqrt(1 + t_cur^2), flow: x / t_cur
                                                      # carry: the previous step's direction, no call
    tau_k = t_next**r_k * t_cur**(1 - r_k)
    x_k   = x + (tau_k - t_cur) * d                   # ipndm: Adams-Bashforth over past d's
    d_k   = (x_k - D(x_k, scale_time_k * tau_k)) / tau_k     # the K points: one batched call
    x     = x + (t_next - t_cur) * sum_k weight_k * scale_dir_k * d_k

``D(x, sigma)`` is any denoiser returning the x0 prediction for a per-sample
``sigma``. The same update serves variance-exploding grids (``sigma``) and
rectified-flow grids (``t``), as in the authors' code.

Students: ``epd`` (the authors' EPD-Solver, two rounds per step), ``ipndm`` (their
iPNDM plugin) and ``carry`` (our extension: one round per step). A ``carry`` step
places its points along the direction it carries from the previous step, the
ensemble's ``sum_k weight_k * scale_dir_k * d_k``, instead of calling the model at
``t_cur``; so NFE 5 buys five steps of K points where EPD gets three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .params import Decoded, EPDParams

__all__ = [
    "Denoiser",
    "sample",
    "epd_step",
    "point_times",
    "first_direction",
    "evaluate_points",
    "push_history",
    "adams_bashforth",
    "grid_offset",
    "initial_state",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def adams_bashforth(d: torch.Tensor, history: list[torch.Tensor], max_order: int) -> torch.Tensor:
    """iPNDM's extrapolated direction from the current ``d`` and past ones (oldest first)."""
    order = min(max_order, len(history) + 1)
    if order == 1:
        return d
    if order == 2:
        return (3 * d - history[-1]) / 2
    if order == 3:
        return (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def _per_sample(value: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or one value per sample, as the ``[batch]`` sigma vector a denoiser takes."""
    return value.to(like.dtype).reshape(-1).expand(batch).to(like.device)


def _point(values: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    """Point ``k`` of a per-step value: a scalar (``[K]`` tables) or one per sample (``[B, K]``), broadcastable."""
    col = values[..., k].to(like.dtype)
    return col.reshape(-1, *([1] * (like.ndim - 1))).to(like.device) if col.ndim else col


def point_times(r: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """``tau_k = t_next**r_k * t_cur**(1 - r_k)``: the K points' times, geometric inside the step."""
    return t_next**r * t_cur ** (1 - r)


def evaluate_points(
    denoiser: Denoiser,
    x: torch.Tensor,
    direction: torch.Tensor,
    offset: torch.Tensor,
    sigma: torch.Tensor,
    tau: torch.Tensor,
    parallel: bool | int = True,
) -> list[torch.Tensor]:
    """``d_k = (x_k - D(x_k, sigma_k)) / tau_k`` at ``x_k = x + offset_k * direction``, for all K points.

    ``parallel=True`` makes ONE denoiser call with batch ``K * B`` laid out
    point-major (``cat([x_0, x_1, ...])``) with per-sample sigmas; an integer
    ``n`` makes calls of at most ``n`` points; ``False`` one call per point.
    """
    k_total, batch = offset.shape[-1], x.shape[0]
    x_points = [x + _point(offset, k, x) * direction for k in range(k_total)]
    chunk = k_total if parallel is True else 1 if parallel is False else max(1, int(parallel))
    out: list[torch.Tensor] = []
    for start in range(0, k_total, chunk):
        idx = range(start, min(start + chunk, k_total))
        xs = torch.cat([x_points[k] for k in idx]) if len(idx) > 1 else x_points[idx[0]]
        sig = torch.cat([_per_sample(sigma[..., k], batch, xs) for k in idx])
        denoised = denoiser(xs, sig)
        for j, k in enumerate(idx):
            den_k = denoised[j * batch : (j + 1) * batch]
            out.append((x_points[k] - den_k) / _point(tau, k, xs))
    return out


def first_direction(
    denoiser: Denoiser,
    x: torch.Tensor,
    t_cur: torch.Tensor,
    afs: bool,
    flow: bool = False,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """``d = (x - D(x, t_cur)) / t_cur``, or the analytic first step (AFS, no model call).

    AFS is the authors' ``x / sqrt(1 + t_cur^2)`` on variance-exploding grids; on rectified-flow grids
    (our extension) it assumes ``D(x, t_cur) = 0``, exact at ``t = 1`` for zero-mean data: ``x / t_cur``.
    With the data's per-channel ``mean`` (a table's ``afs_mean``) it is mean-aware: ``x - mean`` replaces
    ``x`` (at ``t = 1`` a flow model's ``D`` *is* the data mean).
    """
    if afs:
        scale = t_cur if flow else torch.sqrt(1 + t_cur**2)
        if mean is not None:
            if x.ndim < 2 or x.shape[1] != mean.numel():
                raise ValueError(
                    f"the table's first-step mean (afs_mean) has {mean.numel()} channels and the latent has shape "
                    f"{list(x.shape)}: the table was fitted for another latent format; use a table fitted for this "
                    "model (EPD Distill on it)"
                )
            x = x - mean.to(x).reshape(1, -1, *([1] * (x.ndim - 2)))
        return x / scale.to(x.dtype)
    return (x - denoiser(x, _per_sample(t_cur, x.shape[0], x))) / t_cur.to(x.dtype)


PointEvaluator = Callable[..., list[torch.Tensor]]


def epd_step(
    denoiser: Denoiser,
    x: torch.Tensor,
    t_cur: torch.Tensor,
    t_next: torch.Tensor,
    table: Decoded,
    step: int,
    params: EPDParams,
    history: list[torch.Tensor],
    parallel: bool | int = True,
    evaluate: PointEvaluator = evaluate_points,
    place: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One EPD step's direction ``sum_k weight_k * scale_dir_k * d_k``, and the history for the next step.

    The step's update is ``x + (t_next - t_cur) * direction`` and its x0 estimate ``x - t_cur * direction``.
    ``table`` holds ``[steps, K]`` values (``params.decoded()``), or ``[steps, B, K]`` for a different table per
    sample (RDPO's rollouts). ``history`` holds the past directions: an iPNDM student's first directions ``d`` (it
    places its points by Adams-Bashforth extrapolation), a carry student's last step direction (its next step's
    ``d``, no model call at ``t_cur``); an epd student keeps none. ``evaluate`` computes the K directions (training
    swaps in finite differences). ``place(d)``, if given, turns the first direction into the direction the points
    are placed along (the EPD Plugin's base sampler, :mod:`epd_core.bases`); an iPNDM student keeps its own rule.
    The table's first step (``step`` 0) of an ``afs`` table takes the analytic first direction, no model call.
    """
    if params.student == "carry" and history:
        d = history[-1]
    else:
        d = first_direction(denoiser, x, t_cur, params.afs and step == 0, params.is_flow, params.afs_mean)
    if params.student == "ipndm":
        direction = adams_bashforth(d, history, params.max_order)
    else:
        direction = d if place is None else place(d)
    tau = point_times(table.r[step], t_cur, t_next)
    d_points = evaluate(denoiser, x, direction, tau - t_cur, table.scale_time[step] * tau, tau, parallel)
    coef = table.weight[step] * table.scale_dir[step]
    d_eff = sum(_point(coef, k, x) * d_points[k] for k in range(params.num_points))
    if params.student == "carry":
        return d_eff, [d_eff]
    return d_eff, push_history(history, d, params.max_order) if params.student == "ipndm" else history


def push_history(history: list[torch.Tensor], d: torch.Tensor, max_order: int) -> list[torch.Tensor]:
    """iPNDM's buffer of past first directions: the newest ``max_order - 1`` of them."""
    return (history + [d])[-(max_order - 1) :] if max_order > 1 else []


FINAL_STEPS = ("denoise", "estimate")


def grid_offset(params: EPDParams, sigmas: torch.Tensor) -> tuple[int, bool]:
    """Which table step the grid starts at, and whether it ends with a zero (final denoise).

    A grid of ``num_steps`` points runs the whole table; a shorter one (``denoise < 1``)
    runs the table's last steps. A trailing 0 ends at sigma 0: one denoise-to-zero call with ``final="denoise"``,
    the last direction continued to 0 (no call) with ``estimate``.
    """
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D grid, got shape {tuple(sigmas.shape)}")
    n = sigmas.shape[0]
    to_zero = n >= 2 and float(sigmas[-1]) == 0.0
    points = n - 1 if to_zero else n
    if points < 2 and not (to_zero and points == 1):
        raise ValueError(f"the grid has {n} sigmas; EPD needs at least 2 positive ones")
    if points > params.num_steps:
        raise ValueError(
            f"the grid has {points} positive sigmas but the table has {params.num_steps} time points "
            f"({params.num_steps - 1} steps); use the table's own schedule"
        )
    if not bool(torch.all(sigmas[:points] > 0)) or not bool(torch.all(sigmas[1:] < sigmas[:-1])):
        raise ValueError("sigmas must be positive and strictly decreasing (a final 0 is allowed)")
    return params.num_steps - points, to_zero


def initial_state(noise: torch.Tensor, t0: torch.Tensor, flow: bool) -> torch.Tensor:
    """The state at the grid's first time point ``t0`` from standard normal ``noise``: the noise itself for a flow
    (its ``t0`` is 1), ``noise * t0`` on a variance-exploding grid."""
    return noise if flow else noise * t0.detach().to(noise.device, noise.dtype)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    params: EPDParams,
    callback: Callable[[dict[str, Any]], None] | None = None,
    parallel: bool | int = True,
    final: str = "denoise",
    table: Decoded | None = None,
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the table's student (epd, carry or ipndm) from ``x`` at ``sigmas[0]`` down the grid.

    ``sigmas`` is a grid from :func:`~epd_core.schedules.make_schedule` (or its
    last part, see :func:`grid_offset`), optionally ending with 0. ``x`` is
    already at noise level ``sigmas[0]``. ``callback`` gets
    ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step, where
    ``denoised`` is the ensemble's x0 estimate ``x - t_cur * sum_k weight_k * scale_dir_k * d_k``.

    ``final`` says how a trailing 0 is reached: ``denoise`` calls the model once
    more at the last sigma; ``estimate`` returns the last step's own x0 estimate
    (its update extended to sigma 0), at no extra call. ``table`` replaces the
    table's decoded values, e.g. by ``[steps, B, K]`` per-sample tables (RDPO).
    ``finish(estimate, sigma)``: what the model's wrapper makes of an answer at
    ``sigma`` (ComfyUI's inpainting puts the source back where the mask keeps it),
    applied to the estimate that stands in for the last call and to what the
    callback shows (the trajectory itself uses the raw estimate). A float16 or
    bfloat16 ``x`` is integrated in float32, as ComfyUI's samplers do after
    their first call.
    """
    from .bases import table_placer  # bases builds on this module's Adams-Bashforth rule

    if final not in FINAL_STEPS:
        raise ValueError(f"final must be one of {FINAL_STEPS}, got {final!r}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    offset, to_zero = grid_offset(params, sigmas)
    grid = sigmas[:-1] if to_zero else sigmas
    table = params.decoded(torch.float64) if table is None else table
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # a half-precision latent's rounding would compound
    history: list[torch.Tensor] = []
    estimate = None
    placer = table_placer(params, sigmas)

    for i in range(grid.shape[0] - 1):
        step = offset + i
        t_cur, t_next = grid[i], grid[i + 1]
        place = placer(i, x, t_cur) if placer is not None else None
        d_eff, history = epd_step(denoiser, x, t_cur, t_next, table, step, params, history, parallel, place=place)
        estimate = x - t_cur.to(x.dtype) * d_eff
        if callback is not None:
            shown = estimate if finish is None else finish(estimate, _per_sample(t_cur, x.shape[0], x))
            callback({"x": x, "i": i, "sigma": t_cur, "sigma_hat": t_cur, "denoised": shown})
        x = x + (t_next - t_cur).to(x.dtype) * d_eff

    if to_zero:
        t_last = grid[-1]
        free = final == "estimate" and estimate is not None  # a lone sigma before the 0 has no step to extend
        sigma = _per_sample(t_last, x.shape[0], x)
        denoised = denoiser(x, sigma) if not free else estimate if finish is None else finish(estimate, sigma)
        if callback is not None:
            i = grid.shape[0] - 1
            callback({"x": x, "i": i, "sigma": t_last, "sigma_hat": t_last, "denoised": denoised})
        x = denoised
    return x
