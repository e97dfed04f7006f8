"""Training: EPD Distill (Stage 1) and EPD RDPO (Stage 2) fit a table to the user's own model and save it."""

from __future__ import annotations

import math

from comfy_api.latest import io, ui

from ..epd_core.config import (
    AUTO_ITERATIONS,
    NODE_NFE,
    NODE_POINTS,
    NODE_RDPO_TEACHER_M,
    NODE_SCALE_BOUNDS,
    NODE_SCALE_HEADS_UP_TO_NFE,
    PRESETS,
    DistillConfig,
    RDPOConfig,
    node_iterations,
    node_scale_bounds,
    rdpo_preset,
)
from ..epd_core.params import DEFAULT_STUDENT, EPDParams, time_points_for_nfe
from ..epd_core.rdpo import guard_report
from .comfy_types import CLIP, VAE, ClipVision, Conditioning, ModelPatcher
from .features import Encoder, clip_vision_encoder
from .inputs import (
    EncoderType,
    EPDParamsType,
    advanced,
    cfg_input,
    check_declared,
    config_input,
    epd_params_input,
    output_inputs,
    seed_input,
)
from .nodes_tables import describe
from .rewards import clip_score_reward, preference_reward
from .sampling import model_latent
from .table_files import (
    claimed,
    output_path,
    prompt_settings,
    resume_options,
    save_output,
    saved_generation,
    settings_key,
)
from .training import conditioning_batch, distill_on_model, model_name, rdpo_on_model, sample_inputs, start_tables

REWARDS = ["fidelity", "clip_score", "preference"]
REWARD_FOLDER = "epd_rewards"  # models/epd_rewards: preference heads (safetensors)
AUTO = -1.0  # EPD Distill's scale_dir / scale_time: node_scale_bounds(nfe)


def _training_inputs() -> list:
    """The model and what it is sampled with, as in KSampler."""
    return [
        io.Model.Input("model", tooltip="The model to fit the table to."),
        io.Conditioning.Input("positive", tooltip="Prompts to train on (a batch of several works)."),
        io.Conditioning.Input("negative", tooltip="Negative prompts."),
        io.Latent.Input("latent_image", tooltip="An empty latent of the size to train at (its batch is ignored)."),
    ]


def _cfg_input() -> io.Float.Input:
    return cfg_input(1.0, "Guidance used in training: set the cfg you will sample with.")


class EPDDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = DistillConfig
        return io.Schema(
            node_id="EPDDistill",
            is_output_node=True,  # it saves a file: a graph that only trains runs
            hidden=[io.Hidden.dynprompt, io.Hidden.unique_id],  # the run's settings, for fingerprint_inputs
            display_name="EPD Distill",
            category="sampling/epd_training",
            description="Fits an EPD table to this model (Stage 1 of the papers): a many-step teacher solves the ODE "
            "from the same noises and the table learns to reach its end point (objective global, the default) or "
            "its state at each grid point in one EPD step (local). Saves to models/epd.",
            inputs=[
                *_training_inputs(),
                _cfg_input(),
                io.Int.Input(
                    "nfe",
                    default=NODE_NFE,
                    min=2,
                    max=64,
                    tooltip="Model rounds per image the table will take (what KSampler's steps are for one-call "
                    "samplers). Its K points are one batched call; a carry step costs 1 round and starts the run "
                    "with the analytic first step (free); an epd step costs 2, and an odd NFE starts with the "
                    "analytic first step.",
                ),
                io.Int.Input(
                    "points", default=NODE_POINTS, min=1, max=8, tooltip="Parallel intermediate points per step (K)."
                ),
                config_input(d, "teacher"),
                config_input(d, "teacher_m", "teacher_steps", min=0, max=32),
                config_input(d, "iterations", more=f"; {AUTO_ITERATIONS}", min=0, max=100000),
                config_input(d, "batch", min=1, max=256),
                advanced(config_input(d, "lr", "learning_rate", min=1e-5, max=1.0, step=1e-5)),
                seed_input(d.help("seed").capitalize() + ".", d.default("seed")),
                advanced(config_input(d, "learn_grid")),
                *output_inputs("my_epd_table"),
                epd_params_input(
                    "start_params",
                    "Start from this table instead of the one start_check picks; its own NFE, "
                    "points and student then apply (the nfe, points, student and start_check inputs are not used).",
                    optional=True,
                ),
                advanced(config_input(d, "final_estimate", optional=True)),
                advanced(config_input(d, "objective", optional=True)),
                advanced(
                    io.Combo.Input(
                        "student",
                        options=["carry", "epd"],
                        default=DEFAULT_STUDENT,
                        optional=True,
                        tooltip="carry: one model round per step, the points placed along the previous step's "
                        "direction (NFE 5 = 5 steps); epd: the authors' EPD-Solver, a plain model call then the "
                        "points, 2 rounds per step (NFE 5 = 3 steps).",
                    )
                ),
                EncoderType.Input(
                    "feature_encoder",
                    optional=True,
                    tooltip="Judge the last step on decoded images (the authors' feature loss): from EPD Feature "
                    "Encoder (your VAE and CLIP vision model) or EPD MNIST Features. Needs autograd through the VAE "
                    "and the encoder: more memory and time per iteration.",
                ),
                advanced(
                    io.Float.Input(
                        "feature_weight",
                        default=1.0,
                        min=0.0,
                        max=1e6,
                        step=0.1,
                        optional=True,
                        tooltip="With a feature_encoder: the last step's loss is this times the mean squared "
                        "distance between the features of the table's and the teacher's decoded images.",
                    )
                ),
                advanced(config_input(d, "start_noises", "start_check", min=0, max=65536, optional=True)),
                advanced(config_input(d, "micro_batch", min=0, max=256, optional=True)),
                advanced(config_input(d, "keep_best", min=0, max=65536, optional=True)),
                advanced(config_input(d, "robust", min=0.0, max=10.0, step=0.001, optional=True)),
                *(advanced(_scale_bound_input(name)) for name in SCALE_HEADS),
            ],
            outputs=[
                EPDParamsType.Output(display_name="epd_params", tooltip="The trained table (also saved)."),
                io.String.Output(
                    display_name="info",
                    tooltip="The training's report: connect Preview as Text to read "
                    "it (the frontends do not show it otherwise; it is also in the history API).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, positive: Conditioning, negative: Conditioning, latent_image: dict, cfg: float,
        nfe: int, points: int, teacher: str, teacher_steps: int, iterations: int, batch: int, learning_rate: float,
        seed: int, learn_grid: bool, filename: str, overwrite: bool, start_params: EPDParams | None = None,
        final_estimate: bool | None = None, objective: str | None = None, student: str | None = None,
        feature_encoder: Encoder | None = None, feature_weight: float = 1.0, start_check: int | None = None,
        micro_batch: int | None = None, keep_best: int | None = None, robust: float | None = None,
        scale_dir: float = AUTO, scale_time: float = AUTO,
    ) -> io.NodeOutput:  # fmt: skip
        check_declared(cls, cfg=cfg, nfe=nfe, points=points, teacher=teacher, teacher_steps=teacher_steps,
                       iterations=iterations, batch=batch, learning_rate=learning_rate, seed=seed,
                       objective=objective, student=student, feature_weight=feature_weight, start_check=start_check,
                       micro_batch=micro_batch, keep_best=keep_best, robust=robust, scale_dir=scale_dir,
                       scale_time=scale_time)  # fmt: skip
        # The per-step objective needs only the derivatives along the two ways a table moves a point: finite
        # differences, no backpropagation through the network (any architecture, no activation memory). The
        # objectives that reach earlier steps through the rollout need autograd through the model.
        default = DistillConfig.node_default
        objective = objective or default("objective")
        final_estimate = default("final_estimate") if final_estimate is None else final_estimate
        gradient = "fd" if objective == "local" else "autograd"
        table_nfe = start_params.nfe if start_params is not None else nfe  # a given table's own (the tooltip)
        auto = iterations == 0
        iterations = node_iterations(table_nfe) if auto else iterations
        config = DistillConfig(
            iterations=iterations, batch=batch, teacher=teacher, teacher_m=teacher_steps, lr=learning_rate,
            seed=seed, learn_grid=learn_grid, final_estimate=final_estimate, gradient=gradient, objective=objective,
            start_noises=default("start_noises") if start_check is None else start_check,
            micro_batch=default("micro_batch") if micro_batch is None else micro_batch,
            keep_best=default("keep_best") if keep_best is None else keep_best,
            robust=default("robust") if robust is None else robust, grid_lr=default("grid_lr"),
        )  # fmt: skip
        path = output_path(filename, overwrite)
        student = student or DEFAULT_STUDENT
        steps, afs = time_points_for_nfe(nfe, student)
        ms = model.get_model_object("model_sampling")
        start = start_params or start_tables(ms, steps, points, afs, student)
        bounds = scale_bounds(table_nfe, start_params, scale_dir=scale_dir, scale_time=scale_time)
        start = with_scale_heads(start, **bounds)
        metadata = {"tool": "EPD Distill node", "model": model_name(model), "cfg": cfg}
        with claimed(path):
            params = distill_on_model(model, positive, negative, cfg, model_latent(model, latent_image), start,
                                      config, metadata=metadata, encoder=feature_encoder,
                                      feature_weight=feature_weight, **resume_options(path, iterations))  # fmt: skip
            saved = save_output(params, path, overwrite, prompt_settings(cls.hidden, input_names(cls)))
        d = params.metadata["distilled"]
        loss = f"{d['iterations']} iterations{' (auto)' if auto else ''} of {d['batch']} noises, loss by tenth of "
        loss += "the run " + " ".join(f"{v:.3g}" for v in d["loss_curve"])
        if feature_encoder is not None:
            loss += f" (last step: {feature_encoder.name} features x {feature_weight:g})"
        rounded = [f"{name} {given} -> {d[name]}" for name, given in (("batch", batch),
                   ("micro_batch", config.micro_batch)) if d[name] and d[name] != given]  # fmt: skip
        if rounded:  # micro_batch 0 (the whole batch, or the authors' objective) is never a rounding
            loss += (f"; {', '.join(rounded)}: rounded up to a multiple of {params.metadata.get('prompts', 1)} "
                     f"({prompts_text(positive, negative)})")  # fmt: skip
        if config.micro_batch and not d["micro_batch"]:
            loss += "; micro_batch unused: the authors' objective steps on the whole batch's rollout"
        info = f"{describe(params)}; {start_report(params.metadata)}{loss}; {fit_report(d, params.student)}"
        info += f"{heads_report(params)}; saved {saved}"
        if d.get("final_estimate"):
            info += "; fitted to end at sigma 0 on its own estimate: EPD KSampler's defaults (final_denoise on, "
            info += "final_step estimate) sample it so"
        if "fallback" in params.metadata:
            info = f"no backward pass through this model, so {params.metadata['fallback']}; {info}"
        return io.NodeOutput(params, info, ui=ui.PreviewText(info))  # the report in the history API

    @classmethod
    def fingerprint_inputs(cls, filename: str = "", **inputs: object) -> str:
        """Train again when the table this node saved with these inputs is deleted or replaced (by another run
        too); otherwise ComfyUI's cached run."""
        return saved_generation(filename, settings_key({"filename": filename, **inputs}))


SCALE_HEADS = {
    "scale_dir": "direction scale c of every point, learned in 1 +- this bound",
    "scale_time": "time scale a of every point (the model is evaluated at a * tau), learned in 1 +- this bound",
}


def _scale_bound_input(name: str) -> io.Float.Input:
    return io.Float.Input(
        name, default=AUTO, min=AUTO, max=0.5, step=0.01, optional=True,
        tooltip=f"Also learn the {SCALE_HEADS[name]} (the papers' {name}). -1: auto, 1 +- {NODE_SCALE_BOUNDS[name]:g} "
        f"up to NFE {NODE_SCALE_HEADS_UP_TO_NFE} (where it helped on the benchmark), none above; 0: no such head, "
        "the scale stays 1. With start_params, a table without the head gains it (it samples as before until "
        "trained); a table with it keeps its own bound (leave -1 or 0).",
    )  # fmt: skip


def scale_bounds(nfe: int, start_params: EPDParams | None, **inputs: float | None) -> dict[str, float]:
    """The bound of each scale head to add: the input's own, or for auto (-1 or absent) that of
    :func:`node_scale_bounds` at the table's ``nfe``, unless the start table has the head already (it keeps its own).
    Finite inputs (EPD Distill's ``check_declared``).
    """
    auto, bounds = node_scale_bounds(nfe), {}
    for name, value in inputs.items():
        if value is not None and AUTO < value < 0:  # a widget dragged from -1 towards a small bound
            raise ValueError(f"{name} {value:g}: -1 is auto, 0 no head, a positive value the bound (1 +- value)")
        if value is None or value < 0:
            own = start_params is not None and start_params.has_scale_head(name)
            value = 0.0 if own else auto[name]
        bounds[name] = value
    return bounds


def with_scale_heads(start: EPDParams | dict[str, EPDParams], **bounds: float) -> EPDParams | dict[str, EPDParams]:
    """``start`` (a table or named candidates) with learnable scale heads at the non-zero ``bounds``."""
    bounds = {name: bound for name, bound in bounds.items() if bound > 0}
    if not bounds:
        return start
    if isinstance(start, dict):
        return {name: table.with_scale_bounds(**bounds) for name, table in start.items()}
    try:
        return start.with_scale_bounds(**bounds)
    except ValueError as exc:
        keep = "leave scale_dir / scale_time at -1 (auto) or 0 to keep them"
        raise ValueError(f"EPD Distill: start_params: {exc}; {keep}") from None


def heads_report(params: EPDParams) -> str:
    """The range each learned scale head ended in ("" for a table without heads)."""
    table, parts = params.decoded(), []
    for name in SCALE_HEADS:
        if getattr(params, name) > 0:
            values = getattr(table, name)
            parts.append(f"{name} {float(values.min()):.4f}-{float(values.max()):.4f} (1 +- {getattr(params, name):g})")
    return "; learned " + ", ".join(parts) if parts else ""


def start_report(metadata: dict) -> str:
    """Which start grid the untrained check chose, and why ("" when there was no choice)."""
    if "start" not in metadata:
        return ""
    errors = metadata["start"]["untrained_error"]
    distinct = len(set(errors.values()))  # enough digits to tell the chosen grid's error from a near tie
    digits = next((d for d in range(4, 10) if len({f"{e:.{d}g}" for e in errors.values()}) == distinct), 10)
    measured = ", ".join(f"{name} {error:.{digits}g}" for name, error in errors.items())
    return f"started on the {metadata['start']['grid']} (untrained error vs the teacher: {measured}); "


def fit_report(distilled: dict, kind: str = DEFAULT_STUDENT) -> str:
    """The held-out errors of a distilled table (of student ``kind``), and what they mean for the user."""
    if "student_error" not in distilled:
        return "no held-out check (plugin table)"
    student, teacher = distilled["student_error"], distilled["teacher_error"]
    text = (f"held-out RMS error vs a 2x finer teacher: table {student:.4g}, teacher {teacher:.4g} "
            f"({distilled['held_out_noises']} noises)")  # fmt: skip
    euler = distilled.get("euler_error")
    if euler is not None and student > euler:
        text += f" - WORSE than Euler on the table's own time points ({euler:.4g}): train longer (iterations)"
        text += "" if kind == "carry" else ", or try student carry"
    elif teacher > 0.2 * student:
        text += " - the teacher limits the table: raise teacher_steps"
    return text + checks_report(distilled)


def checks_report(distilled: dict) -> str:
    """Which table the held-out checks of ``keep_best`` kept ("" without checks)."""
    if "checks" not in distilled:
        return ""
    c = distilled["checks"]
    errors = dict(zip(c["iterations"], c["errors"], strict=True))
    last = c["iterations"][-1]
    text = f"; checked every tenth of the run on {c['noises']} held-out noises: "
    if c["kept"] == last:
        return text + f"kept the last table ({errors[last]:.4g}; untrained {errors[0]:.4g})"
    return text + (f"the run diverged: kept the table of iteration {c['kept']} ({errors[c['kept']]:.4g}; last "
                   f"{errors[last]:.4g}, untrained {errors[0]:.4g})")  # fmt: skip


class EPDFeatureEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDFeatureEncoder",
            display_name="EPD Feature Encoder",
            category="sampling/epd_training",
            description="A feature encoder for EPD Distill's feature loss: decodes latents with the VAE and embeds "
            "the images with the CLIP vision model (its projected image embedding), keeping gradients.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that decodes the model's latents."),
                io.ClipVision.Input("clip_vision", tooltip="A CLIP or SigLIP vision model (CLIP Vision Loader)."),
            ],
            outputs=[EncoderType.Output(display_name="feature_encoder", tooltip="For EPD Distill's feature_encoder.")],
        )

    @classmethod
    def execute(cls, vae: VAE, clip_vision: ClipVision) -> io.NodeOutput:
        return io.NodeOutput(clip_vision_encoder(vae, clip_vision))


class EPDRDPO(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        r = RDPOConfig
        return io.Schema(
            node_id="EPDRDPO",
            is_output_node=True,  # it saves a file: a graph that only trains runs
            hidden=[io.Hidden.dynprompt, io.Hidden.unique_id],  # the run's settings, for fingerprint_inputs
            display_name="EPD RDPO",
            category="sampling/epd_training",
            description="Fine-tunes an EPD table with RDPO (Stage 2 of the TPAMI paper): the table becomes a "
            "Dirichlet policy improved by PPO against a reward; only the table changes, never the model. Rewards: "
            "fidelity to a many-step teacher from the same noise, or a CLIP score of the decoded images against a "
            "prompt (needs vae, clip_vision, clip and prompt), or a preference head from models/epd_rewards on the "
            "CLIP vision embedding (needs vae, clip_vision, reward_model). A conditioning batch of several prompts "
            "trains on all of them (each group of rollouts shares one; fidelity and preference). Saves to models/epd.",
            inputs=[
                *_training_inputs(),
                epd_params_input(tooltip="The start table (usually a distilled one)."),
                _cfg_input(),
                io.Combo.Input(
                    "reward",
                    options=REWARDS,
                    default="fidelity",
                    tooltip="fidelity: minus the distance to a DPM-Solver-2 teacher's result. clip_score: 100 x "
                    "the cosine between the CLIP embeddings of the decoded image and of the prompt (needs vae, "
                    "clip_vision, clip and prompt; the two CLIP models must be one CLIP's towers). preference: a "
                    "preference head (safetensors in models/epd_rewards) on the CLIP vision embedding.",
                ),  # fmt: skip
                io.Int.Input(
                    "teacher_steps",
                    default=NODE_RDPO_TEACHER_M,
                    min=1,
                    max=32,
                    tooltip="fidelity: the teacher's points inside each step (other rewards use no teacher).",
                ),
                config_input(r, "iterations", min=1, max=100000),
                config_input(r, "groups", min=1, max=256),
                config_input(r, "k", "group_size", min=2, max=64),
                advanced(config_input(r, "concentration", min=1.0, max=1000.0, step=1.0)),
                advanced(config_input(r, "lr", "learning_rate", min=1e-6, max=1.0, step=1e-6)),
                seed_input(r.help("seed").capitalize() + ".", r.default("seed")),
                *output_inputs("my_epd_rdpo"),
                io.Vae.Input("vae", optional=True, tooltip="clip_score: decodes the final latents."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="clip_score: embeds the decoded images."),
                io.Clip.Input(
                    "clip", optional=True, tooltip="clip_score: embeds the prompt (the text tower of the same CLIP)."
                ),
                io.String.Input(
                    "prompt", optional=True, default="", multiline=True, tooltip="clip_score: the text to score."
                ),
                io.String.Input(
                    "reward_model",
                    optional=True,
                    default="",
                    tooltip="preference: the head's file name in models/epd_rewards.",
                ),
                advanced(
                    io.Combo.Input(
                        "preset",
                        options=list(PRESETS),
                        default="ours",
                        optional=True,
                        tooltip="ours: groups share a noise; authors: groups share a prompt with their "
                        "own noises, learnable log-std 0.05, width 128 (the other inputs apply)",
                    )
                ),
            ],
            outputs=[
                EPDParamsType.Output(display_name="epd_params", tooltip="The trained table (also saved)."),
                io.String.Output(
                    display_name="info",
                    tooltip="The training's report: connect Preview as Text to read "
                    "it (the frontends do not show it otherwise; it is also in the history API).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, positive: Conditioning, negative: Conditioning, latent_image: dict,
        epd_params: EPDParams, cfg: float, reward: str, teacher_steps: int, iterations: int, groups: int,
        group_size: int, concentration: float, learning_rate: float, seed: int, filename: str, overwrite: bool,
        vae: VAE | None = None, clip_vision: ClipVision | None = None, clip: CLIP | None = None, prompt: str = "",
        reward_model: str = "", preset: str = "ours",
    ) -> io.NodeOutput:  # fmt: skip
        # ComfyUI 0.3.x does not check a V3 combo's value (a typo of reward trained on fidelity), nor any linked one
        check_declared(cls, reward=reward, cfg=cfg, teacher_steps=teacher_steps, iterations=iterations, groups=groups,
                       group_size=group_size, concentration=concentration, learning_rate=learning_rate, seed=seed,
                       preset=preset)  # fmt: skip
        config = rdpo_preset(preset, iterations=iterations, groups=groups, k=group_size, concentration=concentration,
                             lr=learning_rate, seed=seed)  # fmt: skip
        metadata = {"tool": "EPD RDPO node", "model": model_name(model), "cfg": cfg}
        scorer = None
        if reward == "clip_score":
            if (prompts := conditioning_batch(positive)) > 1:
                raise ValueError(f"reward clip_score scores every rollout against one prompt (the node's 'prompt'), "
                                 f"but the conditioning holds {prompts} prompts: give RDPO a conditioning of that "
                                 "prompt alone (the fidelity and preference rewards train on several)")  # fmt: skip
            scorer = _clip_score(vae, clip_vision, clip, prompt)
            metadata["reward_prompt"] = prompt
        elif reward == "preference":
            scorer = preference_reward(*_needs("preference", vae=vae, clip_vision=clip_vision),
                                       _reward_file(reward_model))  # fmt: skip
            metadata["reward_model"] = reward_model
        path = output_path(filename, overwrite)
        with claimed(path):
            params, curve = rdpo_on_model(model, positive, negative, cfg, model_latent(model, latent_image),
                                          epd_params, config, teacher_m=teacher_steps, reward=scorer,
                                          metadata=metadata, **resume_options(path, iterations))  # fmt: skip
            saved = save_output(params, path, overwrite, prompt_settings(cls.hidden, input_names(cls)))
        r = params.metadata["rdpo"]
        info = f"{describe(params)}; {prompts_text(positive, negative)}"
        if r["groups"] != groups:
            info += f" (groups {groups} -> {r['groups']}: a multiple of {r['prompts']})"
        info += (f"; the rollouts' mean reward {curve[0]:.4g} in the first iteration, {r['final_reward']:.4g} over the "
                 f"last fifth; KL to the start {r['kl_to_start']:.3g}{guard_report(r)}; saved {saved}")  # fmt: skip
        return io.NodeOutput(params, info, ui=ui.PreviewText(info))  # the report in the history API

    @classmethod
    def fingerprint_inputs(cls, filename: str = "", **inputs: object) -> str:
        """Train again when the table this node saved with these inputs is deleted or replaced (by another run
        too); otherwise ComfyUI's cached run."""
        return saved_generation(filename, settings_key({"filename": filename, **inputs}))


def input_names(node: type[io.ComfyNode]) -> set[str]:
    """A node's input names, as ComfyUI gives them to its fingerprint."""
    return {spec.id for spec in node.define_schema().inputs}


def prompts_text(positive: Conditioning, negative: Conditioning) -> str:
    """The prompts a training run went over: ComfyUI tiles each conditioning batch, so a positive and a negative of
    different counts repeat together every lcm rows (and with batched masks, images or pooled outputs, every lcm of
    all)."""
    p, q = conditioning_batch(positive), conditioning_batch(negative)
    together, rows = math.lcm(p, q), sample_inputs(positive, negative)
    text = (
        f"{p} prompt(s)" if p == q else f"{p} positive and {q} negative prompts, which repeat together every {together}"
    )
    held = "with the masks, images and pooled outputs they hold"
    return text if rows == together else f"{text}; {held}, every {rows} rows"


def _clip_score(vae, clip_vision, clip, prompt: str | None):
    """The clip_score reward, or a ValueError naming the inputs it lacks."""
    given = {"vae": vae, "clip_vision": clip_vision, "clip": clip, "prompt": (prompt or "").strip() or None}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"reward clip_score needs vae, clip_vision, clip and a prompt; missing: {', '.join(missing)}")
    return clip_score_reward(vae, clip_vision, clip, prompt)


def _needs(reward: str, **given):
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"reward {reward} needs {', '.join(given)}; missing: {', '.join(missing)}")
    return list(given.values())


def _reward_file(name: str) -> str:
    """The full path of a preference head in models/epd_rewards (safetensors only; no other folders)."""
    import os

    import folder_paths

    if REWARD_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[REWARD_FOLDER] = (
            [os.path.join(folder_paths.models_dir, REWARD_FOLDER)], {".safetensors"})  # fmt: skip
    name = (name or "").strip()
    path = folder_paths.get_full_path(REWARD_FOLDER, name) if name.endswith(".safetensors") else None
    if path is None:
        raise ValueError(f"reward preference: no safetensors file {name!r} in models/{REWARD_FOLDER}")
    return path


NODES = [EPDDistill, EPDFeatureEncoder, EPDRDPO]
