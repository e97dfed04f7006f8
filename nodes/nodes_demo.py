"""Demo models that need no download (exact Gaussian-mixture denoisers, the pack's small digits UNet) and the
labelled image grid the demo workflow ends in."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..epd_core.analytic import MIXTURES
from .analytic_model import FORMS, analytic_model_patcher
from .digits_model import digits_model_patcher
from .image_grid import MAX_ROWS, labelled_grid
from .inputs import check_declared


class EPDAnalyticModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDAnalyticModel",
            display_name="EPD Analytic Model",
            category="advanced/model",
            description="An exact Gaussian-mixture denoiser as a ComfyUI model (no download; its ODE solution is "
            "known). Use a 64x64 empty latent (4x8x8).",
            inputs=[
                io.Combo.Input(
                    "form",
                    options=list(FORMS),
                    default="sd15_eps",
                    tooltip="sd15_eps: EPS on the SD1.5 schedule; sd3_flow: flow with SD3 shift; flux_flow: flow "
                    "with FLUX mu; edm_ve: EDM sigmas 0.002-80 (the ICCV tables).",
                ),
                io.Combo.Input(
                    "mixture", options=list(MIXTURES), default="reference", tooltip="Which Gaussian mixture."
                ),
                io.Float.Input(
                    "shift",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Flow shift (SD3) or mu (FLUX); 0 keeps the default (3.0 / 1.15).",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The exact denoiser of the chosen Gaussian mixture as a ComfyUI model."),
                io.Conditioning.Output(
                    display_name="empty_conditioning", tooltip="An empty conditioning for its positive and negative."
                ),
            ],
        )

    @classmethod
    def execute(cls, form: str, mixture: str, shift: float) -> io.NodeOutput:
        check_declared(cls, shift=shift)  # a NaN read as 0, the default shift; a negative shift too
        model = analytic_model_patcher(form, mixture, shift if shift > 0 else None)
        return io.NodeOutput(model, [[torch.zeros(1, 1, 8), {}]])


class EPDDigitsModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDDigitsModel",
            display_name="EPD Demo Digits Model",
            category="advanced/model",
            description="A small neural diffusion model trained by this pack (ComfyUI's own UNet, 1M parameters, "
            "on scikit-learn's 8x8 digits; SD1.5 EPS schedule; no download). Unconditional: use a 64x64 empty "
            "latent (4x8x8) and the empty conditioning; pixel_shuffle(2) of the latent is a 16x16 grey digit, which "
            "EPD MNIST Decode shows.",
            inputs=[],
            outputs=[
                io.Model.Output(tooltip="The digits UNet as a ComfyUI model (demo_models/digits-unet.safetensors)."),
                io.Conditioning.Output(
                    display_name="empty_conditioning",
                    tooltip="A conditioning for positive and negative; the model ignores it (use cfg 1).",
                ),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(digits_model_patcher(), [[torch.zeros(1, 1, 8), {}]])


class EPDImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDImageGrid",
            display_name="EPD Image Grid",
            category="image",
            description="Stacks image batches into one labelled picture: each batch is a row (its images side by "
            "side), labelled by the matching line of 'labels'. For comparing samplers on the same noises.",
            inputs=[
                io.String.Input("labels", multiline=True, default="row 1", tooltip="One label per line, one line "
                                "per connected row, in the order of the inputs; a row without a line, or with an "
                                "empty one, is unlabelled. Beyond ASCII, labels need a system font such as DejaVu "
                                "Sans or Arial."),
                *(io.Image.Input(f"row_{i}", optional=i > 1, tooltip=f"The images of row {i}.")
                  for i in range(1, MAX_ROWS + 1)),
            ],
            outputs=[io.Image.Output(tooltip="One image [1, H, W, 3]: the rows, labels on the left.")],
        )  # fmt: skip

    @classmethod
    def execute(cls, labels: str, **rows: torch.Tensor | None) -> io.NodeOutput:
        batches = [rows[f"row_{i}"] for i in range(1, MAX_ROWS + 1) if rows.get(f"row_{i}") is not None]
        lines = [line.strip() for line in labels.replace("\r\n", "\n").split("\n")]
        while len(lines) > len(batches) and not lines[-1]:  # a trailing newline, not an empty label
            lines.pop()
        while len(lines) > len(batches) and not lines[0]:
            lines.pop(0)
        lines += [""] * (len(batches) - len(lines))  # rows connected after the labels were typed
        return io.NodeOutput(labelled_grid(batches, lines))


NODES = [EPDAnalyticModel, EPDDigitsModel, EPDImageGrid]
