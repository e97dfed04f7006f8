"""The benchmarks of the headline and the plugin table, then the README's headline:
``python -m bench.all [--quick] [--out DIR]``.

In order: ``bench.accuracy`` (the whole field at 1,024 noises, and the plot), ``bench.carry`` (the analytic
mixtures at 8,192 noises, built-ins picked from the first), ``bench.neural`` (the MNIST models), ``bench.plugin``
(the EPD Plugin over each base), then ``bench.report``, which writes the README's headline from their records.
The full run takes more than a day on a 2-core CPU (most of it ``bench.neural`` at its 2,050 noises per MNIST model;
``--neural-samples`` sets fewer). Without ``--out`` it rewrites ``bench/results``.
``--quick`` is the small version CI runs: each benchmark's quick settings, written to ``--out`` with a copy of the
README there, so the repository's results stay as they are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench import accuracy, carry, neural, plugin, report
from bench.accuracy import RESULTS


def plan(out: Path, quick: bool, neural_samples: int | None) -> list[tuple[str, object, list[str]]]:
    """(name, module, arguments) of each benchmark in the order they run."""
    o = ["--out", str(out)]
    if quick:
        return [
            ("accuracy", accuracy, ["--quick", "--samples", "64", *o]),
            ("carry", carry, ["--samples", "32", "--forms", "sd15_eps", "--mixtures", "reference", "--nfes", "5",
                              "--top", "2", "--workers", "1", "--ranking", str(out / "accuracy.json"), *o]),
            ("neural", neural, ["--quick", "--kinds", "eps", "--nfes", "5", *o]),
        ]  # fmt: skip
    samples = ["--samples", str(neural_samples)] if neural_samples else []
    mnist_samples = ["--mnist-samples", str(neural_samples)] if neural_samples else []
    return [
        ("accuracy", accuracy, o),
        ("carry", carry, o),
        ("neural", neural, [*samples, *o]),
        ("plugin", plugin, [*mnist_samples, "--reuse", str(out / "neural.json"), *o]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small version (CI), into --out with a README copy")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--neural-samples", type=int, help="noises per MNIST model (default: bench.neural's)")
    args = ap.parse_args(argv)
    if args.quick and args.out.resolve() == RESULTS.resolve():
        ap.error("--quick writes to a scratch folder: give --out")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, module, arguments in plan(args.out, args.quick, args.neural_samples):
        print(f"== bench.{name} {' '.join(arguments)}", flush=True)
        if module.main(arguments) != 0:
            print(f"bench.{name} failed", file=sys.stderr)
            return 1
    readme = report.README
    if args.quick:
        readme = args.out / "README.md"
        shutil.copyfile(report.README, readme)
    return report.main(["--results", str(args.out), "--readme", str(readme)])


if __name__ == "__main__":
    sys.exit(main())
