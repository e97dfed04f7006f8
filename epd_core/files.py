"""Loading and saving EPD tables.

Two formats are read:

* the project's own ``.safetensors``: tensors ``r_params``, ``weight_s``,
  ``scale_dir_params``, ``scale_time_params`` (and optionally ``t_steps`` and ``afs_mean``),
  header metadata ``epd_format`` (``"1"``), ``hyper`` (JSON hyper-parameters)
  and ``provenance`` (JSON: source file and sha256, creating tool, ...);
* the authors' released ``.pkl`` predictors, through a pickle reader that
  never runs code (:mod:`epd_core.authors_format`).

Every failure raises :class:`EPDFileError`, which names the file.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .authors_format import read_authors_pickle
from .bases import BASES
from .params import MAX_POINTS, MAX_TIME_POINTS, TABLE_NAMES, EPDParams, shown
from .safe_pickle import PickleRefused

__all__ = [
    "EPDFileError", "load_params", "save_params", "check_destination", "params_from_authors", "check_table_size",
    "claim", "lock_path", "remove_leftovers", "MAX_FILE_BYTES", "MAX_TIME_POINTS", "MAX_POINTS",
]  # fmt: skip

MAX_FILE_BYTES = 16 * 1024 * 1024
FORMAT_VERSION = "1"
_MAX_HEADER_BYTES = 1024 * 1024


class EPDFileError(ValueError):
    """A table file could not be read or written; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable, as a worker process's error must be
        return type(self), (self.path, self.problem)


def _read_bounded(path: Path) -> bytes:
    if not path.exists():
        raise EPDFileError(path, "file does not exist")
    if not path.is_file():
        raise EPDFileError(path, "not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise EPDFileError(path, "file is empty")
    if size > MAX_FILE_BYTES:
        raise EPDFileError(path, f"file is {size} bytes; EPD tables are at most {MAX_FILE_BYTES} bytes")
    with path.open("rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise EPDFileError(path, "file grew past the size limit while reading")
    return data


def check_table_size(num_steps: Any, num_points: Any) -> None:
    """Refuse a table whose time points or points per step exceed :data:`MAX_TIME_POINTS` / :data:`MAX_POINTS`."""
    if isinstance(num_steps, int) and num_steps > MAX_TIME_POINTS:
        raise ValueError(f"{num_steps} time points; EPD tables have at most {MAX_TIME_POINTS}")
    if isinstance(num_points, int) and num_points > MAX_POINTS:
        raise ValueError(f"{num_points} points per step; EPD tables have at most {MAX_POINTS}")


def _check_tensor_shapes(shapes: dict[str, Any]) -> None:
    """Every tensor of a table is at most ``[MAX_TIME_POINTS - 1, MAX_POINTS]`` (``t_steps``: MAX_TIME_POINTS)."""
    limit = (MAX_TIME_POINTS - 1) * MAX_POINTS
    for name, shape in shapes.items():
        numel = 1
        for n in shape:
            numel *= n
            if numel > limit or len(shape) > 8:  # stops at once (a header of 49,000 huge dimensions took 10 s)
                raise ValueError(f"tensor {shown(name)} of shape {shown(list(shape))} exceeds the size limit of "
                                 f"{limit} values")  # fmt: skip


def _backend_of(hyper: dict[str, Any]) -> str:
    backend = hyper.get("backend")
    if backend in ("ldm", "sd3", "flux"):
        return backend
    if backend is not None:
        raise ValueError(f"unknown backend {shown(backend)}")
    if str(hyper.get("dataset_name", "")).endswith("_ldm"):
        return "ldm"
    return "edm"


def params_from_authors(tables: dict[str, torch.Tensor], hyper: dict[str, Any], provenance: dict) -> EPDParams:
    """Build :class:`EPDParams` from the authors' predictor state."""
    missing = [name for name in TABLE_NAMES if name not in tables]
    if missing:
        raise ValueError(f"predictor lacks tables {missing}")
    check_table_size(hyper.get("num_steps"), hyper.get("num_points"))
    _check_tensor_shapes({name: tuple(t.shape) for name, t in tables.items()})
    backend = _backend_of(hyper)
    shift = hyper.get("flowmatch_shift")
    if backend == "sd3" and shift is None:
        shift = 3.0  # SD3-Medium's scheduler config; the released SD3 files rely on it.
    known = {
        "dataset_name", "img_resolution", "num_steps", "sampler_stu", "sampler_tea", "M", "guidance_type",
        "guidance_rate", "schedule_type", "schedule_rho", "afs", "scale_dir", "scale_time", "max_order",
        "predict_x0", "lower_order_final", "num_points", "fcn", "alpha", "backend", "backend_config",
        "sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift",
    }  # fmt: skip
    extra_keys = ("img_resolution", "alpha", "predict_x0", "lower_order_final", "backend_config")
    extra = {k: hyper[k] for k in extra_keys if hyper.get(k) is not None}
    unknown = sorted(set(hyper) - known)
    teacher = hyper.get("sampler_tea")
    return EPDParams(
        **{name: tables[name] for name in TABLE_NAMES},
        num_steps=hyper.get("num_steps"),
        num_points=hyper.get("num_points"),
        student=hyper.get("sampler_stu"),
        max_order=hyper.get("max_order") if hyper.get("max_order") is not None else 4,
        schedule_type=hyper.get("schedule_type"),
        schedule_rho=hyper.get("schedule_rho") if hyper.get("schedule_rho") is not None else 1.0,
        afs=hyper.get("afs", False),
        scale_dir=hyper.get("scale_dir") or 0.0,
        scale_time=hyper.get("scale_time") or 0.0,
        fcn=hyper.get("fcn", False),
        sigma_min=hyper.get("sigma_min"),
        sigma_max=hyper.get("sigma_max"),
        flowmatch_shift=shift,
        flowmatch_mu=hyper.get("flowmatch_mu"),
        backend=backend,
        teacher=teacher if isinstance(teacher, str) else None,
        teacher_steps_m=hyper.get("M") if isinstance(hyper.get("M"), int) else None,
        guidance_type=hyper.get("guidance_type") if isinstance(hyper.get("guidance_type"), str) else None,
        guidance_rate=hyper.get("guidance_rate"),
        dataset_name=hyper.get("dataset_name") if isinstance(hyper.get("dataset_name"), str) else None,
        metadata={**provenance, "authors_extra": _jsonable(extra), "authors_unknown_keys": unknown},
    )


_MAX_JSON_DEPTH = 32
_MAX_JSON_ITEMS = 1 << 16  # counting every reference to a shared list (a pickle's memo makes them cheap)
_TEXT_PROVENANCE = ("source_file", "source_sha256", "catalogue_entry", "model", "command", "plugin_base")


def check_provenance(provenance: dict) -> None:
    """A ``ValueError`` for provenance a table file must not carry (loading refuses it, so saving does too)."""
    bad = [k for k in _TEXT_PROVENANCE if k in provenance and not isinstance(provenance[k], str)]
    if bad:
        raise ValueError(f"provenance {', '.join(bad)} must be text")
    if provenance.get("plugin_base") and provenance["plugin_base"] not in BASES:
        raise ValueError(f"provenance plugin_base {shown(provenance['plugin_base'])} is not a base EPD Plugin "
                         f"places points by ({', '.join(BASES)})")  # fmt: skip


def _jsonable(value: Any) -> Any:
    """The JSON-representable parts of metadata (the authors' extra hyper-parameters, a table's provenance), other
    values as their type's name; a ``ValueError`` past :data:`_MAX_JSON_DEPTH` levels or :data:`_MAX_JSON_ITEMS`
    items."""
    count = 0

    def walk(v: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if depth > _MAX_JSON_DEPTH or count > _MAX_JSON_ITEMS:
            raise ValueError(f"metadata nested deeper than {_MAX_JSON_DEPTH} levels or of more than "
                             f"{_MAX_JSON_ITEMS} items")  # fmt: skip
        if isinstance(v, dict):
            return {str(k): walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return repr(type(v).__name__)

    return walk(value, 1)


def _load_authors(path: Path, data: bytes) -> EPDParams:
    try:
        tables, hyper = read_authors_pickle(data)
    except PickleRefused as exc:
        raise EPDFileError(path, f"refused predictor pickle: {exc}") from None
    except (RecursionError, MemoryError, OverflowError, ValueError, TypeError, RuntimeError) as exc:
        raise EPDFileError(path, f"malformed predictor pickle ({type(exc).__name__})") from None
    provenance = {
        "source_file": path.name,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "source_format": "authors-pkl",
        "converted_by": f"epd_core {__version__}",
    }
    try:
        return params_from_authors(tables, hyper, provenance)
    except (ValueError, TypeError, RuntimeError, RecursionError, OverflowError) as exc:  # e.g. bool() of a tensor
        raise EPDFileError(path, f"invalid predictor contents ({type(exc).__name__}: {exc})") from None


def _read_safetensors_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError("too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"declared header length {n} is out of range")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


OPTIONAL_TENSORS = ("t_steps", "afs_mean")
_HYPER_FIELDS = set(EPDParams.__dataclass_fields__) - set(TABLE_NAMES) - {*OPTIONAL_TENSORS, "metadata"}


def _load_own(path: Path, data: bytes) -> EPDParams:
    try:
        header = _read_safetensors_header(data)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or meta.get("epd_format") != FORMAT_VERSION:
            raise ValueError("not an EPD table (missing epd_format metadata)")
        hyper = json.loads(meta.get("hyper", "null"))
        provenance = json.loads(meta.get("provenance", "{}"))
        if not isinstance(hyper, dict) or not isinstance(provenance, dict):
            raise ValueError("hyper and provenance metadata must be JSON objects")
        _jsonable(provenance)  # what saving it again needs
        check_provenance(provenance)
        shapes = {k: v.get("shape", ()) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        if not all(isinstance(v, list) and all(isinstance(n, int) for n in v) for v in shapes.values()):
            raise ValueError("tensor shapes must be lists of integers")
    except Exception as exc:  # JSON, struct
        raise EPDFileError(path, f"invalid safetensors file: {exc}") from None
    try:
        check_table_size(hyper.get("num_steps"), hyper.get("num_points"))
        _check_tensor_shapes(shapes)
    except ValueError as exc:
        raise EPDFileError(path, str(exc)) from None
    try:
        tensors = st_load(data)
    except Exception as exc:  # JSON, struct and safetensors' own SafetensorError
        raise EPDFileError(path, f"invalid safetensors file: {exc}") from None
    unknown = sorted(set(hyper) - _HYPER_FIELDS)
    if unknown:
        raise EPDFileError(path, f"unknown hyper-parameters {shown(unknown)}")
    extra = sorted(set(tensors) - set(TABLE_NAMES) - set(OPTIONAL_TENSORS))
    if extra:
        raise EPDFileError(path, f"unexpected tensors {shown(extra)}")
    missing = [name for name in TABLE_NAMES if name not in tensors]
    if missing:
        raise EPDFileError(path, f"missing tensors {missing}")
    try:
        return EPDParams(**hyper, **tensors, metadata=provenance)
    except (ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: an operation a tensor's dtype lacks
        raise EPDFileError(path, str(exc)) from None


def load_params(path: str | os.PathLike) -> EPDParams:
    """Read a table from the project's ``.safetensors`` or an authors' ``.pkl`` file."""
    path = Path(path)
    data = _read_bounded(path)
    # A safetensors header length of 128 mod 256 starts with 0x80 like a pickle: the length must fit the file.
    own = len(data) >= 9 and data[8:9] == b"{"
    if own and (data[:1] != b"\x80" or struct.unpack("<Q", data[:8])[0] <= len(data) - 8):
        return _load_own(path, data)
    if data[:1] == b"\x80":
        return _load_authors(path, data)
    raise EPDFileError(path, "neither an EPD .safetensors table nor a predictor pickle")


def check_destination(
    path: str | os.PathLike, overwrite: bool = False, hint: str = "overwrite replaces it", probe: bool = True
) -> Path:
    """``path`` as a place to write a table, or an :class:`EPDFileError`: no name, a folder, a missing or unwritable
    folder, something that is not a regular file, or (unless ``overwrite``) an existing file. ``probe`` writes and
    removes a file in the folder, for checks made long before the write (a save's own write reports the same)."""
    if not str(path):
        raise EPDFileError("''", "no file name given")
    path = Path(path)
    if path.is_dir():
        raise EPDFileError(path, "is a folder; give a file name")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file():
            raise EPDFileError(path, "exists and is not a regular file; not replacing it")
        if not overwrite:
            raise EPDFileError(path, f"exists; not replacing it ({hint})")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EPDFileError(path, "the destination folder does not exist")
    if not probe:
        return path
    try:  # a file written and removed at once: the folder takes new files (permissions, read-only mounts, space)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as exc:
        raise EPDFileError(path, f"cannot write in its folder ({exc.strerror or exc})") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)  # a run starting on this name may have cleared it as a leftover
    return path


def save_params(params: EPDParams, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``params`` in the project's format, atomically: a temporary file in the same folder, then a rename.

    With ``overwrite=False`` the final step itself refuses an existing file (a hard link, which fails if the
    name exists), so a file that appeared meanwhile is never replaced. Only a regular file is ever replaced;
    every failure is an :class:`EPDFileError` and leaves nothing behind.
    """
    path = check_destination(path, overwrite, probe=False)
    tensors = {name: getattr(params, name).contiguous() for name in TABLE_NAMES}
    for name in OPTIONAL_TENSORS:
        if getattr(params, name) is not None:
            tensors[name] = getattr(params, name).contiguous()
    provenance = dict(params.metadata)
    provenance.setdefault("created_by", f"epd_core {__version__}")
    try:
        check_provenance(provenance)
        meta = {
            "epd_format": FORMAT_VERSION,
            "hyper": json.dumps(params.hyper(), sort_keys=True),
            "provenance": json.dumps(_jsonable(provenance), sort_keys=True),
        }
    except ValueError as exc:
        raise EPDFileError(path, f"cannot write its metadata: {exc}") from None
    blob = st_save(tensors, metadata=meta)
    try:
        write_atomic(blob, path, overwrite)
    except FileExistsError:
        raise EPDFileError(
            path, "appeared while this table was made; not replacing it (overwrite replaces it)"
        ) from None
    except OSError as exc:
        raise EPDFileError(path, f"cannot write: {exc.strerror or exc}") from None
    return path


def lock(path: Path) -> int | None:
    """An exclusive advisory lock on ``path`` (created if absent): its file descriptor, or ``None`` while another
    holder (another process, or another descriptor in this one) has it. The system releases it when the holder's
    process dies, so a killed run leaves no lock held. Release with :func:`unlock`. A link or anything but a regular
    file at ``path`` is an ``OSError`` (a planted link is not followed)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            if os.name == "nt" and exc.errno in (errno.EACCES, errno.EDEADLK):  # msvcrt's "locked by another"
                return None
            raise
        try:  # the file may have been unlocked and removed between the open and the lock: lock the new one
            if os.name == "nt" or os.path.samestat(os.fstat(fd), os.lstat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock(path: Path, fd: int) -> None:
    """Release :func:`lock`'s ``fd`` and remove its file (where an open file can be removed: not on Windows)."""
    if os.name != "nt":
        Path(path).unlink(missing_ok=True)
    os.close(fd)


def _cut(name: str, size: int) -> str:
    """``name``'s start of at most ``size`` bytes as the file system stores it (a character is up to 4)."""
    return os.fsencode(name)[:size].decode("utf-8", errors="ignore")


def _fitted(name: str, size: int) -> str:
    """``name`` if it takes at most ``size`` bytes, else its start cut to leave room for ``-`` and a 16-digit hash of
    the whole: a legal name in what is left of a file name's 255 bytes, and two long names that start alike differ."""
    if len(os.fsencode(name)) <= size:
        return name
    return _cut(name, size - 17) + "-" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def lock_path(path: Path) -> Path:
    """The lock file that holds ``path`` for a run: ``.<name>.epd-lock`` beside it, ``.safetensors`` left out; a long
    name is cut and ends with a hash of the whole, so that the lock's name stays a legal one."""
    if not path.name:
        raise EPDFileError(path, "is not a file name")
    return path.with_name(f".{_fitted(path.name.removesuffix('.safetensors'), 236)}.epd-lock")


@contextmanager
def claim(path: Path, busy: str) -> Iterator[None]:
    """Hold ``path`` (a table or a checkpoint) for one run, through its :func:`lock_path`; ``ValueError(busy)`` at
    once while another run, in this process or another, holds it. A lock file that cannot be one (a folder, a link)
    is an :class:`EPDFileError`."""
    held = lock_path(Path(path))
    try:
        held.parent.mkdir(parents=True, exist_ok=True)
        fd = lock(held)
    except OSError as exc:
        planted = exc.errno in (errno.ELOOP, errno.EISDIR, errno.EINVAL) and held.parent.is_dir()
        fix = "; remove it" if planted else ""  # a link, a folder, a fifo: not a lock file this pack made
        raise EPDFileError(held, f"cannot hold this run's lock file ({exc.strerror or exc}){fix}") from None
    if fd is None:
        raise ValueError(busy)
    try:
        yield
    finally:
        unlock(held, fd)


def temp_prefix(path: Path) -> str:
    """The start of :func:`write_atomic`'s temporary names for ``path``: ``.<name>.``, a name longer than 241 bytes
    cut and ended with a hash of the whole, so that with mkstemp's 8 characters and ``.tmp`` it stays within a file
    system's 255 bytes (a legal long name stays writable, whatever its characters) and two long names that start
    alike keep apart (:func:`remove_leftovers` of one would take the other's write under way)."""
    return f".{_fitted(path.name, 241)}."


def remove_leftovers(path: str | os.PathLike) -> None:
    """The temporary files :func:`write_atomic` left for ``path`` when a kill stopped it: exactly its
    :func:`temp_prefix`, mkstemp's 8 characters and ``.tmp`` (a longer name that starts like this one is another
    file's write, perhaps under way; a folder of such a name is not ours)."""
    path = Path(path)
    own = re.compile(re.escape(temp_prefix(path)) + r"[a-z0-9_]{8}\.tmp")
    for tmp in path.parent.glob(f"{glob.escape(temp_prefix(path))}*.tmp"):
        if own.fullmatch(tmp.name) and (not tmp.is_dir() or tmp.is_symlink()):
            tmp.unlink(missing_ok=True)


def write_atomic(blob: bytes, path: Path, overwrite: bool) -> None:
    """``blob`` into ``path`` through a temporary file in the same folder; never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a table is a shareable file
        except PermissionError:  # a FAT / exFAT or SMB drive keeps its mount's modes and refuses the change
            pass
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and FileExistsError if the name is taken
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if path.exists():  # a folder without hard links: check, then rename (a tiny window)
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
