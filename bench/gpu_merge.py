"""Fold the results of ``scripts/gpu_mnist.sh`` (its ``results.tar``, unpacked) into ``bench/results``.

    python -m bench.gpu_merge DIR            # DIR: the unpacked results.tar (folders neural/ and plugin/)

``neural/<shard>/``: each shard's ``neural.json`` (or, for a shard stopped at its deadline, the rows it wrote as it
went, ``partial-<kind>.json``); together they are one :mod:`bench.neural` run (one answer key per model, shared
through ``EPD_KEY_CACHE``): written to ``neural.json``, ``neural.md`` and ``neural_summary.json`` and merged into
``accuracy.json`` as ``bench.neural`` does. ``plugin/<shard>.json``: :mod:`bench.plugin`'s MNIST rows, merged into
``plugin.json`` and ``accuracy.json`` and ``plugin.md`` rewritten as ``bench.plugin`` does. ``--skip`` leaves out
the shards named (for example the EPD rows of tables that were not bundled). ``tables/<job>/``: the checkpoint of
a training job stopped at its deadline is filed in ``bench/jobs/checkpoints/<job>/``, where the next call of
``scripts/gpu_mnist.sh`` continues it; a job that finished has its checkpoint removed there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import neural, plugin
from bench.accuracy import RESULTS
from epd_dev import ROOT

CHECKPOINTS = ROOT / "bench" / "jobs" / "checkpoints"


def shard_rows(folder: Path) -> list[dict]:
    """A ``bench.neural`` shard's rows: its ``neural.json``, else what it wrote as it went."""
    done = folder / "neural.json"
    if done.is_file():
        return json.loads(done.read_text())
    return [r for part in sorted(folder.glob("partial-*.json")) for r in json.loads(part.read_text())]


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
    """Copy the unfinished jobs' checkpoints from ``tables/<job>/`` into ``into/<job>/`` and drop those of jobs
    whose table is there; returns what was done, one line each."""
    done = []
    for job in sorted(p for p in tables.iterdir() if p.is_dir()) if tables.is_dir() else []:
        for table in sorted(job.glob("*.safetensors")):
            stale = into / job.name / (table.name.removesuffix(".safetensors") + ".epd-checkpoint")
            if stale.exists():
                stale.unlink()
                done.append(f"{job.name}/{table.name}: finished, its checkpoint removed")
        for checkpoint in sorted(job.glob("*.epd-checkpoint")):
            (into / job.name).mkdir(parents=True, exist_ok=True)
            (into / job.name / checkpoint.name).write_bytes(checkpoint.read_bytes())
            done.append(f"{job.name}/{checkpoint.name}: filed, to be continued")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip", nargs="*", default=[], help="shard folders or files (names) to leave out")
    args = ap.parse_args(argv)
    print("\n".join(file_checkpoints(args.dir / "tables")))
    parts = args.dir / "neural"
    folders = sorted(p for p in parts.iterdir() if p.is_dir() and p.name not in args.skip) if parts.is_dir() else []
    rows = neural_rows(folders)
    if rows:
        print(neural.record(rows, args.out))
    shards = sorted(p for p in (args.dir / "plugin").glob("*.json") if p.name not in args.skip)
    prows = [r for p in shards for r in json.loads(p.read_text()) if r["sampler"] != "exact"]
    if prows:
        print(plugin.record(prows, args.out))
    print(f"{len(rows)} neural rows from {len(folders)} shards, {len(prows)} plugin rows from {len(shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
