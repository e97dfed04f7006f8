"""Loading the published files, the project's format, and refusing hostile or broken files."""

from __future__ import annotations

import errno
import io
import os
import pickle
import struct
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import epd_core
from epd_core import EPDFileError, EPDParams, load_params, make_schedule, sample, save_params
from epd_core.__main__ import main as cli_main
from epd_core.files import MAX_FILE_BYTES
from epd_dev.shared_data import official_files, official_path

pytestmark = pytest.mark.core

OFFICIAL = official_files()
TABLES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")


def test_all_published_files_load():
    assert len(OFFICIAL) == 43
    for path in OFFICIAL:
        p = load_params(path)
        assert p.r_params.shape == (p.num_steps - 1, p.num_points)
        assert p.metadata["source_file"] == path.name
        assert len(p.metadata["source_sha256"]) == 64


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.stem)
def test_cli_info_every_file(path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["info", str(path)]) == 0
    text = out.getvalue()
    p = load_params(path)
    assert f"NFE: {p.nfe}" in text
    assert f"schedule_type:   {p.schedule_type}" in text
    assert len([line for line in text.splitlines() if line[:4].strip().isdigit()]) == (p.num_steps - 1) * p.num_points


def test_pkl_save_load_roundtrip(tmp_path):
    for path in OFFICIAL:
        p = load_params(path)
        dst = save_params(p, tmp_path / f"{path.stem}.safetensors")
        q = load_params(dst)
        for name in TABLES:
            a, b = getattr(p, name), getattr(q, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert p.hyper() == q.hyper()
        assert q.metadata["source_sha256"] == p.metadata["source_sha256"]
        assert q.metadata["created_by"].startswith("epd_core")
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(f"{p.stem}.safetensors" for p in OFFICIAL)


def test_saved_table_whose_header_length_starts_like_a_pickle(tmp_path):
    """A safetensors header of 128 mod 256 bytes makes the file start with 0x80, the pickle marker."""
    p = load_params(official_path("sd3-512-best.pkl"))
    for pad in range(0, 512, 8):
        path = save_params(p.replace(metadata={**p.metadata, "note": "x" * pad}), tmp_path / "t.safetensors")
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    q = load_params(path)
    assert torch.equal(q.r_params, p.r_params) and q.metadata["note"] == "x" * pad


def test_roundtrip_samples_identically(tmp_path):
    gm = epd_core.GaussianMixture.reference()
    for name in ("sd15-best.pkl", "00018-cifar10-4-5-ipndm-uni1.0-afs.pkl", "flux-best.pkl"):
        p = load_params(official_path(name))
        q = load_params(save_params(p, tmp_path / "t.safetensors"))
        den = gm.denoise_flow if p.is_flow else gm.denoise_ve
        grid = make_schedule(p)
        assert torch.equal(grid, make_schedule(q))
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * grid[0]
        assert torch.equal(sample(den, x, grid, p), sample(den, x, grid, q))


def test_cli_convert(tmp_path):
    src = official_path("sd3-512-best.pkl")
    dst = tmp_path / "sd3.safetensors"
    with redirect_stdout(io.StringIO()):
        assert cli_main(["convert", str(src), str(dst)]) == 0
    assert torch.equal(load_params(dst).r_params, load_params(src).r_params)


def test_saved_table_with_own_grid(tmp_path):
    p = load_params(official_path("00002-cifar10-4-5-epd-uni1.0-afs.pkl"))
    grid = torch.tensor([80.0, 10.0, 1.0, 0.01], dtype=torch.float64)
    q = load_params(save_params(p.replace(t_steps=grid), tmp_path / "g.safetensors"))
    assert torch.equal(make_schedule(q), grid)


# --- hostile pickles -------------------------------------------------------------------------


class _Reduce:
    """Pickles as ``fn(*args)``: the shape every code-execution payload takes."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _sentinel_cmd(sentinel: Path) -> str:
    return f"touch {sentinel}"


def _assert_refused(path: Path, sentinel: Path | None = None, expect: str | None = None) -> EPDFileError:
    before = sorted(os.listdir(path.parent))
    with pytest.raises(EPDFileError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    if expect:
        assert expect in str(info.value)
    if sentinel is not None:
        assert not sentinel.exists(), "payload ran"
    assert sorted(os.listdir(path.parent)) == before, "loading wrote a file"
    return info.value


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "payload",
    ["os_system", "subprocess", "builtins_eval", "builtins_exec"],
)
def test_top_level_code_execution_refused(tmp_path, payload):
    import builtins
    import subprocess

    sentinel = tmp_path / "pwned"
    cmd = _sentinel_cmd(sentinel)
    fn, args = {
        "os_system": (os.system, (cmd,)),
        "subprocess": (subprocess.call, (["sh", "-c", cmd],)),
        "builtins_eval": (builtins.eval, (f"__import__('os').system({cmd!r})",)),
        "builtins_exec": (builtins.exec, (f"import os; os.system({cmd!r})",)),
    }[payload]
    path = _write(tmp_path, "evil.pkl", pickle.dumps({"model": _Reduce(fn, args)}, protocol=4))
    _assert_refused(path, sentinel, "forbidden global")


def _legacy_bytes(main_obj) -> bytes:
    parts = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    return b"".join(pickle.dumps(p, protocol=2) for p in parts) + pickle.dumps(main_obj, protocol=2)


def test_payload_in_nested_tensor_bytes_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    blob = _legacy_bytes(_Reduce(os.system, (_sentinel_cmd(sentinel),)))
    outer = {"model": _Reduce(torch.storage._load_from_bytes, (blob,))}
    path = _write(tmp_path, "nested.pkl", pickle.dumps(outer, protocol=4))
    _assert_refused(path, sentinel, "forbidden global")


def _stub(*args):
    raise AssertionError("never called")


def _as_global(obj, module: str, name: str) -> bytes:
    """Pickle ``obj`` with every reference to ``_stub`` renamed to ``module.name``."""

    def short(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    data = pickle.dumps(obj, protocol=4)
    old = short(__name__) + b"\x94" + short("_stub")
    assert old in data
    return data.replace(old, short(module) + b"\x94" + short(name))


def _persistent_file(module_src: str, state: dict) -> bytes:
    """A file shaped like the released ones, with chosen ``module_src`` and ``state``."""
    meta = {"type": "class", "version": 6, "module_src": module_src, "class_name": "EPD_predictor", "state": state}
    return _as_global({"model": _Reduce(_stub, (meta,))}, "torch_utils.persistence", "_reconstruct_persistent_obj")


def test_persistent_module_src_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    evil_src = f"import os\nos.system({_sentinel_cmd(sentinel)!r})\nclass EPD_predictor: pass\n"
    tables = {name: torch.zeros(2, 2) for name in TABLES}
    state = {
        "num_steps": 3, "num_points": 2, "sampler_stu": "epd", "schedule_type": "polynomial",
        "schedule_rho": 7.0, "max_order": 3, "_parameters": tables,
    }  # fmt: skip
    path = _write(tmp_path, "src.pkl", _persistent_file(evil_src, state))
    p = load_params(path)  # the table itself is fine; its embedded class source is ignored
    assert not sentinel.exists()
    assert p.num_steps == 3 and torch.equal(p.r_params, torch.zeros(2, 2))


def test_class_outside_allow_list_refused(tmp_path):
    from collections import Counter

    path = _write(tmp_path, "counter.pkl", pickle.dumps({"model": Counter(a=1)}, protocol=4))
    _assert_refused(path, expect="forbidden global 'collections.Counter'")
    path = _write(tmp_path, "linear.pkl", pickle.dumps({"model": torch.nn.Linear(2, 2)}, protocol=2))
    _assert_refused(path, expect="forbidden global")


def test_inert_training_reference_cannot_be_called(tmp_path):
    data = _as_global({"model": _Reduce(_stub, ())}, "solvers", "epd_sampler")
    path = _write(tmp_path, "call.pkl", data)
    _assert_refused(path, expect="may be referenced but not called")


@pytest.mark.parametrize(
    "name,data,expect",
    [
        ("empty.pkl", b"", "empty"),
        ("text.pkl", b"hello, I am not a table\n" * 4, "neither"),
        ("list.pkl", pickle.dumps([1, 2, 3], protocol=4), "no 'model' entry"),
        ("model_int.pkl", pickle.dumps({"model": 3}, protocol=4), "not a persistent EPD_predictor"),
    ],
)
def test_broken_files(tmp_path, name, data, expect):
    _assert_refused(_write(tmp_path, name, data), expect=expect)


def test_truncated_published_files(tmp_path):
    data = official_path("sd15-best.pkl").read_bytes()
    for cut in (1, 2, 50, 500, 4000, len(data) // 2, len(data) - 1):
        _assert_refused(_write(tmp_path, f"cut{cut}.pkl", data[:cut]))


def test_missing_dir_and_oversized(tmp_path):
    with pytest.raises(EPDFileError, match="does not exist"):
        load_params(tmp_path / "nope.pkl")
    (tmp_path / "dir.pkl").mkdir()
    with pytest.raises(EPDFileError, match="not a regular file"):
        load_params(tmp_path / "dir.pkl")
    big = tmp_path / "big.pkl"
    with big.open("wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)
    _assert_refused(big, expect="at most")


def test_legacy_bytes_that_lie_about_size(tmp_path):
    blob = _legacy_bytes(("storage",))
    outer = {"model": _Reduce(torch.storage._load_from_bytes, (blob,))}
    _assert_refused(_write(tmp_path, "lie.pkl", pickle.dumps(outer, protocol=4)))


# --- broken project files ---------------------------------------------------------------------


def _good(tmp_path) -> Path:
    return save_params(load_params(official_path("sd15-best.pkl")), tmp_path / "good.safetensors")


def test_safetensors_broken_header(tmp_path):
    data = _good(tmp_path).read_bytes()
    _assert_refused(_write(tmp_path, "hdr.safetensors", struct.pack("<Q", 10**12) + data[8:]))
    _assert_refused(_write(tmp_path, "json.safetensors", data[:8] + b"{" + b"x" * 40))
    _assert_refused(_write(tmp_path, "cut.safetensors", data[: len(data) - 7]))


def test_safetensors_bad_tables(tmp_path):
    from safetensors.torch import save_file

    p = load_params(official_path("sd15-best.pkl"))
    good = _good(tmp_path)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()
    tensors = {name: getattr(p, name) for name in TABLES}
    cases = {
        "nan": {**tensors, "r_params": torch.full_like(p.r_params, float("nan"))},
        "shape": {**tensors, "weight_s": torch.zeros(3, 2)},
        "missing": {k: v for k, v in tensors.items() if k != "scale_dir_params"},
        "int": {**tensors, "r_params": torch.zeros(10, 2, dtype=torch.int64)},
    }
    for name, ts in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(ts, str(path), metadata=meta)
        _assert_refused(path)
    path = tmp_path / "nometa.safetensors"
    save_file(tensors, str(path))
    _assert_refused(path, expect="epd_format")


def test_params_validation_names_field():
    p = load_params(official_path("sd15-best.pkl"))
    with pytest.raises(ValueError, match="EPDParams.num_points"):
        p.replace(num_points=0)
    with pytest.raises(ValueError, match="EPDParams.schedule_type"):
        p.replace(schedule_type="cosine")
    with pytest.raises(ValueError, match="EPDParams.r_params"):
        p.replace(r_params=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="EPDParams.weight_s"):
        p.replace(weight_s=torch.full((10, 2), float("inf")))
    assert isinstance(p, EPDParams)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    p = load_params(official_path("sd15-best.pkl"))
    dst = tmp_path / "t.safetensors"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(EPDFileError, match="disk full"):
        save_params(p, dst)
    assert list(tmp_path.iterdir()) == []


def test_a_drive_that_refuses_modes_still_saves(tmp_path, monkeypatch):
    """A FAT / exFAT or SMB drive refuses ``chmod`` (EPERM: its mount decides the modes): the table is saved whole,
    not lost after the whole training run; other failures still stop the save."""
    p = load_params(official_path("sd15-best.pkl"))
    dst = tmp_path / "t.safetensors"

    def refuse(*a, **k):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    save_params(p, dst)
    assert torch.equal(load_params(dst).r_params, p.r_params)
    assert [q.name for q in tmp_path.iterdir()] == ["t.safetensors"]


def test_leftovers_of_another_name_that_starts_like_this_one_s_temporary_are_kept(tmp_path):
    """Only this file's own temporary names are leftovers: a name that merely starts like one is another write's."""
    from epd_core.files import remove_leftovers, temp_prefix

    path = tmp_path / "a.safetensors"
    other = tmp_path / f"{temp_prefix(path)}abcdefgh.tmp.x.tmp"
    other.write_bytes(b"x")
    mine = tmp_path / f"{temp_prefix(path)}abcdefgh.tmp"
    mine.write_bytes(b"x")
    remove_leftovers(path)
    assert other.exists() and not mine.exists()


def test_a_lock_file_removed_between_open_and_lock_is_locked_afresh(tmp_path, monkeypatch):
    """The previous holder unlocks and removes the lock file between this run's open and its lock: the lock on the
    unlinked file must not count, or two runs would train the same table."""
    import fcntl

    from epd_core.files import lock, unlock

    path = tmp_path / ".t.epd-lock"
    real, calls = fcntl.flock, []

    def racing(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            path.unlink()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", racing)
    fd = lock(path)
    monkeypatch.setattr(fcntl, "flock", real)
    assert fd is not None and path.exists()
    assert lock(path) is None  # the file at the path is the one held
    unlock(path, fd)
