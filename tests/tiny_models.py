"""Tiny genuine ComfyUI models (random weights, deterministic): an SD1.5-architecture UNet as EPS and as flow."""

from __future__ import annotations

import torch

UNET = {
    "image_size": 32,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 32,
    "use_spatial_transformer": True,
    "in_channels": 4,
    "out_channels": 4,
    "num_head_channels": 16,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def _init(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.02))


def tiny_model(kind: str = "eps", seed: int = 0):
    """A ModelPatcher: ``eps`` (SD1.5 discrete schedule) or ``flow`` (CONST with SD3's shift 3)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(UNET))
    if kind == "eps":
        model = config.get_model({})
    else:
        config.sampling_settings = {"shift": 3.0}
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.FLOW)
    _init(model.diffusion_model, seed)
    model.diffusion_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def conditioning(batch: int, seed: int = 1, tokens: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 32, generator=g), {}]]
