"""Command line: ``python -m epd_core {info,convert,demo,distill,rdpo,catalogue,fetch} ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from . import EPDParams, GaussianMixture, load_params, make_schedule, sample, save_params
from .analytic import ANALYTIC_FORMS, MIXTURES, heun
from .catalogue import DEFAULT_TIMEOUT, MIRROR_ENV, fetch, find_entry, load_catalogue
from .checkpoint import CheckpointMismatch, NotACheckpoint
from .config import DistillConfig, RDPOConfig, add_arguments, from_arguments
from .files import EPDFileError, check_destination, claim, lock_path, remove_leftovers
from .params import STUDENTS, counted
from .schedules import SCHEDULE_TYPES
from .solver import initial_state


class _ProgressLine(logging.Handler):
    """The progress line, rewritten in place with a carriage return. A warning logged by the core (RDPO's guard) or
    an error ends it first, so it gets a line of its own rather than landing on the bar."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.open = False

    def show(self, text: str, done: bool) -> None:
        print("\r" + text, end="\n" if done else "", flush=True)
        self.open = not done

    def end(self) -> None:
        if self.open:
            print(flush=True)
            self.open = False

    def emit(self, record: logging.LogRecord) -> None:
        self.end()
        print(self.format(record), file=sys.stderr, flush=True)


_LINE = _ProgressLine()


def _info(args: argparse.Namespace) -> int:
    p = load_params(args.file)
    print(f"file:        {args.file}")
    for key, value in p.hyper().items():
        print(f"{key + ':':<17}{value}")
    print(f"{'steps:':<13}{p.num_steps - 1}  points: {p.num_points}  NFE: {p.nfe}  evaluations: {p.evaluations}")
    grid = make_schedule(p)
    print("schedule:    " + " ".join(f"{t:.6g}" for t in grid.tolist()))
    table = p.decoded()
    print(f"{'step':>4} {'point':>5} {'r':>10} {'weight':>10} {'scale_dir':>10} {'scale_time':>10}")
    for i in range(p.num_steps - 1):
        for k in range(p.num_points):
            values = (table.r[i, k], table.weight[i, k], table.scale_dir[i, k], table.scale_time[i, k])
            print(f"{i:>4} {k:>5} " + " ".join(f"{float(v):>10.6f}" for v in values))
    for key, value in p.metadata.items():
        print(f"meta.{key}: {value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    check_destination(args.dst, args.force, "--force replaces it")
    p = load_params(args.src)
    save_params(p, args.dst, overwrite=args.force)
    print(f"wrote {args.dst} ({counted(p.num_steps - 1, 'step')}, {counted(p.num_points, 'point')}, NFE {p.nfe})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """EPD against Euler at equal NFE on the exact Gaussian-mixture denoiser."""
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if not -(2**63) <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    p = load_params(args.table)
    mixture = args.mixture or _table_mixture(p)
    gm = GaussianMixture.named(mixture)
    den = gm.denoise_flow if p.is_flow else gm.denoise_ve
    grid = make_schedule(p)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, *gm.shape, generator=g, dtype=torch.float64)
    x0 = initial_state(noise, grid[0], p.is_flow)
    exact = heun(den, x0, make_schedule(p, num_steps=2001))
    epd = sample(den, x0, grid, p)
    euler_grid = make_schedule(p.replace(t_steps=None), num_steps=p.nfe + 1)  # the schedule's, not a learned grid
    euler = heun(den, x0, euler_grid, order=1)
    rmse = lambda a: float(((a - exact) ** 2).mean().sqrt())  # noqa: E731
    print(f"table {args.table}: NFE {p.nfe}, {args.batch} samples, mixture {mixture}")
    print(f"  EPD   RMSE vs exact ODE solution: {rmse(epd):.5f}")
    print(f"  Euler RMSE at NFE {p.nfe}:          {rmse(euler):.5f}")
    return 0


def _table_mixture(p: EPDParams) -> str:
    """The mixture a table was distilled on, from its metadata (``analytic sd3 / mixture wide``), else the reference."""
    model = str(p.metadata.get("model", ""))
    name = model.rsplit("mixture ", 1)[-1].strip() if "mixture " in model else "reference"
    return name if name in MIXTURES else "reference"


def _catalogue(args: argparse.Namespace) -> int:
    """List the published tables that ``fetch`` can download."""
    print(f"{'name':<38} {'comfyui':<8} {'steps':>5} {'points':>6} {'NFE':>4}  schedule")
    for e in load_catalogue(args.catalogue).values():
        yes = "yes" if e.comfyui else "no"
        print(f"{e.name:<38} {yes:<8} {e.num_steps - 1:>5} {e.num_points:>6} {e.nfe:>4}  {e.schedule_type}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    entry = find_entry(args.name, load_catalogue(args.catalogue))
    path = fetch(entry, args.out, base_url=args.mirror, timeout=args.timeout)
    print(f"{path}")
    return 0


CATALOGUE = Path(__file__).resolve().parents[1] / "weights" / "catalogue.json"  # the pack's, beside the core


def _distill(args: argparse.Namespace, argv: list[str]) -> int:
    """Distil a table for an analytic Gaussian-mixture model and save it in the project's format."""
    import shlex

    from .distill import distill

    _check_outputs(args)
    form = dict(ANALYTIC_FORMS[args.form])
    if args.schedule:
        if (args.schedule == "flowmatch") != (form["schedule_type"] == "flowmatch"):
            kind = "a flow" if form["schedule_type"] == "flowmatch" else "a variance-exploding"
            raise ValueError(f"--schedule {args.schedule} does not fit --form {args.form}, {kind} model (its own "
                             f"schedule: {form['schedule_type']})")  # fmt: skip
        if args.schedule != form["schedule_type"]:
            form.pop("schedule_rho")  # another schedule: EPDParams' default rho, unless --rho gives one
        form["schedule_type"] = args.schedule
    if args.rho is not None:
        if form["schedule_type"] == "flowmatch":
            raise ValueError(f"--rho does not apply to --form {args.form}'s flowmatch schedule: its grid is set by the "
                             "form's shift or mu")  # fmt: skip
        form["schedule_rho"] = args.rho
    start = EPDParams.start(
        args.steps, args.points, student=args.student, afs=args.afs, max_order=args.max_order,
        scale_dir=args.scale_dir, scale_time=args.scale_time, **form,
    )  # fmt: skip
    gm = GaussianMixture.named(args.mixture)
    den = gm.denoise_flow if start.is_flow else gm.denoise_ve

    def progress(i: int, n: int, loss: float) -> None:
        if i == n or i % max(1, n // 20) == 0:
            bar = "#" * (30 * i // n)
            _LINE.show(f"[{bar:<30}] {i}/{n} loss {loss:.5f}", i == n)

    config = from_arguments(args, DistillConfig, start_noises=0)  # the form's start: no choice to check
    command = "python -m epd_core " + shlex.join(argv)
    meta = {"model": f"analytic {args.form} / mixture {args.mixture}", "command": command}
    with _held(args):
        params = distill(den, start, gm.shape, config, progress=progress, metadata=meta, checkpoint=args.checkpoint,
                         checkpoint_every=args.checkpoint_every)  # fmt: skip
        save_params(params, args.out, overwrite=args.force)
        _done(args.checkpoint)
    print(f"wrote {args.out}: NFE {params.nfe}, loss {params.metadata['distilled']['final_loss']:.5f}")
    return 0


def _rdpo(args: argparse.Namespace, argv: list[str]) -> int:
    """RDPO fine-tuning of a table on an analytic mixture; reward = minus the error to the exact ODE solution."""
    import shlex

    from .analytic import ode_endpoint, ode_state
    from .rdpo import fitted_final_estimate, guard_report, rdpo

    _check_outputs(args)
    if args.exact_steps < 2:
        raise ValueError(f"--exact-steps must be at least 2 (the exact reference's steps), got {args.exact_steps}")
    start = load_params(args.table)
    gm = GaussianMixture.named(args.mixture)
    if start.is_flow:
        raise ValueError("rdpo on the command line supports variance-exploding tables (edm, sd15)")
    grid = make_schedule(start)
    sigma_max, sigma_end = float(grid[0]), float(grid[-1])

    def exact(x0: torch.Tensor) -> torch.Tensor:
        """The exact end of the rollouts: the ODE solution at 0 (a table fitted to end on its estimate), else at the
        table's last time point."""
        if fitted_final_estimate(start):
            return ode_endpoint(gm.denoise_ve, x0, sigma_max, steps=args.exact_steps)
        return ode_state(gm.denoise_ve, x0, sigma_max, sigma_end, steps=args.exact_steps)

    def progress(i: int, n: int, reward: float) -> None:
        _LINE.show(f"iteration {i}/{n} mean reward {reward:.5f}", i == n)

    meta = {"model": f"analytic mixture {args.mixture}", "command": "python -m epd_core " + shlex.join(argv),
            "rdpo_start_file": str(args.table)}  # fmt: skip
    config = from_arguments(args, RDPOConfig)
    with _held(args):
        params, _ = rdpo(gm.denoise_ve, start, gm.shape, config, reference=exact, progress=progress, metadata=meta,
                         checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                         checkpoint_key={"exact_steps": args.exact_steps})  # fmt: skip
        save_params(params, args.out, overwrite=args.force)
        _done(args.checkpoint)
    print(f"wrote {args.out}{guard_report(params.metadata['rdpo'])}")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Before a run trains: ``--out`` can be written, and ``--checkpoint`` is another file (it is removed once the
    table is saved)."""
    check_destination(args.out, args.force, "--force replaces it")
    if args.checkpoint == "":
        raise ValueError("--checkpoint needs a file name")
    if args.checkpoint and Path(args.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint} is a folder; give a file name")
    if args.checkpoint and Path(args.checkpoint).resolve() == Path(args.out).resolve():
        raise ValueError("--checkpoint and --out name the same file; give the checkpoint another name")
    table = getattr(args, "table", None)
    if args.checkpoint and table and Path(args.checkpoint).resolve() == Path(table).resolve():
        raise ValueError("--checkpoint names the start table (the checkpoint is removed once the run ends); give the "
                         "checkpoint another name")  # fmt: skip


@contextmanager
def _held(args: argparse.Namespace) -> Iterator[None]:
    """The run holds its ``--out`` (as the nodes hold their table) and its ``--checkpoint``: the same command started
    again elsewhere is refused at once, where the two wrote one checkpoint in turn (a crash could not resume) and the
    first to finish removed the other's. What a kill during an earlier save of ``--out`` left goes."""
    with ExitStack() as held:
        held.enter_context(claim(Path(args.out), f"--out {args.out} is being written by another run (the same "
                                 "command elsewhere?); wait for it to finish, or give another --out"))  # fmt: skip
        if args.checkpoint and lock_path(Path(args.checkpoint)) != lock_path(Path(args.out)):  # x and x.safetensors
            held.enter_context(claim(Path(args.checkpoint), f"--checkpoint {args.checkpoint} is in use by another "
                                     "run (the same command running elsewhere?); wait for it to finish, or give "
                                     "another --checkpoint"))  # fmt: skip
        remove_leftovers(Path(args.out))
        yield


def _done(checkpoint: str | None) -> None:
    """The run's table is saved: its checkpoint is no longer needed."""
    if checkpoint:
        Path(checkpoint).unlink(missing_ok=True)


def _checkpoint_args(parser: argparse.ArgumentParser, every: int) -> None:
    parser.add_argument("--checkpoint", help="save the run's state to this file and resume from it (killed runs)")
    parser.add_argument("--checkpoint-every", type=int, default=every, help="iterations between checkpoints")


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m epd_core --help``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m epd_core", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print a table's hyper-parameters, schedule and decoded values")
    info.add_argument("file")
    info.set_defaults(fn=_info)
    conv = sub.add_parser("convert", help="convert an authors' .pkl (or any table) to the project's .safetensors")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--force", action="store_true", help="replace an existing file")
    conv.set_defaults(fn=_convert)
    demo = sub.add_parser("demo", help="EPD vs Euler on the exact Gaussian-mixture denoiser")
    demo.add_argument("table")
    demo.add_argument("--batch", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--mixture", choices=sorted(MIXTURES), help="default: the one the table was distilled on")
    demo.set_defaults(fn=_demo)
    dist = sub.add_parser("distill", help="distil a table for an analytic mixture model (VE/discrete or flow form)")
    dist.add_argument("--form", choices=sorted(ANALYTIC_FORMS), default="sd15")
    dist.add_argument("--mixture", default="reference")
    dist.add_argument("--steps", type=int, default=4, help="time points (NFE is 2 per step, one less with --afs)")
    dist.add_argument("--points", type=int, default=2)
    dist.add_argument(
        "--student",
        choices=STUDENTS,
        default="epd",
        help="epd: the authors' two rounds per step; carry: one (NFE = steps - 1, with --afs)",
    )
    dist.add_argument("--max-order", type=int, default=4)
    dist.add_argument("--schedule", choices=SCHEDULE_TYPES)
    dist.add_argument("--rho", type=float, help="the schedule's rho (default: the form's; 7 with another --schedule)")
    dist.add_argument("--afs", action="store_true")
    dist.add_argument("--scale-dir", type=float, default=0.0)
    dist.add_argument("--scale-time", type=float, default=0.0)
    add_arguments(dist, DistillConfig, skip=("start_noises",))
    dist.add_argument("--out", required=True)
    dist.add_argument("--force", action="store_true", help="replace an existing --out file")
    _checkpoint_args(dist, 10)
    cat = sub.add_parser("catalogue", help="list the authors' published tables (download one with fetch)")
    cat.add_argument("--catalogue", default=CATALOGUE, help="catalogue file (default: the pack's)")
    cat.set_defaults(fn=_catalogue)
    fe = sub.add_parser("fetch", help="download a published table, verify its sha256, convert it to .safetensors")
    fe.add_argument("name", help="a catalogue entry (see `python -m epd_core catalogue`)")
    fe.add_argument("--out", default=".", help="folder to store <name>.safetensors in (e.g. ComfyUI/models/epd)")
    fe.add_argument("--mirror", help=f"base URL replacing the upstream one (default: ${MIRROR_ENV})")
    fe.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (network waits and transfer)")
    fe.add_argument("--catalogue", default=CATALOGUE, help="catalogue file (default: the pack's)")
    fe.set_defaults(fn=_fetch)
    rd = sub.add_parser("rdpo", help="RDPO fine-tuning of a table on an analytic mixture (VE/discrete form)")
    rd.add_argument("table")
    rd.add_argument("--mixture", default="reference")
    rd.add_argument("--exact-steps", type=int, default=200)
    add_arguments(rd, RDPOConfig)
    rd.add_argument("--out", required=True)
    rd.add_argument("--force", action="store_true", help="replace an existing --out file")
    _checkpoint_args(rd, 5)
    argv = sys.argv[1:] if argv is None else argv
    dist.set_defaults(fn=lambda a: _distill(a, argv))
    rd.set_defaults(fn=lambda a: _rdpo(a, argv))
    args = parser.parse_args(argv)
    core_log = logging.getLogger(__package__ or "epd_core")
    core_log.addHandler(_LINE)
    try:
        return _run(args)
    finally:
        _LINE.end()
        core_log.removeHandler(_LINE)


def _refuse(text: str, status: int = 2) -> int:
    """``text`` on stderr, on a line of its own, and the exit status."""
    _LINE.end()
    print(text, file=sys.stderr)
    return status


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; a refusal is one line on stderr and exit status 2 (130 when interrupted)."""
    try:
        return args.fn(args)
    except NotACheckpoint as exc:
        return _refuse(f"error: {exc}; give --checkpoint a new file or a checkpoint of this run")
    except CheckpointMismatch as exc:
        return _refuse(f"error: {exc}; remove it to start this run afresh, or give another --checkpoint")
    except KeyboardInterrupt:
        checkpoint = getattr(args, "checkpoint", None)
        kept = f"; the checkpoint {checkpoint} is kept: run the same command again to resume" if checkpoint else ""
        _LINE.open = False  # the text starts a new line, whether a bar was open or not
        return _refuse(f"\ninterrupted{kept}", 130)
    except (EPDFileError, ValueError) as exc:
        return _refuse(f"error: {exc}")
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        return _refuse(f"error: {name}{exc.strerror or exc}")


if __name__ == "__main__":
    sys.exit(main())
