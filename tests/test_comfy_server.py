"""A real ComfyUI server over HTTP with the pack in custom_nodes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import epd_core
from epd_core.schedules import sd15_alphas_cumprod
from epd_dev import ROOT
from epd_dev.comfy_server import ComfyServer

pytestmark = pytest.mark.server
API = ROOT / "example_workflows" / "api"
RUNNABLE = [
    API / f"{name}.json"
    for name in (
        "epd_mnist_demo",
        "epd_analytic_demo",
        "epd_sampler_custom_advanced",
        "epd_plugin_dpmpp_2m",
        "epd_distill_analytic",
    )
]
NEEDS_DOWNLOADS = [p for p in sorted(API.glob("*.json")) if p not in RUNNABLE]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    with ComfyServer(base) as srv:
        yield srv


def _latents(server, prefix: str) -> torch.Tensor:
    (path,) = sorted((server.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


def test_nodes_registered(server):
    info = server.get("/object_info")
    for node in ("EPDParamsLoader", "EPDSampler", "EPDScheduler", "EPDKSampler", "EPDAnalyticModel"):
        assert node in info, node
        assert info[node]["description"]
    spec = info["EPDParamsLoader"]["input"]["required"]["table_name"]
    tables = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert "demo/analytic-sd15-start-nfe10.safetensors" in tables
    assert "[download] sd15/tpami-sd15-best" in tables  # the catalogue's ComfyUI tables, fetched when a graph runs


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_example_workflows_run(server, path):
    entry = server.run(json.loads(path.read_text()))
    assert entry["status"]["status_str"] == "success", entry["status"]


@pytest.mark.parametrize("path", NEEDS_DOWNLOADS, ids=lambda p: p.stem)
def test_checkpoint_workflows_only_miss_their_files(server, path):
    """Every node type resolves; validation fails only on the model and table files this machine lacks."""
    graph = json.loads(path.read_text())
    info = server.get("/object_info")
    assert all(node["class_type"] in info for node in graph.values())
    code, answer = server.post(graph)
    assert code == 400
    missing = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "vae_name", "table_name"}
    for node_error in answer["node_errors"].values():
        for err in node_error["errors"]:
            assert err["extra_info"]["input_name"] in missing, err
            # the loader checks its own choice (a "[download]" entry stays valid once downloaded)
            own_check = err["extra_info"]["input_name"] == "table_name"
            assert err["type"] == ("custom_validation_failed" if own_check else "value_not_in_list"), err
            assert not own_check or "not found" in err["details"], err


def test_ui_workflows_match_api_twins(server):
    """The UI-format files (named by their titles) list the same nodes and links as their API twins, plus one Note,
    in node types the server knows."""
    info = server.get("/object_info")
    uis = {p: json.loads(p.read_text()) for p in sorted((ROOT / "example_workflows").glob("*.json"))}
    assert sorted(ui["extra"]["epd_api"] for ui in uis.values()) == sorted(f"api/{p.name}" for p in API.glob("*.json"))
    for ui in uis.values():
        api_path = ROOT / "example_workflows" / ui["extra"]["epd_api"]
        api = json.loads(api_path.read_text())
        assert [n["type"] for n in ui["nodes"] if n["type"] not in info] == ["Note"]
        nodes = {str(n["id"]): n["type"] for n in ui["nodes"] if n["type"] != "Note"}
        assert nodes == {k: v["class_type"] for k, v in api.items()}
        api_links = {(v[0], v[1], k, name) for k, node in api.items() for name, v in node["inputs"].items()
                     if isinstance(v, list)}  # fmt: skip
        by_id = {n["id"]: n for n in ui["nodes"]}
        ui_links = {(str(lk[1]), lk[2], str(lk[3]), by_id[lk[3]]["inputs"][lk[4]]["name"]) for lk in ui["links"]}
        assert ui_links == api_links, api_path.name


def test_demo_result_equals_core(server):
    graph = json.loads((API / "epd_analytic_demo.json").read_text())
    graph["5"]["inputs"]["filename_prefix"] = "latents/core_check"
    assert server.run(graph)["status"]["status_str"] == "success"
    got = _latents(server, "core_check").double()
    batch = graph["3"]["inputs"]["batch_size"]
    noise = torch.randn([batch, 4, 8, 8], generator=torch.manual_seed(graph["4"]["inputs"]["seed"]))
    params = epd_core.load_params(ROOT / "weights" / graph["2"]["inputs"]["table_name"])
    ac = 1.0 / (1.0 + ((1 - sd15_alphas_cumprod()) / sd15_alphas_cumprod()).float().double())
    sigmas = epd_core.make_schedule(params, alphas_cumprod=ac).float().double()  # SIGMAS are float32 in ComfyUI
    inputs = graph["4"]["inputs"]
    assert (inputs["final_denoise"], inputs["final_step"]) == (True, "estimate")  # EPD KSampler's defaults
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    gm = epd_core.GaussianMixture.reference()
    x = noise.double() * (1 + float(sigmas[0]) ** 2) ** 0.5
    core = epd_core.sample(gm.denoise_ve, x, sigmas, params, final="estimate")
    assert torch.allclose(got, core, rtol=1e-4, atol=1e-4), (got - core).abs().max()


def test_bad_table_is_a_node_error_and_server_goes_on(server):
    (server.base / "models" / "epd" / "hostile.pkl").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/x'\ntR.")
    graph = json.loads((API / "epd_sampler_custom_advanced.json").read_text())
    bad = json.loads(json.dumps(graph))
    bad["2"]["inputs"]["table_name"] = "hostile.pkl"
    entry = server.run(bad)
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "hostile.pkl" in messages and "forbidden global" in messages
    missing = {**graph, "2": {**graph["2"], "inputs": {"table_name": "missing.safetensors"}}}
    code, answer = server.post(missing)
    if code == 200:  # validated at run time: must still be a node error naming the table
        entry = server.run(missing)
        assert entry["status"]["status_str"] == "error"
        assert "missing.safetensors" in json.dumps(entry["status"]["messages"])
    else:
        assert code == 400 and "missing.safetensors" in json.dumps(answer)
    assert server.run(graph)["status"]["status_str"] == "success"


def test_distill_with_the_mnist_feature_loss_over_http(server):
    """EPD MNIST Features into EPD Distill's feature_encoder: the table saved with its loss recorded, and used."""
    graph = {
        "1": {"class_type": "EPDMnistModel", "inputs": {"which": "eps"}},
        "2": {"class_type": "EPDMnistClass", "inputs": {"digit": "0-9"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 112, "height": 112, "batch_size": 10}},
        "4": {"class_type": "EPDMnistFeatures", "inputs": {}},
        "5": {"class_type": "EPDDistill", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "cfg": 3.0,
            "nfe": 4, "points": 2, "teacher": "dpm2", "teacher_steps": 1, "iterations": 2, "batch": 10,
            "learning_rate": 0.01, "seed": 0, "learn_grid": False, "filename": "mnist_features", "overwrite": True,
            "objective": "global", "feature_encoder": ["4", 0], "feature_weight": 0.5, "start_check": 16}},
        "6": {"class_type": "EPDKSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "cfg": 3.0, "positive": ["2", 0], "negative": ["2", 1],
            "latent_image": ["3", 0], "epd_params": ["5", 0], "denoise": 1.0, "parallel": "auto",
            "final_denoise": False}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/mnist_features"}},
    }  # fmt: skip
    entry = server.run(graph)
    errors = [m[1].get("exception_message") for m in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "success", errors
    table = epd_core.load_params(server.base / "models" / "epd" / "mnist_features.safetensors")
    (report,) = entry["outputs"]["5"]["text"]  # the report is in the history API, with nothing wired to info
    assert "saved" in report and "mnist_features.safetensors" in report
    assert table.metadata["feature_loss"] == {"encoder": "mnist_classifier", "weight": 0.5}
    assert table.nfe == 4 and table.metadata["distilled"]["iterations"] == 2
    got = _latents(server, "mnist_features")
    assert got.shape == (10, 4, 14, 14) and torch.isfinite(got).all()


def _training(filename: str, learning_rate: float = 0.01, overwrite: bool = False) -> dict:
    """EPD Distill on the analytic model, a few seconds' run."""
    return {
        "1": {"class_type": "EPDAnalyticModel", "inputs": {"form": "sd15_eps", "mixture": "reference", "shift": 0.0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "EPDDistill", "inputs": {
            "model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "latent_image": ["2", 0], "cfg": 1.0,
            "nfe": 4, "points": 2, "teacher": "heun", "teacher_steps": 1, "iterations": 2, "batch": 4,
            "learning_rate": learning_rate, "seed": 0, "learn_grid": False, "filename": filename,
            "overwrite": overwrite, "start_check": 0, "keep_best": 0}},
    }  # fmt: skip


def test_a_training_whose_table_was_deleted_trains_again(server):
    """ComfyUI caches an unchanged node: queued again after its table was deleted, EPD Distill showed the old report
    ('saved models/epd/...') and no file came back. Unchanged, with its table in place, it is still not rerun."""
    graph = _training("deleted_then_queued")
    path = server.base / "models" / "epd" / "deleted_then_queued.safetensors"
    assert server.run(graph)["status"]["status_str"] == "success" and path.exists()
    state = path.stat().st_mtime_ns
    again = server.run(graph)
    assert again["status"]["status_str"] == "success" and path.stat().st_mtime_ns == state  # cached, not retrained
    path.unlink()
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert path.exists() and "saved models/epd/deleted_then_queued.safetensors" in entry["outputs"]["3"]["text"][0]
    state = path.stat().st_mtime_ns
    assert server.run(graph)["status"]["status_str"] == "success" and path.stat().st_mtime_ns == state


def test_a_table_overwritten_by_a_run_of_other_settings_trains_again(server):
    """Learning rate A, then a graph training A and B (overwrite, the same filename), then A again: ComfyUI kept A's
    run and its report ('saved ...') while the file held B's table (any cache keeping A: the default, --cache-lru).
    A trains again; queued once more, it is ComfyUI's cached run."""
    a, b = (_training("overwritten_runs", lr, overwrite=True) for lr in (0.01, 0.05))
    both = {**a, "4": {**b["3"], "inputs": {**b["3"]["inputs"], "model": a["3"]["inputs"]["model"]}}}
    path = server.base / "models" / "epd" / "overwritten_runs.safetensors"
    for graph, lr in ((a, 0.01), (both, 0.05), (a, 0.01)):
        assert server.run(graph)["status"]["status_str"] == "success"
        assert epd_core.load_params(path).metadata["distilled"]["lr"] == lr
    state = path.stat().st_mtime_ns
    assert server.run(a)["status"]["status_str"] == "success" and path.stat().st_mtime_ns == state


def test_a_training_queued_with_an_input_it_no_longer_has_trains_again_once_deleted(server):
    """An API prompt from before EPD Distill's nfe, updated with nfe but still holding steps and afs: ComfyUI gives
    the fingerprint only the node's inputs, while the run saved under all the prompt's, so the fingerprint stayed
    '0' and a deleted table was ComfyUI's cached run ('saved ...', no file). Extra keys are left out of both."""
    graph = _training("extra_inputs")
    graph["3"]["inputs"].update(steps=3, afs=False)
    path = server.base / "models" / "epd" / "extra_inputs.safetensors"
    assert server.run(graph)["status"]["status_str"] == "success" and path.exists()
    path.unlink()
    assert server.run(graph)["status"]["status_str"] == "success" and path.exists()


def test_a_training_whose_linked_filename_was_deleted_trains_again(server):
    """filename fed by a String node: ComfyUI gives the fingerprint None for a linked input, which looked up a table
    named 'None', so queued again after its table was deleted EPD Distill showed the cached 'saved ...' and no file
    came back. It trains again; queued once more, it is ComfyUI's cached run."""
    graph = _training("linked_filename")
    graph["4"] = {"class_type": "PrimitiveString", "inputs": {"value": "linked_filename"}}
    graph["3"]["inputs"]["filename"] = ["4", 0]
    path = server.base / "models" / "epd" / "linked_filename.safetensors"
    assert server.run(graph)["status"]["status_str"] == "success" and path.exists()
    path.unlink()
    assert server.run(graph)["status"]["status_str"] == "success" and path.exists()
    state = path.stat().st_mtime_ns
    assert server.run(graph)["status"]["status_str"] == "success" and path.stat().st_mtime_ns == state
