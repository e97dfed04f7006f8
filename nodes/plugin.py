"""EPD Plugin inside ComfyUI: a built-in sampler whose model calls at grid points are answered by the EPD plugin.

Only samplers on an allow-list are wrapped (deterministic, one model call per grid point, and an update rule the
core knows, :mod:`epd_core.bases`); the core's :class:`~epd_core.plugin.PluginDenoiser` also stops at run time a
sampler that calls the model elsewhere.
"""

from __future__ import annotations

import inspect

import comfy.samplers
import torch

from ..epd_core import EPDParams
from ..epd_core.params import counted
from ..epd_core.plugin import PluginDenoiser, table_placement
from ..epd_core.solver import FINAL_STEPS
from .comfy_types import Sampler
from .sampling import PARALLEL_MODES, _ComfyDenoiser, epd_run

# The allow-list: deterministic bases with one model call per grid point whose update the core mirrors (checked at
# run time as well). Anything else (stochastic samplers, several calls per step such as heun or exp_heun_2_x0,
# UniPC whose corrector moves the state after each call, samplers added later) is refused.
PLUGIN_BASES = (
    "euler", "ddim", "dpmpp_2m", "lms", "ipndm", "ipndm_v", "deis", "res_multistep", "gradient_estimation",
)  # fmt: skip


def base_sampler_name(sampler: Sampler) -> str:
    """The ComfyUI name of a KSAMPLER's function (``sample_dpmpp_2m`` -> ``dpmpp_2m``); ComfyUI's ``ddim`` is its
    Euler with random noise for inpainting."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", type(sampler).__name__)
    name = name.removeprefix("sample_").removesuffix("_function")
    if name == "euler" and (getattr(sampler, "inpaint_options", None) or {}).get("random", False):
        return "ddim"
    return {"unipc": "uni_pc", "unipc_bh2": "uni_pc_bh2"}.get(name, name)


def core_base(name: str) -> str:
    """The core's update rule for a ComfyUI sampler name (``ddim`` is ComfyUI's Euler)."""
    return "euler" if name == "ddim" else name


def plugin_info(name: str, params: EPDParams, final_step: str, parallel: str = "auto") -> str:
    """What the plugin does over ``name`` with this table, and what it costs (``final_step`` denoise: one call more
    when the sigmas end at 0; ``parallel`` sequential: one call per point)."""
    k = params.num_points
    nfe = f"NFE {params.nfe}" + (" (+1 model call when the sigmas end at 0: final_step denoise)"
                                 if final_step == "denoise" else "")  # fmt: skip
    points = counted(k, "point") + (" in one batched call" if parallel != "sequential" else " one call each")
    steps, directions = counted(params.num_steps - 1, "step"), counted(k, "direction")
    if parallel == "sequential":
        nfe += f" in batched rounds; parallel sequential makes {params.evaluations} model calls, each over the batch"
    rounds = f"2 sequential model rounds per step{' (1 on the AFS first step)' if params.afs else ''}"
    placed = table_placement(params)
    if params.student == "carry":
        first = "" if params.afs else ", 2 on the first (its plain prediction: the table has no analytic first step)"
        rounds = f"1 model round per step{first}, like the bare base"
        place = "the points lie along the direction carried from the previous step (no plain prediction)"
        return (
            f"EPD Plugin over {name}: {steps}, {nfe} ({rounds}: {points}; "
            f"{params.evaluations} evaluations per sample). Each step: {place}; the step is EPD's "
            f"weighted sum of the {directions}, and {name} is answered with the x0 for which its own update, "
            "with its own history, takes that step (so the run is the table's carry trajectory)"
        )
    if params.student == "ipndm":
        place = "the table's iPNDM extrapolation of the plain directions places the points (the authors' EPD-Plugin)"
    elif placed == "euler":
        place = "the points lie on the Euler step from the plain prediction (the table is an EPD table)"
    else:
        place = f"{placed}'s own update, fed the plain predictions at the grid points, places the points"
    return (
        f"EPD Plugin over {name}: {steps}, {nfe} ({rounds}: the plain prediction at "
        f"the grid point, then {points}; {params.evaluations} evaluations per sample). Each "
        f"step: {place}; the step is EPD's weighted sum of the {directions}, and {name} is answered with the x0 "
        "for which its own update, with its own history, takes that step (so the run is the table's EPD trajectory)"
    )


class _PluginModel:
    """ComfyUI's model wrapper with the base sampler's calls answered by the EPD plugin."""

    def __init__(self, model, plugin: PluginDenoiser) -> None:
        self._model = model
        self._plugin = plugin

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        return self._plugin(_ComfyDenoiser(self._model, extra_args, x.shape[0]), x, sigma)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def changed_options(base: Sampler) -> dict:
    """A SAMPLER's options that differ from its function's defaults (SamplerLMS at order 4 is KSampler's lms)."""
    empty = inspect.Parameter.empty
    defaults = {name: p.default for name, p in inspect.signature(base.sampler_function).parameters.items()}
    return {name: value for name, value in sorted(base.extra_options.items())
            if defaults.get(name, empty) is empty or defaults[name] != value}  # fmt: skip


def make_plugin_sampler(
    base: Sampler, params: EPDParams, parallel: str = "auto", continuous_time: bool = True, final_step: str = "denoise"
) -> tuple[Sampler, str]:
    """Wrap a base ``SAMPLER``: its model calls at grid points are answered by the EPD plugin; ``final_step`` says
    how sigmas ending in 0 reach it (``denoise``: the base's own call; ``estimate``: the last step's x0 estimate).

    Returns the new sampler and an info text (the base, the table, and whose update places the table's points).
    """
    name = base_sampler_name(base)
    if name not in PLUGIN_BASES:
        raise ValueError(
            f"EPD Plugin does not support the sampler '{name}' (it needs a deterministic sampler with one model call "
            f"per step whose update the plugin knows; supported: {', '.join(PLUGIN_BASES)})"
        )
    changed = changed_options(base)
    if changed:
        raise ValueError(
            f"EPD Plugin supports '{name}' with its default options only (the plugin mirrors its update); got {changed}"
        )
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")

    def plugin_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        if sigmas.shape[-1] < 2:  # no step: the latent as it is, as ComfyUI's samplers return it
            return x
        grid = sigmas.detach().to("cpu", torch.float64)
        model_options = (extra_args or {}).get("model_options")
        with epd_run(model, params, x, parallel, continuous_time, grid, model_options, plugin=True) as (mode, _):
            den = _ComfyDenoiser(model, extra_args or {}, x.shape[0])
            plugin = PluginDenoiser(params, sigmas, mode, base=core_base(name), final=final_step, finish=den.finish)

            def shown(info: dict) -> None:  # previews and denoised_output get EPD's x0, not the base's answer
                callback({**info, "denoised": plugin.x0 if plugin.x0 is not None else info["denoised"]})

            out = base.sampler_function(
                _PluginModel(model, plugin), x, sigmas, extra_args=extra_args, callback=callback and shown,
                disable=disable, **options,
            )  # fmt: skip
        return den.settle(out, x, grid)

    sampler = comfy.samplers.KSAMPLER(plugin_function, dict(base.extra_options), dict(base.inpaint_options))
    return sampler, plugin_info(name, params, final_step, parallel)
