"""What the nodes show and fetch on a user's behalf: file names as the user knows them, verified catalogue files.

Error texts name files relative to ComfyUI's base folder (``models/epd/x.safetensors``), the pack's own tables
as ``<EPD pack>/weights/...`` and other configured ``epd`` folders as ``<epd folder N>/...``: never the
server's absolute paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import comfy.model_management
import folder_paths

from ..epd_core.catalogue import CatalogueEntry, fetch, verify_local
from ..epd_core.files import EPDFileError

FOLDER = "epd"
PACK = Path(__file__).resolve().parents[1]


def _labels() -> list[tuple[str, str]]:
    """(absolute prefix, label) pairs, longest prefix first."""
    pairs = [(str(PACK / "weights"), "<EPD pack>/weights"), (str(PACK), "<EPD pack>")]
    base = os.path.abspath(folder_paths.base_path)
    for i, folder in enumerate(folder_paths.get_folder_paths(FOLDER)):
        folder = os.path.abspath(folder)
        if not folder.startswith(base + os.sep) and not folder.startswith(str(PACK)):
            pairs.append((folder, f"<epd folder {i}>"))
    pairs.append((base, "."))
    for raw, label in list(pairs):  # the same folders reached through symbolic links
        real = os.path.realpath(raw)
        if real != raw:
            pairs.append((real, label))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def user_text(text: str) -> str:
    """``text`` with every absolute folder the server knows replaced by the name the user knows."""
    for prefix, label in _labels():
        text = re.sub(re.escape(prefix + os.sep), "" if label == "." else label + "/", text)
        text = re.sub(re.escape(prefix) + r"(?![\w.-])", label, text)
    return text


def user_path(path: str | os.PathLike) -> str:
    """A file's name as the user knows it (``models/epd/x.safetensors``)."""
    return user_text(os.path.abspath(path))


def user_error(exc: Exception) -> ValueError:
    """A node error for ``exc`` without absolute server paths."""
    return ValueError(user_text(str(exc)))


def catalogue_file(entry: CatalogueEntry) -> str:
    """The file name of a catalogue table: a local file of that name only if it is that table (its sha256),
    else downloaded into ``models/epd`` (interruptible from the UI)."""
    try:
        local = folder_paths.get_full_path(FOLDER, entry.filename)
        if local is not None:
            verify_local(entry, local)
        else:
            fetch(
                entry,
                folder_paths.get_folder_paths(FOLDER)[0],
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
            )
    except EPDFileError as exc:
        raise user_error(exc) from None
    return entry.filename
