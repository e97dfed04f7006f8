"""Stage 2: RDPO, Residual Dirichlet Policy Optimization (TPAMI / arXiv 2512.22796).

The distilled table becomes a stochastic policy (:class:`~epd_core.policy.DirichletPolicy`: Dirichlet positions and
weights and log-normal scales around the table, moved by a zero-initialised residual network) and is improved
against a reward with a small PPO, touching only the solver's parameters:

* each rollout samples a whole table per image; advantages are leave-one-out
  (RLOO) within groups of ``k`` images (sharing a noise, or with ``grouping``
  "prompt" one prompt), then normalised; the
  clipped PPO objective (clip 0.2), no KL or entropy term, gradient-norm clip
  1.0, Adam; one PPO epoch per rollout in minibatches;
* the trained policy's centre is exported as a normal table, kept only if a
  held-out guard metric did not get worse (:class:`_Guard`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import RunState, interruptible, run_checkpointer, with_gradients
from .config import RDPOConfig
from .params import EPDParams
from .policy import DirichletPolicy, TableSample
from .schedules import training_grid
from .solver import Denoiser, initial_state, sample

__all__ = ["rloo_advantages", "ppo_clip_loss", "fidelity_reward", "guard_iterations", "rdpo"]

_log = logging.getLogger("epd")

ROLLOUT_CHUNK = 1024
"""Most rollouts (or guard samples) sampled together, rounded up to a multiple of the prompts: an interrupt lands
within one chunk's model call, however many rollouts an iteration has (the node allows 256 groups x 64)."""


def rloo_advantages(rewards: torch.Tensor, k: int, normalize: bool = True) -> torch.Tensor:
    """Leave-one-out advantages within consecutive groups of ``k``: ``R_i - mean_{j != i} R_j``."""
    if rewards.numel() % k or k < 2:
        raise ValueError("rewards must come in groups of k >= 2")
    g = rewards.reshape(-1, k)
    adv = g - (g.sum(1, keepdim=True) - g) / (k - 1)
    adv = adv.reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


def ppo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate, negated for minimisation."""
    ratio = torch.exp(logp_new - logp_old)
    return -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


def fidelity_reward(reference: torch.Tensor) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Reward = minus the per-sample RMSE to a reference result (a many-step teacher, or the exact solution)."""

    def reward(final: torch.Tensor, context: Any) -> torch.Tensor:
        ref = reference[context]
        return -((final - ref) ** 2).flatten(1).mean(1).sqrt()

    return reward


GUARD_SEED = 2**31 - 2  # the guard's held-out noises: the same for every run and training seed
GUARD_SAMPLES = 100  # noises a caller's guard metric is given (each check samples them)
FIDELITY_GUARD_SAMPLES = 32  # held-out noises of the default guard of a fidelity run (each check samples them)


def held_out_fidelity(target: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """The default guard metric of a run with a ``reference``: the mean table's RMSE to the reference's ends of the
    guard's held-out noises (lower is better), so fine-tuning a good table cannot make it worse unnoticed."""

    def fidelity(final: torch.Tensor) -> float:
        return float(((final - target) ** 2).flatten(1).mean(1).sqrt().mean())

    return fidelity


def guard_iterations(config: RDPOConfig) -> list[int]:
    """The iterations after which the guard checks: 0 (the start), every ``guard_every``-th and the last."""
    every, n = config.guard_every, config.iterations
    return [0] + [it for it in range(1, n + 1) if (every and it % every == 0) or it == n]


def _in_chunks(fn: Callable[[slice], torch.Tensor], n: int, prompts: int) -> torch.Tensor:
    """``fn(rows)`` over ``n`` rows in slices of :data:`ROLLOUT_CHUNK`, concatenated; each slice starts at a multiple
    of ``prompts``, so row ``j`` keeps prompt ``j % prompts`` in a denoiser that tiles them over its batch."""
    chunk = -(-ROLLOUT_CHUNK // prompts) * prompts
    return torch.cat([fn(slice(a, a + chunk)) for a in range(0, n, chunk)])


class _Guard:
    """The guard against reward hacking (see :func:`rdpo`): the policy's KL to the start at every check and, with a
    ``metric``, its mean table's metric on fixed held-out noises. Its ``state`` (every check's KL and metric, NaN
    until made, and the last policy state that passed) is part of a checkpoint, so a resumed run stops where an
    uninterrupted one does, with the same table."""

    def __init__(
        self, policy: DirichletPolicy, denoiser: Denoiser, start: EPDParams, grid: torch.Tensor,
        shape: tuple[int, ...], config: RDPOConfig, metric: Callable[[torch.Tensor], float] | None, samples: int,
        prompts: int, dtype: torch.dtype, device: torch.device | str | None,
        reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        self.policy, self.denoiser, self.grid, self.config, self.metric = policy, denoiser, grid, config, metric
        self.prompts = prompts
        self.at = guard_iterations(config)
        self.state = {"guard.checks": torch.full((len(self.at), 2), math.nan, dtype=torch.float64)}
        self.noises = None
        if metric is not None or reference is not None:
            count = -(-samples // prompts) * prompts
            g = torch.Generator().manual_seed(GUARD_SEED)
            noises = torch.randn((count, *shape), generator=g, dtype=torch.float64).to(device, dtype)
            self.noises = initial_state(noises, grid[0], start.is_flow)
            self.state.update({f"guard.good.{name}": v.detach().clone() for name, v in policy.state_dict().items()})
            if metric is None:
                with torch.no_grad():
                    self.metric = held_out_fidelity(_in_chunks(lambda i: reference(self.noises[i]), count, prompts))

    @property
    def checks(self) -> list[dict[str, float]]:
        """The checks made: iteration, KL to the start and, with a metric, the metric."""
        out = []
        for it, (kl, value) in zip(self.at, self.state["guard.checks"].tolist(), strict=True):
            if not math.isnan(kl):
                out.append({"iteration": it, "kl": kl, **({} if self.noises is None else {"metric": value})})
        return out

    @property
    def good(self) -> dict[str, torch.Tensor]:
        """The policy state of the last check that passed."""
        return {name: self.state[f"guard.good.{name}"] for name in self.policy.state_dict()}

    @torch.no_grad()
    def __call__(self, it: int) -> bool:
        """Check after iteration ``it``; False when the guard says stop."""
        kl = float(self.policy.kl_to_start())
        value = math.nan
        if self.noises is not None:
            table = self.policy.export()
            final = _in_chunks(lambda i: sample(self.denoiser, self.noises[i], self.grid, table, final="estimate"),
                               self.noises.shape[0], self.prompts)  # fmt: skip
            value = float(self.metric(final))
        self.state["guard.checks"][self.at.index(it)] = torch.tensor([kl, value], dtype=torch.float64)
        if self.noises is None:
            return True
        config, first = self.config, float(self.state["guard.checks"][0, 1])
        if it == 0 or value - first <= config.guard_tolerance * abs(first):  # a negative metric too
            for name, v in self.policy.state_dict().items():
                self.state[f"guard.good.{name}"].copy_(v.detach())
            return True
        _log.warning("EPD RDPO: the guard metric rose from %.4g to %.4g at iteration %d (more than %g%%)%s",
                     first, value, it, 100 * config.guard_tolerance,
                     "; stopping with the last table that passed" if config.guard_action == "stop" else "")  # fmt: skip
        return config.guard_action != "stop"


def fitted_final_estimate(params: EPDParams) -> bool:
    """Whether ``params`` was fitted to end on its last step's x0 estimate at sigma 0 (EPD Distill's
    ``final_estimate``, as EPD KSampler samples by default), by its training record; RDPO keeps the ending."""
    for run in ("rdpo", "distilled"):
        record = params.metadata.get(run)
        if isinstance(record, Mapping) and "final_estimate" in record:
            return bool(record["final_estimate"])
    return False


def _rollouts(denoiser: Denoiser, policy: DirichletPolicy, start: EPDParams, grid: torch.Tensor,
              shape: tuple[int, ...], config: RDPOConfig, gen: torch.Generator, reward, reference, prompts: int,
              dtype: torch.dtype, device: torch.device | str | None):  # fmt: skip
    """One iteration's ``groups * k`` rollouts, each with a table drawn from the policy; returns the tables, their
    rewards and log-probabilities. Rollout ``j`` belongs to group ``j % groups``; with grouping "noise" a group's
    rollouts share one noise. They, and the reference's teacher, run in chunks (:func:`_in_chunks`); the reward
    scores them all in one call."""
    groups, n = config.groups, config.groups * config.k
    shared = config.grouping == "noise"
    noise = torch.randn((groups if shared else n, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
    x0 = initial_state(noise, grid[0], start.is_flow)
    context = torch.arange(n, device=device) % groups if shared else torch.arange(n, device=device)
    tables = policy.sample(n, gen)

    def rollouts(rows: slice) -> torch.Tensor:
        table = policy.decoded(tables[rows].map(lambda v: v.to(dtype)))
        return sample(denoiser, x0[context[rows]], grid, start, final="estimate", table=table)

    final = _in_chunks(rollouts, n, prompts)
    with torch.no_grad():
        if reward is None:
            reward = fidelity_reward(_in_chunks(lambda i: reference(x0[i]), x0.shape[0], prompts))
        score = reward(final, context)
        if not isinstance(score, torch.Tensor) or score.shape != (n,) or not bool(torch.isfinite(score).any()):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            name = getattr(reward, "__name__", type(reward).__name__)
            raise ValueError(f"the reward {name} must return one finite score per rollout, a tensor of shape "
                             f"({n},); got {got}{' all non-finite' if got == (n,) else ''}")  # fmt: skip
        return tables, score, policy.log_prob(tables)


def _ppo_epoch(policy: DirichletPolicy, opt: torch.optim.Optimizer, tables: TableSample, logp_old: torch.Tensor,
               adv: torch.Tensor, config: RDPOConfig, gen: torch.Generator,
               check_interrupt: Callable[[], None] | None) -> None:  # fmt: skip
    """One PPO epoch: clipped-objective Adam steps over the rollouts in random minibatches (non-finite ones skipped)."""
    n = adv.shape[0]
    perm = torch.randperm(n, generator=gen).to(logp_old.device)
    for s in range(0, n, config.minibatch):
        if check_interrupt is not None:  # many minibatches at large group counts: seconds without a model call
            check_interrupt()
        idx = perm[s : s + config.minibatch]
        loss = ppo_clip_loss(policy.log_prob(tables[idx]), logp_old[idx], adv[idx], config.clip)
        if not torch.isfinite(loss):
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(nn.utils.clip_grad_norm_(policy.parameters(), 1.0)):  # a non-finite gradient: no step
            opt.step()


@with_gradients
def rdpo(
    denoiser: Denoiser,
    start: EPDParams,
    shape: tuple[int, ...],
    config: RDPOConfig | None = None,
    *,
    reward: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grid: torch.Tensor | None = None,
    prompts: int = 1,
    guard: Callable[[torch.Tensor], float] | None = None,
    guard_samples: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    metadata: dict[str, Any] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 5,
    checkpoint_key: dict[str, Any] | None = None,
    checkpoint_answers: torch.Tensor | None = None,
    final_estimate: bool | None = None,
) -> tuple[EPDParams, list[float]]:
    """Fine-tune ``start`` with RDPO; returns the exported mean table and the mean reward per iteration.

    Per iteration ``config.groups * config.k`` rollouts, rollout ``j = m * groups + g`` in group ``g``; with
    ``grouping`` "noise" a group's rollouts share one noise, with "prompt" each has its own. ``prompts``: how
    many prompts the denoiser tiles over its batch (rollout ``j`` has prompt ``j % prompts``, as ComfyUI does
    with a conditioning batch); ``groups`` must be a multiple of it, so that a group's rollouts share a prompt.
    Either pass ``reward(final_x, context)`` (``context`` = each rollout's index into this iteration's noises)
    or ``reference(x_start) -> target`` for the built-in fidelity reward. See
    :class:`~epd_core.config.RDPOConfig` for the hyper-parameters (its defaults when ``config`` is None).
    ``grid``: the time points the rollouts run on (the model's, e.g. its shift's; default the table's own schedule).
    ``final_estimate``: the rollouts end at sigma 0 on the last step's x0 estimate (as EPD KSampler samples by
    default) instead of at the grid's last point; default: as the start was fitted (:func:`fitted_final_estimate`).
    ``reference`` and ``guard`` see that end.

    Guard against reward hacking: the policy's KL to the start policy is recorded at every check, and with
    ``guard(final_x) -> metric`` (lower is better, e.g. an FID) the policy's mean table samples
    ``guard_samples`` fixed held-out noises (seed :data:`GUARD_SEED`, rounded up to a multiple of ``prompts``)
    at the start and every ``config.guard_every`` iterations; when the metric exceeds the start's by more than
    ``config.guard_tolerance`` (relative), a warning is logged and with ``guard_action`` "stop" training ends
    with the last table that passed. The checks are in ``metadata["rdpo"]["guard"]``. ``guard_samples`` defaults to
    100; a run with a ``reference`` and no ``guard`` is guarded by :func:`held_out_fidelity` on
    :data:`FIDELITY_GUARD_SAMPLES` noises (the fidelity reward itself, on noises the rollouts never see).

    ``check_interrupt()`` runs before every model call (the rollouts go in chunks of :data:`ROLLOUT_CHUNK`) and
    every PPO minibatch (raise to stop); ``checkpoint`` /
    ``checkpoint_every`` / ``checkpoint_key`` / ``checkpoint_answers``: periodic saves and resume, as in
    :func:`epd_core.distill.distill` (the key: e.g. the reward's prompt or model file, or the reference's teacher,
    which the run cannot see; the answers: e.g. the reward's scores of fixed latents).
    """
    if config is not None and type(config).__name__ != RDPOConfig.__name__:  # by name: ComfyUI loads its own copy
        raise TypeError(f"rdpo: config must be an RDPOConfig, got {type(config).__name__} (a reward goes as reward=)")
    config = config or RDPOConfig()
    denoiser = interruptible(denoiser, check_interrupt)
    if (reward is None) == (reference is None):
        raise ValueError("pass exactly one of reward and reference")
    if prompts < 1 or config.groups % prompts:
        raise ValueError(f"groups ({config.groups}) must be a multiple of the number of prompts ({prompts})")
    grid = training_grid(start, grid).to(device)
    ending = fitted_final_estimate(start) if final_estimate is None else final_estimate
    # what the rollouts and the guard sample: the grid, then (with the estimate ending) 0 on the last step's estimate
    sigmas = torch.cat([grid, grid.new_zeros(1)]) if ending else grid
    with torch.random.fork_rng(devices=[]):
        # the residual network's initial weights, made on the CPU: deterministic for a seed. Only the CPU generator,
        # which fork_rng restores: torch.manual_seed would reseed a GPU's global generator for the rest of the session
        torch.random.default_generator.manual_seed(config.seed)
        policy = DirichletPolicy(start, config.concentration, config.width, config.blocks, config.scale_std,
                                 config.scale_heads, config.learn_std).to(device)  # fmt: skip
    opt = torch.optim.Adam(policy.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    curve: list[float] = []
    reward_name = "fidelity" if reward is None else getattr(reward, "__name__", "custom")
    guard_name = "held_out_fidelity" if guard is None and reference is not None else getattr(guard, "__name__", None)
    guard_name = "custom" if guard is not None and guard_name is None else guard_name
    if guard_samples is None:
        guard_samples = GUARD_SAMPLES if guard is not None else FIDELITY_GUARD_SAMPLES
    watch = _Guard(policy, denoiser, start, sigmas, shape, config, guard, guard_samples, prompts, dtype, device,
                   reference=reference)  # fmt: skip
    ckpt = None
    if checkpoint is not None:
        guard_key = None if guard_name is None else [guard_name, guard_samples]
        options = {**config.provenance(), "reward": reward_name, "prompts": prompts, "key": checkpoint_key or {},
                   "guard": guard_key, "final_estimate": ending}  # fmt: skip
        state = RunState({**policy.state_dict(), **watch.state}, opt, None, gen)
        every = checkpoint_every
        ckpt = run_checkpointer(checkpoint, every, state, denoiser, start, shape, grid, dtype, device, options, prompts,
                                checkpoint_answers)  # fmt: skip
        first, curve = ckpt.resume(config.iterations)
        if first and progress is not None:
            progress(first, config.iterations, curve[-1])
    stopped_at = None
    first_it = ckpt.resumed_at if ckpt else 0
    if not first_it:
        watch(0)
    k, groups = config.k, config.groups
    for it in range(first_it, config.iterations):
        tables, score, logp_old = _rollouts(denoiser, policy, start, sigmas, shape, config, gen, reward, reference,
                                            prompts, dtype, device)  # fmt: skip
        # groups are the columns of [k, groups]: rollouts g, g + groups, ...
        adv = rloo_advantages(score.float().reshape(k, groups).T.reshape(-1), k).reshape(groups, k).T.reshape(-1)
        _ppo_epoch(policy, opt, tables, logp_old, adv, config, gen, check_interrupt)
        curve.append(float(score.mean()))
        if progress is not None:
            progress(it + 1, config.iterations, curve[-1])
        if it + 1 in watch.at and not watch(it + 1):
            stopped_at = it + 1
            policy.load_state_dict(watch.good)
            break
        if ckpt is not None:  # after the check, which the checkpoint then holds
            ckpt.step(it + 1, curve, config.iterations)
    tail = curve[-max(1, len(curve) // 5) :]
    provenance = {
        **(metadata or {}),
        "rdpo": {
            **config.provenance(),
            "start_source": start.metadata.get("source_file") or start.metadata.get("command", ""),
            "reward": reward_name,
            "final_estimate": ending,
            "prompts": prompts,
            "scale_heads": list(policy.scale_names),
            "scale_std": config.scale_std if policy.scale_names else None,
            "first_reward": curve[0] if curve else None,
            "final_reward": sum(tail) / len(tail) if tail else None,
            "kl_to_start": max(0.0, float(policy.kl_to_start().detach())),  # 0 at the start, less round-off
            "guard": watch.checks,
            "guard_metric": guard_name,
            "stopped_at": stopped_at,
        },
    }
    return policy.export(provenance), curve


def guard_report(r: dict) -> str:
    """What RDPO's held-out checks say of the saved table (the rollouts' rewards are on fresh noises each iteration
    and include iterations a check rejected), or, without checks, whether the rollouts' mean reward fell."""
    checks = [c for c in r["guard"] if "metric" in c]
    if not checks:
        fell = r["final_reward"] < r["first_reward"]
        return "; the mean reward fell: the table may be worse than its start (a lower learning rate)" if fell else ""
    stopped = r["stopped_at"]
    kept = [c for c in checks if stopped is None or c["iteration"] < stopped][-1]
    name = {"held_out_fidelity": "fidelity error"}.get(r["guard_metric"], f"metric {r['guard_metric']}")
    text = (f"; held-out {name} (lower is better) {checks[0]['metric']:.4g} at the start, {kept['metric']:.4g} for "
            "the saved table")  # fmt: skip
    if stopped is not None:
        return text + (f"; stopped after iteration {stopped}: it got worse than the start's, so the table is the "
                       f"one of iteration {kept['iteration']}")  # fmt: skip
    if kept["metric"] > checks[0]["metric"]:
        text += ": worse than its start (a lower learning rate, or keep the start)"
    return text
