"""The example workflows in a real browser: ComfyUI's own frontend in headless Chromium.

Each workflow is loaded through the page (``app.loadGraphData``); every node type must resolve (no "missing
nodes"), and a screenshot is saved. Chromium comes from Debian's package (``scripts/setup_env.sh`` installs it
when run as root).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from comfy_server import ComfyServer, free_port  # noqa: E402

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")


async def _close_dialogs(dt: DevTools) -> None:
    """Close the first-run templates dialog and any popup, as a user clicking their close buttons."""
    for _ in range(3):
        await dt.js(
            "(() => { for (const d of document.querySelectorAll('[role=dialog]')) {"
            " const top = d.getBoundingClientRect().top;"
            " const bs = [...d.querySelectorAll('button')].filter(b => b.getBoundingClientRect().top - top < 80);"
            " bs.sort((a, b) => b.getBoundingClientRect().right - a.getBoundingClientRect().right);"
            " if (bs.length) bs[0].click(); } return true; })()"
        )
        await asyncio.sleep(0.3)


async def _browse(url: str, shots: Path, fmt: str = "png") -> dict:
    port = free_port()
    profile = shots / "profile"
    proc = subprocess.Popen(  # noqa: S603
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1400,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    results = {}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json") as r:
                        targets = await r.json()
                    page = next(t for t in targets if t["type"] == "page")
                    break
                except (aiohttp.ClientError, StopIteration):
                    await asyncio.sleep(0.2)
            else:
                raise RuntimeError("Chromium's DevTools did not come up")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                dt = DevTools(ws)
                await dt.call("Page.enable")
                await dt.call("Page.navigate", url=url)
                deadline = time.time() + 120
                while not await dt.js("!!(window.app && window.app.graph && window.LiteGraph)"):
                    if time.time() > deadline:
                        raise RuntimeError("ComfyUI's frontend did not load")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1.0)
                await _close_dialogs(dt)
                registered = await dt.js("Object.keys(LiteGraph.registered_node_types)")
                results["registered"] = registered
                for path in WORKFLOWS:
                    data = path.read_text()
                    await dt.js(f"app.loadGraphData({data}).then(() => true)")
                    await asyncio.sleep(0.5)
                    await _close_dialogs(dt)
                    await dt.js("(() => { const ds = app.canvas.ds; ds.scale = 0.65; ds.offset = [40, 120];"
                                " app.canvas.setDirty(true, true); return true; })()")  # fmt: skip
                    await asyncio.sleep(0.3)
                    info = await dt.js(
                        "({types: app.graph._nodes.map(n => n.type),"
                        " missing: app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                        ".map(n => n.type)})"
                    )
                    shot = await dt.call("Page.captureScreenshot", format=fmt)
                    (shots / f"{path.stem}.{fmt}").write_bytes(base64.b64decode(shot["data"]))
                    results[path.stem] = info
    finally:
        proc.terminate()
        proc.wait(20)
    return results


def test_example_workflows_load_in_the_real_frontend(tmp_path):
    if CHROMIUM is None:
        pytest.fail("Chromium is required (apt-get install chromium); scripts/setup_env.sh installs it as root")
    shots = tmp_path / "shots"
    shots.mkdir()
    with ComfyServer(tmp_path / "base", frontend=True) as server:
        templates = server.get("/workflow_templates")
        results = asyncio.run(_browse(server.url + "/", shots))
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
