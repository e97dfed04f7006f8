"""Headless Chromium on ComfyUI's own frontend, driven through the Chrome DevTools Protocol.

Chromium comes from Debian's package (``scripts/setup_env.sh`` installs it when run as root). Used by the browser
test layer and by ``python -m scripts.make_thumbnails``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from . import ROOT

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


NODE_INFO = """(() => app.graph._nodes.map(n => {
  const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
            n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
  return {id: n.id, type: n.type, bounding: b, size: Array.from(n.size),
          min_size: n.computeSize ? Array.from(n.computeSize()) : null,
          widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
          missing: !LiteGraph.registered_node_types[n.type]};
}))()"""

FIT_VIEW = """(() => { const ns = app.graph._nodes; if (!ns.length) return true;
  const bs = ns.map(n => n.getBounding ? Array.from(n.getBounding())
                                       : [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]);
  const x0 = Math.min(...bs.map(b => b[0])), y0 = Math.min(...bs.map(b => b[1]));
  const x1 = Math.max(...bs.map(b => b[0] + b[2])), y1 = Math.max(...bs.map(b => b[1] + b[3]));
  const r = window.devicePixelRatio || 1, W = app.canvas.canvas.width / r, H = app.canvas.canvas.height / r;
  const ds = app.canvas.ds; ds.scale = Math.min(1.0, (W - 120) / (x1 - x0), (H - 200) / (y1 - y0));
  ds.offset = [90 / ds.scale - x0, 170 / ds.scale - y0]; app.canvas.setDirty(true, true); return true; })()"""


async def _wait(dt: DevTools, expression: str, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = await dt.js(expression)
        if value:
            return value
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.5)


async def browse(url: str, shots: Path, fmt: str = "png", workflows: list[Path] | None = None,
                 run: Path | None = None, module: str = "epd_solver",
                 saved: tuple[Path, ...] = ()) -> dict:  # fmt: skip
    """Open ComfyUI's frontend at ``url`` and load each workflow (default: the example workflows) as the template
    browser does: fetched from ``/api/workflow_templates/<module>/<name>.json`` and given to
    ``app.loadGraphData``; save a screenshot ``shots/<stem>.<fmt>``. Returns ``registered`` (the node types the
    page knows) and, per workflow stem, its ``nodes`` after loading (type, bounding box, size, the frontend's
    minimum size, widgets by name and value, whether the type is missing). ``run``: a workflow among them to
    queue from the page afterwards (``app.queuePrompt``); its ``run`` entry then holds the prompt's outputs as
    the page received them, and ``<stem>-run.<fmt>`` the screenshot with the result. ``saved``: workflow files
    (not templates) to open afterwards as a user opens a file; their nodes are listed under their stems."""
    if CHROMIUM is None:
        raise RuntimeError("Chromium is required (apt-get install chromium); scripts/setup_env.sh installs it as root")
    results = {}
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(  # noqa: S603
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1600,1000",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with aiohttp.ClientSession() as session:
                active = Path(profile) / "DevToolsActivePort"  # port 0: Chromium picks a free one and writes it here
                for _ in range(100):
                    try:
                        port = int(active.read_text().split()[0])
                        async with session.get(f"http://127.0.0.1:{port}/json") as r:
                            targets = await r.json()
                        page = next(t for t in targets if t["type"] == "page")
                        break
                    except (OSError, ValueError, IndexError, aiohttp.ClientError, StopIteration):
                        await asyncio.sleep(0.2)
                else:
                    raise RuntimeError("Chromium's DevTools did not come up")
                async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    dt = DevTools(ws)
                    await dt.call("Page.enable")
                    await dt.call("Page.navigate", url=url)
                    await _wait(dt, "!!(window.app && window.app.graph && window.LiteGraph)", 120, "the frontend")
                    await asyncio.sleep(1.0)
                    await _close_dialogs(dt)
                    results["registered"] = await dt.js("Object.keys(LiteGraph.registered_node_types)")
                    for path in WORKFLOWS if workflows is None else workflows:
                        name = json.dumps(path.stem)
                        await dt.js(
                            f"fetch('api/workflow_templates/{module}/' + encodeURIComponent({name}) + '.json')"
                            ".then(r => { if (!r.ok) throw new Error('template ' + r.status); return r.json(); })"
                            ".then(d => app.loadGraphData(d)).then(() => true)"
                        )
                        await asyncio.sleep(0.5)
                        await _close_dialogs(dt)
                        await dt.js(FIT_VIEW)
                        await asyncio.sleep(0.5)
                        results[path.stem] = {"nodes": await dt.js(NODE_INFO)}
                        shot = await dt.call("Page.captureScreenshot", format=fmt)
                        (shots / f"{path.stem}.{fmt}").write_bytes(base64.b64decode(shot["data"]))
                    for path in saved:
                        await dt.js(f"app.loadGraphData({path.read_text()}).then(() => true)")
                        results[path.stem] = {"nodes": await dt.js(NODE_INFO)}
                    if run is not None:
                        results["run"] = await _run_from_page(dt, run, shots, fmt)
        finally:
            proc.terminate()
            proc.wait(20)
    return results


async def _run_from_page(dt: DevTools, path: Path, shots: Path, fmt: str) -> dict:
    """Load ``path`` in the page, queue it as the Queue button does, wait until the page shows its outputs."""
    await dt.js(f"app.loadGraphData({path.read_text()}).then(() => true)")
    await asyncio.sleep(0.5)
    await _close_dialogs(dt)
    await dt.js("(() => { window.__epd_outputs = {}; app.api.addEventListener('executed', e => {"
                " window.__epd_outputs[e.detail.node] = e.detail.output; }); return true; })()")  # fmt: skip
    await dt.js("app.queuePrompt(0, 1).then(() => true)")
    outputs = await _wait(dt, "Object.keys(window.__epd_outputs).length ? window.__epd_outputs : null", 300,
                          "the queued workflow's outputs")  # fmt: skip
    await asyncio.sleep(1.0)
    await dt.js(FIT_VIEW)
    await asyncio.sleep(1.0)
    shown = await dt.js("app.graph._nodes.filter(n => n.imgs && n.imgs.length && n.imgs[0].naturalWidth > 0)"
                        ".map(n => ({id: n.id, type: n.type, width: n.imgs[0].naturalWidth,"
                        " height: n.imgs[0].naturalHeight}))")  # fmt: skip
    shot = await dt.call("Page.captureScreenshot", format=fmt)
    (shots / f"{path.stem}-run.{fmt}").write_bytes(base64.b64decode(shot["data"]))
    return {"outputs": outputs, "shown": shown}
