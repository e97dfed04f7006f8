"""The base samplers the EPD Plugin wraps: ComfyUI's update rules, written from x0 predictions.

The plugin's contract (see :mod:`epd_core.plugin`): the base's own method *places* the K points of an EPD
step, and the step itself is EPD's Euler-type combination of the K directions (the authors' EPD-Plugin, where
iPNDM's extrapolation places the points). Two copies of the base's rule run side by side:

* the *placement* copy is fed the plain model predictions at the grid points (the first-direction call of each
  step), i.e. exactly the history the base's method is made for; its proposed step
  ``x -> step(x, D(x, t_cur), history)`` is the line the K points are placed on;
* the *answer* copy mirrors the state of the real base sampler (ComfyUI's), which stores whatever the model
  call returned. Every rule here is linear in the current answer, so the plugin answers with the x0 for which
  the base's own update lands exactly on the EPD step (:meth:`Base.answer`).

Each rule is ComfyUI's (``comfy/k_diffusion/sampling.py``, 0.3.75 and 0.33) for the deterministic sampler
of that name, with its default options; a test checks ComfyUI's samplers against these copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .params import EPDParams
from .solver import adams_bashforth

__all__ = ["BASES", "Base", "placement", "table_placement", "table_placer"]

# The bases the plugin supports. uni_pc / uni_pc_bh2 are not among them: UniPC's corrector rewrites the state after
# each model call, so the point the model is asked at is not the state the next step starts from.
BASES = ("euler", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "lms", "res_multistep", "gradient_estimation")
_DIRECTION_BASES = ("euler", "ipndm", "ipndm_v", "deis", "lms", "gradient_estimation")  # history of d's, else of x0's


def _lagrange_integral(nodes: list[float], j: int, lo: float, hi: float) -> float:
    """``integral_lo^hi prod_{k != j} (tau - nodes[k]) / (nodes[j] - nodes[k]) dtau`` (exact: Gauss-Legendre)."""
    points, weights = np.polynomial.legendre.leggauss(4)
    tau = (hi - lo) / 2 * points + (hi + lo) / 2
    poly = np.ones_like(tau)
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * (tau - node) / (nodes[j] - node)
    return float((hi - lo) / 2 * np.sum(weights * poly))


def _deis_coefficients(sigmas: list[float], i: int, order: int, n: int = 10000) -> list[float]:
    """ComfyUI's DEIS ``tab`` coefficients of step ``i`` (the VP time of EDM's sigma range, a 10,000-point sum)."""
    s_min, s_max, eps = 0.002, 80.0, 1e-3
    beta_d = 2 * (math.log(s_min**2 + 1) / eps - math.log(s_max**2 + 1)) / (eps - 1)
    beta_min = math.log(s_max**2 + 1) - 0.5 * beta_d
    t = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log(s**2 + 1)) - beta_min) / beta_d for s in sigmas]
    b0, b1 = beta_min, beta_d + beta_min
    taus = torch.linspace(t[i], t[i + 1], n, dtype=torch.float64)
    alpha = torch.exp(-0.5 * taus**2 * (b1 - b0) - taus * b0)
    integrand = -0.5 * (-taus * (b1 - b0) - b0) / torch.sqrt(alpha * (1 - alpha))
    dtau = (t[i + 1] - t[i]) / n
    prev = [t[i - k] for k in range(order)]
    out = []
    for j in range(order):
        poly = torch.ones_like(taus)
        for k in range(order):
            if k != j:
                poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
        out.append(float(torch.sum(integrand * poly) * dtau))
    return out


def _update(name: str, sigmas: list[float], i: int, x, denoised, past: list):
    """``name``'s step ``i`` (from ``sigmas[i]`` to ``sigmas[i + 1]``) given ``denoised`` at ``x`` and the
    quantities stored at the previous steps (oldest first: directions ``d``, or x0's for dpmpp_2m and
    res_multistep). Linear in ``(x, denoised, past)``."""
    s, s_next = sigmas[i], sigmas[i + 1]
    if s_next == 0:  # every base denoises to 0 (euler and deis through the same formula)
        return denoised
    d = (x - denoised) / s
    h = s_next - s
    if name == "euler":
        return x + h * d
    if name == "ipndm":  # the iPNDM student's Adams-Bashforth rule, which is ComfyUI's
        return x + h * adams_bashforth(d, past, 4)
    if name == "ipndm_v":
        return x + h * sum(c * v for c, v in zip(_ipndm_v_coefficients(sigmas, i, min(4, len(past) + 1)),
                                                 [d, *reversed(past[-3:])], strict=False))  # fmt: skip
    if name == "deis":
        order = min(3, len(past) + 1)
        if order == 1:
            return x + h * d
        coef = _deis_coefficients(sigmas, i, order)
        return x + sum(c * v for c, v in zip(coef, [d, *reversed(past[-(order - 1) :])], strict=True))
    if name == "lms":
        order = min(4, len(past) + 1)
        nodes = [sigmas[i - k] for k in range(order)]
        coef = [_lagrange_integral(nodes, j, s, s_next) for j in range(order)]
        return x + sum(c * v for c, v in zip(coef, [d, *reversed(past[-(order - 1) :])], strict=False))
    if name == "gradient_estimation":  # ge_gamma = 2
        out = x + h * d
        return out + (d - past[-1]) * h if past else out
    lam, lam_next = -math.log(s), -math.log(s_next)
    step = lam_next - lam
    if name == "dpmpp_2m":
        ratio = s_next / s
        if not past:
            return ratio * x + (1 - ratio) * denoised
        r = (lam - -math.log(sigmas[i - 1])) / step
        return ratio * x + (1 - ratio) * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * past[-1])
    if name == "res_multistep":  # eta = 0: sigma_down = sigma_next
        if not past:
            return x + h * d
        c2 = (-math.log(sigmas[i - 1]) - lam) / step
        phi1 = math.expm1(-step) / -step
        phi2 = (phi1 - 1) / -step
        b1, b2 = phi1 - phi2 / c2, phi2 / c2
        return math.exp(-step) * x + step * (b1 * denoised + b2 * past[-1])
    raise ValueError(f"base must be one of {BASES}, got {name!r}")


def _ipndm_v_coefficients(t: list[float], i: int, order: int) -> list[float]:
    """ComfyUI's ``ipndm_v`` (variable-step iPNDM) coefficients of step ``i``."""
    if order == 1:
        return [1.0]
    h_n, h_n_1 = t[i + 1] - t[i], t[i] - t[i - 1]
    if order == 2:
        return [(2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2]
    h_n_2 = t[i - 1] - t[i - 2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return [(2 + h_n / h_n_1) / 2 + temp1, -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1, temp1 * h_n_1 / h_n_2]
    h_n_3 = t[i - 2] - t[i - 3]
    span = h_n + h_n_1 + h_n_2
    temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * span)) \
        * (h_n * (h_n + h_n_1) * span) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))  # fmt: skip
    q = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return [
        (2 + h_n / h_n_1) / 2 + temp1 + temp2,
        -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + q) * temp2,
        temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + q * (1 + h_n_2 / h_n_3)) * temp2,
        -temp2 * q * h_n_1 / h_n_2,
    ]


class Base:
    """One run of base sampler ``name`` along ``sigmas`` (its whole grid, a final 0 included).

    :meth:`step` applies the base's update to a model prediction and remembers what the base remembers;
    :meth:`answer` returns the prediction for which that update lands on a given state (and remembers it).
    """

    _MEMORY = {"euler": 0, "ipndm": 3, "ipndm_v": 3, "deis": 2, "lms": 3, "gradient_estimation": 1,
               "dpmpp_2m": 1, "res_multistep": 1}  # fmt: skip

    def __init__(self, name: str, sigmas: torch.Tensor) -> None:
        if name not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {name!r}")
        self.name = name
        self.sigmas = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
        self.past: list[torch.Tensor] = []

    def _remember(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        keep = self._MEMORY[self.name]
        value = (x - denoised) / self.sigmas[i] if self.name in _DIRECTION_BASES else denoised
        self.past = (self.past + [value])[-keep:] if keep else []

    def step(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """The base's step ``i`` from ``x`` given the prediction ``denoised``."""
        out = _update(self.name, self.sigmas, i, x, denoised, self.past)
        self._remember(i, x, denoised)
        return out

    def propose(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """The direction ``(step(x, denoised) - x) / (t_next - t_cur)`` of the base's step ``i`` (remembered)."""
        return (self.step(i, x, denoised) - x) / (self.sigmas[i + 1] - self.sigmas[i])

    def answer(self, i: int, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The prediction for which the base's step ``i`` from ``x`` reaches ``target`` exactly (remembered)."""
        zero = [torch.zeros_like(v) for v in self.past]
        one = torch.ones((), dtype=torch.float64)
        gain = float(_update(self.name, self.sigmas, i, 0 * one, one, [0 * one for _ in zero]))
        rest = _update(self.name, self.sigmas, i, x, torch.zeros_like(x), self.past)
        denoised = (target - rest) / gain
        self._remember(i, x, denoised)
        return denoised


def placement(base: Base, i: int, x: torch.Tensor, t_cur: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``place(d)`` for :func:`~epd_core.solver.epd_step`: the base's proposed direction at step ``i`` from the
    plain prediction ``x - t_cur * d`` (remembered in ``base``'s history)."""

    def place(d: torch.Tensor) -> torch.Tensor:
        if base.name == "euler":
            base.step(i, x, x - t_cur.to(x.dtype) * d)  # Euler's direction is d itself (kept exact)
            return d
        return base.propose(i, x, x - t_cur.to(x.dtype) * d)

    return place


def table_placement(params: EPDParams) -> str:
    """The base whose method places a table's points: the one it was distilled for (``plugin_base`` in its
    metadata), else ``euler`` (the EPD solver's straight line; an ``ipndm`` student keeps its own rule)."""
    return str(params.metadata.get("plugin_base") or "euler")


def table_placer(params: EPDParams, sigmas: torch.Tensor) -> Callable[..., Callable] | None:
    """``placer(i, x, t_cur)``: step i's ``place`` for a table distilled over a multistep base (a fresh base
    along ``sigmas``, fed the plain predictions, places the points as the table was fitted); None for the EPD
    solver's straight line."""
    name = table_placement(params)
    if name == "euler":
        return None
    base = Base(name, sigmas)
    return lambda i, x, t_cur: placement(base, i, x, t_cur)
