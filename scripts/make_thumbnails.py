"""Thumbnails for the template browser: each example workflow as ComfyUI's real frontend draws it.

python scripts/make_thumbnails.py     (needs Debian's chromium)
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from comfy_server import ComfyServer  # noqa: E402
from test_browser import _browse  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp) / "base", frontend=True) as server:
        asyncio.run(_browse(server.url + "/", ROOT / "example_workflows", fmt="jpeg"))
    for shot in (ROOT / "example_workflows").glob("*.jpeg"):
        shot.replace(shot.with_suffix(".jpg"))
        print(f"wrote example_workflows/{shot.stem}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
