"""Where a distilled table's error comes from, on the analytic mixtures (issue 18's "where a target is missed").

For each table kept by ``python -m bench.defaults --keep-tables DIR`` (named ``<form>-<mixture>-nfe<N>``), on the
same 8,192 held-out noises as the benchmark, in the core (no ComfyUI; its results equal the core's, tested):

* **teacher ceiling**: the training teacher (the table's recorded solver and M) along the table's grid, ended as
  the table is (its denoised end point), against the exact ODE end point: a table cannot get much closer;
* **commit step** of every sample that ends in another mixture component than the exact solution: the step after
  which the exact ODE continued from the student's state lands in that other component for good (a step's
  continuation is RK4 from its state to sigma 0); ``end``: only the free final estimate moved it;
* the **training curve** (the mean loss of each tenth of the run, from the table's metadata).

    python -m bench.diagnose --tables DIR            # -> bench/results/diagnosis.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from bench.accuracy import HELD_OUT_SEED, RESULTS, exact_endpoint, mixture_denoiser
from bench.defaults import best_builtin
from epd_core.analytic import GaussianMixture
from epd_core.files import load_params
from epd_core.schedules import make_schedule
from epd_core.solver import sample
from epd_core.teachers import subdivide, teacher_trajectory

NAME = re.compile(r"(?P<form>\w+?)-(?P<mixture>\w+)-nfe(?P<nfe>\d+)")
CONTINUATION_STEPS = 200  # RK4 steps of an exact continuation (the answer key uses 400 from sigma max)


def commit_steps(gm, form, states: list[torch.Tensor], times: list[float], out, exact) -> dict[str, int]:
    """For the samples whose component differs from the exact one: how many were committed at each step."""
    right = gm.component(exact)
    wrong = (gm.component(out) != right).nonzero().flatten()
    if wrong.numel() == 0:
        return {}
    stays = torch.zeros(len(states), wrong.numel(), dtype=torch.bool)  # continuation still in the exact component
    for i, (x, t) in enumerate(zip(states, times, strict=True)):
        stays[i] = gm.component(exact_endpoint(gm, form, x[wrong], t, CONTINUATION_STEPS)) == right[wrong]
    counts: dict[str, int] = {}
    for j in range(wrong.numel()):
        kept = stays[:, j].nonzero().flatten()
        last = int(kept.max()) if kept.numel() else -1
        label = "end" if last == len(states) - 1 else str(last + 1)
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "end", int(kv[0]) if kv[0] != "end" else 0)))


def diagnose(path: Path, n: int, builtins: list[dict]) -> dict:
    m = NAME.fullmatch(path.stem)
    form, mixture, nfe = m["form"], m["mixture"], int(m["nfe"])
    params = load_params(path)
    gm = GaussianMixture.named(mixture)
    den = mixture_denoiser(gm, form)
    grid = make_schedule(params).double()
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(HELD_OUT_SEED)).double()
    x = noise * math.sqrt(1 + float(grid[0]) ** 2) if form == "sd15_eps" else noise
    exact = exact_endpoint(gm, form, x, float(grid[0]), CONTINUATION_STEPS)
    steps: list[dict] = []
    last = sample(den, x, grid, params, callback=steps.append)
    states = [step["x"] for step in steps] + [last]  # the student's state at every grid point
    out = steps[-1]["denoised"]  # the last step's own x0 estimate: the table ended on its free estimate
    d = params.metadata.get("distilled", {})
    teacher, m_points = d.get("teacher", params.teacher), int(d.get("teacher_m", params.teacher_steps_m))
    fine = subdivide(grid, m_points)
    t_end = teacher_trajectory(den, x, fine, teacher)[-1]
    t_end = den(t_end, fine[-1].expand(n))
    rms = lambda a: float(((a - exact) ** 2).mean().sqrt())  # noqa: E731
    wrong = lambda a: int((gm.component(a) != gm.component(exact)).sum())  # noqa: E731
    best = best_builtin(builtins, form, mixture, nfe, n)
    return {
        "model": f"analytic-{form}", "mixture": mixture, "nfe": nfe, "samples": n,
        "rmse": rms(out), "wrong_mode": wrong(out),
        "teacher": f"{teacher} M={m_points}", "teacher_rmse": rms(t_end), "teacher_wrong_mode": wrong(t_end),
        "builtin": f"{best['sampler']} / {best['scheduler']}" if best else None,
        "builtin_rmse": best["rmse"] if best else None, "builtin_wrong_mode": best["wrong_mode"] if best else None,
        "commit_step": commit_steps(gm, form, states, grid.tolist(), out, exact),
        "loss_curve": d.get("loss_curve"), "start": params.metadata.get("start", {}).get("grid"),
    }  # fmt: skip


def summarize(rows: list[dict]) -> str:
    lines = ["| model | mixture | NFE | table RMSE (wrong) | teacher | teacher RMSE (wrong) "
             "| best built-in RMSE (wrong) | wrong samples committed at step | loss by tenth of the run |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        builtin = f"{r['builtin_rmse']:.4f} ({r['builtin_wrong_mode']})" if r["builtin"] else ""
        commits = ", ".join(f"{k}: {v}" for k, v in r["commit_step"].items())
        curve = " ".join(f"{v:.3g}" for v in r["loss_curve"] or [])
        lines.append(f"| {r['model']} | {r['mixture']} | {r['nfe']} | {r['rmse']:.4f} ({r['wrong_mode']}) "
                     f"| {r['teacher']} | {r['teacher_rmse']:.4f} ({r['teacher_wrong_mode']}) | {builtin} "
                     f"| {commits} | {curve} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=Path, required=True, help="tables kept by bench.defaults --keep-tables")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    builtins = json.loads((RESULTS / "carry.json").read_text())
    rows = []
    for path in sorted(args.tables.glob("*.safetensors")):
        rows.append(diagnose(path, args.samples, builtins))
        print(f"{path.stem}: {rows[-1]['rmse']:.4f}, committed at {rows[-1]['commit_step']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnosis.json").write_text(json.dumps(rows, indent=1))
    (args.out / "diagnosis.md").write_text(summarize(rows))
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
