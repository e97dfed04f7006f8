"""The authors' published tables, downloaded on request.

A catalogue file (the pack ships ``weights/catalogue.json``, written by
``scripts/make_catalogue.py``; callers pass its path) lists every
predictor file the EPD authors published, pinned to a commit of their
repository, with its sha256 and size; the files themselves are not
redistributed. :func:`fetch` downloads one entry, checks its size and sha256,
converts it through the safe loader (:func:`epd_core.load_params`, never
``pickle``) and saves it as ``<name>.safetensors`` in the project's format.

A mirror can replace ``https://raw.githubusercontent.com/BeierZhu/EPD`` (the
``base_url`` argument or the ``EPD_CATALOGUE_MIRROR`` environment variable);
it must serve the same ``<commit>/<path>`` layout. Every failure raises
:class:`~epd_core.files.EPDFileError` and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from . import __version__
from .files import MAX_FILE_BYTES, EPDFileError, load_params, save_params

__all__ = [
    "CatalogueEntry", "load_catalogue", "find_entry", "source_url", "fetch", "verify_local", "remove_stale_downloads",
    "UPSTREAM", "MIRROR_ENV",
]  # fmt: skip

UPSTREAM = "https://raw.githubusercontent.com/BeierZhu/EPD"
MIRROR_ENV = "EPD_CATALOGUE_MIRROR"
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 86_400.0  # a day: beyond, the deadline overflows the platform's clock
_CHUNK = 64 * 1024
_POLL = 0.2  # seconds between checks of the deadline and of an interrupt
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.pkl")
_PINNED = re.compile(re.escape(UPSTREAM) + r"/[0-9a-f]{40}/[A-Za-z0-9._/-]+")

Opener = Callable[[str, float], Any]


class _Refused(Exception):
    """The server's answer is not the published file (size, length or hash)."""


class _WriteFailed(Exception):
    """The download's own file could not be written (a full disk): not a network problem."""


def _local(write: Callable[[], object]) -> None:
    """``write()`` on the download's own file, its ``OSError`` as :class:`_WriteFailed`."""
    try:
        write()
    except OSError as exc:
        raise _WriteFailed(exc.strerror or str(exc)) from None


@dataclass(frozen=True)
class CatalogueEntry:
    """One published table: where it lives upstream, what it holds, how it is stored locally."""

    name: str
    release: str
    family: str
    comfyui: bool
    student: str
    num_steps: int
    num_points: int
    nfe: int
    schedule_type: str
    backend: str
    source_file: str
    url: str
    sha256: str
    size: int
    filename: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.filename != f"{self.name}.safetensors":
            raise ValueError(f"bad catalogue name {self.name!r} / file name {self.filename!r}")
        if not _SOURCE.fullmatch(self.source_file):  # the download's name in a temporary folder: never a path
            raise ValueError(f"{self.name}: source_file {self.source_file!r} is not a plain .pkl file name")
        if not _PINNED.fullmatch(self.url) or ".." in self.url:
            raise ValueError(f"{self.name}: url {self.url!r} is not pinned to a commit of {UPSTREAM}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256) or not 0 < self.size <= MAX_FILE_BYTES:
            raise ValueError(f"{self.name}: bad sha256 or size")


_LOADED: dict[tuple[str, int], dict[str, CatalogueEntry]] = {}


def load_catalogue(path: str | os.PathLike) -> dict[str, CatalogueEntry]:
    """The entries of the catalogue file ``path`` by name (cached while the file is unchanged)."""
    path = Path(path)
    try:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _LOADED:
            doc = json.loads(path.read_text(encoding="utf-8"))
            entries = [CatalogueEntry(**item) for item in doc["entries"]]
            _LOADED.clear()
            _LOADED[key] = {e.name: e for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EPDFileError(path, f"cannot read the catalogue: {exc}") from None
    return dict(_LOADED[key])  # a copy: a caller's change never reaches the next caller (the loader node)


def find_entry(name: str, catalogue: dict[str, CatalogueEntry]) -> CatalogueEntry:
    """The entry called ``name`` (``.safetensors`` suffix allowed); an unknown name is an ``EPDFileError``."""
    entry = catalogue.get(name.removesuffix(".safetensors"))
    if entry is None:
        raise EPDFileError(name, "not in the catalogue (`python -m epd_core catalogue` lists the entries)")
    return entry


def source_url(entry: CatalogueEntry, base_url: str | None = None) -> str:
    """The entry's pinned URL, or the same ``<commit>/<path>`` under a mirror (argument, else environment)."""
    base = base_url if base_url is not None else os.environ.get(MIRROR_ENV, "")
    if not base:
        return entry.url
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EPDFileError(entry.filename, f"catalogue mirror {base!r} must be an http:// or https:// URL")
    return base + entry.url[len(UPSTREAM) :]


def verify_local(entry: CatalogueEntry, path: str | os.PathLike) -> Path:
    """``path``, a local file named like ``entry``, when it is that entry's table; else an ``EPDFileError``.

    A converted file records the sha256 of the file it came from, and its shape must match the entry; an
    authors' file must have the entry's sha256 itself.
    """
    return _existing(entry, Path(path))


def _existing(entry: CatalogueEntry, path: Path) -> Path:
    """Reuse a converted file already at ``path`` when it is this entry's table; refuse to touch anything else."""
    if path.suffix == ".pkl" and path.is_file() and path.stat().st_size == entry.size:
        if hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256:
            return path
    try:
        params = load_params(path)
    except EPDFileError as exc:
        raise EPDFileError(
            path, f"exists but is unreadable ({exc.problem}); remove it to download {entry.name}"
        ) from None
    shape = (params.num_steps, params.num_points, params.student, params.schedule_type)
    if params.metadata.get("source_sha256") != entry.sha256 or shape != (
        entry.num_steps, entry.num_points, entry.student, entry.schedule_type
    ):  # fmt: skip
        raise EPDFileError(path, f"exists but is not the catalogue's {entry.name}; move it away to download it")
    return path


class _Transfer:
    """What the download thread shares with the waiting one: its sockets, its outcome, an abort flag."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.aborted = threading.Event()
        self.error: BaseException | None = None

    def connection(self, cls: type) -> type:
        """``cls`` (an ``http.client`` connection) recording its socket, so that a stalled read can be cut."""
        transfer = self

        class Recording(cls):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                transfer.sockets.append(self.sock)
                if transfer.aborted.is_set():
                    self.sock.shutdown(socket.SHUT_RDWR)

        return Recording

    def abort(self) -> None:
        self.aborted.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _same_origin(old: str, new: str) -> bool:
    a, b = urllib.parse.urlsplit(old), urllib.parse.urlsplit(new)
    default = {"http": 80, "https": 443}
    return (a.scheme, a.hostname, a.port or default.get(a.scheme)) == (
        b.scheme,
        b.hostname,
        b.port or default.get(b.scheme),
    )


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme, host and port (a mirror may move files, not the download)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        if not _same_origin(req.full_url, newurl):
            raise _Refused(f"redirect to {newurl} (another scheme, host or port) refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener_for(transfer: _Transfer) -> Opener:
    """``urlopen`` with same-origin redirects and sockets the waiting thread can cut."""

    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kwargs):  # noqa: ANN001, ANN201
            return super().do_open(transfer.connection(http_class), req, **kwargs)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kwargs):  # noqa: ANN001, ANN201
            return super().do_open(transfer.connection(http_class), req, **kwargs)

    opener = urllib.request.build_opener(HTTP, HTTPS, _SameOriginRedirects)

    def open_url(url: str, timeout: float) -> Any:
        request = urllib.request.Request(url, headers={"User-Agent": f"epd_core/{__version__}"})  # noqa: S310
        return opener.open(request, timeout=timeout)  # http/https only, checked by source_url

    return open_url


def _download(
    entry: CatalogueEntry,
    url: str,
    out: Path,
    timeout: float,
    opener: Opener | None,
    check_interrupt: Callable[[], None] | None = None,
) -> None:
    """Stream ``url`` into ``out``: at most ``entry.size`` bytes, within ``timeout`` in all, with the published
    sha256. The transfer runs in a thread; this one checks the deadline and ``check_interrupt()`` every
    ``_POLL`` seconds and, past the deadline or on an interrupt, cuts the connection."""
    transfer = _Transfer()
    open_url = opener or _opener_for(transfer)
    deadline = time.monotonic() + timeout
    worker = threading.Thread(
        target=_transfer_body, args=(transfer, entry, url, out, timeout, open_url), name="epd-download", daemon=True
    )
    worker.start()
    try:
        while worker.is_alive():
            worker.join(min(_POLL, max(0.0, deadline - time.monotonic())))
            if check_interrupt is not None:
                check_interrupt()
            if worker.is_alive() and time.monotonic() >= deadline:
                raise _Refused(f"transfer not finished within {timeout:g} s (timeout)")
    finally:
        transfer.abort()
        worker.join(_POLL)
    if transfer.error is not None:
        raise transfer.error


def _transfer_body(transfer: _Transfer, entry: CatalogueEntry, url: str, out: Path, timeout: float,
                   open_url: Opener) -> None:  # fmt: skip
    try:
        _stream(transfer, entry, url, out, timeout, open_url)
    except BaseException as exc:  # handed to the waiting thread
        transfer.error = exc


def _stream(transfer: _Transfer, entry: CatalogueEntry, url: str, out: Path, timeout: float,
            open_url: Opener) -> None:  # fmt: skip
    digest, received = hashlib.sha256(), 0
    with open_url(url, timeout) as response, out.open("wb") as fh:
        announced = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
        if announced is not None and announced.isdigit() and int(announced) != entry.size:
            raise _Refused(f"the server announces {announced} bytes, the published file has {entry.size}")
        read = getattr(response, "read1", response.read)  # read1: whatever one receive brings, never waits for more
        while not transfer.aborted.is_set() and (chunk := read(min(_CHUNK, entry.size + 1 - received))):
            received += len(chunk)
            if received > entry.size:
                raise _Refused(f"the server sent more than the published {entry.size} bytes")
            digest.update(chunk)
            _local(lambda: fh.write(chunk))  # noqa: B023 (called at once)
        _local(fh.flush)
    if transfer.aborted.is_set():
        return
    if received < entry.size:
        raise _Refused(f"truncated transfer: {received} of {entry.size} bytes")
    if digest.hexdigest() != entry.sha256:
        raise _Refused(f"sha256 mismatch: got {digest.hexdigest()}, published {entry.sha256}")


def _network_problem(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s (timeout)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (offline, or the mirror is down?)"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name (offline?): {reason.strerror}"
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


STALE_AFTER_S = 3600.0  # a download's folder untouched this long was left by a server that stopped mid-transfer


def _newest_mtime(folder: Path) -> float:
    return max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])


def remove_stale_downloads(entry: CatalogueEntry, dest_dir: str | os.PathLike, older_than: float) -> list[Path]:
    """Remove ``entry``'s download folders in ``dest_dir`` (``.<name>.XXXXXXXX.download``, as :func:`fetch` makes
    them) untouched for ``older_than`` seconds: a stopped server's leftovers, as a live transfer ends within its
    timeout. Returns the folders removed."""
    pattern = re.compile(rf"\.{re.escape(entry.name)}\.[a-z0-9_]{{8}}\.download")
    now, removed = time.time(), []
    try:
        candidates = [p for p in Path(dest_dir).iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            if now - _newest_mtime(folder) > older_than and not folder.is_symlink():
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: the download goes on either way
    return removed


def fetch(
    entry: CatalogueEntry,
    dest_dir: str | os.PathLike,
    *,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    opener: Opener | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> Path:
    """Download, verify and convert ``entry`` into ``dest_dir/<name>.safetensors``; reuse a valid existing file.

    ``base_url`` replaces the upstream prefix (default: ``$EPD_CATALOGUE_MIRROR``, else the pinned URL);
    ``timeout`` bounds the whole transfer (checked every 0.2 s, also while the server sends nothing);
    ``opener(url, timeout)`` returns a response (default: ``urlopen`` following redirects only within the same
    scheme, host and port); ``check_interrupt()`` is called every 0.2 s and may raise to stop (ComfyUI's
    interrupt). Every failure is an ``EPDFileError`` (an interrupt: its own exception) and leaves nothing on disk.
    Download folders of this entry that a stopped server left behind (untouched for ``STALE_AFTER_S``, and for
    longer than ``timeout``) are removed.
    """
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT):
        raise ValueError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT}], got {timeout!r}")
    dest = Path(dest_dir)
    final = dest / entry.filename
    if dest.is_dir():
        remove_stale_downloads(entry, dest, max(STALE_AFTER_S, 2 * timeout))
    if final.exists():
        return _existing(entry, final)
    url = source_url(entry, base_url)
    created = [d for d in (dest, *dest.parents) if not d.exists()]  # removed again if the fetch fails
    work: Path | None = None
    ok = False
    try:
        try:
            dest.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".download", dir=dest))
        except OSError as exc:
            raise EPDFileError(final, f"cannot write {entry.name} into {dest}: {exc.strerror or exc}") from None
        raw = work / entry.source_file
        try:
            _download(entry, url, raw, timeout, opener, check_interrupt)
        except _Refused as exc:
            raise EPDFileError(final, f"download of {entry.name} from {url} refused: {exc}") from None
        except _WriteFailed as exc:
            raise EPDFileError(final, f"cannot write {entry.name} into {dest}: {exc}; free space on that disk or make "
                               "the folder writable") from None  # fmt: skip
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:  # ValueError: a malformed URL
            problem = _network_problem(exc, timeout)
            raise EPDFileError(
                final,
                f"cannot download {entry.name} from {url}: {problem}. Without a network here, fetch it on a machine "
                f"with one (python -m epd_core fetch {entry.name}, in this pack's folder) and copy {final.name} into "
                f"{dest}",
            ) from None
        final = _convert(entry, raw, url, final)
        ok = True
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        for folder in created if not ok else ():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return final


def _convert(entry: CatalogueEntry, raw: Path, url: str, final: Path) -> Path:
    """The verified download through the safe loader, saved (atomically) with its provenance."""
    try:
        params = load_params(raw)
    except EPDFileError as exc:
        raise EPDFileError(final, f"downloaded {entry.name} from {url} but cannot read it: {exc.problem}") from None
    provenance = {**params.metadata, "source_url": entry.url, "catalogue_entry": entry.name}
    if url != entry.url:
        provenance["downloaded_from"] = url
    try:
        save_params(params.replace(metadata=provenance), final, overwrite=False)  # one that appeared meanwhile stays
    except EPDFileError as exc:
        if final.is_file() and not final.is_symlink():  # another fetch of this entry finished first: use it if it is
            return _existing(entry, final)
        raise EPDFileError(final, f"cannot save {entry.name}: {exc.problem}") from None
    return final
