"""Training hyper-parameters: the one source of defaults, choices and checks for the core, the CLI and the nodes.

One field per hyper-parameter, with its help text; a config validates itself
on creation and is recorded as the table's provenance (:meth:`provenance`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .bases import BASES
from .teachers import TEACHERS

__all__ = ["DistillConfig", "NODE_DISTILL", "NODE_NFE", "NODE_POINTS", "NODE_RDPO_TEACHER_M", "node_iterations",
           "AUTO_ITERATIONS", "NODE_SCALE_BOUNDS", "NODE_SCALE_HEADS_UP_TO_NFE", "node_scale_bounds", "RDPOConfig",
           "OBJECTIVES", "WEIGHTINGS", "GRADIENTS", "add_arguments", "from_arguments"]  # fmt: skip

OBJECTIVES = ("local", "global", "authors")
WEIGHTINGS = ("uniform", "snr")
GRADIENTS = ("autograd", "fd")
DIVERGED = 1.25  # keep_best: the last table is replaced when its check error exceeds the best check's by this factor


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


class _Config:
    """Shared behaviour of the configs: checks, provenance, help texts."""

    def _check_common(self) -> None:
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
            elif isinstance(f.default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
                if f.name == "seed" and not -(2**63) <= value < 2**64:  # torch's generators' range
                    raise ValueError(f"seed must be in [-2**63, 2**64), got {value}")
            elif isinstance(f.default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}")

    def provenance(self) -> dict[str, Any]:
        """The hyper-parameters as recorded in a trained table's metadata."""
        return asdict(self)

    @classmethod
    def _field(cls, name: str) -> Any:
        found = next((f for f in fields(cls) if f.name == name), None)
        if found is None:
            raise KeyError(f"{cls.__name__} has no hyper-parameter {name!r}")
        return found

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of one hyper-parameter (node tooltips and CLI help)."""
        return cls._field(name).metadata["help"]

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one hyper-parameter."""
        default = cls._field(name).default
        if default is MISSING:
            raise KeyError(f"{cls.__name__}.{name} has no default")
        return default

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The allowed values of a choice hyper-parameter."""
        return cls._field(name).metadata["choices"]


@dataclass(frozen=True)
class DistillConfig(_Config):
    """Stage 1: fit a table to a many-step teacher (:func:`epd_core.distill.distill`)."""

    iterations: int = _opt(200, "optimisation steps (Adam, cosine learning-rate decay)")
    batch: int = _opt(4, "starting noises per iteration")
    teacher: str = _opt("dpm2", "teacher solver", TEACHERS)
    teacher_m: int = _opt(3, "teacher points inside each student step (M)")
    lr: float = _opt(1e-2, "Adam learning rate")
    seed: int = _opt(0, "seed of the training noises")
    learn_grid: bool = _opt(False, "also learn the interior time points (stored in the table)")
    grid_lr: float = _opt(0.0, "with learn_grid: Adam learning rate of the grid's log-gap logits; 0: lr")
    gradient: str = _opt("autograd", "autograd: backpropagate through the model; fd: finite differences", GRADIENTS)
    weighting: str = _opt("uniform", "per-step loss weights: uniform (the authors') or 1/(1+t^2) (snr)", WEIGHTINGS)
    plugin_base: str = _opt("euler", "fit the table for EPD Plugin over this base (euler = the EPD solver)", BASES)
    objective: str = _opt(
        "local",
        "local: per-step loss from the student's detached state, one update per iteration; global: the final "
        "state's error; authors: the authors' loop (an Adam step after every student step, the rollout not "
        "detached, no gradient clipping, cosine decay to an lr floor of 0.01)",
        OBJECTIVES,
    )
    final_estimate: bool = _opt(False, "fit the last step extended to sigma 0 (final_step 'estimate', no call)")
    start_noises: int = _opt(
        1024,
        "held-out noises of the untrained check that picks the start grid where there is a choice (EPD Distill's "
        "carry tables: the pack's grid or the model's): each start samples them against the teacher, about a "
        "thirtieth of the model evaluations of training with EPD Distill's defaults at NFE 5, a fifteenth at NFE "
        "10; 0: no check, the pack's grid. "
        "Fewer than about 1,000 miss the rare samples that change mode, which decide the choice",
    )
    micro_batch: int = _opt(
        0,
        "noises backpropagated together (memory: the objectives through the rollout keep every step's graph); the "
        "gradient is the whole batch's; 0: the whole batch. Rounded up to whole sets of a conditioning's prompts "
        "(the lcm of the positive's and the negative's counts when they differ); "
        "not for the authors' objective, whose loop steps after each student step on the whole batch's rollout",
    )
    keep_best: int = _opt(
        0,
        "held-out noises of a check at the start and after every tenth of the run against a 2x finer teacher: a "
        f"run whose last table is more than {DIVERGED}x further from it than the best checked one (a run that "
        "diverged) ends with the best. 0: no checks. EPD tables; not with a feature loss or a plugin base",
    )
    robust: float = _opt(
        0.0,
        "pseudo-Huber scale c of each sample's mean squared error e: the loss is 2c(sqrt(e + c^2) - c), e itself "
        "for e << c^2 and growing like sqrt(e) beyond, so the rare samples that change mode do not set the "
        "gradient's direction alone; 0: the mean squared error",
    )
    afs_mean: bool = _opt(
        True,
        "with the analytic first step: estimate the data's per-channel mean (the model's denoised average at the "
        "first time point) and store it in the table (mean-aware AFS)",
    )

    def __post_init__(self) -> None:
        self._check_common()
        counts = (self.teacher_m, self.start_noises, self.micro_batch, self.keep_best)
        if self.iterations < 1 or self.batch < 1 or min(counts) < 0:
            raise ValueError("iterations and batch must be >= 1, teacher_m, start_noises, micro_batch and keep_best "
                             ">= 0")  # fmt: skip
        if self.robust < 0:
            raise ValueError(f"robust must be >= 0, got {self.robust}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grid_lr < 0:
            raise ValueError(f"grid_lr must be >= 0 (0: lr), got {self.grid_lr}")
        if self.objective in ("global", "authors") and self.gradient != "autograd":
            raise ValueError(f"objective={self.objective!r} backpropagates through the trajectory: it needs "
                             "gradient='autograd'")  # fmt: skip
        if self.final_estimate and self.plugin_base != "euler":
            raise ValueError("final_estimate extends an EPD step to 0; it has no meaning for a plugin table")

    @classmethod
    def node_default(cls, name: str) -> Any:
        """EPD Distill's default of one hyper-parameter (:data:`NODE_DISTILL`, else the config's)."""
        return NODE_DISTILL.get(name, cls.default(name))


# EPD Distill's defaults where they differ from DistillConfig's (which the CLI, the Python API and the bundled tables'
# recorded commands keep): the recipe the benchmark chose for a user who only picks the NFE (``python -m
# bench.defaults``, README "What EPD Distill's defaults give"). The whole trajectory answers for the end result
# (``global``), fitted for the free final estimate, with a learned grid, on 16 noises per Adam step (as 32 x 400 the
# mixtures' NFE-10 targets were met in 4 of 9 cases, as 16 x 800 in 6; README "Budget split") for 1,600 steps from NFE
# 10 on (25,600 noises; 800 at NFE 10 met 6 of 9, 1,600 8 of 9) and below NFE 10 as many more steps as keep NFE 10's
# cost (NFE 5: 3,200, which met the NFE-5 target in 17 of 18 runs where 1,600 met 13; README "Iterations by the NFE";
# the iterations input's 0, "auto": :func:`node_iterations`), backpropagated 4 noises at a time, against a teacher
# with M = 7 points inside every step: with M = 3 the teacher was the ceiling at NFE 10 (on the SD3-form wide mixture
# 0.018 from the exact solution, the best built-in 0.020; M = 7: 0.004; bench.diagnose). Each sample's error goes
# through a pseudo-Huber loss (robust = 0.01): on the 18 mixture cases the samples that stay in their mode came out
# 2.4x closer to the exact solution (all 18), the distributions closer in 14, the RMSE and the targets met unchanged
# (README, "Robust loss"). The divergence guard (keep_best) stays off: it misjudged a run that trained well (README,
# "Divergence guard").
NODE_DISTILL: dict[str, Any] = {"objective": "global", "final_estimate": True, "learn_grid": True, "batch": 16,
                                "iterations": 0, "micro_batch": 4, "teacher_m": 7, "robust": 0.01}  # fmt: skip
NODE_NFE = 10  # EPD Distill's nfe input
NODE_POINTS = 3  # EPD Distill's points input: K of a new table (the bundled analytic tables' K; the benchmark's recipe)
NODE_RDPO_TEACHER_M = 4  # EPD RDPO's teacher_m: teacher points per step of the fidelity reward's reference
NODE_ITERATIONS = 1600  # EPD Distill's Adam steps from NFE NODE_ITERATIONS_NFE on (below: that NFE's cost, more steps)
NODE_ITERATIONS_NFE = 10


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset`` for a run's other random streams, within the 64 bits a generator takes (a seed near the
    top of the nodes' range overflowed)."""
    return (seed + offset) % 2**64


def node_iterations(nfe: int) -> int:
    """EPD Distill's iterations when its input is 0 (auto): 1,600 from NFE 10 on, ``16,000 / NFE`` below (3,200 at
    NFE 5, 4,000 at NFE 4). An iteration's model evaluations grow with the NFE (teacher and student walk NFE steps), so
    below NFE 10 the same cost buys more steps: at NFE 10 the 1,600 steps met the target on 8 of 9 mixtures where 800
    met 6; at NFE 5 the 3,200 steps met it in 17 of 18 runs (two seeds) where 1,600 met 13 (README, "Iterations by
    the NFE")."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return max(NODE_ITERATIONS, round(NODE_ITERATIONS * NODE_ITERATIONS_NFE / nfe))


# EPD Distill's help for iterations = 0.
AUTO_ITERATIONS = (
    f"0: auto, {NODE_ITERATIONS:,} from NFE {NODE_ITERATIONS_NFE} on and "
    f"{NODE_ITERATIONS * NODE_ITERATIONS_NFE:,} / NFE below (NFE 5: {node_iterations(5):,}), as many as keep NFE "
    f"{NODE_ITERATIONS_NFE}'s training time"
)


# EPD Distill's scale heads when its scale_dir / scale_time inputs are -1 (auto): every point's direction scale c and
# time scale a learned within 1 +- these bounds up to NFE 7, none (c = a = 1) above. On the nine mixtures
# (bench.defaults, 8,192 noises) the heads were better at NFE 5 in 14 of 18 runs over two training seeds (targets met
# 5 -> 6 and 5 -> 7 of 9), at NFE 7 in 7 of 9 (RMSE 1.18x lower, geometric mean), at NFE 10 in 4 of 9 (met 6 -> 5; 800
# iterations then). README, "Scale heads by the NFE"; NFE 6, 8 and 9 are not measured.
NODE_SCALE_BOUNDS = {"scale_dir": 0.2, "scale_time": 0.1}
NODE_SCALE_HEADS_UP_TO_NFE = 7


def node_scale_bounds(nfe: int) -> dict[str, float]:
    """EPD Distill's scale-head bounds for inputs at -1 (auto): :data:`NODE_SCALE_BOUNDS` up to
    :data:`NODE_SCALE_HEADS_UP_TO_NFE`, 0 (no head) above."""
    learned = nfe <= NODE_SCALE_HEADS_UP_TO_NFE
    return {name: bound if learned else 0.0 for name, bound in NODE_SCALE_BOUNDS.items()}


GROUPINGS = ("noise", "prompt")
GUARD_ACTIONS = ("warn", "stop")


@dataclass(frozen=True)
class RDPOConfig(_Config):
    """Stage 2: RDPO fine-tuning of a table against a reward (:func:`epd_core.rdpo.rdpo`).

    :meth:`authors` gives the authors' settings (``training/ppo`` of ``BeierZhu/EPD``, branch ``EPD-Solver++``).
    """

    iterations: int = _opt(50, "rollout + PPO iterations")
    groups: int = _opt(
        8,
        "leave-one-out groups per iteration (rounded up to a multiple of the number of prompts; of the lcm of the "
        "positive's and the negative's when they differ)",
    )
    k: int = _opt(4, "rollouts per group (leave-one-out group size)")
    grouping: str = _opt(
        "noise",
        "what a group's k rollouts share: noise (one noise and prompt, k sampled tables; ours) or prompt (one "
        "prompt, k noises and k tables; the authors' preset, whose code mixes prompts in a group)",
        GROUPINGS,
    )
    minibatch: int = _opt(16, "rollouts per PPO minibatch")
    concentration: float = _opt(20.0, "Dirichlet concentration around the start table (20 SD1.5, 10 SD3/Flux)")
    lr: float = _opt(7e-5, "Adam learning rate of the residual policy")
    clip: float = _opt(0.2, "PPO ratio clip")
    scale_heads: bool = _opt(True, "also train scale_dir / scale_time where the table bounds them (log-normal)")
    scale_std: float = _opt(
        0.02, "standard deviation of log(scale) in the log-normal heads (initial one with learn_std)"
    )
    learn_std: bool = _opt(False, "the scale heads also learn their log-std per step and point (the authors')")
    width: int = _opt(256, "width of the residual network")
    blocks: int = _opt(2, "residual blocks")
    seed: int = _opt(0, "seed of noises, sampled tables and the network's initial weights")
    guard_every: int = _opt(5, "check the guard metric (when one is given) every N iterations; 0: never")
    guard_tolerance: float = _opt(0.05, "the guard metric may get this much worse (relative to the start) before "
                                        "the guard acts")  # fmt: skip
    guard_action: str = _opt("stop", "when the guard metric degrades: warn, or stop and keep the last good table",
                             GUARD_ACTIONS)  # fmt: skip

    def __post_init__(self) -> None:
        self._check_common()
        if min(self.iterations, self.groups, self.minibatch, self.width, self.blocks) < 1 or self.k < 2:
            raise ValueError("iterations, groups, minibatch, width and blocks must be >= 1 and k >= 2")
        for name in ("concentration", "lr", "clip", "scale_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.guard_every < 0 or self.guard_tolerance < 0:
            raise ValueError("guard_every and guard_tolerance must be >= 0")

    @classmethod
    def authors(cls, **override: Any) -> RDPOConfig:
        """The authors' settings: groups of k rollouts with their own noises (one prompt each; the authors' code mixes
        prompts in a group, README "Stage 2: RDPO"), learnable log-std
        of the scale heads starting at 0.05, width 128 with 2 blocks, concentration 20 (SD1.5; 10 for SD3),
        PPO clip 0.2, lr 7e-5, minibatch 4 (``cfgs/sd15.yaml``); ``override`` changes any of them."""
        preset = dict(grouping="prompt", learn_std=True, scale_std=0.05, width=128, blocks=2, concentration=20.0,
                      clip=0.2, lr=7e-5, minibatch=4)  # fmt: skip
        return cls(**{**preset, **override})


PRESETS = ("ours", "authors")


def rdpo_preset(name: str, **override: Any) -> RDPOConfig:
    """``RDPOConfig`` of a named preset (:data:`PRESETS`) with ``override``."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    return RDPOConfig.authors(**override) if name == "authors" else RDPOConfig(**override)


def add_arguments(parser: argparse.ArgumentParser, cls: type[_Config], skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per hyper-parameter of ``cls``, with its default, choices and help."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])  # fmt: skip
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"] + " (default: %(default)s)")  # fmt: skip


def from_arguments(args: argparse.Namespace, cls: type[_Config], **override: Any) -> Any:
    """The config of ``cls`` from parsed :func:`add_arguments` flags."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **override})
