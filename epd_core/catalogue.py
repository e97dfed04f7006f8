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
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from . import __version__
from .files import MAX_FILE_BYTES, EPDFileError, load_params, save_params

__all__ = ["CatalogueEntry", "load_catalogue", "find_entry", "source_url", "fetch", "UPSTREAM", "MIRROR_ENV"]

UPSTREAM = "https://raw.githubusercontent.com/BeierZhu/EPD"
MIRROR_ENV = "EPD_CATALOGUE_MIRROR"
DEFAULT_TIMEOUT = 60.0
_CHUNK = 64 * 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PINNED = re.compile(re.escape(UPSTREAM) + r"/[0-9a-f]{40}/[A-Za-z0-9._/-]+$")

Opener = Callable[[str, float], Any]


class _Refused(Exception):
    """The server's answer is not the published file (size, length or hash)."""


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
        if not _NAME.match(self.name) or self.filename != f"{self.name}.safetensors":
            raise ValueError(f"bad catalogue name {self.name!r} / file name {self.filename!r}")
        if not _PINNED.match(self.url) or ".." in self.url:
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
    return _LOADED[key]


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


def _existing(entry: CatalogueEntry, path: Path) -> Path:
    """Reuse a converted file already at ``path`` when it is this entry's table; refuse to touch anything else."""
    try:
        params = load_params(path)
    except EPDFileError as exc:
        raise EPDFileError(
            path, f"exists but is unreadable ({exc.problem}); remove it to download {entry.name}"
        ) from None
    if params.metadata.get("source_sha256") != entry.sha256:
        raise EPDFileError(path, f"exists but is not the catalogue's {entry.name}; move it away to download it")
    return path


def _default_opener(url: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": f"epd_core/{__version__}"})  # noqa: S310
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310  (http/https only, checked above)


def _download(entry: CatalogueEntry, url: str, out: Path, timeout: float, opener: Opener) -> None:
    """Stream ``url`` into ``out``: at most ``entry.size`` bytes, within ``timeout``, with the published sha256."""
    deadline = time.monotonic() + timeout
    digest, received = hashlib.sha256(), 0
    with opener(url, timeout) as response, out.open("wb") as fh:
        announced = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
        if announced is not None and announced.isdigit() and int(announced) != entry.size:
            raise _Refused(f"the server announces {announced} bytes, the published file has {entry.size}")
        while chunk := response.read(min(_CHUNK, entry.size + 1 - received)):
            received += len(chunk)
            if received > entry.size:
                raise _Refused(f"the server sent more than the published {entry.size} bytes")
            if time.monotonic() > deadline:
                raise _Refused(f"transfer not finished within {timeout:g} s (timeout)")
            digest.update(chunk)
            fh.write(chunk)
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


def fetch(
    entry: CatalogueEntry,
    dest_dir: str | os.PathLike,
    *,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    opener: Opener | None = None,
) -> Path:
    """Download, verify and convert ``entry`` into ``dest_dir/<name>.safetensors``; reuse a valid existing file.

    ``base_url`` replaces the upstream prefix (default: ``$EPD_CATALOGUE_MIRROR``, else the pinned URL);
    ``timeout`` bounds each network wait and the whole transfer; ``opener(url, timeout)`` returns a response
    (default ``urllib.request.urlopen``). Every failure is an ``EPDFileError`` and leaves nothing on disk.
    """
    dest = Path(dest_dir)
    final = dest / entry.filename
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
            _download(entry, url, raw, timeout, opener or _default_opener)
        except _Refused as exc:
            raise EPDFileError(final, f"download of {entry.name} from {url} refused: {exc}") from None
        except (urllib.error.URLError, HTTPException, OSError) as exc:
            problem = _network_problem(exc, timeout)
            raise EPDFileError(final, f"cannot download {entry.name} from {url}: {problem}") from None
        _convert(entry, raw, url, final)
        ok = True
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        for folder in created if not ok else ():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return final


def _convert(entry: CatalogueEntry, raw: Path, url: str, final: Path) -> None:
    """The verified download through the safe loader, saved (atomically) with its provenance."""
    try:
        params = load_params(raw)
    except EPDFileError as exc:
        raise EPDFileError(final, f"downloaded {entry.name} from {url} but cannot read it: {exc.problem}") from None
    provenance = {**params.metadata, "source_url": entry.url, "catalogue_entry": entry.name}
    if url != entry.url:
        provenance["downloaded_from"] = url
    try:
        save_params(params.replace(metadata=provenance), final)
    except OSError as exc:
        raise EPDFileError(final, f"cannot save {entry.name}: {exc.strerror or exc}") from None
