"""A small neural diffusion model trained by this project, as a genuine ComfyUI model.

ComfyUI's own SD-style UNet (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``) in a tiny
configuration (no attention, no text conditioning), trained with ``scripts/train_digits_unet.py`` on
scikit-learn's bundled 8x8 digits. It is an EPS model on the Stable Diffusion 1.5 discrete schedule
(``ModelSamplingDiscrete``, linear betas 0.00085-0.012 over 1000 steps), so ComfyUI's samplers and the EPD
nodes treat it exactly like an SD1.5 checkpoint: ``x = x0 + sigma * eps``, the network sees
``x / sqrt(1 + sigma^2)`` and ComfyUI's timestep for sigma, and predicts ``eps``.

Latents are ``[B, 4, 8, 8]`` (a 64x64 EmptyLatentImage) with an identity latent format: a digit is upsampled
(bilinear) to 16x16 grey levels in ``[-1, 1]`` and pixel-unshuffled into 4 channels of 8x8
(``digits_to_latent``); ``nodes.mnist_model.latent_to_grey`` is the inverse, for previews.

The weights (``demo_models/digits-unet.safetensors``) are read with ``safetensors`` only and must match the
configuration below key for key.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .analytic_model import IdentityLatent

WEIGHTS = Path(__file__).resolve().parents[1] / "demo_models" / "digits-unet.safetensors"
FORMAT = "epd-digits-unet-v1"

# ComfyUI UNetModel keyword arguments (0.98M parameters). Two levels (8x8, 4x4) of 64 channels, one residual
# block each, a plain residual middle block (transformer_depth_middle = -1) and no attention anywhere, so the
# text conditioning that ComfyUI passes is never read. 64 channels, not 32: the UNet's GroupNorm has 32 groups,
# and with one channel per group on an 8x8 map the output norm divides away each image's own noise scale, which
# left the eps prediction a ~9% error at high sigma (x0 error x14 at sigma_max); 32 channels trained as long
# gave samples with noise and overshoot (nearest-neighbour RMS to the data 0.34-0.59 against 0.25 for 64).
UNET_CONFIG = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [0, 0],
    "transformer_depth_output": [0, 0, 0, 0],
    "transformer_depth_middle": -1,
    "num_head_channels": 32,
    "use_spatial_transformer": False,
    "context_dim": None,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "dtype": torch.float32,
}

# ComfyUI's ModelSamplingDiscrete settings: the SD1.5 schedule (these are also its defaults).
SAMPLING_SETTINGS = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}

LATENT_SHAPE = (4, 8, 8)


def config_json() -> str:
    """The UNet configuration as recorded in the weights' metadata."""
    return json.dumps({k: (str(v) if k == "dtype" else v) for k, v in UNET_CONFIG.items()}, sort_keys=True)


def digits_to_latent(images: torch.Tensor) -> torch.Tensor:
    """scikit-learn digits ``[B, 8, 8]`` (grey levels 0..16) -> latents ``[B, 4, 8, 8]`` in ``[-1, 1]``."""
    x = images.to(torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return torch.nn.functional.pixel_unshuffle(x * 2.0 - 1.0, 2)


class DigitsConfig(comfy.supported_models_base.BASE):
    unet_config = UNET_CONFIG
    unet_extra_config = {}
    latent_format = IdentityLatent
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]
    sampling_settings = SAMPLING_SETTINGS

    def __init__(self) -> None:
        super().__init__(dict(self.unet_config))


class DigitsModel(comfy.model_base.BaseModel):
    """ComfyUI's UNet on the SD1.5 EPS schedule; unconditional (any conditioning is accepted and ignored)."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__(DigitsConfig(), model_type=comfy.model_base.ModelType.EPS, device=device)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if tuple(x.shape[1:]) != LATENT_SHAPE:
            raise ValueError(
                f"EPD Demo Digits Model works on latents of shape {LATENT_SHAPE} (a 64x64 EmptyLatentImage); "
                f"got {tuple(x.shape[1:])}"
            )
        # Unconditional: the text conditioning is dropped, so a prompt of any width works.
        return super()._apply_model(x, t, c_concat, None, control, transformer_options or {}, **kwargs)


def read_metadata(path: str | Path = WEIGHTS) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


def load_digits_weights(model: DigitsModel, path: str | Path = WEIGHTS) -> DigitsModel:
    """Load the trained weights (safetensors only); the file must be this configuration, key for key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits model weights {path.name} not found in {path.parent.name}/: the pack's install is incomplete "
            "(reinstall it), or train them with python -m scripts.train_digits_unet"
        )
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not an EPD digits UNet (format {meta.get('format')!r}, expected {FORMAT!r})")
    if json.loads(meta.get("unet_config", "{}")) != json.loads(config_json()):
        raise ValueError(f"{path.name} was trained for another UNet configuration: {meta.get('unet_config')}")
    state = load_file(str(path))
    model.diffusion_model.load_state_dict(state, strict=True)
    return model


def digits_model(path: str | Path = WEIGHTS) -> DigitsModel:
    """The trained model as a ``comfy.model_base.BaseModel`` (on the CPU)."""
    model = DigitsModel(device=torch.device("cpu"))
    return load_digits_weights(model, path)


def digits_model_patcher(path: str | Path = WEIGHTS) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI ``MODEL`` (ModelPatcher) of the trained digits UNet."""
    model = digits_model(path)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
