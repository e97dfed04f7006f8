"""Which untrained start table to distil from: measured on the model before training.

No one start grid suits every model: on the SD3-form mixture the model's own grid trains to 0.062 RMSE where a grid
uniform in t trains to 0.105, while on the MNIST flow model and the SD1.5 form the other grid wins. So each
candidate samples the same held-out noises untrained, against the training teacher, and the closest is kept; on the
mixtures that picked the grid that trains better in 10 of 12 cases (one tie, one miss; README, "Fit your own
table"). The errors that decide are the few samples a coarse grid sends to another mode (about 1 in 100 on the
mixtures), so the check needs about a thousand noises: at 256 it saw none and chose the wrong grid on the SD3 form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .config import DistillConfig, offset_seed
from .params import EPDParams
from .solver import Denoiser, initial_state, sample
from .teachers import subdivide, teacher_trajectory

__all__ = ["start_errors", "held_out_noises"]

CHUNK = 16  # noises per model call of a held-out check (rounded up to a multiple of the training batch)


def held_out_noises(
    config: DistillConfig, offset: int, count: int, shape: tuple[int, ...], flow: bool, t0: torch.Tensor,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """Starting states of at least ``count`` noises that training never sees, drawn from ``config.seed + offset``
    in chunks of a multiple of ``config.batch`` (so a conditioning batch tiles as in training), scaled to ``t0``
    unless ``flow``."""
    gen = torch.Generator().manual_seed(offset_seed(config.seed, offset))
    chunk = config.batch * -(-CHUNK // config.batch)
    for _ in range(-(-count // chunk)):
        noise = torch.randn((chunk, *shape), generator=gen, dtype=torch.float64).to(t0.device, dtype)
        yield initial_state(noise, t0, flow)


@torch.no_grad()
def start_errors(
    denoiser: Denoiser,
    starts: dict[str, tuple[EPDParams, torch.Tensor]],
    shape: tuple[int, ...],
    config: DistillConfig,
    dtype: torch.dtype = torch.float64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """RMS distance of each untrained start table's sample to the training teacher at the grids' last point.

    ``starts`` maps a name to a table and its grid (all grids share their ends). The teacher runs on the union of
    the grids with ``config.teacher_m`` points inside every interval, so that it favours no candidate. The noises
    (at least ``config.start_noises``) come in batches of a multiple of ``config.batch`` (so a conditioning batch
    tiles as in training), drawn from ``config.seed + 3``, apart from training's and the held-out check's.
    ``progress(done, noises)`` is called after every batch (raise to stop).
    """
    if config.start_noises < 1:
        raise ValueError("a start check needs start_noises >= 1 (0 means no check: keep the first start)")
    starts = {name: (params, grid if isinstance(grid, torch.Tensor) else torch.tensor(grid, dtype=torch.float64))
              for name, (params, grid) in starts.items()}  # fmt: skip
    grids = [g for _, g in starts.values()]
    ends = grids[0][[0, -1]]
    if any(not torch.allclose(g[[0, -1]], ends) for g in grids):
        raise ValueError("start tables to compare must share the first and last time point")
    flow = next(iter(starts.values()))[0].is_flow
    union = torch.unique(torch.cat([g.to(grids[0]) for g in grids])).flip(0)
    fine = subdivide(union, config.teacher_m)
    noises = config.start_noises
    sums, count = dict.fromkeys(starts, 0.0), 0
    for x in held_out_noises(config, 3, noises, shape, flow, ends[0], dtype):
        teacher = teacher_trajectory(denoiser, x, fine, config.teacher)[-1]
        for name, (params, grid) in starts.items():
            sums[name] += float(((sample(denoiser, x, grid.cpu(), params) - teacher).double() ** 2).sum())
        count += x.shape[0]
        if progress is not None:
            progress(min(count, noises), noises)
    per_value = count * teacher[0].numel()
    return {name: (total / per_value) ** 0.5 for name, total in sums.items()}
