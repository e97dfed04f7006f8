"""Stage 1: distil an EPD table from a many-step teacher (the authors' recipe).

Per iteration: draw a batch of starting noises; a teacher solver with ``M`` extra points inside every student
interval gives the reference trajectory. The ``global`` objective (the node's default) rolls the student out over
the whole grid and takes the squared distance of its end to the teacher's, backpropagated through the rollout; the
per-step ``local`` one has the student take one EPD step from its own *detached* state and sums, over steps, the
squared distance to the teacher at the matching time; ``authors``, the authors' loop, keeps the rollout undetached
and takes an Adam step after every student step (the objectives themselves: :mod:`epd_core.objective`). Adam with
a cosine learning-rate schedule. Optionally each sample's squared distance goes through a pseudo-Huber loss
(:func:`~epd_core.objective.distance`), the interior grid points are learned too (the table then carries its grid),
and the final step's loss can be replaced by a caller's feature loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import RunState, interruptible, run_checkpointer, with_gradients
from .config import DistillConfig, offset_seed
from .objective import FD_STEP, Rollout, student_loss
from .params import TABLE_NAMES, EPDParams
from .schedules import make_schedule, training_grid
from .selection import DIVERGED, HeldOutCheck, check_iterations
from .solver import Denoiser, initial_state, sample
from .starts import held_out_noises
from .teachers import subdivide, teacher_end, teacher_trajectory
from .updates import euler_step

__all__ = ["distill", "held_out_errors", "loss_curve"]

AUTHORS_LR_FLOOR = 0.01  # the authors' cosine schedule ends at this learning rate (eta_min)
HELD_OUT = 64  # noises of the held-out errors a table records (about 1% of the node's training evaluations)


def _grid_from_logits(ends: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A decreasing grid between the fixed ``ends`` whose log-gaps are ``softmax(logits)`` of the whole span."""
    fractions = torch.cumsum(torch.softmax(logits, 0), 0)
    log_ends = torch.log(ends)
    inner = torch.exp(log_ends[0] + (log_ends[1] - log_ends[0]) * fractions[:-1])
    return torch.cat([ends[:1], inner, ends[1:]])


@torch.no_grad()
def first_step_mean(denoiser: Denoiser, start: EPDParams, shape: tuple[int, ...], t0: torch.Tensor,
                    config: DistillConfig, dtype: torch.dtype, device: torch.device | str,
                    noises: int = 64) -> torch.Tensor:  # fmt: skip
    """The data's per-channel mean as the model sees it at the first time point: ``D(x, t0)`` averaged over
    ``noises`` starting noises (in batches of ``config.batch``, so a conditioning batch tiles as in training)."""
    gen = torch.Generator().manual_seed(offset_seed(config.seed, 1))
    t0 = t0.to(device, dtype)
    total, count = None, 0
    while count < noises:
        noise = torch.randn((config.batch, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
        x = initial_state(noise, t0, start.is_flow)
        denoised = denoiser(x, t0.expand(x.shape[0])).double()
        _check_finite(denoised, f"at sigma {float(t0):.4g}")
        part = denoised.transpose(0, 1).flatten(1).sum(1)
        total, count = (part if total is None else total + part), count + x.shape[0]
    return (total / (count * math.prod(shape[1:]))).cpu()


def _update(opt: torch.optim.Optimizer, trainable: list[torch.Tensor], clip: bool) -> None:
    """One Adam step; non-finite gradient entries are zeroed, the norm clipped to 1 unless ``clip`` is off."""
    for p in trainable:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip:
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()


def _accumulate(denoiser, start, raw, ends, logits, grid, x, targets, config, feature_loss, fd_step) -> torch.Tensor:
    """Backpropagate :func:`~epd_core.objective.student_loss` over ``x`` in chunks of ``config.micro_batch`` noises
    (the gradients add up to the whole batch's: the loss is a mean over samples); returns the batch's loss."""
    n = x.shape[0]
    size = config.micro_batch or n
    total = x.new_zeros(())
    for lo in range(0, n, size):
        part = slice(lo, min(lo + size, n))
        grid_part = _grid_from_logits(ends, logits) if config.learn_grid else grid
        loss, _ = student_loss(denoiser, start, raw, grid_part, x[part], targets[:, part], config, feature_loss,
                               fd_step)  # fmt: skip
        loss = loss * (x[part].shape[0] / n)
        if torch.isfinite(loss):
            loss.backward()
        total = total + loss.detach()
    return total


def _authors_iteration(denoiser, start, raw, grid, x, targets, config, feature_loss, opt) -> torch.Tensor:
    """The authors' training iteration: after every student step, backpropagate its loss through the rollout so
    far (not detached) and take an Adam step, unclipped; returns the summed step losses."""
    rollout = Rollout(denoiser, start, raw, grid, x, config)
    trainable = [p for group in opt.param_groups for p in group["params"]]
    total = x.new_zeros(())
    for i in range(rollout.steps):
        opt.zero_grad(set_to_none=True)
        loss = rollout.step(i, targets, feature_loss)
        if torch.isfinite(loss):
            loss.backward(retain_graph=i < rollout.steps - 1)
            _update(opt, trainable, clip=False)
        total = total + loss.detach()
    return total


def _fixed_teacher_grid(start: EPDParams, base_grid: torch.Tensor, config: DistillConfig) -> torch.Tensor | None:
    """The authors' teacher grid, the same schedule with ``(M + 1)`` times the steps, where it passes through every
    student grid point (else None: the teacher subdivides the student's grid). Only for a ``base_grid`` made by
    ``make_schedule(start)``: a caller's own grid has no finer schedule."""
    if config.learn_grid or start.t_steps is not None:
        return None
    fine = make_schedule(start, num_steps=(config.teacher_m + 1) * (start.num_steps - 1) + 1).to(base_grid.device)
    return fine if torch.allclose(fine[:: config.teacher_m + 1], base_grid, rtol=1e-9) else None


def _optimizer(
    start: EPDParams, raw: dict[str, torch.Tensor], logits: torch.Tensor, config: DistillConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam over the table's learned rows (and the grid logits, with their own rate if ``grid_lr``) and its cosine
    schedule (down to :data:`AUTHORS_LR_FLOOR` for the authors' objective, else to 0)."""
    trainable = [raw["r_params"], raw["weight_s"]]
    trainable += [raw["scale_dir_params"]] if start.scale_dir else []
    trainable += [raw["scale_time_params"]] if start.scale_time else []
    if config.learn_grid and not config.grid_lr:
        trainable.append(logits)
    groups = [{"params": trainable}]
    if config.learn_grid and config.grid_lr:
        groups.append({"params": [logits], "lr": config.grid_lr})
    opt = torch.optim.Adam(groups, lr=config.lr)
    floor = min(config.lr, AUTHORS_LR_FLOOR) if config.objective == "authors" else 0.0
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.iterations, eta_min=floor)


@torch.no_grad()
def _teacher_targets(denoiser: Denoiser, x: torch.Tensor, fine: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """The teacher's states at the student's grid points (``[steps + 1, B, ...]``); with ``final_estimate`` the
    last one is the model's denoised end point."""
    targets = teacher_trajectory(denoiser, x, fine, config.teacher)[:: config.teacher_m + 1]
    if config.final_estimate:
        end = fine[-1].expand(x.shape[0]).to(x.dtype)
        targets = torch.cat([targets[:-1], denoiser(targets[-1], end).unsqueeze(0)])
    _check_finite(targets, f"along the teacher's sigmas {float(fine[0]):.4g} to {float(fine[-1]):.4g}")
    return targets


def _check_finite(values: torch.Tensor, where: str) -> None:
    """A ``ValueError`` when the model's answers hold NaN or inf: every training step would be skipped, and the run
    would save its untouched start as trained."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"the model returned non-finite values {where} (a float16 model overflowing? load it in "
                         "bfloat16 or float32)")  # fmt: skip


@with_gradients
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
    checkpoint_key: dict[str, Any] | None = None,
    checkpoint_answers: torch.Tensor | None = None,
    checkpoint_notes: dict[str, Any] | None = None,
    prompts: int = 1,
    fd_step: float = FD_STEP,
) -> EPDParams:
    """Fit ``start``'s tables (and, with ``config.learn_grid``, its interior grid points) to a teacher.

    ``denoiser(x, sigma)`` may close over conditioning and guidance; it gets batches of ``K * batch``
    (point-major) for the student's points. ``shape`` is one sample's shape. Deterministic for a seed.
    ``progress(iteration, iterations, loss)`` is called after every iteration (raise to stop; nothing is kept).
    See :class:`~epd_core.config.DistillConfig` for the hyper-parameters (its defaults when ``config`` is None).
    ``check_interrupt()`` runs before every model call, the teacher's included (raise to stop).
    ``checkpoint``: a file the run's state is saved to every ``checkpoint_every`` iterations and resumed
    from (see :mod:`epd_core.checkpoint`): a resumed run ends with the same table as an uninterrupted one.
    ``checkpoint_key``: the caller's settings that change the result but that the run cannot see (e.g. the feature
    loss's encoder and weight); ``checkpoint_answers``: the caller's other models' answers to fixed inputs
    (:func:`~epd_core.checkpoint.answers`, e.g. the feature encoder's); a checkpoint made with other settings or
    answers is not resumed. ``checkpoint_notes``: JSON saved with the checkpoint, not compared (e.g. which start a
    check chose; :func:`~epd_core.checkpoint.checkpoint_notes` reads it). ``prompts``: how many prompts the
    denoiser tiles over its batch (a conditioning batch), so that the checkpoint's probe asks each of them.
    ``fd_step``: the finite-difference step of ``config.gradient == "fd"``
    (:func:`~epd_core.objective.fd_step` of the model's compute dtype).
    """
    config = config or DistillConfig()
    if config.objective == "authors" and config.micro_batch:  # their per-step loop keeps the whole batch's rollout
        config = dataclasses.replace(config, micro_batch=0)
    if start.student == "carry" and config.plugin_base != "euler":
        raise ValueError("a carry table places its points along its own carried direction; plugin_base needs an "
                         "epd start table")  # fmt: skip
    if start.metadata.get("plugin_base", "euler") != config.plugin_base:
        # the run fits config.plugin_base's placement: its checks must measure that one, not the start's
        start = start.replace(metadata={k: v for k, v in start.metadata.items() if k != "plugin_base"})
    denoiser = interruptible(denoiser, check_interrupt)
    base_grid = training_grid(start, grid).to(device)
    fine_fixed = _fixed_teacher_grid(start, base_grid, config) if grid is None else None
    if config.afs_mean and start.afs and start.afs_mean is None:
        start = start.replace(afs_mean=first_step_mean(denoiser, start, shape, base_grid[0], config, dtype, device))

    raw = {name: getattr(start, name).to(device, dtype).clone().requires_grad_(True) for name in TABLE_NAMES}
    ends = base_grid[[0, -1]]
    logits = torch.log(-torch.diff(torch.log(base_grid))).clone().requires_grad_(config.learn_grid)
    opt, sched = _optimizer(start, raw, logits, config)
    trainable = [p for group in opt.param_groups for p in group["params"]]
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    keeper = _Keeper(denoiser, start, raw, logits, base_grid, shape, config, dtype, feature_loss)
    ckpt = None
    if checkpoint is not None:
        state = RunState({**raw, "grid_logits": logits, **keeper.state}, opt, sched, gen)
        options = {**config.provenance(), "feature_loss": feature_loss is not None, "key": checkpoint_key or {},
                   "teacher_grid": "schedule" if fine_fixed is not None else "subdivided"}  # fmt: skip
        ckpt = run_checkpointer(checkpoint, checkpoint_every, state, denoiser, start, shape, base_grid, dtype, device,
                                options, batch=prompts, extra=checkpoint_answers, notes=checkpoint_notes)  # fmt: skip
        first, history = ckpt.resume(config.iterations)
        if first and progress is not None:
            progress(first, config.iterations, history[-1])
    keeper.check(ckpt.resumed_at if ckpt else 0)

    for it in range(ckpt.resumed_at if ckpt else 0, config.iterations):
        grid_now = _grid_from_logits(ends, logits) if config.learn_grid else base_grid
        noise = torch.randn((config.batch, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
        x = initial_state(noise, grid_now[0], start.is_flow)
        fine = fine_fixed if fine_fixed is not None else subdivide(grid_now.detach(), config.teacher_m)
        targets = _teacher_targets(denoiser, x, fine, config)
        if config.objective == "authors":
            loss = _authors_iteration(denoiser, start, raw, grid_now, x, targets, config, feature_loss, opt)
        else:
            opt.zero_grad(set_to_none=True)
            loss = _accumulate(denoiser, start, raw, ends, logits, grid_now, x, targets, config, feature_loss, fd_step)
            if torch.isfinite(loss):
                _update(opt, trainable, clip=True)
        sched.step()
        history.append(float(loss.detach()))
        keeper.check(it + 1)
        if progress is not None:
            progress(it + 1, config.iterations, history[-1])
        if ckpt is not None:
            ckpt.step(it + 1, history, config.iterations)

    if not any(opt.state.get(p) for p in trainable):
        raise ValueError("no iteration had a finite loss (each was NaN or inf), so nothing was learned: check the "
                         "feature loss's encoder and weight, and that the model answers finite values at the "
                         "table's points")  # fmt: skip
    table, final_grid = _table(start, *keeper.best(raw, logits), base_grid, config.learn_grid)
    fitted = table.replace(teacher=config.teacher, teacher_steps_m=config.teacher_m)
    errors = {}
    if config.plugin_base == "euler":  # a plugin table's student is its base's method: not sampled here
        errors = held_out_errors(denoiser, fitted, final_grid, shape, config, dtype)
    curve = loss_curve(history)
    provenance = {
        **start.carried_metadata(),
        **(metadata or {}),
        **({"plugin_base": config.plugin_base} if config.plugin_base != "euler" else {}),
        "distilled": {**config.provenance(), "first_loss": curve[0], "final_loss": curve[-1], "loss_curve": curve,
                      **errors, **keeper.record()},
    }  # fmt: skip
    return fitted.replace(metadata=provenance)


def loss_curve(history: list[float], parts: int = 10) -> list[float]:
    """The training curve: the mean loss over each tenth of the run (finite values; NaN where a tenth has none).

    The loss of one batch is noisy (a rare sample that changes mode dominates it), so a tenth's mean is what shows
    whether a run still improves; its first and last are the metadata's ``first_loss`` and ``final_loss``."""
    n = len(history)
    bounds = sorted({round(n * j / parts) for j in range(parts + 1)})
    means = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        finite = [v for v in history[lo:hi] if math.isfinite(v)]
        means.append(sum(finite) / len(finite) if finite else math.nan)
    return means or [math.nan]


def _table(start: EPDParams, raw: dict, logits: torch.Tensor, base_grid: torch.Tensor, learn_grid: bool):
    """The table that ``raw`` (and, with ``learn_grid``, the grid ``logits``) stand for, in float32 on the CPU
    with its learned grid stored, and the grid it samples along."""
    tables = {name: raw[name].detach().to("cpu", torch.float32) for name in TABLE_NAMES}
    if not learn_grid:
        return start.replace(**tables), base_grid
    grid = _grid_from_logits(base_grid[[0, -1]], logits.detach())
    return start.replace(**tables, t_steps=grid.cpu()), grid


class _Keeper:
    """The run's best table by :class:`~epd_core.selection.HeldOutCheck` (``config.keep_best`` noises), checked at
    :func:`~epd_core.selection.check_iterations`, and the table to end with: the last, unless its check error is
    above :data:`~epd_core.selection.DIVERGED` times the best's (then the best). Its ``state`` (the best table and
    grid logits, and every check's error, NaN until made) is part of a checkpoint, so a resumed run keeps the same
    table. Inactive (no check, the last table kept) without ``keep_best``, with a feature loss (its objective is
    not the RMS error) or for a plugin table (its student is the base's method)."""

    def __init__(self, denoiser, start, raw, logits, base_grid, shape, config, dtype, feature_loss) -> None:
        self.active = config.keep_best > 0 and feature_loss is None and config.plugin_base == "euler"
        self.raw, self.logits, self.start, self.config, self.grid = raw, logits, start, config, base_grid
        self.at = check_iterations(config.iterations) if self.active else []
        self.state: dict[str, torch.Tensor] = {}
        if self.active:
            self.held_out = HeldOutCheck(denoiser, start, base_grid, shape, config, dtype)
            self.state = {f"best.{name}": value.detach().clone() for name, value in raw.items()}
            self.state["best.grid_logits"] = logits.detach().clone()
            self.state["checks"] = torch.full((len(self.at),), math.nan, dtype=torch.float64)

    def check(self, iteration: int) -> None:
        """At a check iteration not yet checked: measure the current table; keep it if it is the best so far."""
        if iteration not in self.at or not math.isnan(self.state["checks"][self.at.index(iteration)]):
            return
        with torch.no_grad():
            error = self.held_out(*_table(self.start, self.raw, self.logits, self.grid, self.config.learn_grid))
            checks = self.state["checks"]
            if not bool((checks[~checks.isnan()] <= error).any()):
                for name, value in self.raw.items():
                    self.state[f"best.{name}"].copy_(value.detach())
                self.state["best.grid_logits"].copy_(self.logits.detach())
            checks[self.at.index(iteration)] = error

    def _diverged(self) -> bool:
        errors = self.state["checks"]
        return bool(errors[-1] > DIVERGED * errors.min())

    def best(self, raw: dict, logits: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The table to end with: the best checked one if the last diverged from it, else ``raw`` and ``logits``."""
        if not self.active or not self._diverged():
            return raw, logits
        return {name: self.state[f"best.{name}"] for name in raw}, self.state["best.grid_logits"]

    def record(self) -> dict:
        """The checks for the table's metadata: noises, iterations, errors and the iteration kept."""
        if not self.active:
            return {}
        errors = self.state["checks"].tolist()
        best = self.at[min(range(len(errors)), key=lambda j: (errors[j], j))]
        kept = best if self._diverged() else self.at[-1]
        return {"checks": {"noises": self.held_out.size, "iterations": self.at, "errors": errors, "kept": kept}}


@torch.no_grad()
def held_out_errors(denoiser: Denoiser, params: EPDParams, grid: torch.Tensor, shape: tuple[int, ...],
                    config: DistillConfig, dtype: torch.dtype) -> dict:  # fmt: skip
    """How good the teacher and the student are along ``grid``, on at least :data:`HELD_OUT` noises training never
    saw (:func:`~epd_core.starts.held_out_noises`, in chunks).

    The reference is the teacher with ``2M + 1`` points per step (twice as fine); ``teacher_error`` is the RMS
    distance of the training teacher (``M``) to it at the last grid point, ``student_error`` the student's. A
    student cannot get much closer to the truth than its teacher: a small ratio says the teacher limits it.
    ``euler_error``: Euler's along the student's own time points, one call per point, which a trained table
    should beat (a table worse than that is broken, not merely coarse). With ``config.final_estimate`` each ends as
    it is sampled: the student and Euler on the last step's estimate, the teachers on the model's denoised end.
    """
    squared, count = torch.zeros(3, dtype=torch.float64), 0
    sigmas = torch.cat([grid.cpu(), grid.new_zeros(1).cpu()]) if config.final_estimate else grid.cpu()
    for x in held_out_noises(config, 2, HELD_OUT, shape, params.is_flow, grid[0], dtype):
        fine, teacher = (teacher_end(denoiser, x, subdivide(grid, m), config.teacher, config.final_estimate)
                         for m in (2 * config.teacher_m + 1, config.teacher_m))  # fmt: skip
        student = sample(denoiser, x, sigmas, params, final="estimate")
        euler = x
        for t_cur, t_next in zip(sigmas[:-1].to(x.device), sigmas[1:].to(x.device), strict=True):
            euler = euler_step(denoiser, euler, t_cur, t_next)
        squared += torch.stack([((a - fine).double() ** 2).sum().cpu() for a in (teacher, student, euler)])
        count += x.numel()
    teacher_error, student_error, euler_error = (squared / count).sqrt().tolist()
    return {"teacher_error": teacher_error, "student_error": student_error, "euler_error": euler_error,
            "held_out_noises": count // x[0].numel()}  # fmt: skip
