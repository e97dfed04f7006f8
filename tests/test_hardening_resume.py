"""Long runs: interrupts inside the teacher pass and the rollouts, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from epd_core import EPDParams, GaussianMixture, load_params, make_schedule, save_params
from epd_core.analytic import ode_endpoint
from epd_core.checkpoint import CheckpointMismatch
from epd_core.config import DistillConfig, RDPOConfig
from epd_core.distill import distill
from epd_core.rdpo import GUARD_SEED, rdpo
from epd_dev import ROOT
from epd_dev.tables import assert_tables_close

pytestmark = pytest.mark.core


class Stop(Exception):
    pass


def _slow(den, delay: float):
    def call(x, sigma):
        time.sleep(delay)
        return den(x, sigma)

    return call


def test_an_interrupt_lands_inside_the_teacher_pass():
    """One iteration has ~200 model calls of 10 ms; the interrupt is honoured within one call, not after the
    iteration."""
    gm = GaussianMixture.reference()
    start = EPDParams.start(6, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm")
    den = _slow(gm.denoise_ve, 0.01)
    pressed = []

    def check() -> None:
        if pressed and time.monotonic() > pressed[0]:
            raise Stop

    def progress(i, n, loss):
        pressed.append(time.monotonic())  # pressed right after the first iteration: the second is in flight

    with pytest.raises(Stop):
        distill(
            den,
            start,
            gm.shape,
            DistillConfig(iterations=5, batch=2, teacher_m=32),
            progress=progress,
            check_interrupt=check,
        )
    late = time.monotonic() - pressed[0]
    print(f"\ndistill: stopped {late:.3f} s after the interrupt (one iteration ~{6 * 34 * 0.01:.1f} s)")
    assert late < 0.5, late


def test_an_interrupt_lands_inside_the_rollouts():
    """Pressed 0.3 s after the first model call (before it, a process's first Adam imports torch._dynamo, seconds
    of torch's own), the stop lands within one call of 0.15 s, not at the end of the iteration's rollouts (~1.5 s)."""
    gm = GaussianMixture.reference()
    start = load_params(ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe10.safetensors")
    slow, first_call = _slow(gm.denoise_ve, 0.15), []

    def den(x, sigma):
        if not first_call:
            first_call.append(time.monotonic())
        return slow(x, sigma)

    def check() -> None:
        if first_call and time.monotonic() > first_call[0] + 0.3:
            raise Stop

    def reward(final, context):
        return -final.flatten(1).pow(2).mean(1)

    with pytest.raises(Stop):
        rdpo(den, start, gm.shape, RDPOConfig(iterations=3, groups=2, k=2), reward=reward, check_interrupt=check)
    late = time.monotonic() - first_call[0] - 0.3
    print(f"\nrdpo: stopped {late:.3f} s after the interrupt")
    assert late < 0.5, late


@pytest.mark.parametrize("keep_best", [0, 8])
def test_resume_in_process_equals_an_uninterrupted_run_and_refuses_other_runs(tmp_path, keep_best):
    """Also with the held-out checks of ``keep_best``: the best table so far and the checks are in the checkpoint."""
    gm = GaussianMixture.reference()
    start = EPDParams.start(4, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm", scale_time=0.1)
    config = DistillConfig(iterations=9, batch=4, teacher_m=1, seed=5, learn_grid=True, keep_best=keep_best)
    kw = {"config": config}
    ref = distill(gm.denoise_ve, start, gm.shape, **kw)
    ck = tmp_path / "run.ckpt"

    def stop_at_7(i, n, loss):
        if i == 7:
            raise Stop

    with pytest.raises(Stop):
        distill(gm.denoise_ve, start, gm.shape, progress=stop_at_7, checkpoint=ck, checkpoint_every=3, **kw)
    seen = []
    got = distill(gm.denoise_ve, start, gm.shape, checkpoint=ck, checkpoint_every=3,
                  progress=lambda i, n, loss: seen.append(i), **kw)  # fmt: skip
    assert seen[0] == 6 and seen[1:] == [7, 8, 9]  # resumed from the checkpoint after iteration 6
    assert_tables_close(got, ref)
    assert torch.equal(got.t_steps, ref.t_steps)
    assert got.metadata["distilled"] == ref.metadata["distilled"]
    with pytest.raises(CheckpointMismatch, match="another run"):
        distill(gm.denoise_ve, start, gm.shape, DistillConfig(iterations=9, batch=4, teacher_m=1, seed=6,
                learn_grid=True), checkpoint=ck)  # fmt: skip
    with pytest.raises(CheckpointMismatch, match="another model"):
        distill(lambda x, s: gm.denoise_ve(x, s) * 1.1, start, gm.shape, checkpoint=ck, checkpoint_every=3, **kw)
    ck.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointMismatch, match="unreadable"):
        distill(gm.denoise_ve, start, gm.shape, checkpoint=ck, **kw)
    _checkpoint_edited(gm, start, ck, kw)


def test_rdpo_resumed_after_a_failing_state_stops_as_an_uninterrupted_run(tmp_path):
    """The guard's checks and its last passing policy are in the checkpoint: a run resumed from a state the guard
    would refuse ends where the uninterrupted run ends, with its table and its checks (it used to keep the resumed,
    refused state as its "last good" one and end with it)."""
    gm = GaussianMixture.reference()
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm", afs=True)
    grid = make_schedule(start)
    noises = torch.randn((8, *gm.shape), generator=torch.Generator().manual_seed(GUARD_SEED), dtype=torch.float64)
    answer = ode_endpoint(gm.denoise_ve, noises * grid[0], float(grid[0]), steps=60)

    def closeness(final):  # rises as the table learns: a guard that refuses what the reward wants
        return 1 / float((final - answer).pow(2).mean().sqrt())

    def reference(x0):
        return ode_endpoint(gm.denoise_ve, x0, float(grid[0]), steps=60)

    def run(config, **kw):
        return rdpo(gm.denoise_ve, start, gm.shape, config, reference=reference, guard=closeness, guard_samples=8, **kw)

    base = RDPOConfig(iterations=12, groups=4, k=4, minibatch=8, lr=3e-3, guard_every=1, guard_action="warn")
    metric = [c["metric"] for c in run(base)[0].metadata["rdpo"]["guard"]]  # the guard draws no training noise
    assert metric[2] < min(metric[3], metric[4])  # a threshold passes iteration 2 and refuses iterations 3 and 4
    threshold = (metric[2] + min(metric[3], metric[4])) / 2
    config = dataclasses.replace(base, guard_every=2, guard_action="stop", guard_tolerance=threshold / metric[0] - 1)
    ref, ref_curve = run(config)
    assert ref.metadata["rdpo"]["stopped_at"] == 4

    ck = tmp_path / "rdpo.ckpt"

    def stop_at_4(i, n, reward):
        if i == 4:
            raise Stop

    with pytest.raises(Stop):
        run(config, progress=stop_at_4, checkpoint=ck, checkpoint_every=3)
    got, curve = run(config, checkpoint=ck, checkpoint_every=3)  # resumed after iteration 3, refused by the guard
    assert curve == ref_curve
    assert_tables_close(got, ref)
    assert got.metadata["rdpo"] == ref.metadata["rdpo"]


def _checkpoint_edited(gm, start, ck, kw) -> None:
    """A checkpoint whose JSON parses but is not what a run wrote (a list for the config, a state whose optimizer
    entries point past the parameters, a scheduler attribute the run does not have, a learning rate in text): refused
    as a mismatch naming the file, never another exception or a run that fails later."""
    import json
    import struct

    from safetensors.torch import load_file, save_file

    ck.unlink()
    with pytest.raises(Stop):
        distill(gm.denoise_ve, start, gm.shape, progress=_stop_at(4), checkpoint=ck, checkpoint_every=3, **kw)
    n = struct.unpack("<Q", ck.read_bytes()[:8])[0]
    meta = json.loads(ck.read_bytes()[8 : 8 + n])["__metadata__"]
    tensors = load_file(str(ck))
    state = json.loads(meta["state"])
    for edited in ({**meta, "config": "[1, 2]"},
                   {**meta, "state": json.dumps({**state, "opt_keys": {"99": ["exp_avg"]}})},
                   {**meta, "state": json.dumps({**state, "opt_keys": ["not", "a", "mapping"]})},
                   {**meta, "state": json.dumps({**state, "scheduler": {**state["scheduler"], "step": "x"}})},
                   {**meta, "state": json.dumps({**state, "param_groups": [{**state["param_groups"][0],
                                                                           "lr": "0.1"}]})},
                   {**meta, "curve": "[]"},  # iteration 3 with no losses
                   {**meta, "iteration": "9", "curve": json.dumps([0.1] * 9)}):  # fmt: skip  # a finished run's
        save_file(tensors, str(ck), metadata=edited)
        with pytest.raises(CheckpointMismatch, match=str(ck)):
            distill(gm.denoise_ve, start, gm.shape, checkpoint=ck, **kw)
    moment = next(name for name in tensors if name.startswith("opt.") and name.endswith(".exp_avg"))
    save_file({**tensors, moment: torch.zeros(3)}, str(ck), metadata=meta)  # Adam's moment of another shape
    with pytest.raises(CheckpointMismatch, match=str(ck)):
        distill(gm.denoise_ve, start, gm.shape, checkpoint=ck, **kw)


def _prompted(offsets: list[float], below: float = 0.0):
    """A denoiser that tiles ``len(offsets)`` prompts over its batch (sample ``j`` has prompt ``j % C``, as ComfyUI
    tiles a conditioning batch) and adds prompt ``c``'s offset to its answer at noise levels below ``below`` (0: at
    every level; a prompt that only the late steps see, like ComfyUI's timestep ranges)."""
    gm = GaussianMixture.reference()

    def denoiser(x, sigma):
        shift = torch.tensor([offsets[j % len(offsets)] for j in range(x.shape[0])], dtype=x.dtype)
        seen = (sigma < below) if below else torch.ones_like(sigma, dtype=torch.bool)
        return gm.denoise_ve(x, sigma) + (shift * seen).reshape(-1, 1, 1, 1)

    return denoiser


@pytest.mark.parametrize("case", ["second prompt", "late prompt"])
def test_a_checkpoint_of_other_prompts_is_not_resumed(tmp_path, case):
    """The probe asks every prompt of a conditioning batch at every grid point: a checkpoint made with another second
    prompt, or another prompt for the late steps only, is refused (it used to ask prompt 0 at sigma max only)."""
    gm = GaussianMixture.reference()
    start = EPDParams.start(4, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm")
    config = DistillConfig(iterations=4, batch=2, teacher_m=1)
    before, after = ([0.0, 0.1], [0.0, 0.3]) if case == "second prompt" else ([0.2], [0.4])
    below = 1.0 if case == "late prompt" else 0.0
    ck = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        distill(_prompted(before, below), start, gm.shape, config, prompts=len(before), progress=_stop_at(3),
                checkpoint=ck, checkpoint_every=2)  # fmt: skip
    with pytest.raises(CheckpointMismatch, match="another model, conditioning"):
        distill(_prompted(after, below), start, gm.shape, config, prompts=len(after), checkpoint=ck)
    distill(_prompted(before, below), start, gm.shape, config, prompts=len(before), checkpoint=ck)  # its own run


def test_a_checkpoint_of_other_settings_the_run_cannot_see_is_not_resumed(tmp_path):
    """A run resumes only with the same caller key (settings outside the config: a feature loss's encoder, a reward's
    reference), the same first-step mean, the same teacher grid, and for RDPO the same guard."""
    gm = GaussianMixture.reference()
    start = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0, backend="edm", afs=True)
    config = DistillConfig(iterations=4, batch=2, teacher_m=1, afs_mean=False)
    ck = tmp_path / "run.ckpt"

    def first(**kw):
        ck.unlink(missing_ok=True)
        with pytest.raises(Stop):
            distill(gm.denoise_ve, start, gm.shape, config, progress=_stop_at(3), checkpoint=ck, checkpoint_every=2,
                    **kw)  # fmt: skip

    first(checkpoint_key={"weight": 1.0})
    with pytest.raises(CheckpointMismatch, match="differs in key"):
        distill(gm.denoise_ve, start, gm.shape, config, checkpoint=ck, checkpoint_key={"weight": 5.0})
    first()
    with pytest.raises(CheckpointMismatch, match="first-step mean"):
        moved = start.replace(afs_mean=torch.tensor([0.5, -0.5, 0.25, -0.25]))
        distill(gm.denoise_ve, moved, gm.shape, config, checkpoint=ck)
    first(checkpoint_answers=torch.tensor([1.0, 2.0]))  # e.g. a feature encoder's answers to the fixed inputs
    with pytest.raises(CheckpointMismatch, match="feature encoder or reward model"):
        distill(gm.denoise_ve, start, gm.shape, config, checkpoint=ck, checkpoint_answers=torch.tensor([1.0, 2.1]))
    first()
    with pytest.raises(CheckpointMismatch, match="differs in teacher_grid"):  # a given grid: a subdivided teacher
        distill(gm.denoise_ve, start, gm.shape, config, grid=make_schedule(start), checkpoint=ck)

    grid = make_schedule(start)
    rdpo_config = RDPOConfig(iterations=4, groups=2, k=2, minibatch=2, width=8, blocks=1, guard_every=1)

    def reference(x0):
        return ode_endpoint(gm.denoise_ve, x0, float(grid[0]), steps=20)

    def spread(final):
        return float(final.std())

    ck.unlink()
    with pytest.raises(Stop):
        rdpo(gm.denoise_ve, start, gm.shape, rdpo_config, reference=reference, guard=spread, guard_samples=4,
             progress=_stop_at(3), checkpoint=ck, checkpoint_every=2)  # fmt: skip
    with pytest.raises(CheckpointMismatch, match="differs in guard"):
        rdpo(gm.denoise_ve, start, gm.shape, rdpo_config, reference=reference, guard=spread, guard_samples=16,
             checkpoint=ck)  # fmt: skip
    with pytest.raises(CheckpointMismatch, match="differs in key"):
        rdpo(gm.denoise_ve, start, gm.shape, rdpo_config, reference=reference, guard=spread, guard_samples=4,
             checkpoint=ck, checkpoint_key={"exact_steps": 200})  # fmt: skip


def test_answers_tell_models_apart_and_keep_a_few_numbers_per_sample():
    """:func:`answers` of a caller's other model: the same for the same model, apart for another of the same kind,
    and at most :data:`PROBE_DIRECTIONS` numbers per sample (scores kept as they are, features projected)."""
    from epd_core.checkpoint import PROBE_DIRECTIONS, answers

    weights = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))

    def features(w):
        return lambda x: torch.tanh(x.flatten(1) @ w.to(x.dtype))

    same = answers(features(weights), (4, 2, 2), torch.float64, "cpu")
    assert same.shape == (2 * PROBE_DIRECTIONS,)
    assert torch.equal(same, answers(features(weights.clone()), (4, 2, 2), torch.float64, "cpu"))
    other = answers(features(weights * 1.01), (4, 2, 2), torch.float64, "cpu")
    assert not torch.allclose(same, other, rtol=1e-3, atol=1e-4)
    scores = answers(lambda x: x.flatten(1).sum(1), (4, 2, 2), torch.float32, "cpu", samples=3)
    assert scores.shape == (3,) and scores.abs().min() > 0


def _stop_at(iteration: int):
    def progress(i, n, loss):
        if i == iteration:
            raise Stop

    return progress


def test_node_checkpoint_files_are_not_listed_as_tables(tmp_path):
    """A checkpoint is a safetensors file but never a table the loader offers or loads."""
    ck = tmp_path / "t.epd-checkpoint"
    save_params(EPDParams.start(3, 2), tmp_path / "t.safetensors")
    gm = GaussianMixture.reference()

    def stop(i, n, loss):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        distill(gm.denoise_ve, EPDParams.start(3, 2), gm.shape, DistillConfig(iterations=4, batch=2, teacher_m=0),
                checkpoint=ck, checkpoint_every=1, progress=stop)  # fmt: skip
    assert ck.exists()
    with pytest.raises(Exception, match="not an EPD table"):
        load_params(ck)
