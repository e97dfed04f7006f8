"""Names of the ComfyUI objects the nodes take, for type hints only.

A type checker sees ComfyUI's own classes (the same names in ComfyUI 0.3.75 and 0.33); at run time every name is
``typing.Any`` and nothing of ComfyUI is imported here (the modules' annotations are never evaluated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BaseModel", "CLIP", "ClipVision", "Conditioning", "Guider", "ModelPatcher", "ModelSampling", "Sampler",
           "SamplerModel", "VAE"]  # fmt: skip

if TYPE_CHECKING:
    import torch
    from comfy.clip_vision import ClipVisionModel
    from comfy.model_base import BaseModel
    from comfy.model_patcher import ModelPatcher
    from comfy.samplers import KSAMPLER, CFGGuider, KSamplerX0Inpaint
    from comfy.sd import CLIP, VAE

    ClipVision = ClipVisionModel  # CLIP_VISION
    Guider = CFGGuider  # a GUIDER, and the guider a KSAMPLER's model wraps (``model.inner_model``)
    Sampler = KSAMPLER  # SAMPLER
    SamplerModel = KSamplerX0Inpaint  # the wrapped model a KSAMPLER's function is called with
    ModelSampling = torch.nn.Module  # a model's ``model_sampling`` (ModelSamplingDiscrete, ModelSamplingFlux, ...)
else:
    BaseModel = ModelPatcher = CLIP = VAE = ClipVision = Any
    Guider = Sampler = SamplerModel = ModelSampling = Any

Conditioning = list[list[Any]]  # CONDITIONING: a list of [cond tensor, options dict] pairs
