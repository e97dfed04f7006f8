"""The pack as the Comfy registry sees it: metadata, `comfy node validate`, `comfy node pack`, security rules."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomlkit  # comfy-cli's; tomllib is Python 3.11+ and the README's quick start runs on 3.10

import epd_core

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(sys.executable).with_name("comfy")


def test_pyproject_metadata():
    meta = tomlkit.parse((ROOT / "pyproject.toml").read_text()).unwrap()
    project = meta["project"]
    assert "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and all(p.isdigit() for p in project["version"].split("."))
    assert project["version"] == epd_core.__version__  # the registry reads pyproject; the core stamps its files
    assert isinstance(project["license"], dict) and project["description"]
    assert "Repository" in project["urls"]
    assert not any(dep.startswith("torch") for dep in project["dependencies"])
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    assert sorted(project["dependencies"]) == sorted(reqs)
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "includes"} <= set(comfy)
    assert {"weights", "demo_models", "example_workflows"} <= set(comfy["includes"])
    assert comfy["requires-comfyui"] == ">=0.3.75"  # the oldest tree the tests run on; older ones lack the node API


def test_comfy_node_validate_and_pack(tmp_path):
    clone = tmp_path / "epd_solver"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)  # noqa: S603, S607
    product = (
        "nodes",
        "epd_core",
        "web",
        "weights",
        "demo_models",
        "example_workflows",
        "__init__.py",
        "pyproject.toml",
    )
    for path in product:
        src = ROOT / path  # the working tree, so the test also checks uncommitted edits
        dst = clone / path
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    env = {"PATH": str(COMFY.parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run([str(COMFY), "--skip-prompt", "tracking", "disable"], cwd=clone, env=env, capture_output=True)  # noqa: S603
    validate = subprocess.run([str(COMFY), "--skip-prompt", "node", "validate"], cwd=clone, env=env,  # noqa: S603
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert validate.returncode == 0 and "checks passed" in validate.stdout + validate.stderr, validate.stderr
    pack = subprocess.run([str(COMFY), "--skip-prompt", "node", "pack"], cwd=clone, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pack.returncode == 0, pack.stdout + pack.stderr
    with zipfile.ZipFile(clone / "node.zip") as zf:
        names = set(zf.namelist())
    for required in ("__init__.py", "pyproject.toml", "nodes/nodes_sampling.py", "nodes/sampling.py",
                     "epd_core/solver.py", "epd_core/safe_pickle.py",
                     "example_workflows/api/epd_mnist_demo.json", "web/epd_saved_workflows.js"):  # fmt: skip
        assert required in names, required
    assert any(n.startswith("weights/") and n.endswith(".safetensors") for n in names)
    assert "weights/catalogue.json" in names  # the loader lists and fetches published tables from it
    assert "demo_models/digits-unet.safetensors" in names  # EPD Demo Digits Model loads it
    assert not any(n.endswith(".pkl") for n in names), "the authors' files must never be bundled"


NEW_MODULES = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}  # the standard library's modules since Python 3.10


def test_sources_run_on_the_oldest_python_the_pack_declares():
    """``requires-python`` and the README's quick start say Python 3.10+: no syntax or standard-library module of a
    later Python in any source (tests/test_packaging.py imported ``tomllib``, 3.11+, so on 3.10 the whole suite
    stopped at collection)."""
    oldest = tomlkit.parse((ROOT / "pyproject.toml").read_text()).unwrap()["project"]["requires-python"]
    version = tuple(int(part) for part in oldest.removeprefix(">=").split("."))
    assert version == (3, 10) and "3.10+" in (ROOT / "README.md").read_text()
    tops = [p for p in ROOT.iterdir() if not p.name.startswith(".")]  # not the environments
    sources = [p for top in tops for p in (top.rglob("*.py") if top.is_dir() else [top]) if p.suffix == ".py"]
    assert len(sources) > 100
    for path in sources:
        tree = ast.parse(path.read_text(), feature_version=version)
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            late = [n for n in names if NEW_MODULES.get(n, version) > version]
            assert not late, f"{path.relative_to(ROOT)}: {late} needs a newer Python than {oldest}"


def test_readme_names_every_package_the_product_imports():
    """The install section's list of run-time dependencies is what the product imports beside the standard library
    and ComfyUI (it named torch, numpy and safetensors; the nodes also import Pillow and tqdm)."""
    import re

    comfyui = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths"}
    pip_names = {"PIL": "Pillow"}
    imported = set()
    for path in list((ROOT / "epd_core").glob("*.py")) + list((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            imported |= {name.split(".")[0] for name in names}
    packages = {pip_names.get(n, n) for n in imported - set(sys.stdlib_module_names) - comfyui - {"__future__"}}
    sentence = re.search(r"^Run-time dependencies are (.*?), which ComfyUI", (ROOT / "README.md").read_text(), re.M)
    assert packages <= set(re.findall(r"\w+", sentence.group(1))), packages


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_eval_exec_or_unsafe_pickle_in_the_product():
    """Belt and braces beside ruff's S102/S307/S301: no dynamic code, unpickling or subprocess in the product."""
    banned_calls = {"eval", "exec", "compile", "pickle.load", "pickle.loads", "pickle.Unpickler", "torch.load",
                    "os.system", "os.popen", "__import__"}  # fmt: skip
    banned_imports = {"subprocess", "pickle", "marshal", "shelve"}
    for path in list((ROOT / "epd_core").glob("*.py")) + list((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                assert _dotted(node.func) not in banned_calls, f"{path.name}: {_dotted(node.func)}"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & banned_imports, path.name
            if isinstance(node, ast.ImportFrom):
                assert node.module not in banned_imports, path.name


@pytest.mark.parametrize("trees", ["0.33", "033", "0.3.75,0.4", " "])
def test_test_script_refuses_an_unknown_or_empty_tree_list(trees):
    """A mistyped EPD_TREES must fail CI, not pass it having run nothing (it exits before installing anything)."""
    env = {"PATH": "/usr/bin:/bin", "EPD_TREES": trees}
    run = subprocess.run(["bash", "scripts/test.sh", "tests/test_packaging.py"], cwd=ROOT, env=env,  # noqa: S603, S607
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "EPD_TREES" in run.stderr and "0.3.75, 0.33.0" in run.stderr


def test_test_script_combines_a_marker_with_the_033_selection():
    """``-m EXPR`` narrows both runs: the 0.33 run keeps its "not core" and collects nothing for ``-m core``
    (pytest's 5, accepted for a narrowed selection); an exported COMFYUI_PATH does not leak into the 0.3.75 run. Both
    trees, whatever EPD_TREES the suite itself was started with."""
    env = {k: v for k, v in os.environ.items() if k != "EPD_TREES"} | {"COMFYUI_PATH": "/nonexistent"}
    run = subprocess.run(["bash", "scripts/test.sh", "-m", "core", "--collect-only", "-q"], cwd=ROOT, env=env,  # noqa: S603, S607
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    core = sum(1 for line in run.stdout.splitlines() if line.startswith("tests/test_core_"))
    assert core > 0
    assert "no tests collected" in out, out[-3000:]


@pytest.mark.parametrize("script", ["run_demo", "make_thumbnails", "make_weights", "make_workflows", "gpu_check"])
def test_scripts_that_rewrite_tracked_files_answer_help_without_running(script):
    """``--help`` prints the usage and writes nothing (run_demo, make_thumbnails, make_workflows and gpu_check ran their
    whole job; make_workflows first deleted every example)."""
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: S603, S607
    run = subprocess.run([sys.executable, "-m", f"scripts.{script}", "--help"], cwd=ROOT, capture_output=True,  # noqa: S603
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout == before  # noqa: S603, S607


def test_make_weights_refuses_a_name_it_does_not_make():
    """A mistyped table name is an error (exit 2, naming it), not a silent run that only rewrites the README."""
    readme = (ROOT / "weights" / "README.md").read_bytes()
    run = subprocess.run([sys.executable, "-m", "scripts.make_weights", "analytic-sd15-nfe5"], cwd=ROOT,  # noqa: S603
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert "not a table this script makes: analytic-sd15-nfe5" in run.stderr
    assert (ROOT / "weights" / "README.md").read_bytes() == readme


def test_each_bundled_mnist_tables_command_writes_its_name():
    """Three tables recorded a --suffix that wrote another file's name (two their own --init table's): run as
    recorded, they would overwrite the table they start from."""
    import shlex

    from epd_core import load_params

    for path in sorted((ROOT / "weights" / "demo").glob("mnist-*.safetensors")):
        command = load_params(path).metadata.get("command", "")
        if not command.startswith("python -m scripts.make_mnist_tables "):
            continue
        values: dict[str, list[str]] = {}
        for arg in shlex.split(command)[3:]:  # each option's values, as argparse reads them
            if arg.startswith("--"):
                name, _, inline = arg.partition("=")
                values[name] = [inline] if inline else []
            else:
                values[name].append(arg)
        suffix = values.get("--suffix", [""])[0]
        names = {f"mnist-{k}-nfe{n}{suffix}.safetensors" for k in values["--kinds"] for n in values["--nfes"]}
        assert path.name in names, (path.name, command)


def test_readme_names_the_benchmarks_bench_all_runs(tmp_path):
    """The README's headline paragraph names the benchmarks bench.all runs: it said "every accuracy benchmark
    below", while bench.defaults, bench.unseen, bench.diagnose and bench.rdpo are not among them."""
    import re

    from bench import all as bench_all

    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("**Headline.** `python -m bench.all` runs") :].split("\n\n")[0]
    named = re.search(r"runs the benchmarks of the headline and the plugin table, (.*?) \(", paragraph, re.S).group(1)
    runs = [module.__name__ for _, module, _ in bench_all.plan(tmp_path, False, None)]
    assert re.findall(r"`(bench\.\w+)`", named) == runs


def test_fixtures_named_in_the_marker_descriptions_exist():
    """pytest.ini's comfy marker said ComfyUI is started by "the comfy fixture"; the fixture is comfy_nodes."""
    import configparser
    import re

    markers = configparser.ConfigParser()
    markers.read(ROOT / "pytest.ini")
    named = re.findall(r"by the (\w+) fixture", markers["pytest"]["markers"])
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert named and all(re.search(rf"^def {name}\(", conftest, re.M) for name in named), named
