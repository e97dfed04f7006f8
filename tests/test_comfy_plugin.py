"""EPD Plugin node over ComfyUI's built-in samplers, in a real ComfyUI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import epd_core
from epd_core.config import DistillConfig
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.shared_data import REFERENCE, official_path, reference_meta
from epd_dev.tiny_models import KINDS, conditioning, latent, network_calls, table_for, tiny_model

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]
# the pack's nodes.plugin.PLUGIN_BASES (a parameter list is fixed before ComfyUI starts; checked equal below)
PLUGIN_BASES = ("euler", "ddim", "dpmpp_2m", "lms", "ipndm", "ipndm_v", "deis", "res_multistep",
                "gradient_estimation")  # fmt: skip


def _plugin(base: str, params, parallel="auto", final_step="denoise"):
    import comfy.samplers

    return N["EPDPlugin"].execute(comfy.samplers.sampler_object(base), params, parallel, final_step).result


def test_plugin_bases_parametrized_here_are_the_packs():
    assert H.pack_module("nodes.plugin").PLUGIN_BASES == PLUGIN_BASES


@pytest.mark.parametrize(
    "name,form",
    [
        ("sd15-best", "sd15_eps"),
        ("sd3-512-best", "sd3_flow"),
        ("flux-best", "flux_flow"),
        ("00018-cifar10-4-5-ipndm-uni1.0-afs", "edm_ve"),
        ("00024-ffhq-6-9-ipndm-uni1.0-afs", "edm_ve"),
        ("00001-cifar10-3-3-epd-uni1.0-afs", "edm_ve"),
    ],
)
def test_euler_plus_plugin_reproduces_reference(name, form):
    """Euler + EPD Plugin is the authors' sampler (EPD and iPNDM students) through ComfyUI."""
    import comfy.sample

    path = REFERENCE / f"{name}.safetensors"
    ref, meta = load_file(str(path)), reference_meta(path)
    params = epd_core.load_params(official_path(meta["predictor_file"]))
    model, cond = N["EPDAnalyticModel"].execute(form, "reference", 0.0).result
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    assert torch.allclose(sigmas.double(), ref["t_steps"], rtol=1e-6)
    flow = form in ("sd3_flow", "flux_flow")
    s0, s_last = float(sigmas[0]), float(sigmas[-1])
    noise = ref["latents"].float() if flow else ref["latents"].float() * s0 / (1 + s0**2) ** 0.5
    lat = torch.zeros(3, 4, 8, 8)
    sampler, _ = _plugin("euler", params)
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, lat).double()
    if flow:
        out = out * (1 - s_last)
    rel = ((out - ref["final"]).abs().max() / ref["final"].abs().max()).item()
    assert rel < 1e-5, rel
    (epd,) = N["EPDSampler"].execute(params, "auto", True, "authors").result
    direct = comfy.sample.sample_custom(model, ref["latents"].float(), 1.0, epd, sigmas, cond, cond, lat).double()
    assert ((direct - ref["final"]).abs().max() / ref["final"].abs().max()).item() < 1e-5


@pytest.mark.parametrize("kind", KINDS + ("analytic",))
@pytest.mark.parametrize("base", PLUGIN_BASES)
def test_every_supported_base_runs(kind, base):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    if kind == "analytic":
        model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result
        pos = neg = cond
        lat, params = {"samples": torch.zeros(2, 4, 8, 8)}, epd_core.load_params(official_path("sd15-best.pkl"))
    else:
        model, pos, neg = tiny_model(kind), conditioning(2, 1), conditioning(2, 2)
        lat, params = latent(kind, 2), epd_core.load_params(official_path(table_for(kind)))
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    sampler, info = _plugin(base, params)
    assert H.pack_module("nodes.plugin").base_sampler_name(comfy.samplers.sampler_object(base)) in info
    out = SamplerCustom.execute(model, True, 3, 2.0, pos, neg, sampler, sigmas, lat).result[0]["samples"]
    assert out.shape == lat["samples"].shape and torch.isfinite(out).all()


def test_every_supported_base_is_named_as_the_user_picked_it():
    """ComfyUI's ddim is its euler with random inpainting noise: EPD Plugin over ddim said "EPD Plugin over euler"."""
    import comfy.samplers

    name = H.pack_module("nodes.plugin").base_sampler_name
    assert [name(comfy.samplers.sampler_object(base)) for base in PLUGIN_BASES] == list(PLUGIN_BASES)
    _, info = _plugin("ddim", epd_core.load_params(official_path("sd15-best.pkl")))
    assert info.startswith("EPD Plugin over ddim:"), info


@pytest.mark.parametrize("base", ["euler_ancestral", "dpmpp_2m_sde", "heun", "dpm_2", "lcm", "dpm_adaptive"])
def test_unsupported_bases_are_refused_with_the_list(base):
    params = epd_core.load_params(official_path("sd15-best.pkl"))
    with pytest.raises(ValueError, match="supported: euler, ddim, dpmpp_2m"):
        _plugin(base, params)


def test_every_other_comfyui_sampler_is_refused():
    """An allow-list: each sampler of this ComfyUI outside PLUGIN_BASES (new ones such as exp_heun_2_x0 included)."""
    import comfy.samplers

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    others = [name for name in comfy.samplers.KSampler.SAMPLERS if name not in PLUGIN_BASES]
    assert "heun" in others and "euler_ancestral" in others
    for name in others:
        with pytest.raises(ValueError, match="supported: euler, ddim, dpmpp_2m"):
            _plugin(name, params)


def test_runtime_guard_for_a_multi_call_sampler_under_an_allowed_name():
    """An unknown sampler is refused by name (above); one that passes the allow-list but calls the model between
    grid points (say a future ComfyUI changes euler) is still stopped at run time, not silently changed."""
    import comfy.sample
    import comfy.samplers

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result

    def sample_midpoint(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            mid = (sigmas[i] * sigmas[i + 1]) ** 0.5
            d = (x - model(x, sigmas[i] * s_in, **extra_args)) / sigmas[i]
            x_mid = x + (mid - sigmas[i]) * d
            d_mid = (x_mid - model(x_mid, mid * s_in, **extra_args)) / mid
            x = x + (sigmas[i + 1] - sigmas[i]) * d_mid
        return x

    with pytest.raises(ValueError, match="does not support the sampler 'midpoint'"):
        N["EPDPlugin"].execute(comfy.samplers.KSAMPLER(sample_midpoint), params, "auto")
    sample_midpoint.__name__ = "sample_euler"  # the same method under an allowed name
    sampler, _ = N["EPDPlugin"].execute(comfy.samplers.KSAMPLER(sample_midpoint), params, "auto").result
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result
    with pytest.raises(ValueError, match="between the table's grid points"):
        comfy.sample.sample_custom(
            model, torch.randn(1, 4, 8, 8), 1.0, sampler, sigmas, cond, cond, torch.zeros(1, 4, 8, 8)
        )


def test_info_says_what_the_plugin_does_and_costs():
    params = epd_core.load_params(official_path("sd15-best.pkl"))
    _, info = _plugin("dpmpp_2m", params)
    assert "EPD Plugin over dpmpp_2m" in info and "2 sequential model rounds per step" in info
    assert "Euler step" in info and "its own update" in info
    tuned = params.replace(metadata={**params.metadata, "plugin_base": "deis"})
    assert "deis's own update" in _plugin("dpmpp_2m", tuned)[1]
    authors_ipndm = epd_core.load_params(official_path("00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"))
    assert "iPNDM extrapolation" in _plugin("lms", authors_ipndm)[1]


def test_info_counts_calls_as_the_run_makes_them():
    """parallel sequential makes one call per point (the info said one batched call); a carry table without the
    analytic first step makes a plain prediction on its first step (the info said none): counted on the network."""
    model, pos = tiny_model("eps"), conditioning(1, 1)
    for params, parallel, says, calls in (
        (epd_core.load_params(official_path("sd15-best.pkl")), "sequential", "2 points one call each", None),
        (epd_core.EPDParams.start(5, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm", student="carry",
                                  afs=False), "batched", "2 on the first (its plain prediction", 5),
    ):  # fmt: skip
        sampler, info = _plugin("euler", params, parallel, "estimate")
        assert says in info, info
        if calls is not None:
            from comfy_extras.nodes_custom_sampler import SamplerCustom

            (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
            with network_calls(model) as seen:
                SamplerCustom.execute(model, True, 0, 1.0, pos, pos, sampler, sigmas, latent("eps", 1))
            assert len(seen) == calls and [b for b, _ in seen[:2]] == [1, 2], seen


def test_the_plugin_s_texts_say_what_a_plugin_user_can_do():
    """Three texts a plugin user met: the sequential info said "calls per sample" of calls over the whole batch; the
    wrong-grid error offered EPD KSampler, which would drop the user's base sampler; a one-step, one-point table
    read "1 steps x 1 points"."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    sampler, info = _plugin("euler", params, "sequential")
    assert f"makes {params.evaluations} model calls, each over the batch" in info and "calls per sample" not in info
    model, pos = tiny_model("eps"), conditioning(1, 1)
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    with pytest.raises(ValueError, match="not this EPD table's grid") as error:
        SamplerCustom.execute(model, True, 0, 1.0, pos, pos, sampler, sigmas * 0.9, latent("eps", 1))
    assert str(error.value).endswith("Use EPD Scheduler with the same model and table for the sigmas")
    tables = H.pack_module("nodes.nodes_tables")
    one = epd_core.EPDParams.start(2, 1, schedule_type="discrete", schedule_rho=1.0, backend="ldm")
    assert "1 step x 1 point, NFE" in tables.describe(one) and "10 steps x 2 points" in tables.describe(params)
    _, info = _plugin("euler", one)
    assert info.startswith("EPD Plugin over euler: 1 step, NFE") and "then 1 point in one batched call" in info
    assert "weighted sum of the 1 direction," in info


def test_samplerlms_at_its_default_order_is_lms():
    """SamplerLMS(order 4) is KSamplerSelect's lms (the same options as the function's defaults): accepted, the same
    run; another order changes the update the plugin mirrors: refused, naming it."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom, SamplerLMS

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    lat = {"samples": torch.zeros(2, 4, 8, 8)}
    outs = []
    for base in (SamplerLMS.execute(4).result[0], comfy.samplers.sampler_object("lms")):
        sampler, _ = N["EPDPlugin"].execute(base, params, "batched", "estimate").result
        outs.append(SamplerCustom.execute(model, True, 3, 1.0, cond, cond, sampler, sigmas, lat).result[0]["samples"])
    assert torch.equal(*outs)
    with pytest.raises(ValueError, match=r"default options only .*got \{'order': 3\}"):
        N["EPDPlugin"].execute(SamplerLMS.execute(3).result[0], params, "batched", "estimate")


@pytest.mark.parametrize("base", ["euler", "dpmpp_2m"])
def test_plugin_estimate_ending_keeps_the_unmasked_area(base):
    """With ``final_step`` estimate the plugin answers the base's last call with the ensemble's estimate, blended
    as ComfyUI's inpainting wrapper blends every answer (it left noise in the kept area before)."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    params = epd_core.load_params(official_path("00016-lsun_bedroom_ldm-6-9-epd-uni1.0-afs.pkl"))
    g = torch.Generator().manual_seed(9)
    lat = {"samples": torch.randn(2, 4, 8, 8, generator=g), "noise_mask": torch.zeros(2, 1, 8, 8)}
    lat["noise_mask"][..., 4:] = 1.0
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    sampler, _ = _plugin(base, params, "auto", "estimate")
    out = SamplerCustom.execute(model, True, 2, 3.0, conditioning(2, 5), conditioning(2, 6), sampler, sigmas,
                                lat).result[0]["samples"]  # fmt: skip
    assert torch.allclose(out[..., :4], lat["samples"][..., :4], atol=1e-5)


@pytest.mark.parametrize("table", ["carry", "lsun"])
@pytest.mark.parametrize("kind", ["EPD Sampler", "EPD Plugin"])
def test_inpainting_previews_and_denoised_output_keep_the_source(kind, table):
    """Every preview and SamplerCustom's ``denoised_output`` show the source where the noise mask keeps it, as
    ComfyUI's inpainting wrapper makes every model answer. The ensemble's raw estimate is the source there only
    when the step's weight * scale_dir sum to 1 (not for carry tables, AFS steps or the authors' LSUN table)."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    lsun = official_path("00016-lsun_bedroom_ldm-6-9-epd-uni1.0-afs.pkl")
    params = epd_core.load_params(
        lsun if table == "lsun" else H.ROOT / "weights/demo/analytic-sd15-reference-nfe5-carry.safetensors"
    )
    g = torch.Generator().manual_seed(4)
    src, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1.0
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, False).result  # no final call: the last x0 is EPD's
    if kind == "EPD Sampler":
        (sampler,) = N["EPDSampler"].execute(params, "auto", True, "comfyui", "estimate").result
    else:
        sampler, _ = _plugin("dpmpp_2m", params, "auto", "estimate")
    shown = []
    comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, conditioning(2, 5), conditioning(2, 6), src,
                               noise_mask=mask, callback=lambda i, x0, x, total: shown.append(x0))  # fmt: skip
    kept = model.model.process_latent_in(src)[..., :4]
    assert len(shown) == sigmas.shape[0] - 1
    assert max(float((x0[..., :4] - kept).abs().max()) for x0 in shown) < 1e-5
    lat = {"samples": src, "noise_mask": mask}
    _, denoised = SamplerCustom.execute(model, True, 2, 3.0, conditioning(2, 5), conditioning(2, 6), sampler, sigmas,
                                        lat).result  # fmt: skip
    assert torch.allclose(denoised["samples"][..., :4], src[..., :4], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_plugin_batched_equals_sequential_with_inpainting(batch):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model = tiny_model("eps")
    params = epd_core.load_params(official_path("sd15-best.pkl"))
    g = torch.Generator().manual_seed(9)
    lat = {"samples": torch.randn(batch, 4, 8, 8, generator=g), "noise_mask": torch.zeros(batch, 1, 8, 8)}
    lat["noise_mask"][..., 4:] = 1.0
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    outs = {}
    for mode in ("batched", "sequential"):
        sampler, _ = _plugin("dpmpp_2m", params, mode)
        pos, neg = conditioning(batch, 5), conditioning(batch, 6)
        outs[mode] = SamplerCustom.execute(model, True, 2, 3.0, pos, neg, sampler, sigmas, lat).result[0]["samples"]
    assert torch.allclose(outs["batched"], outs["sequential"], rtol=1e-4, atol=1e-4)
    assert torch.allclose(outs["batched"][..., :4], lat["samples"][..., :4], atol=1e-5)


def _core_base_run(base, denoiser, x, grid, plugin=None):
    from epd_core.bases import Base

    run = Base(base, grid)
    for i in range(grid.shape[0] - 1):
        sigma = grid[i].expand(x.shape[0])
        x = run.step(i, x, plugin(denoiser, x, sigma) if plugin else denoiser(x, sigma))
    return x


@pytest.mark.parametrize("base", [b for b in PLUGIN_BASES if b != "ddim"])
@pytest.mark.parametrize("to_zero", [False, True])
def test_core_base_rules_and_plugin_match_comfyui(base, to_zero):
    """The core's copy of each base's update equals ComfyUI's sampler (bare, on ComfyUI's own karras grid), and
    the plugin through ComfyUI equals the plugin in the core (a table distilled for that base where one is
    bundled, else the authors' SD1.5 table)."""
    import math

    import comfy.sample
    import comfy.samplers

    from epd_core.plugin import PluginDenoiser

    gm = epd_core.GaussianMixture.reference()
    model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scale = lambda grid: noise.double() * math.sqrt(1 + float(grid[0]) ** 2)  # noqa: E731
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())  # noqa: E731

    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 8)
    sigmas = sigmas if to_zero else sigmas[:-1]
    bare = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object(base), sigmas, cond, cond,
                                      torch.zeros_like(noise))  # fmt: skip
    assert rel(bare, _core_base_run(base, gm.denoise_ve, scale(sigmas.double()), sigmas.double())) < 1e-4

    path = H.ROOT / "weights" / "demo" / f"analytic-sd15-reference-nfe10-plugin-{base}.safetensors"
    assert path.exists() or base in ("euler", "ddim")
    params = epd_core.load_params(path if path.exists() else official_path("sd15-best.pkl"))
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, to_zero).result
    grid = sigmas.double()
    core = _core_base_run(base, gm.denoise_ve, scale(grid), grid, PluginDenoiser(params, grid, base=base))
    sampler, _ = _plugin(base, params)
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros_like(noise))
    assert rel(out, core) < 1e-4


@pytest.mark.parametrize("final_step", ["denoise", "estimate"])
@pytest.mark.parametrize("base", ["dpmpp_2m", "ipndm", "deis"])
def test_carry_table_over_a_base_is_the_carry_sampler_at_the_bases_rounds(base, final_step):
    """A bundled carry table over a multistep base: the same latent as EPD Sampler with that table, one model round
    per step, and the step to 0 by the base's call (``denoise``) or by the last step's estimate at no call."""
    from bench.accuracy import PARALLEL, run

    params = epd_core.load_params(H.ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe10-carry.safetensors")
    model, _ = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    (epd,) = N["EPDSampler"].execute(params, PARALLEL, True, "comfyui", final_step).result
    expected, c_epd = run(model, epd, sigmas, noise)
    sampler, info = _plugin(base, params, parallel=PARALLEL, final_step=final_step)
    got, c = run(model, sampler, sigmas, noise)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
    assert c.rounds == c_epd.rounds == params.num_steps - 1 + (final_step == "denoise")
    assert "1 model round per step" in info


def test_distilled_for_a_base_records_it():
    from epd_core.distill import distill

    gm = epd_core.GaussianMixture.reference()
    start = epd_core.EPDParams.start(4, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm")
    table = distill(gm.denoise_ve, start, gm.shape, DistillConfig(iterations=3, batch=4, plugin_base="dpmpp_2m"))
    assert table.metadata["plugin_base"] == "dpmpp_2m"
    _, info = _plugin("euler", table)
    assert "dpmpp_2m's own update" in info


@pytest.mark.parametrize("base", ["ipndm", "deis", "dpmpp_2m"])
def test_plugin_previews_show_the_epd_estimate_not_the_bases_answer(base):
    """The step callback (the latent preview, SamplerCustom's denoised_output) gets EPD's x0 estimate at each step, as
    under EPD Sampler; it got the answer that makes the base's update land on the EPD step (3x further from x0 over
    ipndm and deis)."""
    import comfy.sample

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    shown = {}
    samplers = {"epd": N["EPDSampler"].execute(params, "auto", True, "comfyui", "estimate").result[0],
                base: _plugin(base, params, final_step="estimate")[0]}  # fmt: skip
    for name, sampler in samplers.items():
        x0s = []
        out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros(3, 4, 8, 8),
                                         callback=lambda i, x0, x, n, x0s=x0s: x0s.append(x0.clone()))  # fmt: skip
        shown[name] = (out, x0s)
    (out, x0s), (epd_out, epd_x0s) = shown[base], shown["epd"]
    assert torch.allclose(out, epd_out, rtol=1e-4, atol=1e-4)
    assert len(x0s) == len(epd_x0s) == len(sigmas) - 1
    for i, (a, b) in enumerate(zip(x0s, epd_x0s, strict=True)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (i, float((a - b).abs().max()))


@pytest.mark.parametrize("last", ["zero", "sigma_min"])
def test_a_schedule_of_one_sigma_returns_the_latent_as_comfyuis_samplers_do(last):
    """SplitSigmas at the last step leaves one sigma: no step to take. ComfyUI's samplers return the latent; EPD
    Sampler and EPD Plugin refused it as 'not this table's grid'."""
    import comfy.sample
    import comfy.samplers

    params = epd_core.load_params(official_path("sd15-best.pkl"))
    model, cond = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, last == "zero").result
    one = sigmas[-1:]
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    samplers = {"euler": comfy.samplers.sampler_object("euler"),
                "epd": N["EPDSampler"].execute(params, "auto", True, "comfyui", "estimate").result[0],
                "plugin": _plugin("euler", params, final_step="estimate")[0]}  # fmt: skip
    outs = {name: comfy.sample.sample_custom(model, torch.zeros_like(start), 1.0, s, one, cond, cond, start)
            for name, s in samplers.items()}  # fmt: skip
    assert torch.equal(outs["epd"], outs["euler"]) and torch.equal(outs["plugin"], outs["euler"])


@pytest.mark.parametrize(("form", "base"), [("sd15", "deis"), ("sd3", "dpmpp_2m")])
def test_epd_sampler_places_a_plugin_tables_points_by_its_base(form, base):
    """A table distilled for EPD Plugin over a multistep base (plugin_base) places its points by that base's
    update. EPD Sampler and EPD KSampler placed them on Euler's line, where the table was never fitted (3.1 off, and
    1.55x worse against the exact solution on the SD3 form). Now EPD Sampler is the plugin over euler."""
    import comfy.sample

    params = epd_core.load_params(
        H.ROOT / "weights" / "demo" / f"analytic-{form}-reference-nfe10-plugin-{base}.safetensors"
    )
    assert params.metadata["plugin_base"] == base
    model, cond = (
        N["EPDAnalyticModel"].execute(f"{form}_{'eps' if form == 'sd15' else 'flow'}", "reference", 0.0).result
    )
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    lat = torch.zeros_like(noise)
    (epd,) = N["EPDSampler"].execute(params, "auto", True, "comfyui", "estimate").result
    samplers = (epd, *(_plugin(name, params, final_step="estimate")[0] for name in ("euler", base)))
    outs = [comfy.sample.sample_custom(model, noise, 1.0, s, sigmas, cond, cond, lat) for s in samplers]
    scale = float(outs[1].abs().max())
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4 * scale
    assert float((outs[2] - outs[1]).abs().max()) < 1e-4 * scale


def test_plugin_info_counts_the_final_denoise_call():
    """With final_step denoise and sigmas ending at 0, the base's last call is one more model call than the table's
    NFE; the info gave the table's NFE alone."""
    params = epd_core.load_params(official_path("sd15-best.pkl"))
    assert "+1 model call when the sigmas end at 0" in _plugin("euler", params, final_step="denoise")[1]
    assert "+1 model call" not in _plugin("euler", params, final_step="estimate")[1]


def test_a_half_precision_latent_is_sampled_not_refused():
    """ComfyUI 0.3.75 hands the base sampler's sigma over in the latent's dtype: a bfloat16 one is the grid's only to
    a few of its ulps, and EPD Plugin refused it, blaming the base ('several model calls per step')."""
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom

    model, pos = tiny_model("eps"), conditioning(1, 1)
    params = N["EPDParamsLoader"].execute("demo/analytic-sd15-reference-nfe10-plugin-dpmpp_2m.safetensors").result[0]
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    sampler, _ = N["EPDPlugin"].execute(KSamplerSelect.execute("dpmpp_2m").result[0], params, "auto", "estimate").result
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        lat = {"samples": torch.zeros(1, 4, 8, 8, dtype=dtype)}
        out[dtype] = SamplerCustom.execute(model, True, 7, 1.0, pos, pos, sampler, sigmas, lat).result[0]["samples"]
    assert torch.isfinite(out[torch.bfloat16]).all()
    assert (out[torch.bfloat16].float() - out[torch.float32]).abs().max() < 0.1 * out[torch.float32].abs().max()
