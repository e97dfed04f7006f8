"""Thumbnails for the template browser: each example workflow as ComfyUI's real frontend draws it.

python -m scripts.make_thumbnails     (from the repository root; needs Debian's chromium)
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from epd_dev import ROOT
from epd_dev.browser import browse
from epd_dev.comfy_server import ComfyServer


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp) / "base", frontend=True) as server:
        asyncio.run(browse(server.url + "/", ROOT / "example_workflows", fmt="jpeg"))
    for shot in (ROOT / "example_workflows").glob("*.jpeg"):
        shot.replace(shot.with_suffix(".jpg"))
        print(f"wrote example_workflows/{shot.stem}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
