"""Hardening, round two, outside ComfyUI: bounds at load, CLI destinations, exclusive final writes."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from epd_core import EPDFileError, EPDParams, load_params, save_params
from epd_core.__main__ import main as cli_main
from epd_core.files import MAX_POINTS, MAX_TIME_POINTS, check_destination
from epd_dev import ROOT
from epd_dev.hostile import huge_table
from epd_dev.shared_data import official_files, official_path

pytestmark = pytest.mark.core

WEIGHTS = ROOT / "weights"


def test_bounds_leave_room_over_every_real_table():
    real = [load_params(p) for p in official_files()] + [load_params(p) for p in WEIGHTS.rglob("*.safetensors")
                                                          if p.name != "digits-unet.safetensors"]  # fmt: skip
    assert real
    assert max(p.num_steps for p in real) * 10 < MAX_TIME_POINTS
    assert max(p.num_points for p in real) * 10 < MAX_POINTS


@pytest.mark.parametrize(("steps", "points", "limit"), [(300_000, 1, "time points"), (3, 50_000, "points per step"),
                                                         (MAX_TIME_POINTS + 1, 2, "at most 257")])  # fmt: skip
def test_oversized_tables_are_refused_quickly_with_the_limit_named(tmp_path, steps, points, limit):
    path = huge_table(tmp_path, steps, points)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()  # CPU time: the cost of the refusal, whatever else the machine runs
    with pytest.raises(EPDFileError, match=limit) as err:
        load_params(path)
    assert path.name in str(err.value)
    assert time.process_time() - t0 < 1.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024 < 100


def test_lying_tensor_shapes_are_refused_before_reading_them(tmp_path):
    path = huge_table(tmp_path, 3, 2)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["t_steps_x"] = {"dtype": "F32", "shape": [100_000], "data_offsets": [0, 4]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(EPDFileError, match="exceeds the size limit"):
        load_params(path)


def test_authors_pickle_with_too_many_points_is_refused(tmp_path):
    from epd_core.files import params_from_authors

    tables = {n: torch.zeros(2, MAX_POINTS + 1) for n in ("r_params", "weight_s", "scale_dir_params",
                                                           "scale_time_params")}  # fmt: skip
    with pytest.raises(ValueError, match="points per step"):
        params_from_authors(tables, {"num_steps": 3, "num_points": MAX_POINTS + 1}, {})


def test_cli_info_of_an_oversized_table_is_a_short_clean_error(tmp_path):
    path = huge_table(tmp_path, 300_000, 1)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli_main(["info", str(path)]) == 2
    assert out.getvalue() == "" and "time points" in err.getvalue() and len(err.getvalue()) < 300


# --- CLI destinations -----------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epd_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def _cli_here(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process, its result shaped like :func:`_cli`'s."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_convert_bad_destinations_are_clean_errors(tmp_path):
    src = str(official_path("sd15-best.pkl"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    cases = {
        str(tmp_path): "is a folder",
        "": "no file name",
        "/proc/version": "exists",
        str(fifo): "not a regular file",
        str(existing): "exists",
        str(tmp_path / "missing" / "x.safetensors"): "folder does not exist",
    }
    for dst, problem in cases.items():
        for force in ([], ["--force"]):
            # in-process (an exception would escape instead of the exit code 2), except the FIFO: a regression that
            # opened it would block, which a subprocess's timeout turns into a failure
            res = _cli("convert", *force, src, dst) if dst == str(fifo) else _cli_here("convert", *force, src, dst)
            if force and dst == str(existing):
                assert res.returncode == 0, res.stderr
                continue
            if force and dst == "/proc/version":
                problem = "cannot write"
            assert res.returncode == 2, (dst, force, res.stdout, res.stderr)
            assert "Traceback" not in res.stderr and problem in res.stderr, (dst, res.stderr)
            assert res.stderr.startswith("error: ")
    assert load_params(existing).num_points == load_params(src).num_points
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors", "fifo"]


def test_cli_distill_refuses_an_existing_out_before_training(tmp_path):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"keep")
    t0 = time.monotonic()
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert cli_main(["distill", "--iterations", "100000", "--out", str(out)]) == 2
    assert time.monotonic() - t0 < 5 and "exists" in err.getvalue() and out.read_bytes() == b"keep"
    with redirect_stdout(io.StringIO()):
        assert cli_main(["distill", "--iterations", "2", "--batch", "4", "--force", "--out", str(out)]) == 0
    assert load_params(out).num_steps == 4


# --- exclusive final write -------------------------------------------------------------------------------------


def test_save_without_overwrite_never_replaces_a_file_that_appeared(tmp_path, monkeypatch):
    p = load_params(official_path("sd15-best.pkl"))
    dst = tmp_path / "t.safetensors"
    check_destination(dst, overwrite=False)  # free when checked ...
    dst.write_bytes(b"written meanwhile")  # ... taken before the final write
    with pytest.raises(EPDFileError, match="exists; not replacing"):
        save_params(p, dst, overwrite=False)
    assert dst.read_bytes() == b"written meanwhile"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.safetensors"]
    save_params(p, dst, overwrite=True)
    assert load_params(dst).num_steps == p.num_steps
    fresh = save_params(p, tmp_path / "new.safetensors", overwrite=False)
    assert load_params(fresh).num_steps == p.num_steps and oct(fresh.stat().st_mode & 0o777) == "0o644"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["new.safetensors", "t.safetensors"]


def test_save_writes_one_temporary_file(tmp_path, monkeypatch):
    """The folder probe belongs to checks made before training; a save's own atomic write is its probe."""
    import epd_core.files as files

    made = []
    real = files.tempfile.mkstemp
    monkeypatch.setattr(files.tempfile, "mkstemp", lambda *a, **k: made.append(k) or real(*a, **k))
    save_params(load_params(official_path("sd15-best.pkl")), tmp_path / "t.safetensors")
    assert len(made) == 1
    check_destination(tmp_path / "u.safetensors")
    assert len(made) == 2 and sorted(x.name for x in tmp_path.iterdir()) == ["t.safetensors"]


def test_save_checks_the_race_after_check_destination(tmp_path, monkeypatch):
    """The file appears between the temporary file's write and the final link: still refused."""
    import epd_core.files as files

    p = load_params(official_path("sd15-best.pkl"))
    dst = tmp_path / "race.safetensors"
    real_link = os.link

    def racing_link(src, target):
        Path(target).write_bytes(b"other")
        return real_link(src, target)

    monkeypatch.setattr(files.os, "link", racing_link)
    with pytest.raises(EPDFileError, match="appeared while"):
        save_params(p, dst, overwrite=False)
    assert dst.read_bytes() == b"other"
    assert [x.name for x in tmp_path.iterdir()] == ["race.safetensors"]


# --- crafted files from the review of 2026-12-05: each crashed, hung, ate memory or escaped as a bare error ------


def _loads_in_a_child(path: Path) -> subprocess.CompletedProcess:
    """``load_params(path)`` in a separate process (a crash there is not this test run's), printing its error."""
    code = f"from epd_core import load_params\ntry:\n load_params({str(path)!r})\nexcept ValueError as e:\n print(e)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip


@pytest.mark.parametrize(
    "name, key",
    [
        ("deep", b")" + b"\x85" * 1_000_000),  # ((...,),) a million levels deep: hash() recursed in C and crashed
        ("shared", b")q\x010" + (b"(" + b"h\x01" * 1000 + b"tq\x010") * 4 + b"h\x01"),  # 1,000 references to the
    ],  # level below, four times: 10^12 items to hash, from 8 kB
)
def test_a_pickle_key_too_deep_or_too_large_is_refused_without_crashing(tmp_path, name, key):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(b"\x80\x02}" + key + b"Ns.")  # {key: None}
    run = _loads_in_a_child(path)
    assert run.returncode == 0, run.stderr[-500:]
    assert f"{path}: refused predictor pickle: key" in run.stdout


def _text(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()


def _laughs(levels: int) -> bytes:
    """A list holding the level below ten times, by memo reference: 25 bytes a level, 10^levels items expanded."""
    out = b"]q\x000"
    for i in range(1, levels + 1):
        out += b"(" + (b"h" + bytes([i - 1])) * 10 + b"lq" + bytes([i]) + b"0"
    return out + b"h" + bytes([levels])


def _predictor(value: bytes, where: str) -> bytes:
    """An authors' predictor pickle whose ``class_name``, or one of whose hyper-parameters, is ``value``."""
    name = value if where == "class_name" else _text("EPD_predictor")
    state = b"}" + _text(where) + value + b"s" if where != "class_name" else b"}"
    meta = b"}(" + _text("class_name") + name + _text("state") + state + b"u"
    return (b"\x80\x04}" + _text("model") + _text("torch_utils.persistence") + _text("_reconstruct_persistent_obj")
            + b"\x93" + meta + b"\x85Rs.")  # fmt: skip


@pytest.mark.parametrize(
    "name, data, problem",
    [  # 289 bytes each: str(), repr() or == of the value took 5 s and 330 MB (one level more: a minute and 5 GB)
        ("class_name", _predictor(_laughs(8), "class_name"), "persistent object class_name is not text"),
        ("num_steps", _predictor(_laughs(8), "num_steps"), "values repeated by reference past any EPD table's size"),
        ("backend", _predictor(_laughs(8), "backend"), "values repeated by reference past any EPD table's size"),
        ("cycle", b"\x80\x04}" + _text("model") + b"]q\x00h\x00as.", "a value contains itself"),
        ("deep", b"\x80\x04}" + _text("model") + b"(" * 100 + b"]" + b"l" * 100 + b"s.", "values nested more than 64"),
    ],
)
def test_a_pickle_value_repeated_by_reference_is_refused_before_anything_walks_it(tmp_path, name, data, problem):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    run = _loads_in_a_child(path)
    assert run.returncode == 0, run.stderr[-500:]
    assert f"{path}: refused predictor pickle: {problem}" in run.stdout and len(run.stdout) < 500


def test_a_pickle_that_rebuilds_one_storage_again_and_again_is_refused_within_its_memory_bound(tmp_path):
    """A 1-value storage rebuilt 200 times as a 2^20-element tensor of stride 0 (6 bytes each through the memo)
    used to allocate 1.6 GB before any check; the tensors one file builds are now bounded (64 MiB)."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.DoubleStorage(1), buf, _use_new_zipfile_serialization=False)
    blob = buf.getvalue()
    data = b"\x80\x02ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", len(blob)) + blob + b"\x85Rq\x01"
    data += b"(h\x01K\x00J" + struct.pack("<i", 1 << 20) + b"\x85K\x00\x85\x89Ntq\x02"  # (storage, 0, (2^20,), (0,))
    data += b"ctorch._utils\n_rebuild_tensor_v2\nq\x03]" + b"h\x03h\x02Ra" * 200 + b"."
    path = tmp_path / "repeat.pkl"
    path.write_bytes(data)
    with pytest.raises(EPDFileError, match=r"repeat\.pkl: refused predictor pickle: the tensors built exceed 64 MiB"):
        load_params(path)


def _table(tmp_path: Path, name: str, dtype=torch.float32, provenance=None, **hyper) -> Path:
    from safetensors.torch import save

    tables = {n: torch.zeros(3, 2, dtype=dtype) for n in ("r_params", "weight_s", "scale_dir_params",
                                                          "scale_time_params")}  # fmt: skip
    meta = {"epd_format": "1", "hyper": json.dumps({"num_steps": 4, "num_points": 2, **hyper}),
            "provenance": json.dumps(provenance or {})}  # fmt: skip
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(save(tables, metadata=meta))
    return path


def test_tables_that_load_must_make_a_grid_and_keep_their_metadata_writable(tmp_path):
    """Each of these loaded (or escaped as a bare NotImplementedError / OverflowError / TypeError later, in the
    loader node, the CLI or a save); now each is an EPDFileError that names the file and the problem."""
    deep: list = []
    for _ in range(100):
        deep = [deep]
    cases = {
        "float8": ({"dtype": torch.float8_e4m3fn}, "must be a float16, bfloat16, float32 or float64 tensor"),
        "rho": ({"schedule_type": "polynomial", "schedule_rho": 0.001}, "own time grid"),  # sigma_max ** 1000
        "vp": ({"schedule_type": "time_uniform", "sigma_min": 0.002, "sigma_max": 1e200}, "own time grid"),
        "mu": ({"schedule_type": "flowmatch", "backend": "flux", "flowmatch_mu": 1000.0}, "own time grid"),
        "shift": ({"schedule_type": "flowmatch", "backend": "sd3", "flowmatch_shift": 1e308}, "own time grid"),
        "range": ({"schedule_type": "logsnr", "sigma_min": 1e-300, "sigma_max": 1e300}, "own time grid"),
        "source": ({"provenance": {"source_file": 5}}, "provenance source_file must be text"),
        "entry": ({"provenance": {"catalogue_entry": ["x"]}}, "provenance catalogue_entry must be text"),
        "base": ({"provenance": {"plugin_base": "ddim"}}, "provenance plugin_base 'ddim' is not a base EPD Plugin"),
        "deep": ({"provenance": {"notes": deep}}, "metadata nested deeper than"),
    }
    for name, (hyper, why) in cases.items():
        with pytest.raises(EPDFileError, match=f"{name}.safetensors: .*{why}"):
            load_params(_table(tmp_path, name, **hyper))
    made = EPDParams.start(4, 2, metadata={"notes": deep})  # a table made in code: its save fails cleanly
    with pytest.raises(EPDFileError, match="cannot write its metadata"):
        save_params(made, tmp_path / "made.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("made", "."))) == []


def test_a_tables_fields_must_have_their_types_not_what_python_makes_of_them(tmp_path):
    """``afs: "false"`` loaded as ``afs=True`` (``bool`` of a string) and sampled with the analytic first step; an
    integer or boolean ``afs_mean`` and a complex ``t_steps`` (its imaginary part dropped) loaded too; any JSON loaded
    as ``dataset_name`` or ``teacher_steps_m``. A long value's message is cut short."""
    from safetensors.torch import save

    def with_tensor(name: str, tensor: torch.Tensor) -> Path:
        path = _table(tmp_path, name)
        base = load_params(path)
        tables = {
            n: getattr(base, n).float() for n in ("r_params", "weight_s", "scale_dir_params", "scale_time_params")
        }
        meta = {"epd_format": "1", "hyper": json.dumps({"num_steps": 4, "num_points": 2}), "provenance": "{}"}
        path.write_bytes(save({**tables, name: tensor}, metadata=meta))
        return path

    cases = {
        "afs": (_table(tmp_path, "afs", afs="false"), "afs: must be true or false, got 'false'"),
        "fcn": (_table(tmp_path, "fcn", fcn=1), "fcn: must be true or false, got 1"),
        "dataset_name": (_table(tmp_path, "dataset_name", dataset_name=[1, 2]), "must be text or None"),
        "teacher_steps_m": (_table(tmp_path, "teacher_steps_m", teacher_steps_m={"x": 1}), "must be a count or None"),
        "afs_mean": (with_tensor("afs_mean", torch.tensor([1, 2])), "afs_mean: must be a 1-D float tensor"),
        "t_steps": (with_tensor("t_steps", torch.tensor([80, 10, 3, 1]) + 0j), "t_steps: must be a float tensor"),
        "long": (_table(tmp_path, "long", backend="x" * 100_000), "backend: must be one of .* got 'xxxxx"),
    }
    for name, (path, why) in cases.items():
        with pytest.raises(EPDFileError, match=f"{path.name}: .*{why}") as err:
            load_params(path)
        assert len(str(err.value)) < 400, name


def test_a_legal_long_file_name_is_writable_and_its_leftovers_found(tmp_path):
    """The temporary file's name added 14 characters to the table's: a legal 252-character name failed to save."""
    from epd_core.files import remove_leftovers, temp_prefix

    path = tmp_path / ("a" * 240 + ".safetensors")
    save_params(EPDParams.start(4, 2), path)
    assert load_params(path).num_steps == 4 and [p.name for p in tmp_path.iterdir()] == [path.name]
    left = tmp_path / f"{temp_prefix(path)}abcdefgh.tmp"  # what a write killed mid-way leaves
    assert len(left.name) <= 255
    left.write_bytes(b"partial")
    remove_leftovers(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_two_long_names_that_start_alike_keep_their_writes_apart(tmp_path):
    """From a review: the temporary names of two tables whose names share their first 241 bytes were the same
    cut, so one run's start (its :func:`remove_leftovers`) deleted the other's write under way, whose save then
    failed; their lock files, ended with a hash, did not stop the two runs."""
    from epd_core.files import lock_path, remove_leftovers, temp_prefix

    a, b = (tmp_path / ("x" * 241 + f"{c}.safetensors") for c in "AB")
    assert temp_prefix(a) != temp_prefix(b) and lock_path(a) != lock_path(b)
    writing = tmp_path / f"{temp_prefix(a)}abcdefgh.tmp"  # a's save under way
    writing.write_bytes(b"partial")
    remove_leftovers(b)
    assert writing.exists()
    remove_leftovers(a)
    assert not writing.exists()
    for path in (a, b):
        save_params(EPDParams.start(4, 2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])


def test_a_checkpoint_name_with_glob_characters_removes_only_its_own_leftovers(tmp_path):
    """A glob's "[1]" matched "1"; and a name that starts with this one's (``run[1].ckpt.v2``, or the table
    ``run[1].ckpt.safetensors``) lost its write under way when this run started."""
    from epd_core.files import remove_leftovers

    mine = tmp_path / ".run[1].ckpt.a1b2c3_d.tmp"
    names = (".run1.ckpt.b2c3d4e5.tmp", ".run[1].ckpt.v2.b2c3d4e5.tmp", ".run[1].ckpt.safetensors.x1y2z3w4.tmp",
             ".run[1].ckpt.a1b2.tmp")  # fmt: skip
    others = [tmp_path / name for name in names]
    for p in (mine, *others):
        p.write_bytes(b"x")
    remove_leftovers(tmp_path / "run[1].ckpt")
    assert not mine.exists() and all(p.exists() for p in others)


def test_cli_refuses_before_training_what_would_lose_or_misplace_the_table(tmp_path):
    """From a CLI review: --checkpoint naming --out (the saved table was then removed as the finished run's
    checkpoint, exit 0), an unwritable folder (found after training), a schedule of the other family (a flux table
    on a discrete grid), an exact reference of fewer than 2 steps, a demo batch of 0 (a traceback)."""
    out = tmp_path / "same.safetensors"
    run = _cli_here("distill", "--iterations", "2", "--out", str(out), "--checkpoint", str(out), "--force")
    assert run.returncode == 2 and "--checkpoint and --out name the same file" in run.stderr
    readonly = tmp_path / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o500)
    try:
        writable = os.access(readonly, os.W_OK) and _probe_writable(readonly)
        run = _cli_here("distill", "--iterations", "2", "--out", str(readonly / "t.safetensors"))
        if not writable:
            assert run.returncode == 2 and "cannot write in its folder" in run.stderr
        run = _cli_here("distill", "--iterations", "2", "--out", "/proc/t.safetensors")
        assert run.returncode == 2 and "cannot write in its folder" in run.stderr
    finally:
        os.chmod(readonly, 0o700)
    run = _cli_here("distill", "--form", "flux", "--schedule", "discrete", "--out", str(tmp_path / "f.safetensors"))
    assert run.returncode == 2 and "does not fit --form flux" in run.stderr
    table = official_path("sd15-best.pkl")
    run = _cli_here("rdpo", str(table), "--exact-steps", "1", "--out", str(tmp_path / "r.safetensors"))
    assert run.returncode == 2 and "--exact-steps must be at least 2" in run.stderr
    run = _cli_here("demo", str(table), "--batch", "0")
    assert run.returncode == 2 and "--batch must be at least 1" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]


def _probe_writable(folder) -> bool:
    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_cli_rho_is_the_forms_unless_given(tmp_path):
    """--rho's default (7) replaced the form's rho whenever --schedule was given: sd15's own 'discrete' schedule
    then made another grid (loss 9.17 against 0.197); without --schedule, --rho was ignored."""
    own = tmp_path / "own.safetensors"
    assert _cli_here("distill", "--iterations", "1", "--batch", "2", "--schedule", "discrete", "--out",
                     str(own)).returncode == 0  # fmt: skip
    plain = tmp_path / "plain.safetensors"
    assert _cli_here("distill", "--iterations", "1", "--batch", "2", "--out", str(plain)).returncode == 0
    assert load_params(own).schedule_rho == load_params(plain).schedule_rho == 1.0
    rho = tmp_path / "rho.safetensors"
    assert _cli_here("distill", "--iterations", "1", "--batch", "2", "--form", "edm", "--rho", "5",
                     "--out", str(rho)).returncode == 0  # fmt: skip
    assert load_params(rho).schedule_rho == 5.0


def test_a_table_that_would_not_load_again_is_refused_when_made():
    """EPDParams.start(2, 65) trained and saved a table load_params refuses; start(0) raised a bare torch error."""
    for steps, points, why in ((2, 65, "1..64 points"), (258, 2, "2..257 time points"), (0, 2, "2..257 time points")):
        with pytest.raises(ValueError, match=why):
            EPDParams.start(steps, points)


def test_a_mismatched_checkpoint_says_what_to_do(tmp_path):
    """A checkpoint that does not fit the run (another run's, or no checkpoint at all) stops the CLI; the error said
    what is wrong but not how to go on."""
    ck = tmp_path / "run.ckpt"
    ck.write_bytes(b"")
    run = _cli_here("distill", "--iterations", "4", "--batch", "2", "--checkpoint", str(ck), "--out",
                    str(tmp_path / "t.safetensors"))  # fmt: skip
    assert run.returncode == 2 and "give --checkpoint a new file or a checkpoint of this run" in run.stderr
    assert "remove it" not in run.stderr  # it is not a checkpoint: it may be the user's own file


@pytest.mark.parametrize("command", ["distill", "rdpo"])
def test_a_cli_run_of_a_checkpoint_another_run_holds_is_refused_and_leaves_it(tmp_path, command):
    """The same command started twice (two shells) wrote one --checkpoint in turn, and the first to finish removed
    the other's: the nodes hold their filename, the CLI held nothing. The second run is refused at once and leaves
    the checkpoint as it was; once the holder's process ends (a kill releases it) the run goes on."""
    import subprocess

    ck = tmp_path / "run.epd-checkpoint"
    ck.write_bytes(b"the other run's state")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"),
        str(tmp_path / ".run.epd-checkpoint.epd-lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    args = ["--iterations", "1", "--batch", "2", "--checkpoint", str(ck), "--out", str(tmp_path / "t.safetensors")]
    if command == "rdpo":
        args = [str(ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5.safetensors"), "--iterations", "1",
                "--groups", "2", "--k", "2", "--exact-steps", "8", *args[4:]]  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        run = _cli_here(command, *args)
        assert run.returncode == 2, run.stderr
        assert f"--checkpoint {ck} is in use by another run" in run.stderr and "Traceback" not in run.stderr
        assert ck.read_bytes() == b"the other run's state" and not (tmp_path / "t.safetensors").exists()
    finally:
        holder.kill()
        holder.wait(30)
    ck.unlink()
    run = _cli_here(command, *args)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_the_cli_holds_new_folders_long_names_and_its_out_and_cleans_a_killed_save(tmp_path):
    """From a review of the lock: a --checkpoint in a folder not made yet, or with a long legal name, was refused
    (the lock file was opened first; its name outgrew 255 bytes); a folder or "" as --checkpoint was "not a
    checkpoint; remove it" (it may be the user's own); a kill during the table's save left its temporary file for
    good. The run now also holds --out, so a second run writing the same table is refused too."""
    import subprocess

    base = ["distill", "--iterations", "1", "--batch", "2"]
    out = tmp_path / "t.safetensors"
    killed = tmp_path / f".{out.name}.a1b2c3d4.tmp"  # what a kill during write_atomic leaves
    killed.write_bytes(b"half a table")
    ck = tmp_path / "new" / "deeper" / "run.ckpt"
    assert _cli_here(*base, "--checkpoint", str(ck), "--out", str(out)).returncode == 0
    assert out.is_file() and not killed.exists() and sorted(p.name for p in ck.parent.iterdir()) == []
    long = tmp_path / ("x" * 245 + ".ckpt")
    run = _cli_here(*base, "--checkpoint", str(long), "--out", str(tmp_path / "u.safetensors"), "--checkpoint-every",
                    "1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    (tmp_path / "photos").mkdir()
    (tmp_path / "afile").write_bytes(b"the user's")
    for checkpoint, said in ((str(tmp_path / "photos"), "is a folder; give a file name"), (".", "is a folder"),
                             ("", "--checkpoint needs a file"),
                             (str(tmp_path / "afile" / "ck"), "cannot hold this run's lock file")):  # fmt: skip
        run = _cli_here(*base, "--checkpoint", checkpoint, "--out", str(tmp_path / "v.safetensors"))
        assert run.returncode == 2 and said in run.stderr and "remove it" not in run.stderr, run.stderr
    same = tmp_path / "same"  # its lock is the table's: one lock holds both
    run = _cli_here(*base, "--checkpoint", str(same), "--out", str(same) + ".safetensors", "--checkpoint-every", "1")
    assert run.returncode == 0, run.stderr
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"),
        str(tmp_path / ".w.epd-lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        w = tmp_path / "w.safetensors"
        run = _cli_here(*base, "--out", str(w))
        assert run.returncode == 2 and f"--out {w} is being written by another run" in run.stderr
    finally:
        holder.kill()
        holder.wait(30)
    assert not (tmp_path / "w.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".w.epd-lock"]
    wide = tmp_path / ("é" * 120 + ".safetensors")  # 252 bytes: legal, and its temporary name was not
    assert _cli_here(*base, "--out", str(wide), "--checkpoint", str(tmp_path / "wide.ckpt")).returncode == 0
    assert load_params(wide).num_steps == 4


def test_a_lock_file_that_is_a_folder_or_a_link_is_refused_and_no_link_is_followed(tmp_path):
    """A folder at the lock's name gave a raw IsADirectoryError; a planted link was followed, creating an empty
    file at its target wherever the server may write."""
    from epd_core.files import claim, lock_path

    table = tmp_path / "t.safetensors"
    lock_path(table).mkdir()
    with pytest.raises(EPDFileError, match=r"\.t\.epd-lock: cannot hold this run's lock file .*; remove it"):
        with claim(table, "busy"):
            pass
    lock_path(table).rmdir()
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    lock_path(table).symlink_to(target)
    with pytest.raises(EPDFileError, match="cannot hold this run's lock file"):
        with claim(table, "busy"):
            pass
    assert not target.exists() and lock_path(table).is_symlink()
    lock_path(table).unlink()
    with claim(table, "busy"):
        with pytest.raises(ValueError, match="^busy$"):
            with claim(table, "busy"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_cli_second_review(tmp_path, monkeypatch):
    """From a second CLI review: rdpo's --checkpoint naming its start table (told to remove it); --rho on a flow form
    (ignored, recorded); --timeout inf (a traceback) or nan; --seed beyond torch's range (an unnamed overflow);
    demo's Euler on a carry table's learned grid (0.162 there, 0.203 on an epd table of the same model and NFE);
    Ctrl-C (a traceback, no word of the checkpoint)."""
    start = tmp_path / "start.safetensors"
    start.write_bytes((ROOT / "weights" / "demo" / "analytic-sd15-reference-nfe5.safetensors").read_bytes())
    run = _cli_here("rdpo", str(start), "--checkpoint", str(start), "--out", str(tmp_path / "r.safetensors"))
    assert run.returncode == 2 and "--checkpoint names the start table" in run.stderr
    run = _cli_here("distill", "--form", "sd3", "--rho", "3", "--out", str(tmp_path / "f.safetensors"))
    assert run.returncode == 2 and "--rho does not apply to --form sd3's flowmatch schedule" in run.stderr
    for timeout in ("inf", "nan", "-1", "1e300"):
        run = _cli_here("fetch", "tpami-sd15-best", "--out", str(tmp_path / "f"), "--timeout", timeout)
        assert run.returncode == 2 and "timeout must be a number of seconds in (0, 86400" in run.stderr, timeout
    for command in (
        ("demo", str(start), "--batch", "2"),
        ("distill", "--iterations", "1", "--out", str(tmp_path / "s")),
    ):
        run = _cli_here(*command, "--seed", str(2**70))
        assert run.returncode == 2 and "seed must be in [-2**63, 2**64)" in run.stderr, command
    from scripts import make_catalogue  # a folder as --out: refused before reading the 43 tables (a traceback after)

    with pytest.raises(SystemExit) as exit_:
        make_catalogue.main([str(tmp_path / "no such shared folder"), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.safetensors"]
    eulers = []
    for name in ("analytic-sd15-reference-nfe5-carry", "analytic-sd15-reference-nfe5"):
        run = _cli_here("demo", str(ROOT / "weights" / "demo" / f"{name}.safetensors"), "--batch", "64")
        assert run.returncode == 0 and "mixture reference" in run.stdout
        eulers.append(run.stdout.split("Euler RMSE at NFE 5:")[1].split()[0])
    assert eulers[0] == eulers[1]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("epd_core.distill.distill", interrupted)
    ck = tmp_path / "run.ckpt"
    run = _cli_here("distill", "--iterations", "1", "--out", str(tmp_path / "i.safetensors"), "--checkpoint", str(ck))
    assert run.returncode == 130 and f"interrupted; the checkpoint {ck} is kept: run the same command" in run.stderr


def test_a_warning_or_an_error_does_not_land_on_the_progress_bar(tmp_path, monkeypatch):
    """The bar is rewritten in place with a carriage return; RDPO's guard warning (logged by the core) and an error
    after a step were written onto it ("[####  ] 1/2 loss 0.50000EPD RDPO: the guard metric rose ...")."""
    import logging

    def training(*args, progress, **kwargs):
        progress(1, 2, 0.5)
        logging.getLogger("epd_core.rdpo").warning("EPD RDPO: the guard metric rose")
        progress(2, 2, 0.25)
        progress(1, 2, 0.5)
        raise ValueError("the model answered NaN")

    monkeypatch.setattr("epd_core.distill.distill", training)
    run = _cli_here("distill", "--iterations", "2", "--out", str(tmp_path / "t.safetensors"))
    assert run.returncode == 2 and "EPD RDPO: the guard metric rose\nerror: the model answered NaN" in run.stderr
    lines = run.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == "", run.stdout  # each bar ended before the warning and the error
    assert [line.split("] ")[1] for line in lines[:3]] == ["1/2 loss 0.50000", "2/2 loss 0.25000", "1/2 loss 0.50000"]
    assert not logging.getLogger("epd_core").handlers  # the CLI's handler does not outlive its call


def test_the_readmes_core_calls_work_as_written():
    """README: ``rdpo(denoiser, start, shape, reward=...)`` (a reward passed as the config said 'pass exactly one of
    reward and reference') and ``find_entry`` among epd_core's names."""
    import epd_core
    from epd_core.rdpo import rdpo

    assert epd_core.find_entry("tpami-sd15-best", epd_core.load_catalogue(ROOT / "weights" / "catalogue.json"))
    with pytest.raises(TypeError, match="a reward goes as reward="):
        rdpo(lambda x, s: x, EPDParams.start(3, 2), (1, 2, 2), lambda x, c: x.flatten(1).mean(1))


# --- the Python API, from a review of it as a script uses it -----------------------------------------------------


def _mixture():
    from epd_core import GaussianMixture

    g = GaussianMixture.reference()
    return g.denoise_ve, g.shape


def test_training_refuses_a_grid_it_cannot_walk_before_training():
    """A sampling grid ending in 0 trained nothing (NaN losses, the start returned) or shifted rdpo's steps by one;
    an increasing grid failed only after every iteration."""
    from epd_core.config import DistillConfig, RDPOConfig
    from epd_core.distill import distill
    from epd_core.rdpo import rdpo

    den, shape = _mixture()
    start = EPDParams.start(4, 2, afs=True)
    calls = []

    def counted(x, s):
        calls.append(1)
        return den(x, s)

    for grid, why in (([80.0, 10.0, 1.0, 0.0], "ends in 0"), ([1.0, 10.0, 20.0, 80.0], "strictly decreasing"),
                      ([[80.0, 10.0, 1.0, 0.1]], "1-D"), ([80.0, 10.0, 1.0], "has 3 points")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            distill(counted, start, shape, DistillConfig(iterations=50, batch=2), grid=grid)
        with pytest.raises(ValueError, match=why):
            rdpo(counted, start, shape, RDPOConfig(iterations=2, groups=2, k=2), grid=grid, reference=lambda x: x)
    assert calls == []


def test_training_runs_the_same_under_no_grad_and_inference_mode():
    """Scripts (and ComfyUI) call models under torch.no_grad() or inference mode: rdpo failed in its first PPO step
    there, distill under inference mode."""
    from epd_core.config import DistillConfig, RDPOConfig
    from epd_core.distill import distill
    from epd_core.rdpo import rdpo

    den, shape = _mixture()
    start = EPDParams.start(4, 2, afs=True)
    config = RDPOConfig(iterations=2, groups=2, k=2, width=8, blocks=1)

    def both():
        return (distill(den, start, shape, DistillConfig(iterations=3, batch=2)).r_params,
                rdpo(den, start, shape, config, reference=lambda x: 0 * x)[0].r_params)  # fmt: skip

    plain = both()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = both()
        assert all(torch.equal(a, b) for a, b in zip(plain, got, strict=True)), mode


def test_a_table_that_would_not_load_is_not_saved(tmp_path):
    """save_params wrote metadata load_params refuses (a command as a list, an unknown plugin_base), replacing a
    good file with the default overwrite."""
    good = tmp_path / "t.safetensors"
    save_params(EPDParams.start(4, 2), good)
    before = good.read_bytes()
    for meta, why in (({"command": ["python", "-m", "x"]}, "command must be text"),
                      ({"plugin_base": "ddim"}, "plugin_base 'ddim'")):  # fmt: skip
        with pytest.raises(EPDFileError, match=why):
            save_params(EPDParams.start(4, 2, metadata=meta), good)
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_a_file_error_crosses_process_boundaries():
    """A worker's failed load became BrokenProcessPool, or hung multiprocessing.Pool (the error did not unpickle)."""
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    err = pickle.loads(pickle.dumps(EPDFileError("/x/t.safetensors", "file does not exist")))  # noqa: S301
    assert (err.path, err.problem, str(err)) == ("/x/t.safetensors", "file does not exist",
                                                 "/x/t.safetensors: file does not exist")  # fmt: skip
    with ProcessPoolExecutor(1) as pool, pytest.raises(EPDFileError, match="file does not exist"):
        pool.submit(load_params, "/nonexistent/t.safetensors").result(timeout=120)


def test_schedule_overrides_are_used_or_refused():
    """sigma_min=0 was replaced by the default; a flow grid ignored sigma_min / sigma_max; shift 0 gave NaN."""
    from epd_core import make_schedule

    edm = EPDParams.start(5, 2)
    with pytest.raises(ValueError, match="0 < sigma_min"):
        make_schedule(edm, sigma_min=0.0)
    assert float(make_schedule(edm, sigma_min=0.01)[-1]) == pytest.approx(0.01)
    flow = EPDParams.start(5, 2, schedule_type="flowmatch", schedule_rho=1.0, backend="sd3", flowmatch_shift=3.0)
    for bad in ({"sigma_min": 0.01}, {"shift": 0.0}, {"shift": -2.0}, {"mu": float("nan")}):
        with pytest.raises(ValueError):
            make_schedule(flow, **bad)
    assert torch.isfinite(make_schedule(flow, mu=1.15)).all()


def test_rdpo_names_a_reward_that_does_not_score_each_rollout():
    from epd_core.config import RDPOConfig
    from epd_core.rdpo import rdpo

    den, shape = _mixture()
    config = RDPOConfig(iterations=1, groups=2, k=2, width=8, blocks=1)

    def mean_only(x, context):
        return x.flatten(1).mean()

    def all_nan(x, context):
        return torch.full((x.shape[0],), float("nan"))

    for reward, got in ((mean_only, r"got \(\)"), (all_nan, r"got \(4,\) all non-finite")):
        with pytest.raises(ValueError, match=rf"the reward {reward.__name__} must return one finite score.*{got}"):
            rdpo(den, EPDParams.start(4, 2, afs=True), shape, config, reward=reward)


def test_small_api_inputs_get_clear_answers():
    """HeldOutCheck with keep_best 0 divided by zero; start_errors took no list grid; load_catalogue handed out its
    cache; a scalar sigma was an IndexError; numpy integers were 'not an integer'."""
    import numpy as np

    from epd_core import load_catalogue, make_schedule, sample
    from epd_core.config import DistillConfig
    from epd_core.selection import HeldOutCheck
    from epd_core.starts import start_errors

    den, shape = _mixture()
    start = EPDParams.start(4, 2)
    with pytest.raises(ValueError, match="keep_best >= 1"):
        HeldOutCheck(den, start, make_schedule(start), shape, DistillConfig(keep_best=0), torch.float64)
    grid = make_schedule(start).tolist()
    errors = start_errors(den, {"a": (start, grid)}, shape, DistillConfig(start_noises=4, batch=2))
    assert errors["a"] > 0
    path = ROOT / "weights" / "catalogue.json"
    load_catalogue(path).clear()
    assert len(load_catalogue(path)) > 40
    with pytest.raises(ValueError, match="1-D grid"):
        sample(den, torch.zeros(1, *shape), 80.0, start)
    assert EPDParams.start(np.int64(5), np.int64(2), sigma_max=np.float32(14.6)).num_steps == 5


# --- crafted pickles from the third review of untrusted files (2026-12-06): each made the load quadratic -------


def _text8(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()


def test_references_to_one_container_are_measured_once(tmp_path, monkeypatch):
    """A list of n references to one n-item list: the size check copied the inner list at every reference (n*n; a
    781 KiB file held ComfyUI's queue for 65 s, deaf to Interrupt). Now each distinct container is walked once."""
    import epd_core.safe_pickle as sp

    n = 2000
    path = tmp_path / "shared.pkl"
    path.write_bytes(b"\x80\x04(" + b"K\x01" * n + b"l\x94" + b"0(" + b"h\x00" * n + b"l.")
    walked = []
    real = sp._children
    monkeypatch.setattr(sp, "_children", lambda item: walked.append(id(item)) or real(item))
    with pytest.raises(EPDFileError, match="shared.pkl: refused predictor pickle"):
        load_params(path)
    assert len(walked) <= 4  # the two lists, opened and closed once each


@pytest.mark.parametrize(
    "name, body, problem",
    [  # keys Python hashes alike (its integer hash is not randomised), and a set of a shared tuple, named again
        ("collide", b"}(" + b"".join(b"\x8a\x09" + (7 + m * (2**61 - 1)).to_bytes(9, "little") + b"N"
                                   for m in range(1, 200)) + b"u", "key of type int; an EPD table's keys are text"),
        ("set", b"\x8f(" + b"K\x01" * 3 + b"\x90", "key of type int"),
        ("frozenset", b"(" + b")" * 3 + b"\x91", "key of type tuple"),
    ],
)  # fmt: skip
def test_only_text_keys_and_set_items(tmp_path, name, body, problem):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(b"\x80\x04" + body + b".")
    with pytest.raises(EPDFileError, match=f"{name}.pkl: refused predictor pickle: {problem}"):
        load_params(path)


def test_a_legacy_storage_named_again_is_decoded_once(tmp_path, monkeypatch):
    """One 255-byte storage blob, referenced 300 times by memo: each decode was charged only its bytes (263,000 fit
    the budget, 45 s of CPU). It is decoded once per file now."""
    import warnings

    import epd_core.authors_format as af

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.zeros(1).storage(), buffer, _use_new_zipfile_serialization=False)
    blob = buffer.getvalue()
    call = _text8("torch.storage") + _text8("_load_from_bytes") + b"\x93\x94"
    data = b"\x80\x04" + call + b"B" + struct.pack("<I", len(blob)) + blob + b"\x85\x94" + b"00"
    data += b"h\x00h\x01R0" * 300 + b"N."
    (path := tmp_path / "legacy.pkl").write_bytes(data)
    decodes = []
    real = af.load_one
    monkeypatch.setattr(af, "load_one", lambda blob_, *a, **k: decodes.append(1) or real(blob_, *a, **k))
    with pytest.raises(EPDFileError, match="legacy.pkl: refused predictor pickle"):
        load_params(path)
    assert len(decodes) <= 6  # the file's own pickle and one decode's five


def test_long_names_in_a_file_are_quoted_short(tmp_path):
    """A forbidden global or a tensor shape of a megabyte went whole into the error (ComfyUI's history and UI)."""
    path = tmp_path / "long.pkl"
    path.write_bytes(b"\x80\x04" + b"X" + struct.pack("<I", 100_000) + b"o" * 100_000 + _text8("system") + b"\x93.")
    with pytest.raises(EPDFileError, match="forbidden global") as err:
        load_params(path)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("name", ["scale_dir", "scale_time"])
def test_a_scale_bound_of_one_is_refused(name):
    """A bound of 1 lets a scale reach 0 (a point's direction or time dropped); [0, 1) was checked, its edge not."""
    EPDParams.start(3, 2, **{name: 0.999})
    with pytest.raises(ValueError, match=r"bound must be in \[0, 1\), got 1"):
        EPDParams.start(3, 2, **{name: 1.0})
