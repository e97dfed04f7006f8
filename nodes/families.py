"""Which ComfyUI models EPD samples, and whether a table fits one.

A ComfyUI ``model_sampling`` is told apart by the classes it is built from: flow (``CONST``) or not, discrete
(``ModelSamplingDiscrete``'s timesteps) or continuous EDM, a fixed shift or ``ModelSamplingFlux``'s ``mu`` (Flux 2's
follows the latent's resolution, :func:`resolution_mu`). Kinds whose sampling EPD's grid and update do not match
are refused by name (:func:`check_model_family`), and a table of the other family is an error, not a bad image
(:func:`check_compatible`).
"""

from __future__ import annotations

import math

import comfy.model_sampling

from ..epd_core import EPDParams, make_schedule
from .comfy_types import BaseModel, ModelSampling


def is_flow_model(model_sampling: ModelSampling) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def model_type_names(model_sampling: ModelSampling) -> set[str]:
    """The class names a ComfyUI ``model_sampling`` is built from (its prediction type and its sigma schedule)."""
    return {cls.__name__ for cls in type(model_sampling).__mro__}


def is_flux_shift(model_sampling: ModelSampling) -> bool:
    """``ModelSamplingFlux`` (FLUX, Flux 2, Chroma, Qwen-Image, LTXV, ...): its ``shift`` is the grid's ``mu``."""
    return "ModelSamplingFlux" in model_type_names(model_sampling)


# Model kinds EPD does not sample, by the class name of their prediction type or sigma schedule (names, so the
# types of newer ComfyUI versions need no import).
_REFUSED_TYPES = {
    "IMG_TO_IMG_FLOW": "an image-to-image flow model (IMG_TO_IMG_FLOW, e.g. WAN 2.1 FlowRVS)",
    "IMG_TO_IMG_VELOCITY": "an image-to-image velocity model (IMG_TO_IMG_VELOCITY)",
    "IMG_TO_IMG": "an image-to-image model (IMG_TO_IMG)",
    "COSMOS_RFLOW": "a Cosmos rectified-flow model (FLOW_COSMOS, e.g. Cosmos Predict2)",
    "V_PREDICTION_DDPM": "a zero-terminal-SNR v-prediction model (V_PREDICTION_DDPM, e.g. CogVideoX)",
    "StableCascadeSampling": "Stable Cascade's cosine schedule (StableCascadeSampling)",
    "ModelSamplingDiscreteDistilled": "an LCM-distilled schedule (ModelSamplingDiscrete 'lcm': 50 timesteps, for the "
    "lcm sampler)",
}


SUPPORTED_MODELS = (
    "EPD supports discrete-time EPS and v-prediction models (SD1.5, SDXL, ...) with discrete tables, flow models "
    "with a static shift (SD3, Wan, HunyuanVideo, Z-Image, ...) or ModelSamplingFlux (FLUX, Flux 2, Chroma, "
    "Qwen-Image, LTXV, ...) with flow tables, and continuous EDM models with EDM tables"
)


def resolution_mu(
    base_model: BaseModel | None,
    latent_shape: tuple[int, ...] | None,
    steps: int,
    model_sampling: ModelSampling | None = None,
) -> float | None:
    """Flux 2's ``mu`` for this latent size and number of steps, as ComfyUI's Flux2Scheduler computes it (its
    tokens are the latent's pixels); None for every other model, whose grid does not depend on the resolution, and
    for a Flux 2 whose ``model_sampling`` (the one sampling uses) a ModelSamplingFlux node set to another mu: that
    mu decides, as in ComfyUI's own schedulers."""
    if type(base_model).__name__ != "Flux2" or latent_shape is None or len(latent_shape) < 4:
        return None
    own = getattr(getattr(base_model, "model_config", None), "sampling_settings", {}).get("shift")
    shift = getattr(model_sampling, "shift", None)
    if own is not None and shift is not None and not math.isclose(float(shift), float(own), rel_tol=1e-6):
        return None
    from comfy_extras.nodes_flux import compute_empirical_mu

    return float(compute_empirical_mu(int(latent_shape[-2]) * int(latent_shape[-1]), steps))


def check_model_family(model_sampling: ModelSampling) -> None:
    """Refuse, by name, the model kinds whose sampling EPD's grid and update do not match."""
    names = model_type_names(model_sampling)
    for name, what in _REFUSED_TYPES.items():
        if name in names:
            raise ValueError(f"EPD cannot sample {what}. {SUPPORTED_MODELS}")
    noise_scale = float(getattr(model_sampling, "noise_scale", 1.0))
    if noise_scale != 1.0:
        raise ValueError(
            f"EPD cannot sample a flow model with noise_scale {noise_scale:g} (e.g. HiDream-O1): its tables are made "
            f"for unit noise. {SUPPORTED_MODELS}"
        )


def is_discrete_model(model_sampling: ModelSampling) -> bool:
    return type(model_sampling).timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep


def check_compatible(params: EPDParams, model_sampling: ModelSampling) -> None:
    """A model kind EPD does not sample, or a flow table on an EPS/V model (or the reverse), is an error, not a bad
    image."""
    check_model_family(model_sampling)
    if params.backend == "edm" and is_discrete_model(model_sampling):
        raise ValueError(
            f"this EPD table is a continuous-sigma (EDM) table (sigma up to {float(make_schedule(params)[0]):g}), "
            f"made for {_table_model(params)}, and this is a discrete-time model (SD1.5/SDXL-type): its time points "
            "would fall outside this model's sigmas. If the table was fitted on this network under "
            "ModelSamplingContinuousEDM or ModelSamplingContinuousV, add that node with the same settings; otherwise "
            "use a table made for this model (a [download] sd15/... table, or one from EPD Distill)"
        )
    flow = is_flow_model(model_sampling)
    if params.is_flow != flow:
        kind = "rectified-flow (SD3/FLUX)" if params.is_flow else "variance-exploding (SD1.5/SDXL/EDM)"
        model_kind = "a flow model" if flow else "a discrete EPS/V-prediction model"
        if not flow and not is_discrete_model(model_sampling):
            model_kind = "a continuous-sigma (EDM) model"
        raise ValueError(
            f"this EPD table is for {kind} models but the model is {model_kind}: load a table made for this model's "
            "family (the loader's info says which) or fit one with EPD Distill"
        )


def _table_model(params: EPDParams) -> str:
    meta = params.metadata
    return meta.get("model") or meta.get("catalogue_entry") or meta.get("source_file") or "another model"
