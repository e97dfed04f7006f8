"""A generated corpus of malformed and hostile table files: each loads as a valid table or is refused with
EPDFileError, quickly, without running a payload, without touching the disk."""

from __future__ import annotations

import json
import pickle
import pickletools
import random
import resource
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from epd_core import EPDFileError, EPDParams, load_params, save_params
from epd_dev.shared_data import official_files

pytestmark = pytest.mark.core

FORBIDDEN = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"), ("subprocess", "call"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "__import__"), ("builtins", "getattr"),
    ("__builtin__", "eval"), ("torch", "load"), ("pickle", "loads"), ("numpy", "load"), ("runpy", "run_path"),
    ("shutil", "rmtree"), ("webbrowser", "open"), ("torch.serialization", "load"), ("operator", "attrgetter"),
]  # fmt: skip


def _short(text: str) -> bytes:
    raw = text.encode()
    return (b"\x8c" + bytes([len(raw)]) + raw) if len(raw) < 256 else (b"X" + struct.pack("<I", len(raw)) + raw)


def _ops(data: bytes):
    return [(op.name, pos) for op, arg, pos in pickletools.genops(data)]


def _corpus(sentinel: Path) -> list[tuple[str, bytes]]:
    rng = random.Random(1234)
    cases: list[tuple[str, bytes]] = []
    sources = [p.read_bytes() for p in official_files()[::6]]
    cmd = f"touch {sentinel}"
    for si, data in enumerate(sources):
        ops = _ops(data)
        positions = [pos for _, pos in ops]
        # truncation at opcode boundaries, random byte flips, opcode swaps, deleted and duplicated spans
        for pos in rng.sample(positions, 12):
            cases.append((f"cut-{si}-{pos}", data[:pos]))
        for _ in range(15):
            b = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append((f"flip-{si}", bytes(b)))
        for _ in range(10):
            b = bytearray(data)
            b[rng.choice(positions)] = rng.choice(b"().0123abcdeghjlpqrstuGIJKLMNPQRSTUVX}]\x80\x81\x85\x93\x94\x95")
            cases.append((f"opswap-{si}", bytes(b)))
        for _ in range(6):
            a, z = sorted(rng.sample(positions, 2))
            cases.append((f"delete-{si}", data[:a] + data[z:]))
            cases.append((f"dup-{si}", data[:z] + data[a:z] + data[z:]))
        # forbidden globals at every global site (outer pickle)
        for name, pos in ops:
            if name != "STACK_GLOBAL":
                continue
            for mod, fn in rng.sample(FORBIDDEN, 3):
                # replace the two strings pushed before this STACK_GLOBAL
                prev = [p for n, p in ops if p < pos and n in ("SHORT_BINUNICODE", "BINUNICODE", "BINGET")][-2:]
                if len(prev) == 2:
                    cases.append((f"global-{si}-{mod}.{fn}", data[: prev[0]] + _short(mod) + _short(fn) + data[pos:]))
    # forbidden globals inside the nested legacy tensor bytes, and lying sizes there
    base = sources[0]
    inner_at = base.find(b"ctorch\nFloatStorage\n")
    for mod, fn in FORBIDDEN:
        evil = f"c{mod}\n{fn}\n".encode()
        cases.append(
            (f"inner-global-{mod}.{fn}", base.replace(b"ctorch\nFloatStorage\n", evil.ljust(20, b" ")[:20], 1))
        )
    assert inner_at > 0
    for delta in (-1, 1, 10**6, 2**31):
        blob = bytearray(base)
        i = blob.find(b"K\x14Ntq")  # the storage's declared element count (20)
        if i > 0 and 0 <= 20 + delta < 256:
            blob[i + 1] = 20 + delta
        cases.append((f"inner-size-{delta}", bytes(blob)))
    # classic payload shapes
    for mod, fn in FORBIDDEN:
        cases.append(
            (
                f"reduce-{mod}.{fn}",
                b"\x80\x02c"
                + f"{mod}\n{fn}\n".encode()
                + b"X"
                + struct.pack("<I", len(cmd))
                + cmd.encode()
                + b"\x85R.",
            )
        )
    # huge declared sizes, deep nesting, memo abuse
    cases += [
        ("huge-binbytes", b"\x80\x04B\xff\xff\xff\xff"),
        ("huge-binbytes8", b"\x80\x04\x8e" + struct.pack("<Q", 2**62)),
        ("huge-unicode8", b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc"),
        ("huge-memo", b"\x80\x04}r\xff\xff\xff\xff."),
        ("huge-get", b"\x80\x04j\xff\xff\xff\xff."),
        ("long4-huge", b"\x80\x04\x8b\xff\xff\xff\x7f"),
        ("deep-lists", b"\x80\x04" + b"]" * 200000 + b"a" * 199999 + b"."),
        ("deep-tuples-key", b"\x80\x04}" + b"(" * 50000 + b")" + b"t" * 50000 + b"K\x01s."),
        ("deep-marks", b"\x80\x04" + b"(" * 300000 + b"."),
        ("stack-underflow", b"\x80\x04a."),
        ("no-stop", b"\x80\x04}"),
        ("proto-9", b"\x80\x09}."),
        ("setitems-odd", b"\x80\x04}(K\x01u."),
        ("ext1", b"\x80\x04\x82\x01."),
        ("inst", b"(ios\nsystem\nS'x'\ni."),
        ("obj", b"\x80\x02(cos\nsystem\nX\x01\x00\x00\x00xo."),
        ("persid", b"\x80\x04X\x01\x00\x00\x00xQ."),
    ]
    # wrong types in every field of the state
    good_state = {"num_steps": 3, "num_points": 2, "sampler_stu": "epd", "schedule_type": "polynomial",
                  "schedule_rho": 7.0, "max_order": 3, "afs": False, "scale_dir": 0.0, "scale_time": 0.0}  # fmt: skip
    bad_values = [None, "x", -1, 0, 1e308, float("nan"), [1, 2], {"a": 1}, True, 10**30]
    for key in list(good_state) + ["_parameters", "sigma_min", "flowmatch_mu", "backend", "guidance_rate"]:
        for value in bad_values:
            state = dict(good_state, _parameters={n: torch.zeros(2, 2) for n in
                         ("r_params", "weight_s", "scale_dir_params", "scale_time_params")})  # fmt: skip
            state[key] = value
            cases.append((f"field-{key}-{value!r}"[:60], _persistent(state)))
    for shape in [(3, 2), (2,), (2, 2, 1), (0, 2), (2, 3)]:
        state = dict(good_state, _parameters={n: torch.zeros(*shape) for n in
                     ("r_params", "weight_s", "scale_dir_params", "scale_time_params")})  # fmt: skip
        cases.append((f"shape-{shape}", _persistent(state)))
    return cases


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _stub(*args):
    raise AssertionError


def _persistent(state: dict) -> bytes:
    meta = {"type": "class", "version": 6, "module_src": "", "class_name": "EPD_predictor", "state": state}
    data = pickle.dumps({"model": _Reduce(_stub, (meta,))}, protocol=4)
    target = _short("torch_utils.persistence") + b"\x94" + _short("_reconstruct_persistent_obj")
    return data.replace(_short(__name__) + b"\x94" + _short("_stub"), target)


def _safetensors_corpus(tmp: Path) -> list[tuple[str, bytes]]:
    p = EPDParams.start(4, 2, schedule_type="polynomial", schedule_rho=7.0)
    good = save_params(p, tmp / "seed.safetensors").read_bytes()
    (tmp / "seed.safetensors").unlink()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    rng = random.Random(7)
    cases = []
    for hlen in (0, 1, n - 1, n + 1, 2**40, 2**64 - 1, len(good)):
        cases.append((f"st-hlen-{hlen}", struct.pack("<Q", hlen) + good[8:]))
    for key in [k for k in header if k != "__metadata__"]:
        for mutate in ("dtype", "offsets", "shape", "huge"):
            h = json.loads(json.dumps(header))
            if mutate == "dtype":
                h[key]["dtype"] = rng.choice(["I64", "U8", "BOOL", "X99", "F8_E4M3"])
            elif mutate == "offsets":
                h[key]["data_offsets"] = [0, 10**12]
            elif mutate == "shape":
                h[key]["shape"] = [3, 3]
            else:
                h[key]["shape"] = [2**40, 2**40]
            raw = json.dumps(h).encode()
            cases.append((f"st-{mutate}-{key}", struct.pack("<Q", len(raw)) + raw + good[8 + n :]))
    for field, value in [("hyper", "not json"), ("hyper", json.dumps({"num_steps": "x"})), ("epd_format", "9"),
                         ("provenance", "[1,2]"), ("hyper", json.dumps({"evil": 1}))]:  # fmt: skip
        h = json.loads(json.dumps(header))
        h["__metadata__"][field] = value
        raw = json.dumps(h).encode()
        cases.append((f"st-meta-{field}", struct.pack("<Q", len(raw)) + raw + good[8 + n :]))
    for _ in range(40):
        b = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(("st-flip", bytes(b)))
    for cut in rng.sample(range(1, len(good)), 20):
        cases.append(("st-cut", good[:cut]))
    return cases


def test_fuzz_corpus(tmp_path):
    sentinel = tmp_path / "PAYLOAD_RAN"
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    cases = _corpus(sentinel) + _safetensors_corpus(tmp_path)
    assert len(cases) >= 500, len(cases)
    paths = []
    for i, (name, data) in enumerate(cases):
        path = corpus_dir / f"{i:04d}.{'safetensors' if name.startswith('st-') else 'pkl'}"
        path.write_bytes(data)
        paths.append((name, path))
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in corpus_dir.iterdir()}
    outcome: Counter = Counter()
    slowest = 0.0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = set()
    for name, path in paths:
        t0 = time.process_time()  # CPU time: what a hostile file can cost, whatever else the machine runs
        try:
            p = load_params(path)
            assert isinstance(p, EPDParams)
            outcome["loaded"] += 1
        except EPDFileError as exc:
            assert str(path) in str(exc)
            outcome["refused"] += 1
            refused.add(name)
        slowest = max(slowest, time.process_time() - t0)
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in corpus_dir.iterdir()}
    assert not sentinel.exists(), "a payload ran"
    assert after == before, "loading created or modified files"
    assert slowest < 5.0, slowest
    assert rss_growth_mb < 500, rss_growth_mb
    print(f"\nfuzz corpus: {len(paths)} files, {dict(outcome)}, slowest {slowest * 1000:.0f} ms, "
          f"peak RSS growth {rss_growth_mb:.0f} MB")  # fmt: skip
    hostile = {name for name, _ in paths if name.startswith(("global-", "inner-global-", "reduce-", "inst", "obj"))}
    assert len(hostile) >= 20 and hostile <= refused, sorted(hostile - refused)  # every code-running global: refused
    assert outcome["loaded"] > 0  # harmless mutations (a flipped data byte) still load


@pytest.mark.parametrize("name", ["deep-lists", "deep-tuples-key", "huge-memo"])
def test_named_hostile_cases_are_refused(tmp_path, name):
    cases = dict(_corpus(tmp_path / "s"))
    path = tmp_path / "x.pkl"
    path.write_bytes(cases[name])
    with pytest.raises(EPDFileError):
        load_params(path)


def test_safe_pickle_opcode_names_are_the_protocol_s():
    """The reader's named opcodes are the pickle protocol's bytes, and it names every opcode up to protocol 5 except
    those it refuses as unsupported: calls by name or registry (INST, OBJ, EXT1/2/4), out-of-band buffers, and two
    string forms no table writer emits (protocol 0's quoted STRING, BYTEARRAY8)."""
    from epd_core import safe_pickle

    named = {n: v for n, v in vars(safe_pickle).items() if n.isupper() and isinstance(v, bytes)}
    assert named and all(getattr(pickle, n) == v for n, v in named.items())
    unsupported = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER", "STRING", "BYTEARRAY8"}
    assert {op.name for op in pickletools.opcodes} - set(named) == unsupported


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("int-key", {7: 1}),
        ("tensor-afs", {"afs": torch.ones(2)}),
        ("tensor-scale", {"scale_dir": torch.ones(3)}),
        ("deep-backend-config", {"backend_config": _deep(5000)}),
    ],
)
def test_odd_values_in_a_predictor_state_are_errors_naming_the_file(tmp_path, name, change):
    """A state whose keys or values the format never has (a number as key, a tensor where a flag or a scale
    goes, nesting deeper than Python's stack): an EPDFileError naming the file, not another exception."""
    import sys

    state = {"num_steps": 3, "num_points": 2, "sampler_stu": "epd", "schedule_type": "polynomial",
             "schedule_rho": 7.0, "max_order": 3, "afs": False, "scale_dir": 0.0, "scale_time": 0.0,
             "_parameters": {n: torch.zeros(2, 2) for n in ("r_params", "weight_s", "scale_dir_params",
                                                             "scale_time_params")}}  # fmt: skip
    path = tmp_path / f"{name}.pkl"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for pickle.dumps of the deep value only
    try:
        path.write_bytes(_persistent({**state, **change}))
    finally:
        sys.setrecursionlimit(limit)
    assert isinstance(load_params(_plain(tmp_path, state)), EPDParams)
    with pytest.raises(EPDFileError) as refused:
        load_params(path)
    assert str(path) in str(refused.value)


def _plain(tmp_path: Path, state: dict) -> Path:
    """The same state unchanged: it loads, so the refusal above is the change's."""
    path = tmp_path / "plain.pkl"
    path.write_bytes(_persistent(state))
    return path
