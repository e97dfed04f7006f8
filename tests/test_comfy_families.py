"""Every model kind of the ComfyUI under test is sampled knowingly or refused by name; honest errors for a grid that
is not the table's own and for a non-finite cfg."""

from __future__ import annotations

import math

import pytest
import torch

import epd_core
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.shared_data import official_path
from epd_dev.tiny_models import conditioning, tiny_model

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]

# What EPD does with each ComfyUI model type. A type that a newer ComfyUI adds fails the completeness test below
# until it is handled knowingly here and in nodes/sampling.py.
KINDS = {
    "EPS": "discrete",
    "V_PREDICTION": "discrete",
    "V_PREDICTION_EDM": "continuous",
    "EDM": "continuous",
    "V_PREDICTION_CONTINUOUS": "continuous",
    "STABLE_CASCADE": "refused",
    "FLOW": "static shift",
    "FLOW_AV": "static shift",
    "FLUX": "flux shift",
    "IMG_TO_IMG": "refused",
    "FLOW_COSMOS": "refused",
    "IMG_TO_IMG_FLOW": "refused",
    "IMG_TO_IMG_VELOCITY": "refused",
    "V_PREDICTION_DDPM": "refused",
}
REFUSED_AS = {
    "STABLE_CASCADE": "StableCascadeSampling",
    "IMG_TO_IMG": "IMG_TO_IMG",
    "FLOW_COSMOS": "FLOW_COSMOS",
    "IMG_TO_IMG_FLOW": "IMG_TO_IMG_FLOW",
    "IMG_TO_IMG_VELOCITY": "IMG_TO_IMG_VELOCITY",
    "V_PREDICTION_DDPM": "V_PREDICTION_DDPM",
}
TABLES = {
    "discrete": "sd15-best.pkl",
    "continuous": "00002-cifar10-4-5-epd-uni1.0-afs.pkl",
    "static shift": "sd3-512-best.pkl",
    "flux shift": "flux-best.pkl",
    "refused": "sd3-512-best.pkl",
}


def _model_types() -> list[str]:
    """The model types of the ComfyUI under test."""
    import comfy.model_base

    return [t.name for t in comfy.model_base.ModelType]


def _model_sampling(type_name: str, **settings):
    """ComfyUI's own ``model_sampling`` for a model type, as its checkpoints' configs build it."""
    import comfy.model_base

    config = H.pack_module("nodes.analytic_model").AnalyticConfig(settings)
    return comfy.model_base.model_sampling(config, comfy.model_base.ModelType[type_name])


def test_every_model_type_of_this_comfyui_is_handled_knowingly():
    types = set(_model_types())
    assert types <= set(KINDS), f"new ComfyUI model types to handle: {types - set(KINDS)}"


def test_each_model_type_gets_its_grid_or_a_refusal_by_name():
    for type_name in _model_types():
        _check_model_type(type_name)


def _check_model_type(type_name: str) -> None:
    scheduling = H.pack_module("nodes.scheduling")
    kind = KINDS[type_name]
    params = epd_core.load_params(official_path(TABLES[kind]))
    ms = _model_sampling(type_name, shift=5.0)
    if kind == "refused":
        with pytest.raises(ValueError, match=REFUSED_AS[type_name]) as err:
            scheduling.epd_sigmas(params, ms)
        assert "EPD supports" in str(err.value)
        return
    grid = scheduling.epd_sigmas(params, ms).double()
    assert grid.shape == (params.num_steps,) and bool(torch.all(grid[1:] < grid[:-1]))
    if kind == "discrete":  # the model's own alphas_cumprod (here ComfyUI's default SD schedule)
        alphas = 1.0 / (1.0 + ms.sigmas.double() ** 2)
        assert torch.allclose(grid, epd_core.make_schedule(params, alphas_cumprod=alphas), rtol=1e-6)
    elif kind == "continuous":
        assert torch.allclose(grid, epd_core.make_schedule(params), rtol=1e-6)
    elif kind == "static shift":  # the authors' (diffusers') grid for the model's shift, by ComfyUI's own sigma(t)
        t = torch.linspace(float(ms.sigma(torch.tensor(1000.0))), float(ms.sigma(torch.tensor(1.0))), params.num_steps)
        assert ms.shift == 5.0 and torch.allclose(grid, ms.sigma(t.double() * 1000).double(), rtol=1e-5)
    else:  # ModelSamplingFlux: its shift is the grid's mu
        base = torch.linspace(1.0, 1e-3, params.num_steps, dtype=torch.float64)
        assert ms.shift == 5.0 and torch.allclose(grid, ms.sigma(base).double(), rtol=1e-5)
    other = epd_core.load_params(official_path(TABLES["discrete" if kind != "discrete" else "static shift"]))
    with pytest.raises(ValueError):
        scheduling.epd_sigmas(other, ms)


def test_an_lcm_schedule_is_refused_by_name():
    """ModelSamplingDiscrete 'lcm' (LCM LoRAs) keeps 50 timesteps and overrides ``timestep``: it passed as a
    continuous model, refused SD1.5 tables as 'continuous-time' and took an EDM table from sigma 80 (its maximum is
    14.6)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    scheduling = H.pack_module("nodes.scheduling")
    (lcm,) = ModelSamplingDiscrete().patch(tiny_model("eps"), "lcm", False)
    ms = lcm.get_model_object("model_sampling")
    for table in ("sd15-best.pkl", TABLES["continuous"]):
        with pytest.raises(ValueError, match="LCM-distilled schedule .*EPD supports"):
            scheduling.epd_sigmas(epd_core.load_params(official_path(table)), ms)


def test_noise_scale_other_than_one_is_refused_where_comfyui_applies_it():
    """HiDream-O1's flow scales its noise by 8 (newer ComfyUI); EPD's tables are for unit noise."""
    scheduling = H.pack_module("nodes.scheduling")
    ms = _model_sampling("FLOW", shift=3.0, noise_scale=8.0)
    params = epd_core.load_params(official_path("sd3-512-best.pkl"))
    if getattr(ms, "noise_scale", 1.0) == 1.0:  # this ComfyUI has no noise_scale: the model samples as usual
        assert scheduling.epd_sigmas(params, ms).shape == (params.num_steps,)
    else:
        with pytest.raises(ValueError, match="noise_scale 8"):
            scheduling.epd_sigmas(params, ms)


def test_flux2_grid_takes_the_mu_of_its_resolution_like_flux2scheduler():
    """Flux 2: ComfyUI's Flux2Scheduler picks mu from the latent's size and the step count; EPD Scheduler given the
    latent does the same (EPD KSampler passes it), the sampler accepts that grid, and without a latent the grid
    keeps the model's own mu."""
    from comfy_extras.nodes_flux import compute_empirical_mu

    model = tiny_model("flux2")
    params = epd_core.load_params(official_path("flux-best.pkl"))
    steps = params.num_steps - 1
    for side in (64, 128):  # 1024 and 2048 pixels: 4,096 and 16,384 tokens
        latent = {"samples": torch.zeros(1, 128, side, side)}
        (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False, latent).result
        mu = compute_empirical_mu(side * side, steps)
        assert torch.allclose(sigmas.double(), epd_core.make_schedule(params, mu=mu).float().double())
        scheduling = H.pack_module("nodes.scheduling")
        scheduling.check_grid(params, model.get_model_object("model_sampling"), sigmas, mu)
    (default,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    shift = float(model.get_model_object("model_sampling").shift)
    assert torch.allclose(default.double(), epd_core.make_schedule(params, mu=shift).float().double())
    assert not torch.allclose(default, sigmas)
    scheduling.check_grid(params, model.get_model_object("model_sampling"), default, mu)  # the sampler takes it too
    with pytest.raises(ValueError, match="not this EPD table's grid"):
        scheduling.check_grid(params, model.get_model_object("model_sampling"), default * 0.99, mu)


def test_flux2_under_modelsamplingflux_takes_that_nodes_mu():
    """A ModelSamplingFlux node upstream sets Flux 2's mu for ComfyUI's schedulers; EPD Scheduler given the latent,
    EPD KSampler and EPD Distill kept the resolution's mu and sampled as if the node were not there."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = tiny_model("flux2")
    (patched,) = ModelSamplingFlux().patch(model, 4.0, 3.0, 1024, 1024)
    params = epd_core.load_params(official_path("flux-best.pkl"))
    latent = {"samples": torch.zeros(1, 128, 8, 8)}
    (own,) = N["EPDScheduler"].execute(patched, params, 1.0, False, latent).result
    (plain,) = N["EPDScheduler"].execute(model, params, 1.0, False, latent).result
    shift = float(patched.get_model_object("model_sampling").shift)
    assert torch.allclose(own.double(), epd_core.make_schedule(params, mu=shift).float().double())
    assert not torch.allclose(own, plain, rtol=1e-3)
    seen = {}

    def fit(session):
        seen["grid"] = session.grid.clone()
        return params

    training = H.pack_module("nodes.training")
    config = H.pack_module("epd_core.config").DistillConfig(iterations=1)
    training._train_on_model(patched, conditioning(1), conditioning(1), 1.0, latent["samples"], params, config, fit)
    assert torch.allclose(seen["grid"].double(), own.double(), rtol=1e-6)


def test_flux2_takes_an_empty_latent_image_as_ksampler_does():
    """ComfyUI (0.33: at Flux 2's own downscale ratio) turns a 4-channel Empty Latent Image into the model's latent
    before sampling; EPD Scheduler took Flux 2's mu from the unconverted latent (4x the tokens), so EPD KSampler
    refused its own grid. It now equals EPD KSampler on the latent ComfyUI converts it to."""
    import nodes as comfy_nodes

    sampling = H.pack_module("nodes.sampling")
    model = tiny_model("flux2")
    params = epd_core.load_params(official_path("flux-best.pkl"))
    (empty,) = comfy_nodes.EmptyLatentImage().generate(256, 256, 1)
    converted = {"samples": sampling.model_latent(model, empty)}
    assert converted["samples"].shape[1] == 128
    run = [1, 1.0, conditioning(1), conditioning(1)]
    (got,) = N["EPDKSampler"].execute(model, *run, empty, params, 1.0, "batched", True).result
    (want,) = N["EPDKSampler"].execute(model, *run, converted, params, 1.0, "batched", True).result
    assert torch.equal(got["samples"], want["samples"])


def test_model_sampling_flux_node_upstream_sets_the_grid_mu():
    """FLUX / Flux 2 / Qwen-Image: ComfyUI's ModelSamplingFlux node (the resolution's mu) decides EPD's grid."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = tiny_model("flux")
    params = epd_core.load_params(official_path("flux-best.pkl"))
    (patched,) = ModelSamplingFlux().patch(model, 1.15, 0.5, 512, 512)
    mu = float(patched.get_model_object("model_sampling").shift)
    (sigmas,) = N["EPDScheduler"].execute(patched, params, 1.0, False).result
    assert mu != 1.15
    assert torch.allclose(sigmas.double(), epd_core.make_schedule(params, mu=mu).float().double())
    (default,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    assert not torch.allclose(sigmas, default)


def _analytic(form: str = "sd15_eps"):
    return N["EPDAnalyticModel"].execute(form, "reference", 0.0).result


@pytest.mark.parametrize("steps", [2, 3, 4, 5, 6])
def test_a_builtin_scheduler_grid_on_epd_sampler_is_an_error_naming_epd_scheduler(steps):
    """A BasicScheduler grid of any length on a 4-point table used to run as if it were the table's own."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom

    model, cond = _analytic()
    params = epd_core.load_params(H.ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5.safetensors")
    assert params.num_steps == 4
    (sigmas,) = BasicScheduler.execute(model, "normal", steps, 1.0).result
    (sampler,) = N["EPDSampler"].execute(params, "auto", True, "comfyui").result
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="EPD Scheduler"):
        SamplerCustom.execute(model, True, 0, 1.0, cond, cond, sampler, sigmas, latent)


def test_the_tables_own_grid_and_its_denoise_cut_still_run():
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, cond = _analytic()
    params = epd_core.load_params(H.ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5.safetensors")
    (sampler,) = N["EPDSampler"].execute(params, "auto", True, "comfyui").result
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    for denoise, final in ((1.0, False), (1.0, True), (0.67, False), (0.67, True)):
        (sigmas,) = N["EPDScheduler"].execute(model, params, denoise, final).result
        out = SamplerCustom.execute(model, True, 0, 1.0, cond, cond, sampler, sigmas, latent).result[0]
        assert torch.isfinite(out["samples"]).all()
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    with pytest.raises(ValueError, match="EPD Scheduler"):  # the grid's first part is not a denoise cut
        SamplerCustom.execute(model, True, 0, 1.0, cond, cond, sampler, sigmas[:-1], latent)


def test_a_builtin_scheduler_grid_under_epd_plugin_is_an_error_naming_epd_scheduler():
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom

    model, cond = _analytic()
    table = "analytic-sd15-reference-nfe10-plugin-dpmpp_2m.safetensors"
    params = epd_core.load_params(H.ROOT / "weights" / "demo" / table)
    (sampler, _) = N["EPDPlugin"].execute(comfy.samplers.sampler_object("dpmpp_2m"), params, "auto").result
    (sigmas,) = BasicScheduler.execute(model, "karras", params.num_steps - 1, 1.0).result
    with pytest.raises(ValueError, match="EPD Scheduler"):
        SamplerCustom.execute(model, True, 0, 1.0, cond, cond, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)})


@pytest.mark.parametrize("cfg", [math.nan, math.inf])
def test_non_finite_cfg_is_refused(cfg):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    pos, neg = conditioning(1, 1), conditioning(1, 2)
    params = epd_core.load_params(official_path("sd15-best.pkl"))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        N["EPDKSampler"].execute(model, 0, cfg, pos, neg, latent, params, 1.0, "auto", False)
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    (sampler,) = N["EPDSampler"].execute(params, "auto", True, "comfyui").result
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        SamplerCustom.execute(model, True, 0, cfg, pos, neg, sampler, sigmas, latent)


@pytest.mark.parametrize(("guider", "scale"), [("dual", "cfg_conds"), ("dual", "cfg_cond2_negative"),
                                             ("perpneg", "neg_scale")])  # fmt: skip
def test_a_non_finite_scale_of_another_guider_is_refused(guider, scale):
    """DualCFGGuider keeps its scales in cfg1 / cfg2 and PerpNegGuider its negative's in neg_scale: a NaN or inf
    there gave an all-NaN latent without a word (only CFGGuider's cfg was checked)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import DualCFGGuider, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_perpneg import PerpNegGuider

    model = tiny_model("eps")
    pos, neg, mid = conditioning(1, 1), conditioning(1, 2), conditioning(1, 3)
    bad = {"cfg_conds": math.nan, "cfg_cond2_negative": math.inf, "neg_scale": math.nan}
    value = {name: bad[name] if name == scale else 2.0 for name in bad}
    if guider == "dual":
        args = (model, pos, mid, neg, value["cfg_conds"], value["cfg_cond2_negative"], "regular")
        (made,) = DualCFGGuider.execute(*args).result
    else:
        (made,) = PerpNegGuider.execute(model, pos, neg, mid, 3.0, value["neg_scale"]).result
    params = epd_core.load_params(official_path("sd15-best.pkl"))
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    samplers = [N["EPDSampler"].execute(params, "auto", True, "comfyui").result[0],
                N["EPDPlugin"].execute(comfy.samplers.sampler_object("euler"), params, "auto").result[0]]  # fmt: skip
    for sampler in samplers:
        with pytest.raises(ValueError, match=f"{scale} must be a finite number, got (nan|inf) \\(of the guider"):
            SamplerCustomAdvanced.execute(RandomNoise.execute(0).result[0], made, sampler, sigmas,
                                          {"samples": torch.zeros(1, 4, 8, 8)})  # fmt: skip


def test_a_pixel_space_edm_table_on_a_latent_model_is_an_error_that_says_what_it_was_made_for():
    """The authors' ICCV tables (sigma up to 80, for CIFAR-10/FFHQ/ImageNet 64) used to run on an SD1.5-type model
    without a word; on a continuous EDM model they still run."""
    params = epd_core.load_params(official_path("00001-cifar10-3-3-epd-uni1.0-afs.pkl"))
    assert params.backend == "edm"
    model, cond = _analytic("sd15_eps")
    with pytest.raises(ValueError, match=r"continuous-sigma \(EDM\) table .*add that node with the same") as err:
        N["EPDScheduler"].execute(model, params, 1.0, False)
    assert "00001-cifar10-3-3-epd-uni1.0-afs.pkl" in str(err.value)
    with pytest.raises(ValueError, match=r"continuous-sigma \(EDM\) table"):
        N["EPDKSampler"].execute(model, 0, 1.0, cond, cond, {"samples": torch.zeros(1, 4, 8, 8)}, params, 1.0,
                                 "auto", False)  # fmt: skip
    edm, _ = _analytic("edm_ve")
    (sigmas,) = N["EPDScheduler"].execute(edm, params, 1.0, False).result
    assert float(sigmas[0]) == pytest.approx(80.0, rel=1e-4)
    sd15 = epd_core.load_params(official_path("sd15-best.pkl"))  # the reverse: named, with what to do
    with pytest.raises(ValueError, match=r"made for .*sd15-best.pkl, a discrete-time model .* Use a table made for"):
        N["EPDScheduler"].execute(edm, sd15, 1.0, False)
    flow = epd_core.load_params(official_path("sd3-512-best.pkl"))  # it said "an EPS/V-prediction model"
    with pytest.raises(ValueError, match=r"rectified-flow .* but the model is a continuous-sigma \(EDM\) model"):
        N["EPDScheduler"].execute(edm, flow, 1.0, False)


def test_a_grid_mismatch_counts_time_points_on_both_sides():
    """BasicScheduler at the table's step count: its sigmas end in 0, the table's grid does not; the message counted
    the 0 on one side only and showed two equal numbers."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, _ = _analytic("sd15_eps")
    (sigmas,) = BasicScheduler.execute(model, "karras", params.num_steps - 1, 1.0).result
    scheduling = H.pack_module("nodes.scheduling")
    with pytest.raises(ValueError, match="got 10 time points \\+ a final 0 from 14.61 to 0.02917, but the table's "
                       "grid for this model has 11 time points"):  # fmt: skip
        scheduling.check_grid(params, model.get_model_object("model_sampling"), sigmas, None)


def test_a_grid_mismatch_says_where_the_grids_part():
    """Same count and ends with another spacing (karras at the table's points) said "got 11 ... from 14.61 to
    0.02917, but the table's grid has 11 ... from 14.61 to 0.02917"; the first part of a split EPD grid was told to
    use EPD Scheduler, which it did; so was the first part of a split denoise cut (a middle part of the grid), and that
    its table fixes the spacing of its steps."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, _ = _analytic("sd15_eps")
    scheduling, model_sampling = H.pack_module("nodes.scheduling"), model.get_model_object("model_sampling")
    karras = comfy.samplers.calculate_sigmas(model_sampling, "karras", params.num_steps)[:-1]
    with pytest.raises(ValueError, match=r"has 11 time points from 14.61 to 0.02917.*; time point 2 of the last 11 is "
                       r"9\.\d+ where the table's is \d+\.\d+ \(a table fixes the spacing"):  # fmt: skip
        scheduling.check_grid(params, model_sampling, karras, None)
    (grid,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    high, low = SplitSigmas.execute(grid, 4).result
    with pytest.raises(ValueError, match="These are the grid's first 5 time points: EPD runs only a grid's last steps"):
        scheduling.check_grid(params, model_sampling, high, None)
    scheduling.check_grid(params, model_sampling, low, None)
    (cut,) = N["EPDScheduler"].execute(model, params, 0.6, True).result  # the grid's last 6 steps
    high, low = SplitSigmas.execute(cut, 3).result  # time points 5 to 8 of 11
    with pytest.raises(ValueError, match="These are the grid's time points 5 to 8: EPD runs only a grid's last steps"):
        scheduling.check_grid(params, model_sampling, high, None)
    scheduling.check_grid(params, model_sampling, low, None)


def test_a_grid_mismatch_names_sigmas_that_do_not_decrease():
    """FlipSigmas (unsampling), a repeated sigma or a 0 in the middle of EPD Scheduler's grid were told only that
    the counts differ and to use EPD Scheduler, which the user had."""
    from comfy_extras.nodes_custom_sampler import FlipSigmas

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, _ = _analytic("sd15_eps")
    scheduling, model_sampling = H.pack_module("nodes.scheduling"), model.get_model_object("model_sampling")
    (grid,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    cases = {
        "These sigmas increase \\(FlipSigmas: unsampling": FlipSigmas.execute(grid).result[0],
        r"time point 3 \(8\.307\) is not below time point 2 \(8\.307\): sigmas must decrease": torch.cat(
            [grid[:2], grid[1:]]
        ),
        "time point 3 is 0: only the last sigma may be 0": torch.cat([grid[:2], grid.new_zeros(1), grid[2:]]),
    }
    for message, sigmas in cases.items():
        with pytest.raises(ValueError, match=message):
            scheduling.check_grid(params, model_sampling, sigmas, None)


def test_a_grid_above_the_models_sigmas_is_refused():
    """EPD Distill on a zero-terminal-SNR model stores a grid from sigma 4519; on the same network without zsnr
    (sigma_max 14.6) it sampled from 4519 without a word (RMSE 402 against the exact solution on MNIST)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model = tiny_model("eps")
    (zsnr,) = ModelSamplingDiscrete().patch(model, "eps", True)
    plain = epd_core.EPDParams.start(4, 1, student="carry", afs=False, schedule_type="discrete", backend="ldm")
    (grid,) = N["EPDScheduler"].execute(zsnr, plain, 1.0, False).result
    assert float(grid[0]) > 4000
    own = plain.replace(t_steps=grid.double())
    N["EPDScheduler"].execute(zsnr, own, 1.0, False)  # on its own model it samples
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    for node, args in (("EPDScheduler", (model, own, 1.0, False)),
                       ("EPDKSampler", (model, 0, 1.0, conditioning(1), conditioning(1), empty, own, 1.0, "auto", True,
                                        "denoise"))):  # fmt: skip
        with pytest.raises(ValueError, match=r"starts at sigma 45\d\d, above this model's largest sigma 14.61: .*"
                           "zero terminal SNR"):  # fmt: skip
            N[node].execute(*args)


def test_the_loader_info_says_which_model_a_table_was_made_for():
    tables = H.pack_module("nodes.nodes_tables")
    demo = epd_core.load_params(H.ROOT / "weights" / "demo" / "analytic-sd3-reference-nfe5.safetensors")
    info = tables.describe(demo)
    assert "made for analytic sd3" in info and "static shift" in info and "shift 3" in info
    last = f"{float(demo.t_steps[-1]):.4g}"  # a learned grid is kept whatever shift the model is given
    assert f"its own grid 1 to {last}, kept whatever shift the model has (fitted at shift 3)" in info
    assert "own sigma range" not in info  # it said "the model's own sigma range; its own grid ..."
    iccv = tables.describe(epd_core.load_params(official_path("00001-cifar10-3-3-epd-uni1.0-afs.pkl")))
    assert "ICCV tables' pixel-space" in iccv and "sigma 0.002 to 80" in iccv and "its own grid" not in iccv


def test_a_flux2_table_without_its_own_grid_records_the_mu_it_was_fitted_at(tmp_path, monkeypatch, few_held_out):
    """Fitted on the grid of the latent's resolution, it recorded (and the loader showed) the model's default mu."""
    import folder_paths
    from comfy_extras.nodes_flux import compute_empirical_mu

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(tmp_path)], {".safetensors"}))
    model = tiny_model("flux2")
    empty = {"samples": torch.zeros(1, 128, 16, 16)}
    params, info = N["EPDDistill"].execute(model, conditioning(1), conditioning(1), empty, 1.0, 4, 2, "heun", 1, 1, 2,
                                           0.01, 0, False, "f2", True, start_check=0, keep_best=0).result  # fmt: skip
    mu = compute_empirical_mu(16 * 16, params.num_steps - 1)
    assert params.t_steps is None and params.flowmatch_mu == pytest.approx(mu) and mu != pytest.approx(2.02)
    assert f"mu {params.flowmatch_mu:g}" in info


def test_flux2_training_runs_on_the_grid_epd_ksampler_samples_its_latent_on():
    """EPD Distill and RDPO fit along the grid of the latent's resolution (Flux 2's mu), as EPD KSampler and EPD
    Scheduler given the latent sample; they used the model's own mu, so a table without a stored grid was fitted to
    time points it never sampled at."""
    training = H.pack_module("nodes.training")
    config_module = H.pack_module("epd_core.config")
    model = tiny_model("flux2")
    params = epd_core.load_params(official_path("flux-best.pkl"))
    latent = {"samples": torch.zeros(1, 128, 64, 64)}
    (expected,) = N["EPDScheduler"].execute(model, params, 1.0, False, latent).result
    seen = {}

    def fit(session):
        seen["grid"] = session.grid.clone()
        return params

    training._train_on_model(model, conditioning(1), conditioning(1), 1.0, latent["samples"], params,
                             config_module.DistillConfig(iterations=1), fit)  # fmt: skip
    assert torch.allclose(seen["grid"].double(), expected.double(), rtol=1e-6)


def test_flux2_s_mu_counts_a_wide_latent_s_pixels():
    """Flux 2's mu follows the latent's pixel count, height x width; every latent of the tests was square, where
    width x width passed."""
    from comfy_extras.nodes_flux import compute_empirical_mu

    families = H.pack_module("nodes.families")
    flux2 = type("Flux2", (), {})()  # resolution_mu knows Flux 2 by its class name
    assert families.resolution_mu(flux2, (1, 128, 32, 48), 8) == float(compute_empirical_mu(32 * 48, 8))
    assert families.resolution_mu(flux2, (1, 128, 48, 32), 8) == families.resolution_mu(flux2, (1, 128, 32, 48), 8)
