"""What a user gets from EPD Distill's defaults: fit a table with the node as it comes (only ``nfe`` chosen) on the
analytic mixtures, sample it as EPD KSampler comes (ended at sigma 0 on its free estimate) and at its last sigma,
and compare with the best built-in of ``carry.json`` on the same 8,192 held-out noises: the built-in runs again there,
so each ratio gets a paired 95% interval (bootstrap over the noises; the few samples that change mixture component
decide most ratios, and the interval shows by how much).

    python -m bench.defaults                                   # -> bench/results/defaults.{json,md}
    python -m bench.defaults --mixtures reference --nfes 10 --set points=3 objective=global   # other settings

``--set`` changes node inputs (the widgets' names, JSON values), to measure a candidate default the same way;
``--compare`` pairs a candidate's records with the defaults' (better in, targets met, geometric-mean ratio, wrong
samples); ``--where`` picks the base's runs by settings where a record holds several of one seed (a budget study).
``--distill`` changes EPD Distill's defaults of training settings that have no input (``NODE_DISTILL``, e.g.
``grid_lr=0.03``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import geometric_mean

import torch

from bench.accuracy import FORMS, PARALLEL, RESULTS, builtin_sigmas, builtin_steps, case_key, metrics, rank, run
from bench.carry import MIXTURES, held_out
from bench.neural import paired_ratio_interval, per_sample_mse
from epd_core.files import write_atomic
from epd_dev import comfy_harness

# Each ending: its label, EPD Scheduler's final_denoise, EPD Sampler's final_step. The last is EPD KSampler's defaults
# (the headline's); records before 2026-12-05 label the first "as KSampler comes", then the node's default.
ENDINGS = (("at sigma_min", False, "denoise"), ("+estimate", True, "estimate"))


def node_defaults(node) -> dict:
    """The required inputs of a node with a default, as a user who changes nothing gets them."""
    inputs = node.define_schema().inputs
    return {i.id: i.default for i in inputs if getattr(i, "default", None) is not None and not i.optional}


def best_builtin(carry: list[dict], form: str, mixture: str, nfe: int, n: int) -> dict | None:
    """The built-in with the lowest RMSE of ``carry.json``'s case, when it ran on the same ``n`` noises."""
    rows = [r for r in carry if case_key(r) == (f"analytic-{form}", mixture, nfe) and r["samples"] == n
            and not r["sampler"].startswith("epd")]  # fmt: skip
    return min(rows, key=lambda r: rank(r["rmse"])) if rows else None


def numerics() -> str:
    """The torch build and CPU kernels a table was trained with: round-off differs between them (AVX2 and AVX-512
    kernels part in the seventh digit of the first losses), and training turns that into another table, so a run
    reproduces bit for bit only on the same numerics."""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def builtin_errors(model, best: dict, nfe: int, noise: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Each noise's mean squared error under ``best`` (a ``carry.json`` row) run again on ``noise``; refused unless
    it reproduces the recorded RMSE (the pairing needs the same noises and sampler; round-off may differ: the
    record may come from a machine with other CPU kernels, :func:`numerics`)."""
    import comfy.samplers

    sampler, scheduler = best["sampler"], best["scheduler"]
    sigmas = builtin_sigmas(model.get_model_object("model_sampling"), sampler, scheduler, builtin_steps(sampler, nfe))
    out, _ = run(model, comfy.samplers.sampler_object(sampler), sigmas, noise)
    errors = per_sample_mse(out, exact)
    again = float(errors.mean().sqrt())
    if not math.isclose(again, best["rmse"], rel_tol=1e-4):
        raise RuntimeError(f"{sampler} / {scheduler} gives RMSE {again:.6g} on these noises, carry.json records "
                           f"{best['rmse']:.6g}: run bench.carry again for this case")  # fmt: skip
    return errors


def case(form: str, mixture: str, nfe: int, n: int, settings: dict, carry: list[dict],
         keep: Path | None = None) -> list[dict]:  # fmt: skip
    """One form x mixture x NFE: a table fitted by EPD Distill with its defaults (and ``settings``), each ending;
    the table is copied to ``keep`` (a folder) when given."""
    nodes, noise, model, gm, exact, gap = held_out(form, mixture, n)
    import folder_paths

    best = best_builtin(carry, form, mixture, nfe, n)
    builtin = builtin_errors(model, best, nfe, noise, exact) if best is not None else None
    builtin_rmse = float(builtin.mean().sqrt()) if builtin is not None else None

    cond, empty = [[torch.zeros(1, 1, 8), {}]], {"samples": torch.zeros(1, 4, 8, 8)}
    args = {**node_defaults(nodes["EPDDistill"]), **settings, "nfe": nfe, "filename": "bench_defaults",
            "overwrite": True}  # fmt: skip
    paths, exts = folder_paths.folder_names_and_paths["epd"]
    with tempfile.TemporaryDirectory() as tmp:
        folder_paths.folder_names_and_paths["epd"] = ([tmp, *paths], exts)
        try:
            t0 = time.time()
            params, _ = nodes["EPDDistill"].execute(model, cond, cond, empty, **args).result
            seconds = time.time() - t0
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                name = f"{form}-{mixture}-nfe{nfe}.safetensors"
                shutil.copyfile(Path(tmp) / "bench_defaults.safetensors", keep / name)
        finally:
            folder_paths.folder_names_and_paths["epd"] = (paths, exts)
    rows = []
    for label, final_denoise, final_step in ENDINGS:
        sigmas = nodes["EPDScheduler"].execute(model, params, 1.0, final_denoise).result[0]
        sampler = nodes["EPDSampler"].execute(params, PARALLEL, True, "comfyui", final_step).result[0]
        out, c = run(model, sampler, sigmas, noise)
        row = {"model": f"analytic-{form}", "mixture": mixture, "samples": n, "answer_key_gap": gap, "nfe": c.rounds,
               "sampler": "epd_defaults", "scheduler": label, "settings": settings, "train_s": round(seconds, 1),
               "start": params.metadata.get("start", {}).get("grid", "model grid (no choice)"),
               "checks": params.metadata["distilled"].get("checks"),
               "loss_curve": params.metadata["distilled"]["loss_curve"],
               "grid_lr": params.metadata["distilled"].get("grid_lr", 0.0), "numerics": numerics(),
               **metrics(gm, out, exact)}  # fmt: skip
        if best is not None:
            row.update(builtin=f"{best['sampler']} / {best['scheduler']}", builtin_rmse=builtin_rmse,
                       builtin_wrong_mode=best["wrong_mode"], ratio=builtin_rmse / row["rmse"],
                       ratio_ci=list(paired_ratio_interval(builtin, per_sample_mse(out, exact))))  # fmt: skip
        rows.append(row)
    print(f"{form}/{mixture} NFE {nfe}: {rows[-1]['rmse']:.4f}", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    lines = ["| model | mixture | NFE | start | ending | RMSE (wrong component) | best built-in | RMSE (wrong) "
             "| ratio [paired 95%] |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        if "ratio_ci" in r:
            ratio += " [{:.2f}, {:.2f}]".format(*r["ratio_ci"])
        builtin = f"{r['builtin']} | {r['builtin_rmse']:.4f} ({r['builtin_wrong_mode']})" if "ratio" in r else " | "
        lines.append(f"| {r['model']} | {r['mixture']} | {r['nfe']} | {r.get('start', '')} | {r['scheduler']} "
                     f"| {r['rmse']:.4f} ({r['wrong_mode']}) | {builtin} | {ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


TARGETS = {5: 1.5, 10: 1.0}  # issue 18's ratio targets on the mixtures (none at other NFEs)


def where(rows: list[dict], settings: dict) -> list[dict]:
    """The runs of ``rows`` whose settings hold each of ``settings``."""
    return [r for r in rows if all(r.get("settings", {}).get(k) == v for k, v in settings.items())]


def seed_of(row: dict) -> int:
    """The training seed a run was fitted with (0 unless its settings name another)."""
    return row.get("settings", {}).get("seed", 0)


def compare(base: list[dict], rows: list[dict], base_label: str, label: str) -> str:
    """Markdown tables, one per NFE, pairing ``rows`` (a candidate's runs) with ``base``'s runs of the same cases,
    ended on the free estimate: each case's error, ratio and gain, and per NFE the cases the candidate was better in,
    the targets met, the geometric-mean ratio, the wrong-component samples and (where recorded) the RMSE of the samples
    that stay in their component (the typical sample) and the sliced Wasserstein distance to the exact samples (the
    distribution), each ``base -> candidate``. Runs pair by training seed too: one seed's run is never set against
    another's, and a record with two runs of one case and seed is refused (:func:`where` picks one). A first line warns
    when the paired runs were trained on other numerics (torch build, CPU kernels; rows without them: "not
    recorded"), since round-off then acts as another training seed."""

    def ended(rs: list[dict], which: str) -> dict:
        out = {}
        for r in (r for r in rs if r["scheduler"] == ENDINGS[-1][0]):
            key = (*case_key(r), seed_of(r))
            if key in out:
                raise ValueError(f"{which} holds two runs of {key[0]} / {key[1]} NFE {key[2]} seed {key[3]} (settings "
                                 f"{out[key].get('settings', {})} and {r.get('settings', {})}): pick one with "
                                 f"--where (e.g. --where iterations=3200)")  # fmt: skip
            out[key] = r
        return out

    def seed(r: dict) -> str:
        return f" (seed {seed_of(r)})" if seed_of(r) else ""

    def meets(r: dict) -> bool:
        return r["nfe"] in TARGETS and r["ratio"] >= TARGETS[r["nfe"]]

    def cell(r: dict) -> str:
        ratio = f"{r['ratio']:.2f}x"
        return f"{r['rmse']:.4f} ({r['wrong_mode']}) " + (f"**{ratio}**" if meets(r) else ratio)

    def closeness(pairs: list[tuple[dict, dict]]) -> str:
        out = ""
        for key, what in (("rmse_right_mode", "samples in their component: RMSE"),
                          ("sliced_wasserstein", "sliced Wasserstein distance")):  # fmt: skip
            if all(key in x for pair in pairs for x in pair):
                was, now = (geometric_mean(pair[i][key] for pair in pairs) for i in (0, 1))
                better = sum(r[key] < b[key] for b, r in pairs)
                out += f"; {what} geometric mean {was:.4f} -> {now:.4f}, better in {better}"
        return out

    old, new = ended(base, base_label), ended(rows, label)
    out = []
    paired = {k: (old[k], new[k]) for k in sorted(new) if k in old}  # one pairing rule for the warning and the tables
    kinds = {base_label: {b.get("numerics", "not recorded") for b, _ in paired.values()},
             label: {r.get("numerics", "not recorded") for _, r in paired.values()}}  # fmt: skip
    if len(set().union(*kinds.values())) > 1:
        said = "; ".join(f"{side}: {', '.join(sorted(k))}" for side, k in kinds.items())
        out += [
            f"Numerics differ ({said}): round-off acts as a training seed, so a gain mixes the setting with "
            'the machine (README, "Round-off is a training seed"); train the base again on these numerics.',
            "",
        ]
    for nfe in sorted({k[2] for k in new}):
        pairs = [pair for k, pair in paired.items() if k[2] == nfe]
        if not pairs:
            continue
        sides = {"base": [b for b, _ in pairs], "new": [r for _, r in pairs]}
        met = {s: sum(map(meets, side)) for s, side in sides.items()}
        geo = {s: geometric_mean(x["ratio"] for x in side) for s, side in sides.items()}
        wrong = {s: sum(x["wrong_mode"] for x in side) for s, side in sides.items()}
        out += [f"### NFE {nfe}", "", f"| model | mixture | start | best built-in | {base_label} | {label} | gain |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {b['model']} | {b['mixture']}{seed(b)} | {r['start']} | {b['builtin']} {b['builtin_rmse']:.4f} "
                f"| {cell(b)} | {cell(r)} | {b['rmse'] / r['rmse']:.2f}x |" for b, r in pairs]  # fmt: skip
        target = f"target ({TARGETS[nfe]}x) met {met['base']} -> {met['new']}" if nfe in TARGETS else "no target"
        out += ["", f"{len(pairs)} cases: {label} better in {sum(r['rmse'] < b['rmse'] for b, r in pairs)}; {target}; "
                f"geometric-mean ratio {geo['base']:.2f}x -> {geo['new']:.2f}x; wrong-component samples "
                f"{wrong['base']} -> {wrong['new']}{closeness(pairs)}", ""]  # fmt: skip
    return "\n".join(out)


def parse_settings(items: list[str]) -> dict:
    """``["iterations=3200", "objective=global"]`` -> ``{"iterations": 3200, "objective": "global"}``: a value is
    JSON where it reads as JSON (numbers, ``true``, ``null``), else the string as written."""
    settings = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"{item!r}: give a setting as NAME=VALUE (e.g. points=3 or objective=global)")
        try:
            settings[name] = json.loads(text)
        except json.JSONDecodeError:
            settings[name] = text
    return settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    ap.add_argument("--mixtures", nargs="*", default=list(MIXTURES))
    ap.add_argument("--nfes", nargs="*", type=int, default=[5, 10])
    ap.add_argument("--samples", type=int, default=8192, help="held-out noises (8,192: carry.json's built-ins)")
    ap.add_argument("--set", nargs="*", default=[], metavar="INPUT=JSON", help="EPD Distill inputs to change")
    ap.add_argument(
        "--distill",
        nargs="*",
        default=[],
        metavar="FIELD=JSON",
        help="EPD Distill's defaults of DistillConfig fields without an input (NODE_DISTILL)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--carry", type=Path, default=RESULTS / "carry.json", help="the built-ins' record")
    ap.add_argument("--keep-tables", type=Path, default=None, metavar="DIR", help="keep the fitted tables here")
    ap.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BASE", "CANDIDATE"),
        help="print the paired table of two records (e.g. defaults.json and a --set run's) and stop",
    )
    ap.add_argument("--labels", nargs=2, metavar=("BASE", "CANDIDATE"), help="their columns' names")
    ap.add_argument(
        "--where", nargs="*", default=[], metavar="INPUT=JSON",
        help="--compare only the base's runs with these settings (a record may hold several runs of one seed)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.compare:
        labels = args.labels or [p.stem for p in args.compare]
        base, rows = (json.loads(p.read_text()) for p in args.compare)
        try:
            print(compare(where(base, parse_settings(args.where)), rows, *labels))
        except ValueError as e:
            ap.error(str(e))
        return 0
    settings, distill = parse_settings(args.set), parse_settings(args.distill)
    carry = json.loads(args.carry.read_text()) if args.carry.exists() else []
    comfy_harness.setup()  # the nodes read the defaults of the pack as ComfyUI loaded it, not of epd_core here
    node_distill = comfy_harness.pack_module("epd_core.config").NODE_DISTILL
    saved = dict(node_distill)
    node_distill.update(distill)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for form in args.forms:
            for mixture in args.mixtures:
                for nfe in args.nfes:
                    rows += case(form, mixture, nfe, args.samples, settings, carry, args.keep_tables)
                    # after each case: a run cut short keeps these
                    write_atomic(json.dumps(rows, indent=1).encode(), args.out / "defaults.json", overwrite=True)
                    write_atomic(summarize(rows).encode(), args.out / "defaults.md", overwrite=True)
    finally:
        node_distill.clear()
        node_distill.update(saved)
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
