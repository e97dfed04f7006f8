"""Hostile inputs for the hardening tests: tables larger than any real one, and an HTTP mirror that misbehaves."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from epd_core import EPDParams
from epd_core.catalogue import UPSTREAM, find_entry, load_catalogue

from . import ROOT
from .shared_data import OFFICIAL


def huge_table(tmp: Path, num_steps: int, num_points: int) -> Path:
    """A valid table in the project's format, larger than any real one (as the probes built them)."""
    p = EPDParams.start(2, 2)
    tables = {name: torch.zeros(num_steps - 1, num_points) for name in
              ("r_params", "weight_s", "scale_dir_params", "scale_time_params")}  # fmt: skip
    from safetensors.torch import save

    hyper = dict(p.hyper(), num_steps=num_steps, num_points=num_points)
    meta = {"epd_format": "1", "hyper": json.dumps(hyper), "provenance": "{}"}
    path = tmp / f"huge-{num_steps}-{num_points}.safetensors"
    path.write_bytes(save(tables, metadata=meta))
    return path


ENTRY = find_entry("tpami-sd15-best", load_catalogue(ROOT / "weights" / "catalogue.json"))
DATA = (OFFICIAL / ENTRY.release / ENTRY.source_file).read_bytes()
PATH = ENTRY.url[len(UPSTREAM) :]


class HostileMirror:
    """``mode``: ok, drip (1 byte/s after the headers), drip_headers (the status line 1 byte/s), hang,
    redirect (to ``target``, a full URL)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.target = ""
        self.requests: list[str] = []
        self.stop = threading.Event()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client cut a transfer it gave up on
                    pass

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                if mirror.mode == "redirect" and self.path == PATH:
                    self.send_response(302)
                    self.send_header("Location", mirror.target)
                    self.end_headers()
                    return
                if mirror.mode == "hang":
                    mirror.stop.wait(30)
                    return
                if mirror.mode == "drip_headers":
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 7622\r\n":
                        if mirror.stop.wait(1.0):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return
                if self.path not in (PATH, "/moved" + PATH):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(DATA)))
                self.end_headers()
                if mirror.mode == "drip":
                    for byte in DATA:
                        if mirror.stop.wait(1.0):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return
                self.wfile.write(DATA)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
