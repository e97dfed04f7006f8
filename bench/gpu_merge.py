"""Fold the results of ``scripts/gpu_mnist.sh`` (its ``results.tar``, unpacked) into ``bench/results``.

    python -m bench.gpu_merge DIR            # DIR: the unpacked results.tar (folders neural/ and plugin/)

``neural/<shard>/``: each shard's ``neural.json`` (or, for a shard stopped at its deadline, the rows it wrote as it
went, ``partial-<kind>.json``); together they are one :mod:`bench.neural` run (one answer key per model, shared
through ``EPD_KEY_CACHE``): written to ``neural.json``, ``neural.md`` and ``neural_summary.json`` and merged into
``accuracy.json`` as ``bench.neural`` does. ``plugin/<shard>.json``: :mod:`bench.plugin`'s MNIST rows, merged into
``plugin.json`` and ``accuracy.json`` and ``plugin.md`` rewritten as ``bench.plugin`` does. ``--skip`` leaves out
the shards named (for example the EPD rows of tables that were not bundled). A shard stopped at its deadline holds
part of its field only (the best built-in could be among the cells it never ran): the merge refuses it unless
``--allow-partial``. Rows must be on the answer key of the ``neural.json`` they join (same noises and key gap), as
``bench.neural --add`` checks; a ``table_file`` of the GPU machine points into DIR. ``tables/<job>/``: the checkpoint of
a training job stopped at its deadline is filed in ``bench/jobs/checkpoints/<job>/``, where the next call of
``scripts/gpu_mnist.sh`` continues it; a job that finished has its table filed there instead (the next call keeps it
and scores it again, rather than training it again).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import neural, plugin
from bench.accuracy import RESULTS
from epd_core.checkpoint import checkpoint_path
from epd_dev import ROOT

CHECKPOINTS = ROOT / "bench" / "jobs" / "checkpoints"


def shard_rows(folder: Path) -> list[dict]:
    """A ``bench.neural`` shard's rows: its ``neural.json``, else what it wrote as it went."""
    done = folder / "neural.json"
    if done.is_file():
        return json.loads(done.read_text())
    return [r for part in sorted(folder.glob("partial-*.json")) for r in json.loads(part.read_text())]


def unfinished(folders: list[Path], plugin_dir: Path) -> list[str]:
    """The shards stopped before their end: a neural shard without ``neural.json``, a plugin job with only its
    ``.partial.json``."""
    names = [f"neural/{f.name}" for f in folders if not (f / "neural.json").is_file()]
    for part in sorted(plugin_dir.glob("*.partial.json")):
        if not part.with_name(part.name.removesuffix(".partial.json") + ".json").is_file():
            names.append(f"plugin/{part.name}")
    return names


def plugin_shards(plugin_dir: Path, skip: list[str]) -> list[Path]:
    """Each plugin job's file: its result, or for a stopped job its ``.partial.json``."""
    shards = []
    for path in sorted(plugin_dir.glob("*.json")):
        whole = path.with_name(path.name.removesuffix(".partial.json") + ".json")
        if path.name in skip or whole.name in skip or (path != whole and whole.is_file()):
            continue
        shards.append(path)
    return shards


def check_key(rows: list[dict], recorded: Path) -> None:
    """Every model's rows on the answer key of the ``neural.json`` they join, where it has that model."""
    old = {r["model"]: r for r in (json.loads(recorded.read_text()) if recorded.is_file() else [])
           if r["sampler"] == "exact"}  # fmt: skip
    for r in rows:
        key = old.get(r["model"])
        if key is not None and (r["samples"], r["answer_key_gap"]) != (key["samples"], key["answer_key_gap"]):
            raise ValueError(f"{r['model']} {r['sampler']} {r['scheduler']}: {r['samples']} noises with key gap "
                             f"{r['answer_key_gap']:.3g}, but {recorded} holds {key['samples']} with "
                             f"{key['answer_key_gap']:.3g}: not the same answer key")  # fmt: skip


def relative_tables(rows: list[dict], base: Path) -> list[dict]:
    """``table_file`` as a path inside the unpacked results (the GPU machine's absolute path means nothing here)."""
    out = []
    for r in rows:
        path = r.get("table_file")
        if path and Path(path).is_absolute():
            parts = Path(path).parts
            r = {**r, "table_file": str(base / Path(*parts[parts.index("tables") :])) if "tables" in parts else path}
        out.append(r)
    return out


def neural_rows(folders: list[Path]) -> list[dict]:
    """The shards' rows as one run: one ``exact`` row per model; all rows on one answer key per model."""
    rows, exact = [], {}
    for folder in folders:
        for r in shard_rows(folder):
            if r["sampler"] == "exact":
                exact.setdefault(r["model"], r)
            else:
                rows.append(r)
    for r in rows:
        key = exact.get(r["model"])
        if key is None or r["answer_key_gap"] != key["answer_key_gap"] or r["samples"] != key["samples"]:
            raise ValueError(f"{r['model']} {r['sampler']} {r['scheduler']}: not on the shared answer key")
    return list(exact.values()) + rows


def file_checkpoints(tables: Path, into: Path = CHECKPOINTS) -> list[str]:
    """Copy the unfinished jobs' checkpoints from ``tables/<job>/`` into ``into/<job>/``; a finished job's table
    replaces its checkpoint there (the next call keeps it rather than training it again: ``make_mnist_tables
    --resume``); returns what was done, one line each."""
    done = []
    for job in sorted(p for p in tables.iterdir() if p.is_dir()) if tables.is_dir() else []:
        finished = set()
        for table in sorted(job.glob("*.safetensors")):
            checkpoint = checkpoint_path(table).name
            finished.add(checkpoint)  # a kill between the table's save and its checkpoint's removal leaves both
            (into / job.name / checkpoint).unlink(missing_ok=True)
            kept = into / job.name / table.name
            if kept.exists() and kept.read_bytes() == table.read_bytes():
                continue
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_bytes(table.read_bytes())
            done.append(f"{job.name}/{table.name}: finished, filed (its checkpoint removed)")
        for checkpoint in sorted(c for c in job.glob("*.epd-checkpoint") if c.name not in finished):
            (into / job.name).mkdir(parents=True, exist_ok=True)
            (into / job.name / checkpoint.name).write_bytes(checkpoint.read_bytes())
            done.append(f"{job.name}/{checkpoint.name}: filed, to be continued")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip", nargs="*", default=[], help="shard folders or files (names) to leave out")
    ap.add_argument("--allow-partial", action="store_true",
                    help="merge shards stopped at their deadline too (their field is incomplete)")  # fmt: skip
    args = ap.parse_args(argv)
    parts = args.dir / "neural"
    folders = sorted(p for p in parts.iterdir() if p.is_dir() and p.name not in args.skip) if parts.is_dir() else []
    stopped = unfinished(folders, args.dir / "plugin")
    if stopped and not args.allow_partial:
        print(f"stopped before their end: {', '.join(stopped)}; their field is incomplete (the best built-in may be "
              "among the cells they never ran). Leave them out with --skip, or merge them with --allow-partial",
              file=sys.stderr)  # fmt: skip
        return 1
    rows = relative_tables(neural_rows(folders), args.dir)
    check_key(rows, args.out / "neural.json")
    print("\n".join(file_checkpoints(args.dir / "tables")))
    if rows:
        print(neural.record(rows, args.out))
    shards = plugin_shards(args.dir / "plugin", args.skip)
    prows = [r for p in shards for r in json.loads(p.read_text()) if r["sampler"] != "exact"]
    if prows:
        print(plugin.record(prows, args.out))
    print(f"{len(rows)} neural rows from {len(folders)} shards, {len(prows)} plugin rows from {len(shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
