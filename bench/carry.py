"""Equal-NFE check of the carry student on the analytic mixtures: each form x mixture at NFE 5 and 10, the best
built-ins of ``accuracy.json`` re-run on more noises, against the bundled ``epd`` and ``carry`` tables.

The full field (every sampler x scheduler) is ``bench.accuracy``'s; this re-runs its ``--top`` best built-ins per
case (ranked there on 1,024 noises) with the tables on ``--samples`` noises (default 8,192, where a ratio no longer
hinges on a few samples that commit to another mixture component), through ComfyUI's sampling path.

    python -m bench.carry          # -> bench/results/carry.{json,md}
    python -m bench.carry --forms sd15_eps --mixtures wide --nfes 10   # one case, merged into carry.json
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.accuracy import (
    FORMS,
    HELD_OUT_SEED,
    PARALLEL,
    RESULTS,
    answer_key,
    builtin_sigmas,
    builtin_steps,
    case_key,
    merge_cases,
    metrics,
    rank,
    run,
)
from epd_core import GaussianMixture, load_params
from epd_core.files import write_atomic
from epd_dev import ROOT, comfy_harness

MIXTURES = ("reference", "wide", "multimodal")
TABLES = ROOT / "weights" / "demo"


def held_out(form: str, mixture: str, n: int) -> tuple[dict, torch.Tensor, Any, GaussianMixture, torch.Tensor, float]:
    """The pack's nodes (ComfyUI in-process, one thread), ``n`` held-out noises, the analytic model of ``form`` and
    ``mixture``, the mixture, the exact ODE end points and the answer key's step-halving gap."""
    torch.set_num_threads(1)
    nodes = comfy_harness.setup()
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    model, gm = nodes["EPDAnalyticModel"].execute(form, mixture, 0.0).result[0], GaussianMixture.named(mixture)
    exact, gap = answer_key(gm, form, noise, model)
    return nodes, noise, model, gm, exact, gap


def case(form: str, mixture: str, nfe: int, n: int, top: int, ranking: list[dict]) -> list[dict]:
    """One form x mixture x NFE: the ``top`` built-ins of ``ranking`` and the bundled tables of that NFE."""
    nodes, noise, model, gm, exact, gap = held_out(form, mixture, n)
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    base = {"model": f"analytic-{form}", "mixture": mixture, "samples": n, "answer_key_gap": gap}
    rows = []
    ranked = sorted((r for r in ranking if r["model"] == base["model"] and r["mixture"] == mixture and r["nfe"] == nfe
                     and not r["sampler"].startswith("epd")), key=lambda r: rank(r["rmse"]))  # fmt: skip
    for r in ranked[:top]:
        sampler, scheduler = r["sampler"], r["scheduler"]
        sigmas = builtin_sigmas(ms, sampler, scheduler, builtin_steps(sampler, nfe))
        out, c = run(model, comfy.samplers.sampler_object(sampler), sigmas, noise)
        rows.append({**base, "sampler": sampler, "scheduler": scheduler, "nfe": c.rounds, **metrics(gm, out, exact)})
    for path in sorted(TABLES.glob(f"analytic-{form.split('_')[0]}-{mixture}-nfe{nfe}*.safetensors")):
        params = load_params(path)
        if params.nfe != nfe or "plugin_base" in params.metadata:
            continue
        sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, True).result[0]
        sampler = nodes["EPDSampler"].execute(params, PARALLEL, True, "comfyui", "estimate").result[0]
        out, c = run(model, sampler, sigmas, noise)
        rows.append({**base, "sampler": f"epd_{params.student}", "scheduler": f"table:{path.stem}+estimate",
                     "nfe": c.rounds, **metrics(gm, out, exact)})  # fmt: skip
    print(f"{form}/{mixture} NFE {nfe}: {len(rows)} runs", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    head = (
        "| model | mixture | NFE | best built-in | RMSE | `epd` table | RMSE | ratio | `carry` table | RMSE | ratio |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, mixture, nfe in sorted({case_key(r) for r in rows}):
        sub = [r for r in rows if case_key(r) == (model, mixture, nfe)]
        builtin = [r for r in sub if not r["sampler"].startswith("epd")]
        if not builtin:
            continue
        b = min(builtin, key=lambda r: rank(r["rmse"]))
        cells = [model, mixture, nfe, f"{b['sampler']} / {b['scheduler']}", f"{b['rmse']:.4f}"]
        for student in ("epd", "carry"):
            tables = [r for r in sub if r["sampler"] == f"epd_{student}"]
            if tables:
                t = min(tables, key=lambda r: rank(r["rmse"]))
                cells += [t["scheduler"].removeprefix("table:"), f"{t['rmse']:.4f}", f"{b['rmse'] / t['rmse']:.2f}x"]
            else:
                cells += ["", "", ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--top", type=int, default=8, help="built-ins per case, the best of accuracy.json")
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    ap.add_argument("--mixtures", nargs="*", default=list(MIXTURES))
    ap.add_argument("--nfes", nargs="*", type=int, default=[5, 10])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--ranking", type=Path, default=RESULTS / "accuracy.json", help="the field the built-ins come from")
    args = ap.parse_args(argv)
    ranking = json.loads(args.ranking.read_text())
    jobs = [(f, m, n) for f in args.forms for m in args.mixtures for n in args.nfes]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        forms, mixtures, nfes = ([job[i] for job in jobs] for i in range(3))
        rest = ([x] * len(jobs) for x in (args.samples, args.top, ranking))
        parts = pool.map(case, forms, mixtures, nfes, *rest)
        rows = [r for part in parts for r in part]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = merge_cases(rows, args.out / "carry.json")
    write_atomic(json.dumps(rows, indent=1).encode(), args.out / "carry.json", overwrite=True)
    table = summarize(rows)
    write_atomic(table.encode(), args.out / "carry.md", overwrite=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
