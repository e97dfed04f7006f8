"""The table loader node downloads listed tables when a graph runs, in-process ComfyUI's executor, against the
local mirror (epd_dev.catalogue_mirror); the catalogue itself and downloads are tested in test_catalogue.py."""

from __future__ import annotations

import asyncio

import pytest
import torch

from epd_core import load_params
from epd_core.catalogue import MIRROR_ENV, find_entry, load_catalogue
from epd_core.params import TABLE_NAMES
from epd_dev import ROOT
from epd_dev.catalogue_mirror import assert_same_table, dead_url, local_copy
from epd_dev.shared_data import OFFICIAL

pytestmark = pytest.mark.comfy
CATALOGUE = load_catalogue(ROOT / "weights" / "catalogue.json")
ENTRIES = list(CATALOGUE.values())


class _Server:
    """What ComfyUI's PromptExecutor needs of its server."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def loader_env(comfy_nodes, tmp_path, monkeypatch):
    """In-process ComfyUI with models/epd in a temporary folder that does not exist yet."""
    import execution
    import folder_paths

    epd_dir = tmp_path / "models" / "epd"
    paths, exts = folder_paths.folder_names_and_paths["epd"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(epd_dir)] + list(paths), exts))
    return comfy_nodes, execution, epd_dir


def _graph(table_name: str) -> dict:
    return {
        "1": {"class_type": "EPDParamsLoader", "inputs": {"table_name": table_name}},
        "2": {"class_type": "EPDParamsPreview", "inputs": {"epd_params": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def _options(loader) -> list[str]:
    spec = loader.INPUT_TYPES()["required"]["table_name"]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_loader_downloads_a_listed_table_when_the_graph_runs(loader_env, mirror, monkeypatch):
    nodes, execution, epd_dir = loader_env
    loader = nodes["EPDParamsLoader"]
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    choice = "[download] sd15/tpami-sd15-best"  # listed by model family
    options = _options(loader)
    assert {f"[download] {e.family}/{e.name}" for e in ENTRIES if e.comfyui} <= set(options)
    assert not any("iccv-" in o for o in options)
    assert "demo/analytic-sd15-start-nfe10.safetensors" in options
    assert mirror.requests == [] and not epd_dir.exists()  # listing never downloads

    graph = _graph(choice)
    assert asyncio.run(execution.validate_prompt("p1", graph, None))[0]
    fingerprint = loader.fingerprint_inputs(table_name=choice)
    executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(graph, "p1", {}, ["3"])
    assert executor.success, executor.status_messages
    assert len(mirror.requests) == 1
    # the node's own download does not change its fingerprint: the unchanged graph queued again is cached
    assert loader.fingerprint_inputs(table_name=choice) == fingerprint
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


def test_loader_with_a_bad_mirror_is_a_node_error(loader_env, monkeypatch):
    nodes, execution, epd_dir = loader_env
    monkeypatch.setenv(MIRROR_ENV, dead_url())
    graph = _graph("[download] tpami-flux-best")  # the form before families: saved workflows still load
    assert asyncio.run(execution.validate_prompt("p1", graph, None))[0]
    executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(graph, "p1", {}, ["3"])
    assert not executor.success
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "EPDParamsLoader"
    message = errors[0]["exception_message"]
    assert "tpami-flux-best" in message and "connection refused" in message
    assert not epd_dir.exists()
    with pytest.raises(ValueError, match="connection refused"):  # the pack's own copy of EPDFileError
        nodes["EPDParamsLoader"].execute("[download] tpami-flux-best")


def test_a_download_in_progress_or_left_by_a_stopped_server_is_not_listed(loader_env):
    """A download is written under a hidden folder in models/epd; ComfyUI's listing showed its partial ``.pkl`` (and
    kept showing it after a server stopped mid-download), and the loader accepted the name. Hidden names are not
    tables."""
    import shutil

    comfy_nodes, _, epd_dir = loader_env
    loader = comfy_nodes["EPDParamsLoader"]
    entry = next(e for e in ENTRIES if e.family == "sd15")
    partial = epd_dir / f".{entry.name}.abc123.download" / entry.source_file
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"")
    shutil.copyfile(OFFICIAL / entry.release / entry.source_file, epd_dir / "mine.pkl")
    hidden = f".{entry.name}.abc123.download/{entry.source_file}"
    assert "mine.pkl" in _options(loader) and hidden not in _options(loader)
    assert loader.validate_inputs(table_name="mine.pkl") is True
    assert "not found" in loader.validate_inputs(table_name=hidden)


def test_a_table_rewritten_under_its_name_is_loaded_again(loader_env):
    """ComfyUI caches the loader's result by its input, the file name, unless the node's fingerprint changes: a table
    that EPD Distill (overwrite) or the CLI rewrote under the same name kept being served from the cache. The
    loader's fingerprint is now the file's (path, time, size)."""
    import os
    import shutil

    comfy_nodes, _, epd_dir = loader_env
    loader = comfy_nodes["EPDParamsLoader"]
    epd_dir.mkdir(parents=True)
    path = epd_dir / "mine.pkl"
    shutil.copyfile(OFFICIAL / "tpami" / "sd15-best.pkl", path)
    first = loader.fingerprint_inputs(table_name="mine.pkl")
    assert loader.fingerprint_inputs(table_name="mine.pkl") == first
    shutil.copyfile(OFFICIAL / "tpami" / "sd3-512-best.pkl", path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert loader.fingerprint_inputs(table_name="mine.pkl") != first
    assert loader.fingerprint_inputs(table_name="[download] no-such-table") == "[download] no-such-table"
    # ComfyUI writes the fingerprint into the prompt it embeds in every saved image: no folder of the user's in it
    assert str(epd_dir) not in first and "mine" not in first and len(first) == 64


def test_a_table_rewritten_under_a_linked_name_is_loaded_again(loader_env):
    """A linked table_name (a name from Create List, or a node of type '*') reaches the fingerprint as None, whose
    fingerprint was the constant 'None': ComfyUI served the old table once the file was rewritten. It is now every
    local table's state, unchanged while no table changes."""
    import os
    import shutil

    comfy_nodes, _, epd_dir = loader_env
    loader = comfy_nodes["EPDParamsLoader"]
    epd_dir.mkdir(parents=True)
    path = epd_dir / "mine.pkl"
    shutil.copyfile(OFFICIAL / "tpami" / "sd15-best.pkl", path)
    first = loader.fingerprint_inputs(table_name=None)
    assert loader.fingerprint_inputs(table_name=None) == first
    shutil.copyfile(OFFICIAL / "tpami" / "sd3-512-best.pkl", path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert loader.fingerprint_inputs(table_name=None) != first
    assert str(epd_dir) not in first and len(first) == 64


def test_a_demo_table_by_its_name_from_before_demo_is_that_table(loader_env):
    """Until 2026-11-28 the demo models' tables lay in weights/ itself: workflows saved then name
    ``analytic-sd15-reference-nfe10.safetensors``, which validation refused ("not found") though the pack ships the
    same table as ``demo/analytic-sd15-reference-nfe10.safetensors``. The old name now loads it."""
    comfy_nodes, execution, _ = loader_env
    loader = comfy_nodes["EPDParamsLoader"]
    old, new = "analytic-sd15-reference-nfe10.safetensors", "demo/analytic-sd15-reference-nfe10.safetensors"
    graph = _graph(old)
    assert asyncio.run(execution.validate_prompt("p1", graph, None))[0]
    assert loader.fingerprint_inputs(table_name=old) == loader.fingerprint_inputs(table_name=new)
    (got, info), (ref, _) = loader.execute(old).result, loader.execute(new).result
    assert all(torch.equal(getattr(got, n), getattr(ref, n)) for n in (*TABLE_NAMES, "t_steps"))
    assert got.hyper() == ref.hyper()
    assert "NFE 10" in info
    missing = loader.validate_inputs(table_name="no-such-table.safetensors")
    assert "not found" in missing and "refresh its list" in missing  # and what to do
    with pytest.raises(ValueError, match="not found in .*refresh its list"):  # a file gone after validation
        loader.execute("no-such-table.safetensors")


_TWO_COPIES = """
import asyncio, json, logging, sys
from epd_dev.comfy_harness import comfyui_path
sys.path.insert(0, str(comfyui_path()))
import comfy.cli_args
comfy.cli_args.args.cpu = True
import utils.extra_config, utils.install_util
import folder_paths, nodes
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("epd").addHandler(handler)
for copy in sys.argv[1:-1]:
    assert asyncio.run(nodes.load_custom_node(copy))
loader = nodes.NODE_CLASS_MAPPINGS["EPDParamsLoader"]
loader.INPUT_TYPES()
print(json.dumps({"module": loader.RELATIVE_PYTHON_MODULE, "table": folder_paths.get_full_path("epd", sys.argv[-1]),
                  "warnings": warnings}))
"""


def test_two_installed_copies_read_the_tables_of_the_copy_whose_nodes_comfyui_keeps(tmp_path):
    """An old clone beside a new one (``epd_solver`` and Manager's ``comfyui-epd-solver``): ComfyUI keeps the nodes
    of the copy it loads last, while the first copy's ``weights/`` came first in the ``epd`` folders, so the new
    nodes loaded the old copy's bundled tables (and the reverse). Each copy's tables follow its nodes; a warning
    names both copies. A process of its own (about 20 s, importing ComfyUI): the session's ComfyUI must not get a
    second copy's nodes."""
    import json
    import shutil
    import subprocess
    import sys

    name = "demo/analytic-sd15-start-nfe10.safetensors"
    copies = [tmp_path / "custom_nodes" / folder for folder in ("epd_solver", "comfyui-epd-solver.v2")]
    for copy in copies:
        copy.mkdir(parents=True)
        for part in ("__init__.py", "nodes", "epd_core", "weights"):
            (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, copy / part)  # fmt: skip
    shutil.copy(ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5.safetensors", copies[0] / "weights" / name)
    run = subprocess.run([sys.executable, "-c", _TWO_COPIES, *map(str, copies), name], cwd=ROOT,  # noqa: S603
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["module"] == "custom_nodes.comfyui-epd-solver.v2"
    assert got["table"] == str(copies[1] / "weights" / name)
    assert len(got["warnings"]) == 1 and str(copies[0]) in got["warnings"][0] and str(copies[1]) in got["warnings"][0]
