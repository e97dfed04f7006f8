"""EPD tables and training checkpoints as the tests inspect them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from epd_core import EPDParams
from epd_core.params import TABLE_NAMES


def assert_tables_close(a: EPDParams, b: EPDParams, atol: float = 1e-6) -> None:
    """The four raw tables agree within ``atol`` (round-off, e.g. a resumed run against an uninterrupted one)."""
    for name in TABLE_NAMES:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol)


def checkpoint_iteration(path: Path) -> int:
    """The iteration a training checkpoint (safetensors header) records; 0 while it is absent or being written."""
    try:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        return int(json.loads(data[8 : 8 + n])["__metadata__"]["iteration"])
    except (OSError, ValueError, KeyError):
        return 0
