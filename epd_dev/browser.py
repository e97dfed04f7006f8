"""Headless Chromium on ComfyUI's own frontend, driven through the Chrome DevTools Protocol.

Chromium comes from Debian's package (``scripts/setup_env.sh`` installs it when run as root). Used by the browser
test layer and by ``python -m scripts.make_thumbnails``.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from . import ROOT
from .comfy_server import free_port

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


async def browse(url: str, shots: Path, fmt: str = "png", workflows: list[Path] | None = None) -> dict:
    """Open ComfyUI's frontend at ``url``, load each workflow (default: the example workflows) through
    ``app.loadGraphData`` and save a screenshot ``shots/<stem>.<fmt>``. Returns ``registered`` (the node types the
    page knows) and, per workflow stem, its node ``types`` and the ``missing`` ones."""
    if CHROMIUM is None:
        raise RuntimeError("Chromium is required (apt-get install chromium); scripts/setup_env.sh installs it as root")
    port = free_port()
    results = {}
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(  # noqa: S603
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1400,900",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
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
                    results["registered"] = await dt.js("Object.keys(LiteGraph.registered_node_types)")
                    for path in WORKFLOWS if workflows is None else workflows:
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
