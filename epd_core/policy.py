"""RDPO's policy: a distribution over EPD tables centred on a distilled one (TPAMI / arXiv 2512.22796).

* per step, the K ordered positions ``r`` come from a (K+1)-dimensional
  Dirichlet over the segments of ``[0, 1]`` (their cumulative sums), and the
  K weights from a K-dimensional Dirichlet;
* concentrations ``alpha = exp(log(alpha_base) + delta)`` with
  ``alpha_base = concentration * distilled_mean`` and ``delta`` from a small
  residual network (step embedding, LayerNorm-SiLU-Linear blocks of width 256,
  zero-initialised output): at initialisation the policy's mean *is* the table;
* optionally (``scale_heads``, on by default) the per-point direction and time
  scales whose bound is non-zero get log-normal heads,
  ``log c ~ Normal(log c_start + delta_c, scale_std)``, ``delta_c = scale_std * h``
  with ``h`` extra zero-initialised outputs of the same head (so the head moves
  a scale in units of its exploration noise); rollouts clamp them into the
  table's bounds, and scales the table keeps fixed are neither sampled nor part
  of the log-probability;
* the trained policy's centre (Dirichlet means, log-normal medians clamped into
  the bounds) is exported as a normal table.

Sampling is seedable (Gamma draws by Marsaglia-Tsang on a ``torch.Generator``), unlike ``torch.distributions``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .params import Decoded, EPDParams

__all__ = ["DirichletPolicy", "TableSample"]

SCALES = ("scale_dir", "scale_time")
MAX_DELTA = 10.0  # the residual network's outputs: concentrations within e^10 of the start's, log-scales likewise


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


@dataclass(frozen=True, eq=False)
class TableSample:
    """A batch of ``n`` tables in the policy's point order (sorted by ``r``).

    ``segments`` ``[n, steps, K+1]`` (the positions as segments of ``[0, 1]``), ``weights`` ``[n, steps, K]``;
    ``scale_dir`` / ``scale_time`` ``[n, steps, K]`` where the policy samples them, else ``None``.
    ``log_segments`` / ``log_weights``: the exact logs of the Dirichlet draws, which the log-probability uses
    where given (a draw of a small concentration can lie far below the smallest value the tables keep, 1e-6).
    """

    segments: torch.Tensor
    weights: torch.Tensor
    scale_dir: torch.Tensor | None = None
    scale_time: torch.Tensor | None = None
    log_segments: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TableSample:
        """The same tables with ``fn`` applied to every tensor (indexing, casting, expanding)."""
        values = (self.segments, self.weights, self.scale_dir, self.scale_time, self.log_segments, self.log_weights)
        return TableSample(*(None if v is None else fn(v) for v in values))

    def __getitem__(self, index: Any) -> TableSample:
        """The tables at ``index`` along the batch dimension."""
        return self.map(lambda v: v[index])


class DirichletPolicy(nn.Module):
    """Per-step distributions around a start table.

    Positions: a Dirichlet over the K+1 segments; weights: a Dirichlet over the K weights; with
    ``scale_heads``, each scale whose bound is non-zero: ``log c ~ Normal(log c_start + delta_c, scale_std)``
    per point (``scale_std`` is the standard deviation of ``log c``; keep it below the bound) with
    ``delta_c = scale_std * h``. One zero-initialised head gives every ``delta`` and ``h``, so at
    initialisation the Dirichlet means and the log-normal medians are the start table. Scales the table
    keeps fixed (bound 0, or with ``fcn`` the last step's direction scale) are not sampled and not part of
    the log-probability.
    """

    def __init__(
        self,
        start: EPDParams,
        concentration: float = 20.0,
        width: int = 256,
        blocks: int = 2,
        scale_std: float = 0.02,
        scale_heads: bool = True,
        learn_std: bool = False,
    ) -> None:
        super().__init__()
        if not scale_std > 0:
            raise ValueError(f"scale_std must be > 0, got {scale_std}")
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
        names = []
        for name in SCALES:
            mask = _learnable_scales(start, name)
            self.register_buffer(name, torch.gather(getattr(table, name), -1, order).float())
            self.register_buffer(f"{name}_mask", mask)
            if scale_heads and bool(mask.any()):
                names.append(name)
        self.scale_names: tuple[str, ...] = tuple(names)
        self.scale_std = scale_std
        self.learn_std = learn_std and bool(names)
        self.embed = nn.Embedding(self.steps, width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, (2 + len(names) * (2 if self.learn_std else 1)) * self.k + 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.concentration = concentration

    def _outputs(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Position and weight concentrations, and the log-normal locations and standard deviations of the
        sampled scales (with ``learn_std``: ``exp(log(scale_std) + h')``, ``log std`` clamped into [-7, 2] as
        the authors do; else ``scale_std``)."""
        # bounded: a learning rate far too high drives the head to overflow (inf or NaN concentrations, no Dirichlet)
        delta = self.head(self.blocks(self.embed.weight)).clamp(-MAX_DELTA, MAX_DELTA)
        k, n = self.k, len(self.scale_names)
        a_pos = torch.exp(self.log_base_pos + delta[:, : k + 1])
        a_w = torch.exp(self.log_base_w + delta[:, k + 1 : 2 * k + 1])
        locs, stds = {}, {}
        for j, name in enumerate(self.scale_names):
            log_start = torch.log(getattr(self, name))
            h = delta[:, (2 + j) * k + 1 : (3 + j) * k + 1]
            locs[name] = torch.where(getattr(self, f"{name}_mask"), log_start + self.scale_std * h, log_start)
            if self.learn_std:
                g = delta[:, (2 + n + j) * k + 1 : (3 + n + j) * k + 1]
                stds[name] = torch.exp((math.log(self.scale_std) + g).clamp(-7.0, 2.0))
            else:
                stds[name] = torch.full_like(log_start, self.scale_std)
        return a_pos, a_w, locs, stds

    def alphas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Concentrations ``[steps, K+1]`` (positions) and ``[steps, K]`` (weights)."""
        a_pos, a_w, _, _ = self._outputs()
        return a_pos, a_w

    def locs(self) -> dict[str, torch.Tensor]:
        """Locations ``log c_start + delta_c`` of the sampled scales' log-normals, ``[steps, K]`` each."""
        return self._outputs()[2]

    def stds(self) -> dict[str, torch.Tensor]:
        """Standard deviations of ``log c`` of the sampled scales, ``[steps, K]`` each."""
        return self._outputs()[3]

    def kl_to_start(self) -> torch.Tensor:
        """``KL(policy || start policy)`` of whole tables (the zero-initialised policy around the start table):
        both Dirichlets per step, and the sampled scales' log-normals, summed. 0 at initialisation."""
        a_pos, a_w, locs, stds = self._outputs()
        kl_div, dirichlet = torch.distributions.kl_divergence, torch.distributions.Dirichlet
        out = kl_div(dirichlet(a_pos), dirichlet(torch.exp(self.log_base_pos))).sum()
        out = out + kl_div(dirichlet(a_w), dirichlet(torch.exp(self.log_base_w))).sum()
        for name, loc in locs.items():
            std, log_start = stds[name], torch.log(getattr(self, name))
            kl = torch.log(self.scale_std / std) + (std**2 + (loc - log_start) ** 2) / (2 * self.scale_std**2) - 0.5
            out = out + kl[getattr(self, f"{name}_mask")].sum()
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> TableSample:
        """``n`` tables (reparameterisation-free): positions, weights, then each sampled scale."""
        generator = _generator(generator)
        a_pos, a_w, locs, stds = self._outputs()
        segments, log_segments = _dirichlet(a_pos.detach(), n, generator)
        weights, log_weights = _dirichlet(a_w.detach(), n, generator)
        scales = {}
        for name, loc in locs.items():
            value = _log_normal(loc.detach(), stds[name].detach(), n, generator)
            scales[name] = torch.where(getattr(self, f"{name}_mask"), value, getattr(self, name))
        return TableSample(segments, weights, **scales, log_segments=log_segments, log_weights=log_weights)

    def log_prob(self, tables: TableSample) -> torch.Tensor:
        """Log-probability of whole tables, ``[n]``: both Dirichlets and the sampled scales, summed over steps."""
        a_pos, a_w, locs, stds = self._outputs()
        out = _dirichlet_log_prob(a_pos, tables.segments, tables.log_segments).sum(-1)
        out = out + _dirichlet_log_prob(a_w, tables.weights, tables.log_weights).sum(-1)
        for name, loc in locs.items():
            value = getattr(tables, name)
            if value is None:
                raise ValueError(f"the tables lack {name}, which this policy samples")
            lp = _log_normal_log_prob(value, loc.to(value), stds[name].to(value))
            out = out + lp[:, getattr(self, f"{name}_mask")].sum(-1)
        return out

    def mean(self) -> TableSample:
        """The policy's centre, ``n = 1``: the Dirichlet means and the log-normal medians ``exp(loc)``."""
        a_pos, a_w, locs, _ = self._outputs()
        scales = {name: torch.exp(loc).unsqueeze(0) for name, loc in locs.items()}
        return TableSample((a_pos / a_pos.sum(-1, keepdim=True)).unsqueeze(0),
                           (a_w / a_w.sum(-1, keepdim=True)).unsqueeze(0), **scales)  # fmt: skip

    def decoded(self, tables: TableSample) -> Decoded:
        """Per-sample tables ``[steps, n, K]`` for the ``table`` of :func:`~epd_core.solver.sample`; sampled scales
        are clamped into the table's bounds ``[1 - bound, 1 + bound]``, unsampled ones are the start table's."""
        n = tables.segments.shape[0]
        r = torch.cumsum(tables.segments, -1)[..., : self.k].transpose(0, 1)
        scales = []
        for name in SCALES:
            value = getattr(tables, name)
            if value is None:
                value = getattr(self, name).to(tables.weights).unsqueeze(0).expand(n, -1, -1)
            else:
                bound = getattr(self.start, name)
                value = value.clamp(1 - bound, 1 + bound)
            scales.append(value.transpose(0, 1))
        return Decoded(r, tables.weights.transpose(0, 1), *scales)

    def export(self, metadata: dict[str, Any] | None = None) -> EPDParams:
        """The policy's centre as a normal table (positions sorted; the K points are interchangeable); scales
        are the log-normal medians, clamped into the open interval the table's bounds can represent."""
        with torch.no_grad():
            centre = self.mean()
            r = torch.cumsum(centre.segments[0].double(), -1)[:, : self.k].clamp(1e-6, 1 - 1e-6)
            w = centre.weights[0].double().clamp_min(1e-12)
            raw = {}
            for name in SCALES:
                value = getattr(centre, name)
                value = getattr(self, name) if value is None else value[0]
                raw[f"{name}_params"] = _raw_scale(value.double(), getattr(self.start, name)).float()
        meta = {**self.start.carried_metadata(), **(metadata or {})}
        return self.start.replace(r_params=torch.logit(r).float(), weight_s=torch.log(w).float(), metadata=meta, **raw)


def _learnable_scales(params: EPDParams, name: str) -> torch.Tensor:
    """Which entries ``[steps, K]`` of scale ``name`` a table can change: all when its bound is non-zero,
    except the last step's direction scale with ``fcn``."""
    mask = torch.full((params.num_steps - 1, params.num_points), bool(getattr(params, name)))
    if name == "scale_dir" and params.fcn:
        mask[-1] = False
    return mask


def _log_normal_log_prob(value: torch.Tensor, loc: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Elementwise log-density of ``LogNormal(loc, std)`` at ``value``."""
    log_value = torch.log(value)
    std = torch.as_tensor(std, dtype=value.dtype, device=value.device)
    return -((log_value - loc) ** 2) / (2 * std**2) - log_value - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _raw_scale(value: torch.Tensor, bound: float) -> torch.Tensor:
    """Inverse of ``2 * sigmoid(p / 2) * bound + 1 - bound`` (clamped into the open interval)."""
    if not bound:
        return torch.zeros_like(value)
    u = ((value - (1 - bound)) / (2 * bound)).clamp(1e-6, 1 - 1e-6)
    return 2 * torch.logit(u)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or one seeded from torch's global stream, so unseeded calls differ."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))


def _log_normal(loc: torch.Tensor, std: torch.Tensor | float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of ``exp(loc + std * z)`` with the (CPU) generator."""
    z = torch.randn((n, *loc.shape), generator=generator, dtype=torch.float64)
    std = torch.as_tensor(std, dtype=torch.float64).cpu()
    return torch.exp(loc.double().cpu() + std * z).to(loc)


def _dirichlet(alpha: torch.Tensor, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Dirichlet draws from normalised Gamma draws (seedable, unlike torch.distributions), normalised in log
    space (draws of small concentrations underflow to 0 together): the draws kept at least 1e-6 for the tables, and
    their exact logs for :func:`_dirichlet_log_prob`."""
    a = alpha.unsqueeze(0).expand(n, *alpha.shape).double().cpu()
    log_gamma = _log_gamma(a, _generator(generator))
    p = torch.softmax(log_gamma, dim=-1).clamp_min(1e-6)
    return (p / p.sum(-1, keepdim=True)).to(alpha), torch.log_softmax(log_gamma, dim=-1).to(alpha)


def _dirichlet_log_prob(alpha: torch.Tensor, value: torch.Tensor, log_value: torch.Tensor | None) -> torch.Tensor:
    """Log-density of ``Dirichlet(alpha)`` at ``value`` (over the last dimension), from ``log_value`` where given.
    A draw's exact log keeps the score-function gradient unbiased at small concentrations, where the table's value,
    kept at least 1e-6, would not (at a concentration of 0.05 most draws lie below it)."""
    log_x = torch.log(value) if log_value is None else log_value.to(alpha)
    return ((alpha - 1) * log_x).sum(-1) + torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1)


def _log_gamma(a: torch.Tensor, generator: torch.Generator, rounds: int = 1000) -> torch.Tensor:
    """``log`` of Gamma(a, 1) draws by Marsaglia-Tsang with a generator (boosted for a < 1). Each round accepts a
    draw with probability above 0.95, so ``rounds`` only stops a concentration that is not a finite positive number."""
    if not bool(torch.isfinite(a).all() and (a > 0).all()):
        raise ValueError(
            "RDPO's policy diverged (a concentration is not a finite positive number); lower the learning rate"
        )
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1 / 3
    c = 1 / torch.sqrt(9 * d)
    out = torch.ones_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    for _ in range(rounds):
        z = torch.randn(a.shape, generator=generator, dtype=a.dtype)
        u = torch.rand(a.shape, generator=generator, dtype=a.dtype)
        v = (1 + c * z) ** 3
        log_v = torch.log(v.clamp_min(1e-300))
        ok = todo & (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z**2 + d - d * v + d * log_v)
        out = torch.where(ok, d * v, out)
        todo = todo & ~ok
        if not todo.any():
            break
    else:
        raise ValueError(f"RDPO's Gamma sampler accepted no draw in {rounds} rounds; lower the learning rate")
    u = torch.rand(a.shape, generator=generator, dtype=a.dtype).clamp_min(1e-300)
    return torch.log(out) + torch.where(boost, torch.log(u) / a, torch.zeros_like(a))
