"""Sampling: EPD as a ComfyUI sampler, its scheduler, a one-node KSampler, and the plugin for built-in samplers."""

from __future__ import annotations

from comfy_api.latest import io

from ..epd_core import EPDParams
from .comfy_types import Conditioning, ModelPatcher, Sampler
from .families import resolution_mu
from .inputs import (
    CONTINUOUS_TIME,
    CONVENTION,
    FINAL_STEP_ABSENT,
    advanced,
    cfg_input,
    epd_params_input,
    final_step_input,
    parallel_input,
    seed_input,
)
from .plugin import PLUGIN_BASES, make_plugin_sampler
from .sampling import CONVENTIONS, make_sampler, model_latent
from .scheduling import epd_sigmas


class EPDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDSampler",
            display_name="EPD Sampler",
            category="sampling/custom_sampling/samplers",
            description="Ensemble Parallel Directions: per step, K learned intermediate points evaluated in one "
            "batched model call. Pair it with EPD Scheduler (the table fixes the number of steps).",
            inputs=[
                epd_params_input(),
                parallel_input(),
                advanced(
                    io.Boolean.Input(
                        "continuous_time",
                        default=CONTINUOUS_TIME,
                        tooltip="Discrete models (SD1.5, SDXL) see the exact fractional timestep of each point, as "
                        "in the authors' code, instead of ComfyUI's nearest integer step.",
                    )
                ),
                advanced(
                    io.Combo.Input(
                        "convention",
                        options=list(CONVENTIONS),
                        default=CONVENTION,
                        tooltip="comfyui: ComfyUI's start/end scaling; authors: start from noise * sigma_max and "
                        "skip the flow end division, exactly as the authors' sampler.",
                    )
                ),
                final_step_input(),
            ],
            outputs=[
                io.Sampler.Output(tooltip="For SamplerCustom / SamplerCustomAdvanced, with EPD Scheduler's sigmas.")
            ],
        )

    @classmethod
    def execute(
        cls,
        epd_params: EPDParams,
        parallel: str,
        continuous_time: bool,
        convention: str,
        final_step: str = FINAL_STEP_ABSENT,
    ) -> io.NodeOutput:
        return io.NodeOutput(make_sampler(epd_params, parallel, continuous_time, convention, final_step))


class EPDScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDScheduler",
            display_name="EPD Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="The table's time grid in this model's sigmas (its own alphas_cumprod, or its flow shift / "
            "mu). denoise < 1 keeps the table's last steps.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; its noise schedule or shift is used."),
                epd_params_input(),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the table's steps to run (img2img keeps the last denoise*steps, halves "
                    "rounded up, at least one; 0 returns the input).",
                ),
                io.Boolean.Input(
                    "final_denoise",
                    default=True,
                    tooltip="Append sigma 0; the sampler's final_step says how it is reached (estimate: no extra "
                    "call). Off ends at the table's last sigma, as the authors' sampler, with that much noise left.",
                ),
                io.Latent.Input(
                    "latent_image",
                    optional=True,
                    tooltip="Flux 2 only: the latent to sample, whose size sets the grid's mu as in Flux2Scheduler "
                    "(without it, the model's own mu).",
                ),
            ],
            outputs=[
                io.Sigmas.Output(tooltip="The table's grid for this model (its denoise cut, a final 0 if asked).")
            ],
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        epd_params: EPDParams,
        denoise: float,
        final_denoise: bool,
        latent_image: dict | None = None,
    ) -> io.NodeOutput:
        shape = None if latent_image is None else tuple(model_latent(model, latent_image).shape)  # as the sampler's
        model_sampling = model.get_model_object("model_sampling")
        mu = resolution_mu(model.model, shape, epd_params.num_steps - 1, model_sampling)
        sigmas = epd_sigmas(epd_params, model_sampling, denoise, final_denoise, mu)
        return io.NodeOutput(sigmas)


class EPDKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDKSampler",
            display_name="EPD KSampler",
            category="sampling",
            description="KSampler with the EPD solver: the table fixes the steps and the intermediate points. Same "
            "result as SamplerCustom + EPD Sampler + EPD Scheduler.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising."),
                seed_input("Seed of the initial noise."),
                cfg_input(7.5, "Classifier-free guidance."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                epd_params_input(),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the table's steps to run (the last denoise*steps, halves rounded up, at least "
                    "one; 0 returns the input).",
                ),
                parallel_input(),
                io.Boolean.Input(
                    "final_denoise",
                    default=True,
                    tooltip="End at sigma 0, reached as final_step says (estimate: no extra call). Off ends at the "
                    "table's last sigma, as the authors' sampler, with that much noise left.",
                ),
                final_step_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent.")],
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, seed: int, cfg: float, positive: Conditioning, negative: Conditioning,
        latent_image: dict, epd_params: EPDParams, denoise: float, parallel: str, final_denoise: bool,
        final_step: str = FINAL_STEP_ABSENT,
    ) -> io.NodeOutput:  # fmt: skip
        from comfy_extras.nodes_custom_sampler import SamplerCustom

        sigmas = EPDScheduler.execute(model, epd_params, denoise, final_denoise, latent_image).result[0]
        sampler = EPDSampler.execute(epd_params, parallel, CONTINUOUS_TIME, CONVENTION, final_step).result[0]
        out = SamplerCustom.execute(model, True, seed, cfg, positive, negative, sampler, sigmas, latent_image)
        return io.NodeOutput(out.result[0])


class EPDPlugin(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDPlugin",
            display_name="EPD Plugin",
            category="sampling/custom_sampling/samplers",
            description="Adds EPD's parallel directions to a built-in sampler: at each grid point the sampler's own "
            "method (fed the plain model predictions) places the K points, EPD combines their directions into the "
            "step, and the sampler's model call is answered so that its own update takes that step. Two sequential "
            "model rounds per step with an EPD table (one on an AFS first step), one with a carry table (the bare "
            "sampler's cost, ended on final_step's estimate, the default). Euler + plugin is exactly EPD. Supported: "
            + ", ".join(PLUGIN_BASES)
            + ". Use with EPD Scheduler and a carry table (the same trajectory over every base) or one distilled "
            "with that plugin_base.",
            inputs=[
                io.Sampler.Input(
                    "sampler", tooltip="The base sampler, e.g. from KSamplerSelect (dpmpp_2m, ipndm, ...)."
                ),
                epd_params_input(),
                parallel_input(),
                final_step_input(),
            ],
            outputs=[
                io.Sampler.Output(tooltip="The base sampler with EPD's steps, for SamplerCustom(Advanced)."),
                io.String.Output(display_name="info", tooltip="What each step does and what the run costs."),
            ],
        )

    @classmethod
    def execute(
        cls, sampler: Sampler, epd_params: EPDParams, parallel: str, final_step: str = FINAL_STEP_ABSENT
    ) -> io.NodeOutput:
        new_sampler, info = make_plugin_sampler(sampler, epd_params, parallel, final_step=final_step)
        return io.NodeOutput(new_sampler, info)


NODES = [EPDSampler, EPDScheduler, EPDKSampler, EPDPlugin]
