"""The example workflows in a real browser: ComfyUI's own frontend in headless Chromium (epd_dev.browser).

Each workflow is fetched from the template route and loaded as the template browser does; then every node must
resolve, every widget must hold the value the file means (the saved list, and by name the API twin's inputs; the
"control after generate" values stay "fixed"), no two nodes may overlap and none may be smaller than the frontend
needs. The no-download demo is queued from the page and its grid image must come back and be shown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import pytest
from PIL import Image

from epd_dev import ROOT
from epd_dev.browser import CHROMIUM, WORKFLOWS, browse
from epd_dev.comfy_server import ComfyServer

pytestmark = pytest.mark.browser
DEMO = WORKFLOWS[0]  # the file names order the templates: the demo that needs no download comes first
SAVED = sorted((ROOT / "tests" / "saved_workflows").glob("*.json"))  # saved by earlier versions of the pack


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_example_workflows_load_as_saved_and_the_demo_runs_from_the_page(tmp_path):
    if CHROMIUM is None:
        pytest.fail("Chromium is required (apt-get install chromium); scripts/setup_env.sh installs it as root")
    assert json.loads(DEMO.read_text())["extra"]["epd_api"] == "api/epd_mnist_demo.json"
    shots = tmp_path / "shots"
    shots.mkdir()
    with ComfyServer(tmp_path / "base", frontend=True) as server:
        templates = server.get("/workflow_templates")
        results = asyncio.run(browse(server.url + "/", shots, run=DEMO, saved=tuple(SAVED)))
        history = server.get("/history")
    assert sorted(templates["epd_solver"]) == [p.stem for p in WORKFLOWS]
    for node in ("EPDParamsLoader", "EPDSampler", "EPDScheduler", "EPDKSampler", "EPDPlugin", "EPDDistill",
                 "EPDRDPO", "EPDParamsPreview", "EPDAnalyticModel", "EPDImageGrid", "EPDMnistModel"):  # fmt: skip
        assert node in results["registered"], node
    compared = overlaps = 0
    for path in WORKFLOWS:
        saved = json.loads(path.read_text())
        api = json.loads((ROOT / "example_workflows" / saved["extra"]["epd_api"]).read_text())
        loaded = {str(n["id"]): n for n in results[path.stem]["nodes"]}  # newer frontends keep ids as strings
        assert sorted(loaded) == sorted(str(n["id"]) for n in saved["nodes"]), path.name
        assert [n["type"] for n in saved["nodes"]].count("Note") == 1, path.name
        for node in saved["nodes"]:
            got, where = loaded[str(node["id"])], (path.stem, node["id"], node["type"])
            assert got["type"] == node["type"] and not got["missing"], where
            values = [w["value"] for w in got["widgets"]]
            assert len(values) == len(node["widgets_values"]), (where, values, node["widgets_values"])
            assert all(map(_same, values, node["widgets_values"])), (where, values, node["widgets_values"])
            by_name = {w["name"]: w["value"] for w in got["widgets"]}
            if node["type"] == "Note":
                assert values == [saved["nodes"][-1]["widgets_values"][0]] and "Needs" in values[0], where
            else:
                intended = {k: v for k, v in api[str(node["id"])]["inputs"].items() if not isinstance(v, list)}
                assert set(intended) <= set(by_name), (where, sorted(by_name))
                for key, value in intended.items():
                    assert _same(by_name[key], value), (where, key, by_name[key], value)
                extra = {k: v for k, v in by_name.items() if k not in intended}
                assert all(v == "fixed" and "control" in k for k, v in extra.items()), (where, extra)
            compared += len(values)
            if got["min_size"] is not None:
                assert got["size"][0] >= got["min_size"][0] and got["size"][1] >= got["min_size"][1], (where, got)
        for a, b in itertools.combinations(results[path.stem]["nodes"], 2):
            if _overlap(a["bounding"], b["bounding"]):
                overlaps += 1
                print(f"{path.stem}: {a['type']} #{a['id']} {a['bounding']} overlaps {b['type']} #{b['id']} "
                      f"{b['bounding']}")  # fmt: skip
        assert (shots / f"{path.stem}.png").stat().st_size > 10_000
    print(f"\n{len(WORKFLOWS)} workflows, {compared} widget values compared, {overlaps} overlapping node pairs")
    assert overlaps == 0

    # Workflows saved by earlier versions: each saved value on the widget it was saved for (web/, by name)
    assert SAVED
    for path in SAVED:
        expected = json.loads(path.read_text())["extra"]["epd_expected"]
        loaded = {str(n["id"]): {w["name"]: w["value"] for w in n["widgets"]} for n in results[path.stem]["nodes"]}
        for node, widgets in expected.items():
            wrong = {k: (loaded[node].get(k), v) for k, v in widgets.items() if not _same(loaded[node].get(k), v)}
            assert not wrong, (path.name, node, wrong)  # name: (loaded, saved)

    # The demo queued from the page: its PreviewImage received the grid, the page shows it, the history has it.
    api = json.loads((ROOT / "example_workflows" / "api" / "epd_mnist_demo.json").read_text())
    (preview,) = [k for k, v in api.items() if v["class_type"] == "PreviewImage"]
    run = results["run"]
    (image,) = run["outputs"][preview]["images"]
    assert [s["type"] for s in run["shown"]] == ["PreviewImage"], run["shown"]
    (entry,) = history.values()
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"][preview]["images"] == [image]
    with Image.open(tmp_path / "base" / image["type"] / image.get("subfolder", "") / image["filename"]) as grid:
        assert (grid.width, grid.height) == (run["shown"][0]["width"], run["shown"][0]["height"])
        rows = api[preview]["inputs"]["images"][0]
        assert grid.height > 6 * 84 and grid.width > 10 * 84, (grid.size, rows)  # six rows of ten 84-px digits
    print(f"queued from the page: {image['filename']} {grid.width}x{grid.height}, shown by PreviewImage")
