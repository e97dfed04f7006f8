"""Shared fixtures: the test layers, ComfyUI in-process (started once, by the first test that needs it), the
authors' files and reference trajectories in ../shared (epd_dev.shared_data), the local catalogue mirror."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch

from epd_dev.catalogue_mirror import Mirror
from epd_dev.shared_data import OFFICIAL, REFERENCE

LAYERS = ("core", "comfy", "server", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one layer (``pytestmark`` of its module), so ``-m core`` etc. split the suite."""
    for item in items:
        layers = sorted({m.name for m in item.iter_markers() if m.name in LAYERS})
        if len(layers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one layer marker of {LAYERS}, has {layers}")


@pytest.fixture(scope="session", autouse=True)
def _shared_present() -> None:
    if not OFFICIAL.is_dir() or not REFERENCE.is_dir():
        pytest.fail(f"test data missing: expected {OFFICIAL} and {REFERENCE} (set EPD_SHARED)")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tests run on tiny tensors, where a second intra-op thread gains nothing; on a busy machine the threads
    wait on each other at every small op (the core layer took 15 minutes instead of 2 on the shared 2-core
    machine, and the other layers were slowed alike). ComfyUI servers started by the tests keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def comfy_nodes() -> Mapping[str, type]:
    """ComfyUI in-process on the CPU with this pack loaded through its own loader; the pack's node classes by id
    (also readable as ``epd_dev.comfy_harness.NODES`` once this fixture has run)."""
    from epd_dev import comfy_harness

    comfy_harness.setup()
    return comfy_harness.NODES


@pytest.fixture
def few_held_out(comfy_nodes: Mapping[str, type], monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved table's held-out errors on 2 noises, not 64, where that check is not the question: the same code,
    and most of a short training test's time was those 64 noises' teachers (the 64 are tested in
    test_core_distill.py)."""
    from epd_dev import comfy_harness

    monkeypatch.setattr(comfy_harness.pack_module("epd_core.distill"), "HELD_OUT", 2)


@pytest.fixture(scope="module")
def _mirror() -> Iterator[Mirror]:
    m = Mirror()
    yield m
    m.close()


@pytest.fixture
def mirror(_mirror: Mirror) -> Mirror:
    """The local mirror of the authors' repository, answering correctly and with no requests recorded yet."""
    _mirror.mode = "ok"
    _mirror.requests.clear()
    return _mirror
