"""The exact Gaussian-mixture denoiser as a genuine ComfyUI model.

A ``comfy.model_base.BaseModel`` whose ``_apply_model`` returns the mixture's
posterior mean for the per-sample sigma it is given (computed in float64), so
it goes through ComfyUI's guiders, model patcher and samplers like any
checkpoint, and its ODE solution is known exactly. Forms:

* ``sd15_eps``: EPS model on the Stable Diffusion 1.5 discrete schedule (VE sigmas);
* ``sd3_flow``: rectified flow with SD3's static shift (default 3.0);
* ``flux_flow``: rectified flow with FLUX's dynamic shift ``mu`` (default 1.15);
* ``edm_ve``: continuous EDM sigmas in ``[0.002, 80]`` (the authors' pixel-space ICCV setting).

Latents are ``[B, 4, 8, 8]`` (a 64x64 EmptyLatentImage) with an identity latent format.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base
import torch

from ..epd_core.analytic import GaussianMixture

FORMS = ("sd15_eps", "sd3_flow", "flux_flow", "edm_ve")


class IdentityLatent(comfy.latent_formats.LatentFormat):
    latent_channels = 4
    scale_factor = 1.0


class AnalyticConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = IdentityLatent
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]

    def __init__(self, sampling_settings: dict) -> None:
        super().__init__(dict(self.unet_config))
        self.sampling_settings = sampling_settings


class _NoNetwork(torch.nn.Module):
    """Stands where a checkpoint's network would be; the mixture needs none."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("placeholder", torch.zeros(1))


class AnalyticModel(comfy.model_base.BaseModel):
    """A BaseModel whose prediction is the exact posterior mean of a Gaussian mixture."""

    def __init__(self, mixture: GaussianMixture, form: str, shift: float | None = None) -> None:
        if form == "sd15_eps":
            config, model_type = AnalyticConfig({"beta_schedule": "linear"}), comfy.model_base.ModelType.EPS
        elif form == "sd3_flow":
            config, model_type = (
                AnalyticConfig({"shift": 3.0 if shift is None else shift}),
                comfy.model_base.ModelType.FLOW,
            )
        elif form == "flux_flow":
            config, model_type = (
                AnalyticConfig({"shift": 1.15 if shift is None else shift}),
                comfy.model_base.ModelType.FLUX,
            )
        elif form == "edm_ve":
            config = AnalyticConfig({"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5})
            model_type = comfy.model_base.ModelType.EDM
        else:
            raise ValueError(f"unknown analytic model form {form!r}; expected one of {FORMS}")
        super().__init__(config, model_type=model_type, device=torch.device("cpu"))
        self.mixture = mixture
        self.form = form
        self.diffusion_model = _NoNetwork()

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if tuple(x.shape[1:]) != self.mixture.shape:
            raise ValueError(
                f"EPD Analytic Model works on latents of shape {self.mixture.shape} (a 64x64 EmptyLatentImage); "
                f"got {tuple(x.shape[1:])}"
            )
        sigma = t.reshape(-1).to(torch.float64).expand(x.shape[0]).cpu()
        x64 = x.to(torch.float64).cpu()
        if torch.is_grad_enabled() and self.mixture.means.is_inference():
            # Built under a loader's inference mode; autograd through the model (EPD Distill's objectives through
            # the rollout) cannot save inference tensors: ordinary copies of the same values (see nodes/autograd.py).
            self.mixture = self.mixture.clone()
        if self.form in ("sd15_eps", "edm_ve"):
            denoised = self.mixture.denoise_ve(x64, sigma)
        else:
            denoised = self.mixture.denoise_flow(x64, sigma)
        return denoised.to(device=x.device, dtype=torch.float32)


def analytic_model_patcher(
    form: str, mixture: str | GaussianMixture = "reference", shift: float | None = None
) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI ``MODEL`` (ModelPatcher) for an analytic mixture (a bundled one's name, or any mixture)."""
    gm = GaussianMixture.named(mixture) if isinstance(mixture, str) else mixture
    model = AnalyticModel(gm, form, shift)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
