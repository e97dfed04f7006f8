"""RDPO pieces on hand-checked examples, and a convergence test with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import official_path

from epd_core import EPDParams, GaussianMixture, load_params, make_schedule, sample
from epd_core.analytic import ode_endpoint
from epd_core.rdpo import DirichletPolicy, ppo_clip_loss, rdpo, rloo_advantages, sample_with_tables

GM = GaussianMixture.reference()


def test_log_prob_matches_torch_dirichlet():
    p = load_params(official_path("sd15-best.pkl"))
    policy = DirichletPolicy(p, concentration=20.0)
    seg, w = policy.sample(5, torch.Generator().manual_seed(0))
    a_pos, a_w = policy.alphas()
    expected = sum(
        torch.distributions.Dirichlet(a_pos[i]).log_prob(seg[:, i])
        + torch.distributions.Dirichlet(a_w[i]).log_prob(w[:, i])
        for i in range(policy.steps)
    )
    assert torch.allclose(policy.log_prob(seg, w), expected, rtol=1e-5)
    assert torch.allclose(seg.sum(-1), torch.ones(5, policy.steps), atol=1e-5)


@pytest.mark.parametrize("name", ["sd15-best.pkl", "00024-ffhq-6-9-ipndm-uni1.0-afs.pkl"])
def test_policy_mean_at_init_is_the_start_table(name):
    p = load_params(official_path(name))
    policy = DirichletPolicy(p, concentration=10.0)
    seg, w = policy.mean()
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


def test_per_sample_tables_equal_the_solver():
    p = load_params(official_path("00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"))
    policy = DirichletPolicy(p)
    grid = make_schedule(p, sigma_min=0.002, sigma_max=80.0)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * grid[0]
    seg, w = policy.mean()
    seg, w = seg.double().expand(3, -1, -1), w.double().expand(3, -1, -1)
    exported = policy.export()
    got = sample_with_tables(GM.denoise_ve, x, grid, p, policy.decoded(seg, w))
    assert torch.allclose(got, sample(GM.denoise_ve, x, grid, exported), rtol=1e-5, atol=1e-5)


def test_rdpo_improves_a_known_answer():
    """Reward = minus the error against the exact ODE endpoint; RDPO beats its start within a few iterations."""
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    grid = make_schedule(start)

    def exact(x0):
        return ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=120)

    new, curve = rdpo(GM.denoise_ve, start, GM.shape, reference=exact, iterations=25, groups=8, k=4,
                      lr=3e-3, concentration=20.0, seed=0)  # fmt: skip
    assert new.metadata["rdpo"]["iterations"] == 25
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    x = torch.randn(128, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(77)) * grid[0]
    target = exact(x)

    def err(p):
        return float(((sample(GM.denoise_ve, x, grid, p) - target) ** 2).mean().sqrt())

    assert last > first, (first, last)
    assert err(new) < err(start), (err(new), err(start))
    assert math.isfinite(err(new))


def test_rdpo_is_deterministic_for_a_seed():
    start = EPDParams.start(3, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    grid = make_schedule(start)

    def ref(x0):
        return ode_endpoint(GM.denoise_ve, x0, float(grid[0]), steps=40)

    runs = [rdpo(GM.denoise_ve, start, GM.shape, reference=ref, iterations=3, groups=2, k=2, seed=5) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][0].r_params, runs[1][0].r_params)
