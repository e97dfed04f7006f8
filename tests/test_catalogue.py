"""The catalogue of published tables and downloads on request, against a local mirror of the authors' repository.

The mirror is a stdlib HTTP server on 127.0.0.1 that serves ``shared/epd_official`` under the upstream layout
(``/<commit>/exps/<family>/<file>`` for TPAMI, ``/<commit>/exps/<run>/network-snapshot-000010.pkl`` for ICCV),
and can misbehave on request: flip a byte, close early, send too much, never answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import socket
import sys
import threading
import time
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL, ROOT, official_files

from epd_core import EPDFileError, load_params, save_params
from epd_core.__main__ import main as cli_main
from epd_core.catalogue import MIRROR_ENV, UPSTREAM, fetch, find_entry, load_catalogue

sys.path.insert(0, str(ROOT / "scripts"))
import make_catalogue  # noqa: E402

COMMITS = {"88a91f0914069afd700bfee1b590c7b61ceae240": "tpami", "94c00d0f18de0636153440df7f1a9a13b80df247": "iccv"}
TABLES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")
CATALOGUE = load_catalogue(ROOT / "weights" / "catalogue.json")
ENTRIES = list(CATALOGUE.values())


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


@pytest.fixture(scope="module")
def _mirror():
    m = Mirror()
    yield m
    m.close()


@pytest.fixture
def mirror(_mirror):
    _mirror.mode = "ok"
    _mirror.requests.clear()
    return _mirror


def dead_url() -> str:
    """A local port nobody listens on: connection refused, as when offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def local_copy(entry) -> Path:
    return OFFICIAL / entry.release / entry.source_file


def assert_same_table(got, ref) -> None:
    for name in TABLES:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got.t_steps is None and ref.t_steps is None
    assert got.hyper() == ref.hyper()


# --- the catalogue itself ---------------------------------------------------------------------------------------


def test_catalogue_lists_every_published_file_with_its_hash_and_size():
    files = official_files()
    assert len(ENTRIES) == len(files) == 43
    assert {(e.release, e.source_file) for e in ENTRIES} == {(p.parent.name, p.name) for p in files}
    for e in ENTRIES:
        data = local_copy(e).read_bytes()
        assert e.size == len(data), e.name
        assert e.sha256 == hashlib.sha256(data).hexdigest(), e.name
        assert upstream_copy(e.url[len(UPSTREAM) :]) == local_copy(e), e.name  # the URL is the README's layout
        assert e.filename == f"{e.name}.safetensors"
        assert e.comfyui == (e.release == "tpami")
    assert sum(e.comfyui for e in ENTRIES) == 11
    assert {e.family for e in ENTRIES} == {
        "sd15", "sd3-512", "sd3-1024", "flux", "cifar10", "ffhq", "imagenet64", "lsun_bedroom_ldm",
    }  # fmt: skip
    assert CATALOGUE["tpami-sd15-best"].nfe == 20 and CATALOGUE["iccv-00001-cifar10-3-3-epd"].nfe == 3


def test_every_url_is_pinned_to_a_commit():
    pinned = re.compile(r"^https://raw\.githubusercontent\.com/BeierZhu/EPD/([0-9a-f]{40})/exps/[^/]+/[^/]+\.pkl$")
    for e in ENTRIES:
        match = pinned.match(e.url)
        assert match, e.url
        assert COMMITS[match[1]] == e.release, e.url


def test_catalogue_json_is_what_the_script_generates(tmp_path):
    out = tmp_path / "catalogue.json"
    with redirect_stdout(io.StringIO()):
        assert make_catalogue.main([str(OFFICIAL), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((ROOT / "weights" / "catalogue.json").read_text())


def test_catalogue_entries_match_the_files_contents():
    for e in ENTRIES:
        p = load_params(local_copy(e))
        assert (e.num_steps, e.num_points, e.nfe, e.student) == (p.num_steps, p.num_points, p.nfe, p.student)
        assert (e.schedule_type, e.backend) == (p.schedule_type, p.backend)


# --- fetch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_fetch_verifies_converts_and_matches_the_published_file(mirror, tmp_path, entry):
    path = fetch(entry, tmp_path, base_url=mirror.url)
    assert path == tmp_path / entry.filename
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.filename]  # no temporary left
    assert mirror.requests == [entry.url[len(UPSTREAM) :]]
    assert path.read_bytes()[8:9] == b"{"  # the project's safetensors, not the pickle
    got, ref = load_params(path), load_params(local_copy(entry))
    assert_same_table(got, ref)
    assert got.metadata["source_sha256"] == entry.sha256 == ref.metadata["source_sha256"]
    assert got.metadata["source_file"] == entry.source_file
    assert got.metadata["source_url"] == entry.url
    assert got.metadata["downloaded_from"] == mirror.url + entry.url[len(UPSTREAM) :]
    assert got.metadata["catalogue_entry"] == entry.name


@pytest.mark.parametrize(
    "mode,problem",
    [
        ("tamper", "sha256 mismatch"),
        ("truncate", "truncated transfer"),
        ("oversize", "sent more than the published"),
        ("announce_more", "announces"),
    ],
)
def test_a_wrong_answer_is_refused_and_leaves_nothing(mirror, tmp_path, mode, problem):
    mirror.mode = mode
    dest = tmp_path / "epd"
    dest.mkdir()
    with pytest.raises(EPDFileError, match=problem) as err:
        fetch(find_entry("tpami-sd15-best", CATALOGUE), dest, base_url=mirror.url)
    assert "tpami-sd15-best" in str(err.value)
    assert list(dest.iterdir()) == []


def test_a_server_that_never_answers_times_out_and_leaves_nothing(mirror, tmp_path):
    mirror.mode = "hang"
    dest = tmp_path / "models" / "epd"  # not there yet: created for the download, removed again
    start = time.monotonic()
    with pytest.raises(EPDFileError, match="timeout") as err:
        fetch(find_entry("tpami-flux-best", CATALOGUE), dest, base_url=mirror.url, timeout=1.0)
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 3.0, elapsed  # the socket timeout, plus a little slack on a busy machine
    assert "tpami-flux-best" in str(err.value) and mirror.requests
    assert not (tmp_path / "models").exists()


def test_offline_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(EPDFileError, match="connection refused") as err:
        fetch(find_entry("tpami-sd3-512-best", CATALOGUE), tmp_path, base_url=dead_url(), timeout=5)
    assert "tpami-sd3-512-best" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_bad_mirror_are_clear_errors(mirror, tmp_path):
    with pytest.raises(EPDFileError, match="HTTP 404"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url + "/elsewhere")
    with pytest.raises(EPDFileError, match="http:// or https://"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url="file:///etc")
    with pytest.raises(EPDFileError, match="not in the catalogue"):
        find_entry("sd15-best", CATALOGUE)
    assert list(tmp_path.iterdir()) == []


def test_mirror_from_the_environment(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, mirror.url + "/")
    path = fetch(find_entry("iccv-00021-ffhq-3-3-ipndm", CATALOGUE), tmp_path)
    assert mirror.requests == [CATALOGUE["iccv-00021-ffhq-3-3-ipndm"].url[len(UPSTREAM) :]]
    assert load_params(path).student == "ipndm"


def test_an_existing_download_is_reused_without_network(mirror, tmp_path):
    entry = CATALOGUE["tpami-sd15-best"]
    path = fetch(entry, tmp_path, base_url=mirror.url)
    before = (path.stat().st_mtime_ns, path.read_bytes())

    def no_network(url, timeout):
        raise AssertionError(f"network used for {url}")

    assert fetch(entry, tmp_path, opener=no_network) == path
    assert fetch(entry, tmp_path, base_url=dead_url(), opener=no_network) == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert len(mirror.requests) == 1


def test_another_file_of_that_name_is_never_replaced(mirror, tmp_path):
    other = tmp_path / "tpami-sd15-best.safetensors"
    save_params(load_params(OFFICIAL / "tpami" / "sd15-distilled.pkl"), other)
    before = other.read_bytes()
    with pytest.raises(EPDFileError, match="not the catalogue's tpami-sd15-best"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url)
    other.write_bytes(b"\x00" * 20)
    with pytest.raises(EPDFileError, match="unreadable"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url)
    assert mirror.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]
    assert before != other.read_bytes()


def test_cli_catalogue_and_fetch(mirror, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["catalogue"]) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 44 and any(line.startswith("tpami-sd15-best ") for line in lines)
    with redirect_stdout(io.StringIO()):
        assert cli_main(["fetch", "tpami-sd3-1024-best", "--out", str(tmp_path), "--mirror", mirror.url]) == 0
        assert cli_main(["fetch", "no-such-table", "--out", str(tmp_path)]) == 2
        assert cli_main(["fetch", "tpami-flux-best", "--out", str(tmp_path), "--mirror", dead_url()]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tpami-sd3-1024-best.safetensors"]
    assert_same_table(load_params(tmp_path / "tpami-sd3-1024-best.safetensors"),
                      load_params(OFFICIAL / "tpami" / "sd3-1024-best.pkl"))  # fmt: skip


# --- through the ComfyUI loader node ----------------------------------------------------------------------------


class _Server:
    """What ComfyUI's PromptExecutor needs of its server."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """In-process ComfyUI with models/epd in a temporary folder that does not exist yet."""
    import comfy_harness

    nodes = comfy_harness.setup()
    import execution
    import folder_paths

    epd_dir = tmp_path / "models" / "epd"
    paths, exts = folder_paths.folder_names_and_paths["epd"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(epd_dir)] + list(paths), exts))
    return nodes, execution, epd_dir


def _graph(table_name: str) -> dict:
    return {
        "1": {"class_type": "EPDParamsLoader", "inputs": {"table_name": table_name}},
        "2": {"class_type": "EPDParamsPreview", "inputs": {"epd_params": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def _options(loader) -> list[str]:
    spec = loader.INPUT_TYPES()["required"]["table_name"]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_loader_downloads_a_listed_table_when_the_graph_runs(comfy, mirror, monkeypatch):
    nodes, execution, epd_dir = comfy
    loader = nodes["EPDParamsLoader"]
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    choice = "[download] tpami-sd15-best"
    options = _options(loader)
    assert {f"[download] {e.name}" for e in ENTRIES if e.comfyui} <= set(options)
    assert not any(o.startswith("[download] iccv-") for o in options)
    assert "analytic-sd15-start-nfe10.safetensors" in options
    assert mirror.requests == [] and not epd_dir.exists()  # listing never downloads

    graph = _graph(choice)
    assert asyncio.run(execution.validate_prompt("p1", graph, None))[0]
    executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0})
    executor.execute(graph, "p1", {}, ["3"])
    assert executor.success, executor.status_messages
    assert len(mirror.requests) == 1
    assert sorted(p.name for p in epd_dir.iterdir()) == ["tpami-sd15-best.safetensors"]
    assert_same_table(load_params(epd_dir / "tpami-sd15-best.safetensors"), load_params(local_copy(find_entry(
        "tpami-sd15-best", CATALOGUE))))  # fmt: skip

    # now a local file: listed as such, and the old choice (saved workflows) still validates and runs, offline
    options = _options(loader)
    assert "tpami-sd15-best.safetensors" in options and choice not in options
    assert asyncio.run(execution.validate_prompt("p2", graph, None))[0]
    monkeypatch.setenv(MIRROR_ENV, dead_url())
    params, info = loader.execute(choice).result
    assert_same_table(params, load_params(OFFICIAL / "tpami" / "sd15-best.pkl"))
    assert "sd15-best.pkl" in info and "NFE 20" in info
    assert len(mirror.requests) == 1
    bad = asyncio.run(execution.validate_prompt("p3", _graph("[download] no-such-table"), None))
    assert not bad[0] and bad[3]["1"]["errors"][0]["extra_info"]["input_name"] == "table_name"


def test_loader_with_a_bad_mirror_is_a_node_error(comfy, monkeypatch):
    nodes, execution, epd_dir = comfy
    monkeypatch.setenv(MIRROR_ENV, dead_url())
    graph = _graph("[download] tpami-flux-best")
    assert asyncio.run(execution.validate_prompt("p1", graph, None))[0]
    executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0})
    executor.execute(graph, "p1", {}, ["3"])
    assert not executor.success
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "EPDParamsLoader"
    message = errors[0]["exception_message"]
    assert "tpami-flux-best" in message and "connection refused" in message
    assert not epd_dir.exists()
    with pytest.raises(ValueError, match="connection refused"):  # the pack's own copy of EPDFileError
        nodes["EPDParamsLoader"].execute("[download] tpami-flux-best")
