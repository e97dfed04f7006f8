"""Distillation inside ComfyUI: the core's ``distill`` on a ComfyUI model with its guidance.

ComfyUI prepares a model (loading, conditioning, guidance) only inside
sampling, so distillation runs as a "sampler" passed to ``CFGGuider.sample``,
like ComfyUI's own training node: it receives the ready model callable, trains
with autograd enabled, and hands the input back unchanged. Progress goes to
ComfyUI's progress bar; an interrupt stops it and nothing is saved. An RDPO
reward may run models of its own (a VAE, CLIP) inside that context; loading
them may push the sampled model off the device, so it is loaded back after
each reward call. The table's file (its name, the lock held while training it, its save): :mod:`.table_files`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from ..epd_core import EPDParams
from ..epd_core.checkpoint import CheckpointMismatch, answers, checkpoint_notes, interruptible
from ..epd_core.config import NODE_RDPO_TEACHER_M, DistillConfig, RDPOConfig
from ..epd_core.distill import distill, first_step_mean
from ..epd_core.files import EPDFileError
from ..epd_core.objective import fd_step, recomputed
from ..epd_core.rdpo import GUARD_SAMPLES, fitted_final_estimate, rdpo
from ..epd_core.schedules import DEFAULT_FLOW_SHIFT, polynomial
from ..epd_core.starts import start_errors
from ..epd_core.teachers import subdivide, teacher_end
from .autograd import backward_failure, make_differentiable
from .comfy_types import BaseModel, Conditioning, ModelPatcher, ModelSampling
from .families import is_discrete_model, is_flow_model, is_flux_shift, resolution_mu
from .features import Encoder, final_feature_loss
from .guard import user_error, user_text
from .rewards import Reward
from .sampling import (
    _ComfyDenoiser,
    _first_sigma_patch,
    _is_oom,
    check_cfg,
    check_context_windows,
    control_chain,
    exact_timesteps,
    first_sigma_reader,
)
from .scheduling import fitted_at, model_schedule

log = logging.getLogger("epd")


def start_tables(
    model_sampling: ModelSampling, steps: int, points: int, afs: bool, student: str = "epd"
) -> dict[str, EPDParams]:
    """The untrained start tables EPD Distill chooses from for a ComfyUI model, by name; the first wins a tie.

    An ``epd`` table starts on the model's own grid. A ``carry`` table may also start on a grid of its own between
    the model grid's ends: rho-7 polynomial on EPS models, uniform in t on flow models with a fixed shift; which one
    trains better depends on the model, so :func:`distill_on_model` measures both before training. Flux's
    resolution-dependent grid is the only start there.
    """
    model_grid = _start_for(model_sampling, steps, points, afs, student)
    if student != "carry" or (is_flow_model(model_sampling) and is_flux_shift(model_sampling)):
        return {"model grid": model_grid}
    grid = model_schedule(model_grid, model_sampling)
    lo, hi = float(grid[-1]), float(grid[0])
    if is_flow_model(model_sampling):
        name, own = "uniform grid", torch.linspace(hi, lo, steps, dtype=torch.float64)
    else:
        name, own = "rho-7 grid", polynomial(steps, lo, hi, 7.0)
    if own.shape == grid.shape and torch.allclose(own, grid.to(own), rtol=1e-6, atol=0.0):
        # the model's own grid is that grid already (a continuous EDM model's is rho-7): one start, no check
        return {"model grid": model_grid}
    return {name: model_grid.replace(t_steps=own), "model grid": model_grid}


def start_table(model_sampling: ModelSampling, steps: int, points: int, afs: bool, student: str = "epd") -> EPDParams:
    """The first of :func:`start_tables`: the start a tie keeps."""
    return next(iter(start_tables(model_sampling, steps, points, afs, student).values()))


def _start_for(model_sampling, steps: int, points: int, afs: bool, student: str) -> EPDParams:
    if is_flow_model(model_sampling):
        shift = float(getattr(model_sampling, "shift", DEFAULT_FLOW_SHIFT))
        if is_flux_shift(model_sampling):
            return EPDParams.start(steps, points, schedule_type="flowmatch", schedule_rho=1.0, backend="flux",
                                   flowmatch_mu=shift, afs=afs, student=student)  # fmt: skip
        return EPDParams.start(steps, points, schedule_type="flowmatch", schedule_rho=1.0, backend="sd3",
                               flowmatch_shift=shift, afs=afs, student=student)  # fmt: skip
    if is_discrete_model(model_sampling):
        return EPDParams.start(
            steps, points, schedule_type="discrete", schedule_rho=1.0, backend="ldm", afs=afs, student=student
        )
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    return EPDParams.start(steps, points, schedule_type="polynomial", schedule_rho=7.0, backend="edm", afs=afs,
                           sigma_min=lo, sigma_max=hi, student=student)  # fmt: skip


def model_name(model: ModelPatcher) -> str:
    """The ComfyUI model a table is fitted to, as its metadata's ``model``: its configuration's class (SD15, SDXL,
    SD3, Flux, ...), the graph's checkpoint name being unknown to the node."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    name = type(config).__name__ if config is not None else type(inner).__name__
    return f"a ComfyUI {name} model"


@dataclass
class Session:
    """What a fit gets from ComfyUI's sampling context."""

    denoiser: _ComfyDenoiser
    shape: tuple[int, ...]
    grid: torch.Tensor
    device: torch.device
    progress: Callable[[int, int, float], None]
    latent_out: Callable[[torch.Tensor], torch.Tensor]
    reload: Callable[[], None]


def distill_on_model(
    model: ModelPatcher, positive: Conditioning, negative: Conditioning, cfg: float, latent: torch.Tensor,
    start: EPDParams | dict[str, EPDParams], config: DistillConfig, metadata: dict | None = None,
    encoder: Encoder | None = None, feature_weight: float = 1.0, **resume: Any,
) -> EPDParams:  # fmt: skip
    """Run :func:`epd_core.distill.distill` on a ComfyUI ``MODEL`` with CFG guidance (``resume``: its
    ``checkpoint`` and ``checkpoint_every``, see :func:`resume_options`). With an ``encoder`` the final step's
    loss is ``feature_weight`` times the squared distance of the decoded images' features (:mod:`.features`).
    ``start``: a table, or named candidates (:func:`start_tables`); of several, the one whose untrained samples
    are closest to the teacher is trained (:func:`epd_core.starts.start_errors`), recorded as ``start`` in the
    table's metadata."""
    prompts = sample_inputs(positive, negative)
    config = per_prompt_batch(config, prompts)
    metadata = {**(metadata or {}), "prompts": prompts}
    if encoder is not None:
        metadata["feature_loss"] = {"encoder": encoder.name, "weight": feature_weight}
    if isinstance(start, EPDParams):  # a given table: no check; an earlier run's record of one is not this run's
        start = {"given": start.replace(metadata={k: v for k, v in start.metadata.items() if k != "start"})}
    starts, first = start, next(iter(start.values()))
    ms = model.get_model_object("model_sampling")
    mu = resolution_mu(model.model, latent.shape, first.num_steps - 1, ms)  # Flux 2's, as EPD KSampler takes it
    # a table without its own grid records the shift or mu it is fitted at (the model's), not its start's
    starts = {name: fitted_at(t, ms, mu) for name, t in starts.items()}
    first = next(iter(starts.values()))
    grids = {name: model_schedule(table, ms, mu) for name, table in starts.items()}

    def fit(s: Session) -> EPDParams:
        features = None if encoder is None else final_feature_loss(encoder, feature_weight, s.latent_out, s.reload)
        encoded = None if encoder is None else lambda x: _reloading(s, lambda: encoder.embed(s.latent_out(x)))

        def train(table: EPDParams, grid: torch.Tensor, chosen: dict, drop_mismatch: bool = True) -> EPDParams:
            def run(cfg: DistillConfig, denoiser, extra: dict) -> EPDParams:
                return _resuming(distill, denoiser, table, s.shape, cfg, grid=grid, dtype=torch.float32,
                                 device=s.device, progress=s.progress, metadata={**metadata, **chosen, **extra},
                                 feature_loss=features, checkpoint_key={"feature_loss": metadata.get("feature_loss")},
                                 prompts=prompts, checkpoint_answers=_answers(encoded, s, resume),
                                 checkpoint_notes=chosen, drop_mismatch=drop_mismatch,
                                 fd_step=fd_step(compute_dtype(model)), **resume)  # fmt: skip

            if config.gradient != "autograd":
                return run(config, s.denoiser, {})
            probe = torch.zeros((config.micro_batch or config.batch, *s.shape), device=s.device)
            reason = backward_failure(s.denoiser, probe, grid[:1].to(probe).expand(probe.shape[0]))
            if reason is None:  # through the rollout, each call's activations are recomputed in the backward pass
                return run(config, recomputed(s.denoiser), {})
            # A model with an operation that has no backward pass (ComfyUI 0.33's Flux rope kernel): the per-step
            # objective needs none (finite differences).
            log.warning("EPD Distill: no backward pass through this model (%s); training the per-step objective",
                        reason)  # fmt: skip
            local = dataclasses.replace(config, objective="local", gradient="fd")
            return run(local, s.denoiser, {"fallback": f"objective {config.objective} -> local: {reason}"})

        if len(starts) < 2 or config.start_noises < 1:
            return train(first, s.grid, {})
        noted = _noted_start(resume.get("checkpoint"), starts)
        if noted is not None:  # a resumed run: the start its check chose, not the check again
            name = noted["grid"]
            try:
                table = _with_mean(s, {name: starts[name]}, config)[name]
                return train(table, grids[name].to(s.device), {"start": noted}, drop_mismatch=False)
            except CheckpointMismatch as exc:
                _drop(resume["checkpoint"], exc)
        measured = _with_mean(s, starts, config)
        chosen = _choose_start(s, measured, grids, config)
        return train(measured[chosen["grid"]], grids[chosen["grid"]].to(s.device), {"start": chosen})

    return _train_on_model(model, positive, negative, cfg, latent, first, config, fit)


def compute_dtype(model: ModelPatcher) -> torch.dtype:
    """The dtype ``model`` computes in: its manual-cast dtype (half-precision or fp8 weights cast per layer), else its
    weights'; float32 for a model that says neither (the analytic models' own networks have no dtype)."""
    inner = model.model
    cast = getattr(inner, "manual_cast_dtype", None)
    dtype = cast if cast is not None else getattr(inner, "get_dtype", lambda: None)()
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _with_mean(s: Session, starts: dict[str, EPDParams], config: DistillConfig) -> dict[str, EPDParams]:
    """The candidate starts with the data mean of the mean-aware first step, measured once for all."""
    first = next(iter(starts.values()))
    if not (config.afs_mean and first.afs and first.afs_mean is None):
        return starts
    denoiser = interruptible(s.denoiser, comfy.model_management.throw_exception_if_processing_interrupted)
    mean = first_step_mean(denoiser, first, s.shape, s.grid[0], config, torch.float32, s.device)
    return {name: table.replace(afs_mean=mean) for name, table in starts.items()}


def _choose_start(s: Session, starts: dict[str, EPDParams], grids: dict[str, torch.Tensor],
                  config: DistillConfig) -> dict:  # fmt: skip
    """The start check: which candidate's untrained samples are closest to the teacher, as the ``start`` record of
    the table's metadata (the candidate's name and every candidate's error)."""
    denoiser = interruptible(s.denoiser, comfy.model_management.throw_exception_if_processing_interrupted)
    candidates = {name: (table, grids[name].to(s.device)) for name, table in starts.items()}
    errors = start_errors(denoiser, candidates, s.shape, config, torch.float32,
                          progress=lambda done, total: s.progress(done, total, float("nan")))  # fmt: skip
    name = min(errors, key=errors.get)
    log.info("EPD Distill starts on the %s (untrained error vs the teacher: %s)", name,
             ", ".join(f"{k} {v:.4g}" for k, v in errors.items()))  # fmt: skip
    return {"grid": name, "untrained_error": errors}


def _noted_start(checkpoint: Path | None, starts: dict[str, EPDParams]) -> dict | None:
    """The start check's record in the run's checkpoint (its notes), if it names one of ``starts`` and gives every
    candidate's error; the resumed run then checks that the checkpoint's start table is that one."""
    if checkpoint is None:
        return None
    noted = checkpoint_notes(checkpoint).get("start")
    if not isinstance(noted, dict) or set(noted) != {"grid", "untrained_error"}:
        return None
    if not isinstance(noted["grid"], str) or noted["grid"] not in starts:
        return None
    errors = noted["untrained_error"]
    if not isinstance(errors, dict) or set(errors) != set(starts):
        return None
    if not all(type(v) is float and math.isfinite(v) for v in errors.values()):  # as the check records them
        return None
    return noted


def rdpo_on_model(
    model: ModelPatcher, positive: Conditioning, negative: Conditioning, cfg: float, latent: torch.Tensor,
    start: EPDParams, config: RDPOConfig, teacher_m: int = NODE_RDPO_TEACHER_M, reward: Reward | None = None,
    metadata: dict | None = None, guard: Callable[[torch.Tensor], float] | None = None,
    guard_samples: int = GUARD_SAMPLES, **resume: Any,
) -> tuple[EPDParams, list[float]]:  # fmt: skip
    """Run :func:`epd_core.rdpo.rdpo` on a ComfyUI ``MODEL``.

    ``reward(latents, context)`` scores the rollouts' final latents in ComfyUI's LATENT format (what VAE Decode
    takes); its ``__name__`` is recorded. Default: the fidelity to a DPM-Solver-2 teacher with ``teacher_m``
    extra points per step, from the same noise. A conditioning batch of C prompts trains on all of them:
    ``config.groups`` is rounded up to a multiple of C and rollout ``j`` has prompt ``j % C``, so a group's
    rollouts share one. ``guard(latents) -> metric`` (LATENT format, lower is better): see ``rdpo``.
    """
    prompts = sample_inputs(positive, negative)
    config = per_prompt_groups(config, prompts)
    ms = model.get_model_object("model_sampling")  # the table records the shift or mu it is trained at
    start = fitted_at(start, ms, resolution_mu(model.model, latent.shape, start.num_steps - 1, ms))
    metadata = {**(metadata or {}), "prompts": prompts, **({"teacher_steps": teacher_m} if reward is None else {})}
    # what the reward depends on beyond its name: a checkpoint made with other values is not resumed
    key = {name: metadata.get(name) for name in ("teacher_steps", "reward_prompt", "reward_model")}

    ending = fitted_final_estimate(start)  # the rollouts end as the start was fitted to end

    def fit(s: Session) -> tuple[EPDParams, list[float]]:
        common = dict(dtype=torch.float32, device=s.device, progress=s.progress, metadata=metadata, prompts=prompts,
                      checkpoint_key=key, grid=s.grid, final_estimate=ending, **resume)  # fmt: skip
        if guard is not None:
            common.update(guard=lambda final: guard(s.latent_out(final)), guard_samples=guard_samples)
        if reward is not None:
            scored = in_sampling(reward, s)
            scores = _answers(lambda x: scored(x, torch.arange(x.shape[0], device=x.device)), s, resume)
            return _resuming(rdpo, s.denoiser, start, s.shape, config, reward=scored, checkpoint_answers=scores,
                             **common)  # fmt: skip

        def reference(x0):
            fine = subdivide(s.grid.to(x0.device), teacher_m)
            return teacher_end(s.denoiser, x0, fine, DistillConfig.default("teacher"), denoised=ending)

        return _resuming(rdpo, s.denoiser, start, s.shape, config, reference=reference, **common)

    return _train_on_model(model, positive, negative, cfg, latent, start, config, fit)


def _reloading(s: Session, call: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``call()`` (which may load another model, a feature encoder), then the sampled model loaded back."""
    try:
        return call()
    finally:
        s.reload()


def _answers(model: Callable[[torch.Tensor], torch.Tensor] | None, s: Session, resume: dict) -> torch.Tensor | None:
    """With a checkpoint, what the run's other model (a feature encoder, a reward: model-space latents in) answers
    to fixed inputs, so that a checkpoint made with another one of the same name is not resumed."""
    if model is None or resume.get("checkpoint") is None:
        return None
    return answers(model, s.shape, torch.float32, s.device)


def _resuming(train: Callable, *args, drop_mismatch: bool = True, **options):
    """``train`` (distill or rdpo) with ComfyUI's interrupt checked before every model call; a checkpoint of
    other settings or another model is dropped (logged) and the run starts afresh (or, without ``drop_mismatch``,
    :class:`CheckpointMismatch` is raised)."""
    options["check_interrupt"] = comfy.model_management.throw_exception_if_processing_interrupted
    try:
        try:
            return train(*args, **options)
        except CheckpointMismatch as exc:
            if options.get("checkpoint") is None or not drop_mismatch:
                raise
            _drop(options["checkpoint"], exc)
            return train(*args, **options)
    except EPDFileError as exc:  # a checkpoint that cannot be saved, named as the user knows it
        raise user_error(exc) from None


def _drop(checkpoint: str | os.PathLike, mismatch: CheckpointMismatch) -> None:
    """Remove a checkpoint of another run (logged), so that this run starts afresh."""
    log.warning("EPD: not resuming: %s", user_text(str(mismatch)))
    Path(checkpoint).unlink(missing_ok=True)


def in_sampling(reward: Reward, session: Session) -> Reward:
    """``reward`` on LATENT-format latents inside the sampling; afterwards the sampled model is loaded back."""

    def scored(final: torch.Tensor, context) -> torch.Tensor:
        return _reloading(session, lambda: reward(session.latent_out(final), context))

    scored.__name__ = getattr(reward, "__name__", "custom")
    return scored


def conditioning_batch(*conditionings: Conditioning) -> int:
    """How many rows make one whole set of the conditionings' prompts: ComfyUI tiles each conditioning batch over the
    latent batch by index, so row j has prompt j mod C of each; the sets repeat every lcm of their batches (a
    positive of 3 prompts and a negative of 2: 6). 1 for none."""
    sizes = [c[0].shape[0] for cond in conditionings for c in (cond or []) if isinstance(c[0], torch.Tensor)]
    return math.lcm(*sizes) if sizes else 1


_PER_SAMPLE = ("mask", "concat_latent_image", "concat_mask")
"""A conditioning's batched inputs beside its prompts: ConditioningSetMask's masks, InpaintModelConditioning's images
and masks (which inpainting models read)."""
_RESIZED = ("concat_latent_image", "concat_mask")
"""Of those, the ones ComfyUI resizes to the batch it prepares sampling at, in blocks (of 2 images over 4 rows:
0, 0, 1, 1), before tiling them over each call's batch by index."""


def sample_inputs(*conditionings: Conditioning) -> int:
    """How many rows make one whole set of what the conditionings give each sample: their prompts
    (:func:`conditioning_batch`), their batched masks, inpainting images, reference latents and hints
    (:func:`_per_sample_inputs`) and a pooled output of its own batch (SDXL's, SD3's), which ComfyUI also tiles over
    the latent batch by index (a call whose batch masks do not divide fails). Training batches are multiples of it."""
    extras = [c[1] for cond in conditionings for c in (cond or []) if len(c) > 1 and isinstance(c[1], dict)]
    inputs = [value.shape[0] for extra in extras for value in _per_sample_inputs(extra) if _batched(value)]
    pooled = [p.shape[0] for e in extras if isinstance(p := e.get("pooled_output"), torch.Tensor) and p.ndim > 1]
    return math.lcm(conditioning_batch(*conditionings), *inputs, *pooled)


def _per_sample_inputs(extra: dict) -> list:
    """A conditioning entry's inputs of :data:`_PER_SAMPLE`, its reference latents (ReferenceLatent: Flux Kontext,
    Qwen Image Edit) and its ControlNets' and T2I-Adapters' hint images, each of which ComfyUI tiles over a call's batch
    by index."""
    return [extra.get(key) for key in _PER_SAMPLE] + list(extra.get("reference_latents") or []) + _hints(extra)


def _hints(extra: dict) -> list:
    """The hint images of a conditioning entry's ControlNet chain (``previous_controlnet`` followed). A ControlNet
    keeps its hint tiled to the first call's batch and tiles later calls from that, so a call of fewer rows than a
    whole set of hints (the checkpoint's probe of one row) left every later call the first hint alone."""
    return [getattr(control, "cond_hint_original", None) for control in control_chain(extra.get("control"))]


def _batched(value: object) -> bool:
    """A mask or an image with a batch dimension (``[M, H, W]``, ``[M, C, H, W]``, ...)."""
    return isinstance(value, torch.Tensor) and value.ndim >= 3


def _tiled_inputs(conditioning: Conditioning, batch: int) -> Conditioning:
    """``conditioning`` with its inputs of :data:`_RESIZED` repeated by index to ``batch`` (a multiple of their
    rows), so that ComfyUI's resizing leaves them as they are: resized in blocks, a training call of K points
    (point-major) gave a noise's points and its teacher other images. Row j has image j mod M at every call, as its
    prompt j mod C."""
    out = []
    for entry in conditioning or []:
        extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        tiled = {key: comfy.utils.repeat_to_batch_size(value, batch) for key in _RESIZED
                 if _batched(value := extra.get(key)) and 1 < value.shape[0] != batch}  # fmt: skip
        out.append([entry[0], {**extra, **tiled}, *entry[2:]] if tiled else entry)
    return out


def per_prompt_batch(config: DistillConfig, prompts: int) -> DistillConfig:
    """``config`` with its batch and micro-batch rounded up to a multiple of ``prompts``: ComfyUI tiles a
    conditioning batch over the noises by index, so every iteration then trains on every prompt (the K points line
    up the same way, and so does each micro-batch)."""
    batch, micro = (-(-n // prompts) * prompts for n in (config.batch, config.micro_batch))
    return dataclasses.replace(config, batch=batch, micro_batch=micro)


def per_prompt_groups(config: RDPOConfig, prompts: int) -> RDPOConfig:
    """``config`` with its groups rounded up to a multiple of ``prompts`` (see :func:`per_prompt_batch`)."""
    groups = -(-config.groups // prompts) * prompts
    return config if groups == config.groups else dataclasses.replace(config, groups=groups)


def _largest_gradient_call(config, start: EPDParams) -> int:
    """The latents of the largest model call backpropagated through (micro_batch noises x K points), which has to fit:
    ComfyUI is asked to make room for it. Calls without gradients (teacher, checks, RDPO's rollouts) go point by point
    when they run out of memory."""
    if getattr(config, "gradient", None) != "autograd":
        return 1
    return max(1, config.micro_batch or config.batch) * start.num_points


def _train_on_model(model, positive, negative, cfg, latent, start, config, fit):
    """Run ``fit(session)`` inside ComfyUI's prepared sampling context, on the grid EPD KSampler samples the latent's
    size on (Flux 2's ``mu`` follows the resolution)."""
    model_sampling = model.get_model_object("model_sampling")
    mu = resolution_mu(model.model, latent.shape, start.num_steps - 1, model_sampling)
    grid = model_schedule(start, model_sampling, mu)
    result: dict = {}
    rows = sample_inputs(positive, negative)
    batch = -(-_largest_gradient_call(config, start) // rows) * rows  # the conditionings are prepared at this batch
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(_tiled_inputs(positive, batch), _tiled_inputs(negative, batch))
    guider.set_cfg(cfg)
    check_cfg(guider)  # a NaN passes ComfyUI's range check; the first call would blame the model's precision
    zeros, packed = _training_latent(latent, batch)
    memory, minimum = comfy.sampler_helpers.estimate_memory(model, packed, guider.original_conds)

    def train(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        sampling = model_k.inner_model
        base = sampling.inner_model
        bar = [comfy.utils.ProgressBar(config.iterations)]

        def progress(i: int, n: int, loss: float) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            if n != bar[0].total or i < bar[0].current:  # a new phase (the start check, then training): a new bar,
                bar[0] = comfy.utils.ProgressBar(n)  # as newer ComfyUI sends only values beyond the last one sent
            bar[0].update_absolute(i, n)
            if i == n or i % max(1, n // 20) == 0:  # the training curve in the console, twenty points a run
                shown = f", loss {loss:.4g}" if math.isfinite(loss) else ""  # the start check reports no loss
                log.info("EPD: %d / %d%s", i, n, shown)

        def reload() -> None:
            comfy.model_management.load_models_gpu([sampling.model_patcher, *sampling.loaded_models],
                                                   memory_required=memory, minimum_memory_required=minimum)  # fmt: skip
            continuous()  # a model loaded back has its object patches again (ModelSamplingDiscrete's)

        with exact_timesteps(base, True, sampling) as continuous, torch.inference_mode(False), torch.enable_grad():
            extra = dict(extra_args or {}, denoise_mask=None)
            check_context_windows(extra.get("model_options"), grid)
            reader = first_sigma_reader(sampling, extra.get("model_options"))
            if reader:
                log.info("EPD: %s may read one sigma per call: the student's points go one call per time point", reader)
            den = _ComfyDenoiser(model_k, extra, x.shape[0], one_sigma_per_call=reader is not None, rows=rows)
            session = Session(
                den, tuple(x.shape[1:]), grid.to(x.device), x.device, progress, _latent_out(base, latent), reload
            )
            if getattr(config, "gradient", None) == "autograd":  # distillation through the model
                make_differentiable(base)
            try:
                result["out"] = fit(session)
            except RuntimeError as exc:  # e.g. APG's momentum, sized to the last call's batch; training's vary
                patch = _first_sigma_patch(extra.get("model_options"))
                if patch is None or _is_oom(exc):  # out of memory stays what ComfyUI's tips and unloading look for
                    raise
                raise RuntimeError(
                    f"EPD training failed under {patch}, which may keep state between model calls or need one batch "
                    f"size (training calls the model on batches of several sizes): {exc}. Train on the model from "
                    "before that node; the table samples the patched model too"
                ) from exc
        return x

    guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(train), grid.float(), seed=config.seed)
    return result["out"]


def _latent_out(base: BaseModel, latent: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's latents as a LATENT holds them, for rewards, guards and feature encoders. Of a nested latent,
    which the samplers see packed, its first part (LTX-2's video), as a VAE decodes it."""
    if not getattr(latent, "is_nested", False):
        return base.process_latent_out
    import comfy.utils

    shapes = [part.shape for part in latent.unbind()]
    return lambda x: comfy.utils.unpack_latents(base.process_latent_out(x), shapes)[0]


def _training_latent(latent: torch.Tensor, batch: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zeros of ``latent``'s form with ``batch`` samples, and the shape the samplers see. A nested latent (ComfyUI
    0.33's video with audio, as LTX-2's) stays nested: the guider packs its parts into one ``[B, 1, N]`` latent, as
    it does for sampling, so that training fits the latent EPD KSampler samples (its shape alone is the first
    part's)."""
    if not getattr(latent, "is_nested", False):
        shape = (batch, *latent.shape[1:])
        return torch.zeros(shape), shape
    import comfy.nested_tensor  # only a ComfyUI that makes nested latents has it

    parts = [torch.zeros((batch, *part.shape[1:])) for part in latent.unbind()]
    return comfy.nested_tensor.NestedTensor(parts), (batch, 1, sum(math.prod(p.shape[1:]) for p in parts))
