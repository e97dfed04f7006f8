"""Regenerate the tables bundled in weights/ (each records this command in its metadata).

python scripts/make_weights.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd_core import EPDParams, save_params  # noqa: E402

COMMAND = "python scripts/make_weights.py"

TABLES = {
    "analytic-sd15-start-nfe10.safetensors": dict(
        num_steps=6, num_points=2, schedule_type="discrete", schedule_rho=1.0, backend="ldm", max_order=2
    ),
}


def main() -> None:
    for name, hyper in TABLES.items():
        params = EPDParams.start(
            **hyper, metadata={"source": "untrained start table (r at 1/3 and 2/3, equal weights)", "command": COMMAND}
        )
        save_params(params, ROOT / "weights" / name)
        print(f"wrote weights/{name}: NFE {params.nfe}")


if __name__ == "__main__":
    main()
