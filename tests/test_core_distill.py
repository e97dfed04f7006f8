"""Stage 1 distillation in the core: it learns, deterministically, safely."""

from __future__ import annotations

import dataclasses
import io
import math
from contextlib import redirect_stdout

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from epd_core import EPDParams, GaussianMixture, load_params, make_schedule, sample
from epd_core.__main__ import main as cli_main
from epd_core.analytic import ode_endpoint
from epd_core.config import DistillConfig, node_iterations, node_scale_bounds
from epd_core.distill import distill, loss_curve
from epd_core.objective import FD_STEP, distance, fd_step, recomputed, student_loss
from epd_core.params import TABLE_NAMES
from epd_core.selection import DIVERGED, HeldOutCheck, check_iterations
from epd_core.teachers import TEACHERS, subdivide, teacher_trajectory

pytestmark = pytest.mark.core

GM = GaussianMixture.reference()


def _start(**kw):
    hyper = dict(schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    hyper.update(kw)
    return EPDParams.start(4, 2, **hyper)


def _error(params, n=256):
    grid = make_schedule(params)
    x = torch.randn(n, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99)) * grid[0]
    exact = ode_endpoint(GM.denoise_ve, x, float(grid[0]), steps=400)
    return float(((sample(GM.denoise_ve, x, grid, params) - exact) ** 2).mean().sqrt())


@pytest.mark.parametrize("student,learn_grid", [("epd", False), ("ipndm", False), ("epd", True), ("carry", False)])
def test_distillation_reduces_loss_and_beats_start(student, learn_grid):
    start = _start(student=student, max_order=3, afs=student == "carry")
    config = DistillConfig(iterations=60, batch=32, teacher_m=4, learn_grid=learn_grid)
    p = distill(GM.denoise_ve, start, GM.shape, config)
    d = p.metadata["distilled"]
    assert d["final_loss"] < 0.5 * d["first_loss"]
    assert _error(p) < 0.8 * _error(start)
    assert (p.t_steps is not None) == learn_grid
    if learn_grid:
        assert torch.all(p.t_steps[1:] < p.t_steps[:-1])
        assert p.t_steps[0] == make_schedule(start)[0] and p.t_steps[-1] == make_schedule(start)[-1]
    curve = d["loss_curve"]  # the training curve: ten means, the first and last of them the reported losses
    assert len(curve) == 10 and curve[0] == d["first_loss"] and curve[-1] == d["final_loss"]
    assert min(curve) < curve[0]


def test_loss_curve_is_the_mean_of_each_tenth():
    history = [float(i) for i in range(20)]
    assert loss_curve(history) == [0.5 + 2 * j for j in range(10)]
    assert loss_curve([1.0, float("nan"), 3.0, float("inf")], parts=2) == [1.0, 3.0]  # a failed batch is left out
    short = loss_curve([4.0, 2.0, 6.0])  # fewer iterations than tenths: one mean per iteration
    assert short == [4.0, 2.0, 6.0]
    assert loss_curve([float("nan")] * 10)[0] != loss_curve([float("nan")] * 10)[0]  # NaN where a tenth has none


def test_robust_distance_is_the_squared_error_for_small_errors_and_bounds_an_outlier():
    """``robust=0`` is the mean squared error; ``robust=c`` the pseudo-Huber of each sample's error: equal to it for
    small errors, and an outlier sample's share of the gradient falls from nearly all to about half."""
    target = torch.zeros(8, 4, 3, dtype=torch.float64)
    x = torch.full_like(target, 1e-3)
    x[0] = 3.0  # one sample in the wrong mode
    x.requires_grad_(True)
    assert torch.allclose(distance(x, target), ((x - target) ** 2).mean(), rtol=1e-14, atol=0)
    small = torch.full_like(target, 1e-3)
    assert float(distance(small, target, 0.1)) == pytest.approx(1e-6, rel=1e-4)
    shares = []
    for robust in (0.0, 0.01):
        (grad,) = torch.autograd.grad(distance(x, target, robust), x)
        norms = grad.flatten(1).norm(dim=1)
        shares.append(float(norms[0] / norms.sum()))
    assert shares[0] > 0.99 and shares[1] < 0.65
    with pytest.raises(ValueError, match="robust"):
        DistillConfig(robust=-1.0)


def test_global_objective_backpropagates_through_the_trajectory():
    """With ``objective="global"`` only the final state is compared, and every step's table gets a gradient from it;
    the loss falls and the distilled table (flow form, with the flow AFS) beats the start on the exact answer."""
    start = EPDParams.start(4, 2, schedule_type="flowmatch", schedule_rho=1.0, backend="sd3", flowmatch_shift=3.0,
                            afs=True)  # fmt: skip
    grid = make_schedule(start)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = teacher_trajectory(GM.denoise_flow, x, subdivide(grid, 3))[::4]
    raw = {n: getattr(start, n).double().clone().requires_grad_(True) for n in TABLE_NAMES}
    loss, _ = student_loss(GM.denoise_flow, start, raw, grid, x, targets, DistillConfig(objective="global"))
    assert torch.allclose(loss, ((_ - targets[-1]) ** 2).mean())
    loss.backward()
    assert torch.all(raw["r_params"].grad.abs().sum(1) > 0)  # the first steps answer for the end result too
    config = DistillConfig(iterations=60, batch=32, teacher_m=4, objective="global")
    p = distill(GM.denoise_flow, start, GM.shape, config)
    d = p.metadata["distilled"]
    assert d["objective"] == "global" and d["final_loss"] < 0.85 * d["first_loss"]
    x = torch.randn(256, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    exact = teacher_trajectory(GM.denoise_flow, x, subdivide(grid, 40))[-1]

    def err(params):
        return float(((sample(GM.denoise_flow, x, grid, params) - exact) ** 2).mean().sqrt())

    assert err(p) < 0.8 * err(start)
    with pytest.raises(ValueError, match="objective"):
        DistillConfig(iterations=1, objective="global", gradient="fd")


def test_widening_a_trained_tables_scale_bounds_samples_as_before_then_learns_the_heads():
    """Fine-tuning with scale heads (``EPDParams.with_scale_bounds``, ``make_mnist_tables --scale-dir B``): a
    scale-free table given bounds samples exactly as before (zero heads decode to scales of 1), another bound on
    existing heads is refused, and a further run moves the heads and, from that same start, lowers the error more
    than the run without them."""
    start = EPDParams.start(4, 2, schedule_type="flowmatch", schedule_rho=1.0, backend="sd3", flowmatch_shift=3.0,
                            afs=True)  # fmt: skip
    first = distill(GM.denoise_flow, start, GM.shape, DistillConfig(iterations=40, batch=16, objective="global"))
    widened = first.with_scale_bounds(scale_dir=0.2, scale_time=0.1)
    assert widened.with_scale_bounds(scale_dir=0.2).scale_dir == 0.2  # the same bound again: allowed
    trained = widened.replace(scale_dir_params=widened.scale_dir_params + 0.5)
    with pytest.raises(ValueError, match="bounds scale_dir at 0.2"):
        widened.with_scale_bounds(scale_dir=0.3)  # as before this change: a bound is never replaced by another
    with pytest.raises(ValueError, match="bounds scale_dir at 0.2"):
        trained.with_scale_bounds(scale_dir=0.3)  # another bound would decode the same heads to other scales
    # raw heads under a bound of 0 are unused (some authors' tables store them): a new bound starts them at zero
    unused = trained.replace(scale_dir=0.0)
    assert not unused.has_scale_head("scale_dir") and unused.scale_dir_params.any()
    rebound = unused.with_scale_bounds(scale_dir=0.2)
    assert not rebound.scale_dir_params.any() and torch.equal(rebound.decoded().scale_dir, unused.decoded().scale_dir)
    grid = make_schedule(start)
    x = torch.randn(256, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    assert torch.equal(sample(GM.denoise_flow, x, grid, widened), sample(GM.denoise_flow, x, grid, first))
    exact = teacher_trajectory(GM.denoise_flow, x, subdivide(grid, 40))[-1]

    def err(params):
        return float(((sample(GM.denoise_flow, x, grid, params) - exact) ** 2).mean().sqrt())

    more = DistillConfig(iterations=40, batch=16, objective="global", seed=1, lr=0.003)
    with_heads = distill(GM.denoise_flow, widened, GM.shape, more)
    without = distill(GM.denoise_flow, first, GM.shape, more)
    decoded = with_heads.decoded()
    assert float((decoded.scale_dir - 1).abs().max()) > 1e-3 and float((decoded.scale_time - 1).abs().max()) > 1e-4
    assert torch.equal(without.decoded().scale_dir, torch.ones_like(decoded.scale_dir))
    assert err(with_heads) < err(without) < err(start)


def test_authors_objective_updates_after_every_step_through_the_undetached_rollout():
    """``objective="authors"``: one unclipped Adam step per student step (so an iteration of a 3-step table moves
    the table three times), each step's loss backpropagated through the rollout so far (the first step's row
    gets gradient from the later steps' losses); it learns, and its learning rate decays to the 0.01 floor."""
    start = _start(scale_time=0.05, scale_dir=0.05)
    grid = make_schedule(start)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * grid[0]
    targets = teacher_trajectory(GM.denoise_ve, x, subdivide(grid, 3))[::4]
    raw = {n: getattr(start, n).double().clone().requires_grad_(True) for n in TABLE_NAMES}
    config = DistillConfig(objective="authors")
    loss, end = student_loss(GM.denoise_ve, start, raw, grid, x, targets, config)
    local, _ = student_loss(GM.denoise_ve, start, raw, grid, x, targets, DistillConfig())
    assert torch.allclose(loss.detach(), local.detach())  # same forward pass: only the gradients differ
    end_loss = ((end - targets[-1]) ** 2).mean()
    end_loss.backward()
    assert float(raw["r_params"].grad[0].abs().sum()) > 0  # undetached: the last loss reaches the first step
    steps = []
    hook = register_optimizer_step_post_hook(lambda opt, *_: steps.append(opt))
    try:
        distill(GM.denoise_ve, start, GM.shape, DistillConfig(iterations=2, batch=4, objective="authors"))
        authors_steps = len(steps)
        distill(GM.denoise_ve, start, GM.shape, DistillConfig(iterations=2, batch=4))
    finally:
        hook.remove()
    assert (authors_steps, len(steps) - authors_steps) == (2 * 3, 2)
    p = distill(GM.denoise_ve, start, GM.shape, DistillConfig(iterations=60, batch=32, teacher_m=4, lr=0.05,
                                                             objective="authors"))  # fmt: skip
    d = p.metadata["distilled"]
    assert d["objective"] == "authors" and d["final_loss"] < 0.5 * d["first_loss"]
    assert _error(p) < 0.8 * _error(start)
    # their loop steps on the whole batch's rollout: a micro_batch is not applied, and the table does not claim it
    split = distill(GM.denoise_ve, start, GM.shape, DistillConfig(iterations=1, batch=4, objective="authors",
                                                                 micro_batch=1))  # fmt: skip
    assert split.metadata["distilled"]["micro_batch"] == 0


def test_deterministic_for_a_seed():
    a = distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=5, batch=8, seed=3))
    b = distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=5, batch=8, seed=3))
    c = distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=5, batch=8, seed=4))
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in TABLE_NAMES)
    assert not torch.equal(a.r_params, c.r_params)


@pytest.mark.parametrize("objective", ["global", "local"])
def test_micro_batches_give_the_whole_batch_gradient(objective):
    """Backpropagating 8 noises in chunks of 3, 3 and 2 (memory) trains the same table, learned grid included, as
    the whole batch at once; the authors' per-step loop is not split (it updates inside the rollout)."""
    start = _start(afs=True)
    config = DistillConfig(iterations=6, batch=8, objective=objective, learn_grid=True, final_estimate=True)
    whole = distill(GM.denoise_ve, start, GM.shape, config)
    parts = distill(GM.denoise_ve, start, GM.shape, dataclasses.replace(config, micro_batch=3))
    for name in (*TABLE_NAMES, "t_steps"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole.r_params, start.r_params.float()) and whole.t_steps is not None
    assert parts.metadata["distilled"]["micro_batch"] == 3


def test_grid_lr_moves_the_grid_alone():
    """``grid_lr`` is the grid's own learning rate: equal to ``lr`` it trains what ``grid_lr=0`` (lr) trains; tiny,
    the grid stays at its start while the tables learn as before (Adam's steps are per parameter)."""
    start = _start(afs=True)
    config = DistillConfig(iterations=6, batch=8, objective="global", learn_grid=True, final_estimate=True)
    same = distill(GM.denoise_ve, start, GM.shape, config)
    explicit = distill(GM.denoise_ve, start, GM.shape, dataclasses.replace(config, grid_lr=config.lr))
    frozen = distill(GM.denoise_ve, start, GM.shape, dataclasses.replace(config, grid_lr=1e-12))
    for name in (*TABLE_NAMES, "t_steps"):
        torch.testing.assert_close(getattr(explicit, name), getattr(same, name), rtol=1e-6, atol=1e-7)
    grid = make_schedule(start)
    torch.testing.assert_close(frozen.t_steps, grid, rtol=1e-9, atol=0)
    assert (same.t_steps - grid).abs().max() > 1e-3
    assert not torch.equal(frozen.r_params, start.r_params.float())
    with pytest.raises(ValueError, match="grid_lr"):
        DistillConfig(grid_lr=-1.0)


def test_recomputed_denoiser_gives_the_same_values_and_gradients():
    """Activation checkpointing of each model call: the same output and gradients (for the input, the time and the
    network's weights), the activations computed again in the backward pass."""
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return net(torch.cat([x, sigma[:, None]], 1))

    grads = []
    for wrap in (lambda d: d, recomputed):
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        sigma = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).requires_grad_()
        calls.clear()
        out = wrap(denoiser)(x, sigma)
        (out**2).sum().backward()
        grads.append([out.detach(), x.grad, sigma.grad, *(p.grad.clone() for p in net.parameters())])
        net.zero_grad()
        grads[-1].append(len(calls))
    *plain, plain_calls = grads[0]
    *again, again_calls = grads[1]
    for a, b in zip(plain, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert (plain_calls, again_calls) == (1, 2)
    with torch.no_grad():
        calls.clear()
        recomputed(denoiser)(x, sigma)
    assert len(calls) == 1


def _gradient_case():
    """A table off its start, a batch of noises on its grid and the teacher's states there."""
    start = _start(scale_time=0.05, scale_dir=0.05)
    g = torch.Generator().manual_seed(0)
    start = start.replace(r_params=start.r_params + 0.3 * torch.randn(3, 2, generator=g))
    grid = make_schedule(start)
    x = torch.randn(8, 4, 8, 8, dtype=torch.float64, generator=g) * grid[0]
    targets = teacher_trajectory(GM.denoise_ve, x, subdivide(grid, 3))[::4]
    return start, grid, x, targets


def test_finite_difference_gradients_match_autograd():
    start, grid, x, targets = _gradient_case()
    grads = {}
    for mode in ("autograd", "fd"):
        raw = {n: getattr(start, n).double().clone().requires_grad_(True) for n in TABLE_NAMES}
        loss, _ = student_loss(GM.denoise_ve, start, raw, grid, x, targets, DistillConfig(gradient=mode))
        loss.backward()
        grads[mode] = torch.cat([raw[n].grad.flatten() for n in TABLE_NAMES])
    rel = (grads["fd"] - grads["autograd"]).norm() / grads["autograd"].norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("teacher", TEACHERS)
def test_teachers_converge_to_the_exact_solution(teacher):
    grid = make_schedule(_start(), num_steps=200)
    x = torch.randn(16, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * grid[0]
    exact = ode_endpoint(GM.denoise_ve, x, float(grid[0]), steps=800, sigma_min=float(grid[-1]))
    end = teacher_trajectory(GM.denoise_ve, x, grid, teacher)[-1]
    # each scores about 1e-4; the bound was 2e-2, which Euler (5e-3) or a first-order dpmpp_2m passed
    assert float(((GM.denoise_ve(end, grid[-1:].expand(16)) - exact) ** 2).mean().sqrt()) < 1e-3


def test_each_teacher_step_is_its_formula():
    """One step of each teacher on an uneven grid, against its formula written out: dpm2's midpoint at the geometric
    mean of the two times (the authors'), Heun's second slope at the Euler prediction's time, and dpmpp_2m equal to
    the rule the plugin checks against ComfyUI (``bases._update``). A wrong midpoint or an inverted step ratio
    passed every other core test."""
    from epd_core import bases

    grid = torch.tensor([14.6, 6.0, 1.9, 0.35, 0.03], dtype=torch.float64)
    x = torch.randn(2, *GM.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * grid[0]

    def d(x, t):
        return (x - GM.denoise_ve(x, t.expand(x.shape[0]))) / t

    t, t_next = grid[0], grid[1]
    t_mid = (t * t_next).sqrt()
    dpm2 = x + (t_next - t) * d(x + (t_mid - t) * d(x, t), t_mid)
    heun = x + (t_next - t) * (d(x, t) + d(x + (t_next - t) * d(x, t), t_next)) / 2
    for teacher, expected in (("dpm2", dpm2), ("heun", heun)):
        assert torch.allclose(teacher_trajectory(GM.denoise_ve, x, grid[:2], teacher)[-1], expected, rtol=1e-12)
    states = teacher_trajectory(GM.denoise_ve, x, grid, "dpmpp_2m")
    answers = [GM.denoise_ve(s, t.expand(x.shape[0])) for s, t in zip(states, grid, strict=False)]
    for i in range(grid.shape[0] - 1):
        rule = bases._update("dpmpp_2m", grid.tolist(), i, states[i], answers[i], answers[i - 1 : i] if i else [])
        assert torch.allclose(states[i + 1], rule, rtol=1e-10, atol=1e-12), i


def test_an_unknown_teacher_is_refused_not_run_as_another():
    """``teacher_trajectory`` is public (``teacher_end``, the checks); a name it does not know is refused, where
    without its check it ran as dpmpp_2m and every core test passed."""
    grid = torch.tensor([14.6, 2.0, 0.03], dtype=torch.float64)
    x = torch.zeros(1, *GM.shape, dtype=torch.float64)
    for name in ("euler", "Heun", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match="teacher must be one of"):
            teacher_trajectory(GM.denoise_ve, x, grid, name)


def test_subdivide_inserts_points_log_uniformly():
    grid = torch.tensor([14.6, 2.0, 0.03], dtype=torch.float64)
    fine = subdivide(grid, 3)
    assert fine.shape == (9,) and torch.allclose(fine[::4], grid, rtol=1e-14)
    gaps = torch.diff(torch.log(fine)).reshape(2, 4)
    assert torch.allclose(gaps, gaps[:, :1].expand(2, 4), rtol=1e-12)


def test_the_snr_weighting_weighs_each_step_by_one_over_one_plus_t_squared():
    """``weighting="snr"`` (the bundled analytic and digits tables' recipe) had no test: a weight of 1 / (1 + t)
    passed every core test, as did one that ignored the final estimate's end at 0."""
    from epd_core.objective import Rollout

    p = EPDParams.start(4, 2, afs=False, schedule_type="polynomial", sigma_min=0.002, sigma_max=80.0)
    grid = make_schedule(p)
    x = torch.randn((3, *GM.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * grid[0]
    raw = {n: getattr(p, n).double() for n in TABLE_NAMES}
    for final_estimate in (False, True):
        targets = torch.stack([x * 0 + float(t) for t in [*grid, 0.0][: grid.shape[0] + final_estimate]])
        config = DistillConfig(objective="local", weighting="snr", final_estimate=final_estimate)
        snr, _ = student_loss(GM.denoise_ve, p, raw, grid, x, targets, config)
        uniform = dataclasses.replace(config, weighting="uniform")
        rollout = Rollout(GM.denoise_ve, p, raw, grid, x, uniform)
        ends = [*grid[1:].tolist()[:-1], 0.0 if final_estimate else float(grid[-1])]
        expected = sum(float(rollout.step(i, targets)) / (1 + t**2) for i, t in enumerate(ends))
        assert float(snr) == pytest.approx(expected, rel=1e-9), final_estimate


def test_nan_gradients_do_not_poison_the_table():
    """Non-finite gradient entries are zeroed; a loss that is never finite is refused, not saved as trained."""

    def flaky(x, sigma):
        out = GM.denoise_ve(x, sigma)
        if x.requires_grad or x.shape[0] > 8:  # the K points of a step
            out = out + (sigma.reshape(-1, 1, 1, 1) * float("nan")) * (sigma.reshape(-1, 1, 1, 1) < 1.0)
        return out

    def nan_gradient(x, sigma):  # the same answers, a NaN derivative (d sqrt(u) / du at u = 0, times 0)
        out = GM.denoise_ve(x, sigma)
        return out + torch.sqrt(0 * x) if x.requires_grad else out

    p = distill(nan_gradient, _start(), GM.shape, DistillConfig(iterations=5, batch=8))
    assert all(torch.isfinite(getattr(p, n)).all() for n in TABLE_NAMES)
    assert math.isfinite(p.metadata["distilled"]["final_loss"])
    with pytest.raises(ValueError, match="no iteration had a finite loss"):
        distill(flaky, _start(), GM.shape, DistillConfig(iterations=5, batch=8))


def test_progress_can_stop_and_nothing_is_returned():
    calls = []

    def progress(i, n, loss):
        calls.append(i)
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=50, batch=4), progress=progress)
    assert calls == [1, 2, 3]


@pytest.mark.parametrize("form", ["sd15", "flux"])
def test_cli_distill_writes_a_loadable_table(tmp_path, form):
    out = tmp_path / f"{form}.safetensors"
    argv = ["distill", "--form", form, "--steps", "3", "--iterations", "5", "--batch", "4", "--out", str(out)]
    with redirect_stdout(io.StringIO()) as buf:
        assert cli_main(argv) == 0
    p = load_params(out)
    assert "wrote" in buf.getvalue()
    assert p.metadata["command"] == "python -m epd_core " + " ".join(argv)
    assert p.is_flow == (form == "flux")


def test_bundled_tables_record_the_command_that_regenerates_them():
    """Each analytic table in weights/demo/ carries exactly the command scripts/make_weights.py runs for it."""
    from epd_dev import ROOT as root
    from scripts import make_weights

    demo = root / "weights" / "demo"
    assert set(make_weights.DISTILLED) == {p.name for p in demo.glob("analytic-*.safetensors")} - {make_weights.START}
    for name, args in make_weights.DISTILLED.items():
        command = load_params(root / "weights" / "demo" / name).metadata["command"]
        assert command == f"python -m epd_core distill {args} --out weights/demo/{name}", name


def test_bundled_tables_commands_fit_the_first_step_they_carry():
    """A bundled AFS table carries a data mean exactly where its recorded command fits one. The two-round tables
    were fitted before the mean-aware first step; their command without ``--no-afs-mean`` now fits a mean, so
    make_weights rebuilt another table than the one shipped (analytic-sd15-reference-nfe3 came back with an
    ``afs_mean`` and a grid 0.09 away)."""
    import argparse
    import shlex

    from epd_dev import ROOT as root
    from scripts import make_weights

    parser = argparse.ArgumentParser()
    parser.add_argument("--afs-mean", action=argparse.BooleanOptionalAction, default=DistillConfig().afs_mean)
    for name, args in make_weights.DISTILLED.items():
        table = load_params(root / "weights" / "demo" / name)
        fits_mean = parser.parse_known_args(shlex.split(args))[0].afs_mean
        assert not table.afs or (table.afs_mean is not None) == fits_mean, name


def test_make_weights_replaces_a_table_and_puts_it_back_when_the_run_fails(tmp_path):
    """Regenerating a bundled table replaces it (recording the command as the table test above expects); a run that
    fails leaves the old file in place and nothing beside it."""
    import subprocess

    from scripts import make_weights

    demo = tmp_path / "weights" / "demo"
    demo.mkdir(parents=True)
    old = (make_weights.ROOT / "weights" / "demo" / make_weights.START).read_bytes()
    (demo / "t.safetensors").write_bytes(old)
    with pytest.raises(subprocess.CalledProcessError):
        make_weights.distil("t.safetensors", "--form sd15 --iterations 0", root=tmp_path)
    assert (demo / "t.safetensors").read_bytes() == old and sorted(demo.iterdir()) == [demo / "t.safetensors"]
    args = "--form sd15 --steps 3 --points 1 --iterations 1 --batch 2 --teacher-m 1"
    make_weights.distil("t.safetensors", args, root=tmp_path)
    assert sorted(demo.iterdir()) == [demo / "t.safetensors"]
    table = load_params(demo / "t.safetensors")
    assert table.num_points == 1 and table.num_steps == 3
    assert table.metadata["command"] == f"python -m epd_core distill {args} --out weights/demo/t.safetensors"


@pytest.mark.parametrize("gradient", ["autograd", "fd"])
def test_final_estimate_trains_what_sampling_with_the_estimate_returns(gradient):
    """``final_estimate``: the student's last step is extended to sigma 0 exactly as ``sample(final="estimate")``
    does, its target is the teacher's denoised end, and the fitted table beats its start there."""
    start = _start()
    grid = make_schedule(start)
    zero = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(8, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * grid[0]
    raw = {n: getattr(start, n).double().clone() for n in TABLE_NAMES}
    targets = teacher_trajectory(GM.denoise_ve, x, grid)
    config = DistillConfig(gradient=gradient, final_estimate=True)
    _, end = student_loss(GM.denoise_ve, start, raw, grid, x, targets, config)
    assert torch.allclose(end, sample(GM.denoise_ve, x, zero, start, final="estimate"), rtol=1e-12, atol=1e-12)

    config = DistillConfig(iterations=60, batch=32, teacher_m=4, final_estimate=True, gradient=gradient)
    p = distill(GM.denoise_ve, start, GM.shape, config)
    assert p.metadata["distilled"]["final_estimate"] is True
    x = torch.randn(256, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99)) * grid[0]
    exact = GM.denoise_ve(ode_endpoint(GM.denoise_ve, x, float(grid[0]), steps=400), grid[-1:].expand(256))

    def err(table):
        return float(((sample(GM.denoise_ve, x, zero, table, final="estimate") - exact) ** 2).mean().sqrt())

    assert err(p) < 0.8 * err(start), (err(p), err(start))
    with pytest.raises(ValueError, match="plugin"):
        DistillConfig(iterations=1, final_estimate=True, plugin_base="dpmpp_2m")


def test_mean_aware_first_step_on_a_non_centred_mixture(tmp_path):
    """Real latents are not centred; the plain analytic first step assumes they are. Distillation estimates the
    per-channel data mean (``afs_mean``) and the table carries it through a file. On a flow model at t = 1 the
    denoiser returns the data mean, so with it the first step is exact where the plain one is off by the mean."""
    from epd_core import save_params
    from epd_core.solver import first_direction

    shift = torch.tensor([0.8, -0.6, 0.3, -0.9], dtype=torch.float64).reshape(1, 4, 1, 1)
    half = GM.means[:4]
    gm = GaussianMixture(torch.cat([half, -half]) + shift, torch.full((8,), 1 / 8, dtype=torch.float64), GM.std)
    start = EPDParams.start(3, 2, schedule_type="flowmatch", schedule_rho=1.0, backend="sd3", flowmatch_shift=3.0,
                            afs=True)  # fmt: skip
    config = dict(iterations=2, batch=16, teacher_m=1)
    aware = distill(gm.denoise_flow, start, gm.shape, DistillConfig(**config))
    plain = distill(gm.denoise_flow, start, gm.shape, DistillConfig(**config, afs_mean=False))
    assert plain.afs_mean is None and torch.allclose(aware.afs_mean, shift.flatten(), atol=1e-9)
    loaded = load_params(save_params(aware, tmp_path / "aware.safetensors"))
    assert torch.equal(loaded.afs_mean, aware.afs_mean) and loaded.hyper() == aware.hyper()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    one = torch.tensor(1.0, dtype=torch.float64)
    exact = first_direction(gm.denoise_flow, x, one, afs=False)
    assert torch.allclose(first_direction(gm.denoise_flow, x, one, True, True, loaded.afs_mean), exact, atol=1e-9)
    assert torch.allclose(first_direction(gm.denoise_flow, x, one, True, True) - exact, shift.expand_as(x))
    with pytest.raises(ValueError, match="4 channels"):
        first_direction(gm.denoise_flow, x[:, :3], one, True, True, loaded.afs_mean)
    with pytest.raises(ValueError, match="afs_mean"):
        aware.replace(afs_mean=torch.tensor([float("nan")]))


def test_distill_reports_teacher_and_student_errors_on_held_out_noises():
    """The table records how far its teacher (M points per step) and the table itself are from a twice-finer
    teacher on noises training never saw: a finer teacher is closer, and a trained table beats the start."""
    coarse = distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=1, batch=16, teacher_m=1))
    fine = distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=40, batch=16, teacher_m=6))
    c, f = coarse.metadata["distilled"], fine.metadata["distilled"]
    assert f["teacher_error"] < 0.5 * c["teacher_error"] and f["held_out_noises"] == 64
    assert f["student_error"] < c["student_error"]


@pytest.mark.parametrize("learn_grid,diverges", [(False, False), (True, True)])
def test_keep_best_replaces_a_diverged_table_by_the_best_checked_one(learn_grid, diverges):
    """A learning rate far too high: the held-out error rises after a while. Where the last check is more than
    DIVERGED times the best one the run ends with the best checked table, else with the last; either way the
    table's error is the recorded check's. The checks do not change the training: the same run without
    ``keep_best`` ends with the last table, and records no check."""
    kw = dict(iterations=20, batch=8, teacher_m=2, lr=1.0 if learn_grid else 0.3, objective="global",
              learn_grid=learn_grid)  # fmt: skip
    start = _start()
    kept = distill(GM.denoise_ve, start, GM.shape, DistillConfig(keep_best=32, **kw))
    last = distill(GM.denoise_ve, start, GM.shape, DistillConfig(**kw))
    record = kept.metadata["distilled"]["checks"]
    at, errors = record["iterations"], record["errors"]
    assert at == check_iterations(20) == list(range(0, 21, 2)) and record["noises"] == 32
    best = at[errors.index(min(errors))]
    assert 0 < best < 20 and (errors[-1] > DIVERGED * min(errors)) == diverges
    assert record["kept"] == (best if diverges else 20)
    check = HeldOutCheck(GM.denoise_ve, start, make_schedule(start), GM.shape, DistillConfig(keep_best=32, **kw),
                         torch.float64)  # fmt: skip
    grid = (lambda p: p.t_steps) if learn_grid else (lambda p: make_schedule(start))
    assert check(kept, grid(kept)) == pytest.approx(errors[at.index(record["kept"])], rel=1e-9)
    assert check(last, grid(last)) == pytest.approx(errors[-1], rel=1e-9)
    same = all(torch.equal(getattr(kept, name), getattr(last, name)) for name in TABLE_NAMES)
    assert same != diverges and "checks" not in last.metadata["distilled"]


def test_a_held_out_check_with_the_estimate_ending_scores_the_table_as_sampled():
    """With ``final_estimate`` the check samples a table as EPD KSampler does, on to sigma 0 on its last step's
    estimate, against the teacher's denoised end; sampling it to the grid's last point instead passed every core
    test (no keep_best test fitted the estimate ending)."""
    start = _start(sigma_min=0.05)
    grid = make_schedule(start)
    config = DistillConfig(keep_best=8, teacher_m=1, final_estimate=True)
    check = HeldOutCheck(GM.denoise_ve, start, grid, GM.shape, config, torch.float64)
    (x,), (target,) = check.noises, check.targets
    estimate = sample(GM.denoise_ve, x, torch.cat([grid, grid.new_zeros(1)]), start, final="estimate")
    assert check(start, grid) == pytest.approx(float((estimate - target).pow(2).mean().sqrt()), rel=1e-9)
    assert not torch.allclose(estimate, sample(GM.denoise_ve, x, grid, start), atol=1e-2)  # the ending matters here


def test_keep_best_ends_with_the_start_when_training_only_makes_it_worse():
    """Fine-tuning a trained table with a destructive learning rate: every check is worse than the start and the
    last one diverged, so the run ends with the start's table, unchanged."""
    good = distill(GM.denoise_ve, _start(), GM.shape, DistillConfig(iterations=20, batch=8, teacher_m=2, lr=0.3,
                                                                      objective="global"))  # fmt: skip
    p = distill(GM.denoise_ve, good, GM.shape, DistillConfig(iterations=10, batch=8, teacher_m=2, lr=10.0,
                                                               keep_best=32, objective="global"))  # fmt: skip
    record = p.metadata["distilled"]["checks"]
    assert record["kept"] == 0 and min(record["errors"][1:]) > record["errors"][0]
    assert all(torch.equal(getattr(p, name), getattr(good, name)) for name in TABLE_NAMES)


def test_keep_best_is_off_where_the_rms_error_is_not_the_objective():
    """With a feature loss or for a plugin table the run keeps its last table and records no check."""
    config = DistillConfig(iterations=2, batch=4, teacher_m=1, keep_best=8)
    featured = distill(GM.denoise_ve, _start(), GM.shape, config, feature_loss=lambda a, b: ((a - b) ** 2).mean())
    plugin = distill(GM.denoise_ve, _start(), GM.shape, dataclasses.replace(config, plugin_base="dpmpp_2m"))
    assert "checks" not in featured.metadata["distilled"] and "checks" not in plugin.metadata["distilled"]


@pytest.mark.parametrize("objective", ["local", "global"])
def test_a_run_without_one_finite_loss_is_refused_not_saved_as_trained(objective):
    """Non-finite losses are skipped (a rare sample); when every one was (a NaN feature weight, an encoder or
    student points answering NaN), the run returned its start untouched as a trained table."""
    config = DistillConfig(iterations=2, batch=2, teacher_m=1, objective=objective,
                           gradient="autograd" if objective == "global" else "fd")  # fmt: skip
    with pytest.raises(ValueError, match="no iteration had a finite loss"):
        distill(GM.denoise_ve, _start(), GM.shape, config, feature_loss=lambda a, b: a.sum() * math.nan)
    half = {"calls": 0}

    def sometimes(a, b):  # every other iteration finite: the run trains and ends normally
        half["calls"] += 1
        return ((a - b) ** 2).mean() * (1.0 if half["calls"] % 2 else math.nan)

    assert distill(GM.denoise_ve, _start(), GM.shape, config, feature_loss=sometimes).nfe == _start().nfe


def test_a_table_distilled_from_another_keeps_what_it_is_not_how_the_other_was_run():
    """The start's plugin base (which changes how EPD Plugin places the points), fallback, prompts and training
    record described the start's own run; the new table drops them. Where the start came from (its model, command,
    download) moves to ``trained_from``: a table fine-tuned from a catalogue table on another model claimed that
    model and catalogue entry, and EPD Parameters Loader said it was made for the authors' models."""
    gm = GaussianMixture.reference()
    source = {"model": "m", "command": "c0", "catalogue_entry": "tpami-sd15-best", "source_file": "sd15.pkl"}
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm",
                            metadata={**source, "plugin_base": "dpmpp_2m", "prompts": 3, "fallback": "x",
                                      "distilled": {"iterations": 9}, "note": "kept"})  # fmt: skip
    config = DistillConfig(iterations=1, batch=2, teacher_m=1)
    table = distill(gm.denoise_ve, start, gm.shape, config, metadata={"command": "c1"})
    assert table.metadata["distilled"]["iterations"] == 1 and table.metadata["note"] == "kept"
    assert not {"plugin_base", "prompts", "fallback", "model", "catalogue_entry", "source_file"} & set(table.metadata)
    assert table.metadata["command"] == "c1" and table.metadata["trained_from"] == [source]
    again = distill(gm.denoise_ve, table, gm.shape, config, metadata={"model": "m2"})
    assert again.metadata["model"] == "m2" and again.metadata["trained_from"] == [{"command": "c1"}, source]


def test_the_recorded_held_out_error_scores_the_table_as_it_is_sampled():
    """With ``final_estimate`` (the node's default) a table ends at sigma 0 on its last step's estimate; the
    recorded ``student_error`` compared the state at the last grid point instead (14% off on this mixture)."""
    from epd_core.distill import HELD_OUT
    from epd_core.starts import held_out_noises
    from epd_core.teachers import subdivide, teacher_trajectory

    gm = GaussianMixture.reference()
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm", sigma_min=0.0292,
                            sigma_max=14.6)  # fmt: skip
    config = DistillConfig(iterations=2, batch=4, teacher_m=1, final_estimate=True, learn_grid=False)
    table = distill(gm.denoise_ve, start, gm.shape, config)
    grid = make_schedule(table)
    sigmas = torch.cat([grid, torch.zeros(1, dtype=grid.dtype)])
    squared, euler_squared, count = 0.0, 0.0, 0
    for x in held_out_noises(config, 2, HELD_OUT, gm.shape, False, grid[0], torch.float64):
        fine = teacher_trajectory(gm.denoise_ve, x, subdivide(grid, 2 * config.teacher_m + 1), config.teacher)[-1]
        fine = gm.denoise_ve(fine, grid[-1].expand(x.shape[0]))
        end = sample(gm.denoise_ve, x, sigmas, table, final="estimate")
        squared += float(((end - fine) ** 2).sum())
        euler = x
        for t_cur, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):  # Euler on the table's points, then to 0
            euler = euler + (t_next - t_cur) * (euler - gm.denoise_ve(euler, t_cur.expand(x.shape[0]))) / t_cur
        euler_squared += float(((euler - fine) ** 2).sum())
        count += x.numel()
    assert table.metadata["distilled"]["student_error"] == pytest.approx((squared / count) ** 0.5, rel=1e-9)
    assert table.metadata["distilled"]["euler_error"] == pytest.approx((euler_squared / count) ** 0.5, rel=1e-9)


def test_a_table_worse_than_euler_on_its_own_points_is_recorded_so():
    """EPD Distill with student epd at NFE 2 (one step of one point, at the geometric midpoint of sigma 14.6 to 0.03)
    and a short budget saved a table 11x further from the truth than one Euler step, and said nothing: the midpoint's
    direction, applied over the whole step, overshoots by about (14.6 - 0.03) / 0.66. The held-out check now
    measures Euler along the table's own points, which the node's info compares."""
    gm = GaussianMixture.reference()
    hyper = dict(schedule_type="polynomial", schedule_rho=7.0, backend="edm", sigma_min=0.0292, sigma_max=14.6)
    broken = distill(gm.denoise_ve, EPDParams.start(2, 1, **hyper), gm.shape, DistillConfig(iterations=1, batch=2,
                     teacher_m=1)).metadata["distilled"]  # fmt: skip
    assert broken["student_error"] > 5 * broken["euler_error"]
    sound = distill(gm.denoise_ve, EPDParams.start(6, 2, **hyper), gm.shape, DistillConfig(iterations=40, batch=16,
                    teacher_m=2)).metadata["distilled"]  # fmt: skip
    assert sound["student_error"] < 0.5 * sound["euler_error"]


def test_a_seed_at_the_top_of_the_nodes_range_trains():
    """The node's seed goes up to 2^64 - 1; the held-out and training streams, seeded ``seed + k``, overflowed."""
    gm = GaussianMixture.reference()
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm")
    config = DistillConfig(iterations=1, batch=2, teacher_m=1, seed=2**64 - 1, keep_best=4)
    assert distill(gm.denoise_ve, start, gm.shape, config).metadata["distilled"]["seed"] == 2**64 - 1


def test_a_plugin_table_as_the_start_is_measured_as_it_is_trained_and_saved():
    """A table distilled for EPD Plugin over deis, fine-tuned by a plain run: the run fits Euler's placement and the
    saved table drops the start's plugin_base, but the held-out error and keep_best sampled the deis placement (the
    info said 0.005 for a table that samples at 0.021)."""
    from epd_core.distill import held_out_errors

    gm = GaussianMixture.reference()
    plain = EPDParams.start(5, 2, afs=True)
    start = plain.replace(metadata={"plugin_base": "deis"})
    config = DistillConfig(iterations=2, batch=4, keep_best=8)
    fitted = distill(gm.denoise_ve, start, gm.shape, config)
    assert "plugin_base" not in fitted.metadata
    measured = held_out_errors(gm.denoise_ve, fitted, make_schedule(fitted), gm.shape, config, torch.float64)
    assert fitted.metadata["distilled"]["student_error"] == pytest.approx(measured["student_error"], rel=1e-9)
    assert torch.equal(fitted.r_params, distill(gm.denoise_ve, plain, gm.shape, config).r_params)


@pytest.mark.parametrize("band", [(5.0, 1e9), (0.5, 3.0)])
def test_a_model_answering_nan_stops_the_run_with_what_happened(band):
    """A model that returns NaN (a float16 model overflowing) in a band of sigmas: at sigma_max the error was about
    afs_mean, a field the user never set; lower down every step was skipped and the untrained start was saved as
    trained."""
    gm = GaussianMixture.reference()
    lo, hi = band

    def broken(x, sigma):
        out = gm.denoise_ve(x, sigma)
        inside = ((sigma > lo) & (sigma < hi)).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(inside, torch.full_like(out, float("nan")), out)

    with pytest.raises(ValueError, match="the model returned non-finite values .*float16"):
        distill(broken, EPDParams.start(5, 2, afs=True), gm.shape, DistillConfig(iterations=3, batch=2))


def test_epd_distills_auto_settings_follow_the_nfe_as_documented():
    """EPD Distill's defaults as functions of the NFE (README, "Iterations by the NFE" and "Scale heads by the NFE"):
    1,600 iterations from NFE 10 on and 16,000 / NFE below; every point's scales learned within 1 +- 0.2 (direction)
    and 1 +- 0.1 (time) up to NFE 7, no heads above; a teacher with M = 7. No core test checked them."""
    for nfe in range(1, 31):
        expected = 1600 if nfe >= 10 else 16000 / nfe
        assert node_iterations(nfe) == pytest.approx(expected, abs=0.5), nfe
        heads = {"scale_dir": 0.2, "scale_time": 0.1} if nfe <= 7 else {"scale_dir": 0.0, "scale_time": 0.0}
        assert node_scale_bounds(nfe) == heads, nfe
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        node_iterations(0)
    assert DistillConfig.node_default("teacher_m") == 7 and DistillConfig.default("teacher_m") == 3


def test_finite_differences_of_a_half_precision_model_take_a_step_its_rounding_allows():
    """A model computing in bfloat16 answers to about 3 significant digits: the float32 step (1e-3 of the noise level)
    differences its rounding, so training's per-step objective got gradients 40% off here (13x their size on the
    MNIST UNet in bfloat16)."""
    start, grid, x, targets = _gradient_case()

    def rounded(x, sigma):  # as a model computing in bfloat16 (ComfyUI casts its input and answer)
        return GM.denoise_ve(x.bfloat16().to(x.dtype), sigma).bfloat16().to(x.dtype)

    def grad(denoiser, mode, step=FD_STEP):
        raw = {n: getattr(start, n).double().clone().requires_grad_(True) for n in TABLE_NAMES}
        loss, _ = student_loss(denoiser, start, raw, grid, x, targets, DistillConfig(gradient=mode), fd_step=step)
        loss.backward()
        return torch.cat([raw[n].grad.flatten() for n in TABLE_NAMES])

    exact = grad(GM.denoise_ve, "autograd")
    assert fd_step(torch.float32) == fd_step(torch.float64) == FD_STEP
    errors = {step: float((grad(rounded, "fd", step) - exact).norm() / exact.norm())
              for step in (FD_STEP, fd_step(torch.bfloat16))}  # fmt: skip
    assert errors[fd_step(torch.bfloat16)] < 0.1 and errors[FD_STEP] > 3 * errors[fd_step(torch.bfloat16)], errors
