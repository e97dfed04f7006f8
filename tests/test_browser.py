"""The example workflows in a real browser: ComfyUI's own frontend in headless Chromium (epd_dev.browser).

Each workflow is loaded through the page (``app.loadGraphData``); every node type must resolve (no "missing
nodes"), and a screenshot is saved.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from epd_dev.browser import CHROMIUM, WORKFLOWS, browse
from epd_dev.comfy_server import ComfyServer

pytestmark = pytest.mark.browser


def test_example_workflows_load_in_the_real_frontend(tmp_path):
    if CHROMIUM is None:
        pytest.fail("Chromium is required (apt-get install chromium); scripts/setup_env.sh installs it as root")
    shots = tmp_path / "shots"
    shots.mkdir()
    with ComfyServer(tmp_path / "base", frontend=True) as server:
        templates = server.get("/workflow_templates")
        results = asyncio.run(browse(server.url + "/", shots))
    assert sorted(templates["epd_solver"]) == sorted(p.stem for p in WORKFLOWS)
    for node in ("EPDParamsLoader", "EPDSampler", "EPDScheduler", "EPDKSampler", "EPDPlugin", "EPDDistill",
                 "EPDRDPO", "EPDParamsPreview", "EPDAnalyticModel"):  # fmt: skip
        assert node in results["registered"], node
    for path in WORKFLOWS:
        expected = sorted(n["type"] for n in json.loads(path.read_text())["nodes"])
        info = results[path.stem]
        assert sorted(info["types"]) == expected, path.name
        assert info["missing"] == [], (path.name, info["missing"])
        assert (shots / f"{path.stem}.png").stat().st_size > 10_000
