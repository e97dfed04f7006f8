"""A picture of an EPD table: each step's interval on a log-sigma axis, its points and their weights."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..epd_core import EPDParams, make_schedule
from ..epd_core.params import counted
from ..epd_core.solver import point_times

_BG, _AXIS, _POINT, _TEXT = (250, 250, 247), (120, 120, 120), (214, 96, 39), (30, 30, 30)
MAX_ROWS = 56  # steps drawn; the image stays below 760 x 2,330 pixels whatever the table
MAX_MARKS = 16  # points drawn per step


def table_shape(params: EPDParams) -> str:
    """``"3 steps x 2 points"``, in the singular where a count is 1."""
    return f"{counted(params.num_steps - 1, 'step')} x {counted(params.num_points, 'point')}"


def _values(draw: ImageDraw.ImageDraw, name: str, values: list[float], room: float) -> str:
    """``name`` and the values (two decimals), as many whole values as fit ``room`` pixels, then a count of the rest."""
    text = f"{name}:"
    for i, v in enumerate(values):
        longer = f"{text}  {v:.2f}"
        rest = f"  +{len(values) - i - 1} more" if i < len(values) - 1 else ""
        if draw.textlength(longer + rest) > room:
            return f"{text}  +{len(values) - i} more"
        text = longer
    return text


def draw_table(params: EPDParams, width: int = 760, row: int = 40) -> Image.Image:
    """Rows = steps. A grey bar spans [t_cur, t_next] (log scale, largest sigma left); an orange mark sits at
    each point's position r inside the interval, as tall as its weight; a / c are the time / direction scales."""
    grid = make_schedule(params)
    table = params.decoded()
    steps = params.num_steps - 1
    shown = min(steps, MAX_ROWS)
    height = 46 + row * shown + (row if shown < steps else 0)
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    left, right = 70, width - 200
    lo, hi = math.log(float(grid[-1])), math.log(float(grid[0]))

    def x_of(t: float) -> float:
        return left + (hi - math.log(t)) / (hi - lo) * (right - left)

    kind = "flow t" if params.is_flow else "sigma"
    draw.text((8, 6), f"EPD table: {table_shape(params)}, NFE {params.nfe}, "
                      f"{params.schedule_type} grid ({kind}, log scale)", fill=_TEXT)  # fmt: skip
    for t in grid.tolist()[: MAX_ROWS + 1]:
        draw.line([(x_of(t), 24), (x_of(t), height - 6)], fill=(225, 225, 222))
    if shown < steps:
        draw.text((8, 40 + row * shown), f"... {steps - shown} more steps not drawn", fill=_TEXT)
    for i in range(shown):
        y = 40 + row * i
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        draw.text((8, y - 6), f"step {i}", fill=_TEXT)
        draw.line([(x_of(t_cur), y + 10), (x_of(t_next), y + 10)], fill=_AXIS, width=3)
        taus = point_times(table.r[i], grid[i], grid[i + 1])
        for k in range(min(params.num_points, MAX_MARKS)):
            x = x_of(float(taus[k]))
            draw.rectangle([x - 2, y + 10 - 16 * float(table.weight[i, k]), x + 2, y + 10], fill=_POINT)
        a = float(table.scale_time[i].mean())
        c = float(table.scale_dir[i].mean())
        room = width - right - 12
        draw.text((right + 8, y - 10), _values(draw, "r", table.r[i].tolist(), room), fill=_TEXT)
        draw.text((right + 8, y + 1), _values(draw, "w", table.weight[i].tolist(), room), fill=_TEXT)
        draw.text((right + 8, y + 12), f"a={a:.3f} c={c:.3f}", fill=_AXIS)
    return img


def table_image(params: EPDParams) -> torch.Tensor:
    """ComfyUI IMAGE: ``[1, H, W, 3]`` floats in [0, 1]."""
    arr = np.asarray(draw_table(params), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
