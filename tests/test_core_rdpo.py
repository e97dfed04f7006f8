"""RDPO pieces on hand-checked examples, and a convergence test with a known answer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from epd_core import EPDParams, GaussianMixture, load_params, make_schedule, sample
from epd_core import rdpo as rdpo_module
from epd_core.analytic import ode_endpoint
from epd_core.config import RDPOConfig
from epd_core.policy import DirichletPolicy, TableSample, _dirichlet, _dirichlet_log_prob
from epd_core.rdpo import _in_chunks, guard_iterations, ppo_clip_loss, rdpo, rloo_advantages
from epd_dev.shared_data import official_path

pytestmark = pytest.mark.core

GM = GaussianMixture.reference()


def test_log_prob_matches_torch_dirichlet():
    p = load_params(official_path("sd15-best.pkl"))
    policy = DirichletPolicy(p, concentration=20.0)
    tables = policy.sample(5, torch.Generator().manual_seed(0))
    seg, w = tables.segments, tables.weights
    assert policy.scale_names == () and tables.scale_dir is None and tables.scale_time is None
    assert policy.head.out_features == 2 * p.num_points + 1
    a_pos, a_w = policy.alphas()
    expected = sum(
        torch.distributions.Dirichlet(a_pos[i]).log_prob(seg[:, i])
        + torch.distributions.Dirichlet(a_w[i]).log_prob(w[:, i])
        for i in range(policy.steps)
    )
    assert torch.allclose(policy.log_prob(tables), expected, rtol=1e-5)
    assert torch.allclose(seg.sum(-1), torch.ones(5, policy.steps), atol=1e-5)


def test_the_policy_gradient_is_unbiased_at_small_concentrations():
    """The tables keep a Dirichlet draw at least 1e-6, and the log-probability took the kept value: at a concentration
    of 0.048 (a segment of the bundled ``analytic-flux-wide-nfe5-carry`` at concentration 20) most draws lie below it,
    and the score-function estimate of d E[x_3] / d alpha_3 was 2.6x too small. It now takes the draw's exact log."""
    alpha = torch.tensor([1.7227, 1.0799, 0.0482, 17.1492])
    x, log_x = _dirichlet(alpha, 200_000, torch.Generator().manual_seed(0))
    assert (x[:, 2] <= 1e-6 * 1.01).float().mean() > 0.5  # the case: most draws of x_3 are kept at 1e-6
    a = alpha.clone().requires_grad_(True)
    reward = x[:, 2].double()
    ((reward - reward.mean()) * _dirichlet_log_prob(a, x, log_x)).mean().backward()
    analytic = float((alpha.sum() - alpha[2]) / alpha.sum() ** 2)  # d/d alpha_3 of alpha_3 / sum(alpha)
    assert float(a.grad[2]) == pytest.approx(analytic, rel=0.1)


@pytest.mark.parametrize("name", ["sd15-best.pkl", "00024-ffhq-6-9-ipndm-uni1.0-afs.pkl"])
def test_policy_mean_at_init_is_the_start_table(name):
    p = load_params(official_path(name))
    policy = DirichletPolicy(p, concentration=10.0)
    centre = policy.mean()
    seg, w = centre.segments[0], centre.weights[0]
    r = torch.cumsum(seg.double(), -1)[:, : p.num_points]
    table = p.decoded()
    assert torch.allclose(r, torch.sort(table.r, -1).values, atol=1e-6)
    assert torch.allclose(w.double(), torch.gather(table.weight, -1, policy.order), atol=1e-6)
    exported = policy.export()
    gm = GM
    den = gm.denoise_flow if p.is_flow else gm.denoise_ve
    grid = make_schedule(p)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[0]
    assert torch.allclose(sample(den, x, grid, exported), sample(den, x, grid, p), rtol=1e-5, atol=1e-5)


def _bounded_start(num_steps: int = 4, **hyper) -> EPDParams:
    """A start table with learnable scales, moved off 1 so that ordering and inverses matter."""
    p = EPDParams.start(num_steps, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm",
                        scale_dir=0.05, scale_time=0.1, **hyper)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    noisy = lambda t: t + torch.randn(t.shape, generator=g)  # noqa: E731
    return p.replace(r_params=noisy(p.r_params), scale_dir_params=noisy(p.scale_dir_params),
                     scale_time_params=noisy(p.scale_time_params))  # fmt: skip


def _perturbed(policy: DirichletPolicy) -> DirichletPolicy:
    with torch.no_grad():
        policy.head.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    return policy


def _torch_dirichlets(policy: DirichletPolicy, tables: TableSample) -> torch.Tensor:
    """torch's Dirichlet log-densities of the tables' exact draws (in float64: some lie below the 1e-6 they are kept
    at in the tables), summed over steps."""
    assert tables.log_segments.min() > -700 and tables.log_weights.min() > -700  # exp() of them is a float64 > 0
    out = 0
    for alpha, log_x in zip(policy.alphas(), (tables.log_segments, tables.log_weights), strict=True):
        out = out + torch.distributions.Dirichlet(alpha.double()).log_prob(log_x.double().exp()).sum(-1)
    return out.float()


def test_log_normal_log_prob_matches_torch():
    p = _bounded_start(fcn=True)
    policy = _perturbed(DirichletPolicy(p, concentration=20.0, scale_std=0.03))
    assert policy.scale_names == ("scale_dir", "scale_time")
    tables = policy.sample(6, torch.Generator().manual_seed(0))
    locs = policy.locs()
    dirichlets = _torch_dirichlets(policy, tables)
    lp_dir = torch.distributions.LogNormal(locs["scale_dir"], 0.03).log_prob(tables.scale_dir)
    lp_time = torch.distributions.LogNormal(locs["scale_time"], 0.03).log_prob(tables.scale_time)
    # fcn: the last step's direction scale is fixed at 1, neither sampled nor counted
    assert torch.equal(tables.scale_dir[:, -1], torch.ones(6, 2))
    assert not torch.equal(tables.scale_dir[:, :-1], tables.scale_dir[:1, :-1].expand(6, -1, -1))
    expected = dirichlets + lp_dir[:, :-1].sum((-2, -1)) + lp_time.sum((-2, -1))
    assert torch.allclose(policy.log_prob(tables), expected, rtol=1e-5)
    assert torch.isfinite(expected).all() and not torch.allclose(expected, dirichlets)
    with pytest.raises(ValueError, match="scale_dir"):
        policy.log_prob(TableSample(tables.segments, tables.weights, None, tables.scale_time))


def test_log_normal_draws_have_the_policy_median_and_std():
    policy = _perturbed(DirichletPolicy(_bounded_start(), scale_std=0.03))
    tables = policy.sample(4000, torch.Generator().manual_seed(1))
    z = (torch.log(tables.scale_time.double()) - policy.locs()["scale_time"].detach().double()) / 0.03
    assert float(z.mean().abs()) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_scale_heads_at_init_export_the_start_scales():
    for p in (_bounded_start(), load_params(official_path("00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"))):
        policy = DirichletPolicy(p)
        assert policy.scale_names == ("scale_dir", "scale_time")
        exported, table = policy.export().decoded(), p.decoded()
        for name in ("scale_dir", "scale_time"):
            start = torch.gather(getattr(table, name), -1, policy.order)
            assert torch.allclose(getattr(exported, name), start, atol=1e-6, rtol=0), name
            assert torch.allclose(policy.locs()[name].double(), torch.log(start), atol=1e-6, rtol=0)


def test_exported_scales_stay_inside_the_bounds():
    p = _bounded_start()
    policy = DirichletPolicy(p, scale_std=0.03)
    with torch.no_grad():
        # head outputs: 3 segments, 2 weights, then scale_dir and scale_time of the two (sorted) points
        # (in units of scale_std: 30 * 0.03 = 0.9 in log c)
        policy.head.bias[5] = 30.0  # scale_dir of point 0: median far above 1 + 0.05
        policy.head.bias[6] = -30.0  # scale_dir of point 1: median far below 1 - 0.05
        policy.head.bias[7:9] = -30.0  # both time scales far below 1 - 0.1
    table = policy.export().decoded()
    c, a = table.scale_dir, table.scale_time
    assert (c[:, 0] > 1.05 - 1e-6).all() and (c[:, 0] < 1.05).all()
    assert (c[:, 1] < 0.95 + 1e-6).all() and (c[:, 1] > 0.95).all()
    assert (a < 0.9 + 1e-6).all() and (a > 0.9).all()
    decoded = policy.decoded(policy.sample(3, torch.Generator().manual_seed(0)))
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731  (rollouts run on float32 samples)
    assert decoded.scale_dir.max() == f32(1.05) and decoded.scale_dir.min() == f32(0.95)
    assert torch.equal(decoded.scale_time, torch.full_like(decoded.scale_time, 0.9))


def test_bound_zero_or_heads_off_sample_no_scales():
    p = _bounded_start()
    on = DirichletPolicy(p)
    off = DirichletPolicy(p, scale_heads=False)
    fixed = DirichletPolicy(p.replace(scale_dir=0.0), scale_heads=True)
    assert off.scale_names == () and fixed.scale_names == ("scale_time",)
    t_on, t_off = (pol.sample(4, torch.Generator().manual_seed(2)) for pol in (on, off))
    t_fixed = fixed.sample(4, torch.Generator().manual_seed(2))
    assert t_off.scale_dir is None and t_off.scale_time is None and t_fixed.scale_dir is None
    # the Dirichlets are drawn first, so the heads do not change them for a seed
    assert torch.equal(t_on.segments, t_off.segments) and torch.equal(t_on.weights, t_off.weights)
    a_pos, a_w = off.alphas()
    expected = torch.distributions.Dirichlet(a_pos).log_prob(t_off.segments).sum(-1) + torch.distributions.Dirichlet(
        a_w
    ).log_prob(t_off.weights).sum(-1)
    assert torch.allclose(off.log_prob(t_off), expected, rtol=1e-6)
    exported = off.export().decoded()
    assert torch.allclose(exported.scale_dir, torch.gather(p.decoded().scale_dir, -1, off.order), atol=1e-6)


def test_policy_sampling_is_deterministic_for_a_seed():
    p = _bounded_start()
    policy = _perturbed(DirichletPolicy(p))
    a, b = (policy.sample(3, torch.Generator().manual_seed(9)) for _ in range(2))
    for name in ("segments", "weights", "scale_dir", "scale_time"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = policy.sample(3, torch.Generator().manual_seed(10))
    assert not torch.equal(a.scale_time, c.scale_time)


def test_rloo_hand_example():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv = rloo_advantages(r, 4, normalize=False)
    assert torch.allclose(adv, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    norm = rloo_advantages(r, 4)
    assert abs(float(norm.mean())) < 1e-6 and abs(float(norm.std()) - 1) < 1e-5
    two = rloo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, normalize=False)
    assert torch.equal(two, torch.tensor([-2.0, 2.0, 0.0, 0.0]))


def test_ppo_clip_hand_example():
    logp_old = torch.zeros(3)
    logp_new = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, 1.0, -2.0])
    # ratios 1.5 (clipped to 1.2 for A>0), 0.5 (min(0.5, 0.8) = 0.5), 1.1 with A<0: min(-2.2, -2.2)
    expected = -torch.tensor([1.2, 0.5, -2.2]).mean()
    assert torch.allclose(ppo_clip_loss(logp_new, logp_old, adv, 0.2), expected)
    # ratio 0.5 with A<0: the lower clip binds, min(-1.0, 0.8 * -2) = -1.6 (no case above reached it)
    assert torch.allclose(ppo_clip_loss(torch.log(torch.tensor([0.5])), torch.zeros(1), torch.tensor([-2.0]), 0.2),
                          torch.tensor(1.6))  # fmt: skip


def test_per_sample_tables_equal_the_solver():
    p = load_params(official_path("00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"))
    policy = DirichletPolicy(p)
    grid = make_schedule(p, sigma_min=0.002, sigma_max=80.0)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * grid[0]
    tables = policy.mean().map(lambda v: v.double().expand(3, -1, -1))
    exported = policy.export()
    got = sample(GM.denoise_ve, x, grid, p, table=policy.decoded(tables))
    assert torch.allclose(got, sample(GM.denoise_ve, x, grid, exported), rtol=1e-5, atol=1e-5)


def test_rdpo_improves_a_known_answer():
    """Reward = minus the error against the exact ODE endpoint; RDPO beats its start within a few iterations."""
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    new = _known_answer_run(start, lr=3e-3)
    assert new.metadata["rdpo"]["iterations"] == 25


def test_rdpo_with_scale_heads_improves_a_known_answer():
    """The same known answer from a table with learnable scales: the heads train, the result stays in bounds."""
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm",
                            scale_dir=0.05, scale_time=0.05)  # fmt: skip
    new = _known_answer_run(start, lr=1e-3)
    assert new.metadata["rdpo"]["scale_heads"] == ["scale_dir", "scale_time"]
    assert new.metadata["rdpo"]["scale_std"] == 0.02
    table = new.decoded()
    for c in (table.scale_dir, table.scale_time):
        assert not torch.allclose(c, torch.ones_like(c), atol=1e-4)  # the heads moved the scales
        assert float(c.min()) > 0.95 and float(c.max()) < 1.05


def _known_answer_run(start: EPDParams, lr: float) -> EPDParams:
    """25 RDPO iterations against the exact ODE endpoint; checks that the mean reward rises and that the exported
    table beats the start on 128 held-out noises."""
    grid = make_schedule(start)

    def exact(x0):
        return ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=120)

    config = RDPOConfig(iterations=25, groups=8, k=4, lr=lr, concentration=20.0, seed=0)
    new, curve = rdpo(GM.denoise_ve, start, GM.shape, config, reference=exact)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    x = torch.randn(128, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(77)) * grid[0]
    target = exact(x)

    def err(p):
        return float(((sample(GM.denoise_ve, x, grid, p) - target) ** 2).mean().sqrt())

    assert last > first, (first, last)
    assert math.isfinite(err(new)) and err(new) < err(start), (err(new), err(start))
    return new


@pytest.mark.parametrize("bounds", [(0.0, 0.0), (0.05, 0.1)])
def test_rdpo_is_deterministic_for_a_seed(bounds):
    start = EPDParams.start(3, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm",
                            scale_dir=bounds[0], scale_time=bounds[1])  # fmt: skip
    grid = make_schedule(start)

    def ref(x0):
        return ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=40)

    config = RDPOConfig(iterations=3, groups=2, k=2, seed=5)
    runs = [rdpo(GM.denoise_ve, start, GM.shape, config, reference=ref) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    for name in ("r_params", "weight_s", "scale_dir_params", "scale_time_params"):
        assert torch.equal(getattr(runs[0][0], name), getattr(runs[1][0], name)), name
    assert runs[0][0].metadata["rdpo"]["scale_heads"] == (["scale_dir", "scale_time"] if bounds[0] else [])


def test_rdpo_leaves_the_global_generators_as_it_found_them(monkeypatch):
    """The policy's seeded start touches no global generator: the CPU's comes back as it was, and a GPU's is never
    reseeded (``torch.manual_seed`` seeds every device's, and ``fork_rng(devices=[])`` restores only the CPU's)."""
    start = EPDParams.start(3, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    grid = make_schedule(start)
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    before = torch.get_rng_state()
    rdpo(GM.denoise_ve, start, GM.shape, RDPOConfig(iterations=1, groups=2, k=2, seed=5),
         reference=lambda x0: ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=10))  # fmt: skip
    assert seeded == [] and torch.equal(torch.get_rng_state(), before)


def test_an_interrupt_lands_between_ppo_minibatches_not_after_the_update():
    """At large group counts the PPO update is thousands of minibatches with no model call (2.4 s at the node's
    256 x 64): a stop pressed after an iteration's last model call must land inside that update."""
    start = _bounded_start()
    calls = []

    def counting(x, sigma):
        calls.append(len(x))
        return GM.denoise_ve(x, sigma)

    def reward(final, context):
        return -final.square().mean((1, 2, 3))

    config = RDPOConfig(iterations=2, groups=4, k=4, minibatch=2, seed=1)
    rdpo(counting, start, GM.shape, dataclasses.replace(config, iterations=1), reward=reward)
    per_iteration = len(calls)
    checks, done = [], []

    def stop_after_the_rollouts():
        checks.append(1)
        if len(checks) > per_iteration:
            raise InterruptedError

    with pytest.raises(InterruptedError):
        rdpo(counting, start, GM.shape, config, reward=reward, check_interrupt=stop_after_the_rollouts,
             progress=lambda it, total, r: done.append(it))  # fmt: skip
    assert done == [], "the stop waited for the whole PPO update"


def test_authors_preset_and_checks():
    a = RDPOConfig.authors()
    assert (a.grouping, a.learn_std, a.scale_std, a.width, a.blocks) == ("prompt", True, 0.05, 128, 2)
    assert (a.concentration, a.clip, a.lr, a.minibatch) == (20.0, 0.2, 7e-5, 4)  # cfgs/sd15.yaml
    assert RDPOConfig.authors(concentration=10.0).concentration == 10.0
    assert RDPOConfig().grouping == "noise" and not RDPOConfig().learn_std
    with pytest.raises(ValueError, match="grouping"):
        RDPOConfig(grouping="seed")
    with pytest.raises(ValueError, match="multiple of the number of prompts"):
        rdpo(GM.denoise_ve, _bounded_start(), GM.shape, RDPOConfig(groups=3), reward=lambda x, c: x.mean((1, 2, 3)),
             prompts=2)  # fmt: skip


@pytest.mark.parametrize("fcn", [False, True])
def test_learned_log_std_log_prob_and_kl_match_torch(fcn):
    """With ``fcn`` the last step's direction scales are fixed: their learned log-std moves neither the
    log-probability nor the KL (a KL over every entry passed every core test)."""
    p = _bounded_start(fcn=fcn)
    policy = DirichletPolicy(p, scale_std=0.05, learn_std=True)
    assert policy.head.out_features == (2 + 2 * 2) * p.num_points + 1
    stds = policy.stds()
    assert all(torch.allclose(v, torch.full_like(v, 0.05)) for v in stds.values())
    assert float(policy.kl_to_start().detach()) == pytest.approx(0.0, abs=1e-5)
    _perturbed(policy)
    stds, locs = policy.stds(), policy.locs()
    assert not torch.allclose(stds["scale_time"], torch.full_like(stds["scale_time"], 0.05))
    tables = policy.sample(5, torch.Generator().manual_seed(0))
    a_pos, a_w = policy.alphas()
    dist = torch.distributions
    expected = _torch_dirichlets(policy, tables)
    kl = dist.kl_divergence(dist.Dirichlet(a_pos), dist.Dirichlet(torch.exp(policy.log_base_pos))).sum()
    kl = kl + dist.kl_divergence(dist.Dirichlet(a_w), dist.Dirichlet(torch.exp(policy.log_base_w))).sum()
    for name in ("scale_dir", "scale_time"):
        learned = getattr(policy, f"{name}_mask")
        assert bool(learned.all()) != (fcn and name == "scale_dir")
        log_prob = dist.LogNormal(locs[name], stds[name]).log_prob(getattr(tables, name))
        expected = expected + log_prob[:, learned].sum(-1)
        start = dist.Normal(torch.log(getattr(policy, name)), 0.05)
        kl = kl + dist.kl_divergence(dist.Normal(locs[name], stds[name]), start)[learned].sum()
    assert torch.allclose(policy.log_prob(tables), expected, rtol=1e-5)
    assert (
        float(policy.kl_to_start().detach()) == pytest.approx(float(kl.detach()), rel=1e-4) and float(kl.detach()) > 0
    )


@pytest.mark.parametrize("grouping", ["noise", "prompt"])
def test_groups_share_a_prompt(grouping):
    """Rollout j has prompt j % prompts; a reward that only depends on the prompt gives zero leave-one-out
    advantages within every group, so the policy must not move; the noises follow the grouping."""
    start = _bounded_start(3)
    seen = []

    def by_prompt(final, context):
        seen.append(context.clone())
        return (torch.arange(len(final)) % 2).double() * 10.0

    den = lambda x, s: (seen.append(x.clone()), GM.denoise_ve(x, s))[1]  # noqa: E731
    config = RDPOConfig(iterations=3, groups=4, k=3, grouping=grouping, lr=1e-2, guard_every=0)
    new, _ = rdpo(den, start, GM.shape, config, reward=by_prompt, prompts=2)
    assert _same_results(new, start)
    x, context = seen[0], seen[-1]
    assert x.shape[0] == 12
    if grouping == "noise":
        assert torch.equal(context, torch.arange(12) % 4) and torch.equal(x[:4], x[4:8])
    else:
        assert torch.equal(context, torch.arange(12)) and not torch.allclose(x[:4], x[4:8])
    # the same reward with groups that mixed prompts would move the policy: check the test can fail
    moved, _ = rdpo(den, start, GM.shape, config, reward=lambda f, c: (torch.arange(len(f)) // 6).double(),
                    prompts=2)  # fmt: skip
    assert not _same_results(moved, start)


def test_rollouts_go_in_chunks_that_keep_each_rollouts_prompt(monkeypatch):
    """An iteration's rollouts go through the model in chunks (an interrupt lands within one chunk's call); a chunk
    starts at a multiple of the prompts, so a denoiser that tiles prompts over its batch, as ComfyUI does, answers
    each rollout with its own prompt and the run equals the unchunked one."""
    start = _bounded_start(3)
    sizes = []

    def tiled(x, sigma):  # row i answers for prompt i % 2
        sizes.append(len(x))
        prompt = (torch.arange(len(x), dtype=x.dtype) % 2).reshape(-1, 1, 1, 1)
        return GM.denoise_ve(x, sigma) * (1 + 0.2 * prompt)

    def reward(final, context):
        return -final.square().mean((1, 2, 3))

    config = RDPOConfig(iterations=2, groups=4, k=3, lr=1e-2, guard_every=0)
    whole, whole_curve = rdpo(tiled, start, GM.shape, config, reward=reward, prompts=2)
    assert set(sizes) == {12, 12 * start.num_points}
    sizes.clear()
    monkeypatch.setattr(rdpo_module, "ROLLOUT_CHUNK", 3)  # rounds up to 4, a multiple of the 2 prompts
    chunked, chunked_curve = rdpo(tiled, start, GM.shape, config, reward=reward, prompts=2)
    assert set(sizes) == {4, 4 * start.num_points}
    assert chunked_curve == pytest.approx(whole_curve, rel=1e-12)
    assert torch.allclose(chunked.r_params, whole.r_params, atol=1e-10)
    assert torch.allclose(chunked.weight_s, whole.weight_s, atol=1e-10)
    # the fidelity reward's teacher too, here over a noise per rollout (grouping "prompt")
    grid = make_schedule(start)

    def ref(x0):
        return ode_endpoint(tiled, x0, float(grid[0]), steps=4)

    config = dataclasses.replace(config, grouping="prompt")
    sizes.clear()
    chunked, chunked_curve = rdpo(tiled, start, GM.shape, config, reference=ref, prompts=2)
    assert sizes and max(sizes) <= 4 * start.num_points and max(sizes) % 2 == 0
    monkeypatch.setattr(rdpo_module, "ROLLOUT_CHUNK", 1024)
    sizes.clear()
    whole, whole_curve = rdpo(tiled, start, GM.shape, config, reference=ref, prompts=2)
    assert 12 in sizes
    assert chunked_curve == pytest.approx(whole_curve, rel=1e-12)
    assert torch.allclose(chunked.r_params, whole.r_params, atol=1e-10)


def test_chunks_cover_every_row_once_from_multiples_of_the_prompts(monkeypatch):
    """``_in_chunks`` returns every row once, in order, from slices that start at multiples of the prompts, whatever
    the remainder (a last chunk of one row was dropped and every core test passed: 12 rollouts in chunks of 4)."""
    monkeypatch.setattr(rdpo_module, "ROLLOUT_CHUNK", 3)
    for prompts in (1, 2, 3):
        for n in range(1, 15):
            starts = []

            def rows(i: slice, n: int = n, starts: list = starts) -> torch.Tensor:
                starts.append(i.start)
                return torch.arange(n)[i]

            assert torch.equal(_in_chunks(rows, n, prompts), torch.arange(n)), (prompts, n)
            assert all(a % prompts == 0 for a in starts)


def test_the_guard_checks_the_start_every_nth_iteration_and_the_last():
    every = lambda n, e: guard_iterations(RDPOConfig(iterations=n, guard_every=e))  # noqa: E731
    assert every(12, 5) == [0, 5, 10, 12] and every(10, 5) == [0, 5, 10]
    assert every(7, 0) == [0, 7] and every(3, 1) == [0, 1, 2, 3]


def _same_results(a: EPDParams, b: EPDParams) -> bool:
    grid = make_schedule(a)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[0]
    return torch.allclose(sample(GM.denoise_ve, x, grid, a), sample(GM.denoise_ve, x, grid, b), atol=1e-5)


@pytest.mark.parametrize("action", ["stop", "warn"])
def test_guard_stops_on_a_degrading_metric(action, caplog):
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    grid = make_schedule(start)
    calls = []

    def spread(final):  # any positive metric; it degrades after the first check
        calls.append(final.shape[0])
        return 1.0 if len(calls) == 1 else 1.2

    def ref(x0):
        return ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=40)

    config = RDPOConfig(iterations=6, groups=2, k=2, lr=1e-2, guard_every=2, guard_action=action)
    new, curve = rdpo(GM.denoise_ve, start, GM.shape, config, reference=ref, guard=spread, guard_samples=7, prompts=1)
    info = new.metadata["rdpo"]
    assert calls[0] == 7 and "guard metric rose from 1 to 1.2 at iteration 2" in caplog.text
    assert info["guard"][0] == {"iteration": 0, "kl": pytest.approx(0.0, abs=1e-5), "metric": 1.0}
    if action == "stop":
        assert info["stopped_at"] == 2 and len(curve) == 2
        assert _same_results(new, start)  # the last table that passed: the start
    else:
        assert (
            info["stopped_at"] is None and len(curve) == 6 and [c["iteration"] for c in info["guard"]] == [0, 2, 4, 6]
        )
        assert info["guard"][-1]["kl"] > 0 and not _same_results(new, start)


def test_rdpo_rolls_out_on_the_given_grid_and_drops_the_start_runs_metadata():
    """``grid``: the time points the model samples on (a model's shift moves them off the table's own schedule;
    RDPO trained on the table's own before). The exported table keeps what the start says it is, not what the start's
    own run recorded (its plugin base, reward, fallback)."""
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm",
                            metadata={"model": "m", "plugin_base": "dpmpp_2m", "reward_prompt": "old",
                                      "fallback": "objective global -> local"})  # fmt: skip
    grid = make_schedule(start) * torch.tensor([1.0, 0.9, 0.8, 1.0], dtype=torch.float64)
    seen: set[float] = set()

    def recording(x, sigma):
        seen.update(round(float(s), 9) for s in sigma.flatten())
        return GM.denoise_ve(x, sigma)

    config = RDPOConfig(iterations=1, groups=2, k=2, minibatch=2, width=8, blocks=1)
    table, _ = rdpo(recording, start, GM.shape, config, grid=grid,
                    reference=lambda x0: ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=8))  # fmt: skip
    assert {round(float(t), 9) for t in grid[:-1]} <= seen
    assert round(float(make_schedule(start)[1]), 9) not in seen
    assert table.metadata["trained_from"] == [{"model": "m"}]
    assert not {"plugin_base", "reward_prompt", "fallback", "model"} & set(table.metadata)
    with pytest.raises(ValueError, match="the grid has 3 points"):
        rdpo(GM.denoise_ve, start, GM.shape, config, grid=grid[:3], reference=lambda x0: x0)


def test_a_metric_below_zero_that_does_not_change_passes_the_guard():
    """The guard compared ``value <= first * 1.05``: for a negative metric that bound lies below the start's value,
    so an unchanged metric stopped the run at its first check."""
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    config = RDPOConfig(iterations=4, groups=2, k=2, guard_every=1)
    new, curve = rdpo(GM.denoise_ve, start, GM.shape, config, reference=lambda x0: x0, guard=lambda final: -1.0,
                      guard_samples=2)  # fmt: skip
    assert new.metadata["rdpo"]["stopped_at"] is None and len(curve) == 4


def test_a_learning_rate_far_too_high_neither_hangs_nor_crashes():
    """At lr 0.01 through the node the head overflowed: inf or NaN concentrations made the Gamma sampler loop forever
    (past ComfyUI's cancel) or torch raise its own constraint error. The head's outputs are bounded, a step with a
    non-finite gradient is skipped, and a concentration that is not a finite positive number is a clear error."""
    with pytest.raises(ValueError, match="policy diverged"):
        _dirichlet(torch.tensor([[1.0, math.inf]]), 2, torch.Generator().manual_seed(0))
    tiny, log_tiny = _dirichlet(
        torch.tensor([[1e-9, 1e-9, 1e-9]]), 64, torch.Generator().manual_seed(0)
    )  # all underflow
    assert torch.isfinite(tiny).all() and torch.allclose(tiny.sum(-1), torch.ones(64, 1, dtype=tiny.dtype))
    assert torch.isfinite(log_tiny).all()
    start = load_params("weights/demo/analytic-sd15-reference-nfe5-carry.safetensors")
    for seed in range(2):
        config = RDPOConfig(iterations=12, groups=4, k=2, lr=1.0, seed=seed)
        new, curve = rdpo(GM.denoise_ve, start, GM.shape, config, reference=lambda x0: x0)
        assert len(curve) == 12 and all(math.isfinite(c) for c in curve)
        assert torch.isfinite(new.r_params).all() and math.isfinite(new.metadata["rdpo"]["kl_to_start"])


def test_rollouts_end_as_the_start_was_fitted_to_end():
    """A table fitted with ``final_estimate`` (EPD Distill's default, sampled so by EPD KSampler's defaults) is
    rolled out, scored and guarded on its last step's estimate at sigma 0; RDPO ended every rollout at the grid's last
    point, trained the last step for an end the user never samples and made the table 3.6x worse as sampled."""
    start = load_params("weights/demo/analytic-sd15-reference-nfe5-carry.safetensors")
    assert start.metadata["distilled"]["final_estimate"]
    grid = make_schedule(start)
    seen = []

    def metric(final):
        seen.append(final)
        return 1.0

    config = RDPOConfig(iterations=1, groups=2, k=2, guard_every=1)
    new, _ = rdpo(GM.denoise_ve, start, GM.shape, config, reference=lambda x0: x0, guard=metric, guard_samples=4)
    noises = torch.randn((4, *GM.shape), generator=torch.Generator().manual_seed(2**31 - 2), dtype=torch.float64)
    x = noises * grid[0]
    estimate = sample(GM.denoise_ve, x, torch.cat([grid, grid.new_zeros(1)]), start, final="estimate")
    stopped = sample(GM.denoise_ve, x, grid, start)
    assert torch.allclose(seen[0], estimate, atol=1e-4) and not torch.allclose(seen[0], stopped, atol=1e-3)
    assert new.metadata["rdpo"]["final_estimate"] is True
    again, _ = rdpo(GM.denoise_ve, new, GM.shape, config, reference=lambda x0: x0)  # RDPO's table keeps its ending
    assert again.metadata["rdpo"]["final_estimate"] is True
    plain, _ = rdpo(GM.denoise_ve, start, GM.shape, config, reference=lambda x0: x0, final_estimate=False)
    assert plain.metadata["rdpo"]["final_estimate"] is False


def test_a_fidelity_run_is_guarded_by_its_held_out_fidelity():
    """RDPO with the fidelity reward made EPD Distill's table 2.5x worse as sampled, its own reward the only
    judge. With a reference and no guard, the mean table's fidelity on held-out noises guards the run: a run that
    makes the table worse stops with the last table that passed."""
    start = load_params("weights/demo/analytic-sd15-reference-nfe5-carry.safetensors")
    grid = make_schedule(start)

    def exact(x0):
        return ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=40)

    config = RDPOConfig(iterations=6, groups=4, k=2, lr=0.3, guard_every=2)
    new, curve = rdpo(GM.denoise_ve, start, GM.shape, config, reference=exact)
    info = new.metadata["rdpo"]
    assert info["guard_metric"] == "held_out_fidelity" and all("metric" in c for c in info["guard"])
    assert info["stopped_at"] is not None and _same_results(new, start)


def test_each_head_output_moves_its_own_parameter():
    """The head's outputs, in order: the K + 1 segment concentrations, the K weight concentrations, then per sampled
    scale the K log-normal locations in units of ``scale_std`` (``delta_c = scale_std * h``). Raising one output by
    ``e`` multiplies its own concentration by ``exp(e)`` (or moves its own location by ``scale_std * e``) and moves
    nothing else; a head read one column off, or a location moved by ``h`` itself, passed every core test."""
    p = _bounded_start()
    policy = DirichletPolicy(p, scale_std=0.03)
    k = p.num_points
    base = [v.detach().clone() for v in (*policy.alphas(), *policy.locs().values())]
    for j in range(policy.head.out_features):
        with torch.no_grad():
            policy.head.bias.zero_()
            policy.head.bias[j] = 0.5
        moved = [v.detach() for v in (*policy.alphas(), *policy.locs().values())]
        group = 0 if j <= k else 1 + (j - k - 1) // k
        col = j if j <= k else (j - k - 1) % k
        for g, (before, after) in enumerate(zip(base, moved, strict=True)):
            expected = before.clone()
            if g == group:
                expected[:, col] = before[:, col] * math.exp(0.5) if g < 2 else before[:, col] + 0.03 * 0.5
            assert torch.allclose(after, expected, rtol=1e-6, atol=1e-7), (j, g)
