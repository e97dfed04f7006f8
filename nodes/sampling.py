"""EPD inside ComfyUI's sampler contract (``KSAMPLER``).

The core's :func:`~epd_core.solver.sample` runs on ComfyUI's model callable
``model(x, sigma, **extra_args)``. This module adds what ComfyUI needs:

* the K points of a step go to the model as one call of batch ``K*B``,
  point-major, so ComfyUI's conditioning tiling lines up (a conditioning batch that
  does not divide B is first repeated to B, as ComfyUI gives it at batch B); inpainting
  inputs (``denoise_mask``, the wrapper's ``noise`` and ``latent_image``) are tiled the same way;
* ``parallel``: ``batched`` (one call), ``sequential`` (one call per point) or
  ``auto``: sequential when a conditioning or a model patch may read only the first
  sigma of a batch (ControlNet, hooks, timestep ranges; a mask function, cfg functions,
  block or attention patches, wrappers) or when a guider makes its own prediction, else
  as many points per call as ComfyUI's memory estimate allows; an out-of-memory
  error on a batched call redoes that call point by point, and so goes the rest of the run;
* ``continuous_time``: discrete-time models see the exact continuous timestep
  of each sigma (the authors' interpolation) instead of ComfyUI's nearest integer;
* ``convention``: ``comfyui`` keeps ComfyUI's start/end scaling; ``authors``
  undoes it so the latent equals the authors' sampler started from the same noise.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import comfy.conds
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch
from comfy.utils import repeat_to_batch_size
from tqdm.auto import tqdm

from ..epd_core import EPDParams
from ..epd_core import sample as epd_sample
from ..epd_core.schedules import DiscreteVP
from ..epd_core.solver import FINAL_STEPS
from .comfy_types import BaseModel, Guider, ModelPatcher, ModelSampling, SamplerModel
from .families import check_compatible, is_discrete_model, is_flow_model, resolution_mu
from .scheduling import check_grid

PARALLEL_MODES = ("auto", "batched", "sequential")
CONVENTIONS = ("comfyui", "authors")
_FIRST_SIGMA_ONLY = ("control", "hooks", "timestep_start", "timestep_end")
# Model patches that may read one sigma per batch (DifferentialDiffusion's mask, APG, Skip Layer Guidance, Deep
# Shrink's block patches, attention replacements; a cfg function such as RenormCFG's, which also needs a batch of one;
# ChromaRadianceOptions' legacy model wrapper): a batch of K time points would get point 0's treatment.
_FIRST_SIGMA_PATCHES = (
    "denoise_mask_function", "sampler_pre_cfg_function", "sampler_post_cfg_function", "sampler_cfg_function",
    "sampler_calc_cond_batch_function", "model_function_wrapper",
)  # fmt: skip
# Wrappers around each model call (EasyCache, LazyCache: they decide on the first sigma of a call and keep state
# sized to its batch); the sampling-wide ones (outer_sample, sampler_sample, prepare_sampling) see no single call.
_PER_CALL_WRAPPERS = ("calc_cond_batch", "predict_noise", "apply_model", "diffusion_model")

log = logging.getLogger("epd")


class _ContinuousTime:
    """Mixin for ``ModelSamplingDiscrete``: fractional timesteps from the authors' interpolation."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        vp = self.__dict__.get("_epd_vp")
        if vp is None:
            vp = DiscreteVP(1.0 / (1.0 + self.sigmas.detach().to("cpu", torch.float64) ** 2))
            self.__dict__["_epd_vp"] = vp
        t = vp.timestep(sigma.detach().to("cpu", torch.float64)).clamp(0, len(vp.t_array) - 1)
        # at least float32: a bfloat16 sigma's timestep 999 would round to 1000, past the model's last one
        return t.to(device=sigma.device, dtype=torch.promote_types(sigma.dtype, torch.float32))


def model_latent(model: ModelPatcher, latent: dict) -> torch.Tensor:
    """A LATENT's samples as ComfyUI's samplers take them: an empty latent of another latent format (a 4-channel Empty
    Latent Image for SD3 or FLUX) gets the model's channels (ComfyUI 0.33 also its own downscale ratios, so Flux 2's
    resolution is the converted latent's)."""
    fix = comfy.sample.fix_empty_latent_channels
    ratios = ("downscale_ratio_spacial", "downscale_ratio_temporal")
    extra = [latent.get(k) for k in ratios] if len(inspect.signature(fix).parameters) > 2 else []
    return fix(model, latent["samples"], *extra)


# The guidance scales a guider keeps (CFGGuider's cfg; DualCFGGuider's cfg1 / cfg2, its inputs cfg_conds /
# cfg_cond2_negative; PerpNegGuider's neg_scale; LTXV's dual guider's video / audio cfg), by the input that sets them.
_GUIDANCE_SCALES = {"cfg": "cfg", "cfg1": "cfg_conds", "cfg2": "cfg_cond2_negative", "neg_scale": "neg_scale",
                    "video_cfg": "video_cfg", "audio_cfg": "audio_cfg"}  # fmt: skip


def check_cfg(guider: Guider | None) -> None:
    """A non-finite guidance scale gives an all-NaN latent: refuse it (each scale the guider keeps)."""
    for name, shown in _GUIDANCE_SCALES.items():
        value = getattr(guider, name, None)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            where = "" if name == "cfg" else f" (of the guider {type(guider).__name__})"
            raise ValueError(f"{shown} must be a finite number, got {value}{where}")


def continuous_model_sampling(model_sampling: ModelSampling) -> ModelSampling:
    """A copy of a discrete ``model_sampling`` whose ``timestep`` is continuous."""
    patched = copy.copy(model_sampling)
    patched.__class__ = type(
        f"EPDContinuous{type(model_sampling).__name__}", (_ContinuousTime, type(model_sampling)), {}
    )
    return patched


def _run_conds(guider: Guider | None, second_model: bool = False) -> Iterator[dict]:
    """Each conditioning of the guider's run (its processed ``conds``), and with ``second_model`` those of
    DualModelGuider's negative model too (0.33)."""
    lists = [*(getattr(guider, "conds", None) or {}).values()]
    if second_model:
        lists.append(getattr(guider, "_uncond_conds", None))
    for cond_list in lists:
        yield from (cond for cond in cond_list or () if isinstance(cond, dict))


def _controls(guider: Guider | None) -> Iterator:
    """Every ControlNet of the guider's conditionings of this run, each chain followed through
    ``previous_controlnet`` (DualModelGuider's negative conditionings included)."""
    seen: set[int] = set()
    for cond in _run_conds(guider, second_model=True):
        yield from control_chain(cond.get("control"), seen)


def control_chain(control: object, seen: set[int] | None = None) -> Iterator:
    """A ControlNet and those it chains through ``previous_controlnet``, each once (``seen``: ids met before)."""
    seen = set() if seen is None else seen
    while control is not None and id(control) not in seen:
        seen.add(id(control))
        yield control
        control = getattr(control, "previous_controlnet", None)


@contextmanager
def exact_timesteps(
    base: BaseModel | None, enabled: bool = True, guider: Guider | None = None
) -> Iterator[Callable[[], None]]:
    """While inside, a discrete model ``base`` sees continuous timesteps, and so do what else turns this run's sigmas
    into timesteps: the ControlNets of ``guider``'s conditionings (each keeps the model sampling it captured before the
    run) and DualModelGuider's negative model. Restored on exit (also on interrupt).

    Yields ``refresh``, to call after ComfyUI loaded a model back that it had unloaded (training, when a feature
    encoder or reward model took the memory): reloading re-sets the model's object patches, so a
    ``ModelSamplingDiscrete`` node's (v-prediction, zero terminal SNR) replaced the continuous one and the rest of
    the run got ComfyUI's rounded timesteps."""
    owners = [(base, "model_sampling"), (getattr(guider, "uncond_inner", None), "model_sampling")]
    owners += [(control, "model_sampling_current") for control in _controls(guider)]
    saved = []
    for owner, name in owners:
        model_sampling = getattr(owner, name, None)
        if enabled and model_sampling is not None and is_discrete_model(model_sampling):
            saved.append((owner, name, model_sampling))

    def refresh() -> None:
        for owner, name, _ in saved:
            current = getattr(owner, name, None)
            if current is not None and is_discrete_model(current):  # not the continuous copy: re-patched
                setattr(owner, name, continuous_model_sampling(current))

    try:
        for owner, name, model_sampling in saved:
            setattr(owner, name, continuous_model_sampling(model_sampling))
        yield refresh
    finally:
        for owner, name, model_sampling in saved:
            setattr(owner, name, model_sampling)


@contextmanager
def epd_run(model: SamplerModel, params: EPDParams, x: torch.Tensor, parallel: str, continuous_time: bool,
            sigmas: torch.Tensor, model_options: dict | None = None, plugin: bool = False,
            ) -> Iterator[tuple[bool | int, ModelSampling | None]]:  # fmt: skip
    """Checks the table, the grid and cfg against ComfyUI's wrapped model, picks how the K points are batched
    (``model_options``: the sampler's, whose patches ``auto`` looks at), patches time. ``plugin``: for EPD Plugin.

    Yields ``(mode, model_sampling)``: ``mode`` for :func:`epd_core.sample`'s ``parallel``.
    """
    guider = getattr(model, "inner_model", None)
    base = getattr(guider, "inner_model", None)
    model_sampling = getattr(base, "model_sampling", None)
    check_cfg(guider)
    if model_sampling is not None:
        check_compatible(params, model_sampling)
        mu = resolution_mu(base, x.shape, params.num_steps - 1, model_sampling)
        check_grid(params, model_sampling, sigmas, mu, plugin)
    check_context_windows(model_options, sigmas)
    reason = sequential_reason(guider, model_options) if parallel != "sequential" else None
    if parallel == "batched":
        mode: bool | int = True
    elif parallel == "sequential":
        mode = False
    elif reason:
        log.info("EPD: the K points go one by one because of %s (parallel 'batched' batches them anyway)", reason)
        mode = False
    else:
        mode = _points_per_call(guider, params, x)
    with exact_timesteps(base, continuous_time, guider), conds_per_sample(guider, x.shape[0]):
        try:
            yield mode, model_sampling
        except RuntimeError as exc:  # e.g. APG's momentum, sized to the previous call's batch
            if parallel != "batched" or not reason or _is_oom(exc):  # out of memory stays what ComfyUI looks for
                raise
            raise RuntimeError(f"EPD's parallel 'batched' failed under {reason}, which may depend on one call's "
                               f"batch: {exc}. Use parallel 'auto' (the points one by one there)") from exc  # fmt: skip


def _conds_need_sequential(guider: Guider | None) -> bool:
    return any(cond.get(key) is not None for cond in _run_conds(guider) for key in _FIRST_SIGMA_ONLY)


def _per_sample(tensor, batch: int):
    """A conditioning tensor (or list of them) as ComfyUI's tiling gives it at a latent batch of ``batch``, where that
    differs from its tiling over K*B rows (ComfyUI repeats a batch of C by index: row j gets row j mod C, sample j's
    only when C divides B); else the tensor itself."""
    if isinstance(tensor, list):
        fitted = [_per_sample(t, batch) for t in tensor]
        return tensor if all(f is t for f, t in zip(fitted, tensor, strict=True)) else fitted
    size = tensor.shape[0] if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 else 1
    return tensor if size == 1 or (size <= batch and batch % size == 0) else repeat_to_batch_size(tensor, batch)


@contextmanager
def conds_per_sample(guider: Guider | None, batch: int) -> Iterator[None]:
    """The guider's conditionings of this run repeated to the latent batch where their batch does not divide it, so
    that a call of K*B rows gives each point's rows their own sample's conditioning, as a call of B would; a mask of
    more rows than the batch cut to its first B, the rows ComfyUI uses at batch B; ControlNet hints likewise
    (:func:`_tiles_hint`). DualModelGuider's negative conditionings (0.33) too."""
    replaced = []
    for cond in _run_conds(guider, second_model=True):
        mask = cond.get("mask")
        if isinstance(mask, torch.Tensor) and mask.ndim > 0 and mask.shape[0] > batch:
            replaced.append((cond, "mask", mask))
            cond["mask"] = mask[:batch]
        model_conds = cond.get("model_conds")
        for name, value in list((model_conds or {}).items()):
            if isinstance(value, comfy.conds.CONDConstant):  # the same for every row, never tiled
                continue
            fitted = _per_sample(value.cond, batch)
            if fitted is not value.cond:
                replaced.append((model_conds, name, value))
                model_conds[name] = value._copy_with(fitted)
    hints = [(control, control.cond_hint_original) for control in _controls(guider) if _tiles_hint(control, batch)]
    for control, hint in hints:
        control.cond_hint_original, control.cond_hint = repeat_to_batch_size(hint, batch), None
    try:
        yield
    finally:
        for model_conds, name, value in replaced:
            model_conds[name] = value
        for control, hint in hints:
            control.cond_hint_original, control.cond_hint = hint, None


def _tiles_hint(control, batch: int) -> bool:
    """Whether a ControlNet's or T2I-Adapter's hint of M images is to be repeated to the latent batch: ComfyUI tiles
    it over a call's rows by index and keeps it tiled to the first call, so a first call of K*B rows gave point k's
    row j hint (k*B + j) mod M where M does not divide B (a hint of 2B images, which ComfyUI gives the positive's and
    the negative's rows as they are, is left so)."""
    hint = getattr(control, "cond_hint_original", None)
    if not isinstance(hint, torch.Tensor) or hint.ndim < 4:
        return False
    size = hint.shape[0]
    return size > 1 and batch % size != 0 and size != 2 * batch


def first_sigma_reader(guider: Guider | None, model_options: dict | None) -> str | None:
    """What in a sampling context may read only the first sigma of a call: a conditioning's ControlNet, hooks or
    timestep range, or a model patch (:func:`_first_sigma_patch`); None if nothing does."""
    if _conds_need_sequential(guider):
        return "a conditioning with ControlNet, hooks or a timestep range"
    return _first_sigma_patch(model_options)


def sequential_reason(guider: Guider | None, model_options: dict | None) -> str | None:
    """Why the K points of a step cannot share one call, or None: something reads only the first
    sigma of a call (:func:`first_sigma_reader`); a guider with its own ``predict_noise`` (PerpNeg) may combine the
    rows of a call."""
    if reader := first_sigma_reader(guider, model_options):
        return reader
    predict = getattr(type(guider), "predict_noise", None)
    if predict is not None and predict is not comfy.samplers.CFGGuider.predict_noise:
        return f"the guider {type(guider).__name__}, which makes its own prediction from the batch"
    return None


def _first_sigma_patch(model_options: dict | None) -> str | None:
    """The first model patch in ``model_options`` that may read only the first sigma of a batch, or None."""
    options = model_options or {}
    for key in _FIRST_SIGMA_PATCHES:
        if options.get(key):
            return key
    if options.get("context_handler") is not None:
        return "context windows"
    transformer = options.get("transformer_options") or {}
    for key in ("patches", "patches_replace"):
        for name, value in (transformer.get(key) or {}).items():
            if value:
                return f"{key} {name}"
    wrappers = transformer.get("wrappers") or {}
    for kind in _PER_CALL_WRAPPERS:
        for name, value in (wrappers.get(kind) or {}).items():
            if value:
                return f"the {kind} wrapper {name}"
    return None


def check_context_windows(model_options: dict | None, sigmas: torch.Tensor) -> None:
    """Context windows whose handler refuses a sigma between the grid's (ComfyUI 0.3.x: 'No sample_sigmas matched
    current timestep'; a sampler's sub-steps fail the same way) cannot run EPD, whose points lie between them."""
    handler = (model_options or {}).get("context_handler")
    if handler is None or not hasattr(handler, "set_step") or len(sigmas) < 2 or float(sigmas[1]) <= 0:
        return
    grid = sigmas.detach().to("cpu", torch.float32)
    between = (grid[0] * grid[1]).sqrt().reshape(1)
    probe = copy.copy(handler)  # set_step may record the step it found
    try:
        probe.set_step(between, {"transformer_options": {"sample_sigmas": grid}})
    except Exception:  # noqa: BLE001 - ComfyUI raises a bare Exception here
        raise ValueError(
            "the context windows of this ComfyUI accept only the grid's own sigmas (multi-step samplers fail the same "
            "way), and EPD evaluates between them: update ComfyUI (0.33 accepts them) or sample without context "
            "windows"
        ) from None


def _points_per_call(guider, params: EPDParams, x: torch.Tensor) -> int:
    """How many of the K points fit one call, by ComfyUI's own memory estimate of one conditioning's rows (ComfyUI
    runs the negative in the same call only where both fit, and none at cfg 1)."""
    base = getattr(guider, "inner_model", None)
    if base is None or not hasattr(base, "memory_required"):
        return params.num_points
    device = x.device
    patcher = getattr(base, "current_patcher", None)
    if patcher is not None and hasattr(patcher, "get_free_memory"):
        free = patcher.get_free_memory(device)
    else:
        free = comfy.model_management.get_free_memory(device)
    per_point = base.memory_required([x.shape[0]] + list(x.shape[1:]))
    if per_point <= 0:
        return params.num_points
    return max(1, min(params.num_points, int(free // (1.5 * per_point))))


class _ComfyDenoiser:
    """``denoiser(x, sigma)`` over ComfyUI's wrapped model, tiling inpainting inputs for K*B batches. With
    ``one_sigma_per_call`` a batch of several sigmas goes as one call per run of equal sigma (for conditionings and
    patches that read only the first sigma of a call; the core's batches run point-major, one sigma per point), each
    padded to whole sets of ``rows`` rows (the conditionings' inputs, see :meth:`_aligned`)."""

    def __init__(self, model, extra_args: dict, batch: int, one_sigma_per_call: bool = False, rows: int = 1) -> None:
        self.model = model
        self.extra_args = extra_args
        self.batch = batch
        self.one_sigma_per_call = one_sigma_per_call
        self.rows = rows
        self.one_point = False  # set by an out-of-memory batched call: the rest of the run goes point by point

    def _call(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()  # between chunks, teacher steps, ...
        n = x.shape[0] // self.batch
        mask = self.extra_args.get("denoise_mask")
        if n == 1 or mask is None:
            return self.model(x, sigma, **self.extra_args)
        tiled = dict(self.extra_args, denoise_mask=torch.cat([mask] * n) if mask.shape[0] == self.batch else mask)
        saved = {name: getattr(self.model, name, None) for name in ("noise", "latent_image")}
        try:
            for name, value in saved.items():
                if isinstance(value, torch.Tensor) and value.shape[0] == self.batch:
                    setattr(self.model, name, torch.cat([value] * n))
            return self.model(x, sigma, **tiled)
        finally:
            for name, value in saved.items():
                setattr(self.model, name, value)

    def finish(self, estimate: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``estimate`` standing in for the model's answer at ``sigma``, as ComfyUI's inpainting wrapper makes every
        answer (``KSamplerX0Inpaint``): the source latent where the noise mask keeps it."""
        mask, latent = self._mask(sigma), getattr(self.model, "latent_image", None)
        if mask is None or latent is None:
            return estimate
        return estimate * mask + latent * (1.0 - mask)

    def settle(self, x: torch.Tensor, start: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """``x`` at the grid's last sigma, with the area the noise mask keeps where ComfyUI's samplers leave it
        (unchanged where that sigma is 0: the estimate's ``finish`` has put the source there already). The inpainting
        wrapper answers the source there, and for a constant answer their steps are exact, taking the
        ``start`` at ``sigmas[0]`` along the ODE to the source plus ``(start - source) * sigmas[-1] / sigmas[0]``.
        EPD's steps, whose sum of weight * scale_dir need not be 1, are not exact for it."""
        if float(sigmas[-1]) <= 0:
            return x
        sigma = sigmas[-1].to(x).expand(x.shape[0])
        mask, latent = self._mask(sigma), getattr(self.model, "latent_image", None)
        if mask is None or latent is None:
            return x
        kept = latent + (start - latent) * float(sigmas[-1] / sigmas[0])
        return x * mask + kept * (1.0 - mask)

    def _mask(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """The noise mask at ``sigma``, through the model's mask function (DifferentialDiffusion) as ComfyUI's
        inpainting wrapper applies it; None without one."""
        mask = self.extra_args.get("denoise_mask")
        mask_function = self.extra_args.get("model_options", {}).get("denoise_mask_function")
        if mask is None or mask_function is None:
            return mask
        return mask_function(sigma, mask, extra_options={"model": self.model.inner_model, "sigmas": self.model.sigmas})

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.one_sigma_per_call and sigma.numel() > 1 and bool((sigma != sigma[0]).any()):
            starts = [0, *((sigma[1:] != sigma[:-1]).nonzero().flatten() + 1).tolist(), sigma.shape[0]]
            return torch.cat([self._aligned(x[a:b], sigma[a:b], a) for a, b in zip(starts, starts[1:], strict=False)])
        if x.shape[0] == self.batch or self.one_point:
            return self._points(x, sigma)
        try:
            return self._call(x, sigma)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if torch.is_grad_enabled():  # point by point would not match what autograd saved (checkpointing)
                raise torch.OutOfMemoryError(
                    f"out of memory on a model call of {x.shape[0]} latents while training: lower EPD Distill's "
                    "micro_batch (or batch), or the latent size"
                ) from None
        # Past the except block: the failed call's activations go with its traceback (as ComfyUI's VAE fallback).
        log.warning("EPD: out of memory on a batch of %d; the points go one by one for the rest of the run", len(x))
        self.one_point = True
        comfy.model_management.soft_empty_cache(True)
        return self._points(x, sigma)

    def _aligned(self, x: torch.Tensor, sigma: torch.Tensor, offset: int) -> torch.Tensor:
        """The rows ``offset`` on of a batch, called as whole sets of :attr:`rows` rows: ComfyUI gives a call's row j
        the prompt, mask or hint j mod their count, so a run of one sigma starting inside a set (RDPO's rollouts, each
        on its own table, go one row per call) is padded with copies of its first and last rows."""
        before = offset % self.rows
        after = -(before + len(x)) % self.rows
        if not before and not after:
            return self._call(x, sigma)
        first, last = torch.zeros(before, dtype=torch.long), torch.full((after,), len(x) - 1)
        index = torch.cat([first, torch.arange(len(x)), last]).to(x.device)
        return self._call(x[index], sigma[index])[before : before + len(x)]

    def _points(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """One call per latent batch (per point of a K*B batch)."""
        if x.shape[0] == self.batch:
            return self._call(x, sigma)
        parts = [self._call(x[i : i + self.batch], sigma[i : i + self.batch]) for i in range(0, len(x), self.batch)]
        return torch.cat(parts)


def _is_oom(exc: BaseException) -> bool:
    """An out-of-memory error as ComfyUI tells them (0.33 also counts accelerator errors saying so)."""
    is_oom = getattr(comfy.model_management, "is_oom", None)
    return bool(is_oom(exc)) if is_oom is not None else isinstance(exc, comfy.model_management.OOM_EXCEPTION)


def epd_sampler_function(
    model: SamplerModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    params: EPDParams,
    parallel: str = "auto",
    continuous_time: bool = True,
    convention: str = "comfyui",
    final: str = "denoise",
) -> torch.Tensor:
    """The ``KSAMPLER`` function: EPD on ComfyUI's model wrapper."""
    if sigmas.shape[-1] < 2:  # no step: the latent as it is, as ComfyUI's samplers return it
        return x
    extra_args = {} if extra_args is None else extra_args
    sigmas = sigmas.detach().to("cpu", torch.float64)
    options = extra_args.get("model_options")
    bar = tqdm(total=sigmas.shape[-1] - 1, disable=disable)  # the console bar of ComfyUI's samplers (their trange)

    def step(info: dict[str, Any]) -> None:
        if callback is not None:
            callback(info)
        bar.update(1)

    start = x
    with bar, epd_run(model, params, x, parallel, continuous_time, sigmas, options) as (mode, model_sampling):
        flow = model_sampling is not None and is_flow_model(model_sampling)
        if convention == "authors" and not flow and model_sampling is not None:
            s0 = float(sigmas[0])
            if s0 >= float(model_sampling.sigma_max) * (1 - 1e-5):
                x = x * (s0 / (1.0 + s0**2) ** 0.5)
        den = _ComfyDenoiser(model, extra_args, x.shape[0])
        out = epd_sample(den, x, sigmas, params, callback=step, parallel=mode, final=final, finish=den.finish)
        out = den.settle(out, start, sigmas)
    if convention == "authors" and flow and float(sigmas[-1]) > 0:
        out = out * (1.0 - float(sigmas[-1]))
    return out


def make_sampler(
    params: EPDParams,
    parallel: str = "auto",
    continuous_time: bool = True,
    convention: str = "comfyui",
    final: str = "denoise",
) -> comfy.samplers.KSAMPLER:
    """A ComfyUI ``SAMPLER`` object running the EPD table (``final``: how a trailing sigma 0 is reached, see
    :func:`epd_core.solver.sample`)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if final not in FINAL_STEPS:
        raise ValueError(f"final must be one of {FINAL_STEPS}, got {final!r}")
    options = {"params": params, "parallel": parallel, "continuous_time": continuous_time, "convention": convention,
               "final": final}  # fmt: skip
    return comfy.samplers.KSAMPLER(epd_sampler_function, extra_options=options)
