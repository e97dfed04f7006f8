"""Base solvers' updates from an x0 prediction, for distilling EPD-Plugin tables.

When the EPD Plugin runs over a base sampler, the base receives the ensemble's
prediction ``denoised`` at each grid point and applies its own update. These
are those updates (the same formulas as ComfyUI's samplers of the same name),
so a table can be distilled for the base it will run on:

* ``euler``: ``x + (t_next - t) * (x - denoised) / t`` (the plain EPD solver);
* ``dpmpp_2m``: DPM-Solver++(2M) in ``lambda = -log t``, first order on the first step and into ``t = 0``;
* ``ipndm``: iPNDM's Adams-Bashforth over up to three past directions (order 4).
"""

from __future__ import annotations

import torch

from .solver import adams_bashforth
from .updates import dpmpp_2m_update

__all__ = ["BASES", "base_update"]

BASES = ("euler", "dpmpp_2m", "ipndm")


def base_update(
    base: str, x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, state: dict
) -> torch.Tensor:
    """One step of ``base`` from ``t`` to ``t_next``; ``state`` carries the base's history between steps."""
    to = x.dtype
    if base == "euler":
        return x + (t_next - t).to(to) * (x - denoised) / t.to(to)
    if base == "dpmpp_2m":
        out = dpmpp_2m_update(x, denoised, t, t_next, state.get("old"), state.get("t_prev"))
        state["old"], state["t_prev"] = denoised, t
        return out
    if base == "ipndm":
        d = (x - denoised) / t.to(to)
        history = state.setdefault("history", [])
        out = denoised if t_next == 0 else x + (t_next - t).to(to) * adams_bashforth(d, history, 4)
        state["history"] = (history + [d])[-3:]
        return out
    raise ValueError(f"base must be one of {BASES}, got {base!r}")
