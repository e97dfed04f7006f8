"""The catalogue of published tables and downloads on request, against a local mirror of the authors' repository.

The mirror is a stdlib HTTP server on 127.0.0.1 that serves ``shared/epd_official`` under the upstream layout
(``/<commit>/exps/<family>/<file>`` for TPAMI, ``/<commit>/exps/<run>/network-snapshot-000010.pkl`` for ICCV),
and can misbehave on request: flip a byte, close early, send too much, never answer.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from epd_core import EPDFileError, load_params, save_params
from epd_core.__main__ import main as cli_main
from epd_core.catalogue import MIRROR_ENV, UPSTREAM, fetch, find_entry, load_catalogue
from epd_dev import ROOT
from epd_dev.catalogue_mirror import COMMITS, assert_same_table, dead_url, local_copy, upstream_copy
from epd_dev.shared_data import OFFICIAL, official_files
from scripts import make_catalogue

pytestmark = pytest.mark.core

CATALOGUE = load_catalogue(ROOT / "weights" / "catalogue.json")
ENTRIES = list(CATALOGUE.values())


# --- the catalogue itself ---------------------------------------------------------------------------------------


def test_catalogue_lists_every_published_file_with_its_hash_and_size():
    files = official_files()
    assert len(ENTRIES) == len(files) == 43
    assert {(e.release, e.source_file) for e in ENTRIES} == {(p.parent.name, p.name) for p in files}
    for e in ENTRIES:
        data = local_copy(e).read_bytes()
        assert e.size == len(data), e.name
        assert e.sha256 == hashlib.sha256(data).hexdigest(), e.name
        assert upstream_copy(e.url[len(UPSTREAM) :]) == local_copy(e), e.name  # the URL is the README's layout
        assert e.filename == f"{e.name}.safetensors"
        assert e.comfyui == (e.release == "tpami")
    assert sum(e.comfyui for e in ENTRIES) == 11
    assert {e.family for e in ENTRIES} == {
        "sd15", "sd3-512", "sd3-1024", "flux", "cifar10", "ffhq", "imagenet64", "lsun_bedroom_ldm",
    }  # fmt: skip
    assert CATALOGUE["tpami-sd15-best"].nfe == 20 and CATALOGUE["iccv-00001-cifar10-3-3-epd"].nfe == 3


def test_every_url_is_pinned_to_a_commit():
    pinned = re.compile(r"^https://raw\.githubusercontent\.com/BeierZhu/EPD/([0-9a-f]{40})/exps/[^/]+/[^/]+\.pkl$")
    for e in ENTRIES:
        match = pinned.match(e.url)
        assert match, e.url
        assert COMMITS[match[1]] == e.release, e.url


@pytest.mark.parametrize("source", ["../outside.pkl", "/tmp/outside.pkl", "sub/dir.pkl", "evil.py", ".hidden.pkl"])
def test_a_catalogue_whose_source_file_is_a_path_is_refused(tmp_path, source):
    """The download is written under its source name in a temporary folder, so a catalogue (``--catalogue`` takes
    any file) naming a path there would write outside it: such a catalogue does not load."""
    doc = json.loads((ROOT / "weights" / "catalogue.json").read_text())
    doc["entries"][0]["source_file"] = source
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EPDFileError, match="source_file"):
        load_catalogue(path)
    doc["entries"][0]["source_file"] = "sd15-best.pkl"  # a plain name loads
    path.write_text(json.dumps(doc))
    assert load_catalogue(path)[doc["entries"][0]["name"]].source_file == "sd15-best.pkl"


def test_catalogue_json_is_what_the_script_generates(tmp_path):
    out = tmp_path / "catalogue.json"
    with redirect_stdout(io.StringIO()):
        assert make_catalogue.main([str(OFFICIAL), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((ROOT / "weights" / "catalogue.json").read_text())


def test_catalogue_entries_match_the_files_contents():
    for e in ENTRIES:
        p = load_params(local_copy(e))
        assert (e.num_steps, e.num_points, e.nfe, e.student) == (p.num_steps, p.num_points, p.nfe, p.student)
        assert (e.schedule_type, e.backend) == (p.schedule_type, p.backend)


# --- fetch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_fetch_verifies_converts_and_matches_the_published_file(mirror, tmp_path, entry):
    path = fetch(entry, tmp_path, base_url=mirror.url)
    assert path == tmp_path / entry.filename
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.filename]  # no temporary left
    assert mirror.requests == [entry.url[len(UPSTREAM) :]]
    assert path.read_bytes()[8:9] == b"{"  # the project's safetensors, not the pickle
    got, ref = load_params(path), load_params(local_copy(entry))
    assert_same_table(got, ref)
    assert got.metadata["source_sha256"] == entry.sha256 == ref.metadata["source_sha256"]
    assert got.metadata["source_file"] == entry.source_file
    assert got.metadata["source_url"] == entry.url
    assert got.metadata["downloaded_from"] == mirror.url + entry.url[len(UPSTREAM) :]
    assert got.metadata["catalogue_entry"] == entry.name


@pytest.mark.parametrize(
    "mode,problem",
    [
        ("tamper", "sha256 mismatch"),
        ("truncate", "truncated transfer"),
        ("oversize", "sent more than the published"),
        ("announce_more", "announces"),
    ],
)
def test_a_wrong_answer_is_refused_and_leaves_nothing(mirror, tmp_path, mode, problem):
    mirror.mode = mode
    dest = tmp_path / "epd"
    dest.mkdir()
    with pytest.raises(EPDFileError, match=problem) as err:
        fetch(find_entry("tpami-sd15-best", CATALOGUE), dest, base_url=mirror.url)
    assert "tpami-sd15-best" in str(err.value)
    assert list(dest.iterdir()) == []


def test_a_server_that_never_answers_times_out_and_leaves_nothing(mirror, tmp_path):
    mirror.mode = "hang"
    dest = tmp_path / "models" / "epd"  # not there yet: created for the download, removed again
    start = time.monotonic()
    with pytest.raises(EPDFileError, match="timeout") as err:
        fetch(find_entry("tpami-flux-best", CATALOGUE), dest, base_url=mirror.url, timeout=1.0)
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 3.0, elapsed  # the socket timeout, plus a little slack on a busy machine
    assert "tpami-flux-best" in str(err.value) and mirror.requests
    assert not (tmp_path / "models").exists()


def test_a_full_disk_during_a_download_says_so_and_leaves_nothing(mirror, tmp_path, monkeypatch):
    """A full disk while the download was written read as a network failure: "Without a network here, fetch it on a
    machine with one ... and copy it into" the same full folder."""
    opened = Path.open

    class Full(io.BufferedWriter):
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full(self: Path, mode: str = "r", *args, **kwargs):
        return Full(io.FileIO(self, mode)) if mode == "wb" else opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(EPDFileError, match=r"cannot write tpami-sd15-best into .*: No space left on device; free"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url)
    assert list(tmp_path.iterdir()) == []


def test_offline_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(EPDFileError, match="connection refused") as err:
        fetch(find_entry("tpami-sd3-512-best", CATALOGUE), tmp_path, base_url=dead_url(), timeout=5)
    assert "tpami-sd3-512-best" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_bad_mirror_are_clear_errors(mirror, tmp_path):
    with pytest.raises(EPDFileError, match="HTTP 404"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url + "/elsewhere")
    with pytest.raises(EPDFileError, match="http:// or https://"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url="file:///etc")
    with pytest.raises(EPDFileError, match="not in the catalogue"):
        find_entry("sd15-best", CATALOGUE)
    assert list(tmp_path.iterdir()) == []


def test_mirror_from_the_environment(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, mirror.url + "/")
    path = fetch(find_entry("iccv-00021-ffhq-3-3-ipndm", CATALOGUE), tmp_path)
    assert mirror.requests == [CATALOGUE["iccv-00021-ffhq-3-3-ipndm"].url[len(UPSTREAM) :]]
    assert load_params(path).student == "ipndm"


def test_a_stopped_servers_download_folders_are_removed_not_a_live_one(mirror, tmp_path):
    """A server killed mid-download leaves ``.<name>.XXXXXXXX.download``; the next fetch of that entry removes it
    once it is older than any live transfer can be, and leaves younger ones and other entries' alone."""
    entry = CATALOGUE["tpami-sd15-best"]
    stale = tmp_path / f".{entry.name}.abcd1234.download"
    live = tmp_path / f".{entry.name}.efgh5678.download"
    other = tmp_path / ".tpami-sd3-512-best.ijkl9012.download"
    lookalike = tmp_path / f".{entry.name}.kept.download"  # not a name fetch makes
    for folder in (stale, live, other, lookalike):
        folder.mkdir()
        (folder / entry.source_file).write_bytes(b"partial")
    old = time.time() - 2 * 3600
    for path in (stale / entry.source_file, stale, other / entry.source_file, other, lookalike):
        os.utime(path, (old, old))
    fetch(entry, tmp_path, base_url=mirror.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.filename, live.name, other.name, lookalike.name])


def test_an_existing_download_is_reused_without_network(mirror, tmp_path):
    entry = CATALOGUE["tpami-sd15-best"]
    path = fetch(entry, tmp_path, base_url=mirror.url)
    before = (path.stat().st_mtime_ns, path.read_bytes())

    def no_network(url, timeout):
        raise AssertionError(f"network used for {url}")

    assert fetch(entry, tmp_path, opener=no_network) == path
    assert fetch(entry, tmp_path, base_url=dead_url(), opener=no_network) == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert len(mirror.requests) == 1


def test_another_file_of_that_name_is_never_replaced(mirror, tmp_path):
    other = tmp_path / "tpami-sd15-best.safetensors"
    save_params(load_params(OFFICIAL / "tpami" / "sd15-distilled.pkl"), other)
    before = other.read_bytes()
    with pytest.raises(EPDFileError, match="not the catalogue's tpami-sd15-best"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url)
    assert other.read_bytes() == before
    other.write_bytes(b"\x00" * 20)
    with pytest.raises(EPDFileError, match="unreadable"):
        fetch(find_entry("tpami-sd15-best", CATALOGUE), tmp_path, base_url=mirror.url)
    assert mirror.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]
    assert other.read_bytes() == b"\x00" * 20


def test_cli_catalogue_and_fetch(mirror, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["catalogue"]) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 44 and any(line.startswith("tpami-sd15-best ") for line in lines)
    with redirect_stdout(io.StringIO()):
        assert cli_main(["fetch", "tpami-sd3-1024-best", "--out", str(tmp_path), "--mirror", mirror.url]) == 0
        assert cli_main(["fetch", "no-such-table", "--out", str(tmp_path)]) == 2
        assert cli_main(["fetch", "tpami-flux-best", "--out", str(tmp_path), "--mirror", dead_url()]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tpami-sd3-1024-best.safetensors"]
    assert_same_table(load_params(tmp_path / "tpami-sd3-1024-best.safetensors"),
                      load_params(OFFICIAL / "tpami" / "sd3-1024-best.pkl"))  # fmt: skip
