"""The untrained start check: it ranks start grids as the exact answer does."""

from __future__ import annotations

import pytest
import torch

from epd_core import EPDParams, GaussianMixture, make_schedule, sample
from epd_core.analytic import ode_endpoint
from epd_core.config import DistillConfig
from epd_core.schedules import polynomial
from epd_core.starts import start_errors

pytestmark = pytest.mark.core

GM = GaussianMixture.reference()


def _starts() -> dict[str, tuple[EPDParams, torch.Tensor]]:
    """Two carry start tables between the same ends: the rho-7 grid, and a rho-2 one (poorer on a VE ODE)."""
    rho7 = EPDParams.start(6, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm", student="carry")
    grid = make_schedule(rho7)
    rho2 = polynomial(6, float(grid[-1]), float(grid[0]), 2.0)
    return {"rho-7": (rho7, grid), "rho-2": (rho7.replace(t_steps=rho2), rho2)}


def _exact_errors(starts, n: int) -> dict[str, float]:
    grid = next(iter(starts.values()))[1]
    x = torch.randn(n, *GM.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * grid[0]
    exact = ode_endpoint(GM.denoise_ve, x, float(grid[0]), steps=400, sigma_min=float(grid[-1]))
    return {k: float(((sample(GM.denoise_ve, x, g, p) - exact) ** 2).mean().sqrt()) for k, (p, g) in starts.items()}


def test_start_errors_rank_the_starts_as_the_exact_answer_does():
    """Against the teacher on the union of the grids the check's errors are the exact answer's, to within the
    sampling noise of two sets of 1,024 noises, and they order the two grids alike."""
    starts = _starts()
    checked = start_errors(GM.denoise_ve, starts, GM.shape, DistillConfig(teacher_m=3))
    exact = _exact_errors(starts, 1024)
    assert min(checked, key=checked.get) == min(exact, key=exact.get) == "rho-7"
    assert checked["rho-2"] > 2 * checked["rho-7"]
    for name in starts:
        assert checked[name] == pytest.approx(exact[name], rel=0.1)


def test_start_errors_are_deterministic_and_need_shared_ends():
    starts = _starts()
    config = DistillConfig(start_noises=32)
    assert start_errors(GM.denoise_ve, starts, GM.shape, config) == start_errors(GM.denoise_ve, starts, GM.shape,
                                                                                 config)  # fmt: skip
    table, grid = starts["rho-2"]
    shorter = grid.clone()
    shorter[-1] *= 2
    with pytest.raises(ValueError, match="share the first and last time point"):
        start_errors(GM.denoise_ve, {**starts, "other": (table.replace(t_steps=shorter), shorter)}, GM.shape, config)
    with pytest.raises(ValueError, match="start_noises >= 1"):  # 0 is the config's "no check", not a check of none
        start_errors(GM.denoise_ve, starts, GM.shape, DistillConfig(start_noises=0))


def test_start_errors_report_progress_and_stop_when_told():
    seen = []
    start_errors(GM.denoise_ve, _starts(), GM.shape, DistillConfig(start_noises=40), progress=lambda *a: seen.append(a))
    assert seen == [(16, 40), (32, 40), (40, 40)]

    def stop(done, total):
        raise InterruptedError

    with pytest.raises(InterruptedError):
        start_errors(GM.denoise_ve, _starts(), GM.shape, DistillConfig(start_noises=40), progress=stop)


def test_start_errors_do_not_depend_on_the_candidates_order():
    """The start check's teacher runs on the union of the candidates' grids; on the first candidate's alone it
    favoured whichever came first (at teacher_m 3 within the other tests' 10% tolerance)."""
    gm = GaussianMixture.reference()
    rho7 = EPDParams.start(6, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm", student="carry")
    grid = make_schedule(rho7)
    rho2 = polynomial(6, float(grid[-1]), float(grid[0]), 2.0)
    first = {"rho-7": (rho7, grid), "rho-2": (rho7.replace(t_steps=rho2), rho2)}
    config = DistillConfig(teacher_m=1, start_noises=64)
    ahead = start_errors(gm.denoise_ve, first, gm.shape, config)
    behind = start_errors(gm.denoise_ve, dict(reversed(list(first.items()))), gm.shape, config)
    assert all(ahead[name] == pytest.approx(behind[name], rel=1e-9) for name in first)


def test_start_errors_are_the_rms_over_the_noises_sampled():
    """The noises come in chunks of 16 (a multiple of the batch), so ``start_noises`` 5 samples the same 16 noises as
    16 does and reports the same errors: the RMS over the values sampled, not over the noises asked for (which passed
    every core test: the ranking does not change)."""
    starts = _starts()
    few, chunk = (start_errors(GM.denoise_ve, starts, GM.shape, DistillConfig(start_noises=n)) for n in (5, 16))
    assert few == pytest.approx(chunk, rel=1e-12)
