"""Checkpoints of a training run (distillation, RDPO): resume after a crash or a kill with the same result.

A checkpoint is ONE ``.safetensors`` file (never a pickle): the tensors of the run's state (tables or policy
weights, Adam's moments, the random generator's state) and, in its metadata, JSON for the rest (iteration,
loss curve, scheduler and optimizer hyper-parameters, the run's configuration). It is written atomically
(a temporary file in the same folder, then a rename), so a kill at any moment leaves either the previous
checkpoint or the new one, never a half-written file. A run resumes only from a checkpoint of the same
configuration and, where the caller gives one, of the same model (its answer to a fixed probe input).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .files import EPDFileError, remove_leftovers, write_atomic

__all__ = [
    "CheckpointMismatch", "RunState", "Checkpointer", "save_checkpoint", "load_checkpoint", "interruptible", "probe",
    "PROBE_DIRECTIONS", "answers", "table_digest", "run_checkpointer", "checkpoint_notes", "checkpoint_path",
]  # fmt: skip

FORMAT = "epd-checkpoint-1"
_MAX_BYTES = 1 << 30


def checkpoint_path(table: Path) -> Path:
    """Where a run writing the table ``table`` keeps its checkpoint: ``<name>.epd-checkpoint`` beside it (not a table:
    the loader does not list it)."""
    return table.with_name(table.name.removesuffix(".safetensors") + ".epd-checkpoint")


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to another run (configuration or model)."""


class NotACheckpoint(CheckpointMismatch):
    """The file named as the checkpoint is not one (or not readable as one)."""


class RunState:
    """What a training loop needs to continue exactly: its modules' tensors, optimizer, scheduler, generator."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        generator: torch.Generator,
    ) -> None:
        self.tensors, self.optimizer, self.scheduler, self.generator = tensors, optimizer, scheduler, generator

    def pack(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON of the current state."""
        out = {f"t.{name}": value.detach().cpu().contiguous() for name, value in self.tensors.items()}
        opt = self.optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                out[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
        out["rng"] = self.generator.get_state()
        doc = {
            "param_groups": opt["param_groups"],
            "opt_keys": {str(idx): sorted(state) for idx, state in opt["state"].items()},
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        return out, doc

    def unpack(self, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`pack` (in place)."""
        with torch.no_grad():
            for name, value in self.tensors.items():
                saved = tensors[f"t.{name}"]
                if saved.shape != value.shape:
                    raise CheckpointMismatch(f"tensor {name}: shape {tuple(saved.shape)}, not {tuple(value.shape)}")
                value.copy_(saved.to(value.device, value.dtype))
        _check_like(doc["param_groups"], self.optimizer.state_dict()["param_groups"], "optimizer settings")
        if self.scheduler is not None:
            _check_like(doc["scheduler"], self.scheduler.state_dict(), "scheduler state")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {}
        for idx, keys in doc["opt_keys"].items():
            device = params[int(idx)].device
            state[int(idx)] = {key: tensors[f"opt.{idx}.{key}"].to(device if key != "step" else "cpu") for key in keys}
            for key, value in state[int(idx)].items():
                if key != "step" and value.shape != params[int(idx)].shape:
                    raise ValueError(f"optimizer {key} of parameter {idx}: shape {tuple(value.shape)}")
        self.optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
        if self.scheduler is not None:
            self.scheduler.load_state_dict(doc["scheduler"])
        self.generator.set_state(tensors["rng"])


def _check_like(saved: Any, current: Any, what: str) -> None:
    """``saved`` (JSON from a checkpoint) has the structure and value types of ``current`` (this run's own state):
    loading it sets no attribute the run does not have and no setting of another type."""
    if isinstance(current, dict):
        if not isinstance(saved, dict) or set(saved) != set(current):
            raise ValueError(f"{what}: other keys than this run's")
        for key in current:
            _check_like(saved[key], current[key], what)
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise ValueError(f"{what}: a list of another length")
        for a, b in zip(saved, current, strict=True):
            _check_like(a, b, what)
    elif not (type(saved) is type(current) or (type(current) is float and type(saved) is int)):
        raise ValueError(f"{what}: {type(saved).__name__} where this run has {type(current).__name__}")


def save_checkpoint(path: str | os.PathLike, state: RunState, config: dict[str, Any], iteration: int,
                    curve: list[float], fingerprint: torch.Tensor | None = None,
                    notes: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write the run's state after ``iteration`` iterations atomically to ``path``; ``notes``: the caller's record
    of what it decided before the run (read back by :func:`checkpoint_notes`, not compared on resume). A failed
    write (a full disk, no permission) is an :class:`EPDFileError` naming the checkpoint; the last one saved stays."""
    path = Path(path)
    tensors, doc = state.pack()
    if fingerprint is not None:
        tensors["fingerprint"] = fingerprint.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "iteration": str(iteration),
        "curve": json.dumps(curve),
        "state": json.dumps(doc),
        "notes": json.dumps(notes or {}),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(st_save(tensors, metadata=meta), path, overwrite=True)
    except OSError as exc:
        raise EPDFileError(path, f"cannot save this run's checkpoint ({exc.strerror or exc}); free space on its "
                           "disk or make its folder writable, then run again") from None  # fmt: skip
    return path


def with_gradients(train: Callable) -> Callable:
    """``train`` (a training run) with autograd on in any caller's mode: under ``torch.no_grad()`` or inference mode
    (how scripts and ComfyUI call models) it failed in its first backward pass."""

    @functools.wraps(train)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return train(*args, **kwargs)

    return run


def _metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file's bytes (its header's, JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def checkpoint_notes(path: str | os.PathLike) -> dict[str, Any]:
    """The ``notes`` a checkpoint at ``path`` was saved with: ``{}`` if there is no checkpoint, it is unreadable or
    it has none. Untrusted JSON: the caller checks what it uses (and the resumed run checks the rest)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _MAX_BYTES:
            return {}
        meta = _metadata(path.read_bytes())
        notes = json.loads(meta.get("notes", "{}")) if meta.get("format") == FORMAT else {}
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        return {}
    return notes if isinstance(notes, dict) else {}


def load_checkpoint(path: str | os.PathLike, state: RunState, config: dict[str, Any],
                    fingerprint: torch.Tensor | None = None) -> tuple[int, list[float]] | None:  # fmt: skip
    """Restore ``state`` from ``path`` and return ``(iterations done, curve)``; ``None`` if there is no
    checkpoint. A checkpoint of another configuration or model raises :class:`CheckpointMismatch`."""
    path = Path(path)
    remove_leftovers(path)
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > _MAX_BYTES:
        raise NotACheckpoint(f"{path}: not a checkpoint file")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        meta = _metadata(data)
        if meta.get("format") != FORMAT:
            raise ValueError("not an EPD checkpoint")
        saved_config = json.loads(meta["config"])
        iteration = int(meta["iteration"])
        curve = [float(v) for v in json.loads(meta["curve"])]
        doc = json.loads(meta["state"])
        if not isinstance(saved_config, dict) or not isinstance(doc, dict):
            raise ValueError("its config or state is not a JSON object")
        if iteration < 1 or len(curve) != iteration:
            raise ValueError(f"iteration {iteration} with {len(curve)} losses")
    except Exception as exc:  # safetensors, JSON, missing keys
        raise NotACheckpoint(f"{path}: unreadable checkpoint ({exc})") from None
    if saved_config != json.loads(json.dumps(config, sort_keys=True)):
        changed = sorted(k for k in set(saved_config) | set(config) if saved_config.get(k) != config.get(k))
        raise CheckpointMismatch(f"{path}: a checkpoint of another run (differs in {', '.join(changed)})")
    if fingerprint is not None:
        saved = tensors.get("fingerprint")
        if (
            saved is None
            or saved.shape != fingerprint.shape
            or not torch.allclose(saved.double(), fingerprint.detach().cpu().double(), rtol=1e-3, atol=1e-4)
        ):
            raise CheckpointMismatch(f"{path}: a checkpoint made with another model, conditioning, first-step mean, "
                                     "feature encoder or reward model")  # fmt: skip
    try:
        state.unpack(tensors, doc)
    except (KeyError, IndexError, AttributeError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointMismatch(f"{path}: checkpoint does not fit this run ({type(exc).__name__}: {exc})") from None
    return iteration, curve


def interruptible(denoiser: Callable, check_interrupt: Callable[[], None] | None) -> Callable:
    """``denoiser`` calling ``check_interrupt()`` before every model call (a stop lands within one call)."""
    if check_interrupt is None:
        return denoiser

    def checked(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        check_interrupt()
        return denoiser(x, sigma)

    return checked


PROBE_SEED = 20240229
PROBE_DIRECTIONS = 16  # numbers kept per probe sample: its answer projected on fixed random directions


def probe(denoiser: Callable, shape: tuple[int, ...], grid: torch.Tensor, dtype: torch.dtype,
          device: torch.device | str | None, batch: int = 1) -> torch.Tensor:  # fmt: skip
    """The model's answers to fixed inputs: tells a checkpoint's model and conditioning from others.

    One call of ``batch`` samples at every point of ``grid``: with ``batch`` the number of prompts the denoiser tiles
    over its batch, every prompt is asked, and a prompt that only some steps see (ComfyUI's timestep ranges, decided
    per call) at its steps. Each answer is kept as its projections on :data:`PROBE_DIRECTIONS` fixed random
    directions, scaled to the answer's RMS: ``[points, batch, PROBE_DIRECTIONS]``."""
    points = torch.as_tensor(grid, dtype=torch.float64).detach().cpu().reshape(-1)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn((batch, *shape), generator=gen, dtype=torch.float64)
    directions = torch.randn((x[0].numel(), PROBE_DIRECTIONS), generator=gen, dtype=torch.float32)
    answers = []
    with torch.no_grad():
        for sigma in points:
            out = denoiser((x * sigma).to(device, dtype), sigma.expand(batch).to(device, dtype))
            answers.append(out.detach().to("cpu", torch.float32).flatten(1) @ directions / x[0].numel() ** 0.5)
    return torch.stack(answers)


def answers(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str | None, samples: int = 2) -> torch.Tensor:  # fmt: skip
    """``fn``'s answers to ``samples`` fixed standard-normal inputs of ``shape``: the caller's other models (a
    feature loss's encoder, a reward's) told apart as :func:`probe` tells the denoiser, for a run's
    ``checkpoint_answers``. An answer of more than :data:`PROBE_DIRECTIONS` numbers per sample is kept as its
    projections on fixed random directions, scaled to its RMS; ``[samples * min(numbers, PROBE_DIRECTIONS)]``."""
    gen = torch.Generator().manual_seed(PROBE_SEED + 1)
    x = torch.randn((samples, *shape), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = fn(x.to(device, dtype)).detach().to("cpu", torch.float32).reshape(samples, -1)
    if out.shape[1] > PROBE_DIRECTIONS:
        out = out @ torch.randn((out.shape[1], PROBE_DIRECTIONS), generator=gen) / out.shape[1] ** 0.5
    return out.flatten()


def table_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' values (a start table in a run's configuration)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


class Checkpointer:
    """Resume and periodic saves for one training loop (see :func:`epd_core.distill.distill`)."""

    def __init__(self, path: str | os.PathLike, every: int, state: RunState, config: dict[str, Any],
                 fingerprint: torch.Tensor | None, notes: dict[str, Any] | None = None) -> None:  # fmt: skip
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path, self.every, self.state, self.config, self.fingerprint = Path(path), every, state, config, fingerprint
        self.notes = notes
        self.resumed_at = 0

    def resume(self, total: int | None = None) -> tuple[int, list[float]]:
        """``(iterations done, curve so far)``: from the checkpoint if there is one, else ``(0, [])``. A run of
        ``total`` iterations never saves after its last one: a checkpoint that says so does not fit it."""
        found = load_checkpoint(self.path, self.state, self.config, self.fingerprint)
        if found is None:
            return 0, []
        if total is not None and found[0] >= total:
            raise CheckpointMismatch(f"{self.path}: checkpoint after iteration {found[0]} of a {total}-iteration run")
        self.resumed_at = found[0]
        return found

    def step(self, done: int, curve: list[float], total: int) -> None:
        """After ``done`` iterations: save every ``every`` iterations (not after the last one)."""
        if done % self.every == 0 and done < total:
            save_checkpoint(self.path, self.state, self.config, done, curve, self.fingerprint, self.notes)


def run_checkpointer(path: str | os.PathLike, every: int, state: RunState, denoiser: Callable, start: Any,
                     shape: tuple[int, ...], grid: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None,
                     options: dict[str, Any], batch: int = 1, extra: torch.Tensor | None = None,
                     notes: dict[str, Any] | None = None) -> Checkpointer:  # fmt: skip
    """Checkpoints of a training run from ``start`` (an ``EPDParams``): resumed only with the same ``options``,
    start table, sample shape, grid, dtype, and model and conditioning (their answers to the :func:`probe` inputs,
    ``batch``: the number of prompts the denoiser tiles over its batch). The start's first-step mean (measured on the
    model, so it may differ in its last bits between devices) and ``extra`` (the caller's other models'
    :func:`answers`) are compared with the probe's tolerance. ``notes``: saved with each checkpoint, see
    :func:`save_checkpoint`."""
    from .params import TABLE_NAMES

    config = {
        **options, "dtype": str(dtype), "start": table_digest(*(getattr(start, n) for n in TABLE_NAMES)),
        "start_hyper": start.hyper(), "shape": list(shape), "grid": [float(t) for t in grid.detach().cpu()],
    }  # fmt: skip
    fingerprint = probe(denoiser, shape, grid, dtype, device, batch).flatten()
    if start.afs_mean is not None:
        fingerprint = torch.cat([fingerprint, start.afs_mean.detach().to("cpu", torch.float32).flatten()])
    if extra is not None:
        fingerprint = torch.cat([fingerprint, extra.detach().to("cpu", torch.float32).flatten()])
    return Checkpointer(path, every, state, config, fingerprint, notes)
