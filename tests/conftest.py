"""Shared fixtures: the authors' files and reference trajectories live in ../shared."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EPD_SHARED", ROOT.parent / "shared"))
OFFICIAL = SHARED / "epd_official"
REFERENCE = SHARED / "epd_reference"


def official_files() -> list[Path]:
    return sorted(OFFICIAL.glob("*/*.pkl"))


def reference_files() -> list[Path]:
    return sorted(p for p in REFERENCE.glob("*.safetensors") if p.name != "gmm.safetensors")


def reference_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["meta"])


def official_path(name: str) -> Path:
    (found,) = list(OFFICIAL.glob(f"*/{name}"))
    return found


@pytest.fixture(scope="session", autouse=True)
def _shared_present() -> None:
    if not OFFICIAL.is_dir() or not REFERENCE.is_dir():
        pytest.fail(f"test data missing: expected {OFFICIAL} and {REFERENCE} (set EPD_SHARED)")
