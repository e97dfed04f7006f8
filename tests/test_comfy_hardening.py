"""Hardening through the real server: bad graphs, a long queue, determinism across runs and processes."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epd_core import load_params
from epd_core.catalogue import MIRROR_ENV
from epd_dev import ROOT
from epd_dev.comfy_server import ComfyServer
from epd_dev.hostile import ENTRY, HostileMirror, huge_table
from epd_dev.shared_data import official_path
from epd_dev.tables import assert_tables_close, checkpoint_iteration

pytestmark = pytest.mark.server
GRAPH = json.loads((ROOT / "example_workflows" / "api" / "epd_sampler_custom_advanced.json").read_text())


def _graph(prefix: str, changes: dict | None = None) -> dict:
    g = json.loads(json.dumps(GRAPH))
    g["9"]["inputs"]["filename_prefix"] = f"latents/{prefix}"
    for (node, key), value in (changes or {}).items():
        g[node]["inputs"][key] = value
    return g


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def mirror():
    m = HostileMirror()
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, mirror):
    base = tmp_path_factory.mktemp("comfy_hard")
    (base / "models" / "epd").mkdir(parents=True)
    shutil.copy(official_path("sd3-512-best.pkl"), base / "models" / "epd" / "sd3-512-best.pkl")
    saved = os.environ.get(MIRROR_ENV)
    os.environ[MIRROR_ENV] = mirror.url  # the server downloads from the local hostile mirror only
    try:
        with ComfyServer(base) as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop(MIRROR_ENV, None)
        else:
            os.environ[MIRROR_ENV] = saved


def _latent(server, prefix: str) -> torch.Tensor:
    (path,) = sorted((server.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


def _ok(server, graph) -> None:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]


BAD = {
    "steps_mismatch": ({("4", "epd_params"): ["2", 0]}, "SAMPLER_SWAP"),
    "flow_table_on_eps": ({("2", "table_name"): "sd3-512-best.pkl"}, "rectified-flow"),
    "odd_latent": ({("3", "width"): 72, ("3", "height"): 56}, "works on latents of shape"),
    "video_latent": ({}, "VIDEO"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_graph_is_a_node_error_and_the_server_goes_on(server, case):
    changes, expect = BAD[case]
    graph = _graph(f"bad_{case}", changes)
    if expect == "SAMPLER_SWAP":  # sigmas from a 20-step ComfyUI scheduler
        graph["20"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras",
                                                                  "steps": 20, "denoise": 1.0}}  # fmt: skip
        graph["8"]["inputs"]["sigmas"] = ["20", 0]
        expect = "time points"
    if expect == "VIDEO":
        graph["3"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                          "batch_size": 1}}  # fmt: skip
        expect = "works on latents of shape"
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    assert expect in json.dumps(entry["status"]["messages"])
    _ok(server, _graph(f"after_{case}"))


@pytest.mark.parametrize("denoise", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 16])
def test_denoise_and_batch_extremes_work(server, denoise, batch):
    prefix = f"den_{denoise}_{batch}"
    _ok(server, _graph(prefix, {("5", "denoise"): denoise, ("3", "batch_size"): batch}))
    out = _latent(server, prefix)
    assert out.shape == (batch, 4, 8, 8) and torch.isfinite(out).all()
    if denoise == 0.0:
        assert torch.equal(out, torch.zeros_like(out))


def test_determinism_across_runs_and_processes(server, tmp_path):
    _ok(server, _graph("det_a"))
    _ok(server, _graph("det_b"))
    a, b = _latent(server, "det_a"), _latent(server, "det_b")
    assert torch.equal(a, b)
    with ComfyServer(tmp_path / "second") as other:
        _ok(other, _graph("det_c"))
        c = _latent(other, "det_c")
    assert torch.equal(a, c)


def test_long_queue_of_200_prompts(server):
    pid = server.proc.pid
    for i in range(5):  # warm up
        _ok(server, _graph(f"warm_{i}", {("6", "noise_seed"): 1000 + i}))
    rss_start = _rss_kb(pid)
    ids = []
    for i in range(200):
        code, answer = server.post(_graph(f"long_{i}", {("6", "noise_seed"): i}))
        assert code == 200
        ids.append(answer["prompt_id"])
    entry = None
    for pid_ in ids[-1:]:
        entry = server.run_wait(pid_, timeout=600)
    assert entry["status"]["status_str"] == "success"
    history = server.get("/history?max_items=400")
    statuses = [history[p]["status"]["status_str"] for p in ids]
    assert statuses.count("success") == 200
    rss_end = _rss_kb(pid)
    temp = server.base / "temp"
    assert not any(temp.rglob("*")), list(temp.rglob("*"))[:5]
    growth_mb = (rss_end - rss_start) / 1024
    print(f"\n200 prompts: server RSS {rss_start / 1024:.0f} MB -> {rss_end / 1024:.0f} MB")
    assert growth_mb < 150, growth_mb


# --- issue 17: what a hostile or careless user broke ------------------------------------------------------------


def _interrupt(server) -> None:
    req = urllib.request.Request(server.url + "/interrupt", b"{}", {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()  # noqa: S310


def _messages(entry) -> str:
    """The event names and the error message the user sees (not ComfyUI's traceback)."""
    parts = []
    for event, data in entry["status"]["messages"]:
        parts.append(event)
        if event == "execution_error":
            parts.append(data["exception_message"])
    return "\n".join(parts)


def _running(server, prompt_id: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = server.get("/queue")["queue_running"]
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.05)
    raise TimeoutError("the prompt never started")


def _seconds_to_stop(server, graph, after: float, until=None) -> tuple[float, dict]:
    """Queue ``graph``, press cancel ``after`` s into its run (or once ``until()`` holds), time the stop."""
    code, answer = server.post(graph)
    assert code == 200, answer
    _running(server, answer["prompt_id"])
    deadline = time.time() + 300
    time.sleep(after)
    while until is not None and not until() and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    _interrupt(server)
    entry = server.run_wait(answer["prompt_id"], timeout=300)
    return time.monotonic() - t0, entry


def _distill_graph(name: str, **inputs) -> dict:
    """Model, latent and EPD Distill, nothing after it: the training nodes are output nodes (they save a file)."""
    graph = json.loads((ROOT / "example_workflows" / "api" / "epd_distill_analytic.json").read_text())
    graph = {k: graph[k] for k in ("1", "2", "3")}
    graph["3"]["inputs"].update(filename=name, overwrite=False, **inputs)
    return graph


def _loader_graph(table: str) -> dict:
    return {
        "1": {"class_type": "EPDParamsLoader", "inputs": {"table_name": table}},
        "2": {"class_type": "EPDParamsPreview", "inputs": {"epd_params": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


@pytest.mark.parametrize(("steps", "points", "limit"), [(300_000, 1, "at most 257"), (3, 50_000, "at most 64")])
def test_oversized_tables_are_node_errors_naming_the_limit_and_the_server_stays_small(server, steps, points, limit):
    path = huge_table(server.base / "models" / "epd", steps, points)
    rss = _rss_kb(server.proc.pid)
    t0 = time.monotonic()
    entry = server.run(_loader_graph(path.name))
    took = time.monotonic() - t0
    grown = (_rss_kb(server.proc.pid) - rss) / 1024
    print(f"\n{steps} x {points} table: refused in {took:.1f} s, server RSS +{grown:.0f} MB")
    assert entry["status"]["status_str"] == "error"
    text = _messages(entry)
    assert limit in text and f"models/epd/{path.name}" in text
    assert str(server.base) not in text
    assert grown < 200 and took < 30
    path.unlink()


def test_preview_of_a_large_valid_table_is_bounded(server):
    graph = _loader_graph(huge_table(server.base / "models" / "epd", 257, 32).name)
    graph["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "preview_big"}}
    _ok(server, graph)
    from PIL import Image

    (png,) = (server.base / "output").glob("preview_big_*.png")
    width, height = Image.open(png).size
    assert width == 760 and height < 2400, (width, height)


def test_distill_stops_within_2_s_of_an_interrupt_at_the_nodes_maximum_settings(server):
    graph = _distill_graph("interrupted_max", nfe=64, points=8, teacher_steps=32, iterations=100000, batch=256,
                           learn_grid=False, afs=False, teacher="dpm2")  # fmt: skip
    seconds, entry = _seconds_to_stop(server, graph, after=3.0)
    print(f"\nEPD Distill at the maximum settings: stopped {seconds:.2f} s after /interrupt (before: 97 s)")
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in _messages(entry)
    assert seconds < 2.0, seconds
    assert not (server.base / "models" / "epd" / "interrupted_max.safetensors").exists()


def test_rdpo_stops_within_2_s_of_an_interrupt(server):
    graph = _distill_graph("unused")
    graph["3"] = {"class_type": "EPDRDPO", "inputs": {
        "model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "latent_image": ["2", 0],
        "epd_params": ["4", 0], "cfg": 1.0, "reward": "fidelity", "teacher_steps": 32, "iterations": 100000,
        "groups": 256, "group_size": 64, "concentration": 20.0, "learning_rate": 7e-5, "seed": 0,
        "filename": "rdpo_interrupted", "overwrite": False}}  # fmt: skip
    table = "demo/analytic-sd15-reference-nfe10.safetensors"
    graph["4"] = {"class_type": "EPDParamsLoader", "inputs": {"table_name": table}}
    seconds, entry = _seconds_to_stop(server, graph, after=3.0)
    print(f"\nEPD RDPO: stopped {seconds:.2f} s after /interrupt")
    assert "execution_interrupted" in _messages(entry) and seconds < 2.0, seconds


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("evil\n", "invalid table name"),
        ("a/../b", "invalid table name"),
        ("digits-nfe5", "bundled"),
        ("tpami-sd15-best", "bundled"),
    ],
)
def test_bad_output_names_are_refused(server, name, problem):
    entry = server.run(_distill_graph(name, iterations=1))
    assert entry["status"]["status_str"] == "error" and problem in _messages(entry)
    assert sorted(p.name for p in (server.base / "models" / "epd").iterdir() if "\n" in p.name) == []


def test_a_file_that_appears_during_training_is_not_replaced(server):
    epd = server.base / "models" / "epd"
    target = epd / "appeared.safetensors"
    code, answer = server.post(_distill_graph("appeared", iterations=30, batch=4))
    assert code == 200
    deadline = time.time() + 300
    while not (epd / "appeared.epd-checkpoint").exists() and time.time() < deadline:  # training is under way
        time.sleep(0.02)
    target.write_bytes(b"the user's own file")
    entry = server.run_wait(answer["prompt_id"], timeout=600)
    text = _messages(entry)
    assert entry["status"]["status_str"] == "error", text
    assert "appeared while" in text or "exists; not replacing it (overwrite replaces it)" in text, text
    assert "models/epd/appeared.safetensors" in text and str(server.base) not in text
    assert target.read_bytes() == b"the user's own file"
    assert not [p for p in epd.iterdir() if p.name.startswith(".appeared")]  # no temporary file left


def test_an_interrupted_distill_resumes_to_the_same_table(server):
    epd = server.base / "models" / "epd"
    _ok(server, _distill_graph("resume_ref", iterations=20, batch=4, start_check=64))
    ck = epd / "resume_run.epd-checkpoint"
    graph = _distill_graph("resume_run", iterations=20, batch=4, start_check=64)
    seconds, entry = _seconds_to_stop(server, graph, after=0.0, until=ck.exists)
    assert "execution_interrupted" in _messages(entry) and ck.exists()
    _ok(server, graph)
    a, b = load_params(epd / "resume_run.safetensors"), load_params(epd / "resume_ref.safetensors")
    assert_tables_close(a, b)
    assert torch.allclose(a.t_steps, b.t_steps, rtol=0, atol=1e-9)
    assert not ck.exists()


def test_a_local_file_claiming_a_catalogue_entry_is_refused(server):
    other = server.base / "models" / "epd" / ENTRY.filename
    shutil.copy(ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe10.safetensors", other)
    try:
        entry = server.run(_loader_graph(f"[download] {ENTRY.name}"))
        text = _messages(entry)
        assert entry["status"]["status_str"] == "error" and f"not the catalogue's {ENTRY.name}" in text, text
        assert str(server.base) not in text
    finally:
        other.unlink()


@pytest.mark.parametrize("mode", ["drip", "hang"])
def test_a_stalled_download_stops_on_interrupt(server, mirror, mode):
    mirror.mode = mode
    seconds, entry = _seconds_to_stop(server, _loader_graph(f"[download] {ENTRY.name}"), after=1.0)
    print(f"\ndownload from a {mode} mirror: stopped {seconds:.2f} s after /interrupt (before: 214 s, ignored)")
    assert "execution_interrupted" in _messages(entry) and seconds < 2.0, seconds
    assert not (server.base / "models" / "epd" / ENTRY.filename).exists()
    assert not [p for p in (server.base / "models" / "epd").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["port", "ftp"])
def test_a_redirect_elsewhere_is_a_node_error(server, mirror, where):
    mirror.mode = "redirect"
    mirror.target = {"port": "http://127.0.0.1:9/x", "ftp": "ftp://127.0.0.1/x"}[where]
    entry = server.run(_loader_graph(f"[download] {ENTRY.name}"))
    assert entry["status"]["status_str"] == "error" and "refused" in _messages(entry)


def test_a_server_killed_mid_distill_resumes_to_the_same_table(tmp_path):
    """SIGKILL of the whole ComfyUI server during EPD Distill; the same graph on a new server resumes."""
    import signal

    base = tmp_path / "killed"
    epd = base / "models" / "epd"
    ck = epd / "killed_run.epd-checkpoint"
    graph = _distill_graph("killed_run", iterations=24, batch=4, start_check=64)
    with ComfyServer(base) as srv:
        _ok(srv, _distill_graph("killed_ref", iterations=24, batch=4, start_check=64))
        code, _answer = srv.post(graph)
        assert code == 200
        deadline = time.time() + 300
        while checkpoint_iteration(ck) < 4 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(30)
        killed_at = checkpoint_iteration(ck)
    assert 4 <= killed_at < 24 and not (epd / "killed_run.safetensors").exists()
    with ComfyServer(base) as srv:
        _ok(srv, graph)
    print(f"\nserver killed after checkpoint {killed_at}/24; the new server resumed")
    a, b = load_params(epd / "killed_run.safetensors"), load_params(epd / "killed_ref.safetensors")
    assert_tables_close(a, b)
    assert not ck.exists() and not [p for p in epd.iterdir() if p.name.startswith(".")]
