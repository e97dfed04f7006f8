"""The test data outside the repository: the authors' published tables and reference trajectories in ``../shared``
(``EPD_SHARED`` overrides), laid out as ``epd_official/<release>/<file>.pkl`` and ``epd_reference/*.safetensors``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import ROOT

SHARED = Path(os.environ.get("EPD_SHARED", ROOT.parent / "shared"))
OFFICIAL = SHARED / "epd_official"
REFERENCE = SHARED / "epd_reference"


def official_files() -> list[Path]:
    """Every published table (43: 11 TPAMI, 32 ICCV)."""
    return sorted(OFFICIAL.glob("*/*.pkl"))


def reference_files() -> list[Path]:
    """The authors' reference trajectories (the mixture itself, gmm.safetensors, left out)."""
    return sorted(p for p in REFERENCE.glob("*.safetensors") if p.name != "gmm.safetensors")


def reference_meta(path: Path) -> dict:
    """A reference trajectory's metadata (net kind, table file, sigma range)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["meta"])


def official_path(name: str) -> Path:
    """The one published table of that file name, whichever release holds it."""
    (found,) = list(OFFICIAL.glob(f"*/{name}"))
    return found
