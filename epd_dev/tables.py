"""Comparisons of EPD tables for the tests."""

from __future__ import annotations

import torch

from epd_core import EPDParams
from epd_core.params import TABLE_NAMES


def assert_tables_close(a: EPDParams, b: EPDParams, atol: float = 1e-6) -> None:
    """The four raw tables agree within ``atol`` (round-off, e.g. a resumed run against an uninterrupted one)."""
    for name in TABLE_NAMES:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol)
