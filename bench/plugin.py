"""EPD Plugin benchmark: each supported base sampler bare (every ComfyUI scheduler) against the same base under
EPD Plugin with the tables bundled for it, at equal NFE, through ComfyUI's real sampling path: on the reference
mixture with the exact answer key of :mod:`bench.accuracy`, on the MNIST models as :mod:`bench.neural` samples and
scores them.

    python -m bench.plugin                          # SD1.5 and SD3 forms of the reference mixture, NFE 6-10,
                                                    # and the MNIST models (bench.neural's sampling and scores)
    python -m bench.plugin --forms sd15_eps --mnist --nfes 10 --samples 1024

Merges its rows into ``bench/results/plugin.json`` (bare and plugin rows; a row of the same model, sampler and
NFE is replaced) and writes ``plugin.md`` from it (per base and NFE: the bare base at its best scheduler against
the plugin, and their ratio); merges the plugin rows (``sampler = "epd_plugin_<base>"``) into ``accuracy.json``
the same way. NFE counts
sequential model rounds: an EPD step is two (the plain prediction, then the K points in one batched call), a carry
step one. Over ``euler`` the plugin is the EPD solver, so its tables are the EPD tables of the same NFE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess  # noqa: S404  (runs this module on its own jobs)
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.accuracy import (
    HELD_OUT_SEED,
    PARALLEL,
    RESULTS,
    TABLE_ENDINGS,
    answer_key,
    builtin_sigmas,
    builtin_steps,
    metrics,
    rank,
    run,
)
from epd_core import GaussianMixture, load_params
from epd_core.files import write_atomic
from epd_dev import ROOT, comfy_harness

FORMS = ("sd15_eps", "sd3_flow")
NFES = (6, 7, 8, 9, 10)
SAMPLES = 8192
MNIST_KINDS = ("eps", "flow")
MNIST_SAMPLES = 2050  # bench.neural's
ENDINGS = {label: (final, final_step) for final, final_step, label in TABLE_ENDINGS}


def plugin_runs(form: str, nfe: int, base: str) -> list[tuple[Path, str]]:
    """The bundled tables the plugin runs over ``base`` at ``nfe`` rounds, each with how it ends (an ending of
    :data:`bench.accuracy.TABLE_ENDINGS`): the EPD tables (their points on the Euler step) of ``nfe``, and of
    ``nfe - 1`` plus a final denoise (the odd ones start with AFS), the table distilled for ``base``'s placement,
    and the carry table of ``nfe`` (one round per step) ending on its last step's estimate."""
    stem = f"analytic-{form.split('_')[0]}-reference-nfe"
    runs = [(f"{stem}{nfe}", ""), (f"{stem}{nfe - 1}", "+final"), (f"{stem}{nfe}-plugin-{base}", ""),
            (f"{stem}{nfe}-carry", "+estimate")]  # fmt: skip
    paths = [(ROOT / "weights" / "demo" / f"{name}.safetensors", ending) for name, ending in runs]
    return [(path, ending) for path, ending in paths if path.exists()]


def bench_plugin(form: str, bases, nfes, n: int, log=lambda m: print(m, flush=True)) -> list[dict]:
    nodes = comfy_harness.setup()
    import comfy.samplers

    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    model = nodes["EPDAnalyticModel"].execute(form, "reference", 0.0).result[0]
    gm = GaussianMixture.named("reference")
    exact, key_gap = answer_key(gm, form, noise, model)
    ms = model.get_model_object("model_sampling")
    common = {"model": f"analytic-{form}", "mixture": "reference", "samples": n, "answer_key_gap": key_gap}
    rows = []
    for base in bases:
        for scheduler in comfy.samplers.SCHEDULER_NAMES:
            for nfe in nfes:
                sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, builtin_steps(base, nfe))
                out, c = run(model, comfy.samplers.sampler_object(base), sigmas, noise)
                if c.rounds == nfe:
                    rows.append({**common, "sampler": base, "scheduler": scheduler, "nfe": c.rounds,
                                 "evaluations": c.evals, **metrics(gm, out, exact)})  # fmt: skip
        for nfe in nfes:
            for path, ending in plugin_runs(form, nfe, base):
                params = load_params(path)
                final, final_step = ENDINGS[ending]
                sampler = nodes["EPDPlugin"].execute(comfy.samplers.sampler_object(base), params, PARALLEL, final_step)
                sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, final).result[0]
                out, c = run(model, sampler.result[0], sigmas, noise)
                rows.append({**common, "sampler": f"epd_plugin_{base}", "nfe": c.rounds, "evaluations": c.evals,
                             "scheduler": f"table:{path.stem}{ending}", **metrics(gm, out, exact)})  # fmt: skip
        log(f"{form}/{base}: done")
    return rows


def bench_plugin_mnist(kind: str, bases, nfes, n: int, reuse=(), log=lambda m: print(m, flush=True),
                       partial: Path | None = None, tables=None) -> list[dict]:  # fmt: skip
    """The same comparison on the MNIST model ``kind``, sampled as :mod:`bench.neural` samples it (cfg, the ten
    classes, its noises, answer key and scores): each base bare at every KSampler scheduler and every tuned schedule
    that fits, against the base under the plugin with each bundled ``mnist-<kind>-nfe<N>`` table of that NFE (ended
    on its last step's estimate, so a carry table keeps the base's rounds). ``reuse``: rows of an earlier
    ``bench.neural`` or ``bench.plugin`` run whose bare runs on the same noises and answer key are kept.
    ``partial``: a file the rows so far are written to after each base. ``tables``: folders to take the tables from
    instead of the bundled ones (a new table scored without rerunning the others)."""
    from bench import neural

    contest = neural.Contest(kind, n, reuse, log, partial)
    nodes, model = contest.nodes, contest.model
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    tables = [(path, load_params(path)) for _, path in neural.epd_tables(kind, tables or (neural.TABLES,))]
    for base in bases:
        for nfe in nfes:
            bare = comfy.samplers.sampler_object(base)
            for scheduler in comfy.samplers.SCHEDULER_NAMES:
                contest.add(base, scheduler, bare, builtin_sigmas(ms, base, scheduler, nfe), nfe)
            for scheduler, sigmas in neural.tuned_schedules(kind, nfe).items():
                contest.add(base, scheduler, bare, sigmas, nfe)
            for path, params in tables:
                if params.nfe != nfe:
                    continue
                sampler = nodes["EPDPlugin"].execute(bare, params, PARALLEL, "estimate").result[0]
                sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, True).result[0]
                contest.add(f"epd_plugin_{base}", f"table:{path.stem}+estimate", sampler, sigmas, nfe)
        log(f"mnist-{kind}/{base}: done")
        contest.save()
    return contest.rows


def record(rows: list[dict], out: Path) -> str:
    """Merge a run's rows into ``out``'s ``plugin.json`` (every row) and ``accuracy.json`` (the plugin rows), rewrite
    ``plugin.md`` from the merged records and return it."""
    out.mkdir(parents=True, exist_ok=True)
    table, _ = compare(merge_rows(rows, out / "plugin.json", only_plugin=False))
    write_atomic(table.encode(), out / "plugin.md", overwrite=True)
    merge_rows(rows, out / "accuracy.json", only_plugin=True)
    return table


def compare(rows: list[dict]) -> tuple[str, list[dict]]:
    """Per model, base and NFE: the bare base at its best scheduler against the best plugin run."""
    lines = ["| model | base | NFE | bare (best scheduler) RMSE | plugin RMSE (table) | ratio | wrong mode bare / "
             "plugin | digits FID bare / plugin | samples |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    out = []
    for model in sorted({r["model"] for r in rows}):
        for base in dict.fromkeys(r["sampler"] for r in rows if not r["sampler"].startswith("epd_plugin_")):
            for nfe in sorted({r["nfe"] for r in rows}):
                sub = [r for r in rows if r["model"] == model and r["nfe"] == nfe]
                bare = [r for r in sub if r["sampler"] == base]
                plug = [r for r in sub if r["sampler"] == f"epd_plugin_{base}"]
                if not bare or not plug:
                    continue
                b, p = min(bare, key=lambda r: rank(r["rmse"])), min(plug, key=lambda r: rank(r["rmse"]))
                ratio = b["rmse"] / p["rmse"]
                fid = f"{b['fid']:.1f} / {p['fid']:.1f}" if "fid" in b and "fid" in p else ""
                out.append({"model": model, "base": base, "nfe": nfe, "bare": b, "plugin": p, "ratio": ratio})
                lines.append(f"| {model} | {base} | {nfe} | {b['rmse']:.4f} ({b['scheduler']}) | {p['rmse']:.4f} "
                             f"({p['scheduler'].removeprefix('table:')}) | {ratio:.2f}x | {b['wrong_mode']} / "
                             f"{p['wrong_mode']} | {fid} | {p['samples']} |")  # fmt: skip
    return "\n".join(lines) + "\n", out


def _same_run(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model", "mixture", "sampler", "nfe"))


def merge_rows(rows: list[dict], path: Path, only_plugin: bool) -> list[dict]:
    """``path``'s rows with those this run redid (same model, mixture, sampler and NFE) replaced by this run's
    (``only_plugin``: only plugin rows, as in ``accuracy.json``, whose bare rows have other sample counts)."""
    new = [r for r in rows if r["sampler"].startswith("epd_plugin_") or not only_plugin]
    old = json.loads(path.read_text()) if path.exists() else []
    merged = [r for r in old if not any(_same_run(r, n) for n in new)] + new
    write_atomic(json.dumps(merged, indent=1).encode(), path, overwrite=True)  # a failed write keeps the old rows
    return merged


def partial_path(out: Path) -> Path:
    """Where a job writing ``out`` keeps its rows as it goes: not ``out`` itself, which only a finished job writes."""
    return out.with_name(out.name.removesuffix(".json") + ".partial.json")


def _job(spec: str) -> None:
    job = json.loads(spec)
    if "kind" in job:
        reuse = json.loads(Path(job["reuse"]).read_text()) if job["reuse"] else []
        rows = bench_plugin_mnist(job["kind"], job["bases"], job["nfes"], job["n"], reuse,
                                  partial=partial_path(Path(job["out"])), tables=job.get("tables"))  # fmt: skip
    else:
        rows = bench_plugin(job["form"], job["bases"], job["nfes"], job["n"])
    write_atomic(json.dumps(rows).encode(), Path(job["out"]), overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    ap.add_argument("--bases", nargs="*", help="default: every supported base (ddim is ComfyUI's euler)")
    ap.add_argument("--nfes", nargs="*", type=int, default=list(NFES))
    ap.add_argument("--samples", type=int, default=SAMPLES, help="noises per mixture")
    ap.add_argument("--mnist", nargs="*", default=list(MNIST_KINDS), help="the MNIST models (none: mixtures only)")
    ap.add_argument("--mnist-samples", type=int, default=MNIST_SAMPLES, help="noises per MNIST model")
    ap.add_argument("--reuse", type=Path, help="a neural.json or plugin.json whose bare MNIST runs are kept")
    ap.add_argument("--workers", type=int, help="processes (default: one per CPU core)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        _job(args.job)
        return 0
    comfy_harness.setup()
    bases = args.bases or [b for b in comfy_harness.pack_module("nodes.plugin").PLUGIN_BASES if b != "ddim"]
    t0 = time.time()
    # one job per form: the answer key (RK4, 400 steps) costs more than all the sampler runs
    jobs = [{"form": f, "bases": bases, "nfes": args.nfes, "n": args.samples} for f in args.forms]
    reuse = str(args.reuse) if args.reuse else None
    jobs += [{"kind": kind, "bases": bases, "nfes": args.nfes, "n": args.mnist_samples, "reuse": reuse}
             for kind in args.mnist]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:

        def one(i_job):
            i, job = i_job
            out = Path(tmp) / f"{i}.json"
            subprocess.run([sys.executable, "-m", "bench.plugin", "--job", json.dumps({**job, "out": str(out)})],  # noqa: S603
                           cwd=ROOT, check=True, env=env)  # fmt: skip
            return json.loads(out.read_text())

        with ThreadPoolExecutor(min(len(jobs), args.workers or os.cpu_count() or 1)) as pool:
            rows = [r for part in pool.map(one, enumerate(jobs)) for r in part]
    print(record(rows, args.out))
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
