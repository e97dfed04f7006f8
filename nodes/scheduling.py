"""A table's time grid expressed in a ComfyUI model's sigmas.

* discrete EPS / V-prediction models: the grid is built from the model's own
  ``alphas_cumprod`` (``1 / (1 + sigmas^2)``), so SD1.5, SDXL and fine-tunes with
  other schedules get the grid the authors' code would build for them;
* flow models: the model's own shift decides (``ModelSamplingSD3`` /
  ``ModelSamplingFlux`` nodes upstream are honoured): a FLUX-style
  ``ModelSamplingFlux`` gives ``mu = shift``, a ``ModelSamplingDiscreteFlow`` a static shift; Flux 2 takes the
  ``mu`` of its resolution and step count, as ComfyUI's Flux2Scheduler does (given a latent);
* ``denoise < 1`` keeps the last ``denoise * steps`` steps of the table's grid, halves rounded up, at least one
  (img2img); denoise 0 gives an empty grid, which ComfyUI treats as "return the input";
* ``final_denoise`` appends 0: the sampler then ends on an x0 (the model's answer, or the last step's own estimate
  under EPD Sampler's ``final_step`` estimate, at no extra call).
"""

from __future__ import annotations

import math

import torch

from ..epd_core import EPDParams, make_schedule
from ..epd_core.schedules import DEFAULT_FLOW_SHIFT
from .comfy_types import ModelSampling
from .families import _table_model, check_compatible, is_discrete_model, is_flow_model, is_flux_shift


def model_schedule(params: EPDParams, model_sampling: ModelSampling, mu: float | None = None) -> torch.Tensor:
    """The table's full grid (float64, ``num_steps`` points) for this model (``mu``: a resolution's, Flux 2); a grid
    starting above the model's largest sigma is refused (the model's answers there are garbage)."""
    grid = _model_schedule(params, model_sampling, mu)
    sigma_max = float(getattr(model_sampling, "sigma_max", math.inf))
    if float(grid[0]) > sigma_max * (1 + 1e-3):
        own = "its own grid" if params.t_steps is not None else "its schedule"
        raise ValueError(
            f"this EPD table's grid ({own}) starts at sigma {float(grid[0]):.4g}, above this model's largest sigma "
            f"{sigma_max:.4g}: it was fitted on a model with another noise schedule (zero terminal SNR, or "
            "ModelSamplingContinuousEDM / V with other settings). Sample it on that model, with the same model "
            "sampling node and settings, or fit a table for this one with EPD Distill"
        )
    return grid


def _model_schedule(params: EPDParams, model_sampling, mu: float | None) -> torch.Tensor:
    check_compatible(params, model_sampling)
    if is_flow_model(model_sampling):
        shift = float(getattr(model_sampling, "shift", DEFAULT_FLOW_SHIFT))
        if is_flux_shift(model_sampling):
            return make_schedule(params, mu=shift if mu is None else mu)
        return make_schedule(params, shift=shift)
    if params.schedule_type == "discrete" or params.backend == "ldm":
        if not is_discrete_model(model_sampling):
            raise ValueError(
                f"this EPD table was made for {_table_model(params)}, a discrete-time model (SD1.5, SDXL, ...): its "
                "grid is that model's timesteps, which this continuous-time model does not have. Use a table made "
                "for this model (an EDM table, or one from EPD Distill)"
            )
        sig = model_sampling.sigmas.detach().to("cpu", torch.float64)
        return make_schedule(params, alphas_cumprod=1.0 / (1.0 + sig**2))
    return make_schedule(params)


def fitted_at(params: EPDParams, model_sampling: ModelSampling, mu: float | None = None) -> EPDParams:
    """``params`` recording the flow shift or ``mu`` its grid takes on this model (``mu``: a resolution's, Flux 2),
    for a table trained there: :func:`model_schedule` takes the model's, not the table's, so a table trained from a
    shift-3 start under ModelSamplingSD3 at 6 is fitted at shift 6. A table with its own grid (which no shift moves)
    and a table or model that is no flow (an error of :func:`model_schedule`'s) are returned as they are."""
    if params.t_steps is not None or not (params.is_flow and is_flow_model(model_sampling)):
        return params
    shift = float(getattr(model_sampling, "shift", DEFAULT_FLOW_SHIFT))
    if is_flux_shift(model_sampling):
        return params.replace(flowmatch_mu=shift if mu is None else mu, flowmatch_shift=None)
    return params.replace(flowmatch_shift=shift, flowmatch_mu=None)


def epd_sigmas(
    params: EPDParams,
    model_sampling: ModelSampling,
    denoise: float = 1.0,
    final_denoise: bool = False,
    mu: float | None = None,
) -> torch.Tensor:
    """SIGMAS for ComfyUI (float32, as its own schedulers): the table's grid, cut for ``denoise``, maybe ending in 0."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    grid = model_schedule(params, model_sampling, mu)
    if denoise == 0.0:
        return torch.zeros(0)
    steps = max(1, math.floor(denoise * (params.num_steps - 1) + 0.5 + 1e-9))  # halves up; at least the last step
    grid = grid[-(steps + 1) :]
    if final_denoise:
        grid = torch.cat([grid, grid.new_zeros(1)])
    return grid.float()


def check_grid(
    params: EPDParams,
    model_sampling: ModelSampling,
    sigmas: torch.Tensor,
    mu: float | None = None,
    plugin: bool = False,
) -> None:
    """The sigmas must be the table's own grid for this model (EPD Scheduler's), or its last steps (``denoise``),
    optionally ending in 0: a grid of another length or spacing would run the table's steps at the wrong times.
    With a resolution's ``mu`` (Flux 2) the grid of the model's own ``mu`` is accepted too: EPD Scheduler's without
    its optional latent. ``plugin``: the error is for EPD Plugin, whose user keeps a base sampler EPD KSampler lacks."""
    positive = sigmas[:-1] if sigmas.shape[0] >= 2 and float(sigmas[-1]) == 0.0 else sigmas
    n = positive.shape[0]
    grids = [model_schedule(params, model_sampling, option) for option in dict.fromkeys((mu, None))]
    for grid in grids:
        if 1 <= n <= grid.shape[0] and torch.allclose(positive.double(), grid[-n:].float().double(), rtol=1e-5, atol=0):
            return
    grid = grids[0]
    zero = " + a final 0" if n < sigmas.shape[0] else ""
    got = f"{n} time points{zero}" + (f" from {float(sigmas[0]):.4g} to {float(positive[-1]):.4g}" if n else "")
    raise ValueError(
        f"the sigmas are not this EPD table's grid: got {got}, but the table's grid for this model has "
        f"{grid.shape[0]} time points from {float(grid[0]):.4g} to {float(grid[-1]):.4g} (a denoise < 1 keeps its last "
        f"ones){_grid_difference(positive, grid)}. Use EPD Scheduler with the same model and table for the sigmas"
        + ("" if plugin else ", or EPD KSampler")
    )


def _grid_difference(positive: torch.Tensor, grid: torch.Tensor) -> str:
    """Where sigmas that are not the table's grid part from it, for :func:`check_grid`'s error."""
    n = positive.shape[0]
    rises = (positive[1:] >= positive[:-1]).nonzero()
    if n >= 2 and bool((positive[1:] > positive[:-1]).all()):
        return (
            ". These sigmas increase (FlipSigmas: unsampling, from the image toward noise); an EPD table steps only "
            "from noise toward the image, so unsample with another sampler (e.g. euler) and sample back with EPD"
        )
    zeros = (positive <= 0).nonzero()
    if zeros.numel():
        j = int(zeros[0])
        return f"; time point {j + 1} is {float(positive[j]):.4g}: only the last sigma may be 0"
    if rises.numel():
        j = int(rises[0])
        return (
            f"; time point {j + 2} ({float(positive[j + 1]):.4g}) is not below time point {j + 1} "
            f"({float(positive[j]):.4g}): sigmas must decrease (a 0 may end them)"
        )
    if not 1 <= n <= grid.shape[0]:
        return ""
    for start in range(grid.shape[0] - n):  # a part that ends before the grid's end (the tail is the grid's own)
        if torch.allclose(positive.double(), grid[start : start + n].double(), rtol=1e-5, atol=0):
            which = f"time point {start + 1}" if n == 1 else f"time points {start + 1} to {start + n}"
            which = f"first {n} time points" if start == 0 and n > 1 else which
            return (
                f". These are the grid's {which}: EPD runs only a grid's last steps (the low part of "
                "SplitSigmas), so run another sampler on the first part and EPD on the rest"
            )
    tail = grid[-n:].double()
    parted = (~torch.isclose(positive.double(), tail, rtol=1e-5, atol=0)).nonzero()
    if parted.numel() == 0:
        return ""
    j = int(parted[0])
    return (
        f"; time point {j + 1} of the last {n} is {float(positive[j]):.4g} where the table's is {float(tail[j]):.4g} "
        "(a table fixes the spacing of its steps, not only their ends)"
    )
