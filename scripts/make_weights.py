"""Regenerate every table bundled in weights/ (each records its own command in its metadata) and weights/README.md.

python scripts/make_weights.py          # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import shlex
import subprocess  # noqa: S404  (runs this project's own command line, never user input)
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd_core import EPDParams, load_params, save_params  # noqa: E402

START = "analytic-sd15-start-nfe10.safetensors"
COMMON = (
    "--mixture reference --points 2 --learn-grid --teacher heun --teacher-m 8 --iterations 400 --batch 128 "
    "--seed 1 --weighting snr"
)
DISTILLED = {
    "analytic-sd15-reference-nfe5.safetensors": f"--form sd15 --steps 4 --afs {COMMON}",
    "analytic-sd15-reference-nfe10.safetensors": f"--form sd15 --steps 6 {COMMON}",
    "analytic-sd3-reference-nfe6.safetensors": f"--form sd3 --steps 4 {COMMON}",
    "analytic-sd3-reference-nfe10.safetensors": f"--form sd3 --steps 6 {COMMON}",
    "analytic-flux-reference-nfe6.safetensors": f"--form flux --steps 4 {COMMON}",
    "analytic-flux-reference-nfe10.safetensors": f"--form flux --steps 6 {COMMON}",
    **{
        f"analytic-sd15-reference-nfe10-plugin-{b}.safetensors": f"--form sd15 --steps 6 --plugin-base {b} {COMMON}"
        for b in ("dpmpp_2m", "ipndm")
    },
}


def main() -> None:
    start = EPDParams.start(6, 2, schedule_type="discrete", schedule_rho=1.0, backend="ldm", max_order=2,
                            metadata={"source": "untrained start table (r at 1/3 and 2/3, equal weights)",
                                      "command": "python scripts/make_weights.py"})  # fmt: skip
    save_params(start, ROOT / "weights" / START)
    for name, args in DISTILLED.items():
        argv = ["distill", *shlex.split(args), "--out", f"weights/{name}"]
        subprocess.run([sys.executable, "-m", "epd_core", *argv], cwd=ROOT, check=True)  # noqa: S603
    lines = ["# Bundled tables", "", "Made by this project (the authors' tables are not redistributed; see the main",
             "README). Regenerate all with `python scripts/make_weights.py`; each file's metadata records its command.",
             "", "| file | model | NFE | command |", "|---|---|---|---|"]  # fmt: skip
    for path in sorted((ROOT / "weights").glob("*.safetensors")):
        p = load_params(path)
        model = p.metadata.get("model", "analytic sd15 (untrained)")
        if p.metadata.get("plugin_base"):
            model += f", EPD Plugin over {p.metadata['plugin_base']}"
        lines.append(f"| `{path.name}` | {model} | {p.nfe} | `{p.metadata.get('command', '')}` |")
    (ROOT / "weights" / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
