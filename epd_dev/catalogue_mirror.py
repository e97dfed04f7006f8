"""A local HTTP mirror of the EPD authors' published files (from ``../shared``) for the catalogue download tests,
and helpers to compare a downloaded table with the published one."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from epd_core import EPDParams
from epd_core.catalogue import CatalogueEntry

from .shared_data import OFFICIAL

COMMITS = {"88a91f0914069afd700bfee1b590c7b61ceae240": "tpami", "94c00d0f18de0636153440df7f1a9a13b80df247": "iccv"}
TABLES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")


def upstream_copy(request_path: str) -> Path | None:
    """The shared copy of an upstream path, from the README's layout (independent of the catalogue)."""
    parts = request_path.split("/")
    if len(parts) != 5 or parts[0] or parts[2] != "exps":
        return None
    release = COMMITS.get(parts[1])
    if release == "tpami" and parts[4].startswith(parts[3] + "-"):
        path = OFFICIAL / "tpami" / parts[4]
    elif release == "iccv" and parts[4] == "network-snapshot-000010.pkl":
        path = OFFICIAL / "iccv" / f"{parts[3]}.pkl"
    else:
        return None
    return path if path.is_file() else None


class Mirror:
    """A local mirror; ``mode``: ok, tamper, truncate, oversize, announce_more, hang."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[str] = []
        self.release = threading.Event()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                if mirror.mode == "hang":  # accepts the request, never answers
                    mirror.release.wait(30)
                    return
                path = upstream_copy(self.path)
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                body, length = data, len(data)
                if mirror.mode == "tamper":
                    body = data[:100] + bytes([data[100] ^ 0x01]) + data[101:]
                elif mirror.mode == "truncate":  # announces the full size, closes halfway
                    body = data[: len(data) // 2]
                elif mirror.mode == "oversize":  # no Content-Length, more bytes than published
                    body, length = data + b"\0" * 4096, None
                elif mirror.mode == "announce_more":
                    body = data + b"\0" * 10
                    length = len(body)
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


_HELD: list[socket.socket] = []


def dead_url() -> str:
    """A local port nobody listens on: connection refused, as when offline. The port stays bound (not listening) for
    the process's life, so no server of a test run beside this one can take it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return f"http://127.0.0.1:{s.getsockname()[1]}"


def local_copy(entry: CatalogueEntry) -> Path:
    """The shared copy of a catalogue entry's published file."""
    return OFFICIAL / entry.release / entry.source_file


def assert_same_table(got: EPDParams, ref: EPDParams) -> None:
    """The same raw tables bit for bit (dtype included), no learned grid, the same hyper-parameters."""
    for name in TABLES:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got.t_steps is None and ref.t_steps is None
    assert got.hyper() == ref.hyper()
