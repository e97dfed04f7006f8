"""Neural benchmark: EPD against ComfyUI's samplers and tuned schedules on the class-conditional MNIST models.

The models of ``demo_models/`` are sampled as a user samples them: classifier-free guidance (cfg 3) with a batch of
the ten classes as positive (sample i draws digit i mod 10) and "no class" as negative, through ComfyUI's real
sampling path (``comfy.sample.sample_custom``). Every contender starts from the same held-out noises.

Metrics, each with a 95% interval:

* RMSE to the network's own ODE endpoint (Heun on ComfyUI's path with many steps; the answer key's step-halving
  gap is reported), with a delta-method interval from the per-sample errors;
* digits FID: Frechet distance of the decoded images' classifier features (``epd_dev.mnist_metrics``) to the
  1,000 held-out real digits;
* class accuracy (the classifier agrees with the prompted digit) and the wrong-class rate (the classifier's class
  differs from that of the exact endpoint: the neural "wrong mode"), with Wilson intervals.

The built-in field: every deterministic sampler x every KSampler scheduler, plus the tuned schedules that fit the
model's sigma range through SamplerCustom (AlignYourSteps SD1 and GITS on the EPS model, OptimalSteps FLUX / Wan /
Chroma on the flow model). The best built-in is picked on the same data it is scored on.

    python -m bench.neural                    # full run -> bench/results/neural.{json,md}, rows in accuracy.json
    python -m bench.neural --quick            # a small version (CI)
    python -m bench.neural --pair             # paired intervals of each cell's ratio -> neural_paired.json
    python -m bench.neural --fresh 7          # each cell's two picks on new noises (seed 7) -> neural_fresh.json
    python -m bench.neural --kinds flow --nfes 5 --samplers --tables weights/demo/<new table> --add
                                              # score one new table and add its rows to the results

The ratio of two rows' RMSEs gets a paired interval from ``--pair``: it re-runs each model and NFE's best built-in
and best EPD table on the recorded noises and bootstraps the noises jointly (both contenders see the same noises, so
their errors are correlated and the ratio is known better than the two rows' own intervals say). Both picks are
made on the noises they are scored on (the best of many tables, the best of many built-ins), so ``--fresh SEED``
scores the same two contenders, paired, on new noises with their own answer key: the ratio without the pick's luck.

With ``EPD_KEY_CACHE`` set to a folder, each model's answer key is kept there (safetensors, a file per set of noises,
named by their digest and holding a checksum of them) and read back by later runs on the same noises: shards of one
benchmark run in parallel processes compute it once, and a ``--fresh`` run keeps the recorded noises' key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench.accuracy import DETERMINISTIC, PARALLEL, RESULTS, TWO_CALLS, builtin_sigmas, builtin_steps, merge_runs, rank
from epd_core import load_params
from epd_core.files import write_atomic
from epd_dev import ROOT, comfy_harness, mnist_data, mnist_metrics

KINDS = ("eps", "flow")
CFG = 3.0
NFES = (5, 10)
HELD_OUT_SEED = 2**31 - 1
KEY_STEPS = 100  # the answer key: Heun with this many steps, checked against half as many
TUNED = {
    "eps": [("AlignYourSteps", "SD1"), ("GITS", 1.2)],
    "flow": [("OptimalSteps", m) for m in ("FLUX", "Wan", "Chroma")],
}
TABLES = ROOT / "weights" / "demo"
FRESH = "neural_fresh.json"  # the picks scored on new noises (--fresh)


class Rounds:
    """Counts guided model rounds through ComfyUI's cfg hook: ``rounds`` sequential ones, ``evals`` per sample (the
    K points of an EPD step count K times; a CFG evaluation counts once)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.rounds, self.evals = batch, 0, 0

    def __call__(self, args: dict) -> torch.Tensor:
        self.rounds += 1
        self.evals += args["input"].shape[0] // self.batch
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]


def setup(kind: str):
    """The MNIST model ``kind`` and its conditionings: all ten classes (positive) and no class (negative)."""
    nodes = comfy_harness.setup()
    (model,) = nodes["EPDMnistModel"].execute(kind).result
    positive, negative = nodes["EPDMnistClass"].execute("0-9").result
    return nodes, model, positive, negative


def run(model, positive, negative, sampler, sigmas, noise, callback=None) -> tuple[torch.Tensor, Rounds]:
    """One contender on ComfyUI's sampling path: the final latent and its round count. ``callback``: ComfyUI's
    per-step callback ``(i, denoised, x, total_steps)``."""
    import comfy.sample

    counter = Rounds(noise.shape[0])
    m = model.clone()
    m.set_model_sampler_cfg_function(counter)
    with torch.no_grad():
        out = comfy.sample.sample_custom(m, noise, CFG, sampler, sigmas, positive, negative, torch.zeros_like(noise),
                                         callback=callback, disable_pbar=True, seed=0)  # fmt: skip
    return out, counter


def key_sigmas(model, kind: str, steps: int) -> torch.Tensor:
    """The answer key's grid: rho-7 polynomial over the EPS model's range, ComfyUI's simple schedule for flow."""
    import comfy.samplers

    from epd_core.schedules import polynomial

    ms = model.get_model_object("model_sampling")
    if kind == "flow":
        return comfy.samplers.calculate_sigmas(ms, "simple", steps)
    grid = polynomial(steps, float(ms.sigma_min), float(ms.sigma_max)).float()
    return torch.cat([grid, grid.new_zeros(1)])


def answer_key(model, kind, positive, negative, noise, steps: int = KEY_STEPS) -> tuple[torch.Tensor, float]:
    """The network's own guided ODE endpoint (Heun, ``steps``) and its RMSE gap to ``steps // 2``."""
    import comfy.samplers

    heun = comfy.samplers.sampler_object("heun")
    ends = [run(model, positive, negative, heun, key_sigmas(model, kind, n), noise)[0] for n in (steps // 2, steps)]
    return ends[1], rmse(ends[1], ends[0])


def cached_answer_key(model, kind, positive, negative, noise) -> tuple[torch.Tensor, float]:
    """:func:`answer_key`, kept in the folder ``$EPD_KEY_CACHE`` when it is set (written whole or not at all)."""
    folder = os.environ.get("EPD_KEY_CACHE")
    if not folder:
        return answer_key(model, kind, positive, negative, noise)
    from safetensors.torch import load_file, save

    digest = hashlib.sha256(noise.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:12]
    path = Path(folder) / f"mnist-{kind}-{noise.shape[0]}-heun{KEY_STEPS}-{digest}.safetensors"  # --fresh: another
    checksum = noise.double().sum().reshape(1)
    if path.is_file():
        saved = load_file(path)
        # the sum's last bits depend on the thread count that summed it; other noises differ by far more
        if saved["exact"].shape == noise.shape and torch.allclose(saved["noise_sum"], checksum, rtol=1e-12, atol=0):
            return saved["exact"], float(saved["gap"])
    exact, gap = answer_key(model, kind, positive, negative, noise)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = save({"exact": exact.float().contiguous(), "gap": torch.tensor([gap], dtype=torch.float64),
                 "noise_sum": checksum})  # fmt: skip
    write_atomic(blob, path, overwrite=True)
    return exact, gap


def tuned_schedules(kind: str, nfe: int) -> dict[str, torch.Tensor]:
    """The tuned schedules that fit the model, for the one-call samplers at this NFE (``nfe`` steps)."""
    comfy_harness.load_builtin_extras()
    from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
    from comfy_extras.nodes_gits import GITSScheduler
    from comfy_extras.nodes_optimalsteps import OptimalStepsScheduler

    out = {}
    for name, option in TUNED[kind]:
        if name == "AlignYourSteps":
            sigmas = AlignYourStepsScheduler.execute(option, nfe, 1.0).result[0]
        elif name == "GITS":
            sigmas = GITSScheduler.execute(option, nfe, 1.0).result[0]
        else:
            sigmas = OptimalStepsScheduler.execute(option, nfe, 1.0).result[0]
        out[f"{name}({option})"] = sigmas.float()
    return out


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def per_sample_mse(out: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return ((out.double() - exact.double()) ** 2).flatten(1).mean(1)


def rmse_interval(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """95% interval of the RMSE over samples (delta method on the per-sample mean squared errors)."""
    per = per_sample_mse(out, exact)
    mean, se = float(per.mean()), float(per.std() / math.sqrt(per.numel()))
    return math.sqrt(max(mean - 1.96 * se, 0.0)), math.sqrt(mean + 1.96 * se)


def paired_ratio_interval(
    builtin: torch.Tensor, epd: torch.Tensor, draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of RMSE(built-in) / RMSE(EPD) from per-sample mean squared errors on the
    same noises, resampling the noises jointly."""
    n, g, ratios = builtin.numel(), torch.Generator().manual_seed(seed), []
    for start in range(0, draws, 500):
        idx = torch.randint(n, (min(500, draws - start), n), generator=g)
        ratios.append((builtin[idx].mean(1) / epd[idx].mean(1)).sqrt())
    lo, hi = torch.quantile(torch.cat(ratios), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a rate ``k / n``."""
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, k / n
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


class Scorer:
    """Decodes latents and scores them against the answer key, the prompted classes and the held-out digits."""

    def __init__(self, exact: torch.Tensor, labels: torch.Tensor) -> None:
        self.latent_to_images = comfy_harness.pack_module("nodes.mnist_model").latent_to_images
        self.classifier = mnist_metrics.load_classifier()
        self.real = mnist_metrics.features(mnist_data.split("heldout")[0], self.classifier)
        self.exact, self.labels = exact, labels
        self.exact_class = self.classes(exact)

    def images(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent_to_images(latent.float())

    def classes(self, latent: torch.Tensor) -> torch.Tensor:
        """The classifier's class of each latent's decoded digit."""
        return mnist_metrics.predict(self.images(latent), self.classifier)

    def __call__(self, out: torch.Tensor) -> dict:
        features = mnist_metrics.features(self.images(out), self.classifier)
        with torch.no_grad():  # the classifier's head on the same features: its prediction, without a second pass
            predicted = self.classifier.fc2(features.float()).argmax(1)
        n = out.shape[0]
        right = int((predicted == self.labels).sum())
        wrong = int((predicted != self.exact_class).sum())
        fid = mnist_metrics.frechet_distance(features, self.real)
        return {"rmse": rmse(out, self.exact), "rmse_ci": rmse_interval(out, self.exact), "fid": fid,
                "accuracy": right / n, "accuracy_ci": wilson(right, n), "wrong_mode": wrong,
                "wrong_mode_rate": wrong / n, "wrong_mode_ci": wilson(wrong, n)}  # fmt: skip


def epd_tables(kind: str, folders=(TABLES,)) -> list[tuple[str, Path]]:
    """The MNIST tables of ``kind`` in ``folders`` (a folder, or one table file), each with its label
    (``<folder>/<stem>`` outside the pack's)."""
    found = []
    for folder in map(Path, folders):
        paths = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
        for path in paths:
            if path.name.startswith(f"mnist-{kind}-nfe") and path.suffix == ".safetensors":
                bundled = path.parent.resolve() == TABLES.resolve()
                found.append((path.stem if bundled else f"{path.parent.name}/{path.stem}", path))
    return found


class Contest:
    """One MNIST model's contest: its held-out noises, answer key and scorer. ``add`` runs one contender on them
    (or keeps its row from ``reuse``, an earlier run on the same noises and answer key) and records its scored row
    in ``rows``; ``save`` writes them to ``partial`` as the run goes (a run stopped at a deadline keeps them)."""

    def __init__(self, kind: str, n: int, reuse=(), log=print, partial: Path | None = None,
                 seed: int = HELD_OUT_SEED) -> None:  # fmt: skip
        self.partial, self.kind = partial, kind
        self.nodes, self.model, self.positive, self.negative = setup(kind)
        self.noise = torch.randn(n, 4, 14, 14, generator=torch.Generator().manual_seed(seed))
        t0 = time.time()
        self.exact, gap = cached_answer_key(self.model, kind, self.positive, self.negative, self.noise)
        log(f"mnist-{kind}: answer key in {time.time() - t0:.0f} s, step-halving gap {gap:.2e}")
        self.score = Scorer(self.exact, torch.arange(n) % 10)
        self.common = {"model": f"mnist-{kind}", "mixture": "mnist", "cfg": CFG, "samples": n, "answer_key_gap": gap}
        self.kept = reusable(reuse, self.common)
        if self.kept:
            log(f"mnist-{kind}: {len(self.kept)} built-in runs kept from the earlier results")
        self.rows: list[dict] = []

    def add(self, name: str, scheduler: str, sampler, sigmas, nfe: int | None = None) -> None:
        """Run (or keep) one contender; with ``nfe``, a run whose round count differs is dropped."""
        if (name, scheduler, nfe) in self.kept:
            self.rows.append(self.kept[name, scheduler, nfe])
            return
        out, c = run(self.model, self.positive, self.negative, sampler, sigmas, self.noise)
        if nfe is not None and c.rounds != nfe:
            return
        self.rows.append({**self.common, "sampler": name, "scheduler": scheduler, "nfe": c.rounds,
                          "evaluations": c.evals, **self.score(out)})  # fmt: skip

    def save(self) -> None:
        """The rows so far, to ``partial`` if there is one (written whole or not at all)."""
        if self.partial is not None:
            write_atomic(json.dumps(self.rows).encode(), self.partial, overwrite=True)


def bench_kind(kind: str, nfes, n: int, samplers, schedulers, log=print, tables=(TABLES,),
               reuse: list[dict] = (), partial: Path | None = None) -> list[dict]:  # fmt: skip
    """Every run of one model. ``reuse``: rows of an earlier run; its built-in rows on the same noises and answer
    key (same model, sample count and key gap) are kept instead of being run again. ``partial``: a file the rows
    so far are written to after each sampler (a run stopped at a deadline keeps them)."""
    import comfy.samplers

    t0 = time.time()
    contest = Contest(kind, n, reuse, log, partial)
    ms = contest.model.get_model_object("model_sampling")
    contest.rows.append({**contest.common, "sampler": "exact", "scheduler": f"heun/{KEY_STEPS}",
                         "nfe": 2 * KEY_STEPS, **contest.score(contest.exact)})  # fmt: skip
    for nfe in nfes:
        for sampler in samplers:
            steps = builtin_steps(sampler, nfe)
            for scheduler in schedulers if steps is not None else ():  # None: no step count gives this NFE
                sigmas = builtin_sigmas(ms, sampler, scheduler, steps)
                contest.add(sampler, scheduler, comfy.samplers.sampler_object(sampler), sigmas, nfe)
            if sampler not in TWO_CALLS:
                for name, sigmas in tuned_schedules(kind, nfe).items():
                    contest.add(sampler, name, comfy.samplers.sampler_object(sampler), sigmas, nfe)
            log(f"mnist-{kind}: {sampler} at NFE {nfe} ({time.time() - t0:.0f} s)")
            contest.save()
        log(f"mnist-{kind}: built-ins at NFE {nfe} done ({time.time() - t0:.0f} s)")
    for name, path in epd_tables(kind, tables):
        params = load_params(path)
        if params.nfe not in nfes:
            continue
        for label in ENDINGS:
            contest.add("epd", f"table:{name}+{label}", *epd_contender(contest, params, label))
            if path.parent.resolve() != TABLES.resolve() and contest.rows[-1]["sampler"] == "epd":
                contest.rows[-1]["table_file"] = str(path.resolve())  # where --pair and diagnose find it again
        contest.save()  # a run stopped at its deadline keeps the tables scored so far
    log(f"mnist-{kind}: {len(contest.rows)} runs in {time.time() - t0:.0f} s")
    return contest.rows


ENDINGS = {"final": "denoise", "estimate": "estimate"}  # a table row's label suffix: EPD Sampler's final_step


def epd_contender(contest: Contest, params, label: str):
    """EPD Sampler and EPD Scheduler for ``params`` on the contest's model, ending as ``label`` (:data:`ENDINGS`)."""
    sigmas = contest.nodes["EPDScheduler"].execute(contest.model, params, 1.0, True).result[0]
    return contest.nodes["EPDSampler"].execute(params, PARALLEL, True, "comfyui", ENDINGS[label]).result[0], sigmas


def table_of(row: dict) -> tuple[str, str]:
    """An EPD row's table label (a bundled table's file stem in :data:`TABLES`) and ending label (:data:`ENDINGS`)."""
    table, label = row["scheduler"].removeprefix("table:").rsplit("+", 1)
    return table, label


def table_file(row: dict) -> Path:
    """The file of an EPD row's table: a bundled one in :data:`TABLES`, another where it was scored from."""
    return Path(row["table_file"]) if "table_file" in row else TABLES / f"{table_of(row)[0]}.safetensors"


def contender(contest: Contest, row: dict):
    """The sampler object and sigmas that ran ``row`` (a built-in with its schedule, or a bundled EPD table)."""
    import comfy.samplers

    name, scheduler, nfe = row["sampler"], row["scheduler"], row["nfe"]
    if name == "epd":
        return epd_contender(contest, load_params(table_file(row)), table_of(row)[1])
    tuned = tuned_schedules(contest.kind, nfe) if name not in TWO_CALLS else {}
    if scheduler in tuned:
        sigmas = tuned[scheduler]
    else:
        ms = contest.model.get_model_object("model_sampling")
        sigmas = builtin_sigmas(ms, name, scheduler, builtin_steps(name, nfe))
    return comfy.samplers.sampler_object(name), sigmas


def rerun(contest: Contest, row: dict, callback=None, reproduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``row``'s contender again on the contest's noises (``callback`` as in :func:`run`) and check that it
    reproduces the row: its round count, and (``reproduce``: the row's own noises) its RMSE to 2% (CPU and GPU rows
    differ by about 1e-4). Returns the end and the sigmas it ran."""
    sampler, sigmas = contender(contest, row)
    final, c = run(contest.model, contest.positive, contest.negative, sampler, sigmas, contest.noise, callback)
    again = rmse(final, contest.exact)
    if c.rounds != row["nfe"] or reproduce and not math.isclose(again, row["rmse"], rel_tol=0.02):
        raise RuntimeError(f"{row['model']} {contender_label(row)} at NFE {row['nfe']}: the re-run gives RMSE "
                           f"{again:.4g} in {c.rounds} rounds, the row {row['rmse']:.4g} in {row['nfe']}; "
                           "not the same contender, noises or answer key")  # fmt: skip
    return final, sigmas


def pair(kind: str, rows: list[dict], nfes=NFES, log=print, seed: int | None = None) -> list[dict]:
    """For each NFE of model ``kind``: re-run the best built-in and the best EPD table of ``rows`` on the same
    noises and answer key, check that they reproduce their rows, and bootstrap the ratio's paired interval. With
    ``seed``: the same two picks on as many new noises drawn with it, against their own answer key (the ratio without
    the luck of picks made on the scored noises; :data:`FRESH`)."""
    model = f"mnist-{kind}"
    _, summary = summarize([r for r in rows if r["model"] == model])
    summary = [s for s in summary if s["nfe"] in nfes]
    if not summary:
        return []
    if seed == HELD_OUT_SEED:
        raise ValueError(f"--fresh {seed} draws the recorded noises again; give another seed")
    contest = Contest(kind, summary[0]["epd"]["samples"], log=log, seed=HELD_OUT_SEED if seed is None else seed)
    fresh = {} if seed is None else {"noise_seed": seed, "answer_key_gap": contest.common["answer_key_gap"]}
    out = []
    for s in summary:
        errors = {side: per_sample_mse(rerun(contest, s[side], reproduce=seed is None)[0], contest.exact)
                  for side in ("best_builtin", "epd")}  # fmt: skip
        ratio = float((errors["best_builtin"].mean() / errors["epd"].mean()).sqrt())
        ci = paired_ratio_interval(errors["best_builtin"], errors["epd"])
        where = "" if seed is None else f" on new noises (seed {seed}, recorded {s['ratio']:.3f}x)"
        log(f"{model} NFE {s['nfe']}{where}: ratio {ratio:.3f}x, paired 95% [{ci[0]:.3f}, {ci[1]:.3f}]")
        out.append({"model": model, "nfe": s["nfe"], "samples": contest.noise.shape[0], **fresh,
                    "builtin": contender_label(s["best_builtin"]), "epd": contender_label(s["epd"]),
                    "ratio": ratio, "ratio_ci": list(ci), "recorded_ratio": s["ratio"]})  # fmt: skip
    return out


def record_paired(entries: list[dict], out: Path, name: str = "neural_paired.json") -> None:
    """Fold ``entries`` into ``out``'s ``name`` (``neural_paired.json``, or :data:`FRESH` for new noises'),
    replacing those of the same model and NFE, and rewrite the summary from ``neural.json``."""
    keys = {(p["model"], p["nfe"]) for p in entries}
    kept = [p for p in load_paired(out, name) if (p["model"], p["nfe"]) not in keys]
    paired = sorted(kept + entries, key=lambda p: (p["model"], p["nfe"]))
    write_atomic(json.dumps(paired, indent=1).encode(), out / name, overwrite=True)
    record(json.loads((out / "neural.json").read_text()), out, merge=False)


def add_rows(new: list[dict], out: Path) -> str:
    """Fold the EPD rows of ``new`` (a run on ``out``'s noises: same sample count, and the answer key's gap to
    1e-3 relative, as a key rebuilt on another machine gives) into ``out``'s results, after each model's last
    EPD row, replacing rows of the same contender; then :func:`record` them. Returns the summary table."""
    rows = json.loads((out / "neural.json").read_text())
    for exact in (r for r in new if r["sampler"] == "exact"):
        (old,) = [r for r in rows if r["sampler"] == "exact" and r["model"] == exact["model"]]
        if old["samples"] != exact["samples"] or not math.isclose(old["answer_key_gap"], exact["answer_key_gap"],
                                                                  rel_tol=1e-3):  # fmt: skip
            raise ValueError(f"{exact['model']}: this run has {exact['samples']} noises and an answer key gap of "
                             f"{exact['answer_key_gap']:.4g}, the results {old['samples']} and "
                             f"{old['answer_key_gap']:.4g}: not the same noises and key")  # fmt: skip
        for r in new:
            if r["model"] == exact["model"] and r["sampler"] == "epd":
                r = {**r, "answer_key_gap": old["answer_key_gap"]}
                key = (r["model"], r["sampler"], r["scheduler"], r["nfe"])
                rows = [o for o in rows if (o["model"], o["sampler"], o["scheduler"], o["nfe"]) != key]
                last = max(
                    i for i, o in enumerate(rows) if o["model"] == r["model"] and o["sampler"] in ("epd", "exact")
                )
                rows.insert(last + 1, r)
    return record(rows, out)


def reusable(rows, base: dict) -> dict[tuple, dict]:
    """The built-in rows of ``rows`` measured on ``base``'s model, noises and answer key (its step-halving gap to
    1e-6 relative), by (sampler, scheduler, NFE). EPD rows (``epd``, ``epd_plugin_*``) are never kept: a table may
    have changed since."""

    def same(r: dict) -> bool:
        return (r["model"], r["samples"]) == (base["model"], base["samples"]) and math.isclose(
            r["answer_key_gap"], base["answer_key_gap"], rel_tol=1e-6
        )

    builtin = [r for r in rows if not r["sampler"].startswith("epd") and r["sampler"] != "exact" and same(r)]
    return {(r["sampler"], r["scheduler"], r["nfe"]): r for r in builtin}


def summarize(rows: list[dict], paired: list[dict] = (), fresh: list[dict] = ()) -> tuple[str, list[dict]]:
    """Per model and NFE: the best built-in by RMSE and by FID, and the best EPD table; the ratios, with the paired
    interval of ``paired`` (see :func:`pair`) where it was measured on these two contenders and noises, and the
    ratio of the same two on new noises (``fresh``, :func:`pair` with a seed) where it was measured."""
    lines = ["| model | NFE | best built-in (RMSE) | RMSE [95%] | FID | EPD table | RMSE [95%] | FID | accuracy | "
             "wrong class [95%] | RMSE ratio [95% paired] | best built-in (FID) | FID | FID ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary = []
    for model in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == model and r["sampler"] != "exact"]
        for nfe in sorted({r["nfe"] for r in sub if r["sampler"] == "epd"}):
            builtin = [r for r in sub if r["nfe"] == nfe and r["sampler"] != "epd"]
            epd = [r for r in sub if r["nfe"] == nfe and r["sampler"] == "epd"]
            if not builtin or not epd:
                continue
            b, e = min(builtin, key=lambda r: rank(r["rmse"])), min(epd, key=lambda r: rank(r["rmse"]))
            bf = min(builtin, key=lambda r: rank(r["fid"]))
            s = {"model": model, "nfe": nfe, "best_builtin": b, "best_builtin_fid": bf, "epd": e,
                 "ratio": b["rmse"] / e["rmse"], "ratio_ci": paired_ci(paired, b, e),
                 "fresh": measured(fresh, b, e), "fid_ratio": bf["fid"] / e["fid"]}  # fmt: skip
            summary.append(s)
            cells = [model, nfe, f"{b['sampler']} / {b['scheduler']}", _ci(b["rmse"], b["rmse_ci"]), f"{b['fid']:.2f}",
                     e["scheduler"].removeprefix("table:"), _ci(e["rmse"], e["rmse_ci"]), f"{e['fid']:.2f}",
                     f"{e['accuracy']:.3f}", _ci(e["wrong_mode_rate"], e["wrong_mode_ci"], 3),
                     ratio_text(s), f"{bf['sampler']} / {bf['scheduler']}", f"{bf['fid']:.2f}",
                     f"{s['fid_ratio']:.2f}x"]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n", summary


def contender_label(row: dict) -> str:
    return f"{row['sampler']} / {row['scheduler']}"


def measured(entries, builtin: dict, epd: dict) -> dict | None:
    """The entry of ``entries`` (:func:`pair`'s, on the recorded noises or new ones) measured for exactly these two
    rows (model, NFE, contenders, sample count and recorded ratio: a row scored again since has none until it is
    measured again)."""
    for p in entries:
        same = (p["model"], p["nfe"], p["samples"]) == (epd["model"], epd["nfe"], epd["samples"])
        same = same and math.isclose(p["recorded_ratio"], builtin["rmse"] / epd["rmse"], rel_tol=1e-9)
        if same and (p["builtin"], p["epd"]) == (contender_label(builtin), contender_label(epd)):
            return p
    return None


def paired_ci(paired, builtin: dict, epd: dict) -> list[float] | None:
    """The paired interval of ``paired`` measured for exactly these two rows (see :func:`measured`)."""
    entry = measured(paired, builtin, epd)
    return entry["ratio_ci"] if entry else None


def paired_text(ci: list[float] | None) -> str:
    """`` [lo, hi]`` of a paired interval, "" without one."""
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def ratio_text(s: dict) -> str:
    return f"{s['ratio']:.2f}x" + paired_text(s["ratio_ci"]) + fresh_text(s)


def fresh_text(s: dict, mark=lambda ratio: f"{ratio:.2f}x") -> str:
    """``; new noises 1.98x [1.90, 2.07]`` for a summary cell scored on new noises (``mark`` writes the ratio),
    "" without it."""
    f = s.get("fresh")
    return f"; new noises {mark(f['ratio'])}{paired_text(f['ratio_ci'])}" if f else ""


def summarize_with(rows: list[dict], folder: Path) -> tuple[str, list[dict]]:
    """:func:`summarize` with the paired and new-noise entries recorded in ``folder``."""
    return summarize(rows, load_paired(folder), load_paired(folder, FRESH))


def load_paired(folder: Path, name: str = "neural_paired.json") -> list[dict]:
    """The entries of ``folder``'s ``name`` (``neural_paired.json`` or ``neural_fresh.json``); none without it."""
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.exists() else []


def _ci(value: float, ci, digits: int = 4) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def record(rows: list[dict], out: Path, merge: bool = True) -> str:
    """Write a run's rows to ``out``'s ``neural.json``, its summary to ``neural.md`` and ``neural_summary.json``,
    and (``merge``) its rows into ``accuracy.json``; returns the summary table."""
    path = out / "neural.json"
    rows = merge_runs(rows, json.loads(path.read_text()) if path.exists() else [])  # a --kinds/--nfes run: its own
    table, summary = summarize_with(rows, out)
    write_atomic(json.dumps(rows, indent=1).encode(), path, overwrite=True)  # a failed write keeps the earlier runs
    write_atomic(table.encode(), out / "neural.md", overwrite=True)
    write_atomic(json.dumps(summary, indent=1).encode(), out / "neural_summary.json", overwrite=True)
    if merge:
        merge_into_accuracy(rows, out / "accuracy.json")
    return table


def merge_into_accuracy(rows: list[dict], path: Path) -> None:
    """Replace the records of ``accuracy.json`` that ``rows`` re-ran (:func:`bench.accuracy.merge_runs`); other
    models' and NFEs' rows and the plugin's rows (``epd_plugin_*``, which :mod:`bench.plugin` records) stay. The file
    is replaced atomically: a failed write (a full disk) leaves the old records."""
    old = json.loads(path.read_text()) if path.exists() else []
    write_atomic(json.dumps(merge_runs(rows, old), indent=1).encode(), path, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run for CI: 20 samples, three samplers")
    ap.add_argument("--samples", type=int, help="noises per model (a multiple of 10; default 2048 rounded up)")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    ap.add_argument("--nfes", nargs="*", type=int, default=list(NFES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--tables", nargs="*", type=Path, default=[TABLES],
                    help="folders of mnist-<kind>-nfe<N> tables, or single table files")  # fmt: skip
    ap.add_argument("--samplers", nargs="*", help="the built-in samplers to run (default: every deterministic one)")
    ap.add_argument("--no-merge", action="store_true", help="leave accuracy.json as it is")
    ap.add_argument("--reuse", type=Path, help="a neural.json whose built-in runs on the same noises are kept")
    ap.add_argument("--partial", action="store_true", help="write the rows so far to <out>/partial-<kind>.json")
    ap.add_argument("--pair", action="store_true",
                    help="re-run each cell's best built-in and EPD table of <out>/neural.json for the ratio's paired "
                    "interval (<out>/neural_paired.json)")  # fmt: skip
    ap.add_argument("--fresh", type=int, metavar="SEED",
                    help="run each cell's best built-in and EPD table of <out>/neural.json on as many new noises of "
                    f"this seed, with their own answer key: the ratio free of the picks (<out>/{FRESH})")  # fmt: skip
    ap.add_argument("--add", action="store_true",
                    help="add this run's EPD rows to <out>'s results (same noises and answer key) instead of "
                    "replacing them: score new tables without re-running the field")  # fmt: skip
    args = ap.parse_args(argv)
    reuse = json.loads(args.reuse.read_text()) if args.reuse else []
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy_harness.setup()
    import comfy.samplers

    t0 = time.time()
    if args.pair or args.fresh is not None:
        rows = json.loads((args.out / "neural.json").read_text())
        entries = [p for kind in args.kinds for p in pair(kind, rows, args.nfes, seed=args.fresh)]
        record_paired(entries, args.out, "neural_paired.json" if args.fresh is None else FRESH)
        print((args.out / "neural.md").read_text())
        print(f"paired in {time.time() - t0:.0f} s -> {args.out}")
        return 0
    n = args.samples or (20 if args.quick else 2050)
    n = -(-n // 10) * 10
    samplers = ["euler", "dpmpp_2m", "uni_pc"] if args.quick else DETERMINISTIC
    samplers = samplers if args.samplers is None else args.samplers
    schedulers = ["karras", "simple"] if args.quick else list(comfy.samplers.SCHEDULER_NAMES)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds:
        partial = args.out / f"partial-{kind}.json" if args.partial else None
        rows += bench_kind(kind, args.nfes, n, samplers, schedulers, tables=args.tables, reuse=reuse, partial=partial)
    print(add_rows(rows, args.out) if args.add else record(rows, args.out, merge=not args.quick and not args.no_merge))
    print(f"{len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
