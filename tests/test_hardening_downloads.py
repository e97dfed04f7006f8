"""Downloads against a hostile local mirror (127.0.0.1 only): dripping bytes, redirects elsewhere, interrupts,
and local files that only claim to be a catalogue entry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from epd_core import EPDFileError, load_params, save_params
from epd_core.catalogue import fetch, verify_local
from epd_dev.hostile import DATA, ENTRY, PATH, HostileMirror
from epd_dev.shared_data import OFFICIAL

pytestmark = pytest.mark.core


@pytest.fixture
def mirror():
    m = HostileMirror()
    yield m
    m.close()


@pytest.mark.parametrize("mode", ["drip", "drip_headers", "hang"])
def test_a_slow_server_fails_at_the_overall_deadline_and_leaves_nothing(mirror, tmp_path, mode):
    mirror.mode = mode
    t0 = time.monotonic()
    with pytest.raises(EPDFileError, match="timeout"):
        fetch(ENTRY, tmp_path, base_url=mirror.url, timeout=2.0)
    elapsed = time.monotonic() - t0
    print(f"\n{mode}: gave up after {elapsed:.2f} s (deadline 2 s)")
    assert 1.9 < elapsed < 3.0, elapsed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["drip", "hang"])
def test_a_download_stops_on_an_interrupt(mirror, tmp_path, mode):
    class Interrupted(Exception):
        pass

    mirror.mode = mode
    t0 = time.monotonic()
    pressed = t0 + 0.5

    def check() -> None:
        if time.monotonic() > pressed:
            raise Interrupted

    with pytest.raises(Interrupted):
        fetch(ENTRY, tmp_path / "epd", base_url=mirror.url, timeout=60, check_interrupt=check)
    late = time.monotonic() - pressed
    print(f"\n{mode}: stopped {late:.2f} s after the interrupt")
    assert late < 1.0, late
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["port", "ftp", "https"])
def test_redirects_to_another_scheme_host_or_port_are_refused(mirror, tmp_path, where):
    other = HostileMirror()
    try:
        mirror.mode = "redirect"
        mirror.target = {"port": other.url + PATH, "ftp": "ftp://127.0.0.1" + PATH,
                         "https": mirror.url.replace("http:", "https:") + PATH}[where]  # fmt: skip
        with pytest.raises(EPDFileError, match="redirect .* refused"):
            fetch(ENTRY, tmp_path, base_url=mirror.url, timeout=10)
        assert other.requests == [] and list(tmp_path.iterdir()) == []
    finally:
        other.close()


@pytest.mark.parametrize("target", ["http://[::1", "http://127.0.0.1:99999/x", "http://127.0.0.1:abc/x"])
def test_a_malformed_redirect_is_an_error_naming_the_entry(mirror, tmp_path, target):
    """urllib raises a bare ValueError on these; it escaped fetch, naming neither the entry nor the mirror."""
    mirror.mode, mirror.target = "redirect", target
    with pytest.raises(EPDFileError, match=f"cannot download {ENTRY.name} from {mirror.url}.*ValueError") as error:
        fetch(ENTRY, tmp_path, base_url=mirror.url, timeout=10)
    assert list(tmp_path.iterdir()) == []
    # and it says what to do without a network (it said only "... (offline?)")
    assert f"python -m epd_core fetch {ENTRY.name}, in this pack's folder) and copy {ENTRY.filename} into" in str(
        error.value
    )


def test_a_fetch_that_another_fetch_of_the_entry_overtook_returns_its_file(mirror, tmp_path, monkeypatch):
    """Two fetches of one entry (two servers sharing models/epd, or the CLI beside the server): the one that saved
    second failed, 'appeared while this table was made', though the file there was the entry's."""
    from epd_core import catalogue

    real = catalogue._download

    def overtaken(*args, **kwargs):
        real(*args, **kwargs)
        monkeypatch.setattr(catalogue, "_download", real)
        fetch(ENTRY, tmp_path, base_url=mirror.url, timeout=10)  # the other fetch saves first

    monkeypatch.setattr(catalogue, "_download", overtaken)
    path = fetch(ENTRY, tmp_path, base_url=mirror.url, timeout=10)
    assert verify_local(ENTRY, path) == path and sorted(p.name for p in tmp_path.iterdir()) == [ENTRY.filename]


def test_a_redirect_on_the_same_server_is_followed(mirror, tmp_path):
    mirror.mode = "redirect"
    mirror.target = "/moved" + PATH
    path = fetch(ENTRY, tmp_path, base_url=mirror.url, timeout=10)
    assert mirror.requests == [PATH, "/moved" + PATH]
    assert verify_local(ENTRY, path) == path


def test_a_local_file_claiming_an_entry_is_checked(tmp_path):
    other = tmp_path / ENTRY.filename
    save_params(load_params(OFFICIAL / "tpami" / "sd15-distilled.pkl"), other)
    with pytest.raises(EPDFileError, match="not the catalogue's tpami-sd15-best"):
        verify_local(ENTRY, other)
    forged = load_params(OFFICIAL / "tpami" / "sd3-512-best.pkl")  # right sha256 recorded, another table's shape
    save_params(forged.replace(metadata={"source_sha256": ENTRY.sha256}), other)
    with pytest.raises(EPDFileError, match="not the catalogue's"):
        verify_local(ENTRY, other)
    pkl = tmp_path / ENTRY.source_file
    pkl.write_bytes(DATA[:-1] + b"\0")
    with pytest.raises(EPDFileError):
        verify_local(ENTRY, pkl)
    pkl.write_bytes(DATA)
    assert verify_local(ENTRY, pkl) == pkl
    assert Path(verify_local(ENTRY, save_params(load_params(pkl).replace(metadata={
        "source_sha256": ENTRY.sha256}), other))) == other  # fmt: skip
