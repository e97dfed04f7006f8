"""Catch a distillation run that diverges: its table checked on held-out noises against a fine teacher.

More iterations do not always help: on the SD3-form multimodal mixture at NFE 5 the global objective at lr 0.01
rose from a loss of 0.061 to 0.141 and ended further from the teacher (0.363 RMS on 32 held-out noises) than its
untrained start (0.242). So the run checks its table at the start and after every tenth of the iterations on the
same held-out noises, and if the last table's error is more than :data:`DIVERGED` times the best check's, it ends
with the best checked table (and grid) instead.

The checks are a weak judge, which is why EPD Distill leaves them off (``keep_best = 0``): a few hundred noises
measure the typical sample's error, while the RMSE over thousands is decided by the rare samples that change mode,
and the global objective trades one for the other. On the SD1.5-form reference mixture at NFE 10 the checks' error
rose from 0.0028 to 0.0045 over the run while the 8,192-noise RMSE fell to 0.030 (the guard's choice: 0.055); over
the 18 mixture cases the guard fired in 7, better in 3, worse in 4 (README, "Divergence guard").
"""

from __future__ import annotations

import torch

from .config import DIVERGED, DistillConfig
from .params import EPDParams
from .solver import Denoiser, sample
from .starts import held_out_noises
from .teachers import subdivide, teacher_end

__all__ = ["HeldOutCheck", "check_iterations", "CHECKS", "DIVERGED"]

CHECKS = 10  # checks over a run, besides the start's


def check_iterations(iterations: int) -> list[int]:
    """The iterations after which the table is checked: 0 (the untrained start) and every tenth of the run, the
    last one included (every iteration of a run shorter than :data:`CHECKS`)."""
    return sorted({round(iterations * j / CHECKS) for j in range(CHECKS + 1)})


class HeldOutCheck:
    """RMS distance of a table's samples to the teacher with ``2M + 1`` points per step, on ``config.keep_best``
    noises (or the next multiple of the training batch, so a conditioning batch tiles as in training) drawn from
    ``config.seed + 4``, apart from the other checks'. The reference is computed once, along ``grid``; the
    samples end as training fits them (with ``config.final_estimate``: the last step's own x0 estimate, against
    the model's denoised teacher endpoint)."""

    def __init__(
        self, denoiser: Denoiser, start: EPDParams, grid: torch.Tensor, shape: tuple[int, ...],
        config: DistillConfig, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        if config.keep_best < 1:
            raise ValueError("a held-out check needs keep_best >= 1 noises (0 means no check)")
        self.denoiser, self.estimate = denoiser, config.final_estimate
        grid = grid if isinstance(grid, torch.Tensor) else torch.tensor(grid, dtype=torch.float64)
        fine = subdivide(grid.detach(), 2 * config.teacher_m + 1)
        self.noises: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        with torch.no_grad():
            for x in held_out_noises(config, 4, config.keep_best, shape, start.is_flow, grid[0], dtype):
                self.noises.append(x)
                self.targets.append(teacher_end(denoiser, x, fine, config.teacher, self.estimate))

    @property
    def size(self) -> int:
        """How many held-out noises the check samples."""
        return sum(x.shape[0] for x in self.noises)

    @torch.no_grad()
    def __call__(self, params: EPDParams, grid: torch.Tensor) -> float:
        """The held-out RMS error of ``params`` sampled along ``grid``."""
        sigmas = grid.detach().cpu().double()
        if self.estimate:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        final = "estimate" if self.estimate else "denoise"
        total, count = 0.0, 0
        for x, target in zip(self.noises, self.targets, strict=True):
            out = sample(self.denoiser, x, sigmas, params, final=final)
            total += float(((out - target).double() ** 2).sum())
            count += target.numel()
        return (total / count) ** 0.5
