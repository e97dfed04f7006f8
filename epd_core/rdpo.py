"""Stage 2: RDPO, Residual Dirichlet Policy Optimization (TPAMI / arXiv 2512.22796).

The distilled table becomes a stochastic policy and is improved against a
reward with a small PPO, touching only the solver's parameters:

* per step, the K ordered positions ``r`` come from a (K+1)-dimensional
  Dirichlet over the segments of ``[0, 1]`` (their cumulative sums), and the
  K weights from a K-dimensional Dirichlet;
* concentrations ``alpha = exp(log(alpha_base) + delta)`` with
  ``alpha_base = concentration * distilled_mean`` and ``delta`` from a small
  residual network (step embedding, LayerNorm-SiLU-Linear blocks of width 256,
  zero-initialised output): at initialisation the policy's mean *is* the table;
* each rollout samples a whole table per image; advantages are leave-one-out
  (RLOO) within groups of ``k`` images sharing a noise, then normalised; the
  clipped PPO objective (clip 0.2), no KL or entropy term, gradient-norm clip
  1.0, Adam; one PPO epoch per rollout in minibatches;
* the trained policy's mean table is exported as a normal table.

``scale_dir`` / ``scale_time`` stay at the start table's values (the optional
log-normal heads of the paper are not implemented).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .params import Decoded, EPDParams
from .schedules import make_schedule
from .solver import Denoiser, ensemble_direction, first_direction, push_history

__all__ = [
    "DirichletPolicy",
    "rloo_advantages",
    "ppo_clip_loss",
    "sample_with_tables",
    "fidelity_reward",
    "rdpo",
]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class DirichletPolicy(nn.Module):
    """Per-step Dirichlet distributions around a start table (positions: K+1 segments; weights: K)."""

    def __init__(self, start: EPDParams, concentration: float = 20.0, width: int = 256, blocks: int = 2) -> None:
        super().__init__()
        self.start = start
        self.steps, self.k = start.num_steps - 1, start.num_points
        table = start.decoded(torch.float64)
        r_sorted, order = torch.sort(table.r, dim=-1)
        segments = torch.diff(r_sorted, dim=-1, prepend=torch.zeros(self.steps, 1, dtype=torch.float64),
                              append=torch.ones(self.steps, 1, dtype=torch.float64))  # fmt: skip
        weights = torch.gather(table.weight, -1, order)
        self.register_buffer("order", order)
        self.register_buffer("log_base_pos", torch.log(concentration * segments.clamp_min(1e-6)).float())
        self.register_buffer("log_base_w", torch.log(concentration * weights.clamp_min(1e-6)).float())
        self.register_buffer("scale_dir", torch.gather(table.scale_dir, -1, order).float())
        self.register_buffer("scale_time", torch.gather(table.scale_time, -1, order).float())
        self.embed = nn.Embedding(self.steps, width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 2 * self.k + 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.concentration = concentration

    def alphas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Concentrations ``[steps, K+1]`` (positions) and ``[steps, K]`` (weights)."""
        delta = self.head(self.blocks(self.embed.weight))
        return torch.exp(self.log_base_pos + delta[:, : self.k + 1]), torch.exp(
            self.log_base_w + delta[:, self.k + 1 :]
        )

    def distributions(self) -> tuple[torch.distributions.Dirichlet, torch.distributions.Dirichlet]:
        a_pos, a_w = self.alphas()
        return torch.distributions.Dirichlet(a_pos), torch.distributions.Dirichlet(a_w)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` tables: segments ``[n, steps, K+1]`` and weights ``[n, steps, K]`` (reparameterisation-free)."""
        a_pos, a_w = (a.detach() for a in self.alphas())
        return _dirichlet(a_pos, n, generator), _dirichlet(a_w, n, generator)

    def log_prob(self, segments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Log-probability of whole tables, ``[n]`` (sum over steps of both Dirichlets)."""
        pos, w = self.distributions()
        return pos.log_prob(segments).sum(-1) + w.log_prob(weights).sum(-1)

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        a_pos, a_w = self.alphas()
        return a_pos / a_pos.sum(-1, keepdim=True), a_w / a_w.sum(-1, keepdim=True)

    def decoded(self, segments: torch.Tensor, weights: torch.Tensor) -> Decoded:
        """Per-sample tables ``[steps, n, K]`` for :func:`sample_with_tables`."""
        r = torch.cumsum(segments, -1)[..., : self.k].transpose(0, 1)
        n = segments.shape[0]
        expand = lambda v: v.unsqueeze(0).expand(n, -1, -1).transpose(0, 1)  # noqa: E731
        return Decoded(r, weights.transpose(0, 1), expand(self.scale_dir), expand(self.scale_time))

    def export(self, metadata: dict[str, Any] | None = None) -> EPDParams:
        """The policy's mean as a normal table (positions sorted; the K points are interchangeable)."""
        with torch.no_grad():
            seg, w = self.mean()
            r = torch.cumsum(seg.double(), -1)[:, : self.k].clamp(1e-6, 1 - 1e-6)
            w = w.double().clamp_min(1e-12)
            inv_dir = _raw_scale(self.scale_dir.double(), self.start.scale_dir)
            inv_time = _raw_scale(self.scale_time.double(), self.start.scale_time)
        meta = {**dict(self.start.metadata), **(metadata or {})}
        return self.start.replace(
            r_params=torch.logit(r).float(), weight_s=torch.log(w).float(), scale_dir_params=inv_dir.float(),
            scale_time_params=inv_time.float(), metadata=meta,
        )  # fmt: skip


def _raw_scale(value: torch.Tensor, bound: float) -> torch.Tensor:
    """Inverse of ``2 * sigmoid(p / 2) * bound + 1 - bound``."""
    if not bound:
        return torch.zeros_like(value)
    u = ((value - (1 - bound)) / (2 * bound)).clamp(1e-6, 1 - 1e-6)
    return 2 * torch.logit(u)


def _dirichlet(alpha: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Dirichlet samples from normalised Gamma draws (seedable, unlike torch.distributions)."""
    a = alpha.unsqueeze(0).expand(n, *alpha.shape).double().cpu()
    if generator is None:  # draw from torch's global stream, so unseeded calls differ
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    g = _gamma(a, generator)
    p = (g / g.sum(-1, keepdim=True)).clamp_min(1e-6)  # keeps log-probabilities finite in float32
    return (p / p.sum(-1, keepdim=True)).to(alpha)


def _gamma(a: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(a, 1) by Marsaglia-Tsang with a generator (boosted for a < 1)."""
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1 / 3
    c = 1 / torch.sqrt(9 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():
        z = torch.randn(a.shape, generator=generator, dtype=a.dtype)
        u = torch.rand(a.shape, generator=generator, dtype=a.dtype)
        v = (1 + c * z) ** 3
        log_v = torch.log(v.clamp_min(1e-300))
        ok = todo & (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z**2 + d - d * v + d * log_v)
        out = torch.where(ok, d * v, out)
        todo = todo & ~ok
    u = torch.rand(a.shape, generator=generator, dtype=a.dtype).clamp_min(1e-300)
    return torch.where(boost, out * u ** (1 / a), out)


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


@torch.no_grad()
def sample_with_tables(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, params: EPDParams,
                       table: Decoded) -> torch.Tensor:  # fmt: skip
    """The EPD solver with a different table per sample (``table`` fields ``[steps, B, K]``)."""
    history: list[torch.Tensor] = []
    for i in range(grid.shape[0] - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        d = first_direction(denoiser, x, t_cur, params.afs and i == 0, params.is_flow)
        d_eff = ensemble_direction(denoiser, x, d, t_cur, t_next, table, i, params, history)
        if params.student == "ipndm":
            history = push_history(history, d, params.max_order)
        x = x + (t_next - t_cur).to(x.dtype) * d_eff
    return x


def fidelity_reward(reference: torch.Tensor) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Reward = minus the per-sample RMSE to a reference result (a many-step teacher, or the exact solution)."""

    def reward(final: torch.Tensor, context: Any) -> torch.Tensor:
        ref = reference[context]
        return -((final - ref) ** 2).flatten(1).mean(1).sqrt()

    return reward


def rdpo(
    denoiser: Denoiser,
    start: EPDParams,
    shape: tuple[int, ...],
    reward: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
    iterations: int = 50,
    groups: int = 8,
    k: int = 4,
    minibatch: int = 16,
    concentration: float = 20.0,
    lr: float = 7e-5,
    clip: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[EPDParams, list[float]]:
    """Fine-tune ``start`` with RDPO; returns the exported mean table and the mean reward per iteration.

    Per iteration: ``groups`` noises, each shared by ``k`` rollouts with their own sampled tables. Either
    pass ``reward(final_x, context)`` (``context`` = the rollouts' group indices into this iteration's
    noises) or ``reference(x_start) -> target`` for the built-in fidelity reward.
    """
    if (reward is None) == (reference is None):
        raise ValueError("pass exactly one of reward and reference")
    grid = make_schedule(start).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the residual network's initial weights: deterministic for a seed
        policy = DirichletPolicy(start, concentration).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    for it in range(iterations):
        noise = torch.randn((groups, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
        x0 = noise if start.is_flow else noise * grid[0].to(dtype)
        context = torch.arange(groups, device=device).repeat_interleave(k)
        x = x0[context]
        seg, w = policy.sample(groups * k, gen)
        final = sample_with_tables(denoiser, x, grid, start, policy.decoded(seg.to(dtype), w.to(dtype)))
        with torch.no_grad():
            score = reward(final, context) if reward is not None else fidelity_reward(reference(x0))(final, context)
            logp_old = policy.log_prob(seg, w)
        adv = rloo_advantages(score.float(), k)
        perm = torch.randperm(groups * k, generator=gen).to(context.device)
        for s in range(0, groups * k, minibatch):
            idx = perm[s : s + minibatch]
            loss = ppo_clip_loss(policy.log_prob(seg[idx], w[idx]), logp_old[idx], adv[idx], clip)
            if not torch.isfinite(loss):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        curve.append(float(score.mean()))
        if progress is not None:
            progress(it + 1, iterations, curve[-1])
    tail = curve[-max(1, iterations // 5) :]
    provenance = {
        **(metadata or {}),
        "rdpo": {
            "start_source": start.metadata.get("source_file") or start.metadata.get("command", ""),
            "reward": "fidelity" if reward is None else getattr(reward, "__name__", "custom"),
            "iterations": iterations, "groups": groups, "k": k, "concentration": concentration, "lr": lr,
            "seed": seed, "first_reward": curve[0], "final_reward": sum(tail) / len(tail),
        },
    }  # fmt: skip
    return policy.export(provenance), curve
