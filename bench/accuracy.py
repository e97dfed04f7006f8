"""Accuracy benchmark: EPD against ComfyUI's deterministic samplers at equal NFE, with an exact answer key.

Every contender runs through ComfyUI's real sampling path (``comfy.sample.sample_custom``) on the analytic
Gaussian-mixture model, whose probability-flow ODE solution is computed to high accuracy in float64 (checked
by comparing two resolutions). NFE counts sequential model rounds (the K parallel points of an EPD step count
once); ``evaluations`` counts every network evaluation per sample.

    python -m bench.accuracy            # full run -> bench/results/accuracy.{json,md,png}
    python -m bench.accuracy --quick    # a small version (CI)

(from the repository root; ComfyUI starts in-process, on the CPU, when a run begins).

The full run: the three forms of the reference mixture at every NFE, the wide and multimodal mixtures at NFE 5
and 10, and the digits UNet at NFE 5 and 10 with three schedulers, one process per CPU core.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess  # noqa: S404  (runs this script on its own jobs)
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from epd_core import EPDParams, GaussianMixture, load_params
from epd_core.analytic import ANALYTIC_FORMS, MIXTURES, rk4
from epd_core.files import write_atomic
from epd_core.params import time_points_for_nfe
from epd_core.schedules import polynomial
from epd_dev import ROOT, comfy_harness
from epd_dev.digits import training_digits

DETERMINISTIC = [
    "euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "res_multistep",
    "gradient_estimation", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
TWO_CALLS = {"heun": 2, "dpm_2": 2, "heunpp2": 3}
FORMS = ("sd15_eps", "sd3_flow", "flux_flow")
NFES = (3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20)
SHORT_NFES = (5, 10)  # the wide and multimodal mixtures, and the neural model
NEURAL_SCHEDULERS = ("karras", "exponential", "normal")
HELD_OUT_SEED = 2**31 - 1  # distillation draws its noises from seeds 0, 1, ...: these are held out
RESULTS = ROOT / "bench" / "results"
KEY_STEPS = 400  # RK4 steps of the mixtures' answer key


# How EPD's points are batched in the benchmarks: the round counters (a unet wrapper here, a cfg function in
# bench.neural) are model patches, under which EPD's "auto" goes point by point; without them auto batches on the CPU.
PARALLEL = "batched"


class Counter:
    """Counts model rounds and per-sample evaluations through ComfyUI's unet wrapper."""

    def __init__(self, batch: int) -> None:
        self.batch, self.rounds, self.evals = batch, 0, 0

    def __call__(self, apply_model, args):
        self.rounds += 1
        self.evals += args["input"].shape[0] // self.batch
        return apply_model(args["input"], args["timestep"], **args["c"])


# an EPD table ends at its own sigma_min; "+final": one denoise call to 0; "+estimate": its last step extended to 0
TABLE_ENDINGS = ((False, "denoise", ""), (True, "denoise", "+final"), (True, "estimate", "+estimate"))


def mixture_denoiser(gm: GaussianMixture, form: str):
    """The mixture's exact denoiser in the form's time variable (VE sigma for ``sd15_eps``, flow time otherwise)."""
    return gm.denoise_ve if form == "sd15_eps" else gm.denoise_flow


def exact_endpoint(gm: GaussianMixture, form: str, x: torch.Tensor, t: float, steps: int = KEY_STEPS) -> torch.Tensor:
    """The exact ODE end point from state ``x`` at time ``t``: RK4 in float64 over ``steps`` polynomial steps down
    to 1e-5, then the denoised end."""
    den = mixture_denoiser(gm, form)
    grid = polynomial(steps, 1e-5, t)
    return den(rk4(den, x.double(), grid), grid[-1].expand(x.shape[0]))


def answer_key(gm: GaussianMixture, form: str, noise: torch.Tensor, model) -> tuple[torch.Tensor, float]:
    """Exact ODE endpoint from the noise (:func:`exact_endpoint`, :data:`KEY_STEPS` steps) and its largest gap to
    a solve with half as many steps (accuracy check)."""
    ms = model.get_model_object("model_sampling")
    if form == "sd15_eps":
        s_max = float(ms.sigma_max)
        x, hi = noise.double() * math.sqrt(1 + s_max**2), s_max
    else:
        x, hi = noise.double(), 1.0
    coarse, key = (exact_endpoint(gm, form, x, hi, steps) for steps in (KEY_STEPS // 2, KEY_STEPS))
    return key, float((key - coarse).abs().max())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets (fixed random unit directions)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    dirs = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def rank(value: float) -> float:
    """A metric as a ``min`` key: NaN (a diverged run) ranks last. Compared as it is, a NaN listed first came out
    least, and a diverged sampler was picked as the best built-in with a ratio of "nanx"."""
    return math.inf if math.isnan(value) else value


def metrics(gm: GaussianMixture | DigitClasses, out: torch.Tensor, exact: torch.Tensor) -> dict:
    """RMSE to the answer key and distribution metrics: the sliced Wasserstein distance to the exact samples, and
    which samples landed in another mode than the exact solution (mixture component, or digit class; they dominate
    the RMSE)."""
    out, exact = out.detach().double(), exact.detach()
    rmse = float(((out - exact) ** 2).mean().sqrt())
    right = gm.component(out) == gm.component(exact)
    rmse_right = float(((out[right] - exact[right]) ** 2).mean().sqrt()) if right.any() else float("nan")
    return {"rmse": rmse, "sliced_wasserstein": sliced_wasserstein(out, exact), "rmse_right_mode": rmse_right,
            "wrong_mode": int((~right).sum()), "right_mode_fraction": float(right.float().mean())}  # fmt: skip


class DigitClasses:
    """The neural model's "components": a sample's class is the label of its nearest training digit (latent
    space), so a run that turns a 3 into an 8 counts as a wrong mode, like a wrong component on a mixture."""

    def __init__(self) -> None:
        train, self.labels = training_digits()
        self.train = train.double().flatten(1)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        return self.labels[torch.cdist(x.double().flatten(1), self.train).argmin(1)]


def digits_answer_key(model, noise: torch.Tensor, steps=(40, 80)) -> tuple[torch.Tensor, float]:
    """The network's own ODE endpoint: RK4 in float64 state (float32 network) on a rho-7 grid over the model's
    sigma range, then its denoise at sigma_min (where ComfyUI's samplers end); gap between two step counts."""
    ms = model.get_model_object("model_sampling")
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    base = model.model

    def den(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return base.apply_model(x.float(), sigma.float()).double()

    x = noise.double() * math.sqrt(1 + hi**2)
    ends = []
    for n in steps:
        grid = polynomial(n, lo, hi)
        ends.append(den(rk4(den, x, grid), grid[-1].expand(x.shape[0])))
    return ends[1], float((ends[1] - ends[0]).abs().max())


def run(model, sampler, sigmas, noise) -> tuple[torch.Tensor, Counter]:
    import comfy.sample

    counter = Counter(noise.shape[0])
    m = model.clone()
    m.set_model_unet_function_wrapper(counter)
    cond = [[torch.zeros(1, 1, 8), {}]]
    out = comfy.sample.sample_custom(m, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros_like(noise),
                                     disable_pbar=True, seed=0)  # fmt: skip
    return out, counter


def builtin_steps(sampler: str, nfe: int) -> int | None:
    """The steps that make ``sampler`` take ``nfe`` model calls, None if no count does."""
    if sampler == "heunpp2":  # its last two steps are Heun's (2 calls) and Euler's (1): 3s - 3 calls for s >= 2
        return 1 if nfe == 1 else nfe // 3 + 1 if nfe % 3 == 0 else None
    calls = TWO_CALLS.get(sampler, 1)
    steps = (nfe + calls - 1) // calls if calls > 1 else nfe  # the last step to 0 takes one call
    return steps if steps >= 1 else None


def builtin_sigmas(model_sampling, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas KSampler gives ``sampler`` for ``steps`` steps of ``scheduler`` (one step more with the
    penultimate sigma dropped, for the samplers that discard it)."""
    import comfy.samplers

    if sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)


def epd_tables(form: str, mixture: str) -> list[Path]:
    if form == "digits_eps":
        return sorted((ROOT / "weights" / "demo").glob("digits-nfe*.safetensors"))
    return sorted((ROOT / "weights" / "demo").glob(f"analytic-{form.split('_')[0]}-{mixture}-*.safetensors"))


def start_tables(form: str, nfes) -> list[tuple[str, EPDParams]]:
    """The authors' untrained start table (K = 2, r at 1/3 and 2/3, equal weights) on the form's default grid."""
    hyper = dict(ANALYTIC_FORMS["sd15" if form == "digits_eps" else form.split("_")[0]])
    out = []
    for nfe in nfes:
        if nfe >= 3:
            steps, afs = time_points_for_nfe(nfe)
            out.append((f"start-nfe{nfe}", EPDParams.start(steps, 2, afs=afs, **hyper)))
    return out


def bench_model(form: str, mixture: str, samplers, schedulers, nfes, n: int, log) -> list[dict]:
    import comfy.samplers

    nodes = comfy_harness.setup()
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    if form == "digits_eps":
        model, gm = nodes["EPDDigitsModel"].execute().result[0], DigitClasses()
        exact, key_gap = digits_answer_key(model, noise)
        name = "digits-unet"
    else:
        model, gm = nodes["EPDAnalyticModel"].execute(form, mixture, 0.0).result[0], GaussianMixture.named(mixture)
        exact, key_gap = answer_key(gm, form, noise, model)
        name = f"analytic-{form}"
    ms = model.get_model_object("model_sampling")
    rows = []
    base = {"model": name, "mixture": mixture, "samples": n, "answer_key_gap": key_gap}
    for sampler in samplers:
        for scheduler in schedulers:
            for nfe in nfes:
                if (steps := builtin_steps(sampler, nfe)) is None:  # no step count gives this NFE
                    continue
                sigmas = builtin_sigmas(ms, sampler, scheduler, steps)
                out, c = run(model, comfy.samplers.sampler_object(sampler), sigmas, noise)
                if c.rounds != nfe:
                    continue
                rows.append({**base, "sampler": sampler, "scheduler": scheduler, "nfe": c.rounds,
                             "evaluations": c.evals, **metrics(gm, out, exact)})  # fmt: skip
    # the tables of the NFEs run; a table distilled for EPD Plugin is bench.plugin's (on its own noises)
    tables = [(path.stem, params) for path in epd_tables(form, mixture)
              if (params := load_params(path)).nfe in nfes and "plugin_base" not in params.metadata]  # fmt: skip
    for stem, params in tables + start_tables(form, nfes):
        for final, final_step, label in TABLE_ENDINGS:
            sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, final).result[0]
            name = "epd_start" if stem.startswith("start-") else "epd"
            sampler = nodes["EPDSampler"].execute(params, PARALLEL, True, "comfyui", final_step).result[0]
            out, c = run(model, sampler, sigmas, noise)
            rows.append({**base, "sampler": name, "scheduler": f"table:{stem}{label}", "nfe": c.rounds,
                         "evaluations": c.evals, **metrics(gm, out, exact)})  # fmt: skip
    log(f"{form}/{mixture}: {len(rows)} runs, answer-key gap {key_gap:.1e}")
    return rows


def _bench_job(form, mixture, samplers, schedulers, nfes, n) -> list[dict]:
    return bench_model(form, mixture, samplers, schedulers, nfes, n, lambda m: print(m, flush=True))


def _modes(r: dict) -> list[str]:
    right = r.get("rmse_right_mode")  # the neural models' records have none
    return [f"{r['wrong_mode']}/{r['samples']}", "-" if right is None else f"{right:.4f}"]


def case_key(row: dict) -> tuple:
    """The case a record belongs to: (model, mixture, NFE)."""
    return row["model"], row["mixture"], row["nfe"]


def run_key(row: dict) -> tuple:
    """One run of a case: (model, mixture, NFE, sampler, scheduler)."""
    return row["model"], row.get("mixture"), row["nfe"], row["sampler"], row.get("scheduler")


def merge_runs(rows: list[dict], old: list[dict]) -> list[dict]:
    """``rows`` in place of ``old``'s records of the cases they re-ran (a model, mixture and NFE with a built-in row
    among ``rows``: its whole field) and of the same runs elsewhere (a table ended by a model call lands at NFE + 1);
    other cases and EPD Plugin's records (``bench.plugin``'s, on their own noises) stay. A run restricted to some NFEs
    (``--nfes``, ``--kinds``) dropped the case's other NFEs, whose tables had run too."""
    cases = {run_key(r)[:3] for r in rows if not r["sampler"].startswith("epd")}
    runs = {run_key(r) for r in rows}
    redone = [
        run_key(r) in runs or (run_key(r)[:3] in cases and not r["sampler"].startswith("epd_plugin")) for r in old
    ]
    return [r for r, gone in zip(old, redone, strict=True) if not gone] + rows


def merge_cases(rows: list[dict], path: Path, key=case_key) -> list[dict]:
    """``rows`` in place of the records in ``path`` of the same cases (``key``); other cases stay, so one case can be
    re-run alone (``bench.accuracy`` rewrote the whole file, dropping the rest)."""
    redone = {key(r) for r in rows}
    old = json.loads(path.read_text()) if path.exists() else []
    return [r for r in old if key(r) not in redone] + rows


def same_noises(rows: list[dict]) -> list[dict]:
    """The rows on each (model, mixture)'s field noises: the sample count most of its built-in rows have. EPD
    Plugin's records (``bench.plugin``, on 8,192 noises) are another noise set; compared with the field's 1,024 they
    looked up to 15x worse than the same table under EPD Sampler."""
    counts: dict[tuple[str, str], collections.Counter] = {}
    for r in rows:
        if r["sampler"] != "exact" and not r["sampler"].startswith("epd"):
            counts.setdefault((r["model"], r["mixture"]), collections.Counter())[r.get("samples")] += 1
    field = {key: c.most_common(1)[0][0] for key, c in counts.items()}
    return [r for r in rows if r.get("samples") == field.get((r["model"], r["mixture"]), r.get("samples"))]


def summarize(rows: list[dict]) -> tuple[str, list[dict]]:
    """Per model and NFE: the best built-in (sampler, scheduler) and the best EPD run (on the same noises, see
    :func:`same_noises`); their ratio."""
    rows = same_noises(rows)
    lines = ["| model | mixture | NFE | best built-in (sampler / scheduler) | RMSE | wrong mode | RMSE right mode | "
             "EPD (table) | RMSE | wrong mode | RMSE right mode | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary = []
    keys = sorted({(r["model"], r["mixture"]) for r in rows})
    for model, mixture in keys:
        sub = [r for r in rows if r["model"] == model and r["mixture"] == mixture]
        for nfe in sorted({r["nfe"] for r in sub}):
            builtin = [r for r in sub if r["nfe"] == nfe and not r["sampler"].startswith("epd")]
            epd = [r for r in sub if r["nfe"] == nfe and r["sampler"].startswith("epd") and r["sampler"] != "epd_start"]
            if not builtin or not epd:
                continue
            b = min(builtin, key=lambda r: rank(r["rmse"]))
            e = min(epd, key=lambda r: rank(r["rmse"]))
            ratio = b["rmse"] / e["rmse"]
            summary.append({"model": model, "mixture": mixture, "nfe": nfe, "best_builtin": b, "epd": e,
                            "ratio": ratio})  # fmt: skip
            table = e["scheduler"].removeprefix("table:")
            cells = [model, mixture, nfe, f"{b['sampler']} / {b['scheduler']}", f"{b['rmse']:.4f}", *_modes(b),
                     table, f"{e['rmse']:.4f}", *_modes(e), f"{ratio:.2f}x"]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n", summary


def distillation_view(rows: list[dict], nfes=(5, 7, 9)) -> str:
    """Distilled EPD against the untrained start table and the classic solvers (best scheduler each) per NFE."""
    classic = ("euler", "heun", "dpm_2", "ipndm", "dpmpp_2m")
    head = ["model", "mixture", "NFE", "EPD distilled", "EPD start", *classic]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, mixture in sorted({(r["model"], r["mixture"]) for r in rows}):
        for nfe in nfes:
            sub = [r for r in rows if r["model"] == model and r["mixture"] == mixture and r["nfe"] == nfe]
            best = {}
            for r in sub:
                if r["rmse"] < best.get(r["sampler"], {"rmse": math.inf})["rmse"]:
                    best[r["sampler"]] = r
            if "epd" not in best:
                continue
            cells = [model, mixture, nfe]
            for name in ("epd", "epd_start", *classic):
                r = best.get(name)
                cells.append(
                    "-" if r is None else f"{r['rmse']:.4f}" + (f" ({r['wrong_mode']})" if "wrong_mode" in r else "")
                )
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return (
        "\n".join(lines)
        + "\n\nRMSE against the answer key (wrong-mode count in brackets), best scheduler per solver.\n"
    )


PLUGIN_LINE = "epd_plugin (best base)"


def plot_lines(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """The plot's data: per (model, mixture), per sampler, the best RMSE at each NFE over its schedulers. EPD
    Plugin is one line, its best base at each NFE (the per-base comparison is ``plugin.md``'s); the answer key's
    own rows are left out, and so are rows on other noises than the panel's field (:func:`same_noises`)."""
    lines: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for r in same_noises(rows):
        if r["sampler"] == "exact":
            continue
        name = PLUGIN_LINE if r["sampler"].startswith("epd_plugin_") else r["sampler"]
        best = lines.setdefault((r["model"], r["mixture"]), {}).setdefault(name, {})
        best[r["nfe"]] = min(r["rmse"], best.get(r["nfe"], math.inf), key=rank)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """RMSE against NFE per model and mixture (:func:`plot_lines`); one colour per sampler across the panels,
    EPD's thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_lines(rows)
    names = sorted({name for lines in panels.values() for name in lines})
    cmap = plt.get_cmap("tab20")
    colour = {name: cmap(i % 20) for i, name in enumerate(names)}
    keys = sorted(panels)
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, best in sorted(panels[key].items()):
            xs = sorted(best)
            thick = name.startswith("epd")
            style = dict(lw=2.5, marker="o") if thick else dict(lw=1, alpha=0.6, marker=".", ms=4)
            ax.plot(xs, [best[x] for x in xs], color=colour[name], **style)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE vs exact ODE solution")
        ax.set_title(f"{key[0]} / {key[1]}")
    handles = [plt.Line2D([], [], color=colour[n], lw=2.5 if n.startswith("epd") else 1, label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(names)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)


def summary_files(rows: list[dict]) -> dict[str, str]:
    """The text files rendered from ``accuracy.json``'s rows, by name: the best of each case, the summary and the
    distillation view (every writer of accuracy.json, bench.neural and bench.plugin included, goes through
    ``bench.report``, which writes them and checks them)."""
    table, summary = summarize(rows)
    return {"accuracy.md": table, "summary.json": json.dumps(summary, indent=1), "distillation.md":
            distillation_view(rows)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run for CI: one model, few samplers")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    ap.add_argument("--mixtures", nargs="*", default=list(MIXTURES))
    ap.add_argument("--nfes", nargs="*", type=int, default=list(NFES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workers", type=int, help="processes (default: one per CPU core)")
    ap.add_argument("--no-neural", dest="neural", action="store_false", help="skip the digits UNet")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one JSON-described job, write its rows
    args = ap.parse_args(argv)
    comfy_harness.setup()
    import comfy.samplers

    if args.job:
        job = json.loads(args.job)
        rows = _bench_job(*job["job"])
        write_atomic(json.dumps(rows).encode(), Path(job["out"]), overwrite=True)
        return 0
    t0 = time.time()
    if args.quick:
        n = args.samples or 128
        jobs = [("sd15_eps", "reference", ["euler", "dpmpp_2m", "ipndm"], ["karras", "normal"], [5, 10], n)]
    else:
        n = args.samples or 1024
        all_schedulers = list(comfy.samplers.SCHEDULER_NAMES)
        jobs = [
            (f, m, DETERMINISTIC, all_schedulers, nfes, n)
            for f in args.forms
            for m in args.mixtures
            if (nfes := list(args.nfes) if m == "reference" else [k for k in SHORT_NFES if k in args.nfes])
        ]
        if args.neural:  # a network is ~60x dearer per call than a mixture on the CPU: NFE 5 and 10, 3 schedulers
            jobs.insert(0, ("digits_eps", "digits", DETERMINISTIC, NEURAL_SCHEDULERS, SHORT_NFES, n))
    workers = min(len(jobs), args.workers or os.cpu_count() or 1)
    if workers > 1:
        rows = _run_in_processes(jobs, workers)
    else:
        rows = [r for job in jobs for r in _bench_job(*job)]
    args.out.mkdir(parents=True, exist_ok=True)
    # the cases run replace their records; other cases, the MNIST rows (bench.neural) and EPD Plugin's stay
    path = args.out / "accuracy.json"
    rows = merge_runs(rows, json.loads(path.read_text()) if path.exists() else [])
    write_atomic(json.dumps(rows, indent=1).encode(), path, overwrite=True)  # a failed write keeps the old records
    for name, text in summary_files(rows).items():
        write_atomic(text.encode(), args.out / name, overwrite=True)
    table = (args.out / "accuracy.md").read_text()
    try:
        plot(rows, args.out / "accuracy.png")
    except ImportError:
        print("matplotlib missing: no plot")
    print(table)
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}")
    return 0


def _run_in_processes(jobs: list[tuple], workers: int) -> list[dict]:
    """Each job in its own process (this module with ``--job``), ``workers`` at a time, one thread each:
    oversubscribed threads are far slower than one per core."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:

        def one(i_job):
            i, job = i_job
            out = Path(tmp) / f"{i}.json"
            spec = json.dumps({"job": list(job), "out": str(out)})
            subprocess.run([sys.executable, "-m", "bench.accuracy", "--job", spec], cwd=ROOT, check=True,  # noqa: S603
                           env=env)  # fmt: skip
            return json.loads(out.read_text())

        with ThreadPoolExecutor(workers) as pool:
            return [r for part in pool.map(one, enumerate(jobs)) for r in part]


if __name__ == "__main__":
    sys.exit(main())
