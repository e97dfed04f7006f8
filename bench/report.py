"""The benchmark headline: the README's tables, rendered from the records in ``bench/results``.

    python -m bench.report          # the README's blocks between the markers, headline.md, accuracy.png, the
                                    # summaries of accuracy.json (accuracy.md, summary.json, distillation.md) and
                                    # of the other records (carry.md, neural.md, neural_summary.json, plugin.md)
    python -m bench.report --check  # exit 1 when the README's blocks or those text files are not what the records
                                    # say (not accuracy.png: a plot's bytes vary with matplotlib's version)

Three tables, each from one benchmark's records: the analytic mixtures at many noises (``carry.json``, written by
``python -m bench.carry``), the MNIST models (``neural.json``, ``python -m bench.neural``) and the whole field at
1,024 noises (``accuracy.json``, ``python -m bench.accuracy``). A second block, in the plugin section, is the EPD
Plugin against each base it wraps (``plugin.json``, ``python -m bench.plugin``). ``python -m bench.all`` runs
them all, then this.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from bench import neural
from bench.accuracy import RESULTS, plot, rank, summary_files
from epd_core import load_params
from epd_core.files import write_atomic
from epd_dev import ROOT

README = ROOT / "README.md"
BEGIN = "<!-- headline: begin (python -m bench.report writes this block from bench/results; do not edit) -->"
END = "<!-- headline: end -->"
PLUGIN_BEGIN = "<!-- plugin: begin (python -m bench.report writes this block from bench/results; do not edit) -->"
PLUGIN_END = "<!-- plugin: end -->"
PLUGIN_TARGET = 1.2  # bare base's RMSE / plugin's, at equal NFE
MIXTURES = ("reference", "wide", "multimodal")
FORMS = {
    "analytic-sd15_eps": "analytic SD1.5",
    "analytic-sd3_flow": "analytic SD3",
    "analytic-flux_flow": "analytic FLUX",
}
MIXTURE_TARGET = {5: 1.5, 10: 1.0}  # best built-in's RMSE / the table's, at equal NFE
NEURAL_TARGET = {5: 2.0, 10: 1.5}


def _ratio(value: float | None, target: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}x"
    return f"**{text}**" if target is not None and value >= target else text


def mixture_ratios(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """Per (model, mixture, NFE): best built-in RMSE / best table RMSE, for each student (``epd``, ``carry``)."""
    out: dict[tuple, dict[str, float]] = {}
    for key in sorted({(r["model"], r["mixture"], r["nfe"]) for r in rows}):
        sub = [r for r in rows if (r["model"], r["mixture"], r["nfe"]) == key]
        builtin = [r["rmse"] for r in sub if not r["sampler"].startswith("epd")]
        if not builtin:
            continue
        for student in ("epd", "carry"):
            mine = [r["rmse"] for r in sub if r["sampler"] == f"epd_{student}"]
            if mine:
                out.setdefault(key, {})[student] = min(builtin, key=rank) / min(mine, key=rank)
    return out


def mixtures_table(rows: list[dict]) -> str:
    ratios = mixture_ratios(rows)
    nfes = sorted({k[2] for k in ratios})
    samples = sorted({r["samples"] for r in rows})
    head = ["model", *(f"NFE {n}: " + " / ".join(MIXTURES) + ", `epd` → `carry`" for n in nfes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    met = {s: {n: [0, 0] for n in nfes} for s in ("epd", "carry")}
    for model, label in FORMS.items():
        cells = [label]
        for n in nfes:
            parts = []
            for mixture in MIXTURES:
                r = ratios.get((model, mixture, n), {})
                target = MIXTURE_TARGET.get(n)
                for s in ("epd", "carry"):
                    if s in r and target is not None:
                        met[s][n][0] += r[s] >= target
                        met[s][n][1] += 1
                parts.append(f"{_ratio(r.get('epd'), target)} → {_ratio(r.get('carry'), target)}")
            cells.append(" / ".join(parts))
        lines.append("| " + " | ".join(cells) + " |")
    counts = "; ".join(
        f"NFE {n} (target {MIXTURE_TARGET[n]}x): `carry` {met['carry'][n][0]} of {met['carry'][n][1]}, "
        f"`epd` {met['epd'][n][0]} of {met['epd'][n][1]}"
        for n in nfes
        if n in MIXTURE_TARGET
    )
    intro = (f"**Analytic mixtures** (`python -m bench.carry`, {', '.join(f'{s:,}' for s in samples)} held-out "
             "noises; each case re-runs the 8 best built-ins of the 1,024-noise field). Ratio = the best built-in's "
             "RMSE against the exact ODE solution / the table's, at equal NFE; bold: the target met.")  # fmt: skip
    return f"{intro}\n\n" + "\n".join(lines) + f"\n\nTargets met: {counts}.\n"


def neural_table(rows: list[dict], results: Path) -> str:
    _, summary = neural.summarize_with(rows, results)
    exact = {r["model"]: r for r in rows if r["sampler"] == "exact"}
    head = ["model", "NFE", "best built-in (RMSE)", "RMSE [95%]", "EPD table", "RMSE [95%]", "ratio",
            "FID: best built-in / EPD / exact ODE"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        b, e, bf = s["best_builtin"], s["epd"], s["best_builtin_fid"]
        x, target = exact.get(s["model"]), NEURAL_TARGET.get(s["nfe"])
        cells = [s["model"], s["nfe"], f"{b['sampler']} / {b['scheduler']}", neural._ci(b["rmse"], b["rmse_ci"]),
                 e["scheduler"].removeprefix("table:"), neural._ci(e["rmse"], e["rmse_ci"]),
                 _ratio(s["ratio"], target) + neural.paired_text(s["ratio_ci"])
                 + neural.fresh_text(s, partial(_ratio, target=target)),
                 f"{bf['fid']:.1f} ({bf['sampler']} / {bf['scheduler']}) / {e['fid']:.1f} / "
                 + (f"{x['fid']:.1f}" if x else "-")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    samples = sorted({r["samples"] for r in rows})
    per_digit = " or ".join(f"{s // 10:,}" for s in samples)  # sample i is prompted with digit i mod 10
    intro = (f"**MNIST models** (`python -m bench.neural`, {', '.join(f'{s:,}' for s in samples)} noises, {per_digit} "
             "per digit, cfg 3; every deterministic sampler x KSampler scheduler and the tuned schedules; RMSE to the "
             "network's own ODE end point with 95% intervals; ratio with its paired 95% interval where "
             "`--pair` measured it, and the same two contenders' ratio on as many new noises where `--fresh` "
             "measured it (both picks are made on the noises they are scored on); targets 2x at NFE 5, 1.5x at "
             "NFE 10, bold when met):")  # fmt: skip
    return f"{intro}\n\n" + "\n".join(lines) + "\n"


def field_table(rows: list[dict]) -> str:
    """Best built-in / best EPD KSampler table per model, mixture and NFE, over the whole field."""
    epd = [r for r in rows if r["sampler"] == "epd"]
    keys = sorted({(r["model"], r["mixture"]) for r in epd})
    cells = {}
    for r in epd:
        key = (r["model"], r["mixture"], r["nfe"])
        if key in cells:
            continue
        sub = [q for q in rows if (q["model"], q["mixture"], q["nfe"]) == key]
        builtin = [q["rmse"] for q in sub if not q["sampler"].startswith("epd")]
        if builtin:
            cells[key] = min(builtin, key=rank) / min((q["rmse"] for q in sub if q["sampler"] == "epd"), key=rank)
    nfes = sorted({k[2] for k in cells})
    head = ["model", "mixture", *(f"NFE {n}" for n in nfes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, mixture in keys:
        if any((model, mixture, n) in cells for n in nfes):
            row = [model, mixture, *(_ratio(cells[model, mixture, n]) if (model, mixture, n) in cells else ""
                                     for n in nfes)]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    students = sorted({_student(r) for r in epd})
    by_count: dict[int, set[str]] = {}
    for r in epd:
        by_count.setdefault(r["samples"], set()).add(r["model"])
    noises = " and ".join(f"{n:,} noises ({', '.join(sorted(models))})" for n, models in sorted(by_count.items()))
    intro = (f"**The whole field at {noises}** (`python -m bench.accuracy`: every deterministic sampler x "
             f"scheduler against the tables in `weights/demo` when it ran, students: {', '.join(students)}; ratio "
             "of RMSEs, best built-in / best EPD table, at equal NFE; the plot below draws it):")  # fmt: skip
    return f"{intro}\n\n" + "\n".join(lines) + "\n"


def _student(row: dict) -> str:
    """The student of an EPD row's table: recorded, else the bundled table's own (the MNIST K = 4 tables are carry
    tables without '-carry' in their names), else guessed from the name."""
    if row.get("student"):
        return row["student"]
    stem = row["scheduler"].removeprefix("table:").split("+")[0]
    path = ROOT / "weights" / "demo" / f"{stem}.safetensors"
    return load_params(path).student if path.exists() else "carry" if "-carry" in stem else "epd"


def headline(results: Path) -> str:
    parts = []
    renders = (("carry.json", mixtures_table), ("neural.json", lambda rows: neural_table(rows, results)),
               ("accuracy.json", field_table))  # fmt: skip
    for name, render in renders:
        path = results / name
        if path.exists():
            parts.append(render(json.loads(path.read_text())))
    return "\n".join(parts)


def plugin_table(rows: list[dict]) -> str:
    """Per model and NFE, for each base: the bare base at its best schedule / the base under EPD Plugin."""
    from bench.plugin import compare

    _, summary = compare(rows)
    bases = list(dict.fromkeys(s["base"] for s in summary))
    head = ["model", "NFE", "plugin table (most bases)", *bases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    met = [0, 0]
    for model, nfe in dict.fromkeys((s["model"], s["nfe"]) for s in summary):
        cells = {s["base"]: s for s in summary if (s["model"], s["nfe"]) == (model, nfe)}
        tables = [s["plugin"]["scheduler"].removeprefix("table:") for s in cells.values()]
        met[0] += sum(s["ratio"] >= PLUGIN_TARGET for s in cells.values())
        met[1] += len(cells)
        row = [FORMS.get(model, model), nfe, max(dict.fromkeys(tables), key=tables.count),  # a tie: the first base's
               *(_ratio(cells[b]["ratio"], PLUGIN_TARGET) if b in cells else "" for b in bases)]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    counts: dict[str, set[int]] = {}
    for r in rows:
        counts.setdefault("MNIST models" if r["model"].startswith("mnist") else "mixtures", set()).add(r["samples"])
    samples = "; ".join(f"{' or '.join(f'{n:,}' for n in sorted(ns))} noises on the {group}"
                        for group, ns in sorted(counts.items()))  # fmt: skip
    intro = (f"Each cell: the bare base's RMSE at its best schedule / the base under EPD Plugin's (`python -m "
             f"bench.plugin`, {samples}; `bench/results/plugin.md` has the RMSEs, schedules, tables, wrong modes and "
             f"FIDs). Bold: at least {PLUGIN_TARGET}x. {met[0]} of {met[1]} cells.")  # fmt: skip
    return f"{intro}\n\n" + "\n".join(lines) + "\n"


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with what stands between the markers replaced by ``block``."""
    if begin not in text or end not in text:
        raise ValueError(f"the README has no markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}{end}{tail}"


def render(text: str, results: Path) -> tuple[str, str]:
    """The README ``text`` with its blocks rendered from ``results`` (the plugin block only where ``plugin.json``
    is there), and the headline block."""
    block = headline(results)
    text = replace_block(text, block)
    if (results / "plugin.json").exists():
        rows = json.loads((results / "plugin.json").read_text())
        text = replace_block(text, plugin_table(rows), PLUGIN_BEGIN, PLUGIN_END)
    return text, block


def derived_files(results: Path) -> dict[str, str]:
    """The text files rendered from the records, by name: ``headline.md``, :func:`summary_files` and the summaries
    each benchmark writes beside its record (``carry.md``, ``neural.md``, ``neural_summary.json``, ``plugin.md``,
    which the README cites and ``--check`` passed stale)."""
    from bench import carry, plugin

    files = {"headline.md": headline(results)}
    records = {name: json.loads((results / name).read_text()) for name in ("accuracy.json", "carry.json",
               "neural.json", "plugin.json") if (results / name).exists()}  # fmt: skip
    if "accuracy.json" in records:
        files.update(summary_files(records["accuracy.json"]))
    if "carry.json" in records:
        files["carry.md"] = carry.summarize(records["carry.json"])
    if "neural.json" in records:
        table, summary = neural.summarize_with(records["neural.json"], results)
        files.update({"neural.md": table, "neural_summary.json": json.dumps(summary, indent=1)})
    if "plugin.json" in records:
        files["plugin.md"] = plugin.compare(records["plugin.json"])[0]
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="only compare the README's block with the records")
    args = ap.parse_args(argv)
    text = args.readme.read_text()
    updated, block = render(text, args.results)
    files = derived_files(args.results)
    if args.check:
        if PLUGIN_BEGIN in text and not (args.results / "plugin.json").exists():  # the block would go unchecked
            print(f"the README has the plugin block but {args.results / 'plugin.json'} is missing", file=sys.stderr)
            return 1
        stale = [name for name, content in files.items()
                 if not (args.results / name).exists() or (args.results / name).read_text() != content]  # fmt: skip
        if updated != text or stale:
            print(f"{args.readme} or {', '.join(stale) or 'nothing else'} out of date with {args.results}: run "
                  "python -m bench.report", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    for name, content in files.items():
        write_atomic(content.encode(), args.results / name, overwrite=True)
    if (args.results / "accuracy.json").exists():
        plot(json.loads((args.results / "accuracy.json").read_text()), args.results / "accuracy.png")
    write_atomic(updated.encode(), args.readme, overwrite=True)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
