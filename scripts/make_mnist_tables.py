"""Distil the MNIST demo models' EPD tables with EPD Distill's own code path, and record how each was made.

For each model (eps, flow) and NFE: the model through the pack's nodes, the ten digits as one conditioning batch
(EPD MNIST Class "0-9") against "none", cfg 3, a 112x112 latent; ``nodes.training.distill_on_model`` (what the
EPD Distill node runs, its untrained start check included) with :class:`epd_core.config.DistillConfig` (its
defaults unless a flag says otherwise); saved as ``weights/demo/mnist-<kind>-nfe<N>.safetensors`` with this
command in the table's metadata.

    python -m scripts.make_mnist_tables                         # eps and flow, NFE 4-10
    python -m scripts.make_mnist_tables --kinds flow --nfes 5 10 --iterations 100
    python -m scripts.make_mnist_tables --nfes 5 --feature-weight 0.1 --out /tmp/featured   # EPD MNIST Features
    python -m scripts.make_mnist_tables --nfes 5 10 --points 4 --learn-grid --objective global --final-estimate \
        --suffix=-k4                                                          # the K = 4 learned-grid tables
    python -m scripts.make_mnist_tables --kinds flow --nfes 10 --points 4 --learn-grid --objective global \
        --final-estimate --init weights/demo/mnist-flow-nfe10-k4.safetensors --seed 1 --lr 0.003 --out /tmp/more
                                                                 # fine-tune a table on more noises
    python -m scripts.make_mnist_tables --kinds eps --nfes 5 --points 8 --no-learn-grid --objective global \
        --final-estimate --init weights/demo/mnist-eps-nfe5-k4scg.safetensors --out /tmp/wider
                                                                 # K = 8 from the K = 4 table, each point split
    python -m scripts.make_mnist_tables --kinds eps --nfes 5 --points 4 --no-learn-grid --objective global \
        --final-estimate --init weights/demo/mnist-eps-nfe5-k4scg.safetensors \
        --grid 14.6146 8.4321 3.8631 1.5191 0.3 0.0292 --out /tmp/moved      # the same table on a moved grid
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from epd_core.checkpoint import checkpoint_path
from epd_core.config import DistillConfig, add_arguments, from_arguments
from epd_core.files import EPDFileError, check_destination, load_params
from epd_core.params import DEFAULT_STUDENT, STUDENTS, EPDParams, time_points_for_nfe
from epd_dev import ROOT, comfy_harness

CFG = 3.0
OUT = ROOT / "weights" / "demo"


def split_points(params: EPDParams, points: int, spread: float = 0.1) -> EPDParams:
    """``params`` with more parallel points per step: each point becomes ``n`` copies whose ``r`` logits are spread
    by ``+- spread`` around its own, sharing its weight, so that the wider table samples almost as the narrow one
    and training starts from it rather than from scratch."""
    k = params.num_points
    copies = [points // k + (j < points % k) for j in range(k)]
    index = torch.tensor([j for j, n in enumerate(copies) for _ in range(n)])
    offset = torch.cat([torch.linspace(-spread, spread, n) if n > 1 else torch.zeros(1) for n in copies])
    share = torch.tensor([math.log(n) for n in copies])[index]
    return params.replace(
        num_points=points,
        r_params=params.r_params[:, index] + offset,
        weight_s=params.weight_s[:, index] - share,
        scale_dir_params=params.scale_dir_params[:, index],
        scale_time_params=params.scale_time_params[:, index],
    )


def table_path(out: Path, kind: str, nfe: int, suffix: str = "") -> Path:
    """Where a table of ``kind`` at ``nfe`` is saved."""
    return out / f"mnist-{kind}-nfe{nfe}{suffix}.safetensors"


def finished_by(path: Path, command: str) -> bool:
    """``path`` is a table that ``command`` finished: its recorded command, and no checkpoint of a run left beside
    it (what ``--resume`` continues)."""
    if not path.is_file() or checkpoint_path(path).exists():
        return False
    try:
        return load_params(path).metadata.get("command") == command
    except EPDFileError:
        return False


def make_table(
    kind: str, nfe: int, points: int, config: DistillConfig, command: str, out: Path, student: str = DEFAULT_STUDENT,
    feature_weight: float | None = None, suffix: str = "", afs: bool = True, init: Path | None = None,
    scales: dict[str, float] | None = None, grid: list[float] | None = None, resume: bool = False,
) -> Path:  # fmt: skip
    """One table, distilled and saved; returns its path. With ``feature_weight`` the final step's loss is the
    feature loss of EPD MNIST Features (the demo classifier's features of the decoded digits); with ``init`` the
    training starts from that table (fine-tuning; no start check), its points split (:func:`split_points`) when
    ``points`` is more than its K. ``scales`` sets the start's ``scale_dir`` /
    ``scale_time`` bounds, so that the training also learns those heads (a start whose heads are zero, as every
    untrained or scale-free table's are, samples exactly as before: its scales are 1). ``grid`` replaces the start's
    time points (sigma max first, one more than its steps), so that a moved grid is made by its recorded command;
    without ``init`` it is the one start (no start check between grids). With ``resume`` the run keeps a checkpoint
    next to the table, as EPD Distill does, and continues from one left there by a run that was stopped."""
    nodes = comfy_harness.setup()
    training, files = comfy_harness.pack_module("nodes.training"), comfy_harness.pack_module("nodes.table_files")
    (model,) = nodes["EPDMnistModel"].execute(kind).result
    positive, negative = nodes["EPDMnistClass"].execute("0-9").result
    steps, afs = time_points_for_nfe(nfe, student, afs)
    ms = model.get_model_object("model_sampling")
    if init is not None:
        start = comfy_harness.pack_module("epd_core.files").load_params(init)  # the pack's EPDParams class
        if points > start.num_points:
            start = split_points(start, points)
    elif grid:
        start = training.start_table(ms, steps, points, afs, student)  # start_tables' candidates differ only in grid
    else:
        start = training.start_tables(ms, steps, points, afs, student)
    if grid:
        start = start.replace(t_steps=torch.tensor(grid, dtype=torch.float64))
    if scales:
        start = ({name: table.with_scale_bounds(**scales) for name, table in start.items()} if isinstance(start, dict)
                 else start.with_scale_bounds(**scales))  # fmt: skip
    metadata = {"tool": "scripts/make_mnist_tables.py", "model": f"demo_models/mnist-{kind}", "cfg": CFG,
                "command": command}  # fmt: skip
    encoder = None if feature_weight is None else nodes["EPDMnistFeatures"].execute().result[0]
    path = table_path(out, kind, nfe, suffix)
    options = files.resume_options(path, config.iterations) if resume else {}
    with files.claimed(path):  # two job lines of one table, as two EPD Distill runs of one filename, are refused
        params = training.distill_on_model(model, positive, negative, CFG, torch.zeros(1, 4, 14, 14), start, config,
                                           metadata=metadata, encoder=encoder, feature_weight=feature_weight or 0.0,
                                           **options)  # fmt: skip
        files.save_output(params, path, overwrite=True)  # and drops the checkpoint, as EPD Distill does
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", choices=("eps", "flow"), default=["eps", "flow"])
    ap.add_argument("--nfes", nargs="+", type=int, default=list(range(4, 11)))
    ap.add_argument("--points", type=int, default=2,
                    help="parallel points per step (K); with --init, more than its K splits its points (fewer: its "
                    "K stays)")  # fmt: skip
    ap.add_argument("--student", choices=STUDENTS, default=DEFAULT_STUDENT, help="carry: one round per step")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--feature-weight", type=float, help="train the last step on the demo classifier's features")
    ap.add_argument("--suffix", default="", help="appended to the file names (mnist-<kind>-nfe<N><suffix>)")
    ap.add_argument("--afs", action=argparse.BooleanOptionalAction, default=True,
                    help="carry: start with the analytic first step (or a plain prediction)")  # fmt: skip
    ap.add_argument("--init", type=Path, help="start from this table (fine-tune it) instead of the untrained start")
    for name in ("scale_dir", "scale_time"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float,
                        help=f"learn {name} too, within 1 +- this bound (below 1; default: the start's)")  # fmt: skip
    ap.add_argument("--grid", type=float, nargs="+", metavar="SIGMA",
                    help="start from these time points instead of the start's own (sigma max first, one more than "
                    "the steps; with --no-learn-grid they stay)")  # fmt: skip
    ap.add_argument("--resume", action="store_true",
                    help="keep a checkpoint next to each table (<out>/<name>.epd-checkpoint) and continue from one "
                    "found there (a run stopped at a deadline; same settings and model); a table this same command "
                    "finished there is kept")  # fmt: skip
    add_arguments(ap, DistillConfig)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig()
    logging.getLogger("epd").setLevel(logging.INFO)  # the training curve (nodes.training logs twenty points a run)
    config = from_arguments(args, DistillConfig)
    command = "python -m scripts.make_mnist_tables " + shlex.join(sys.argv[1:] if argv is None else argv)
    scales = {name: value for name in ("scale_dir", "scale_time") if (value := getattr(args, name)) is not None}
    if args.init is not None:  # the table it fine-tunes sets the NFE, student and first step; each file is named so
        init = load_params(args.init)
        steps, afs = time_points_for_nfe(args.nfes[0], args.student, args.afs)
        if args.nfes != [init.nfe] or (init.student, init.afs) != (args.student, afs):
            ap.error(f"--init {args.init} is an NFE-{init.nfe} {init.student} table (afs {init.afs}): give --nfes "
                     f"{init.nfe}, --student {init.student} and --{'' if init.afs else 'no-'}afs")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    try:  # every destination, before hours of training
        for kind in args.kinds:
            for nfe in args.nfes:
                check_destination(table_path(args.out, kind, nfe, args.suffix), overwrite=True)
    except EPDFileError as exc:
        ap.error(str(exc))
    for kind in args.kinds:
        for nfe in args.nfes:
            t0 = time.time()
            done = table_path(args.out, kind, nfe, args.suffix)
            if args.resume and finished_by(done, command):  # a call of scripts/gpu_mnist.sh after the one it ended
                print(f"{done}: finished by this command earlier, kept")
                continue
            path = make_table(kind, nfe, args.points, config, command, args.out, args.student, args.feature_weight,
                              args.suffix, args.afs, args.init, scales, args.grid, args.resume)  # fmt: skip
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
