"""Start a real ComfyUI server with this pack in custom_nodes, post API graphs, collect results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from . import ROOT
from .comfy_harness import comfyui_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base_dir) as srv: srv.run(graph)``; the pack is linked as custom_nodes/epd_solver."""

    def __init__(self, base: Path, port: int | None = None, frontend: bool = False) -> None:
        self.base = Path(base)
        self.frontend = frontend
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ComfyServer:
        for sub in ("custom_nodes", "models/epd", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "epd_solver"
        if link.is_symlink() and link.resolve() != ROOT.resolve():  # another checkout's, or a moved one's
            link.unlink()
        if not os.path.lexists(link):
            link.symlink_to(ROOT, target_is_directory=True)
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
        ]  # fmt: skip
        if not self.frontend:  # the API alone; GET / is then 404
            front = self.base / "frontend"
            front.mkdir(exist_ok=True)
            cmd += ["--front-end-root", str(front)]
        for _ in range(5):  # a test run beside this one may take the port between free_port and the server's bind
            if self._start(cmd):
                return self
            self.port = free_port()
            cmd[cmd.index("--port") + 1] = str(self.port)
        raise RuntimeError(f"ComfyUI found its port taken five times; see {self.base / 'server.log'}")

    def _start(self, cmd: list[str]) -> bool:
        """Start the server; False when another process answers on its port (then this one is stopped)."""
        self.log = open(self.base / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self.log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if b"address already in use" in (self.base / "server.log").read_bytes().lower():
                    self.log.close()
                    return False
                raise RuntimeError(f"ComfyUI exited; see {self.base / 'server.log'}")
            try:
                argv = self.get("/system_stats")["system"].get("argv", [])
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
                continue
            if str(self.base) in argv:
                return True
            self.__exit__()
            return False
        raise RuntimeError("ComfyUI did not start within 120 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:  # noqa: S310
            return json.loads(r.read())

    def post(self, graph: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": graph, "client_id": str(uuid.uuid4())}).encode()
        req = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue a graph and wait for its history entry (``status.status_str`` is success or error)."""
        code, answer = self.post(graph)
        if code != 200:
            raise RuntimeError(f"prompt rejected ({code}): {answer}")
        return self.run_wait(answer["prompt_id"], timeout)

    def run_wait(self, pid: str, timeout: float = 300) -> dict:
        """Wait for a queued prompt's history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")
