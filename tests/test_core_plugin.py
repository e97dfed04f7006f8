"""EPD-Plugin in the core: Euler + plugin is the EPD solver; misuse is refused."""

from __future__ import annotations

import pytest
import torch

from epd_core import EPDParams, GaussianMixture, load_params, make_schedule, sample
from epd_core.bases import BASES, Base
from epd_core.plugin import PluginDenoiser, PluginMisuse, placement
from epd_core.solver import epd_step
from epd_dev.shared_data import official_path

pytestmark = pytest.mark.core


def _euler(plugin, denoiser, x, sigmas):
    for i in range(sigmas.shape[0] - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = plugin(denoiser, x, s.expand(x.shape[0]))
        x = x + (s_next - s) * (x - den) / s if s_next > 0 else den
    return x


@pytest.mark.parametrize(
    "name",
    [
        "sd15-best.pkl",
        "00018-cifar10-4-5-ipndm-uni1.0-afs.pkl",
        "00002-cifar10-4-5-epd-uni1.0-afs.pkl",
        "flux-best.pkl",
    ],
)
@pytest.mark.parametrize("to_zero", [False, True])
def test_euler_plus_plugin_is_epd(name, to_zero):
    p = load_params(official_path(name))
    gm = GaussianMixture.reference()
    den = gm.denoise_flow if p.is_flow else gm.denoise_ve
    grid = make_schedule(p)
    if to_zero:
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x if p.is_flow else x * grid[0]
    expected = sample(den, x, grid, p)
    got = _euler(PluginDenoiser(p, grid), den, x, grid)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    cut = grid[2:]  # a denoise < 1: the table's last steps (the plugin took its first rows there and passed)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * cut[0]
    got = _euler(PluginDenoiser(p, cut), den, x, cut)
    assert torch.allclose(got, sample(den, x, cut, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("final", ["denoise", "estimate"])
@pytest.mark.parametrize("base", ["euler", "dpmpp_2m", "ipndm"])
def test_plugin_over_a_carry_table_costs_one_round_per_step_like_its_base(base, final):
    """A carry table needs no plain prediction at the grid points: each base call is answered with one batched
    call of the K points, so plugin + base keeps the base's NFE and runs the carry trajectory. The step to 0 is
    the base's final denoise, or the last step's x0 estimate at no call (as EPD Sampler's ``final_step``)."""
    p = EPDParams.start(6, 2, student="carry", afs=True, schedule_type="polynomial", backend="edm")
    gen = torch.Generator().manual_seed(4)
    r, w = torch.randn(p.r_params.shape, generator=gen), torch.randn(p.weight_s.shape, generator=gen)
    p = p.replace(r_params=r, weight_s=w)
    gm = GaussianMixture.reference()
    grid = torch.cat([make_schedule(p), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=gen) * grid[0]
    calls = []

    def den(x, sigma):
        calls.append(x.shape[0])
        return gm.denoise_ve(x, sigma)

    expected = sample(gm.denoise_ve, x, grid, p, final=final)
    got = _base_run(PluginDenoiser(p, grid, base=base, final=final), base, den, x, grid)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert calls == [6] * 5 + ([3] if final == "denoise" else [])  # five steps of 2 points in one call, then 0


def test_plugin_refuses_intermediate_and_repeated_calls():
    p = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64) * grid[0]
    plugin = PluginDenoiser(p, grid)
    plugin(gm.denoise_ve, x, grid[:1])
    with pytest.raises(PluginMisuse, match="between the table's grid points"):
        plugin(gm.denoise_ve, x, (grid[1:2] + grid[2:3]) / 2)
    with pytest.raises(PluginMisuse, match="point 0 was due"):
        PluginDenoiser(p, grid)(gm.denoise_ve, x, grid[1:2])


def _base_run(plugin, base, denoiser, x, sigmas):
    """The base sampler's own loop (the core's copy of ComfyUI's rule), its model calls answered by ``plugin``."""
    run = Base(base, sigmas)
    for i in range(sigmas.shape[0] - 1):
        x = run.step(i, x, plugin(denoiser, x, sigmas[i].expand(x.shape[0])))
    return x


def _epd_with_placement(params, base, denoiser, x, sigmas):
    """The plugin's contract written out: the base (fed plain predictions) places the points, the step is EPD's."""
    grid = sigmas[:-1] if float(sigmas[-1]) == 0 else sigmas
    placer, history, table = Base(base, sigmas), [], params.decoded()
    for i in range(grid.shape[0] - 1):
        place = placement(placer, i, x, grid[i])
        d_eff, history = epd_step(denoiser, x, grid[i], grid[i + 1], table, i, params, history, place=place)
        x = x + (grid[i + 1] - grid[i]) * d_eff
    return denoiser(x, grid[-1:].expand(x.shape[0])) if grid.shape[0] < sigmas.shape[0] else x


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("to_zero", [False, True])
def test_every_base_takes_the_tables_epd_step(base, to_zero):
    """Whatever the base does with its history, the answers make it take the table's EPD step: with an EPD table the
    run is the EPD solver over every base; with a table distilled for a base, that base's method places the points
    (which changes the run: a multistep placement differs from Euler's)."""
    p = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    if to_zero:
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * grid[0]
    epd = sample(gm.denoise_ve, x, grid, p)
    got = _base_run(PluginDenoiser(p, grid, base=base), base, gm.denoise_ve, x, grid)
    assert torch.allclose(got, epd, rtol=1e-10, atol=1e-10)
    if to_zero:
        estimate = sample(gm.denoise_ve, x, grid, p, final="estimate")
        got = _base_run(PluginDenoiser(p, grid, base=base, final="estimate"), base, gm.denoise_ve, x, grid)
        assert torch.allclose(got, estimate, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(estimate, epd, rtol=1e-6, atol=1e-6)
    placed = "dpmpp_2m" if base == "euler" else base
    tuned = p.replace(metadata={**p.metadata, "plugin_base": placed})
    got = _base_run(PluginDenoiser(tuned, grid, base=base), base, gm.denoise_ve, x, grid)
    assert torch.allclose(got, _epd_with_placement(tuned, placed, gm.denoise_ve, x, grid), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, epd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", ["dpmpp_2m", "ipndm", "lms", "res_multistep"])
def test_ipndm_table_over_any_base_is_the_authors_ipndm_plugin(base):
    """An iPNDM-student table keeps its own Adams-Bashforth placement: over every base the run is the authors'
    EPD-Plugin (the core's sampler, itself checked against the authors' trajectories)."""
    p = load_params(official_path("00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * grid[0]
    got = _base_run(PluginDenoiser(p, grid, base=base), base, gm.denoise_ve, x, grid)
    assert torch.allclose(got, sample(gm.denoise_ve, x, grid, p), rtol=1e-10, atol=1e-10)


def test_distillation_trains_the_plugins_trajectory():
    """``plugin_base`` makes the student's steps the plugin's over that base (placement included)."""
    from epd_core.config import DistillConfig
    from epd_core.objective import student_loss
    from epd_core.params import TABLE_NAMES

    p = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * grid[0]
    raw = {n: getattr(p, n).double().clone() for n in TABLE_NAMES}
    targets = torch.zeros(grid.shape[0], *x.shape, dtype=torch.float64)
    for base in ("dpmpp_2m", "deis"):
        config = DistillConfig(plugin_base=base, objective="global")
        _, end = student_loss(gm.denoise_ve, p, raw, grid, x, targets, config)
        tuned = p.replace(metadata={**p.metadata, "plugin_base": base})
        expected = _base_run(PluginDenoiser(tuned, grid, base="lms"), "lms", gm.denoise_ve, x, grid)
        assert torch.allclose(end, expected, rtol=1e-10, atol=1e-10)


def test_answers_invert_each_bases_update():
    """``Base.answer`` returns the x0 for which the base's own step (with the history it keeps) reaches a target."""
    grid = torch.tensor([14.6, 7.3, 4.3, 2.7, 1.7, 0.03], dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    for name in BASES:
        answering, checking = Base(name, grid), Base(name, grid)
        x = torch.randn(2, 5, dtype=torch.float64, generator=g) * grid[0]
        for i in range(grid.shape[0] - 1):
            target = torch.randn(2, 5, dtype=torch.float64, generator=g) * grid[i + 1]
            answer = answering.answer(i, x, target)
            assert torch.allclose(checking.step(i, x, answer), target, rtol=1e-10, atol=1e-10), (name, i)
            x = target
