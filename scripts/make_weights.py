"""Regenerate the analytic tables bundled in weights/demo/ (``analytic-*``) and weights/README.md.

Each table records its own command in its metadata (weights/README.md lists them). The MNIST and digits tables come
from ``scripts.make_mnist_tables``, ``scripts.make_digits_tables`` and ``bench.rdpo``: run the command a table
records. ``mnist-eps-nfe5-epd`` (``bench.rdpo``'s start) records only its settings ("provisional"): it was made
by an early ``distill_on_model`` call and cannot be rebuilt bit for bit.

python -m scripts.make_weights                  # all analytic tables: about 15 minutes on 2 CPU cores, plus about
                                                # 7 minutes for each NFE-5 carry table (EPD Distill's defaults)
python -m scripts.make_weights --readme         # only weights/README.md, from the tables' metadata
python -m scripts.make_weights NAME.safetensors # only the named ones, replaced in place
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess  # noqa: S404  (runs this project's own command line, never user input)
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from epd_core import EPDParams, load_params, save_params
from epd_core.config import NODE_DISTILL, DistillConfig, node_iterations, node_scale_bounds
from epd_core.params import time_points_for_nfe
from epd_dev import ROOT

START = "analytic-sd15-start-nfe10.safetensors"
# The recipe that measured best on the answer key (bench/accuracy.py): K = 3 points and a learned grid; odd NFE
# with the analytic first step; from NFE 5 to 7 the end-to-end ("global") objective, otherwise the authors'
# per-step loss (at NFE 4 the global objective measured 2-3x worse).
COMMON = dict(points=3, learn_grid=True, teacher="heun", teacher_m=8, iterations=400, batch=256, seed=1)
FORMS = ("sd15", "sd3", "flux")


def flags(**args: str | int | bool | None) -> str:
    """``epd_core distill`` flags in the order given: ``--name value``; True gives a bare ``--name``, False or None
    leaves the flag out (its default)."""
    words = [f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
             for name, value in args.items() if value is not None and value is not False]  # fmt: skip
    return " ".join(words)


def recipe(form: str, mixture: str, nfe: int) -> str:
    """The two-round EPD tables. Fitted before the mean-aware first step, their AFS assumes data mean 0
    (``--no-afs-mean``): without the flag the command now fits a mean, and another table than the one shipped."""
    steps, afs = time_points_for_nfe(nfe)
    local = not 5 <= nfe <= 7
    return flags(form=form, mixture=mixture, steps=steps, **COMMON, afs=afs, no_afs_mean=afs,
                 objective="local" if local else "global", weighting="snr" if local else None)  # fmt: skip


def node_settings(nfe: int) -> dict:
    """EPD Distill's defaults at this NFE as ``epd_core distill`` flags (the training hyper-parameters only)."""
    values = {name: DistillConfig.node_default(name) for name in NODE_DISTILL}
    heads = {name: bound for name, bound in node_scale_bounds(nfe).items() if bound}
    return {**values, "iterations": node_iterations(nfe), **heads}


def carry_recipe(form: str, mixture: str, nfe: int) -> str:
    """The carry student (one round per step). At the NFEs of ``NODE_RECIPE_NFES``: EPD Distill's defaults (AFS
    first). Otherwise NFE steps with AFS first, or, where ``CARRY_VARIANTS`` says so, NFE - 1 steps after a plain
    first prediction or another number of iterations; the end-to-end objective, fitted for the free final estimate."""
    if nfe in NODE_RECIPE_NFES:
        steps, afs = time_points_for_nfe(nfe, "carry")
        return flags(form=form, mixture=mixture, steps=steps, student="carry", points=COMMON["points"],
                     seed=COMMON["seed"], afs=afs, **node_settings(nfe))  # fmt: skip
    variant = CARRY_VARIANTS.get((form, mixture, nfe), {})
    steps, afs = time_points_for_nfe(nfe, "carry", variant.get("afs", True))
    common = {**COMMON, "iterations": variant.get("iterations", COMMON["iterations"])}
    return flags(form=form, mixture=mixture, steps=steps, student="carry", **common, afs=afs, objective="global",
                 final_estimate=True)  # fmt: skip


# EPD Plugin tables: one per base the plugin places points with (euler's are the EPD tables above), from the
# untrained start table, so the learned grid suits the base's placement (a table fitted for Euler's placement and
# then tuned for a multistep base's got worse: its long last step is where multistep extrapolation is poorest).
PLUGIN_BASES = ("dpmpp_2m", "ipndm", "ipndm_v", "deis", "lms", "res_multistep", "gradient_estimation")


# Longer runs for two SD3-form NFE-10 tables (over dpmpp_2m and ipndm the same longer run measured worse: 0.067 and
# 0.063 RMSE against 0.062 and 0.053 with the shorter one, bench/plugin.py).
LONGER = {("sd3", 10, b) for b in ("deis", "gradient_estimation")}


def plugin_recipe(form: str, nfe: int, base: str) -> str:
    iterations, batch = (400, 128) if (form, nfe, base) in LONGER else (200, 96)
    return flags(form=form, mixture="reference", steps=nfe // 2 + 1, points=3, learn_grid=True, teacher="heun",
                 teacher_m=3, iterations=iterations, batch=batch, seed=1, weighting="snr",
                 plugin_base=base)  # fmt: skip


# The NFE-5 carry tables are what EPD Distill's defaults make (through the core, seed 1). Against this script's
# earlier recipe (400 x 256, heun M = 8, and the NFE-5 variants: SD1.5 reference and wide without AFS, SD3 and FLUX
# multimodal at 1,000 iterations) they measured better on 6 of the 9 mixtures and met 1.5x on all nine where it met
# 8 (SD1.5 multimodal 0.135 (117 wrong-component samples) -> 0.083 (33); geometric-mean ratio 2.38x -> 2.61x;
# bench.carry, 8,192 noises; at seeds 0 and 2 the same recipe met it on 7 and 9). At NFE 10 that recipe stays: the
# defaults measured worse on SD1.5 reference (0.022 -> 0.031) and wide (0.015 -> 0.018).
NODE_RECIPE_NFES = (5,)

# Carry tables made another way than carry_recipe's default (AFS first, 400 iterations), each measured both ways on
# the 8,192 held-out noises (bench.carry, bench.plugin; RMSE and wrong-component samples, default -> this way).
# Without AFS: on the SD1.5 form the analytic first step commits samples to the wrong component. The default stays
# where it measured better: SD1.5 reference NFE 10 (0.022 with AFS, 0.034 without).
CARRY_VARIANTS = {
    ("sd15", "reference", 7): {"afs": False},  # 0.076 (49) -> 0.044 (17)
    ("sd15", "reference", 9): {"afs": False},  # 0.060 (30) -> 0.038 (13)
    ("sd15", "wide", 10): {"afs": False},  # 0.032 (26) -> 0.015 (7)
    ("sd15", "multimodal", 10): {"afs": False},  # 0.064 (21) -> 0.053 (14)
    ("sd3", "reference", 9): {"iterations": 1000},  # 0.062 (34) -> 0.034 (11)
    ("flux", "multimodal", 10): {"iterations": 1000},  # 0.109 (60) -> 0.083 (38)
}

DISTILLED = {
    **{f"analytic-{f}-reference-nfe{n}.safetensors": recipe(f, "reference", n) for f in FORMS for n in range(3, 11)},
    **{f"analytic-{f}-{m}-nfe{n}.safetensors": recipe(f, m, n) for f in FORMS for m in ("wide", "multimodal")
       for n in (5, 10)},
    **{f"analytic-{f}-reference-nfe{n}-plugin-{b}.safetensors": plugin_recipe(f, n, b)
       for n in (10,) for f in ("sd15", "sd3") for b in PLUGIN_BASES},
    **{f"analytic-{f}-{m}-nfe{n}-carry.safetensors": carry_recipe(f, m, n) for f in FORMS
       for m in ("reference", "wide", "multimodal") for n in (5, 10)},
    # the odd NFEs of the plugin benchmark, where the two-round tables left gradient_estimation and ipndm < 1.2x
    **{f"analytic-{f}-reference-nfe{n}-carry.safetensors": carry_recipe(f, "reference", n) for f in ("sd15", "sd3")
       for n in (7, 9)},
}  # fmt: skip


def distil(name: str, args: str, root: Path = ROOT) -> None:
    """Run the table's recorded command in ``root``; the table it replaces is kept aside until the new one is
    written, and put back if the run fails."""
    target = root / "weights" / "demo" / name
    aside = target.with_name(target.name + ".previous")
    if target.exists():
        target.replace(aside)
    argv = ["distill", *shlex.split(args), "--out", f"weights/demo/{name}"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # one thread a job: more are far slower
    try:
        subprocess.run([sys.executable, "-m", "epd_core", *argv], cwd=root, check=True, env=env,  # noqa: S603
                       stdout=subprocess.DEVNULL)  # fmt: skip
    except BaseException:
        if aside.exists():
            aside.replace(target)
        raise
    aside.unlink(missing_ok=True)
    print(f"{name}: {args}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="tables to regenerate in place (file names in weights/demo/, "
                        "e.g. analytic-sd15-reference-nfe5.safetensors); none: all")  # fmt: skip
    parser.add_argument("--readme", action="store_true", help="only rewrite weights/README.md")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - {START, *DISTILLED})
    if unknown:
        parser.error(f"not a table this script makes: {', '.join(unknown)} (the analytic-*.safetensors files in "
                     "weights/demo/, with the extension)")  # fmt: skip
    only = set(args.names)
    if not args.readme:
        start = EPDParams.start(6, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm", max_order=2,
                                metadata={"source": "untrained start table (r at 1/3 and 2/3, equal weights)",
                                          "command": "python -m scripts.make_weights"})  # fmt: skip
        if not only or START in only:
            save_params(start, ROOT / "weights" / "demo" / START)
        jobs = [(n, a) for n, a in DISTILLED.items() if not only or n in only]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda job: distil(*job), jobs))
    write_readme()


def write_readme() -> None:
    """weights/README.md: every bundled demo table with its model, NFE and the command that made it."""
    lines = ["# Bundled tables", "", "Made by this project (the authors' tables are not redistributed; see the main",
             "README). Each file's metadata records its command, listed below: `python -m scripts.make_weights`",
             "regenerates the `analytic-*` tables, the other commands the MNIST and digits tables.",
             "They are for the pack's demo models, so they live in `demo/` (the loader lists them as `demo/<name>`),",
             "apart from tables for real models.",
             "", "| file | model | NFE | command |", "|---|---|---|---|"]  # fmt: skip
    demo = ROOT / "weights" / "demo"  # digits-* and mnist-* come from scripts.make_digits_tables / make_mnist_tables
    paths = [
        p for pattern in ("analytic-*", "digits-nfe*", "mnist-*") for p in sorted(demo.glob(pattern + ".safetensors"))
    ]
    for path in paths:
        p = load_params(path)
        model = p.metadata.get("model", "analytic sd15 (untrained)")
        if p.metadata.get("plugin_base"):
            model += f", EPD Plugin over {p.metadata['plugin_base']}"
        lines.append(f"| `demo/{path.name}` | {model} | {p.nfe} | `{p.metadata.get('command', '')}` |")
    lines += ["", "Tables only: the demo networks they were fitted to live in `demo_models/` (see its README)."]
    (ROOT / "weights" / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
