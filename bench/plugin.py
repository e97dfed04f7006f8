"""EPD Plugin benchmark: each supported base sampler bare (every ComfyUI scheduler) against the same base under
EPD Plugin with the table distilled for it, at equal NFE, through ComfyUI's real sampling path, with the exact
answer key of :mod:`bench.accuracy`.

    python -m bench.plugin                          # SD1.5 and SD3 forms of the reference mixture, NFE 6 8 10
    python -m bench.plugin --forms sd15_eps --nfes 10 --samples 1024

Merges its rows into ``bench/results/plugin.json`` (bare and plugin rows; a row of the same model, sampler and
NFE is replaced) and writes ``plugin.md`` from it (per base and NFE: the bare base at its best scheduler against
the plugin, and their ratio); merges the plugin rows (``sampler = "epd_plugin_<base>"``) into ``accuracy.json``
the same way. NFE counts
sequential model rounds: an EPD step is two (the plain prediction, then the K points in one batched call).
Over ``euler`` the plugin is the EPD solver, so its tables are the EPD tables of the same NFE.
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

from bench.accuracy import HELD_OUT_SEED, RESULTS, answer_key, builtin_steps, metrics, run
from epd_core import GaussianMixture, load_params
from epd_dev import ROOT, comfy_harness

FORMS = ("sd15_eps", "sd3_flow")
NFES = (6, 8, 10)
SAMPLES = 8192


def plugin_runs(form: str, nfe: int, base: str) -> list[tuple[Path, bool]]:
    """The bundled tables the plugin runs over ``base`` at ``nfe`` rounds, with whether a final denoise is added:
    the EPD tables (their points on the Euler step) of ``nfe``, and of ``nfe - 1`` plus a final denoise (the odd
    ones start with AFS), and the table distilled for ``base``'s placement where one is bundled."""
    stem = f"analytic-{form.split('_')[0]}-reference-nfe"
    runs = [(f"{stem}{nfe}", False), (f"{stem}{nfe - 1}", True), (f"{stem}{nfe}-plugin-{base}", False)]
    paths = [(ROOT / "weights" / "demo" / f"{name}.safetensors", final) for name, final in runs]
    return [(path, final) for path, final in paths if path.exists()]


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
            for path, final in plugin_runs(form, nfe, base):
                params = load_params(path)
                sampler = nodes["EPDPlugin"].execute(comfy.samplers.sampler_object(base), params, "auto").result[0]
                sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, final).result[0]
                out, c = run(model, sampler, sigmas, noise)
                rows.append({**common, "sampler": f"epd_plugin_{base}", "nfe": c.rounds, "evaluations": c.evals,
                             "scheduler": f"table:{path.stem}{'+final' if final else ''}",
                             **metrics(gm, out, exact)})  # fmt: skip
        log(f"{form}/{base}: done")
    return rows


def compare(rows: list[dict]) -> tuple[str, list[dict]]:
    """Per model, base and NFE: the bare base at its best scheduler against the best plugin run."""
    lines = ["| model | base | NFE | bare (best scheduler) RMSE | plugin RMSE (table) | ratio | wrong mode bare / "
             "plugin | samples |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    out = []
    for model in sorted({r["model"] for r in rows}):
        for base in dict.fromkeys(r["sampler"] for r in rows if not r["sampler"].startswith("epd_plugin_")):
            for nfe in sorted({r["nfe"] for r in rows}):
                sub = [r for r in rows if r["model"] == model and r["nfe"] == nfe]
                bare = [r for r in sub if r["sampler"] == base]
                plug = [r for r in sub if r["sampler"] == f"epd_plugin_{base}"]
                if not bare or not plug:
                    continue
                b, p = min(bare, key=lambda r: r["rmse"]), min(plug, key=lambda r: r["rmse"])
                ratio = b["rmse"] / p["rmse"]
                out.append({"model": model, "base": base, "nfe": nfe, "bare": b, "plugin": p, "ratio": ratio})
                lines.append(f"| {model} | {base} | {nfe} | {b['rmse']:.4f} ({b['scheduler']}) | {p['rmse']:.4f} "
                             f"({p['scheduler'].removeprefix('table:')}) | {ratio:.2f}x | {b['wrong_mode']} / "
                             f"{p['wrong_mode']} | {p['samples']} |")  # fmt: skip
    return "\n".join(lines) + "\n", out


def _same_run(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model", "mixture", "sampler", "nfe"))


def merge_rows(rows: list[dict], path: Path, only_plugin: bool) -> list[dict]:
    """``path``'s rows with those this run redid (same model, mixture, sampler and NFE) replaced by this run's
    (``only_plugin``: only plugin rows, as in ``accuracy.json``, whose bare rows have other sample counts)."""
    new = [r for r in rows if r["sampler"].startswith("epd_plugin_") or not only_plugin]
    old = json.loads(path.read_text()) if path.exists() else []
    merged = [r for r in old if not any(_same_run(r, n) for n in new)] + new
    path.write_text(json.dumps(merged, indent=1))
    return merged


def _job(spec: str) -> None:
    job = json.loads(spec)
    rows = bench_plugin(job["form"], job["bases"], job["nfes"], job["n"])
    Path(job["out"]).write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    ap.add_argument("--bases", nargs="*", help="default: every supported base (ddim is ComfyUI's euler)")
    ap.add_argument("--nfes", nargs="*", type=int, default=list(NFES))
    ap.add_argument("--samples", type=int, default=SAMPLES)
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
    args.out.mkdir(parents=True, exist_ok=True)
    table, _ = compare(merge_rows(rows, args.out / "plugin.json", only_plugin=False))
    (args.out / "plugin.md").write_text(table)
    merge_rows(rows, args.out / "accuracy.json", only_plugin=True)
    print(table)
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
