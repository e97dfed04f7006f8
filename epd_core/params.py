"""EPD parameter tables.

Per solver step ``i`` (``num_steps - 1`` steps) and intermediate point ``k``
(``num_points`` of them) a table holds four raw values, stored as released
by the authors (logits) and decoded at use:

* ``r``          position of point k inside step i, ``tau_k = t_next**r * t_cur**(1 - r)``;
                 ``r = sigmoid(r_params)``.
* ``weight``     simplex weight of direction k; ``softmax(weight_s)`` over points.
* ``scale_dir``  direction scale ``c_k`` near 1; with bound ``s_d`` (hyper-parameter
                 ``scale_dir``) ``c = 2 * sigmoid(0.5 * p) * s_d + (1 - s_d)``, else 1.
* ``scale_time`` time scale ``a_k``: the model is evaluated at ``a_k * tau_k``; same form.

With ``fcn`` the last step's ``scale_dir`` is forced to 1.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from .schedules import SCHEDULE_TYPES, make_schedule

# The largest published tables have 11 time points and 2 points per step (bundled: 4), the nodes train up to 65 and 8:
# these bounds leave ample room and keep sampling, training, previews and listings of a table small.
MAX_TIME_POINTS = 257
MAX_POINTS = 64

__all__ = [
    "EPDParams", "Decoded", "decode", "time_points_for_nfe", "STUDENTS", "DEFAULT_STUDENT", "BACKENDS", "TABLE_NAMES",
]  # fmt: skip

STUDENTS = ("epd", "ipndm", "carry")
DEFAULT_STUDENT = "carry"  # what EPD Distill fits unless told otherwise (measured better at equal NFE; README)
BACKENDS = ("edm", "ldm", "sd3", "flux")
TABLE_NAMES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")
MAX_CHANNELS = 256  # latent channels an afs_mean may have
# Metadata that describes one training run (how it sampled, what it was fed), not carried to a table trained from it
RUN_METADATA = ("plugin_base", "fallback", "feature_loss", "prompts", "start", "teacher_steps", "reward_prompt",
                "reward_model", "distilled", "rdpo")  # fmt: skip
# Metadata that says where one file came from (the model it was fitted to, the command, the download); a table trained
# from it records these under ``trained_from`` (newest first, at most TRAINED_FROM_DEPTH) instead of claiming them
SOURCE_METADATA = ("model", "tool", "command", "cfg", "source_file", "source_sha256", "source_url", "downloaded_from",
                   "catalogue_entry", "rdpo_start_file", "created_by")  # fmt: skip
TRAINED_FROM_DEPTH = 8
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # a table's tensors (not float8)
SIGMA_RANGE = (1e-8, 1e5)  # where a table's own grid must lie (beyond it x * sigma overflows or d = x / sigma does)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 4


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a file's value can be any size)."""
    return _SHORT.repr(value)


def counted(n: int, noun: str) -> str:
    """``"1 step"``, ``"3 steps"``: a count and its noun, in the singular where the count is 1."""
    return f"{n} {noun}{'s' * (n != 1)}"


class Decoded(NamedTuple):
    """Per-step values a solver step uses, each ``[num_steps - 1, num_points]``."""

    r: torch.Tensor
    weight: torch.Tensor
    scale_dir: torch.Tensor
    scale_time: torch.Tensor


def time_points_for_nfe(nfe: int, student: str = "epd", afs: bool = True) -> tuple[int, bool]:
    """``(num_steps, afs)`` of a table with this NFE (the inverse of :attr:`EPDParams.nfe`).

    ``epd`` / ``ipndm``: two rounds per step, one less with the analytic first step, so odd NFE uses AFS.
    ``carry``: one round per step; with AFS ``nfe`` steps, without (``afs=False``: a plain first prediction,
    then one round per step) ``nfe - 1`` steps.
    """
    if student == "carry":
        least = 1 if afs else 2
        if nfe < least:
            raise ValueError(f"a carry table needs NFE >= {least}, got {nfe}")
        return (nfe + 1, True) if afs else (nfe, False)
    if nfe < 2:
        raise ValueError(f"an EPD table needs NFE >= 2, got {nfe}")
    return nfe // 2 + 1 + nfe % 2, bool(nfe % 2)


def _bounded_scale(raw: torch.Tensor, bound: float) -> torch.Tensor:
    if not bound:
        return torch.ones_like(raw)
    return 2 * torch.sigmoid(0.5 * raw) * bound + (1 - bound)


def decode(
    r_params: torch.Tensor,
    weight_s: torch.Tensor,
    scale_dir_params: torch.Tensor,
    scale_time_params: torch.Tensor,
    scale_dir: float,
    scale_time: float,
    fcn: bool,
) -> Decoded:
    """Raw tables to per-step values (differentiable; used by sampling and by training)."""
    r = torch.sigmoid(r_params)
    weight = torch.softmax(weight_s, dim=-1)
    c = _bounded_scale(scale_dir_params, scale_dir)
    a = _bounded_scale(scale_time_params, scale_time)
    if fcn:
        c = torch.cat([c[:-1], torch.ones_like(c[-1:])])
    return Decoded(r, weight, c, a)


def _check_counts(num_steps: int, num_points: int) -> None:
    """2..MAX_TIME_POINTS time points and 1..MAX_POINTS points per step: a larger table would not load again."""
    if not 2 <= num_steps <= MAX_TIME_POINTS:
        raise ValueError(f"EPDParams.num_steps: must be in 2..{MAX_TIME_POINTS} time points, got {num_steps}")
    if not 1 <= num_points <= MAX_POINTS:
        raise ValueError(f"EPDParams.num_points: must be in 1..{MAX_POINTS} points per step, got {num_points}")


@dataclass(frozen=True, eq=False)
class EPDParams:
    """An immutable EPD table and the hyper-parameters it was trained with.

    ``backend`` is the model family: ``edm`` (pixel VE), ``ldm`` (SD-style
    discrete VP), ``sd3`` (flow, static shift) or ``flux`` (flow, dynamic
    ``mu``). ``t_steps`` optionally carries the table's own (learned) grid.
    ``afs_mean`` optionally carries the data's per-channel mean for a mean-aware
    analytic first step (see :func:`~epd_core.solver.first_direction`).
    ``metadata`` holds provenance (source file, sha256, tool, ...).
    """

    r_params: torch.Tensor
    weight_s: torch.Tensor
    scale_dir_params: torch.Tensor
    scale_time_params: torch.Tensor
    num_steps: int
    num_points: int
    student: str = "epd"
    max_order: int = 4
    schedule_type: str = "polynomial"
    schedule_rho: float = 7.0
    afs: bool = False
    scale_dir: float = 0.0
    scale_time: float = 0.0
    fcn: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    flowmatch_shift: float | None = None
    flowmatch_mu: float | None = None
    backend: str = "edm"
    teacher: str | None = None
    teacher_steps_m: int | None = None
    guidance_type: str | None = None
    guidance_rate: float | None = None
    dataset_name: str | None = None
    t_steps: torch.Tensor | None = None
    afs_mean: torch.Tensor | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"EPDParams.{name}: {why}")

        for name in ("num_steps", "num_points", "max_order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's integers too
                fail(name, f"must be an integer, got {shown(value)}")
            object.__setattr__(self, name, int(value))
        _check_counts(self.num_steps, self.num_points)
        if not 1 <= self.max_order <= 4:
            fail("max_order", f"must be in 1..4, got {self.max_order}")
        if self.student not in STUDENTS:
            fail("student", f"must be one of {STUDENTS}, got {shown(self.student)}")
        if self.schedule_type not in SCHEDULE_TYPES:
            fail("schedule_type", f"must be one of {SCHEDULE_TYPES}, got {shown(self.schedule_type)}")
        if self.backend not in BACKENDS:
            fail("backend", f"must be one of {BACKENDS}, got {shown(self.backend)}")
        for name in ("teacher", "guidance_type", "dataset_name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, f"must be text or None, got {shown(getattr(self, name))}")
        value = self.teacher_steps_m
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            fail("teacher_steps_m", f"must be a count or None, got {shown(value)}")
        shape = (self.num_steps - 1, self.num_points)
        for name in TABLE_NAMES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
                fail(name, "must be a float16, bfloat16, float32 or float64 tensor")
            if tuple(value.shape) != shape:
                fail(name, f"shape {tuple(value.shape)} does not match (num_steps - 1, num_points) = {shape}")
            if not torch.isfinite(value).all():
                fail(name, "holds non-finite values")
            object.__setattr__(self, name, value.detach().to("cpu").clone())
        for name in ("schedule_rho", "scale_dir", "scale_time"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                fail(name, f"must be a finite number, got {shown(value)}")
            object.__setattr__(self, name, float(value))
        if self.schedule_rho <= 0:
            fail("schedule_rho", "must be > 0")
        for name in ("scale_dir", "scale_time"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, f"bound must be in [0, 1), got {getattr(self, name)}")
        for name in ("sigma_min", "sigma_max", "flowmatch_shift", "flowmatch_mu", "guidance_rate"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                fail(name, f"must be a finite number or None, got {shown(value)}")
            object.__setattr__(self, name, float(value))
        for name in ("sigma_min", "sigma_max", "flowmatch_shift"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(name, f"must be > 0, got {value}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            fail("sigma_min", "must be below sigma_max")
        if self.t_steps is not None:
            t = self.t_steps
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.num_steps,) or t.dtype not in FLOAT_DTYPES:
                fail("t_steps", f"must be a float tensor of shape ({self.num_steps},)")
            t = t.detach().to("cpu", torch.float64).clone()
            if not torch.isfinite(t).all() or not (t > 0).all() or not (t[1:] < t[:-1]).all():
                fail("t_steps", "must be finite, positive and strictly decreasing")
            object.__setattr__(self, "t_steps", t)
        if self.afs_mean is not None:
            m = self.afs_mean
            shaped = isinstance(m, torch.Tensor) and m.ndim == 1 and 1 <= m.numel() <= MAX_CHANNELS
            if not shaped or m.dtype not in FLOAT_DTYPES:
                fail("afs_mean", f"must be a 1-D float tensor of 1 to {MAX_CHANNELS} per-channel means")
            m = m.detach().to("cpu", torch.float64).clone()
            if not torch.isfinite(m).all() or float(m.abs().max()) > 1e4:
                fail("afs_mean", "must be finite and at most 1e4 in size")
            object.__setattr__(self, "afs_mean", m)
        for name in ("afs", "fcn"):
            if not isinstance(getattr(self, name), bool):  # bool("false") would be True
                fail(name, f"must be true or false, got {shown(getattr(self, name))}")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        try:  # values each in range can still make no grid (rho 0.001: sigma_max ** 1000)
            grid = make_schedule(self)
        except (OverflowError, ZeroDivisionError, ValueError) as exc:
            grid = torch.tensor([math.nan])
            why = f" ({exc})"
        else:
            why = ""
        lo, hi = SIGMA_RANGE
        if not (torch.isfinite(grid).all() and (grid[1:] < grid[:-1]).all() and lo <= grid[-1] and grid[0] <= hi):
            fail("schedule", f"the table's own time grid is not decreasing within [{lo:g}, {hi:g}]{why}; check "
                             "sigma_min, sigma_max, schedule_rho, flowmatch_shift and flowmatch_mu")  # fmt: skip

    def carried_metadata(self) -> dict[str, Any]:
        """What a table trained from this one keeps of its metadata: all but :data:`RUN_METADATA`, with this table's
        :data:`SOURCE_METADATA` moved to the front of ``trained_from`` (so the new table does not claim this one's
        model, command or download)."""
        kept = {k: v for k, v in self.metadata.items() if k not in RUN_METADATA and k not in SOURCE_METADATA}
        source = {k: self.metadata[k] for k in SOURCE_METADATA if k in self.metadata}
        earlier = self.metadata.get("trained_from")
        chain = ([source] if source else []) + (list(earlier) if isinstance(earlier, (list, tuple)) else [])
        kept.pop("trained_from", None)
        return {**kept, "trained_from": chain[:TRAINED_FROM_DEPTH]} if chain else kept

    @property
    def is_flow(self) -> bool:
        """True for rectified-flow tables (SD3, FLUX)."""
        return self.schedule_type == "flowmatch" or self.backend in ("sd3", "flux")

    @property
    def nfe(self) -> int:
        """Sequential model rounds, as the papers count: two per step (K points in parallel), one less with AFS;
        a ``carry`` table one per step (plus one without AFS)."""
        steps = self.num_steps - 1
        if self.student == "carry":
            return steps + (0 if self.afs else 1)
        return 2 * steps - (1 if self.afs else 0)

    @property
    def evaluations(self) -> int:
        """Network evaluations per sample (the K points each count)."""
        steps = self.num_steps - 1
        if self.student == "carry":
            return steps * self.num_points + (0 if self.afs else 1)
        return steps * (1 + self.num_points) - (1 if self.afs else 0)

    def decoded(self, dtype: torch.dtype = torch.float64) -> Decoded:
        """The per-step ``r``, ``weight``, ``scale_dir``, ``scale_time`` exactly as the authors compute them."""
        raw = [getattr(self, name).to(dtype) for name in TABLE_NAMES]
        return decode(*raw, self.scale_dir, self.scale_time, self.fcn)

    @classmethod
    def start(cls, num_steps: int, num_points: int = 2, **hyper: Any) -> EPDParams:
        """The untrained starting table: ``r = (k + 1) / (K + 1)`` in every step (``carry``: ``(k + 1/2) / (K + 1)``,
        nearer the start, where its carried direction is accurate), equal weights, unit scales."""
        _check_counts(num_steps, num_points)
        first = 0.5 if hyper.get("student") == "carry" else 1.0
        r = torch.tensor([(k + first) / (num_points + 1) for k in range(num_points)], dtype=torch.float32)
        zeros = torch.zeros(num_steps - 1, num_points)
        return cls(
            r_params=torch.logit(r).expand(num_steps - 1, num_points).clone(),
            weight_s=zeros,
            scale_dir_params=zeros,
            scale_time_params=zeros,
            num_steps=num_steps,
            num_points=num_points,
            **hyper,
        )

    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters as a JSON-friendly dict (no tables, no grid, no metadata)."""
        skip = set(TABLE_NAMES) | {"t_steps", "afs_mean", "metadata"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def replace(self, **changes: Any) -> EPDParams:
        """A copy with some fields changed (validated again)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return EPDParams(**current)

    def has_scale_head(self, name: str) -> bool:
        """Whether the table has the ``scale_dir`` / ``scale_time`` head: a bound (under a bound of 0 its raw values,
        which some authors' tables store, are unused: every scale is 1)."""
        return getattr(self, name) != 0

    def with_scale_bounds(self, **bounds: float) -> EPDParams:
        """A copy whose ``scale_dir`` / ``scale_time`` heads are bounded by ``bounds``, so that training learns them.
        It samples as before: only a table without the head (:meth:`has_scale_head`) or with that bound already is
        allowed, since other heads would decode to other scales. A new head starts at zero raw values (scales 1)."""
        changes: dict[str, Any] = dict(bounds)
        for name, bound in bounds.items():
            if name not in ("scale_dir", "scale_time"):
                raise ValueError(f"with_scale_bounds: no scale head {name!r} (scale_dir, scale_time)")
            current = getattr(self, name)
            if current != bound and self.has_scale_head(name):
                raise ValueError(f"the table bounds {name} at {current}; bounding it at {bound} would change its "
                                 "scales (keep the table's bound)")  # fmt: skip
            if not self.has_scale_head(name):
                changes[f"{name}_params"] = torch.zeros_like(getattr(self, f"{name}_params"))
        return self.replace(**changes)
