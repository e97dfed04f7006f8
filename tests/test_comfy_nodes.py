"""The nodes inside a real ComfyUI 0.3.75, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import epd_core
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.shared_data import REFERENCE, official_path, reference_meta
from epd_dev.tiny_models import KINDS, conditioning, latent, network_calls, table_for, tiny_model

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]

FORMS = {"sd15-best": "sd15_eps", "sd15-distilled": "sd15_eps", "sd3-512-best": "sd3_flow", "flux-best": "flux_flow"}


def _nodes_out(node, *args):
    return node.execute(*args).result


def _table(name: str):
    return epd_core.load_params(official_path(name))


@pytest.mark.parametrize("name", sorted(FORMS))
def test_analytic_model_reproduces_reference_through_comfyui(name):
    """ComfyUI's wiring adds no error: from the same x, the latent equals the authors' trajectory end."""
    import comfy.sample

    path = REFERENCE / f"{name}.safetensors"
    ref, meta = load_file(str(path)), reference_meta(path)
    model, cond = _nodes_out(N["EPDAnalyticModel"], FORMS[name], "reference", 0.0)
    params = _table(meta["predictor_file"])
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
    assert sigmas.dtype == torch.float32 and torch.allclose(sigmas.double(), ref["t_steps"], rtol=1e-6)
    (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, "authors")
    steps = []
    out = comfy.sample.sample_custom(
        model,
        ref["latents"].float(),
        1.0,
        sampler,
        sigmas,
        cond,
        cond,
        torch.zeros(3, 4, 8, 8),
        callback=lambda i, den, x, total: steps.append(i),
    )
    rel = ((out.double() - ref["final"]).abs().max() / ref["final"].abs().max()).item()
    assert rel < 1e-5, rel
    assert steps == list(range(params.num_steps - 1))


@pytest.mark.parametrize("shift", [float("nan"), float("inf")])
def test_analytic_model_refuses_a_shift_that_is_not_finite(shift):
    """A NaN passes ComfyUI's range check and read as 0 (the form's default shift); infinity made a model of shift
    inf."""
    with pytest.raises(ValueError, match=f"shift must be a finite number, got {shift}"):
        N["EPDAnalyticModel"].execute("sd3_flow", "reference", shift)


@pytest.mark.parametrize("form,table", [("sd15_eps", "sd15-best.pkl"), ("sd3_flow", "sd3-512-best.pkl")])
def test_comfyui_convention_differs_by_documented_scaling(form, table):
    """Default ComfyUI convention: EPS starts at noise*sqrt(1+s0^2); flow divides the end by (1 - s_last)."""
    import comfy.sample

    model, cond = _nodes_out(N["EPDAnalyticModel"], form, "reference", 0.0)
    params = _table(table)
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros(2, 4, 8, 8)
    outs = {}
    for conv in ("comfyui", "authors"):
        (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, conv)
        outs[conv] = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent)
    gm = epd_core.GaussianMixture.reference()
    s0, s_last = float(sigmas[0]), float(sigmas[-1])
    if form == "sd15_eps":
        core = epd_core.sample(gm.denoise_ve, noise.double() * (1 + s0**2) ** 0.5, sigmas, params)
        assert torch.allclose(outs["comfyui"].double(), core, rtol=1e-4, atol=1e-4)
    else:
        assert torch.allclose(outs["comfyui"], outs["authors"] / (1 - s_last), rtol=1e-5, atol=1e-6)


def test_epd_ksampler_equals_sampler_custom_bit_for_bit():
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    pos, neg = conditioning(2, 1), conditioning(2, 2)
    params = _table("sd15-best.pkl")
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    (a,) = _nodes_out(N["EPDKSampler"], model, 7, 3.0, pos, neg, latent, params, 1.0, "auto", False)
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
    (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui")
    b = SamplerCustom.execute(model, True, 7, 3.0, pos, neg, sampler, sigmas, latent).result[0]
    assert torch.equal(a["samples"], b["samples"])
    assert torch.isfinite(a["samples"]).all()


def test_final_step_estimate_costs_no_call():
    """final_step="estimate" reaches sigma 0 without the extra call (the core's semantics are tested there);
    the EPD KSampler equals SamplerCustom with EPD Scheduler + EPD Sampler."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    m = tiny_model("eps")
    params = _table("sd15-best.pkl")
    pos, latent = conditioning(2, 1), {"samples": torch.zeros(2, 4, 8, 8)}
    outs = {}
    for final_denoise, final_step in ((False, "denoise"), (True, "estimate"), (True, "denoise")):
        with network_calls(m) as calls:
            (out,) = _nodes_out(N["EPDKSampler"], m, 7, 1.0, pos, pos, latent, params, 1.0, "auto", final_denoise,
                                final_step)  # fmt: skip
        outs[final_denoise, final_step] = (out["samples"], len(calls))
    assert outs[True, "estimate"][1] == outs[False, "denoise"][1] == params.nfe
    assert outs[True, "denoise"][1] == params.nfe + 1
    estimate = outs[True, "estimate"][0]
    assert torch.isfinite(estimate).all()
    assert not torch.allclose(estimate, outs[False, "denoise"][0])
    assert not torch.equal(estimate, outs[True, "denoise"][0])
    (sigmas,) = _nodes_out(N["EPDScheduler"], m, params, 1.0, True)
    (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui", "estimate")
    custom = SamplerCustom.execute(m, True, 7, 1.0, pos, pos, sampler, sigmas, latent).result[0]
    assert torch.equal(custom["samples"], estimate)


def test_a_bfloat16_latent_is_integrated_in_float32_as_by_comfyuis_euler():
    """ComfyUI 0.3.75 samples a bfloat16 LATENT as it is (0.33 casts it to float32) and its model answers in the
    latent's dtype, so EPD Sampler's whole trajectory stayed in bfloat16, where Euler goes on in float32 after its
    first call: its distance to the float32 run was 3.8x Euler's."""
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom

    params = _table("sd15-best.pkl")
    model, cond = _nodes_out(N["EPDAnalyticModel"], "sd15_eps", "reference", 0.0)
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
    samplers = {"epd": _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui", "estimate")[0],
                "euler": KSamplerSelect.execute("euler").result[0]}  # fmt: skip
    errors = {}
    for name, sampler in samplers.items():
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            lat = {"samples": torch.zeros(4, 4, 8, 8, dtype=dtype)}
            out[dtype] = SamplerCustom.execute(model, True, 7, 1.0, cond, cond, sampler, sigmas, lat).result[0]
        assert out[torch.bfloat16]["samples"].dtype == torch.float32
        errors[name] = float((out[torch.bfloat16]["samples"] - out[torch.float32]["samples"]).square().mean().sqrt())
    assert errors["epd"] < 1.5 * errors["euler"], errors


def test_epd_sampler_draws_the_console_progress_bar_as_comfyuis_samplers(capfd):
    """ComfyUI's samplers draw a console progress bar of len(sigmas) - 1 steps unless ``disable`` (ComfyUI's
    disable_pbar); EPD Sampler (and so EPD KSampler) took ``disable`` and drew none: the terminal showed no progress."""
    import comfy.sample
    import comfy.samplers

    params = _table("sd15-best.pkl")
    model, cond = _nodes_out(N["EPDAnalyticModel"], "sd15_eps", "reference", 0.0)
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
    steps, zeros = len(sigmas) - 1, torch.zeros(1, 4, 8, 8)
    samplers = {"euler": comfy.samplers.sampler_object("euler"),
                "epd": _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui")[0]}  # fmt: skip
    for name, sampler in samplers.items():
        for disable in (False, True):
            capfd.readouterr()
            comfy.sample.sample_custom(model, zeros, 1.0, sampler, sigmas, cond, cond, zeros, disable_pbar=disable)
            shown = f"{steps}/{steps}" in capfd.readouterr().err
            assert shown is not disable, (name, disable)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_batched_equals_sequential_with_different_prompts(kind, cfg):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model(kind)
    params = _table(table_for(kind))
    batch = 3
    pos, neg = conditioning(batch, 11), conditioning(batch, 12)
    lat = latent(kind, batch)
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
    results = {}
    for mode in ("batched", "sequential", "auto"):
        (sampler,) = _nodes_out(N["EPDSampler"], params, mode, True, "comfyui")
        results[mode] = SamplerCustom.execute(model, True, 5, cfg, pos, neg, sampler, sigmas, lat).result[0]["samples"]
    a, b = results["batched"], results["sequential"]
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    assert torch.equal(results["auto"], a)
    # each image follows its own prompt: reversing the prompts reverses the images
    (sampler,) = _nodes_out(N["EPDSampler"], params, "batched", True, "comfyui")
    pos_rev = [[pos[0][0].flip(0), {"pooled_output": pos[0][1]["pooled_output"].flip(0)}]]
    neg_rev = [[neg[0][0].flip(0), {"pooled_output": neg[0][1]["pooled_output"].flip(0)}]]
    c = SamplerCustom.execute(model, True, 5, cfg, pos_rev, neg_rev, sampler, sigmas, lat).result[0]["samples"]
    one = SamplerCustom.execute(
        model,
        True,
        5,
        cfg,
        [[pos[0][0][:1], {"pooled_output": pos[0][1]["pooled_output"][:1]}]],
        [[neg[0][0][:1], {"pooled_output": neg[0][1]["pooled_output"][:1]}]],
        sampler,
        sigmas,
        latent(kind, 1),
    ).result[0]["samples"]
    assert not torch.allclose(c[0], a[0], atol=1e-3)
    assert torch.allclose(one[0], a[0], rtol=1e-4, atol=1e-4), "batch of B differs from a single run"


@pytest.mark.parametrize("patch", ["differential diffusion", "deep shrink"])
def test_auto_goes_point_by_point_under_model_patches_that_read_one_sigma(patch):
    """DifferentialDiffusion's mask function and Deep Shrink's block patch read the first sigma of a call: in one
    call of the K time points every point got point 0's treatment. ``auto`` now runs the points one by one and
    equals ``sequential`` (the per-point semantics), which ``batched`` does not."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    base, params = tiny_model("eps"), _table("sd15-best.pkl")
    g = torch.Generator().manual_seed(4)
    if patch == "differential diffusion":
        (model,) = DifferentialDiffusion.execute(base).result
        soft = torch.linspace(0, 1, 8).reshape(1, 1, 1, 8).expand(2, 1, 8, 8).clone()
        lat = {"samples": torch.randn(2, 4, 8, 8, generator=g), "noise_mask": soft}
    else:
        (model,) = PatchModelAddDownscale.execute(base, 1, 2.0, 0.0, 0.25, True, "bicubic", "bicubic").result
        lat = {"samples": torch.zeros(2, 4, 16, 16)}
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
    out = {}
    for mode in ("auto", "batched", "sequential"):
        (sampler,) = _nodes_out(N["EPDSampler"], params, mode, True, "comfyui", "denoise")
        out[mode] = SamplerCustom.execute(model, True, 3, 3.0, conditioning(2, 5), conditioning(2, 6), sampler, sigmas,
                                          lat).result[0]["samples"]  # fmt: skip
    assert torch.equal(out["auto"], out["sequential"])
    assert (out["batched"] - out["sequential"]).abs().max() > 1e-3  # the patch does read one sigma per call


@pytest.mark.parametrize("cache", ["EasyCacheNode", "LazyCacheNode"])
def test_auto_goes_point_by_point_under_caches_that_wrap_each_model_call(cache):
    """EasyCache and LazyCache wrap each model call, decide on its first sigma and keep state sized to its batch:
    with ``auto`` batching the K points, EPD KSampler failed with a bare tensor-size error at the defaults."""
    import comfy_extras.nodes_easycache as easycache

    base = tiny_model("flux")
    (model,) = getattr(easycache, cache).execute(base, 0.2, 0.15, 0.95, False).result
    params = _table("flux-best.pkl")
    out = {}
    for mode in ("auto", "sequential"):
        args = (7, 3.0, conditioning(2, 1), conditioning(2, 2), latent("flux", 2), params, 1.0, mode, True)
        out[mode] = N["EPDKSampler"].execute(model, *args, "estimate").result[0]["samples"]
    assert torch.isfinite(out["auto"]).all() and torch.equal(out["auto"], out["sequential"])


def _wan_with_context_windows():
    """A tiny random Wan 2.1 behind ComfyUI's context windows (3 latent frames at a time along dim 2)."""
    import inspect

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    from epd_dev.tiny_models import _init

    config = dict(image_model="wan2.1", model_type="t2v", dim=32, ffn_dim=64, freq_dim=16, text_dim=32, num_heads=2,
                  num_layers=1, in_dim=16, out_dim=16, text_len=8)  # fmt: skip
    wan = comfy.supported_models.WAN21_T2V(config).get_model({})
    _init(wan.diffusion_model, 0)
    device = comfy.model_management.get_torch_device()
    wan = comfy.model_patcher.ModelPatcher(wan, load_device=device, offload_device=torch.device("cpu"))
    args = [wan, 3, 1, "standard_static", 1, False, "pyramid", 2]
    if "freenoise" in inspect.signature(ContextWindowsManualNode.execute).parameters:
        args.append(False)
    return ContextWindowsManualNode.execute(*args).result[0]


def test_context_windows_run_point_by_point_or_say_why_they_cannot():
    """ComfyUI 0.33's context windows read the first sigma of a call (``auto`` batching the K points failed with an
    IndexError); ComfyUI 0.3.75's refuse every sigma between the grid's (a bare 'No sample_sigmas matched current
    timestep; something went wrong'), which EPD's points are: a node error that says what to do."""
    import comfyui_version

    model = _wan_with_context_windows()
    params = _table("sd3-512-best.pkl")
    cond = [[torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0)), {}]]
    video = {"samples": torch.zeros(1, 16, 5, 4, 4)}
    out = {}
    for mode in ("auto", "sequential"):
        run = N["EPDKSampler"].execute
        if comfyui_version.__version__ == "0.3.75":
            with pytest.raises(ValueError, match="context windows of this ComfyUI accept only the grid's own sigmas"):
                run(model, 1, 3.0, cond, cond, video, params, 1.0, mode, True, "estimate")
            continue
        out[mode] = run(model, 1, 3.0, cond, cond, video, params, 1.0, mode, True, "estimate").result[0]["samples"]
        assert torch.isfinite(out[mode]).all()
    assert not out or torch.equal(out["auto"], out["sequential"])


def test_batched_call_is_one_model_call_point_major():
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    params = _table("sd15-best.pkl")
    calls = []

    def wrapper(apply_model, args):
        calls.append((args["input"].shape[0], args["timestep"].clone(), list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    batch = 2
    (sigmas,) = _nodes_out(N["EPDScheduler"], m, params, 1.0, False)
    (sampler,) = _nodes_out(N["EPDSampler"], params, "batched", True, "comfyui")
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    SamplerCustom.execute(m, True, 1, 2.0, conditioning(batch), conditioning(batch, 3), sampler, sigmas, latent)
    per_step = params.num_points * batch * 2  # K points x B images x (cond, uncond)
    big = [c for c in calls if c[0] == per_step]
    assert len(big) == params.num_steps - 1
    table = params.decoded()
    for i, (_, ts, _) in enumerate(big):
        tau = sigmas[i + 1] ** table.r[i] * sigmas[i] ** (1 - table.r[i])
        expected = tau.repeat_interleave(batch).repeat(2).float()
        assert torch.allclose(ts, expected, rtol=1e-6)


def test_a_half_precision_sigmas_continuous_timestep_is_not_rounded_to_its_dtype():
    """ComfyUI 0.3.75 passes the sigma in a bfloat16 latent's dtype (EPD Plugin's base sampler does at every step),
    and the continuous timestep came back in that dtype: 999 became 1000, past the model's last timestep, and 899.2
    became 900 (ComfyUI's own timestep is an exact integer index)."""
    model_sampling = tiny_model("eps").get_model_object("model_sampling")
    continuous = H.pack_module("nodes.sampling").continuous_model_sampling(model_sampling)
    sigma = torch.tensor([14.6146, 8.3072]).bfloat16()
    assert torch.equal(continuous.timestep(sigma), continuous.timestep(sigma.float()))
    assert float(continuous.timestep(sigma).max()) <= 999


def test_continuous_timestep_reaches_the_model():
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    params = _table("sd15-best.pkl")
    seen = {True: [], False: []}
    for flag in (True, False):
        m = model.clone()

        def wrapper(apply_model, args, flag=flag, m=m):
            base = m.model
            seen[flag].append(base.model_sampling.timestep(args["timestep"]).clone())
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        (sigmas,) = _nodes_out(N["EPDScheduler"], m, params, 1.0, False)
        (sampler,) = _nodes_out(N["EPDSampler"], params, "batched", flag, "comfyui")
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        SamplerCustom.execute(m, True, 1, 1.0, conditioning(1), conditioning(1), sampler, sigmas, latent)
    cont = torch.cat(seen[True])
    assert (cont - cont.round()).abs().max() > 0.01, "model saw only integer timesteps"
    assert torch.equal(torch.cat(seen[False]), torch.cat(seen[False]).round())
    assert type(model.model.model_sampling).__name__ == type(model.get_model_object("model_sampling")).__name__


def test_continuous_timestep_reaches_a_controlnet_and_a_second_model():
    """A ControlNet keeps the model sampling it captured before the run, and 0.33's DualModelGuider runs the negative
    pass on a model of its own: both saw ComfyUI's rounded timestep, up to half a step from the UNet's continuous one.
    They see the UNet's (ControlNet on both trees, the second model where ComfyUI has the guider), and the rounded one
    without continuous_time."""
    from comfy_extras import nodes_custom_sampler as custom

    import nodes as comfy_nodes
    from epd_dev.tiny_models import tiny_controlnet

    model, negative = tiny_model("eps"), tiny_model("eps", seed=1)
    params = _table("sd15-best.pkl")
    control = tiny_controlnet()
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(conditioning(1), conditioning(1, 2), control,
                                                                      hint, 0.5, 0.0, 1.0)  # fmt: skip
    seen = {"unet": [], "other": []}

    def record(key: str, net: torch.nn.Module, name: str | None = None):
        return net.register_forward_pre_hook(
            lambda _, a, k: seen[key].append((k[name] if name else a[1]).clone()), with_kwargs=True
        )

    def check(run, other: torch.nn.Module, name: str | None = None) -> None:
        hooks = [record("unet", model.model.diffusion_model), record("other", other, name)]
        try:
            for flag in (True, False):
                (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
                (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", flag, "comfyui")
                run(sampler, sigmas)
                unet, other_t = torch.cat(seen["unet"]), torch.cat(seen["other"]).to(torch.float32)
                assert other_t.numel() > params.num_steps and set(other_t.tolist()) == set(unet.tolist())
                assert ((unet - unet.round()).abs().max() > 0.01) == flag
                seen["unet"].clear(), seen["other"].clear()
        finally:
            for hook in hooks:
                hook.remove()

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    check(lambda sampler, sigmas: custom.SamplerCustom.execute(model, True, 1, 2.0, pos, neg, sampler, sigmas, latent),
          control.control_model, "timesteps")  # fmt: skip
    assert control.model_sampling_current is None
    if hasattr(custom, "Guider_DualModel"):  # ComfyUI 0.33
        guider = custom.Guider_DualModel(model, negative)
        guider.set_conds(conditioning(1), conditioning(1, 2))
        guider.set_cfg(2.0)
        noise = custom.Noise_RandomNoise(1)
        check(lambda sampler, sigmas: custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent),
              negative.model.diffusion_model)  # fmt: skip
    assert type(negative.model.model_sampling).__name__ == type(model.model.model_sampling).__name__


def test_batched_gives_each_sample_its_controlnet_hint_at_every_point():
    """A ControlNet of 2 hint images over a latent batch of 3 (ComfyUI gives latent j hint j mod 2): ComfyUI tiles
    the hint over a call's rows by index and keeps it tiled to the first call. A table with the analytic first step
    makes the K points' call (K*B rows) the first, so 'batched' gave point 1's rows other samples' hints; the hint is
    now repeated to the latent batch first, as prompts are, and batched equals sequential."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    from epd_dev.tiny_models import two_hints

    model, ref = tiny_model("eps"), _table("sd15-best.pkl")
    hyper = {k: v for k, v in ref.hyper().items() if k not in ("num_steps", "num_points", "afs")}
    params = epd_core.EPDParams.start(ref.num_steps, 2, afs=True, **hyper)  # the K points' call comes first
    pos, neg, seen = two_hints(conditioning(1, 1), conditioning(1, 2))
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
    outs = {}
    for mode in ("batched", "sequential"):
        (sampler,) = _nodes_out(N["EPDSampler"], params, mode, True, "comfyui")
        outs[mode] = SamplerCustom.execute(model, True, 2, 2.0, pos, neg, sampler, sigmas, latent("eps", 3)).result[0]
    assert len(seen) > 10 and all(torch.equal(row, torch.arange(len(row)) % 3 % 2 == 1) for row in seen)
    assert torch.allclose(outs["batched"]["samples"], outs["sequential"]["samples"], atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_inpainting_batched_equals_sequential(batch):
    """Each sample its own mask (the right half, the top half, all): a batched call of K x B rows must give row
    ``k * B + j`` sample j's mask (a mask tiled point by point instead passed while every sample had the same one)."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    params = _table("sd15-best.pkl")
    g = torch.Generator().manual_seed(4)
    latent = {"samples": torch.randn(batch, 4, 8, 8, generator=g), "noise_mask": torch.zeros(batch, 1, 8, 8)}
    latent["noise_mask"][0, :, :, 4:] = 1.0
    if batch > 1:
        latent["noise_mask"][1, :, :4, :] = 1.0
        latent["noise_mask"][2:] = 1.0
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)  # final denoise: kept area exact
    outs = {}
    for mode in ("batched", "sequential"):
        (sampler,) = _nodes_out(N["EPDSampler"], params, mode, True, "comfyui")
        pos, neg = conditioning(batch, 5), conditioning(batch, 6)
        outs[mode] = SamplerCustom.execute(model, True, 2, 3.0, pos, neg, sampler, sigmas, latent).result[0]["samples"]
    assert torch.allclose(outs["batched"], outs["sequential"], rtol=1e-4, atol=1e-4)
    kept = (latent["noise_mask"] == 0).expand_as(latent["samples"])
    assert torch.allclose(outs["batched"][kept], latent["samples"][kept], atol=1e-5)


def test_batched_equals_sequential_with_three_points_and_after_out_of_memory():
    """Every other batched test in ComfyUI uses tables of K = 2 points, where a wrong order of the points past the
    first in a batched call cannot show; here K = 3, batched, sequential, and batched falling back point by point
    after an out-of-memory error."""
    import comfy.model_management
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    batch, ref = 2, _table("sd15-best.pkl")
    params = epd_core.EPDParams.start(ref.num_steps, 3, **{k: v for k, v in ref.hyper().items()
                                                           if k not in ("num_steps", "num_points")})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    params = params.replace(**{n: torch.randn(getattr(params, n).shape, generator=g) for n in ("r_params", "weight_s")})
    lat = {"samples": torch.zeros(batch, 4, 8, 8)}
    pos, neg = conditioning(batch, 5), conditioning(batch, 6)

    def run(model, mode):
        (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
        (sampler,) = _nodes_out(N["EPDSampler"], params, mode, True, "comfyui")
        return SamplerCustom.execute(model, True, 2, 3.0, pos, neg, sampler, sigmas, lat).result[0]["samples"]

    sequential, batched = run(tiny_model("eps"), "sequential"), run(tiny_model("eps"), "batched")
    assert torch.allclose(batched, sequential, rtol=1e-4, atol=1e-4), (batched - sequential).abs().max()
    model = tiny_model("eps").clone()

    def wrapper(apply_model, args):  # a call of the K points together runs out of memory
        if args["input"].shape[0] > 2 * batch:
            raise comfy.model_management.OOM_EXCEPTION("injected out of memory")
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    fallback = run(model, "batched")
    assert torch.allclose(fallback, sequential, rtol=1e-4, atol=1e-4), (fallback - sequential).abs().max()


@pytest.mark.parametrize("final", ["denoise", "estimate"])
@pytest.mark.parametrize("name", ["sd15-best.pkl", "00016-lsun_bedroom_ldm-6-9-epd-uni1.0-afs.pkl"])
def test_inpainting_keeps_the_unmasked_area_with_either_final_step(name, final):
    """ComfyUI gives back the source latent where the noise mask keeps it: every sampler's last answer passes its
    inpainting wrapper. The ``estimate`` ending stands in for that answer and is blended the same way; with a table
    whose last step's sum of weight * scale_dir is not 1 (the authors' LSUN table: 0.959) it left noise there."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, params = tiny_model("eps"), _table(name)
    g = torch.Generator().manual_seed(4)
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=g), "noise_mask": torch.zeros(2, 1, 8, 8)}
    latent["noise_mask"][:, :, :, 4:] = 1.0
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
    (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui", final)
    out = SamplerCustom.execute(model, True, 2, 3.0, conditioning(2, 5), conditioning(2, 6), sampler, sigmas,
                                latent).result[0]["samples"]  # fmt: skip
    assert torch.allclose(out[..., :4], latent["samples"][..., :4], atol=1e-5)
    assert (out[..., 4:] - latent["samples"][..., 4:]).abs().max() > 0.1  # the masked area is sampled


@pytest.mark.parametrize("plugin", [False, True])
def test_inpainting_without_final_denoise_keeps_the_unmasked_area_as_comfyuis_samplers(plugin):
    """Sigmas ending above 0 (final_denoise off) return the sampler's state, whose kept area ComfyUI's samplers (exact
    for the constant answer their inpainting wrapper gives there) leave at the source noised to the last sigma. EPD's
    steps, whose sum of weight * scale_dir is not 1 (the authors' LSUN table: 0.959), left 0.4 of noise there."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, params = tiny_model("eps"), _table("00016-lsun_bedroom_ldm-6-9-epd-uni1.0-afs.pkl")
    g = torch.Generator().manual_seed(4)
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=g), "noise_mask": torch.zeros(2, 1, 8, 8)}
    latent["noise_mask"][:, :, :, 4:] = 1.0
    (sigmas,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
    if plugin:
        sampler = N["EPDPlugin"].execute(comfy.samplers.sampler_object("euler"), params, "auto").result[0]
    else:
        (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui")
    pos, neg = conditioning(2, 5), conditioning(2, 6)
    ends = (sampler, comfy.samplers.sampler_object("euler"))
    outs = [SamplerCustom.execute(model, True, 2, 3.0, pos, neg, s, sigmas, latent).result[0]["samples"] for s in ends]
    assert torch.allclose(outs[0][..., :4], outs[1][..., :4], atol=1e-5), (outs[0] - outs[1])[..., :4].abs().max()
    assert (outs[0][..., 4:] - outs[1][..., 4:]).abs().max() > 0.01  # the masked area is EPD's own


def test_flow_table_on_eps_model_is_a_clear_error():
    model = tiny_model("eps")
    with pytest.raises(ValueError, match="rectified-flow"):
        N["EPDScheduler"].execute(model, _table("sd3-512-best.pkl"), 1.0, False)
    flow = tiny_model("sd3")
    with pytest.raises(ValueError, match="variance-exploding"):
        N["EPDScheduler"].execute(flow, _table("sd15-best.pkl"), 1.0, False)


def test_steps_mismatch_is_a_clear_error():
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    params = _table("sd15-best.pkl")
    (sampler,) = _nodes_out(N["EPDSampler"], params, "auto", True, "comfyui")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 20)
    with pytest.raises(ValueError, match="time points"):
        SamplerCustom.execute(model, True, 1, 1.0, conditioning(1), conditioning(1), sampler, sigmas,
                              {"samples": torch.zeros(1, 4, 8, 8)})  # fmt: skip


def test_denoise_and_final_denoise_grids():
    model, _ = _nodes_out(N["EPDAnalyticModel"], "sd15_eps", "reference", 0.0)
    params = _table("sd15-best.pkl")
    (full,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, False)
    (half,) = _nodes_out(N["EPDScheduler"], model, params, 0.5, False)
    (zero,) = _nodes_out(N["EPDScheduler"], model, params, 0.0, False)
    (fin,) = _nodes_out(N["EPDScheduler"], model, params, 1.0, True)
    assert torch.equal(half, full[-6:])
    assert zero.numel() == 0
    assert torch.equal(fin[:-1], full) and fin[-1] == 0
    # a small denoise keeps the last step (it returned the input untouched, where KSampler samples)
    (small,) = _nodes_out(N["EPDScheduler"], model, params, 0.01, False)
    assert torch.equal(small, full[-2:])
    # halves round up, one rule for every value (round() took 0.5 of 5 steps to 2 and 0.3 of 5 to 2 as well)
    five = epd_core.load_params(H.ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5-carry.safetensors")
    counts = [_nodes_out(N["EPDScheduler"], model, five, d, False)[0].shape[0] - 1 for d in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert counts == [1, 2, 3, 4, 5]


def test_loader_lists_models_epd_and_names_bad_files(tmp_path, monkeypatch):
    import folder_paths

    good = tmp_path / "good.safetensors"
    epd_core.save_params(_table("sd15-best.pkl"), good)
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04garbage")
    paths, extensions = folder_paths.folder_names_and_paths["epd"]  # another models/epd folder, for this test only
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([*paths, str(tmp_path)], extensions))
    names = folder_paths.get_filename_list("epd")
    assert "good.safetensors" in names and "bad.pkl" in names
    params, info = _nodes_out(N["EPDParamsLoader"], "good.safetensors")
    assert params.num_steps == 11 and "NFE 20" in info
    with pytest.raises(ValueError, match="bad.pkl"):
        N["EPDParamsLoader"].execute("bad.pkl")
    epd_core.save_params(_table("sd15-best.pkl"), tmp_path / "[download] mine.safetensors")  # a local file's name
    params, _ = _nodes_out(N["EPDParamsLoader"], "[download] mine.safetensors")  # was 'no such published table'
    assert params.num_steps == 11
    trained = epd_core.EPDParams.start(3, 2)
    trained = trained.replace(metadata={"tool": "EPD Distill node", "model": "a ComfyUI SD15 model"})
    epd_core.save_params(trained, tmp_path / "mine.safetensors")
    params, info = _nodes_out(N["EPDParamsLoader"], "mine.safetensors")  # a table trained from it said nothing of it
    assert params.carried_metadata()["trained_from"][0]["source_file"] == "mine.safetensors"
    assert "table from mine.safetensors" in info


@pytest.mark.parametrize("name", ["sd15-best.pkl", "flux-best.pkl", "00024-ffhq-6-9-ipndm-uni1.0-afs.pkl"])
def test_preview_draws_the_table(name):
    params = _table(name)
    (image,) = N["EPDParamsPreview"].execute(params).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] == 46 + 40 * (params.num_steps - 1)  # a row of three text lines per step
    assert 0.0 <= float(image.min()) < 0.5 < float(image.max()) <= 1.0


def test_the_loader_says_when_a_table_was_not_fitted_for_the_default_ending_and_the_examples_use_fitted_ones():
    """The samplers end on the table's own estimate at sigma 0 by default; a table fitted to end at sigma_min can be
    10x less accurate so (the SD1.5-form reference NFE-10 table, which example workflows 2 and 3 used). The bundled
    tables of the no-download examples are fitted for it (the authors' published ones, 6-8, are not)."""
    import json

    rdpo = H.pack_module("epd_core.rdpo")
    loader = N["EPDParamsLoader"]
    (_, unfitted) = loader.execute("demo/analytic-sd15-reference-nfe10.safetensors").result
    (_, fitted) = loader.execute("demo/analytic-sd15-reference-nfe10-carry.safetensors").result
    assert "not on its own estimate at 0" in unfitted and "final_denoise off" in unfitted
    assert "not on its own estimate" not in fitted
    for path in sorted((H.ROOT / "example_workflows" / "api").glob("*.json")):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "EPDParamsLoader" and not node["inputs"]["table_name"].startswith("[download]"):
                (params, _) = loader.execute(node["inputs"]["table_name"]).result
                assert rdpo.fitted_final_estimate(params), (path.name, node["inputs"]["table_name"])


def test_make_workflows_rewrites_the_committed_examples_and_keeps_other_files(tmp_path, monkeypatch):
    """The example workflows are what the script writes (nothing hand-edited drifts from it); a rerun removes
    examples renamed or dropped, never a user's own file, and writes every file whole."""
    import scripts.make_workflows as mw

    out, api = tmp_path / "example_workflows", tmp_path / "example_workflows" / "api"
    api.mkdir(parents=True)
    for name in ("my_own.json", "9 an old example.json", "api/epd_old.json", "api/mine.json"):
        (out / name).write_text("{}")
    monkeypatch.setattr(mw, "OUT", out)
    monkeypatch.setattr(mw, "API", api)
    assert mw.main([]) == 0
    committed = sorted(
        p.relative_to(mw.ROOT / "example_workflows") for p in (mw.ROOT / "example_workflows").rglob("*.json")
    )
    written = sorted(p.relative_to(out) for p in out.rglob("*.json"))
    assert written == sorted([*committed, Path("my_own.json"), Path("api/mine.json")])
    import comfyui_version

    # the UI files carry ComfyUI's own nodes' outputs, which 0.33 lists differently: they are made on 0.3.75
    made_here = comfyui_version.__version__ == "0.3.75"
    for rel in committed:
        if made_here or rel.parts[0] == "api":
            assert (out / rel).read_text() == (mw.ROOT / "example_workflows" / rel).read_text(), rel


def test_every_input_and_output_of_the_packs_nodes_has_a_tooltip():
    """Hovering any socket or widget of an EPD node says what it takes (EPD MNIST Decode's samples said nothing)."""
    missing = []
    for node_id, cls in N.items():
        if node_id == "pack" or not hasattr(cls, "define_schema"):
            continue
        schema = cls.define_schema()
        missing += [f"{node_id}.{i.id}" for i in schema.inputs if not getattr(i, "tooltip", None)]
        missing += [f"{node_id} output {o.display_name or o.io_type}" for o in schema.outputs
                    if not getattr(o, "tooltip", None)]  # fmt: skip
    assert not missing, missing


def test_a_mask_of_more_rows_than_the_latent_batch_uses_its_first_rows_as_comfyui_does():
    """ConditioningSetMask with a mask batch above the latent batch: ComfyUI uses the first B rows at every call; a
    batched call of K*B rows gave point k mask row k (another image), and a 3-row mask over 2 latents crashed."""
    import nodes as comfy_nodes

    def strong(batch, seed):
        ((t, extra),) = conditioning(batch, seed)
        return [[t * 40, {k: v * 40 for k, v in extra.items()}]]

    def masked(pos, other, mask):
        (m,) = comfy_nodes.ConditioningSetMask().append(other, mask, "default", 1.0)
        return comfy_nodes.ConditioningCombine().combine(pos, m)[0]

    model, params = tiny_model("eps"), _table("sd15-best.pkl")
    two = torch.zeros(2, 64, 64)
    two[0, :, :32], two[1, :, 32:] = 1, 1

    def run(pos, neg, batch, parallel):
        args = (model, 3, 4.0, pos, neg, latent("eps", batch), params, 1.0, parallel, True, "estimate")
        return N["EPDKSampler"].execute(*args).result[0]["samples"]

    for parallel in ("batched", "auto"):
        full = run(masked(strong(1, 1), strong(1, 5), two), strong(1, 2), 1, parallel)
        first = run(masked(strong(1, 1), strong(1, 5), two[:1]), strong(1, 2), 1, parallel)
        assert torch.equal(full, first), parallel
    three = torch.cat([two, torch.ones(1, 64, 64)])
    pos, neg = masked(strong(2, 1), strong(2, 5), three), strong(2, 2)
    torch.testing.assert_close(run(pos, neg, 2, "auto"), run(pos, neg, 2, "sequential"), rtol=1e-4, atol=1e-4)


def test_batched_under_a_patch_that_keeps_state_per_call_says_what_to_do():
    """APG with momentum keeps a running average sized to the previous call: 'batched' (which batches anyway) failed
    with a bare torch size error; it now names the patch and 'auto', which runs."""
    from comfy_extras.nodes_apg import APG

    apg = APG.execute(tiny_model("eps"), 1.0, 5.0, -0.5).result[0]
    args = (apg, 3, 4.0, conditioning(1, 1), conditioning(1, 2), latent("eps", 1), _table("sd15-best.pkl"), 1.0)
    with pytest.raises(
        RuntimeError, match=r"parallel 'batched' failed under sampler_pre_cfg_function.*Use parallel 'auto'"
    ):
        N["EPDKSampler"].execute(*args, "batched", True, "estimate")
    assert torch.isfinite(N["EPDKSampler"].execute(*args, "auto", True, "estimate").result[0]["samples"]).all()
    sampling, oom = H.pack_module("nodes.sampling"), torch.AcceleratorError("CUDA error: out of memory")

    def out_of_memory(*_):
        raise oom

    hook = apg.model.diffusion_model.register_forward_pre_hook(out_of_memory)
    try:  # an out-of-memory error stays one where this ComfyUI counts it (0.33: its tips, its unloading)
        with pytest.raises(RuntimeError) as raised:
            N["EPDKSampler"].execute(*args, "batched", True, "estimate")
    finally:
        hook.remove()
    assert sampling._is_oom(raised.value) == sampling._is_oom(oom)
