"""Class-conditional MNIST diffusion models trained by this project, as genuine ComfyUI models.

Two models, each ComfyUI's own SD-style ``UNetModel`` in a small configuration (no attention, ``UNET_CONFIGS``), on
their schedule and parametrisation, exactly as ComfyUI samples them:

- ``eps``: an EPS model on the Stable Diffusion 1.5 discrete schedule (``ModelSamplingDiscrete``, linear betas
  0.00085-0.012 over 1000 steps): ``x = x0 + sigma * eps``; the network sees ``x / sqrt(1 + sigma^2)`` and
  ComfyUI's timestep for sigma, and predicts ``eps``.
- ``flow``: a rectified-flow model on the SD3 schedule (``ModelType.FLOW``: ``ModelSamplingDiscreteFlow`` with
  shift 3.0 and multiplier 1000, ``CONST``): ``x = (1 - sigma) * x0 + sigma * eps``; the network sees ``x`` and
  ``1000 * sigma``, and predicts ``eps - x0``.

Latents are ``[B, 4, 14, 14]`` (a 112x112 EmptyLatentImage) with an identity latent format: a 28x28 digit in grey
levels ``[-1, 1]`` (white on black) pixel-unshuffled into 4 channels of 14x14 (``images_to_latent``).

Class conditioning is a CONDITIONING whose tensor is a class token ``[1, 1, 10]``: the one-hot vector of the digit,
or zeros for "no class" (the unconditional branch; ComfyUI's ConditioningZeroOut gives the same). The model reads
it through ComfyUI's ADM path (``encode_adm`` -> ``y`` -> the UNet's ``label_emb``, added to the timestep
embedding of every residual block), so ComfyUI's CFG batches the positive and negative classes like any prompt.
The models were trained with 12% of labels dropped to "no class", so cfg > 1 sharpens the class.

Weights (``demo_models/mnist-eps.safetensors``, ``demo_models/mnist-flow.safetensors``) are read with
``safetensors`` only (float16 storage, loaded as float32); their format, kind, UNet configuration and schedule
are checked against this module, and the tensors key for key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch
from safetensors import SafetensorError, safe_open

from .analytic_model import IdentityLatent

DEMO_MODELS = Path(__file__).resolve().parents[1] / "demo_models"
FORMAT = "epd-mnist-unet-v1"
KINDS = ("eps", "flow")
NUM_CLASSES = 10
LATENT_SHAPE = (4, 14, 14)
IMAGE_SIDE = 28

_COMMON = {
    "image_size": 14,
    "in_channels": 4,
    "out_channels": 4,
    "transformer_depth_middle": -1,
    "num_head_channels": 32,
    "use_spatial_transformer": False,
    "context_dim": None,
    "use_linear_in_transformer": False,
    "num_classes": "sequential",
    "adm_in_channels": NUM_CLASSES,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "dtype": torch.float32,
}
# ComfyUI UNetModel keyword arguments per kind: three levels (14x14, 7x7, 4x4), a plain residual middle block, no
# attention; the class reaches the network as ``y`` through ``label_emb`` (num_classes "sequential": Linear(10, 4C)
# - SiLU - Linear). Sized for training on two CPU cores in under half an hour.
# flow (1.0M parameters): 32, 64, 64 channels, one residual block per level.
# eps (1.25M parameters): 64 channels throughout, no encoder block at 14x14 (one decoder block there). The output
# GroupNorm has 32 groups: over 32 channels it normalises each channel of each image on its own and erases the
# per-channel mean, which an eps model must predict to within 1/sigma_max = 1/14.6 (the flow model's x0 error is not
# amplified so, and its later steps correct it); 64 channels (two per group) at about the same cost.
UNET_CONFIGS = {
    "flow": {
        **_COMMON,
        "model_channels": 32,
        "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 0, 0],
        "transformer_depth_output": [0, 0, 0, 0, 0, 0],
    },
    "eps": {
        **_COMMON,
        "model_channels": 64,
        "num_res_blocks": [0, 1, 1],
        "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 0],
        "transformer_depth_output": [0, 0, 0, 0, 0],
    },
}

# ComfyUI's sampling settings per kind: SD1.5's ModelSamplingDiscrete and SD3's ModelSamplingDiscreteFlow.
SAMPLING_SETTINGS = {
    "eps": {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000},
    "flow": {"shift": 3.0, "multiplier": 1000},
}
MODEL_TYPES = {"eps": comfy.model_base.ModelType.EPS, "flow": comfy.model_base.ModelType.FLOW}


def weights_path(kind: str) -> Path:
    """The bundled weights of model ``kind`` ("eps" or "flow")."""
    _check_kind(kind)
    return DEMO_MODELS / f"mnist-{kind}.safetensors"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"MNIST model kind must be one of {KINDS}, not {kind!r}")


def config_json(kind: str) -> str:
    """The UNet configuration of ``kind`` as recorded in the weights' metadata."""
    _check_kind(kind)
    return json.dumps({k: (str(v) if k == "dtype" else v) for k, v in UNET_CONFIGS[kind].items()}, sort_keys=True)


def sampling_json(kind: str) -> str:
    """The schedule of ``kind`` as recorded in the weights' metadata."""
    _check_kind(kind)
    return json.dumps({"model_type": MODEL_TYPES[kind].name, **SAMPLING_SETTINGS[kind]}, sort_keys=True)


def class_token(labels: list[int | None] | torch.Tensor) -> torch.Tensor:
    """Class tokens ``[B, 1, 10]``: one-hot rows for digits 0-9, zeros for ``None`` or -1 (no class)."""
    labels = [None if (v is None or int(v) < 0) else int(v) for v in labels]
    token = torch.zeros(len(labels), 1, NUM_CLASSES)
    for i, label in enumerate(labels):
        if label is not None:
            if label >= NUM_CLASSES:
                raise ValueError(f"MNIST class must be 0-9 or none, not {label}")
            token[i, 0, label] = 1.0
    return token


def images_to_latent(images: torch.Tensor) -> torch.Tensor:
    """Digits ``[B, 28, 28]`` in ``[0, 1]`` -> latents ``[B, 4, 14, 14]`` in ``[-1, 1]``."""
    x = images.to(torch.float32).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE) * 2.0 - 1.0
    return torch.nn.functional.pixel_unshuffle(x, 2)


def latent_to_grey(latent: torch.Tensor) -> torch.Tensor:
    """The pack's pixel-space decoder: latents ``[B, 4, H, W]`` (grey levels in ``[-1, 1]``, pixel-unshuffled 2x2)
    -> grey images ``[B, 2H, 2W]`` in ``[0, 1]``; the MNIST models' and the demo digits model's (``[B, 4, 8, 8]``)."""
    x = torch.nn.functional.pixel_shuffle(latent.to(torch.float32), 2)[:, 0]
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def latent_to_images(latent: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, 4, 14, 14]`` -> grey digits ``[B, 28, 28]`` in ``[0, 1]`` (white on black)."""
    if latent.ndim != 4 or tuple(latent.shape[1:]) != LATENT_SHAPE:
        raise ValueError(
            f"MNIST latents have shape [B, {', '.join(map(str, LATENT_SHAPE))}] (EPD MNIST Decode also takes the demo "
            f"digits' [B, 4, 8, 8]), got {list(latent.shape)}"
        )
    return latent_to_grey(latent)


class MnistConfig(comfy.supported_models_base.BASE):
    unet_config = UNET_CONFIGS["flow"]
    unet_extra_config = {}
    latent_format = IdentityLatent
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32]

    def __init__(self, kind: str) -> None:
        _check_kind(kind)
        super().__init__(dict(UNET_CONFIGS[kind]))
        self.sampling_settings = dict(SAMPLING_SETTINGS[kind])


class MnistModel(comfy.model_base.BaseModel):
    """ComfyUI's UNet, class-conditional through the ADM path; ``kind`` picks the EPS or the flow schedule."""

    def __init__(self, kind: str, device: torch.device | None = None) -> None:
        super().__init__(MnistConfig(kind), model_type=MODEL_TYPES[kind], device=device)
        self.kind = kind

    def encode_adm(self, **kwargs: Any) -> torch.Tensor:
        token = kwargs.get("cross_attn")
        if token is None or token.ndim != 3 or token.shape[-1] != NUM_CLASSES:
            shape = None if token is None else list(token.shape)
            raise ValueError(
                f"EPD MNIST models are conditioned on a class token [B, 1, {NUM_CLASSES}] from EPD MNIST Class "
                f"(or ConditioningZeroOut of it); got a conditioning of shape {shape} (a text prompt?)"
            )
        return token[:, 0, :]

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if tuple(x.shape[1:]) != LATENT_SHAPE:
            raise ValueError(
                f"EPD MNIST models work on latents of shape {LATENT_SHAPE} (a 112x112 EmptyLatentImage); "
                f"got {tuple(x.shape[1:])}"
            )
        if kwargs.get("y") is None:
            raise ValueError("EPD MNIST models need a class conditioning (EPD MNIST Class)")
        # The class arrives as y; the token itself is not read again (the UNet has no cross-attention).
        return super()._apply_model(x, t, c_concat, None, control, transformer_options or {}, **kwargs)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``path``; a clear error if it is not a safetensors file."""
    try:
        with safe_open(str(path), "pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{Path(path).name} is not a readable safetensors file: {exc}") from exc


def load_mnist_weights(model: MnistModel, path: str | Path) -> MnistModel:
    """Load trained weights (safetensors only) into ``model``; the file must be this format, this kind, this UNet
    configuration and schedule, key for key and shape for shape. float16 or float32 storage, loaded as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST model weights {path.name} not found in {path.parent.name}/: the pack's install is incomplete "
            f"(reinstall it), or train them with python -m scripts.train_mnist --kind {model.kind}"
        )
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not an EPD MNIST UNet (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("kind") != model.kind:
        raise ValueError(f"{path.name} is the {meta.get('kind')!r} MNIST model, not {model.kind!r}")
    if meta.get("unet_config") is None or json.loads(meta["unet_config"]) != json.loads(config_json(model.kind)):
        raise ValueError(f"{path.name} was trained for another UNet configuration: {meta.get('unet_config')}")
    if meta.get("sampling") is None or json.loads(meta["sampling"]) != json.loads(sampling_json(model.kind)):
        raise ValueError(f"{path.name} was trained for another schedule: {meta.get('sampling')}")
    expected = model.diffusion_model.state_dict()
    state = {}
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        if keys != set(expected):
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            raise ValueError(
                f"{path.name} does not match the MNIST UNet: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key in sorted(keys):
            tensor = fh.get_tensor(key)
            if tensor.dtype not in (torch.float16, torch.float32) or tensor.shape != expected[key].shape:
                raise ValueError(
                    f"{path.name}: {key} is {tensor.dtype} {list(tensor.shape)}, "
                    f"expected float16/float32 {list(expected[key].shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{path.name}: {key} holds non-finite values")
            state[key] = tensor.to(torch.float32)
    model.diffusion_model.load_state_dict(state, strict=True)
    return model


def mnist_model(kind: str, path: str | Path | None = None) -> MnistModel:
    """The trained model ``kind`` as a ``comfy.model_base.BaseModel`` on the CPU (bundled weights by default)."""
    model = MnistModel(kind, device=torch.device("cpu"))
    return load_mnist_weights(model, weights_path(kind) if path is None else path)


def mnist_model_patcher(kind: str, path: str | Path | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI ``MODEL`` (ModelPatcher) of the trained MNIST model ``kind``."""
    model = mnist_model(kind, path)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
