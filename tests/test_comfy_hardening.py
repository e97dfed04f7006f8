"""Hardening through the real server: bad graphs, a long queue, determinism across runs and processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epd_dev import ROOT
from epd_dev.comfy_server import ComfyServer
from epd_dev.shared_data import official_path

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
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_hard")
    (base / "models" / "epd").mkdir(parents=True)
    shutil.copy(official_path("sd3-512-best.pkl"), base / "models" / "epd" / "sd3-512-best.pkl")
    with ComfyServer(base) as srv:
        yield srv


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
