"""Solver behaviour beyond parity: batching layout, callbacks, grid conventions, errors."""

from __future__ import annotations

import pytest
import torch

from epd_core import EPDParams, GaussianMixture, load_params, make_schedule, sample
from epd_core.params import time_points_for_nfe
from epd_core.schedules import DiscreteVP, sd15_alphas_cumprod, training_grid
from epd_core.solver import adams_bashforth, grid_offset
from epd_dev.shared_data import official_path

pytestmark = pytest.mark.core


class Recorder:
    """Wraps a denoiser and records each call's batch size and sigmas."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x, sigma):
        self.calls.append((x.shape[0], sigma.clone()))
        return self.fn(x, sigma)


def _conv_denoiser(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(5, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))

    def den(x, sigma):
        c = torch.log(sigma.to(x.dtype)).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return net(torch.cat([x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), c], 1).to(torch.float32)).to(x.dtype)

    return den


@pytest.mark.parametrize("name", ["sd15-best.pkl", "00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"])
def test_one_batched_call_per_step_point_major(name):
    p = load_params(official_path(name))
    grid = make_schedule(p)
    rec = Recorder(GaussianMixture.reference().denoise_ve)
    batch = 3
    x = torch.randn(batch, 4, 8, 8, dtype=torch.float64) * grid[0]
    sample(rec, x, grid, p)
    steps = p.num_steps - 1
    point_calls = [c for c in rec.calls if c[0] == batch * p.num_points]
    assert len(point_calls) == steps
    assert len(rec.calls) == p.evaluations - steps * (p.num_points - 1)
    table = p.decoded()
    for i, (_, sig) in enumerate(point_calls):
        tau = grid[i + 1] ** table.r[i] * grid[i] ** (1 - table.r[i])
        expected = (table.scale_time[i] * tau).repeat_interleave(batch)
        assert torch.allclose(sig, expected, rtol=1e-15)


def test_batched_equals_sequential_neural_float32():
    p = load_params(official_path("sd15-best.pkl"))
    grid = make_schedule(p)
    den = _conv_denoiser()
    x = torch.randn(4, 4, 8, 8) * float(grid[0])
    a = sample(den, x, grid, p, parallel=True)
    b = sample(den, x, grid, p, parallel=False)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert (a - b).abs().max().item() < 1e-4


def test_a_half_precision_state_is_integrated_in_float32():
    """ComfyUI 0.3.75 hands a bfloat16 LATENT to the sampler as it is, and its model answers in the latent's dtype:
    the whole trajectory stayed in bfloat16 (3.8x Euler's distance to the float32 run on the analytic SD1.5 model),
    where ComfyUI's samplers go on in float32 after their first call."""
    params = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(params)

    def den(x, sigma):  # answers in the latent's dtype, as ComfyUI's model wrapper
        return gm.denoise_ve(x.double(), sigma.double()).to(x.dtype)

    x = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * grid[0].float()).bfloat16()
    out = sample(den, x, grid, params)
    assert out.dtype == torch.float32
    assert torch.equal(out, sample(den, x.float(), grid, params))


def test_callback_once_per_step_and_denoise_to_zero():
    p = load_params(official_path("sd3-512-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    seen = []
    out = sample(gm.denoise_flow, x, grid, p, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(p.num_steps - 1))
    assert all(set(s) == {"x", "i", "sigma", "sigma_hat", "denoised"} for s in seen)
    seen.clear()
    zero = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    out0 = sample(gm.denoise_flow, x, zero, p, callback=seen.append)
    assert len(seen) == p.num_steps
    assert torch.allclose(out0, gm.denoise_flow(out, grid[-1:].expand(2)))


@pytest.mark.parametrize("name", ["sd15-best.pkl", "sd3-512-best.pkl"])
def test_final_estimate_extends_the_last_step_to_zero_at_no_call(name):
    p = load_params(official_path(name))
    gm = GaussianMixture.reference()
    exact = gm.denoise_flow if p.is_flow else gm.denoise_ve
    den = Recorder(exact)
    grid = make_schedule(p)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64) * (1 if p.is_flow else grid[0])
    states = []
    end = sample(den, x, grid, p, callback=lambda s: states.append(s["x"]))
    calls = len(den.calls)
    zero = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    seen = []
    out = sample(den, x, zero, p, callback=seen.append, final="estimate")
    assert len(den.calls) == 2 * calls and len(seen) == p.num_steps
    # the last step's update x_N = x_{N-1} + (t_N - t_{N-1}) d, continued to sigma 0
    d = (end - states[-1]) / (grid[-1] - grid[-2])
    assert torch.allclose(out, end - grid[-1] * d, rtol=1e-10, atol=1e-10)
    assert torch.equal(seen[-1]["denoised"], out) and torch.equal(seen[-2]["denoised"], out)
    denoised = sample(den, x, zero, p, final="denoise")
    assert not torch.allclose(out, denoised) and len(den.calls) == 3 * calls + 1
    lone = sample(den, x, zero[-2:], p, final="estimate")  # no step to extend: falls back to one denoise call
    assert torch.equal(lone, exact(x, grid[-1:].expand(3)))
    with pytest.raises(ValueError, match="final"):
        sample(den, x, zero, p, final="skip")


def test_partial_grid_runs_last_steps():
    p = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    grid = make_schedule(p)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * grid[0]
    states = []
    full = sample(gm.denoise_ve, x, grid, p, callback=lambda s: states.append(s["x"]))
    assert grid_offset(p, grid[4:]) == (4, False)
    tail = sample(gm.denoise_ve, states[4], grid[4:], p)
    assert torch.allclose(tail, full, rtol=1e-13, atol=1e-13)


def test_grid_errors():
    p = load_params(official_path("sd15-best.pkl"))
    gm = GaussianMixture.reference()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="table has 11 time points"):
        sample(gm.denoise_ve, x, make_schedule(p, num_steps=20), p)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(gm.denoise_ve, x, torch.tensor([1.0, 2.0, 0.5]), p)
    with pytest.raises(ValueError, match="at least 2"):
        sample(gm.denoise_ve, x, torch.tensor([1.0]), p)


def test_adams_bashforth_orders():
    d = torch.tensor(1.0)
    hist = [torch.tensor(4.0), torch.tensor(3.0), torch.tensor(2.0)]
    assert adams_bashforth(d, [], 4) == d
    assert adams_bashforth(d, hist[-1:], 4) == (3 * 1 - 2) / 2
    assert adams_bashforth(d, hist[-2:], 4) == (23 - 16 * 2 + 5 * 3) / 12
    assert adams_bashforth(d, hist, 4) == (55 - 59 * 2 + 37 * 3 - 9 * 4) / 24
    assert adams_bashforth(d, hist, 2) == (3 * 1 - 2) / 2


def test_fcn_forces_last_scale_dir():
    p = load_params(official_path("00002-cifar10-4-5-epd-uni1.0-afs.pkl"))
    q = p.replace(fcn=True)
    assert not torch.all(p.decoded().scale_dir[-1] == 1)
    assert torch.all(q.decoded().scale_dir[-1] == 1)
    assert torch.equal(q.decoded().scale_dir[:-1], p.decoded().scale_dir[:-1])


def test_nfe_matches_authors_naming():
    for path in sorted(official_path("00001-cifar10-3-3-epd-uni1.0-afs.pkl").parent.glob("*.pkl")):
        steps, nfe = path.stem.split("-")[2:4]
        p = load_params(path)
        assert (p.num_steps, p.nfe) == (int(steps), int(nfe))


def test_flow_afs_first_step_assumes_zero_denoised():
    """On a flow grid, AFS replaces the first call by D = 0: the same as the full sampler with D(x, t0) = 0."""
    p = load_params(official_path("sd3-512-best.pkl"))
    grid = make_schedule(p)
    gm = GaussianMixture.reference()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    zero_first = {"done": False}

    def den_zero_first(xs, sigma):
        if not zero_first["done"]:
            zero_first["done"] = True
            return torch.zeros_like(xs)
        return gm.denoise_flow(xs, sigma)

    rec = Recorder(gm.denoise_flow)
    with_afs = sample(rec, x, grid, p.replace(afs=True))
    assert len(rec.calls) == p.replace(afs=True).evaluations - (p.num_steps - 1) * (p.num_points - 1)
    assert p.replace(afs=True).nfe == p.nfe - 1
    assert torch.allclose(with_afs, sample(den_zero_first, x, grid, p), rtol=0, atol=1e-12)


def test_time_points_for_nfe_inverts_nfe():
    for nfe in range(2, 21):
        steps, afs = time_points_for_nfe(nfe)
        p = EPDParams.start(steps, 2, afs=afs)
        assert p.nfe == nfe and afs == bool(nfe % 2)
    with pytest.raises(ValueError, match="NFE"):
        time_points_for_nfe(1)
    for nfe in range(1, 21):
        steps, afs = time_points_for_nfe(nfe, "carry")
        p = EPDParams.start(steps, 3, afs=afs, student="carry")
        assert p.nfe == nfe and p.num_steps == nfe + 1 and p.evaluations == 3 * nfe
    for nfe in range(2, 21):  # without AFS: a plain first prediction, then one round per step
        steps, afs = time_points_for_nfe(nfe, "carry", afs=False)
        p = EPDParams.start(steps, 3, afs=afs, student="carry")
        assert not afs and p.nfe == nfe and p.num_steps == nfe and p.evaluations == 3 * (nfe - 1) + 1
    with pytest.raises(ValueError, match="NFE >= 2"):
        time_points_for_nfe(1, "carry", afs=False)


def _carry_reference(den, x, grid, table, afs_scale):
    """The carry student written out by hand: the first step's points along AFS's direction, every later step's
    along the previous step's weighted direction; the last step extended to sigma 0."""
    d = x / afs_scale
    for i in range(grid.shape[0] - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        d_eff = torch.zeros_like(x)
        for k in range(table.r.shape[1]):
            tau = t_next ** table.r[i, k] * t_cur ** (1 - table.r[i, k])
            xk = x + (tau - t_cur) * d
            sigma = (table.scale_time[i, k] * tau).expand(x.shape[0])
            d_eff = d_eff + table.weight[i, k] * table.scale_dir[i, k] * (xk - den(xk, sigma)) / tau
        if i == grid.shape[0] - 2:
            return x - t_cur * d_eff
        x, d = x + (t_next - t_cur) * d_eff, d_eff


@pytest.mark.parametrize("parallel", [True, False])
def test_carry_student_takes_one_round_per_step_along_the_carried_direction(parallel):
    gen = torch.Generator().manual_seed(3)
    p = EPDParams.start(6, 3, student="carry", afs=True, schedule_type="polynomial", backend="edm", scale_dir=0.05,
                        scale_time=0.05)  # fmt: skip
    p = p.replace(**{name: torch.randn(getattr(p, name).shape, generator=gen) for name in
                     ("r_params", "weight_s", "scale_dir_params", "scale_time_params")})  # fmt: skip
    grid = make_schedule(p)
    rec = Recorder(GaussianMixture.reference().denoise_ve)
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64, generator=gen) * grid[0]
    out = sample(rec, x, torch.cat([grid, grid.new_zeros(1)]), p, parallel=parallel, final="estimate")
    assert len(rec.calls) == (p.nfe if parallel else p.evaluations) and p.nfe == 5
    expected = _carry_reference(GaussianMixture.reference().denoise_ve, x, grid, p.decoded(), (1 + grid[0] ** 2).sqrt())
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_carry_student_from_a_later_step_starts_with_a_model_call():
    p = EPDParams.start(6, 2, student="carry", afs=True, schedule_type="polynomial", backend="edm")
    grid = make_schedule(p)
    rec = Recorder(GaussianMixture.reference().denoise_ve)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * grid[2]
    sample(rec, x, grid[2:], p)
    assert [c[0] for c in rec.calls] == [2, 4, 4, 4]  # d at the first point, then one batched call per step


@pytest.mark.parametrize("plugin_base", [None, "deis"])
def test_sampling_builds_no_autograd_graph(plugin_base):
    """sample() runs without gradients (a network whose weights require grad kept every step's graph, and ComfyUI's
    memory-saving attention refused it outside inference mode); a plugin table's placement is no exception."""
    weight = torch.ones((), dtype=torch.float64, requires_grad=True)
    gm = GaussianMixture.reference()
    params = EPDParams.start(4, 2)
    if plugin_base:
        params = params.replace(metadata={"plugin_base": plugin_base})
    grid = make_schedule(params)
    x = torch.randn(4, *gm.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[0]
    out = sample(lambda x, s: gm.denoise_ve(x, s) * weight, x, grid, params)
    assert not out.requires_grad


def test_discrete_vp_timesteps_are_the_models_indices():
    """``DiscreteVP.timestep`` (the fractional timesteps EPD gives ComfyUI's discrete models) is index ``i`` at the
    model's own ``sigma_i = sqrt((1 - a_i) / a_i)``, as ComfyUI's ``ModelSamplingDiscrete.timestep`` is, and halfway
    in ``log(alpha)`` between two of them it is halfway between their indices. An index off by one passed every
    core test."""
    ac = sd15_alphas_cumprod()
    vp = DiscreteVP(ac)
    idx = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.allclose(vp.timestep(((1 - ac[idx]) / ac[idx]).sqrt()), idx.double(), rtol=0, atol=1e-9)
    log_alpha = 0.25 * torch.log(ac[idx[:-1]] * ac[idx[:-1] + 1])
    assert torch.allclose(vp.timestep(torch.expm1(-2 * log_alpha).sqrt()), idx[:-1].double() + 0.5, rtol=0, atol=1e-9)


def test_discrete_vp_extrapolates_along_its_end_segments():
    """Past its table DPM-Solver's ``interpolate_fn`` continues the end segment: ``log(alpha)`` below ``t = 1 / N``
    and ``t`` above ``sigma(1)`` (a model's sigma_max just past the schedule's end) keep the slope of their last
    segment, not the chord of the whole table."""
    ac = torch.tensor([0.99, 0.9, 0.5], dtype=torch.float64)
    vp, la = DiscreteVP(ac), 0.5 * torch.log(ac)
    t = torch.tensor(0.32, dtype=torch.float64)  # before t_0 = 1/3
    expected = la[0] + (t - 1 / 3) * (la[1] - la[0]) * 3
    assert torch.allclose(vp.sigma(t), torch.expm1(-2 * expected).sqrt(), rtol=1e-12)
    beyond = la[2] - 0.3  # a sigma above sigma(1)
    expected_t = 1 + (beyond - la[2]) / (la[2] - la[1]) / 3
    assert torch.allclose(vp.sigma_inv(torch.expm1(-2 * beyond).sqrt()), expected_t, rtol=1e-12)


def test_a_tables_own_grid_is_its_schedule_only_at_its_own_length():
    """A table that carries its grid (``t_steps``) samples on it; asked for another number of steps or another
    range, ``make_schedule`` builds the table's schedule instead (returning the carried grid regardless passed every
    core test)."""
    p = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, sigma_min=0.002, sigma_max=80.0)
    own = torch.tensor([80.0, 9.0, 0.7, 0.002], dtype=torch.float64)
    q = p.replace(t_steps=own)
    assert torch.equal(make_schedule(q), own)
    assert torch.equal(make_schedule(q, num_steps=6), make_schedule(p, num_steps=6))
    assert torch.equal(make_schedule(q, sigma_max=40.0), make_schedule(p, sigma_max=40.0))
    for bad in ([80.0, 9.0, 9.0, 0.002], [80.0, 0.7, 9.0, 0.002]):  # a repeated point passed every core test
        with pytest.raises(ValueError, match="t_steps: must be finite, positive and strictly decreasing"):
            p.replace(t_steps=torch.tensor(bad, dtype=torch.float64))


def test_a_training_grid_is_checked_to_decrease_strictly():
    p = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, sigma_min=0.002, sigma_max=80.0)
    given = [80.0, 5.0, 0.5, 0.002]
    assert torch.equal(training_grid(p, given), torch.tensor(given, dtype=torch.float64))
    for bad in ([80.0, 5.0, 5.0, 0.002], [80.0, 0.5, 5.0, 0.002], [80.0, 5.0, 0.5, -0.002]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            training_grid(p, bad)


def test_a_first_step_mean_of_another_latent_format_says_what_to_do():
    """A table's ``afs_mean`` fitted on latents of other channels fails naming the mismatch and the remedy."""
    p = load_params(official_path("sd3-512-best.pkl"))
    table = p.replace(afs=True, afs_mean=torch.zeros(16, dtype=torch.float64))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"16 channels .*\[1, 4, 8, 8\].*another latent format.*EPD Distill"):
        sample(GaussianMixture.reference().denoise_flow, x, make_schedule(table), table)
