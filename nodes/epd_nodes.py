"""The pack's ComfyUI nodes (V3 API). Thin: parse inputs, call the core, format outputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..epd_core import EPDFileError, EPDParams, load_params
from ..epd_core.analytic import MIXTURES
from ..epd_core.catalogue import CatalogueEntry, load_catalogue
from .analytic_model import FORMS, analytic_model_patcher
from .digits_model import WEIGHTS as DIGITS_WEIGHTS
from .digits_model import digits_model_patcher
from .guard import catalogue_file, user_error, user_text
from .preview import table_image
from .rewards import clip_score_reward
from .sampling import CONVENTIONS, FINAL_STEPS, PARALLEL_MODES, PLUGIN_BASES, make_plugin_sampler, make_sampler
from .scheduling import epd_sigmas
from .training import distill_on_model, output_path, rdpo_on_model, resume_options, save_output, start_table

EPDParamsType = io.Custom("EPD_PARAMS")

FOLDER = "epd"
EXTENSIONS = {".safetensors", ".pkl"}
PACK_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DOWNLOAD = "[download] "
REWARDS = ["fidelity", "clip_score"]
log = logging.getLogger("epd")


def register_folder() -> None:
    """``models/epd`` (and ``extra_model_paths.yaml`` entries named ``epd``) plus the pack's ``weights/``."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    if isinstance(exts, set):
        exts.update(EXTENSIONS)
    for path in (default, str(PACK_WEIGHTS)):
        if path not in paths:
            paths.append(path)


_CACHE: dict[tuple[str, int, int], EPDParams] = {}


def load_table(name: str) -> EPDParams:
    """Load a table by its name in the ``epd`` folder; errors name the file."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise user_error(ValueError(f"EPD table {name!r} not found in {folder_paths.get_folder_paths(FOLDER)}"))
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            _CACHE.clear()
            _CACHE[key] = load_params(path)
        except EPDFileError as exc:
            raise user_error(ValueError(f"cannot load EPD table: {exc}")) from None
    return _CACHE[key]


def _comfyui_entries() -> list[CatalogueEntry]:
    try:
        return [e for e in load_catalogue().values() if e.comfyui]
    except EPDFileError as exc:
        log.warning("EPD catalogue unavailable: %s", exc)
        return []


def table_choices() -> list[str]:
    """Local tables, then the catalogue's ComfyUI tables not downloaded yet, as ``[download] <name>``."""
    local = [name for name in folder_paths.get_filename_list(FOLDER) if name != DIGITS_WEIGHTS.name]  # a UNet
    return local + [DOWNLOAD + e.name for e in _comfyui_entries() if e.filename not in local]


def catalogue_choice(choice: str) -> CatalogueEntry | None:
    """The catalogue entry behind a ``[download]`` choice (downloaded or not), else None."""
    if not choice.startswith(DOWNLOAD):
        return None
    name = choice[len(DOWNLOAD) :]
    return next((e for e in _comfyui_entries() if e.name == name), None)


def resolve_table(choice: str) -> str:
    """The file name for a choice; a ``[download]`` table missing locally is fetched into models/epd first."""
    if not choice.startswith(DOWNLOAD):
        return choice
    entry = catalogue_choice(choice)
    if entry is None:
        raise ValueError(f"{choice!r}: no such published table in the EPD catalogue")
    return catalogue_file(entry)


def describe(params: EPDParams) -> str:
    source = params.metadata.get("source_file", "")
    return (
        f"{params.backend} table{' from ' + source if source else ''}: {params.num_steps - 1} steps x "
        f"{params.num_points} points, NFE {params.nfe}, student {params.student}, schedule {params.schedule_type}"
    )


class EPDParamsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="EPDParamsLoader",
            display_name="EPD Parameters Loader",
            category="loaders",
            description="Loads an EPD table (the project's .safetensors or the authors' .pkl, read without running "
            "code) from models/epd or the pack's weights folder. '[download]' entries are the authors' published "
            "tables: fetched on first run from their pinned commit, sha256-checked, stored in models/epd.",
            inputs=[
                io.Combo.Input(
                    "table_name",
                    options=table_choices(),
                    tooltip="EPD table file from models/epd or the pack's weights/ folder; '[download] <name>' "
                    "downloads that published table when the graph runs.",
                ),
            ],
            outputs=[
                EPDParamsType.Output(display_name="epd_params"),
                io.String.Output(display_name="info"),
            ],
        )

    @classmethod
    def validate_inputs(cls, table_name: str | None = None) -> bool | str:
        """Like the combo check, but a ``[download]`` choice stays valid after its table was downloaded."""
        if table_name is None or table_name in folder_paths.get_filename_list(FOLDER) or catalogue_choice(table_name):
            return True
        where = user_text(str(folder_paths.get_folder_paths(FOLDER)))
        return f"EPD table {table_name!r} not found in {where} nor in the catalogue"

    @classmethod
    def execute(cls, table_name: str) -> io.NodeOutput:
        params = load_table(resolve_table(table_name))
        return io.NodeOutput(params, describe(params))


def _final_step_input() -> io.Combo.Input:
    return io.Combo.Input(
        "final_step",
        options=list(FINAL_STEPS),
        default="denoise",
        optional=True,
        tooltip="How sigmas ending in 0 (final_denoise) reach it: denoise = one more model call; estimate = the "
        "last step's own x0 estimate (its update extended to 0), no extra call.",
    )


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
                EPDParamsType.Input("epd_params", tooltip="The EPD table from EPD Parameters Loader."),
                io.Combo.Input(
                    "parallel",
                    options=list(PARALLEL_MODES),
                    default="auto",
                    tooltip="batched: the K points in one call; sequential: one call per point; auto: batched as "
                    "memory allows, sequential when ControlNet, hooks or timestep ranges are present.",
                ),
                io.Boolean.Input(
                    "continuous_time",
                    default=True,
                    tooltip="Discrete models (SD1.5, SDXL) see the exact fractional timestep of each point, as in "
                    "the authors' code, instead of ComfyUI's nearest integer step.",
                ),
                io.Combo.Input(
                    "convention",
                    options=list(CONVENTIONS),
                    default="comfyui",
                    tooltip="comfyui: ComfyUI's start/end scaling; authors: start from noise * sigma_max and skip "
                    "the flow end division, exactly as the authors' sampler.",
                ),
                _final_step_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(
        cls, epd_params, parallel: str, continuous_time: bool, convention: str, final_step: str = "denoise"
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
                EPDParamsType.Input("epd_params", tooltip="The EPD table from EPD Parameters Loader."),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the table's steps to run (img2img keeps the last round(denoise*steps)).",
                ),
                io.Boolean.Input(
                    "final_denoise",
                    default=False,
                    tooltip="Append sigma 0: one extra model call returning the clean prediction. Off follows the "
                    "table (ends at sigma_min).",
                ),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, epd_params, denoise: float, final_denoise: bool) -> io.NodeOutput:
        sigmas = epd_sigmas(epd_params, model.get_model_object("model_sampling"), denoise, final_denoise)
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
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the initial noise.",
                ),
                io.Float.Input(
                    "cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance."
                ),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                EPDParamsType.Input("epd_params", tooltip="The EPD table from EPD Parameters Loader."),
                io.Float.Input(
                    "denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Fraction of the table's steps to run."
                ),
                io.Combo.Input(
                    "parallel", options=list(PARALLEL_MODES), default="auto", tooltip="How the K points are batched."
                ),
                io.Boolean.Input("final_denoise", default=False, tooltip="End at sigma 0 (see final_step)."),
                _final_step_input(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(
        cls, model, seed, cfg, positive, negative, latent_image, epd_params, denoise, parallel, final_denoise,
        final_step: str = "denoise",
    ) -> io.NodeOutput:  # fmt: skip
        from comfy_extras.nodes_custom_sampler import SamplerCustom

        sigmas = EPDScheduler.execute(model, epd_params, denoise, final_denoise).result[0]
        sampler = EPDSampler.execute(epd_params, parallel, True, "comfyui", final_step).result[0]
        out = SamplerCustom.execute(model, True, seed, cfg, positive, negative, sampler, sigmas, latent_image)
        return io.NodeOutput(out.result[0])


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
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="empty_conditioning")],
        )

    @classmethod
    def execute(cls, form: str, mixture: str, shift: float) -> io.NodeOutput:
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
            "latent (4x8x8) and the empty conditioning; pixel_shuffle(2) of the latent is a 16x16 grey digit.",
            inputs=[],
            outputs=[
                io.Model.Output(tooltip="The digits UNet as a ComfyUI model (weights/digits-unet.safetensors)."),
                io.Conditioning.Output(
                    display_name="empty_conditioning",
                    tooltip="A conditioning for positive and negative; the model ignores it (use cfg 1).",
                ),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(digits_model_patcher(), [[torch.zeros(1, 1, 8), {}]])


class EPDPlugin(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDPlugin",
            display_name="EPD Plugin",
            category="sampling/custom_sampling/samplers",
            description="Adds EPD's parallel directions to a built-in sampler: each model call the sampler makes at "
            "a grid point is answered with the EPD ensemble prediction. Euler + plugin is exactly EPD. Supported: "
            + ", ".join(PLUGIN_BASES)
            + ". Use with EPD Scheduler.",
            inputs=[
                io.Sampler.Input(
                    "sampler", tooltip="The base sampler, e.g. from KSamplerSelect (dpmpp_2m, ipndm, ...)."
                ),
                EPDParamsType.Input("epd_params", tooltip="The EPD table from EPD Parameters Loader."),
                io.Combo.Input(
                    "parallel", options=list(PARALLEL_MODES), default="auto", tooltip="How the K points are batched."
                ),
            ],
            outputs=[io.Sampler.Output(), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(cls, sampler, epd_params, parallel: str) -> io.NodeOutput:
        new_sampler, info = make_plugin_sampler(sampler, epd_params, parallel)
        return io.NodeOutput(new_sampler, info)


class EPDDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDDistill",
            display_name="EPD Distill",
            category="sampling/epd_training",
            description="Fits an EPD table to this model (Stage 1 of the papers): a many-step teacher gives the "
            "target at each grid point and the table learns to reach it in one EPD step. Saves to models/epd.",
            inputs=[
                io.Model.Input("model", tooltip="The model to fit the table to."),
                io.Conditioning.Input("positive", tooltip="Prompts to train on (a batch of several works)."),
                io.Conditioning.Input("negative", tooltip="Negative prompts."),
                io.Latent.Input(
                    "latent_image", tooltip="An empty latent of the size to train at (its batch is ignored)."
                ),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Guidance used in training."),
                io.Int.Input(
                    "steps",
                    default=6,
                    min=2,
                    max=64,
                    tooltip="Time points of the table (steps + 1); NFE is 2 per step.",
                ),
                io.Int.Input("points", default=2, min=1, max=8, tooltip="Parallel intermediate points per step (K)."),
                io.Combo.Input(
                    "teacher", options=["heun", "dpm2", "dpmpp2m"], default="dpm2", tooltip="Teacher solver."
                ),
                io.Int.Input("teacher_steps", default=3, min=0, max=32, tooltip="Teacher points inside each step (M)."),
                io.Int.Input("iterations", default=200, min=1, max=100000, tooltip="Optimisation steps."),
                io.Int.Input("batch", default=4, min=1, max=256, tooltip="Noises per iteration."),
                io.Float.Input(
                    "learning_rate",
                    default=0.01,
                    min=1e-5,
                    max=1.0,
                    step=0.001,
                    tooltip="Adam learning rate (cosine decay).",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the training noises."),
                io.Boolean.Input("learn_grid", default=False, tooltip="Also learn the interior grid points."),
                io.Boolean.Input(
                    "afs", default=False, tooltip="Analytic first step: skips the first model call (NFE one less)."
                ),
                io.String.Input(
                    "filename", default="my_epd_table", tooltip="Saved as models/epd/<filename>.safetensors."
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                EPDParamsType.Input(
                    "start_params", optional=True, tooltip="Start from this table instead of the default start."
                ),
                io.Boolean.Input(
                    "final_estimate",
                    default=False,
                    optional=True,
                    tooltip="Fit the table for sampling to sigma 0 with final_denoise on and final_step 'estimate' "
                    "(its last step extended to 0 at no extra call), against the teacher's denoised end point.",
                ),
            ],
            outputs=[EPDParamsType.Output(display_name="epd_params"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, latent_image, cfg, steps, points, teacher, teacher_steps, iterations, batch,
        learning_rate, seed, learn_grid, afs, filename, overwrite, start_params=None, final_estimate=False,
    ) -> io.NodeOutput:  # fmt: skip
        path = output_path(filename, overwrite)
        model_sampling = model.get_model_object("model_sampling")
        start = start_params or start_table(model_sampling, steps, points, afs)
        params = distill_on_model(
            model, positive, negative, cfg, latent_image["samples"], start, iterations=iterations, batch=batch,
            teacher=teacher, teacher_m=teacher_steps, lr=learning_rate, seed=seed, learn_grid=learn_grid,
            final_estimate=final_estimate, metadata={"tool": "EPD Distill node", "cfg": cfg},
            **resume_options(path, iterations),
        )  # fmt: skip
        saved = save_output(params, path, overwrite)
        d = params.metadata["distilled"]
        info = f"{describe(params)}; loss {d['first_loss']:.4g} -> {d['final_loss']:.4g}; saved {saved}"
        return io.NodeOutput(params, info)


class EPDRDPO(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDRDPO",
            display_name="EPD RDPO",
            category="sampling/epd_training",
            description="Fine-tunes an EPD table with RDPO (Stage 2 of the TPAMI paper): the table becomes a "
            "Dirichlet policy improved by PPO against a reward; only the table changes, never the model. Rewards: "
            "fidelity to a many-step teacher from the same noise, or a CLIP score of the decoded images against a "
            "prompt (needs vae, clip_vision, clip and prompt). Saves to models/epd.",
            inputs=[
                io.Model.Input("model", tooltip="The model the table is for."),
                io.Conditioning.Input("positive", tooltip="Prompts to train on."),
                io.Conditioning.Input("negative", tooltip="Negative prompts."),
                io.Latent.Input("latent_image", tooltip="An empty latent of the size to train at."),
                EPDParamsType.Input("epd_params", tooltip="The start table (usually a distilled one)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Guidance used in training."),
                io.Combo.Input(
                    "reward",
                    options=REWARDS,
                    default="fidelity",
                    tooltip="fidelity: minus the distance to a DPM-Solver-2 teacher's result. clip_score: 100 x "
                    "the cosine between the CLIP embeddings of the decoded image and of the prompt (needs vae, "
                    "clip_vision, clip and prompt; the two CLIP models must be one CLIP's towers).",
                ),  # fmt: skip
                io.Int.Input("teacher_steps", default=4, min=1, max=32, tooltip="Teacher points inside each step."),
                io.Int.Input("iterations", default=30, min=1, max=100000, tooltip="Rollout / PPO iterations."),
                io.Int.Input("groups", default=4, min=1, max=256, tooltip="Noises per iteration."),
                io.Int.Input(
                    "group_size", default=4, min=2, max=64, tooltip="Tables sampled per noise (RLOO group k)."
                ),
                io.Float.Input(
                    "concentration",
                    default=20.0,
                    min=1.0,
                    max=1000.0,
                    step=1.0,
                    tooltip="Dirichlet concentration around the start table (20 SD1.5, 10 SD3/Flux).",
                ),  # fmt: skip
                io.Float.Input(
                    "learning_rate", default=7e-5, min=1e-6, max=1.0, step=1e-5, tooltip="Adam learning rate."
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of noises and samples."),
                io.String.Input(
                    "filename", default="my_epd_rdpo", tooltip="Saved as models/epd/<filename>.safetensors."
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                io.Vae.Input("vae", optional=True, tooltip="clip_score: decodes the final latents."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="clip_score: embeds the decoded images."),
                io.Clip.Input(
                    "clip", optional=True, tooltip="clip_score: embeds the prompt (the text tower of the same CLIP)."
                ),
                io.String.Input(
                    "prompt",
                    optional=True,
                    default="",
                    multiline=True,
                    tooltip="clip_score: the text to score against.",
                ),
            ],
            outputs=[EPDParamsType.Output(display_name="epd_params"), io.String.Output(display_name="info")],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, latent_image, epd_params, cfg, reward, teacher_steps, iterations, groups,
        group_size, concentration, learning_rate, seed, filename, overwrite, vae=None, clip_vision=None, clip=None,
        prompt="",
    ) -> io.NodeOutput:  # fmt: skip
        metadata = {"tool": "EPD RDPO node", "cfg": cfg}
        scorer = None
        if reward == "clip_score":
            scorer = _clip_score(vae, clip_vision, clip, prompt)
            metadata["reward_prompt"] = prompt
        path = output_path(filename, overwrite)
        params, curve = rdpo_on_model(
            model, positive, negative, cfg, latent_image["samples"], epd_params, teacher_m=teacher_steps,
            reward=scorer, iterations=iterations, groups=groups, k=group_size, concentration=concentration,
            lr=learning_rate, seed=seed, metadata=metadata, **resume_options(path, iterations),
        )  # fmt: skip
        saved = save_output(params, path, overwrite)
        info = (
            f"{describe(params)}; reward {curve[0]:.4g} -> {params.metadata['rdpo']['final_reward']:.4g}; saved {saved}"
        )
        return io.NodeOutput(params, info)


def _clip_score(vae, clip_vision, clip, prompt: str | None):
    """The clip_score reward, or a ValueError naming the inputs it lacks."""
    given = {"vae": vae, "clip_vision": clip_vision, "clip": clip, "prompt": (prompt or "").strip() or None}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"reward clip_score needs vae, clip_vision, clip and a prompt; missing: {', '.join(missing)}")
    return clip_score_reward(vae, clip_vision, clip, prompt)


class EPDParamsPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDParamsPreview",
            display_name="EPD Parameters Preview",
            category="loaders",
            description="Draws an EPD table: each step's interval on a log-sigma axis, where its intermediate points "
            "sit and how much each weighs, with the time and direction scales.",
            inputs=[EPDParamsType.Input("epd_params", tooltip="The EPD table to draw.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, epd_params) -> io.NodeOutput:
        return io.NodeOutput(table_image(epd_params))


NODES = [
    EPDParamsLoader, EPDParamsPreview, EPDSampler, EPDScheduler, EPDKSampler, EPDPlugin, EPDDistill, EPDRDPO,
    EPDAnalyticModel, EPDDigitsModel,
]  # fmt: skip
