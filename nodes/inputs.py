"""Inputs shared by the pack's nodes: each kind of input is defined once here."""

from __future__ import annotations

import inspect
import math
from typing import Any

from comfy_api.latest import io

from ..epd_core.solver import FINAL_STEPS
from .sampling import PARALLEL_MODES

EPDParamsType = io.Custom("EPD_PARAMS")
EncoderType = io.Custom("EPD_ENCODER")  # nodes.features.Encoder: latents -> image features, for a feature loss
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def advanced(inp: Any) -> Any:
    """Mark an expert input as advanced (collapsed in the UI) where this ComfyUI's V3 API knows the flag."""
    if "advanced" in inspect.signature(type(inp).__init__).parameters:
        inp.advanced = True
    return inp


def epd_params_input(
    name: str = "epd_params", tooltip: str = "The EPD table from EPD Parameters Loader.", **kw: Any
) -> io.Input:
    return EPDParamsType.Input(name, tooltip=tooltip, **kw)


def parallel_input() -> io.Combo.Input:
    return io.Combo.Input(
        "parallel",
        options=list(PARALLEL_MODES),
        default="auto",
        tooltip="batched: the K points in one call; sequential: one call per point; auto: batched as memory "
        "allows, sequential when ControlNet, hooks, timestep ranges or model patches that read one sigma per call "
        "(Differential Diffusion, Deep Shrink, APG, Skip Layer Guidance, attention patches) are present.",
    )


CONTINUOUS_TIME = True  # EPD Sampler's continuous_time, and what EPD KSampler runs with
CONVENTION = "comfyui"  # EPD Sampler's convention, and what EPD KSampler runs with
FINAL_STEP = "estimate"  # the widget's default: sigma 0 on the last step's own x0 estimate, no extra model call
FINAL_STEP_ABSENT = "denoise"  # a prompt without the input (saved before it existed): a final 0 was a model call


def final_step_input() -> io.Combo.Input:
    return io.Combo.Input(
        "final_step",
        options=list(FINAL_STEPS),
        default=FINAL_STEP,
        optional=True,
        tooltip="How sigmas ending in 0 (EPD Scheduler's or EPD KSampler's final_denoise) reach it: estimate = the "
        "last step's own x0 estimate (its update extended to 0), no extra call; denoise = one more model call.",
    )


def seed_input(tooltip: str, default: int = 0) -> io.Int.Input:
    """A seed; like KSampler's, the frontend adds its 'control after generate' widget after it."""
    return io.Int.Input("seed", default=default, min=0, max=SEED_MAX, control_after_generate=True, tooltip=tooltip)


def cfg_input(default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input("cfg", default=default, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=tooltip)


def output_inputs(default_name: str) -> list:
    """Where a training node saves its table."""
    return [
        io.String.Input(
            "filename",
            default=default_name,
            tooltip="Saved as models/epd/<filename>.safetensors (in the first 'epd' folder, where "
            "extra_model_paths.yaml names one first; over a table of that name in any 'epd' folder only "
            "with overwrite).",
        ),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
    ]


def config_input(
    config: type, field: str, name: str | None = None, more: str = "", **limits: Any
) -> io.Boolean.Input | io.Combo.Input | io.Int.Input | io.Float.Input:
    """A node input for one training hyper-parameter: its default (the node's where the config has one), choices
    and help from the core's config (``more`` added to the help: what the node makes of a value)."""
    default = getattr(config, "node_default", config.default)(field)
    tooltip, name = config.help(field) + more, name or field
    tooltip = tooltip[0].upper() + tooltip[1:] + "."
    if isinstance(default, bool):
        return io.Boolean.Input(name, default=default, tooltip=tooltip, **limits)
    if isinstance(default, str):
        return io.Combo.Input(name, options=list(config.choices(field)), default=default, tooltip=tooltip, **limits)
    if isinstance(default, int):
        return io.Int.Input(name, default=default, tooltip=tooltip, **limits)
    return io.Float.Input(name, default=default, tooltip=tooltip, **limits)


def check_finite(**values: float | None) -> None:
    """Refuse a NaN or inf input by name: it passes ComfyUI's range check (an API prompt's ``NaN``) and fails every
    comparison, so a check such as ``bound > 0`` would read it as 0."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def check_declared(node: type[io.ComfyNode], **values: Any) -> None:
    """Refuse a value outside the range or the options ``node`` declares for that input, by name: ComfyUI checks them
    only on a widget's own value, not on one that arrives by a link (a Primitive or Int node, another node's output).
    None (an absent optional input) is not checked."""
    declared = {inp.id: inp for inp in node.define_schema().inputs}
    for name, value in values.items():
        inp = declared[name]
        if value is None:
            continue
        if isinstance(inp, io.Combo.Input) and value not in inp.options:
            raise ValueError(f"{name} must be one of {', '.join(map(str, inp.options))}, got {value!r}")
        if isinstance(inp, io.Float.Input):
            check_finite(**{name: value})
        if isinstance(inp, (io.Int.Input, io.Float.Input)):
            low = -math.inf if inp.min is None else inp.min
            high = math.inf if inp.max is None else inp.max
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low}..{high}, got {value}")
