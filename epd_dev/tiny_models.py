"""Tiny genuine ComfyUI models (random weights, deterministic): SD1.5 UNet (EPS, V), SD3 MMDiT, Flux; a VAE, CLIP
vision and CLIP text towers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

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
    """ComfyUI's layers start uninitialised: fill every parameter and buffer deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.02))


SD3 = {
    "in_channels": 16,
    "patch_size": 2,
    "depth": 2,
    "adm_in_channels": 32,
    "pos_embed_max_size": 16,
    "num_patches": 256,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
    "pos_embed_scaling_factor": None,
}

FLUX = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": False,
}

KINDS = ("eps", "v", "sd3", "flux")


def flux_config() -> dict:
    """``FLUX`` plus what this ComfyUI's ``FluxParams`` requires: newer versions need ``txt_ids_dims`` (Flux 1: none),
    which older ones reject."""
    import dataclasses

    import comfy.ldm.flux.model

    config = dict(FLUX)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []
    return config


def tiny_model(kind: str = "eps", seed: int = 0):
    """A ModelPatcher of a real ComfyUI architecture with random weights.

    ``eps`` / ``v``: SD1.5 UNet (discrete schedule, EPS or V-prediction); ``inpaint``: its EPS inpainting form (9 input
    channels: the latent, the mask, the masked image); ``sd3``: MMDiT with
    ``ModelSamplingDiscreteFlow`` (shift 3); ``flux``: Flux with ``ModelSamplingFlux`` (mu 1.15); ``flux2``:
    ComfyUI's Flux 2 model class and sampling (``ModelSamplingFlux``, mu 2.02) around the tiny Flux network with Flux
    2's 128 latent channels.
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if kind in ("eps", "v", "inpaint"):
        config = comfy.supported_models.SD15(dict(UNET, in_channels=9 if kind == "inpaint" else 4))
        mtype = comfy.model_base.ModelType.V_PREDICTION if kind == "v" else comfy.model_base.ModelType.EPS
        model = comfy.model_base.BaseModel(config, model_type=mtype)
        if kind == "inpaint":  # as ComfyUI loads a 9-channel SD1.5 checkpoint: the mask and masked image concatenated
            model.set_inpaint()
    elif kind == "sd3":
        model = comfy.supported_models.SD3(dict(SD3)).get_model({})
    elif kind == "flux":
        model = comfy.supported_models.Flux(flux_config()).get_model({})
    elif kind == "flux2":  # ComfyUI's Flux 2 model class (its scheduling) over the tiny Flux network
        model = comfy.supported_models.Flux2({**flux_config(), "in_channels": 128, "out_channels": 128}).get_model({})
    else:
        raise ValueError(kind)
    _init(model.diffusion_model, seed)
    model.diffusion_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


@contextmanager
def network_calls(model) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """The batch size and timesteps of every call of ``model``'s network (a ModelPatcher), recorded by a forward hook
    on the network. Not a ComfyUI patch (a unet wrapper or cfg function): under one, EPD's ``auto`` goes point by
    point, so the recorder would change what it records."""
    calls: list[tuple[int, torch.Tensor]] = []
    net = model.model.diffusion_model
    handle = net.register_forward_pre_hook(lambda _, args: calls.append((args[0].shape[0], args[1].detach().clone())))
    try:
        yield calls
    finally:
        handle.remove()


def latent(kind: str, batch: int) -> dict:
    return {"samples": torch.zeros(batch, 16 if kind in ("sd3", "flux") else 4, 8, 8)}


def table_for(kind: str) -> str:
    return {"eps": "sd15-best.pkl", "v": "sd15-best.pkl", "sd3": "sd3-512-best.pkl", "flux": "flux-best.pkl"}[kind]


def conditioning(batch: int, seed: int = 1, tokens: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 32, generator=g), {"pooled_output": torch.randn(batch, 32, generator=g)}]]


VISION = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": 16, "torch_dtype": "float32",
}  # fmt: skip
DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}  # fmt: skip


def _fill(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers start uninitialised: matrices ~ 1/sqrt(fan-in), norm gains ~ 1, biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                value = r / p[0].numel() ** 0.5
            elif name.endswith("weight"):
                value = 1 + 0.1 * r
            else:
                value = 0.1 * r
            p.copy_(value)


def tiny_vae(seed: int = 3):
    """An SD-style KL autoencoder (4 latent channels, 8x downscale) as a ComfyUI ``VAE``."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"embed_dim": 4, "ddconfig": DDCONFIG}}
    autoencoder = AutoencoderKL(**config["params"])
    _fill(autoencoder, seed)
    return comfy.sd.VAE(sd=autoencoder.state_dict(), config=config)


def tiny_clip_vision(tmp_path, seed: int = 4, siglip: bool = False):
    """A CLIP ViT (32x32 images, 16-dim projection) as ComfyUI's ``ClipVisionModel`` (config in ``tmp_path``);
    ``siglip``: ComfyUI's SigLIP form of it (no class token, no pooled embedding: one per patch)."""
    import comfy.clip_vision

    path = tmp_path / f"{'siglip' if siglip else 'clip'}_vision_tiny.json"
    config = dict(VISION, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh") if siglip else VISION
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    _fill(clip_vision.model, seed)
    return clip_vision


def tiny_controlnet(seed: int = 8):
    """A ControlNet of the tiny SD1.5 UNet's shape (hint images at 8x the latent size) as ComfyUI's ``ControlNet``."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management

    net = comfy.cldm.cldm.ControlNet(hint_channels=3, **{k: v for k, v in UNET.items() if k != "out_channels"})
    _fill(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device())


def two_hints(positive: list, negative: list) -> tuple[list, list, list]:
    """``positive`` and ``negative`` under a tiny ControlNet (ControlNetApplyAdvanced, strength 0.9) of 2 hint images,
    zeros then ones; also the list each ControlNet call appends to: per row, whether it got the second hint."""
    import nodes as comfy_nodes

    control = tiny_controlnet()
    hints = torch.stack([torch.zeros(64, 64, 3), torch.ones(64, 64, 3)])
    pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hints, 0.9, 0.0,
                                                                      1.0)  # fmt: skip
    seen: list = []
    control.control_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["hint"].flatten(1).mean(1) > 0.5), with_kwargs=True
    )
    return pos, neg, seen


def tiny_wan_vae(seed: int = 7):
    """A Wan 2.1 video VAE (16 latent channels, 8x spatial and 4x temporal downscale) at width 8, loaded by ComfyUI
    from its state dict as a user's file is."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)  # fmt: skip
    _fill(vae, seed)
    return comfy.sd.VAE(sd=vae.state_dict())


def tiny_clip(hidden: int = 16, seed: int = 5):
    """An SD1-style CLIP-L text encoder (ComfyUI's SD1ClipModel and its bundled tokenizer) at width ``hidden``."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    size = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": 2, "num_hidden_layers": 2}
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": size})
    _fill(clip.cond_stage_model, seed)
    return clip
