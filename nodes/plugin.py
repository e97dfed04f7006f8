"""EPD Plugin inside ComfyUI: a built-in sampler whose model calls at grid points get EPD's ensemble prediction.

Only samplers on an allow-list are wrapped (deterministic, one model call per grid point); the core's
:class:`~epd_core.plugin.PluginDenoiser` also stops at run time a sampler that calls the model elsewhere.
"""

from __future__ import annotations

import comfy.samplers
import torch

from ..epd_core import EPDParams
from ..epd_core.plugin import PluginDenoiser
from .sampling import PARALLEL_MODES, _ComfyDenoiser, epd_run

# The allow-list: deterministic bases with one model call per grid point (checked at run time as well). Anything
# else (stochastic samplers, several calls per step such as heun or exp_heun_2_x0, samplers added later) is refused.
PLUGIN_BASES = (
    "euler", "ddim", "dpmpp_2m", "lms", "ipndm", "ipndm_v", "deis", "res_multistep", "gradient_estimation",
    "uni_pc", "uni_pc_bh2",
)  # fmt: skip


def base_sampler_name(sampler) -> str:
    """The ComfyUI name of a KSAMPLER's function (``sample_dpmpp_2m`` -> ``dpmpp_2m``)."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", type(sampler).__name__)
    name = name.removeprefix("sample_").removesuffix("_function")
    return {"unipc": "uni_pc", "unipc_bh2": "uni_pc_bh2"}.get(name, name)


def table_base(params: EPDParams) -> str:
    """The base a table was trained for: recorded by distillation, else ``euler``.

    The authors' tables (``epd`` and ``ipndm`` students alike) combine the K directions with an Euler-type
    update; an ``ipndm`` table only places its points by iPNDM extrapolation, which the plugin does itself.
    """
    return str(params.metadata.get("plugin_base") or "euler")


class _PluginModel:
    """ComfyUI's model wrapper with the base sampler's calls answered by the EPD plugin."""

    def __init__(self, model, plugin: PluginDenoiser) -> None:
        self._model = model
        self._plugin = plugin

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        return self._plugin(_ComfyDenoiser(self._model, extra_args, x.shape[0]), x, sigma)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def make_plugin_sampler(base, params: EPDParams, parallel: str = "auto", continuous_time: bool = True):
    """Wrap a base ``SAMPLER``: its model calls at grid points get EPD's ensemble prediction.

    Returns the new sampler and an info text (with a warning when the table was trained for another base).
    """
    name = base_sampler_name(base)
    if name not in PLUGIN_BASES:
        raise ValueError(
            f"EPD Plugin does not support the sampler '{name}' (it needs a deterministic sampler with one model call "
            f"per step; supported: {', '.join(PLUGIN_BASES)})"
        )
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")

    def plugin_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        if name in ("uni_pc", "uni_pc_bh2") and float(sigmas[-1]) == 0.0:
            raise ValueError(f"{name} replaces a final sigma 0 by its own grid end; turn final_denoise off")
        grid = sigmas.detach().to("cpu", torch.float64)
        with epd_run(model, params, x, parallel, continuous_time, grid) as (mode, _):
            plugin = PluginDenoiser(params, sigmas, mode)
            return base.sampler_function(
                _PluginModel(model, plugin), x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                **options,
            )  # fmt: skip

    trained = table_base(params)
    info = f"EPD Plugin over {name}: {params.num_points} points per step, NFE {params.nfe}"
    if trained != name and not (trained == "euler" and name == "ddim"):
        info += f". Warning: this table was trained for {trained}, not {name}"
    sampler = comfy.samplers.KSAMPLER(plugin_function, dict(base.extra_options), dict(base.inpaint_options))
    return sampler, info
