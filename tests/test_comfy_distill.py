"""EPD Distill node on real ComfyUI models."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import epd_core
from bench.defaults import node_defaults
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.tiny_models import conditioning, latent, network_calls, tiny_model, two_hints

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]


@pytest.fixture
def epd_dir(tmp_path, monkeypatch, few_held_out):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["epd"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(tmp_path)] + list(paths), exts))
    return tmp_path


def _args(name, iterations=6, overwrite=False, **kw) -> dict:
    """Small settings, the start check's and the held-out checks' included (their defaults are tested below)."""
    args = dict(cfg=2.0, nfe=6, points=2, teacher="dpm2", teacher_steps=2, iterations=iterations, batch=2,
                start_check=16, keep_best=16)  # fmt: skip
    args.update(learning_rate=0.01, seed=0, learn_grid=False, filename=name, overwrite=overwrite)
    return {**args, **kw}


def _run(model, kind, name, iterations=6, overwrite=False, **kw):
    args = _args(name, iterations, overwrite, **kw)
    return N["EPDDistill"].execute(model, conditioning(2, 1), conditioning(2, 2), latent(kind, 1), **args).result


@pytest.mark.parametrize("kind", ["eps", "sd3", "flux"])
def test_distill_node_saves_a_table_that_samples(epd_dir, kind):
    model = tiny_model(kind)
    estimate = kind == "flux"  # fitted for final_step "estimate"
    nfe = 6 if kind == "sd3" else 5  # odd: the analytic first step (flow tables take it too)
    per_step = {"objective": "local"} if kind == "eps" else {}  # finite differences; the node's default: global
    robust = {"sd3": 0.0}.get(kind)  # the advanced pseudo-Huber loss: turned off, else the node's default
    params, info = _run(model, kind, f"t_{kind}", learn_grid=kind == "eps", nfe=nfe, final_estimate=estimate,
                        student="epd", robust=robust, **per_step)  # fmt: skip
    path = epd_dir / f"t_{kind}.safetensors"
    assert path.exists() and "saved" in info
    assert ("EPD KSampler's defaults (final_denoise on, final_step estimate)" in info) == estimate
    assert "held-out RMS error" in info and params.metadata["distilled"]["student_error"] > 0
    checks = params.metadata["distilled"]["checks"]
    assert checks["noises"] == 16 and checks["iterations"] == list(range(7))
    assert "16 held-out noises: " in info and ("kept the last table" in info) == (checks["kept"] == 6)
    loaded = epd_core.load_params(path)
    assert torch.equal(loaded.r_params, params.r_params)
    d = loaded.metadata["distilled"]
    assert d["robust"] == (0.0 if kind == "sd3" else 0.01)
    assert "6 iterations of 2 noises, loss by tenth of the run " + " ".join(f"{v:.3g}" for v in d["loss_curve"]) in info
    # ComfyUI's Flux cannot backpropagate to its input (0.3.75: an in-place op on a saved tensor; 0.33: a rope kernel
    # without a backward pass): on both trees the node falls back to the per-step objective and says so.
    fell_back = "fallback" in loaded.metadata
    assert fell_back == ("no backward pass through this model" in info) and fell_back == (kind == "flux")
    per_step_expected = kind == "eps" or fell_back
    assert (d["objective"], d["gradient"]) == (("local", "fd") if per_step_expected else ("global", "autograd"))
    assert loaded.metadata["distilled"]["final_estimate"] == estimate
    assert loaded.is_flow == (kind != "eps")
    assert loaded.afs == (kind != "sd3") and loaded.nfe == 6 - loaded.afs  # flow tables take AFS too
    (table,) = N["EPDParamsLoader"].execute(path.name).result[:1]
    (sigmas,) = N["EPDScheduler"].execute(model, table, 1.0, estimate).result
    (sampler,) = N["EPDSampler"].execute(table, "auto", True, "comfyui", "estimate" if estimate else "denoise").result
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    out = SamplerCustom.execute(model, True, 1, 2.0, conditioning(1), conditioning(1), sampler, sigmas,
                                latent(kind, 1)).result[0]["samples"]  # fmt: skip
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind,check", [("eps", 16), ("sd3", 64), ("eps", 0)])
def test_distill_node_fits_a_carry_table_of_one_round_per_step(epd_dir, kind, check):
    """student "carry": NFE 5 is five steps, on the start grid the untrained check chose (the pack's own: rho-7 on
    EPS models, uniform in t on flow models; or the model's; with no check the pack's), kept in the table; sampled
    through ComfyUI it takes one guided round per step."""
    model = tiny_model(kind)
    params, info = _run(model, kind, f"c_{kind}", nfe=5, student="carry", final_estimate=True, start_check=check)
    assert params.student == "carry" and params.num_steps == 6 and params.nfe == 5 and params.afs
    assert "NFE 5" in info
    own = "rho-7 grid" if kind == "eps" else "uniform grid"
    chosen = own
    if check:
        errors = params.metadata["start"]["untrained_error"]
        chosen = params.metadata["start"]["grid"]
        assert set(errors) == {own, "model grid"} and chosen == min(errors, key=errors.get)
        assert f"started on the {chosen}" in info
    else:
        assert "start" not in params.metadata and "started on" not in info
    grid = params.t_steps
    if chosen == "model grid":
        assert grid is None  # the model's own schedule
    elif kind == "eps":
        lo, hi = float(grid[-1]), float(grid[0])
        assert torch.allclose(grid, epd_core.schedules.polynomial(6, lo, hi, 7.0), rtol=1e-6)
    else:
        assert torch.allclose(torch.diff(grid[:-1]), torch.diff(grid[:-1])[:1].expand(4), rtol=1e-6)
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    (sampler,) = N["EPDSampler"].execute(params, "auto", True, "comfyui", "estimate").result
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    with network_calls(model) as rounds:  # cond and uncond in one call: a call is a round
        out = SamplerCustom.execute(model, True, 1, 2.0, conditioning(1), conditioning(1), sampler, sigmas,
                                    latent(kind, 1)).result[0]["samples"]  # fmt: skip
    assert torch.isfinite(out).all() and len(rounds) == 5


@pytest.mark.parametrize("form,nfe,grid", [("sd3_flow", 10, "model grid"), ("sd15_eps", 10, "rho-7 grid")])
def test_distill_defaults_start_on_the_grid_that_trains_better(epd_dir, form, nfe, grid):
    """No one start grid suits every model: on the SD3-form reference mixture the model's grid trains to 0.062 RMSE
    where the uniform one trains to 0.105, on the SD1.5 form the rho-7 grid wins (8,192 noises against the exact
    answer, README). The node's untrained check, with its defaults, finds the same."""
    model = N["EPDAnalyticModel"].execute(form, "reference", 0.0).result[0]
    cond = [[torch.zeros(1, 1, 8), {}]]
    args = {**node_defaults(N["EPDDistill"]), "nfe": nfe, "iterations": 1, "filename": f"g_{form}"}
    params, info = N["EPDDistill"].execute(model, cond, cond, {"samples": torch.zeros(1, 4, 8, 8)}, **args).result
    assert params.metadata["start"]["grid"] == grid and f"started on the {grid}" in info


def test_distill_defaults_to_the_carry_student(epd_dir):
    """The node's defaults (no optional input given) fit a carry table: NFE steps of one round each."""
    params, info = _run(tiny_model("eps"), "eps", "d_eps", nfe=4, iterations=2)
    assert params.student == "carry" and params.nfe == 4 and params.num_steps == 5 and "student carry" in info


def _fit_flow(**inputs):
    """EPD Distill with its defaults and ``inputs`` on the SD3-form analytic mixture: (table, info)."""
    model = N["EPDAnalyticModel"].execute("sd3_flow", "reference", 0.0).result[0]
    cond, empty = [[torch.zeros(1, 1, 8), {}]], {"samples": torch.zeros(1, 4, 8, 8)}
    return N["EPDDistill"].execute(model, cond, cond, empty, **{**node_defaults(N["EPDDistill"]), **inputs}).result


@pytest.mark.parametrize("student", ["carry", "epd"])
def test_scale_bounds_give_a_new_table_learned_scale_heads(epd_dir, student):
    """scale_dir / scale_time (advanced): the table learns c and a inside 1 +- the bounds; 0 keeps every scale at 1,
    as before the heads."""
    args = {"nfe": 5, "iterations": 20, "student": student, "start_check": 0}
    plain, info = _fit_flow(**args, filename=f"plain_{student}", scale_dir=0.0, scale_time=0.0)
    table = plain.decoded()
    assert torch.equal(table.scale_dir, torch.ones_like(table.scale_dir)) and "learned scale" not in info
    assert torch.equal(table.scale_time, torch.ones_like(table.scale_time))
    heads, info = _fit_flow(**args, filename=f"heads_{student}", scale_dir=0.2, scale_time=0.1)
    saved = epd_core.load_params(epd_dir / f"heads_{student}.safetensors")
    assert (saved.scale_dir, saved.scale_time) == (0.2, 0.1) and torch.equal(heads.r_params, saved.r_params)
    table = saved.decoded()
    for name, bound in (("scale_dir", 0.2), ("scale_time", 0.1)):
        values = getattr(table, name)
        assert 1e-4 < float((values - 1).abs().max()) < bound, (name, values)
        assert f"{name} {float(values.min()):.4f}-{float(values.max()):.4f} (1 +- {bound:g})" in info


@pytest.mark.parametrize("nfe,bounds", [(4, (0.2, 0.1)), (5, (0.2, 0.1)), (6, (0.2, 0.1)), (7, (0.2, 0.1)),
                                        (8, (0.0, 0.0)), (10, (0.0, 0.0))])  # fmt: skip
def test_scale_heads_default_to_auto_learned_up_to_nfe_7(epd_dir, nfe, bounds):
    """The inputs' default, -1 (auto), in the schema and for an API prompt without them: heads bounded at 0.2 / 0.1
    up to NFE 7, where they helped on the benchmark, none above; the info says what was learned."""
    inputs = {i.id: getattr(i, "default", None) for i in N["EPDDistill"].define_schema().inputs}
    assert (inputs["scale_dir"], inputs["scale_time"]) == (-1.0, -1.0)
    params, info = _fit_flow(nfe=nfe, iterations=2, start_check=0, filename=f"auto_{nfe}")
    assert (params.scale_dir, params.scale_time) == bounds
    assert ("learned scale_dir" in info and "(1 +- 0.1)" in info) == (bounds[0] > 0)
    explicit = _fit_flow(nfe=nfe, iterations=1, start_check=0, filename=f"auto_{nfe}_x", scale_dir=-1.0,
                         scale_time=0.05)[0]  # fmt: skip
    assert (explicit.scale_dir, explicit.scale_time) == (bounds[0], 0.05)


def test_scale_bounds_refuse_to_change_a_start_tables_own_bound(epd_dir):
    """A start table given through EPD Parameters Loader keeps the bound it was trained with."""
    start = epd_core.EPDParams.start(6, 2, schedule_type="flowmatch", schedule_rho=1.0, backend="sd3",
                                     flowmatch_shift=3.0, scale_dir=0.05)  # fmt: skip
    epd_core.save_params(start, epd_dir / "bounded_start.safetensors")
    (loaded,) = N["EPDParamsLoader"].execute("bounded_start.safetensors").result[:1]
    args = {"nfe": 5, "iterations": 2, "start_params": loaded, "student": "epd"}
    refusal = r"start_params: the table bounds scale_dir at 0.05.*scale_time at -1 \(auto\) or 0 to keep them"
    with pytest.raises(ValueError, match=refusal):
        _fit_flow(**args, filename="refused", scale_dir=0.2)
    assert not (epd_dir / "refused.safetensors").exists()
    kept = _fit_flow(**args, filename="kept", scale_time=0.1)[0]  # scale_dir absent: auto
    assert (kept.scale_dir, kept.scale_time) == (0.05, 0.1)  # its own head kept, the new one added
    auto = _fit_flow(**args, filename="auto")[0]
    assert (auto.scale_dir, auto.scale_time) == (0.05, 0.0)  # its own kept; a table of NFE 10: auto adds none


@pytest.mark.parametrize("value", [-0.99, -0.5, -0.01])
def test_a_scale_bound_between_auto_and_none_is_refused(epd_dir, value):
    """The widget steps from -1 (auto) by 0.01: -0.99 looked like a bound and trained auto heads of 1 +- 0.2."""
    with pytest.raises(ValueError, match=rf"scale_dir {value:g}: -1 is auto, 0 no head"):
        _fit_flow(nfe=5, iterations=1, filename="between", scale_dir=value)
    assert not (epd_dir / "between.safetensors").exists()


def test_distill_trains_on_every_prompt_of_a_conditioning_batch(epd_dir):
    """A positive batch of 3 prompts: the training batch grows to a multiple of 3 (ComfyUI tiles a conditioning
    batch over the noises by index, so every iteration sees every prompt), the table records it, and the prompts
    matter: three copies of the first prompt give another table."""
    model = tiny_model("eps")
    three = conditioning(3, 1)
    node, empty = N["EPDDistill"], latent("eps", 1)
    quick = {"iterations": 2, "start_check": 0, "keep_best": 0}  # the batch and its prompts are the question
    params, _ = node.execute(model, three, conditioning(1, 2), empty, **_args("three", batch=4, **quick)).result
    assert params.metadata["prompts"] == 3 and params.metadata["distilled"]["batch"] == 6
    same = [[three[0][0][:1].repeat(3, 1, 1), {"pooled_output": three[0][1]["pooled_output"][:1].repeat(3, 1)}]]
    other, _ = node.execute(model, same, conditioning(1, 2), empty, **_args("same", batch=4, **quick)).result
    assert not torch.equal(params.r_params, other.r_params)


def test_training_tiles_a_batch_of_conditioning_masks_as_it_tiles_prompts(epd_dir, monkeypatch):
    """ConditioningSetMask with 2 masks (one per image of a latent batch of 2, which EPD KSampler samples): ComfyUI
    tiles masks over the batch by index, as it tiles prompts, and fails a call they do not divide. EPD Distill at
    batch 3 and EPD RDPO with 3 groups failed with torch's size error; their batches now round up to whole sets."""
    import nodes as comfy_nodes

    two = torch.zeros(2, 64, 64)
    two[0, :, :32], two[1, :, 32:] = 1, 1
    (masked,) = comfy_nodes.ConditioningSetMask().append(conditioning(1, 5), two, "default", 1.0)
    (pos,) = comfy_nodes.ConditioningCombine().combine(conditioning(1, 1), masked)
    model, neg, empty = tiny_model("eps"), conditioning(1, 2), latent("eps", 1)
    quick = {"nfe": 4, "teacher_steps": 1, "start_check": 0, "keep_best": 0}  # the batch is the question
    monkeypatch.setattr(H.pack_module("epd_core.starts"), "CHUNK", 1)  # held-out checks on one batch of noises
    start, info = N["EPDDistill"].execute(model, pos, neg, empty, **_args("masks", 1, batch=3, **quick)).result
    assert start.metadata["distilled"]["batch"] == 4
    assert (
        "batch 3 -> 4: rounded up to a multiple of 2 (1 prompt(s); with the masks, images and pooled outputs they "
        "hold, every 2 rows)" in info
    )
    monkeypatch.setattr(H.pack_module("epd_core.rdpo"), "FIDELITY_GUARD_SAMPLES", 2)  # rounded up to 2 rows
    params, info = N["EPDRDPO"].execute(model, pos, neg, empty, start, 2.0, "fidelity", 1, 1, 3, 2, 20.0, 1e-3, 0,
                                        "masks_rdpo", False).result  # fmt: skip
    assert params.metadata["rdpo"]["groups"] == 4 and "(groups 3 -> 4: a multiple of 2)" in info


def test_training_gives_a_noise_one_inpainting_image_at_every_call(epd_dir, monkeypatch):
    """An inpainting model conditioned on 2 images (InpaintModelConditioning's concat_latent_image over a batch):
    ComfyUI resized them to the batch training prepared in blocks (rows 0, 0, 1, 1), so a noise's K points got other
    images in EPD Distill's point-major calls, and EPD RDPO (prepared at one row) saw the first image alone. Each
    call's row j now has image j mod 2, as sampling gives latent j (the network's masked-image channels tell)."""
    import node_helpers

    model = tiny_model("inpaint")
    images = torch.stack([torch.full((4, 8, 8), 1.0), torch.full((4, 8, 8), -1.0)])

    def inpainting(cond):
        return node_helpers.conditioning_set_values(
            cond, {"concat_latent_image": images, "concat_mask": torch.ones(1, 1, 64, 64)}
        )

    pos, neg, empty = inpainting(conditioning(1, 1)), inpainting(conditioning(1, 2)), latent("inpaint", 1)
    seen = []
    model.model.diffusion_model.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 5].mean((1, 2)) < 0))
    monkeypatch.setattr(H.pack_module("epd_core.starts"), "CHUNK", 1)  # held-out checks on one batch of noises
    monkeypatch.setattr(H.pack_module("epd_core.rdpo"), "FIDELITY_GUARD_SAMPLES", 2)
    quick = {"nfe": 4, "teacher_steps": 1, "start_check": 0, "keep_best": 0, "micro_batch": 2}
    start, _ = N["EPDDistill"].execute(model, pos, neg, empty, **_args("inpaint", 1, batch=4, **quick)).result
    N["EPDRDPO"].execute(model, pos, neg, empty, start, 2.0, "fidelity", 1, 1, 1, 2, 20.0, 1e-3, 0, "inpaint_rdpo",
                         False)  # fmt: skip
    assert len(seen) > 50 and all(torch.equal(row, torch.arange(len(row)) % 2 == 1) for row in seen)


def test_training_gives_a_noise_one_reference_latent_at_every_call(epd_dir, monkeypatch):
    """ReferenceLatent of a latent batch of 2 (Flux Kontext editing 2 images at cfg 1; sampling gives latent j
    image j): ComfyUI tiles reference latents over a call's batch by index, and EPD Distill at batch 3 did not count
    them, so a call of 3 noises x K points gave a noise's points other images (rows 0 and 3). Its batch now rounds up
    to whole sets."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    model = tiny_model("flux")
    images = {"samples": torch.stack([torch.full((16, 8, 8), 1.0), torch.full((16, 8, 8), -1.0)])}
    pos = ReferenceLatent.execute(conditioning(1, 1), images).result[0]
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["ref_latents"][0].flatten(1).mean(1) < 0), with_kwargs=True
    )
    monkeypatch.setattr(H.pack_module("epd_core.starts"), "CHUNK", 1)  # held-out checks on one batch of noises
    quick = {"nfe": 4, "teacher_steps": 1, "start_check": 0, "keep_best": 0}  # the batch is the question
    params, _ = N["EPDDistill"].execute(model, pos, conditioning(1, 2), latent("flux", 1),
                                        **_args("reference", 1, batch=3, cfg=1.0, **quick)).result  # fmt: skip
    hook.remove()
    assert params.metadata["distilled"]["batch"] == 4
    assert len(seen) > 50 and all(torch.equal(row, torch.arange(len(row)) % 2 == 1) for row in seen)


def test_training_gives_a_noise_one_controlnet_hint_at_every_call(epd_dir, monkeypatch):
    """A ControlNet of 2 hint images (one per latent of a batch of 2, which EPD KSampler samples): ComfyUI tiles the
    hint over a call's batch by index and keeps it tiled to the first call's batch, from which later calls are tiled.
    Training did not count the hints, and its checkpoint probe (one row) left every later call hint 0 alone; the
    batch now rounds up to whole sets (EPD RDPO's groups too), and row j has hint j mod 2 at every call. EPD RDPO's
    rollouts, each on its own table, went one row per call (a ControlNet reads one sigma per call), so rollout 1 got
    rollout 0's hint (and prompt, mask) and left the ControlNet the first hint alone; its calls now hold whole sets."""
    model = tiny_model("eps")
    pos, neg, seen = two_hints(conditioning(1, 1), conditioning(1, 2))
    monkeypatch.setattr(H.pack_module("epd_core.starts"), "CHUNK", 1)  # held-out checks on one batch of noises
    # the batch is the question; with a ControlNet training falls back to the per-step objective anyway
    quick = {"nfe": 4, "teacher_steps": 1, "start_check": 0, "keep_best": 0, "objective": "local"}
    start, _ = N["EPDDistill"].execute(model, pos, neg, latent("eps", 1), **_args("hints", 1, batch=3, **quick)).result
    assert start.metadata["distilled"]["batch"] == 4
    monkeypatch.setattr(H.pack_module("epd_core.rdpo"), "FIDELITY_GUARD_SAMPLES", 2)
    params, _ = N["EPDRDPO"].execute(model, pos, neg, latent("eps", 1), start, 2.0, "fidelity", 1, 1, 2, 2, 20.0, 1e-3,
                                     0, "hints_rdpo", False).result  # fmt: skip
    rows = [half for call in seen for half in call.chunk(2)]  # cond and uncond rows
    assert len(rows) > 100 and all(torch.equal(row, torch.arange(len(row)) % 2 == 1) for row in rows)


def test_training_gives_a_noise_one_pooled_output_at_every_call(epd_dir, monkeypatch):
    """A conditioning of 1 prompt whose pooled output holds 2 (SD3's or SDXL's ``y``; sampling gives latent j pooled
    output j): ComfyUI tiles it over a call's batch by index, and EPD Distill at batch 3 did not count it, so a call
    of 3 noises x K points gave a noise's points other pooled outputs. Its batch now rounds up to whole sets."""
    model = tiny_model("sd3")
    text = conditioning(1, 1)[0][0]
    pos = [[text, {"pooled_output": torch.stack([torch.ones(32), -torch.ones(32)])}]]
    neg = [[text, {"pooled_output": torch.zeros(1, 32)}]]
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["y"][kwargs["y"][:, 0].abs() > 0.5, 0] < 0), with_kwargs=True
    )
    monkeypatch.setattr(H.pack_module("epd_core.starts"), "CHUNK", 1)  # held-out checks on one batch of noises
    quick = {"nfe": 4, "teacher_steps": 1, "start_check": 0, "keep_best": 0, "objective": "local"}
    empty = latent("sd3", 1)
    params, _ = N["EPDDistill"].execute(model, pos, neg, empty, **_args("pooled", 1, batch=3, **quick)).result
    hook.remove()
    assert params.metadata["distilled"]["batch"] == 4
    assert len(seen) > 50 and all(torch.equal(row, torch.arange(len(row)) % 2 == 1) for row in seen)


@pytest.mark.parametrize("objective", ["global", "authors"])
def test_objectives_through_the_rollout_backpropagate_through_the_model(epd_dir, objective):
    """The node's per-step objective uses finite differences; the ones that reach earlier steps through the
    rollout need autograd through ComfyUI's model, and get it, also for a model built under inference mode as
    ComfyUI's loader nodes build them (its inference tensors are swapped for copies of the same values)."""
    with torch.inference_mode():
        model = tiny_model("sd3")
        diffusion = model.model.diffusion_model
        weights = {name: p.clone() for name, p in diffusion.named_parameters()}
        assert all(p.is_inference() for p in diffusion.parameters())
        params, info = _run(model, "sd3", f"obj_{objective}", iterations=2, objective=objective)
    d = params.metadata["distilled"]
    assert (d["objective"], d["gradient"]) == (objective, "autograd") and "held-out" in info
    assert not any(p.is_inference() for p in diffusion.parameters())
    assert all(torch.equal(p, weights[name]) for name, p in diffusion.named_parameters())
    # the gradient reaches the table through the model's inputs; the weights are frozen and keep no .grad
    assert not any(p.requires_grad or p.grad is not None for p in model.model.parameters())


class _NoBackward(torch.autograd.Function):
    """An operation with a forward pass only, as a fused kernel without a derivative formula."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("fused_rope_kernel: unsupported in training\n(second line)")


def test_backward_failure_tells_a_model_without_gradients_from_a_broken_one():
    """The probe behind EPD Distill's fallback judges by what happens, not by the error's wording: a backward
    pass that raises is a reason to fall back, an error the model raises without gradients too propagates."""
    probe = H.pack_module("nodes.autograd").backward_failure
    x, sigma = torch.zeros(2, 3), torch.ones(2)
    assert probe(lambda x, s: x * s[:, None], x, sigma) is None
    assert (
        probe(lambda x, s: _NoBackward.apply(x * s[:, None]), x, sigma) == "fused_rope_kernel: unsupported in training"
    )

    def broken(x, s):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        probe(broken, x, sigma)


def test_a_model_without_a_backward_pass_falls_back_to_the_per_step_objective(epd_dir):
    """A model with an operation that has no backward pass (here through ComfyUI's own UNet function wrapper; ComfyUI
    0.33's Flux rope kernel is one) trains the per-step objective by finite differences, and the node says so."""
    model = tiny_model("sd3").clone()
    model.set_model_unet_function_wrapper(
        lambda apply, a: _NoBackward.apply(apply(a["input"], a["timestep"], **a["c"]))
    )
    params, info = _run(model, "sd3", "no_backward", iterations=2, objective="global")
    d = params.metadata["distilled"]
    assert (d["objective"], d["gradient"]) == ("local", "fd")
    assert "no backward pass through this model" in info and "fused_rope_kernel: unsupported in training" in info
    assert params.metadata["fallback"] == "objective global -> local: fused_rope_kernel: unsupported in training"


def test_micro_batches_through_a_comfyui_model_train_the_same_table(epd_dir):
    """The global objective backpropagates through ComfyUI's model with each call's activations recomputed; in
    micro-batches (rounded up to whole sets of the conditioning's 2 prompts, which ComfyUI tiles by index) it trains
    the table the whole batch trains."""
    model = tiny_model("sd3")
    run = dict(iterations=3, batch=4, objective="global", learn_grid=True, final_estimate=True)
    whole, _ = _run(model, "sd3", "whole", micro_batch=0, **run)
    parts, info = _run(model, "sd3", "parts", micro_batch=1, **run)
    assert (whole.metadata["distilled"]["micro_batch"], parts.metadata["distilled"]["micro_batch"]) == (0, 2)
    assert "; micro_batch 1 -> 2: rounded up to a multiple of 2 (" in info  # the memory setting changed
    rounded = _run(model, "sd3", "whole2", micro_batch=0, **{**run, "iterations": 1, "batch": 3})[1]
    assert "; batch 3 -> 4: rounded up to a multiple of 2 (" in rounded  # micro_batch 0 is the whole batch
    for name in (*epd_core.params.TABLE_NAMES, "t_steps"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=1e-4, atol=1e-5)
    one, _ = _run(model, "sd3", "one", **{**run, "iterations": 1})
    assert (whole.r_params - one.r_params).abs().max() > 100 * (whole.r_params - parts.r_params).abs().max()


def test_a_continuous_edm_model_starts_on_its_own_grid_once():
    """Under ModelSamplingContinuousEDM (Playground v2.5, CosXL) the model's grid is the rho-7 grid already: EPD
    Distill sampled 1,024 noises twice to choose between two equal grids. The loader's text no longer calls such a
    table's model 'not a ComfyUI model'."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    training, tables = H.pack_module("nodes.training"), H.pack_module("nodes.nodes_tables")
    (model,) = ModelSamplingContinuousEDM().patch(tiny_model("eps"), "eps", 120.0, 0.002)
    starts = training.start_tables(model.get_model_object("model_sampling"), 6, 2, True, "carry")
    assert list(starts) == ["model grid"]
    assert list(training.start_tables(tiny_model("eps").get_model_object("model_sampling"), 6, 2, True, "carry")) == [
        "rho-7 grid", "model grid"]  # fmt: skip
    assert "ModelSamplingContinuousEDM" in tables.made_for(starts["model grid"])


def test_distill_runs_under_inference_mode_as_the_server_does(epd_dir):
    """ComfyUI's executor runs nodes under torch.inference_mode(); the grid made there must still train."""
    model = tiny_model("eps")
    with torch.inference_mode():
        params, info = _run(model, "eps", "under_inference", iterations=2, learn_grid=False)
    assert (epd_dir / "under_inference.safetensors").exists() and params.metadata["distilled"]["iterations"] == 2


@pytest.mark.parametrize("objective", ["global", "local"])
def test_analytic_model_built_by_the_server_trains_with_every_objective(epd_dir, objective):
    """On the server, EPD Analytic Model builds its mixture under inference mode; the node's default objective
    backpropagates through it (the example workflow's graph failed with "Inference tensors cannot be saved")."""
    with torch.inference_mode():
        model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result[:2]
        params, info = N["EPDDistill"].execute(model, cond, cond, {"samples": torch.zeros(1, 4, 8, 8)},
                                               **_args(f"server_{objective}", iterations=2, objective=objective,
                                                       learn_grid=True, batch=4)).result  # fmt: skip
    assert params.metadata["distilled"]["objective"] == objective and "held-out" in info


def test_comfyui_makes_room_for_the_call_backpropagated_through(monkeypatch):
    """EPD Distill asked ComfyUI for the memory of a one-latent call; the calls it backpropagates through hold
    micro_batch x K latents (on a GPU ComfyUI kept weights resident that left room for 2 rows)."""
    import comfy.sampler_helpers

    training, config_module = H.pack_module("nodes.training"), H.pack_module("epd_core.config")
    asked, estimate = [], comfy.sampler_helpers.estimate_memory
    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory", lambda m, shape, *a: asked.append(shape) or
                        estimate(m, shape, *a))  # fmt: skip
    model = tiny_model("eps")
    start = training.start_table(model.get_model_object("model_sampling"), 3, 3, False, "carry")
    for gradient, rows in (("autograd", 12), ("fd", 1)):
        config = config_module.DistillConfig(iterations=1, batch=16, micro_batch=4, gradient=gradient)
        training._train_on_model(model, conditioning(1), conditioning(1), 2.0, torch.zeros(1, 4, 8, 8), start, config,
                                 lambda session: start)  # fmt: skip
        assert asked[-1] == (rows, 4, 8, 8)


def test_the_start_report_tells_a_near_tie_apart():
    """Example 5 said "started on the model grid (... rho-7 grid 0.1636, model grid 0.1636)", though a tie keeps the
    first candidate: the errors differed below the fourth digit."""
    report = H.pack_module("nodes.nodes_training").start_report
    start = {"grid": "model grid", "untrained_error": {"rho-7 grid": 0.163612, "model grid": 0.163604}}
    assert "rho-7 grid 0.16361, model grid 0.1636" in report({"start": start})
    start["untrained_error"] = {"rho-7 grid": 0.2, "model grid": 0.1}
    assert "rho-7 grid 0.2, model grid 0.1)" in report({"start": start})


def test_the_fit_report_says_when_a_table_is_worse_than_euler():
    """A table further from the truth than Euler on its own time points is broken, not merely coarse (EPD Distill
    with student epd at NFE 2 and a short run: 6.9 against Euler's 0.63); the info said only "saved"."""
    report = H.pack_module("nodes.nodes_training").fit_report
    distilled = {"student_error": 6.938, "teacher_error": 0.069, "euler_error": 0.627, "held_out_noises": 64}
    assert "WORSE than Euler on the table's own time points (0.627): train longer" in report(distilled, "epd")
    assert report(distilled, "epd").endswith("train longer (iterations), or try student carry")
    assert report(distilled, "carry").endswith("train longer (iterations)")  # not the student it is already
    distilled["student_error"] = 0.3
    assert "Euler" not in report(distilled, "epd") and "teacher limits" in report(distilled, "epd")
    del distilled["euler_error"]  # a table trained before the check measured Euler
    assert "Euler" not in report(distilled, "epd")


def test_never_overwrites_without_asking(epd_dir):
    model, quick = tiny_model("eps"), {"start_check": 0, "keep_best": 0}  # what is saved where is the question
    _run(model, "eps", "same", iterations=1, **quick)
    before = (epd_dir / "same.safetensors").read_bytes()
    with pytest.raises(ValueError, match="exists; set overwrite .*'control after generate' is 'randomize'.*'fixed'"):
        _run(model, "eps", "same", iterations=1)
    assert (epd_dir / "same.safetensors").read_bytes() == before
    _run(model, "eps", "same", iterations=2, overwrite=True, seed=5, **quick)
    assert (epd_dir / "same.safetensors").read_bytes() != before
    with pytest.raises(ValueError, match="invalid table name"):
        _run(model, "eps", "../escape", iterations=1)
    for name in ("_draft", "v2..final", "x" * 102):  # each of the allowed characters: the message says the rule
        with pytest.raises(ValueError, match="starting with a letter or digit, without '..'"):
            _run(model, "eps", name, iterations=1)
    with pytest.raises(ValueError, match=r"ASCII letters \(A-Z, a-z\)"):  # "letters" alone: a unicode one is a letter
        _run(model, "eps", "t\u00e4bl\u00e9", iterations=1)


def test_a_table_of_that_name_in_another_epd_folder_is_not_hidden(epd_dir, tmp_path_factory):
    """An extra_model_paths.yaml ``epd`` folder comes first in ComfyUI's list: a training saved there over the name of
    the user's table in models/epd, with overwrite off, and the loader's name then reached the new file. A name found
    in any ``epd`` folder is now refused without overwrite and, with it, replaced where the loader finds it."""
    import folder_paths

    later = tmp_path_factory.mktemp("models_epd")
    paths, exts = folder_paths.folder_names_and_paths["epd"]
    folder_paths.folder_names_and_paths["epd"] = (paths[:1] + [str(later)] + paths[1:], exts)
    model, quick = tiny_model("eps"), {"start_check": 0, "keep_best": 0}  # where it saves is the question
    _run(model, "eps", "mine", iterations=1, **quick)
    (epd_dir / "mine.safetensors").replace(later / "mine.safetensors")
    before = (later / "mine.safetensors").read_bytes()
    with pytest.raises(ValueError, match="mine.safetensors exists; set overwrite"):
        _run(model, "eps", "mine", iterations=1, **quick)
    assert not (epd_dir / "mine.safetensors").exists() and (later / "mine.safetensors").read_bytes() == before
    _run(model, "eps", "mine", iterations=2, overwrite=True, seed=5, **quick)
    assert not (epd_dir / "mine.safetensors").exists() and (later / "mine.safetensors").read_bytes() != before
    assert folder_paths.get_full_path("epd", "mine.safetensors") == str(later / "mine.safetensors")


def test_a_destination_saving_would_refuse_is_refused_before_training(epd_dir, tmp_path_factory):
    """With overwrite on, a folder or a link named like the table passed the name check; the whole run trained, then
    saving refused it, losing the table and leaving the run's checkpoint behind."""
    model = tiny_model("eps")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "other.safetensors"
    elsewhere.write_bytes(b"someone else's file")
    (epd_dir / "linked.safetensors").symlink_to(elsewhere)
    (epd_dir / "folder.safetensors").mkdir()
    for name, problem in (("linked", "exists and is not a regular file"), ("folder", "is a folder")):
        with pytest.raises(ValueError, match=problem):
            _run(model, "eps", name, iterations=4, overwrite=True)
        assert not list(epd_dir.glob("*.epd-checkpoint"))
    assert elsewhere.read_bytes() == b"someone else's file"
    (epd_dir / "ckfolder.epd-checkpoint").mkdir()  # where the run would keep its checkpoint: refused, by name
    with pytest.raises(ValueError, match=r"^<epd folder 0>/ckfolder.epd-checkpoint is a folder where this run"):
        _run(model, "eps", "ckfolder", iterations=4)
    (epd_dir / ".run.epd-checkpoint.abcdefgh.tmp").mkdir()  # named like a killed write's leftover: not removed
    _run(model, "eps", "run", iterations=2, start_check=0)
    assert (epd_dir / ".run.epd-checkpoint.abcdefgh.tmp").is_dir() and (epd_dir / "run.safetensors").is_file()


def test_a_checkpoint_that_cannot_be_written_names_it_and_leaves_nothing_behind(epd_dir, monkeypatch):
    """A full disk at a checkpoint save ended the run with a bare "[Errno 28] No space left on device": no file
    named, nothing said about what to do."""
    real = os.fsync

    def full(fd: int) -> None:
        if ".full.epd-checkpoint." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ValueError, match=r"^<epd folder 0>/full.epd-checkpoint: cannot save this run's checkpoint "
                                         r"\(No space left on device\); free space"):  # fmt: skip
        _run(tiny_model("eps"), "eps", "full", iterations=4, start_check=0)
    assert sorted(p.name for p in epd_dir.iterdir()) == []  # no temporary file, no lock
    monkeypatch.setattr(os, "fsync", real)
    _run(tiny_model("eps"), "eps", "full", iterations=4, start_check=0)
    assert sorted(p.name for p in epd_dir.iterdir()) == ["full.safetensors"]


def test_an_epd_folder_that_cannot_be_created_is_named_before_training(tmp_path, monkeypatch, few_held_out):
    """A file on the way to the configured epd folder gave a bare "[Errno 20] Not a directory" and the server's
    absolute path."""
    import folder_paths

    (tmp_path / "afile").write_text("x")
    _, exts = folder_paths.folder_names_and_paths["epd"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(tmp_path / "afile" / "epd")], exts))
    with pytest.raises(ValueError, match=r"^<epd folder 0>: cannot create this folder for the table \(Not a dir"):
        _run(tiny_model("eps"), "eps", "x", iterations=2, start_check=0)


@pytest.mark.parametrize("check", [16, 0])
def test_interrupt_stops_and_saves_nothing(epd_dir, check):
    """Cancel at the first progress report: in the start check (its 16 noises) or, without one, at iteration 1."""
    import comfy.model_management

    model = tiny_model("eps")
    seen: list[int] = []
    with H.interrupt_at(1, seen), pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(model, "eps", "interrupted", iterations=50, start_check=check)
    assert seen == [check or 1]
    assert sorted(p.name for p in epd_dir.iterdir()) == []
    assert type(model.model.model_sampling).__name__.startswith("ModelSampling")


def test_training_guides_the_model_as_the_sampler_does():
    """From a mutation audit: positive and negative swapped, or the cfg ignored, in what training samples went
    unnoticed. The model a training run sees is ComfyUI's CFG of its positive and negative at its cfg: with each
    side measured alone (a prompt guided against itself), D = D(negative) + cfg * (D(positive) - D(negative))."""
    training = H.pack_module("nodes.training")
    model, empty = tiny_model("sd3"), latent("sd3", 2)["samples"]  # the tiny SD1.5 UNet barely reads its prompts
    start = training.start_table(model.get_model_object("model_sampling"), 4, 2, False, "epd")
    config = H.pack_module("epd_core.config").DistillConfig(iterations=1, batch=2)
    noise = torch.randn(empty.shape, generator=torch.Generator().manual_seed(0))

    def answer(positive, negative, cfg):
        def fit(s):
            sigma = s.grid[0].to(noise).expand(2)
            return s.denoiser(noise * sigma[0], sigma).detach()

        return training._train_on_model(model, positive, negative, cfg, empty, start, config, fit)

    positive, negative = conditioning(2, 1), conditioning(2, 2)
    d_pos, d_neg = answer(positive, positive, 3.0), answer(negative, negative, 3.0)
    gap = float((d_pos - d_neg).abs().max())
    assert gap > 1e-2, gap
    error = float((answer(positive, negative, 3.0) - (d_neg + 3.0 * (d_pos - d_neg))).abs().max())
    assert error < 1e-3 * gap, (error, gap)


def test_the_progress_bar_counts_the_training_after_the_start_check(epd_dir):
    """The start check's noises, then the iterations: newer ComfyUI sends a bar's value only beyond the last one sent,
    so on one bar the training (1, 2, ... below the check's 16) showed nothing until its end."""
    import comfy.utils

    reports: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        _run(tiny_model("eps"), "eps", "progress", iterations=5, start_check=16)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert reports[0] == (16, 16) or reports[0][1] == 16
    assert (1, 5) in reports and reports[-1] == (5, 5), reports


@pytest.mark.parametrize("nfe,iterations", [(4, 4000), (5, 3200), (9, 1778), (10, 1600), (12, 1600)])
def test_iterations_auto_trains_below_nfe_10_in_more_steps(epd_dir, nfe, iterations):
    """The node's iterations default, 0, is auto: 1,600 Adam steps from NFE 10 on, 16,000 / NFE below, as the
    progress bar counts them (cancelled at the first report)."""
    import comfy.model_management

    assert node_defaults(N["EPDDistill"])["iterations"] == 0
    seen: list[int] = []
    totals: list[int] = []
    with H.interrupt_at(1, seen, totals), pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(tiny_model("eps"), "eps", "auto", iterations=0, nfe=nfe, start_check=0, keep_best=0)
    assert seen == [1] and totals == [iterations]


@pytest.mark.parametrize("kind", ["eps", "flux"])
def test_rdpo_node_saves_a_table_with_provenance(epd_dir, kind):
    model = tiny_model(kind)
    start, _ = _run(model, kind, f"start_{kind}", iterations=2)
    params, info = (
        N["EPDRDPO"]
        .execute(
            model,
            conditioning(2, 1),
            conditioning(2, 2),
            latent(kind, 1),
            start,
            2.0,
            "fidelity",
            2,
            3,
            2,
            2,
            20.0,
            1e-3,
            0,
            f"rdpo_{kind}",
            False,
        )
        .result
    )
    loaded = epd_core.load_params(epd_dir / f"rdpo_{kind}.safetensors")
    assert loaded.metadata["rdpo"]["iterations"] == 3 and "reward" in info
    checks = loaded.metadata["rdpo"]["guard"]  # the fidelity reward's held-out checks: what info reports
    assert f"held-out fidelity error (lower is better) {checks[0]['metric']:.4g} at the start" in info
    # each table names the model it was fitted to, and the RDPO table its start's run under trained_from
    model_name = {"eps": "a ComfyUI SD15 model", "flux": "a ComfyUI Flux model"}[kind]
    assert start.metadata["model"] == loaded.metadata["model"] == model_name
    assert (start.metadata["tool"], loaded.metadata["tool"]) == ("EPD Distill node", "EPD RDPO node")
    assert loaded.metadata["trained_from"][0]["tool"] == "EPD Distill node"
    assert f"made for {model_name}" in N["EPDParamsLoader"].execute(f"rdpo_{kind}.safetensors").result[1]
    assert torch.isfinite(loaded.r_params).all() and loaded.num_steps == start.num_steps
    assert not (torch.equal(loaded.r_params, start.r_params) and torch.equal(loaded.weight_s, start.weight_s))


def test_rdpo_refuses_an_unknown_reward_before_training(epd_dir):
    """ComfyUI 0.3.x does not check a V3 combo's value: a typo ('clip-score') trained on fidelity and said success."""
    model = tiny_model("eps")
    start = epd_core.EPDParams.start(4, 2, schedule_type="discrete", backend="ldm")
    with pytest.raises(ValueError, match="reward must be one of fidelity, clip_score, preference, got 'clip-score'"):
        N["EPDRDPO"].execute(model, conditioning(2, 1), conditioning(2, 2), latent("eps", 1), start, 2.0, "clip-score",
                             2, 3, 2, 2, 20.0, 1e-3, 0, "typo", False)  # fmt: skip
    assert not list(epd_dir.iterdir())


def test_cli_rdpo(tmp_path):
    import io
    from contextlib import redirect_stdout

    from epd_core.__main__ import main as cli_main

    start = tmp_path / "start.safetensors"
    table = epd_core.EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, scale_dir=0.05)
    epd_core.save_params(table, start)
    for extra, heads in (([], ["scale_dir"]), (["--no-scale-heads"], [])):
        out = tmp_path / "rdpo.safetensors"
        with redirect_stdout(io.StringIO()):
            assert cli_main(["rdpo", str(start), "--iterations", "2", "--groups", "2", "--k", "2", "--force",
                             "--exact-steps", "20", "--scale-std", "0.01", "--out", str(out), *extra]) == 0  # fmt: skip
        meta = epd_core.load_params(out).metadata["rdpo"]
        assert meta["iterations"] == 2 and meta["scale_heads"] == heads
        assert meta["scale_std"] == (0.01 if heads else None)


def test_auto_iterations_follow_a_given_tables_nfe_not_the_unused_nfe_input(epd_dir, monkeypatch):
    """With ``start_params`` the table's own NFE applies (the tooltip), so auto iterations are its NFE's: an NFE-5
    table with the nfe input left at 10 trained 1,600 iterations, not 3,200."""
    nodes_training = H.pack_module("nodes.nodes_training")
    config_module = H.pack_module("epd_core.config")
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, positive, negative, cfg, latent, start, config, **kw):
        seen["iterations"] = config.iterations
        raise Stop

    monkeypatch.setattr(nodes_training, "distill_on_model", capture)
    model = tiny_model("eps")
    training = H.pack_module("nodes.training")
    table = training.start_table(model.get_model_object("model_sampling"), 4, 2, False, "carry")  # NFE 4
    args = {**node_defaults(N["EPDDistill"]), "nfe": 10, "iterations": 0, "filename": "auto_iterations",
            "start_params": table}  # fmt: skip
    with pytest.raises(Stop):
        N["EPDDistill"].execute(model, conditioning(1, 1), conditioning(1, 2), latent("eps", 1), **args)
    assert table.nfe != 10 and seen["iterations"] == config_module.node_iterations(table.nfe)


def test_distill_asks_one_sigma_per_call_when_a_conditioning_reads_only_the_first():
    """ComfyUI decides a timestep range (and ControlNet, hooks, some model patches) per call from its first sigma: the
    student's K points in one call were all treated as point 0. With such a conditioning every call now has one
    sigma; without one the points still go together."""
    training = H.pack_module("nodes.training")
    config_module = H.pack_module("epd_core.config")
    base, empty = tiny_model("eps"), latent("eps", 1)["samples"]
    start = training.start_table(base.get_model_object("model_sampling"), 4, 2, False, "epd")
    early, late = conditioning(1, 1), conditioning(1, 3)
    ranged = [[early[0][0], {**early[0][1], "start_percent": 0.0, "end_percent": 0.5}],
              [late[0][0], {**late[0][1], "start_percent": 0.5, "end_percent": 1.0}]]  # fmt: skip
    config = config_module.DistillConfig(iterations=2, batch=2, teacher_m=1, gradient="fd", start_noises=0)
    mixed = {}
    for name, positive in (("plain", early), ("ranged", ranged)):
        with network_calls(base) as calls:
            training.distill_on_model(base, positive, early, 2.0, empty, start, config)
        mixed[name] = sum(bool((t != t[0]).any()) for _, t in calls)
    assert mixed["plain"] > 0 and mixed["ranged"] == 0, mixed


@pytest.mark.parametrize("change", ["second prompt", "late prompt", "feature weight", "feature encoder",
                                    "rdpo teacher_steps", "rdpo reward model"])  # fmt: skip
def test_a_checkpoint_of_other_conditioning_or_reward_is_dropped_not_resumed(tmp_path, caplog, change, few_held_out):
    """What changes a run but is neither the model nor the config: the second prompt of a conditioning batch, a
    prompt the late steps alone see (a timestep range), the feature loss's weight, its encoder (another of the same
    name), RDPO's fidelity teacher, its reward (another of the same name). A checkpoint made before the change is
    dropped ("not resuming"), and the run ends as a fresh one does."""
    training, features = H.pack_module("nodes.training"), H.pack_module("nodes.features")
    config_module = H.pack_module("epd_core.config")
    model, empty = tiny_model("eps"), latent("eps", 1)["samples"]
    start = training.start_table(model.get_model_object("model_sampling"), 4, 2, False, "epd")
    encoder = features.Encoder("flat", lambda x: x.flatten(1))
    renamed = features.Encoder("flat", lambda x: x.flatten(1).roll(1, dims=1))  # another encoder, the same name
    negative, positive = conditioning(2, 2), conditioning(2, 1)
    changed = [[positive[0][0].clone(), {"pooled_output": positive[0][1]["pooled_output"].clone()}]]
    changed[0][0][1] += 1.0  # the second prompt only
    early, late, later = conditioning(1, 1), conditioning(1, 3), conditioning(1, 4)

    def ranged(c, lo, hi):
        return [c[0][0], {**c[0][1], "start_percent": lo, "end_percent": hi}]

    def distill(pos=positive, neg=negative, weight=None, encoder=encoder, **kw):
        config = config_module.DistillConfig(iterations=3, batch=2, teacher_m=1, gradient="fd", start_noises=0)
        return training.distill_on_model(model, pos, neg, 2.0, empty, start, config, feature_weight=weight or 0.0,
                                         encoder=None if weight is None else encoder, **kw)  # fmt: skip

    def rdpo(teacher_m, reward=None, **kw):
        config = config_module.RDPOConfig(iterations=3, groups=2, k=2, minibatch=2, width=8, blocks=1, lr=1e-2)
        return training.rdpo_on_model(model, positive, negative, 2.0, empty, start, config, teacher_m=teacher_m,
                                      reward=reward, **kw)[0]  # fmt: skip

    def scorer(channel):  # rewards of one name that score different things
        def contrast(latents, context):
            return latents[:, channel].flatten(1).std(1)

        return contrast

    before, after = {
        "second prompt": (lambda **kw: distill(**kw), lambda **kw: distill(pos=changed, **kw)),
        "late prompt": (lambda **kw: distill(pos=[ranged(early, 0, 0.5), ranged(late, 0.5, 1)], neg=early, **kw),
                        lambda **kw: distill(pos=[ranged(early, 0, 0.5), ranged(later, 0.5, 1)], neg=early, **kw)),
        "feature weight": (lambda **kw: distill(weight=1.0, **kw), lambda **kw: distill(weight=5.0, **kw)),
        "rdpo teacher_steps": (lambda **kw: rdpo(1, **kw), lambda **kw: rdpo(3, **kw)),
        "feature encoder": (lambda **kw: distill(weight=1.0, **kw), lambda **kw: distill(weight=1.0, encoder=renamed,
                                                                                           **kw)),
        "rdpo reward model": (lambda **kw: rdpo(1, reward=scorer(0), **kw), lambda **kw: rdpo(1, reward=scorer(1),
                                                                                               **kw)),
    }[change]  # fmt: skip
    ck = tmp_path / "run.epd-checkpoint"
    before(checkpoint=ck, checkpoint_every=1)  # 3 iterations: the checkpoint after the second is left
    assert ck.exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="epd"):
        resumed = after(checkpoint=ck, checkpoint_every=1)
    assert "not resuming" in caplog.text
    fresh = after()
    assert torch.equal(resumed.r_params, fresh.r_params) and torch.equal(resumed.weight_s, fresh.weight_s)


def test_rdpo_info_reports_the_held_out_checks_not_the_noisy_rollout_rewards():
    """The rollouts' first reward is one iteration on fresh noises, the last the mean of the last fifth, rejected
    iterations included: the info said 'the mean reward fell' over a table 21% better on the held-out check, and a
    gain over a table the check had reverted to its start."""
    report = H.pack_module("epd_core.rdpo").guard_report  # the node's info and the CLI's last line
    base = {"guard_metric": "held_out_fidelity", "first_reward": -0.03, "final_reward": -0.08, "stopped_at": None}
    better = [{"iteration": 0, "kl": 0.0, "metric": 0.0545}, {"iteration": 50, "kl": 0.1, "metric": 0.0432}]
    text = report({**base, "guard": better})
    assert "0.0545 at the start, 0.0432 for the saved table" in text and "fell" not in text and "worse" not in text
    stopped = [*better[:1], {"iteration": 5, "kl": 0.2, "metric": 0.06}]
    text = report({**base, "guard": stopped, "stopped_at": 5, "final_reward": -0.002})
    assert "0.0545 for the saved table" in text and "the one of iteration 0" in text
    assert "mean reward fell" in report({**base, "guard": [{"iteration": 0, "kl": 0.0}]})  # no held-out metric


def test_training_takes_an_empty_latent_of_another_format_and_whole_sets_of_both_conditionings(epd_dir):
    """A 4-channel Empty Latent Image on an SD3 model (KSampler and EPD KSampler widen it to 16 channels): EPD
    Distill and RDPO failed in torch. A positive of 3 prompts and a negative of 2 repeat every 6 rows, so RDPO's
    groups round to 6, not 3 (a group's rollouts had different negatives), and the info says so."""
    training = H.pack_module("nodes.training")
    assert training.conditioning_batch(conditioning(3, 1), conditioning(2, 2)) == 6
    model = tiny_model("sd3")
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    start, _ = N["EPDDistill"].execute(model, conditioning(1, 1), conditioning(1, 2), empty,
                                       **_args("empty4", 2, False)).result  # fmt: skip
    assert start.num_steps > 1
    params, info = N["EPDRDPO"].execute(model, conditioning(3, 1), conditioning(2, 2), empty, start, 2.0, "fidelity",
                                        1, 1, 2, 2, 20.0, 1e-3, 0, "empty4_rdpo", False).result  # fmt: skip
    assert params.metadata["rdpo"]["groups"] == 6 and "(groups 2 -> 6: a multiple of 6)" in info
    assert "3 positive and 2 negative prompts, which repeat together every 6" in info
    assert params.metadata["rdpo"]["kl_to_start"] >= 0


def test_rdpo_takes_a_config_made_from_the_repositorys_own_core():
    """A script that imports ``epd_core`` (as the README's examples do) while ComfyUI has loaded the pack's own copy:
    the config was refused as 'config must be an RDPOConfig, got RDPOConfig'."""
    import epd_core.config as top

    pack_rdpo = H.pack_module("epd_core.rdpo")
    assert pack_rdpo.RDPOConfig is not top.RDPOConfig
    start = H.pack_module("epd_core.params").EPDParams.start(3, 2)
    config = top.RDPOConfig(iterations=1, groups=1, k=2, minibatch=2)
    out = pack_rdpo.rdpo(
        lambda x, s: 0 * x, start, (1, 2, 2), config, reward=lambda x, c: -x.flatten(1).square().mean(1)
    )
    params, curve = out
    assert params.num_steps == start.num_steps and len(curve) == 1


def test_a_resumed_distill_takes_the_start_its_check_chose_without_checking_again(
    tmp_path, monkeypatch, caplog, few_held_out
):
    """The start check (1,024 noises through the teacher and every candidate by default) ran again at each resumed
    call. The checkpoint now notes the check's choice; a resume of the same run takes it and ends with the table and
    the ``start`` record of an uninterrupted run. A checkpoint of another run, or notes naming no candidate, get the
    check again."""
    training = H.pack_module("nodes.training")
    config_module = H.pack_module("epd_core.config")
    checkpoint = H.pack_module("epd_core.checkpoint")
    model, empty = tiny_model("eps"), latent("eps", 1)["samples"]
    starts = training.start_tables(model.get_model_object("model_sampling"), 4, 2, False, "carry")
    assert len(starts) > 1
    checks = []
    original = training.start_errors
    monkeypatch.setattr(training, "start_errors", lambda *a, **kw: checks.append(1) or original(*a, **kw))
    config = config_module.DistillConfig(iterations=3, batch=2, teacher_m=1, gradient="fd", start_noises=16)

    def distill(positive=None, **kw):
        positive = positive or conditioning(1, 1)
        return training.distill_on_model(model, positive, conditioning(1, 2), 2.0, empty, starts, config, **kw)

    ck = tmp_path / "run.epd-checkpoint"
    first = distill(checkpoint=ck, checkpoint_every=1)  # uninterrupted; the checkpoint after iteration 2 is left
    assert len(checks) == 1 and checkpoint.checkpoint_notes(ck) == {"start": first.metadata["start"]}
    resumed = distill(checkpoint=ck, checkpoint_every=1)
    assert len(checks) == 1, "the resumed run checked the starts again"
    assert resumed.metadata["start"] == first.metadata["start"]
    assert torch.equal(resumed.r_params, first.r_params) and torch.equal(resumed.weight_s, first.weight_s)
    caplog.clear()
    with caplog.at_level("WARNING", logger="epd"):
        other = distill(positive=conditioning(1, 3), checkpoint=ck, checkpoint_every=1)  # another run's checkpoint
    assert "not resuming" in caplog.text and len(checks) == 2
    assert checkpoint.checkpoint_notes(ck)["start"] == other.metadata["start"]
    state = ck.read_bytes()
    n = int.from_bytes(state[:8], "little")
    header = json.loads(state[8 : 8 + n])

    def forge(notes: str) -> None:
        header["__metadata__"]["notes"] = notes
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        ck.write_bytes(len(text).to_bytes(8, "little") + text + state[8 + n :])

    forge("not json")
    assert checkpoint.checkpoint_notes(ck) == {}
    forge("[" * 100_000 + "]" * 100_000)  # deeper than the JSON reader recurses
    assert checkpoint.checkpoint_notes(ck) == {}
    for noted in ({**other.metadata["start"], "grid": [other.metadata["start"]["grid"]]},
                  {**other.metadata["start"], "untrained_error": dict.fromkeys(starts, 10**400)}):  # fmt: skip
        forge(json.dumps({"start": noted}))  # these raised (unhashable; too large for a float) at every queue
        assert checkpoint.checkpoint_notes(ck) == {"start": noted} and training._noted_start(ck, starts) is None
    elsewhere = next(name for name in starts if name != other.metadata["start"]["grid"])
    forgeries = [  # (notes, whether the resumed run finds that its checkpoint is not of the noted start)
        (json.dumps({"start": {"grid": "evil"}}), False),
        (json.dumps({"start": {**other.metadata["start"], "grid": elsewhere}}), True),
    ]
    for notes, dropped in forgeries:
        forge(notes)
        caplog.clear()
        with caplog.at_level("WARNING", logger="epd"):
            table = distill(positive=conditioning(1, 3), checkpoint=ck, checkpoint_every=1)
        assert ("not resuming" in caplog.text) == dropped, (notes, caplog.text)
        assert torch.equal(table.r_params, other.r_params) and table.metadata["start"] == other.metadata["start"]
    assert len(checks) == 2 + len(forgeries)


@pytest.mark.parametrize("node", ["EPDDistill", "EPDRDPO"])
def test_a_run_of_a_name_another_process_is_training_is_refused_and_leaves_its_checkpoint(epd_dir, node, monkeypatch):
    """Two ComfyUI servers sharing one epd folder, both training one filename: the second dropped the first's
    checkpoint as another run's, then both wrote it in turn (a crash could not resume) and removed each other's
    writes under way (5 of 25 runs failed with FileNotFoundError). A run holds its name; the other is refused at
    once, and trains once the holder's process has ended (a kill releases it)."""
    import subprocess
    import sys

    lock = epd_dir / ".shared.epd-lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"), str(lock)],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        checkpoint = epd_dir / "shared.epd-checkpoint"
        checkpoint.write_bytes(b"the other run's state")
        model = tiny_model("eps")
        start = H.pack_module("nodes.training").start_table(model.get_model_object("model_sampling"), 4, 2, False)

        def run():
            if node == "EPDDistill":
                return _run(model, "eps", "shared", iterations=1, start_check=0, keep_best=0)
            return N["EPDRDPO"].execute(model, conditioning(1, 1), conditioning(1, 2), latent("eps", 1), start, 2.0,
                                        "fidelity", 1, 1, 2, 2, 20.0, 1e-3, 0, "shared", False).result  # fmt: skip

        with pytest.raises(ValueError, match="/shared.safetensors is being trained by another run"):
            run()
        assert checkpoint.read_bytes() == b"the other run's state"
    finally:
        holder.kill()
        holder.wait(30)
    checkpoint.unlink()
    (epd_dir / ".shared.safetensors.a1b2c3d4.tmp").write_bytes(b"half a table")  # a kill during an earlier save
    run()
    assert (epd_dir / "shared.safetensors").is_file() and not lock.exists()
    assert sorted(p.name for p in epd_dir.iterdir()) == ["shared.safetensors"]


class _Elementwise(torch.nn.Module):
    """A network of any latent's shape (a packed ``[B, 1, N]`` one included): ``x`` scaled by the timestep."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x, timesteps, context=None, **kw):
        self.seen.append(tuple(x.shape[1:]))
        return x * self.w * (timesteps.float() / 1000.0).reshape(-1, *([1] * (x.ndim - 1))) + 0.01 * context.mean()


def test_training_fits_the_latent_epd_ksampler_samples(epd_dir, monkeypatch):
    """From a review: ComfyUI 0.33 samples a nested latent (LTX-2's video with audio) packed into one ``[B, 1, N]``;
    EPD Distill and EPD RDPO trained on its first part alone (a nested tensor's shape), so the table's first-step
    mean had that part's channels and EPD KSampler refused it on the latent it was fitted for. Training sees the
    latent sampling sees, nested (where this ComfyUI has them) or not, and the table samples it; a reward gets the
    nested latent's first part (LTX-2's video) as a LATENT holds it, which a VAE decodes, not the packed one."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    from epd_dev.tiny_models import UNET

    config = comfy.supported_models.SD15(dict(UNET))
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    base.diffusion_model = net = _Elementwise()
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    latents = {"plain": torch.zeros(1, 4, 8, 8)}
    nested = getattr(getattr(comfy, "nested_tensor", None), "NestedTensor", None)
    if nested is not None:  # ComfyUI 0.33
        latents["nested"] = nested([torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 16)])
    pos, neg = conditioning(1, 1), conditioning(1, 2)
    config, rewarded = H.pack_module("epd_core.config").RDPOConfig(iterations=1, groups=2, k=2), []

    def reward(x: torch.Tensor, _) -> torch.Tensor:
        rewarded.append(tuple(x.shape))
        return x.flatten(1).mean(1)

    for name, samples in latents.items():
        lat = {"samples": samples}
        args = _args(f"form_{name}", iterations=2, nfe=4, start_check=4, keep_best=4)
        net.seen.clear()
        table = N["EPDDistill"].execute(model, pos, neg, lat, **args).result[0]
        trained = set(net.seen)
        net.seen.clear()
        out = N["EPDKSampler"].execute(model, 0, 2.0, pos, neg, lat, table, 1.0, "batched", True).result[0]["samples"]
        assert trained == set(net.seen) == ({(1, 288)} if name == "nested" else {(4, 8, 8)}), name
        assert table.afs_mean is not None and table.afs_mean.numel() == next(iter(trained))[0], name
        parts = out.unbind() if name == "nested" else [out]
        assert [p.shape for p in parts] == [p.shape for p in (samples.unbind() if name == "nested" else [samples])]
        rdpo = {**node_defaults(N["EPDRDPO"]), "cfg": 2.0, "reward": "fidelity", "teacher_steps": 2, "iterations": 1,
                "groups": 2, "group_size": 2, "seed": 0, "filename": f"rdpo_{name}"}  # fmt: skip
        net.seen.clear()
        N["EPDRDPO"].execute(model, pos, neg, lat, epd_params=table, **rdpo)
        assert set(net.seen) == trained, name
        rewarded.clear()  # a reward (a VAE's decode) gets the latent's first part, as a LATENT holds it
        H.pack_module("nodes.training").rdpo_on_model(model, pos, neg, 2.0, samples, table, config, reward=reward)
        assert set(rewarded) == {(4, 4, 8, 8)}, name


def test_training_under_a_patch_that_keeps_state_per_call_says_what_to_do(epd_dir):
    """From a review: APG with momentum keeps a running average sized to the last model call, and training calls the
    model on batches of several sizes (the first-step mean, the start check, the rollouts): EPD Distill failed with a
    bare torch size error. It names the patch and what to do, and the model without the patch trains."""
    from comfy_extras.nodes_apg import APG

    model = tiny_model("eps")
    apg = APG.execute(model, 1.0, 5.0, 0.5).result[0]
    pos, neg, lat = conditioning(2, 1), conditioning(2, 2), latent("eps", 1)
    args = _args("apg", iterations=1, nfe=4, start_check=4, keep_best=4)
    with pytest.raises(RuntimeError, match=r"training failed under sampler_pre_cfg_function.*the model from before"):
        N["EPDDistill"].execute(apg, pos, neg, lat, **args)
    assert not (epd_dir / "apg.safetensors").exists()
    N["EPDDistill"].execute(model, pos, neg, lat, **args)
    assert (epd_dir / "apg.safetensors").is_file()


def test_a_training_error_is_put_on_a_model_patch_only_where_there_is_one(epd_dir):
    """From a review of the message above: it was given to every error of a run whose conditioning has a timestep
    range (no model node there to take away), and on ComfyUI 0.33 it turned an accelerator's out-of-memory error into
    a plain one, so ComfyUI neither gave its out-of-memory tips nor unloaded the models."""
    from comfy_extras.nodes_apg import APG

    import nodes as comfy_nodes

    sampling = H.pack_module("nodes.sampling")
    model = tiny_model("eps")
    apg = APG.execute(model, 1.0, 5.0, 0.0).result[0]  # without momentum: APG itself does not fail
    ranged = comfy_nodes.ConditioningSetTimestepRange().set_range(conditioning(2, 1), 0.0, 0.8)[0]
    oom = torch.AcceleratorError("CUDA error: out of memory")
    args = _args("failing", iterations=1, nfe=4, start_check=4, keep_best=4)

    def raising(error: Exception):
        def hook(*_):
            raise error

        return model.model.diffusion_model.register_forward_pre_hook(hook)

    for run, error in ((model, RuntimeError("boom")), (apg, oom)):
        positive = ranged if run is model else conditioning(2, 1)
        hook = raising(error)
        try:
            with pytest.raises(RuntimeError) as raised:
                N["EPDDistill"].execute(run, positive, conditioning(2, 2), latent("eps", 1), **args)
        finally:
            hook.remove()
        patched = run is apg and not sampling._is_oom(error)  # 0.3.75 does not count an accelerator error as one
        assert ("training failed under" in str(raised.value)) == patched
        assert not patched or "under sampler_pre_cfg_function" in str(raised.value)
        assert sampling._is_oom(raised.value) == sampling._is_oom(error)


def test_a_bundled_table_s_name_in_another_case_is_refused(epd_dir):
    """On a case-insensitive file system "Digits-NFE5" would shadow the bundled digits-nfe5; the reserved names were
    compared in one case only (the tests' names were all lower case)."""
    tf = H.pack_module("nodes.table_files")
    with pytest.raises(ValueError, match="bundled"):
        tf.output_path("Digits-NFE5", False)


def test_the_fingerprint_of_a_table_replaced_outside_stays_the_same_between_calls(epd_dir):
    """ComfyUI reruns a node whose fingerprint changes: a saved table replaced outside the server gets a new
    fingerprint once, then the same one at every call (the check compared the state with the saved one only)."""
    import os

    tf = H.pack_module("nodes.table_files")
    path = tf.output_path("fp_stable", False)
    tf.save_output(epd_core.EPDParams.start(4, 2), path, False)
    assert tf.saved_generation("fp_stable") == tf.saved_generation("fp_stable.safetensors") == "0"
    path.write_bytes(b"someone else's file")
    os.utime(path, ns=(1, 1))
    first = tf.saved_generation("fp_stable")
    assert first != "0" and tf.saved_generation("fp_stable") == first


@pytest.mark.parametrize("node_id", ["EPDDistill", "EPDRDPO"])
def test_a_table_saved_by_a_run_of_other_settings_changes_the_fingerprint(epd_dir, node_id):
    """A training queued with settings A, then B (overwrite, the same file), then A again got ComfyUI's cached
    run ('saved ...') while the file held B's table: the fingerprint followed the file per name, not per settings."""
    from comfy_api.latest import io

    tf = H.pack_module("nodes.table_files")
    node = N[node_id]
    from comfy_execution.graph import DynamicPrompt

    assert {io.Hidden.dynprompt, io.Hidden.unique_id} <= set(node.define_schema().hidden)
    widgets = {"filename": "fp_runs", "learning_rate": 0.01, "seed": 0, "overwrite": True}
    prompt = DynamicPrompt(
        {"7": {"class_type": node_id, "inputs": {**widgets, "model": ["1", 0], "positive": ["2", 0]}}}
    )
    names = {*widgets, "model", "positive"}
    settings_a = tf.prompt_settings(
        io.HiddenHolder.from_dict({io.Hidden.dynprompt: prompt, io.Hidden.unique_id: "7"}), names
    )
    expanded = DynamicPrompt({})  # a node a node expansion made is in the dynamic prompt only
    expanded.add_ephemeral_node("9.0.7", prompt.get_node("7"), "9", "9")
    holder = io.HiddenHolder.from_dict({io.Hidden.dynprompt: expanded, io.Hidden.unique_id: "9.0.7"})
    assert tf.prompt_settings(holder, names) == settings_a
    fingerprint_a = {**widgets, "model": None, "positive": None}  # ComfyUI gives the fingerprint no linked value
    assert settings_a == tf.settings_key(fingerprint_a) and tf.prompt_settings(None, names) is None
    settings_b = tf.settings_key({**fingerprint_a, "learning_rate": 0.05})
    path = tf.output_path("fp_runs", True)
    tf.save_output(epd_core.EPDParams.start(4, 2), path, True, settings_a)
    queued_a = node.fingerprint_inputs(**fingerprint_a)
    assert queued_a == node.fingerprint_inputs(**fingerprint_a)  # unchanged: ComfyUI's cached run
    tf.save_output(epd_core.EPDParams.start(5, 2), path, True, settings_b)
    assert node.fingerprint_inputs(**fingerprint_a) != queued_a  # B's table in the file: A trains again
    assert tf.saved_generation("fp_runs", settings_b) == "0"  # B's own run is still the file


def test_a_checkpoint_s_start_record_of_other_candidates_is_not_taken(monkeypatch):
    """A resumed run takes the start its checkpoint noted only if the noted check measured the same candidates."""
    training = H.pack_module("nodes.training")
    notes = {"start": {"grid": "model grid", "untrained_error": {"model grid": 0.1, "uniform grid": 0.2}}}
    monkeypatch.setattr(training, "checkpoint_notes", lambda path: notes)
    assert training._noted_start("ckpt", {"rho-7 grid": object(), "model grid": object()}) is None
    assert training._noted_start("ckpt", {"uniform grid": object(), "model grid": object()}) is not None


def test_a_table_trained_under_another_shift_records_that_shift(epd_dir):
    """A table without its own grid samples on the model's shift, so it is fitted at the shift of the model it is
    trained on. EPD Distill from a shift-3 start (and EPD RDPO from a shift-3 table) on a model under ModelSamplingSD3
    at 6 trained on the shift-6 grid but recorded shift 3: the loader's info named a shift it was not fitted at (and,
    with learn_grid, a grid ending at shift 6's sigma 'fitted at shift 3')."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    tables, training = H.pack_module("nodes.nodes_tables"), H.pack_module("nodes.training")
    sd3 = tiny_model("sd3")
    (model,) = ModelSamplingSD3().patch(sd3, 6.0)
    start = training.start_table(sd3.get_model_object("model_sampling"), 4, 2, False, "epd")
    assert start.flowmatch_shift == 3.0 and start.t_steps is None
    quick = {"nfe": 6, "teacher_steps": 1, "start_check": 0, "keep_best": 0, "student": "epd", "start_params": start}
    params, _ = _run(model, "sd3", "shift6", iterations=1, **quick)
    grown, _ = _run(model, "sd3", "shift6_grid", iterations=1, learn_grid=True, **quick)
    rdpo, _ = N["EPDRDPO"].execute(model, conditioning(1, 1), conditioning(1, 2), latent("sd3", 1), start, 2.0,
                                   "fidelity", 1, 1, 1, 2, 20.0, 1e-3, 0, "shift6_rdpo", False).result  # fmt: skip
    for table in (params, grown, rdpo):
        assert table.flowmatch_shift == 6.0
    assert tables.made_for(params).endswith("shift 6") and "(fitted at shift 6)" in tables.made_for(grown)


def test_training_refuses_a_nan_cfg_before_any_model_call(epd_dir):
    """ComfyUI's range check lets a NaN through (an API prompt's ``NaN``); training then failed at its first call
    with 'the model returned non-finite values ... a float16 model overflowing?', blaming the model, as the sampling
    nodes' check does not."""
    model = tiny_model("eps")
    start = H.pack_module("nodes.training").start_table(model.get_model_object("model_sampling"), 4, 2, False)
    args = (conditioning(1, 1), conditioning(1, 2), latent("eps", 1))
    with network_calls(model) as calls:
        with pytest.raises(ValueError, match="cfg must be a finite number, got nan"):
            N["EPDDistill"].execute(model, *args, **_args("bad", 1, cfg=float("nan"), nfe=4, start_check=0))
        with pytest.raises(ValueError, match="cfg must be a finite number, got nan"):
            N["EPDRDPO"].execute(model, *args, start, float("nan"), "fidelity", 1, 1, 2, 2, 20.0, 1e-3, 0, "bad_rdpo",
                                 False)  # fmt: skip
    assert calls == []
    assert list(epd_dir.iterdir()) == []


@pytest.mark.parametrize("head", ["scale_dir", "scale_time", "feature_weight"])
def test_a_nan_scale_bound_is_refused_not_read_as_no_head(epd_dir, head):
    """A NaN fails every comparison, so ``bound > 0`` read it as 0 and the run trained without the head it was asked
    for, saying nothing (infinity failed later, at the table's check); a NaN feature weight made every loss NaN."""
    model = tiny_model("eps")
    args = (conditioning(1, 1), conditioning(1, 2), latent("eps", 1))
    with network_calls(model) as calls:
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{head} must be a finite number, got {value}"):
                N["EPDDistill"].execute(model, *args, **_args("bad", 1, nfe=4, start_check=0, **{head: value}))
    assert calls == []
    assert list(epd_dir.iterdir()) == []


OUT_OF_RANGE = [  # (node, input, value): each outside the range or options the node declares for the input
    ("EPDDistill", "nfe", 1),
    ("EPDDistill", "points", 9),
    ("EPDDistill", "seed", -1),
    ("EPDRDPO", "teacher_steps", 0),
    ("EPDRDPO", "learning_rate", 2.0),
    ("EPDAnalyticModel", "shift", -1.0),
    ("EPDMnistDecode", "scale", 17),
]


@pytest.mark.parametrize("node,name,value", OUT_OF_RANGE)
def test_a_linked_value_outside_the_declared_range_is_refused_by_name(epd_dir, node, name, value):
    """ComfyUI checks min, max and options only on a widget's own value: one that arrives by a link (a Primitive or
    Int node) reached the node unchecked, and EPD Distill saved a table of NFE 1 or of 9 points, RDPO one trained
    against a teacher of 0 points, EPD MNIST Decode enlarged by any factor."""
    model = tiny_model("eps")
    args = (conditioning(1, 1), conditioning(1, 2), latent("eps", 1))
    start = H.pack_module("nodes.training").start_table(model.get_model_object("model_sampling"), 4, 2, False)
    rdpo = dict(epd_params=start, cfg=2.0, reward="fidelity", teacher_steps=1, iterations=1, groups=1, group_size=2,
                concentration=20.0, learning_rate=1e-3, seed=0, filename="bad_rdpo", overwrite=False)  # fmt: skip
    training = dict(zip(("model", "positive", "negative", "latent_image"), (model, *args), strict=True))
    given = {
        "EPDDistill": training | _args("bad", 1, nfe=4, start_check=0),
        "EPDRDPO": training | rdpo,
        "EPDAnalyticModel": dict(form="sd3_flow", mixture="reference", shift=0.0),
        "EPDMnistDecode": dict(samples={"samples": torch.zeros(1, 4, 14, 14)}, scale=4),
    }[node] | {name: value}
    with network_calls(model) as calls:
        with pytest.raises(ValueError, match=f"^{name} must be (in|one of) .*, got '?{value}'?$"):
            N[node].execute(**given)
    assert calls == []
    assert list(epd_dir.iterdir()) == []
