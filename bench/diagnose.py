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

On the MNIST models (``--mnist eps:5 flow:5``), for the headline's cell: its best EPD table and best built-in
re-run on the recorded noises through ComfyUI (checked to reproduce their rows), the share of each one's squared
error carried by its wrong-class samples and the ratio among the samples both draw in the exact class, the commit
step of the table's wrong-class samples (the continuation is the network's guided ODE, Heun, to sigma 0), the
error of the continuation from the table's state after each step (which step adds the error), the same after the
first step and at the end with the exact first direction and with a zero-mean AFS in place of the table's own
(what a better first direction could gain), the teacher ceiling and the training curve:

    python -m bench.diagnose --mnist eps:5           # -> bench/results/diagnosis_mnist.{json,md}
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
from epd_core.files import load_params, write_atomic
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


MNIST_CONTINUATION = 50  # Heun steps of an MNIST continuation (the answer key: 100 from sigma max)
MNIST_TRACE = 200  # samples whose continuation after every step says which step adds the error
TEACHERS = {"dpm2": "dpm_2", "heun": "heun", "dpmpp_2m": "dpmpp_2m"}  # a table's teacher: ComfyUI's sampler


def mnist_continuation(contest, x: torch.Tensor, sigma: float, labels: torch.Tensor) -> torch.Tensor:
    """The network's guided ODE from states ``x`` at ``sigma`` (samples prompted with ``labels``) to 0: Heun on a
    rho-7 grid. Each sample sits in a batch slot of its class (slot i draws digit i mod 10)."""
    import comfy.samplers

    from bench import neural
    from epd_core.schedules import polynomial

    ms = contest.model.get_model_object("model_sampling")
    width = int(torch.bincount(labels, minlength=10).max())
    slots = torch.stack([10 * int((labels[:j] == labels[j]).sum()) + labels[j] for j in range(len(labels))])
    batch = x.new_zeros(10 * width, *x.shape[1:])
    batch[slots] = x / sigma  # ComfyUI scales the noise by sigma below its sigma max (and flow: + (1 - sigma) * 0)
    grid = polynomial(MNIST_CONTINUATION, min(float(ms.sigma_min), sigma), sigma).float()
    sigmas = torch.cat([grid, grid.new_zeros(1)])
    heun = comfy.samplers.sampler_object("heun")
    return neural.run(contest.model, contest.positive, contest.negative, heun, sigmas, batch)[0][slots]


def mnist_commit_steps(contest, states: list[tuple[float, torch.Tensor]], wrong: torch.Tensor) -> dict[str, int]:
    """For the ``wrong`` samples: the step after which the exact continuation from the table's state draws another
    class than the answer key for good (``end``: only the table's last step moved it)."""
    if wrong.numel() == 0:
        return {}
    labels = contest.score.labels[wrong]
    right = contest.score.exact_class[wrong]
    stays = torch.ones(len(states) + 1, wrong.numel(), dtype=torch.bool)  # state 0 is the key's own start
    for i, (sigma, x) in enumerate(states[1:], start=1):
        end = mnist_continuation(contest, x[wrong], sigma, labels)
        stays[i] = contest.score.classes(end) == right
    stays[-1] = False
    counts: dict[str, int] = {}
    for j in range(wrong.numel()):
        last = int(stays[:, j].nonzero().flatten().max())
        label = "end" if last == len(states) - 1 else str(last + 1)
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "end", int(kv[0]) if kv[0] != "end" else 0)))


def mnist_error_after_steps(contest, states: list[tuple[float, torch.Tensor]], end: torch.Tensor) -> list[float]:
    """On the first :data:`MNIST_TRACE` samples: the RMSE to the answer key of the exact continuation from the
    table's state after each step, then of the table's own end (the last step's increase is its final move)."""
    from bench import neural

    some = torch.arange(min(MNIST_TRACE, end.shape[0]))
    labels, exact = contest.score.labels[some], contest.exact[some]
    errors = [neural.rmse(mnist_continuation(contest, x[some], sigma, labels), exact) for sigma, x in states[1:]]
    return [*errors, neural.rmse(end[some], exact)]


def mnist_first_step(contest, params, label: str) -> dict[str, dict]:
    """What a better first direction could gain, for an AFS table: the table run with its own first direction
    (``table``), with the network's exact one (``exact``: a real model call at sigma max, one round more) and, if
    its AFS is mean-aware, with the zero-mean AFS (``zero_mean``), each ending as the row does (``label``). For
    each: the RMSE of the exact continuation after the first step (the first :data:`MNIST_TRACE` samples), of the
    end (all samples) and the rounds. The table is not retrained for the others: they show what the first
    direction changes by itself."""
    from bench import neural

    variants = {"table": params}
    if params.afs:
        variants["exact"] = params.replace(afs=False)
        if params.afs_mean is not None:
            variants["zero_mean"] = params.replace(afs_mean=None)
    some = torch.arange(min(MNIST_TRACE, contest.noise.shape[0]))
    out = {}
    for name, table in variants.items():
        seen: dict[int, torch.Tensor] = {}
        callback = lambda i, denoised, x, total, seen=seen: seen.setdefault(i, x[some].clone())  # noqa: E731
        sampler, sigmas = neural.epd_contender(contest, table, label)
        end, rounds = neural.run(contest.model, contest.positive, contest.negative, sampler, sigmas, contest.noise,
                                 callback)  # fmt: skip
        after = mnist_continuation(contest, seen[1], float(sigmas[1]), contest.score.labels[some])
        out[name] = {"after_step_1": neural.rmse(after, contest.exact[some]), "end": neural.rmse(end, contest.exact),
                     "rounds": rounds.rounds}  # fmt: skip
    return out


def mnist_teacher(contest, params, sigmas: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The table's training teacher (its recorded solver and M) along the table's grid, ended on its denoised
    estimate at the grid's last point, as the table ends."""
    import comfy.samplers

    from bench import neural

    d = params.metadata.get("distilled", {})
    teacher, m_points = d.get("teacher", params.teacher), int(d.get("teacher_m", params.teacher_steps_m))
    grid = sigmas[sigmas > 0].double()
    fine = torch.cat([subdivide(grid, m_points), grid.new_zeros(1)]).float()
    sampler = comfy.samplers.sampler_object(TEACHERS[teacher])
    end = neural.run(contest.model, contest.positive, contest.negative, sampler, fine, contest.noise)[0]
    return f"{teacher} M={m_points}", end


def diagnose_mnist(kind: str, nfe: int, rows: list[dict], log=print) -> dict:
    """Where the headline's EPD table on MNIST model ``kind`` at ``nfe`` loses its error (see the module's text)."""
    from bench import neural

    model = f"mnist-{kind}"
    _, summary = neural.summarize([r for r in rows if r["model"] == model])
    (cell,) = [s for s in summary if s["nfe"] == nfe]
    contest = neural.Contest(kind, cell["epd"]["samples"], log=log)
    table, label = neural.table_of(cell["epd"])
    params = load_params(neural.table_file(cell["epd"]))
    seen: list[tuple[int, torch.Tensor]] = []
    callback = lambda i, denoised, x, total: seen.append((i, x.clone()))  # noqa: E731
    end, sigmas = neural.rerun(contest, cell["epd"], callback)
    states = [(float(sigmas[i]), x) for i, x in seen]
    ends = {"epd": end, "builtin": neural.rerun(contest, cell["best_builtin"])[0]}
    mse = {side: neural.per_sample_mse(end, contest.exact) for side, end in ends.items()}
    wrong = {side: contest.score.classes(end) != contest.score.exact_class for side, end in ends.items()}
    both_right = ~(wrong["epd"] | wrong["builtin"])
    teacher, t_end = mnist_teacher(contest, params, sigmas)
    out = {"model": model, "nfe": nfe, "samples": contest.noise.shape[0], "table": table,
           "builtin": neural.contender_label(cell["best_builtin"]), "teacher": teacher,
           "teacher_rmse": neural.rmse(t_end, contest.exact),
           "teacher_wrong_mode": int((contest.score.classes(t_end) != contest.score.exact_class).sum()),
           "both_right": int(both_right.sum()),
           "commit_step": mnist_commit_steps(contest, states, wrong["epd"].nonzero().flatten()),
           "trace_samples": min(MNIST_TRACE, contest.noise.shape[0]),
           "error_after_step": mnist_error_after_steps(contest, states, ends["epd"]),
           "first_step": mnist_first_step(contest, params, label),
           "loss_curve": params.metadata.get("distilled", {}).get("loss_curve")}  # fmt: skip
    for side in ("epd", "builtin"):
        out[f"{side}_rmse"] = float(mse[side].mean().sqrt())
        out[f"{side}_wrong_mode"] = int(wrong[side].sum())
        out[f"{side}_wrong_share"] = float(mse[side][wrong[side]].sum() / mse[side].sum())
        out[f"{side}_rmse_both_right"] = float(mse[side][both_right].mean().sqrt())
    out["ratio"] = out["builtin_rmse"] / out["epd_rmse"]
    out["ratio_both_right"] = out["builtin_rmse_both_right"] / out["epd_rmse_both_right"]
    return out


def summarize_mnist(rows: list[dict]) -> str:
    lines = ["| model | NFE | EPD table: RMSE (wrong class; their share of the squared error) "
             "| best built-in: RMSE (wrong; share) | ratio | both in the exact class: samples, EPD / built-in RMSE, "
             "ratio | teacher RMSE (wrong) | wrong classes committed at step | RMSE of the exact continuation after "
             "each step, then the table's end (samples) | first direction: after step 1 / end (rounds) | "
             "loss by tenth of the run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        commits = ", ".join(f"{k}: {v}" for k, v in r["commit_step"].items())
        curve = " ".join(f"{v:.3g}" for v in r["loss_curve"] or [])
        trace = " ".join(f"{v:.4f}" for v in r["error_after_step"]) + f" ({r['trace_samples']})"
        first = "; ".join(f"{k} {v['after_step_1']:.4f} / {v['end']:.4f} ({v['rounds']})"
                          for k, v in r.get("first_step", {}).items())  # fmt: skip
        lines.append(f"| {r['model']} | {r['nfe']} | {r['table']}: {r['epd_rmse']:.4f} ({r['epd_wrong_mode']}; "
                     f"{r['epd_wrong_share']:.0%}) | {r['builtin']}: {r['builtin_rmse']:.4f} "
                     f"({r['builtin_wrong_mode']}; {r['builtin_wrong_share']:.0%}) | {r['ratio']:.2f}x "
                     f"| {r['both_right']}, {r['epd_rmse_both_right']:.4f} / {r['builtin_rmse_both_right']:.4f}, "
                     f"{r['ratio_both_right']:.2f}x | {r['teacher']}: {r['teacher_rmse']:.4f} "
                     f"({r['teacher_wrong_mode']}) | {commits} | {trace} | {first} | {curve} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=Path, help="tables kept by bench.defaults --keep-tables")
    ap.add_argument("--mnist", nargs="+", metavar="KIND:NFE", help="MNIST cells of the headline, e.g. eps:5")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.mnist:
        recorded = json.loads((args.out / "neural.json").read_text())
        found = [diagnose_mnist(kind, int(nfe), recorded) for kind, nfe in (c.split(":") for c in args.mnist)]
        path = args.out / "diagnosis_mnist.json"
        keys = {(r["model"], r["nfe"]) for r in found}
        kept = [r for r in json.loads(path.read_text()) if (r["model"], r["nfe"]) not in keys] if path.is_file() else []
        rows = sorted(kept + found, key=lambda r: (r["model"], r["nfe"]))
        write_atomic(json.dumps(rows, indent=1).encode(), path, overwrite=True)
        write_atomic(summarize_mnist(rows).encode(), args.out / "diagnosis_mnist.md", overwrite=True)
        print(summarize_mnist(rows))
        return 0
    if args.tables is None:
        ap.error("give --tables or --mnist")
    builtins = json.loads((RESULTS / "carry.json").read_text())
    rows = []
    for path in sorted(args.tables.glob("*.safetensors")):
        rows.append(diagnose(path, args.samples, builtins))
        print(f"{path.stem}: {rows[-1]['rmse']:.4f}, committed at {rows[-1]['commit_step']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(json.dumps(rows, indent=1).encode(), args.out / "diagnosis.json", overwrite=True)
    write_atomic(summarize(rows).encode(), args.out / "diagnosis.md", overwrite=True)
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
