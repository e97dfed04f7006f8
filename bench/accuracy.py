"""Accuracy benchmark: EPD against ComfyUI's deterministic samplers at equal NFE, with an exact answer key.

Every contender runs through ComfyUI's real sampling path (``comfy.sample.sample_custom``) on the analytic
Gaussian-mixture model, whose probability-flow ODE solution is computed to high accuracy in float64 (checked
by comparing two resolutions). NFE counts sequential model rounds (the K parallel points of an EPD step count
once); ``evaluations`` counts every network evaluation per sample.

    python bench/accuracy.py            # full run -> bench/results/accuracy.{json,md,png}
    python bench/accuracy.py --quick    # a small version (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import comfy_harness  # noqa: E402

NODES = comfy_harness.setup()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

from epd_core import GaussianMixture, load_params  # noqa: E402
from epd_core.analytic import heun  # noqa: E402

DETERMINISTIC = [
    "euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "res_multistep",
    "gradient_estimation", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
TWO_CALLS = {"heun": 2, "dpm_2": 2, "heunpp2": 3}
FORMS = ("sd15_eps", "sd3_flow", "flux_flow")
NFES = (3, 4, 5, 6, 8, 10, 12, 16, 20)
HELD_OUT_SEED = 2**31 - 1  # distillation draws its noises from seeds 0, 1, ...: these are held out
RESULTS = ROOT / "bench" / "results"


class Counter:
    """Counts model rounds and per-sample evaluations through ComfyUI's unet wrapper."""

    def __init__(self, batch: int) -> None:
        self.batch, self.rounds, self.evals = batch, 0, 0

    def __call__(self, apply_model, args):
        self.rounds += 1
        self.evals += args["input"].shape[0] // self.batch
        return apply_model(args["input"], args["timestep"], **args["c"])


def answer_key(gm: GaussianMixture, form: str, noise: torch.Tensor, model) -> tuple[torch.Tensor, float]:
    """Exact ODE endpoint (Heun, 2000 steps, float64) and its gap to a 1000-step solve (accuracy check)."""
    ms = model.get_model_object("model_sampling")
    if form == "sd15_eps":
        s_max = float(ms.sigma_max)
        x, den, hi = noise.double() * math.sqrt(1 + s_max**2), gm.denoise_ve, s_max
    else:
        x, den, hi = noise.double(), gm.denoise_flow, 1.0
    ends = []
    for steps in (1000, 2000):
        i = torch.arange(steps, dtype=torch.float64)
        grid = (hi ** (1 / 7) + i / (steps - 1) * (1e-5 ** (1 / 7) - hi ** (1 / 7))) ** 7
        end = heun(den, x, grid)
        ends.append(den(end, grid[-1].expand(x.shape[0])))
    return ends[1], float((ends[1] - ends[0]).abs().max())


def metrics(gm: GaussianMixture, out: torch.Tensor, exact: torch.Tensor) -> dict:
    out = out.double()
    wrong = gm.component(out) != gm.component(exact)
    right = ~wrong
    rmse = float(((out - exact) ** 2).mean().sqrt())
    rmse_right = float(((out[right] - exact[right]) ** 2).mean().sqrt()) if right.any() else float("nan")
    return {"rmse": rmse, "rmse_right_mode": rmse_right, "wrong_mode": int(wrong.sum()), "right_mode_fraction":
            float(right.float().mean())}  # fmt: skip


def run(model, sampler, sigmas, noise) -> tuple[torch.Tensor, Counter]:
    counter = Counter(noise.shape[0])
    m = model.clone()
    m.set_model_unet_function_wrapper(counter)
    cond = [[torch.zeros(1, 1, 8), {}]]
    out = comfy.sample.sample_custom(m, noise, 1.0, sampler, sigmas, cond, cond, torch.zeros_like(noise),
                                     disable_pbar=True, seed=0)  # fmt: skip
    return out, counter


def builtin_steps(sampler: str, nfe: int) -> int | None:
    calls = TWO_CALLS.get(sampler, 1)
    steps = (nfe + calls - 1) // calls if calls > 1 else nfe  # the last step to 0 takes one call
    return steps if steps >= 1 else None


def epd_tables(form: str, mixture: str) -> list[Path]:
    return sorted((ROOT / "weights").glob(f"analytic-{form.split('_')[0]}-{mixture}-*.safetensors"))


def bench_model(form: str, mixture: str, samplers, schedulers, nfes, n: int, log) -> list[dict]:
    model, _ = NODES["EPDAnalyticModel"].execute(form, mixture, 0.0).result
    gm = GaussianMixture.named(mixture)
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    exact, key_gap = answer_key(gm, form, noise, model)
    ms = model.get_model_object("model_sampling")
    rows = []
    base = {"model": f"analytic-{form}", "mixture": mixture, "samples": n, "answer_key_gap": key_gap}
    for sampler in samplers:
        for scheduler in schedulers:
            for nfe in nfes:
                steps = builtin_steps(sampler, nfe)
                sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
                if sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
                    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps + 1)
                    sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
                out, c = run(model, comfy.samplers.sampler_object(sampler), sigmas, noise)
                if c.rounds != nfe:
                    continue
                rows.append({**base, "sampler": sampler, "scheduler": scheduler, "nfe": c.rounds,
                             "evaluations": c.evals, **metrics(gm, out, exact)})  # fmt: skip
    for path in epd_tables(form, mixture):
        params = load_params(path)
        for final in (False, True):
            sigmas = NODES["EPDScheduler"].execute(model, params, 1.0, final).result[0]
            contenders = [("epd", NODES["EPDSampler"].execute(params, "auto", True, "comfyui").result[0])]
            base_name = params.metadata.get("plugin_base")
            if base_name:  # a plugin table runs over the base it was distilled for
                plugin = NODES["EPDPlugin"].execute(comfy.samplers.sampler_object(base_name), params, "auto")
                contenders = [(f"epd_plugin_{base_name}", plugin.result[0])]
            for name, sampler in contenders:
                out, c = run(model, sampler, sigmas, noise)
                rows.append({**base, "sampler": name, "scheduler": f"table:{path.stem}" + ("+final" if final else ""),
                             "nfe": c.rounds, "evaluations": c.evals, **metrics(gm, out, exact)})  # fmt: skip
    log(f"{form}/{mixture}: {len(rows)} runs, answer-key gap {key_gap:.1e}")
    return rows


def summarize(rows: list[dict]) -> tuple[str, list[dict]]:
    """Per model and NFE: the best built-in (sampler, scheduler) and the best EPD run; their ratio."""
    lines = ["| model | mixture | NFE | best built-in (sampler / scheduler) | RMSE | wrong mode | RMSE right mode | "
             "EPD (table) | RMSE | wrong mode | RMSE right mode | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary = []
    keys = sorted({(r["model"], r["mixture"]) for r in rows})
    for model, mixture in keys:
        sub = [r for r in rows if r["model"] == model and r["mixture"] == mixture]
        for nfe in sorted({r["nfe"] for r in sub}):
            builtin = [r for r in sub if r["nfe"] == nfe and not r["sampler"].startswith("epd")]
            epd = [r for r in sub if r["nfe"] == nfe and r["sampler"].startswith("epd")]
            if not builtin or not epd:
                continue
            b = min(builtin, key=lambda r: r["rmse"])
            e = min(epd, key=lambda r: r["rmse"])
            ratio = b["rmse"] / e["rmse"]
            summary.append({"model": model, "mixture": mixture, "nfe": nfe, "best_builtin": b, "epd": e,
                            "ratio": ratio})  # fmt: skip
            cells = [model, mixture, nfe, f"{b['sampler']} / {b['scheduler']}", f"{b['rmse']:.4f}",
                     f"{b['wrong_mode']}/{b['samples']}", f"{b['rmse_right_mode']:.4f}",
                     e["scheduler"].removeprefix("table:"), f"{e['rmse']:.4f}", f"{e['wrong_mode']}/{e['samples']}",
                     f"{e['rmse_right_mode']:.4f}", f"{ratio:.2f}x"]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n", summary


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["mixture"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (model, mixture) in zip(axes[0], keys, strict=True):
        sub = [r for r in rows if r["model"] == model and r["mixture"] == mixture]
        for name in sorted({r["sampler"] for r in sub}):
            best = {}
            for r in sub:
                if r["sampler"] == name and r["rmse"] < best.get(r["nfe"], math.inf):
                    best[r["nfe"]] = r["rmse"]
            xs = sorted(best)
            style = dict(lw=2.5, marker="o") if name.startswith("epd") else dict(lw=1, alpha=0.6)
            ax.plot(xs, [best[x] for x in xs], label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE vs exact ODE solution")
        ax.set_title(f"{model} / {mixture}")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def rewrite_summary(out: Path) -> str:
    """Re-create the Markdown table and plot from an existing accuracy.json."""
    rows = json.loads((out / "accuracy.json").read_text())
    table, summary = summarize(rows)
    (out / "accuracy.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(rows, out / "accuracy.png")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run for CI: one model, few samplers")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    ap.add_argument("--mixtures", nargs="*", default=["reference", "wide", "multimodal"])
    ap.add_argument("--nfes", nargs="*", type=int, default=list(NFES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.quick:
        plan = [("sd15_eps", "reference")]
        samplers, schedulers, nfes, n = ["euler", "dpmpp_2m", "ipndm"], ["karras", "normal"], (5, 10), 128
    else:
        plan = [(f, m) for f in args.forms for m in args.mixtures]
        samplers, schedulers, nfes, n = DETERMINISTIC, comfy.samplers.SCHEDULER_NAMES, tuple(args.nfes), 1024
    n = args.samples or n
    rows = []
    for form, mixture in plan:
        rows += bench_model(form, mixture, samplers, schedulers, nfes, n, print)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(rows, indent=1))
    table, summary = summarize(rows)
    (args.out / "accuracy.md").write_text(table)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        plot(rows, args.out / "accuracy.png")
    except ImportError:
        print("matplotlib missing: no plot")
    print(table)
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
