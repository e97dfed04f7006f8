"""A training node's output: the table's file in ``models/epd``, held while a run trains it.

The name is checked before the run (:func:`output_path`), the file is held against a second run of that name
(:func:`claimed`), its checkpoint is kept beside it (:func:`resume_options`), and the saved file's state gives the
node's fingerprint for ComfyUI's cache (:func:`saved_generation`, per run settings: :func:`settings_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import folder_paths
from comfy_execution.graph_utils import is_link

from ..epd_core import EPDParams
from ..epd_core.catalogue import load_catalogue
from ..epd_core.checkpoint import checkpoint_path
from ..epd_core.files import EPDFileError, check_destination, claim, remove_leftovers, save_params
from .guard import PACK, user_error, user_path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")  # used with fullmatch: "$" would accept "name\n"


def output_path(filename: str, overwrite: bool) -> Path:
    """``<filename>.safetensors`` in the first ``epd`` folder (``models/epd`` unless extra_model_paths.yaml names
    one first), or the file of that name the loader finds in any ``epd`` folder (a new file in the first folder
    would hide it). Refuses odd names, names of the pack's bundled or downloadable tables (the trained file would
    shadow them) and, unless asked, existing files."""
    stem = filename.removesuffix(".safetensors")
    if not _NAME.fullmatch(stem) or ".." in stem:
        raise ValueError(f"invalid table name {filename!r}: up to 101 ASCII letters (A-Z, a-z), digits, '.', '_' "
                         "and '-', starting with a letter or digit, without '..'")  # fmt: skip
    reserved = {p.stem.lower() for p in (PACK / "weights").rglob("*") if p.suffix in (".safetensors", ".pkl")}
    try:
        reserved |= {name.lower() for name in load_catalogue(PACK / "weights" / "catalogue.json")}
    except EPDFileError:
        pass
    if stem.lower() in reserved:
        raise ValueError(f"{stem!r} is the name of a table bundled with or published for the pack; choose another")
    found = folder_paths.get_full_path("epd", f"{stem}.safetensors")
    path = Path(found) if found is not None else Path(folder_paths.get_folder_paths("epd")[0]) / f"{stem}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of a folder's name on the way, no permission
        raise ValueError(f"{user_path(path.parent)}: cannot create this folder for the table ({exc.strerror or exc}); "
                         "fix the 'epd' folder in extra_model_paths.yaml or its permissions") from None  # fmt: skip
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ValueError(
            f"{user_path(path)} exists; set overwrite to replace it, or another filename (a seed whose "
            "'control after generate' is 'randomize' trains again on every Queue: set it to 'fixed')"
        )
    try:  # what saving refuses (a folder or a link of that name), refused before the training rather than after
        check_destination(path, overwrite)
    except EPDFileError as exc:
        raise user_error(exc) from None
    if checkpoint_path(path).is_dir():
        raise ValueError(f"{user_path(checkpoint_path(path))} is a folder where this run keeps its checkpoint; "
                         "remove it or give another filename")  # fmt: skip
    return path


@contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Hold ``path`` for one training run (its checkpoint and its table): another run of that name, on another
    ComfyUI server sharing the folder, is refused at its start. It dropped the running one's checkpoint as "another
    run's", and the two then wrote one checkpoint in turn (a crash could not resume) or removed each other's
    checkpoint writes under way (a failed save)."""
    with ExitStack() as held:
        try:
            held.enter_context(claim(path, f"{user_path(path)} is being trained by another run (another ComfyUI "
                                           "server sharing this folder?); wait for it to finish, or give another "
                                           "filename"))  # fmt: skip
        except EPDFileError as exc:
            raise user_error(exc) from None
        remove_leftovers(path)  # what a kill during this table's save left
        yield


def save_output(params: EPDParams, path: Path, overwrite: bool, settings: str | None = None) -> str:
    """Save a trained table; without ``overwrite`` a file that appeared during training is kept. Returns the
    file's name as the user knows it. The run's checkpoint goes once the table is saved. ``settings``: the run's
    :func:`settings_key` (None outside ComfyUI's executor), for :func:`saved_generation`."""
    try:
        save_params(params, path, overwrite=overwrite)
    except EPDFileError as exc:
        raise user_error(exc) from None
    checkpoint_path(path).unlink(missing_ok=True)
    state = _file_state(path)
    runs = _SAVED.setdefault(path.stem, {})
    old = runs.get(settings, {})
    runs[settings] = {"path": path, "state": state, "seen": state, "generation": old.get("generation", 0)}
    return user_path(path)


# a table's name -> the run settings that saved it (settings_key) -> the file as that run left it (saved_generation)
_SAVED: dict[str, dict[str | None, dict]] = {}


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def settings_key(inputs: Mapping[str, object]) -> str:
    """A training node's constant inputs (its widgets) hashed: the same for the inputs ComfyUI gives the fingerprint
    (a linked input as None) and for the node's inputs in the prompt (a linked input as a link)."""
    constants = {name: value for name, value in inputs.items() if value is not None and not is_link(value)}
    return hashlib.sha256(json.dumps(constants, sort_keys=True, default=str).encode()).hexdigest()


def prompt_settings(hidden: object, names: Collection[str]) -> str | None:
    """The :func:`settings_key` of the executing node's inputs in its prompt (``hidden``: a V3 node's
    ``cls.hidden``, with the dynamic prompt, which holds the nodes a node expansion made too, and the node's id);
    None when called outside ComfyUI's executor. Only the node's inputs (``names``) count: ComfyUI gives the
    fingerprint no other key of the prompt (an API prompt's ``steps`` from before ``nfe``)."""
    dynprompt, node_id = getattr(hidden, "dynprompt", None), getattr(hidden, "unique_id", None)
    if dynprompt is None or node_id is None or not dynprompt.has_node(str(node_id)):
        return None
    inputs = dynprompt.get_node(str(node_id)).get("inputs")
    if not isinstance(inputs, dict):
        return None
    return settings_key({name: value for name, value in inputs.items() if name in names})


def saved_generation(filename: object, settings: str | None = None) -> str:
    """A training node's fingerprint: the same while the file its run with these ``settings`` saved under
    ``filename`` is as that run left it (ComfyUI keeps the cached run), a new one once that file is deleted or
    replaced, so the next Queue trains again (the cached report said 'saved' about a file no longer there). A run
    with other settings saving that name replaces it too: under ComfyUI's LRU cache, settings A, then B, then A
    again gave A's cached report and table while the file held B's table. A linked ``filename`` (None: ComfyUI
    gives the fingerprint constants only) counts every table saved with these settings: it looked up a table
    named 'None', so a deleted table fed its name by a String node was never trained again."""
    names = list(_SAVED) if filename is None else [str(filename).removesuffix(".safetensors")]
    return str(sum(_generation(_SAVED[name].get(settings)) for name in names if name in _SAVED))


def _generation(saved: dict | None) -> int:
    """How many times the file a run saved (``saved``: its :data:`_SAVED` entry) was deleted or replaced since."""
    if saved is None:
        return 0
    state = _file_state(saved["path"])
    if state not in (saved["state"], saved["seen"]):
        saved["generation"] += 1
        saved["seen"] = state
    return saved["generation"]


def resume_options(path: Path, iterations: int) -> dict:
    """Checkpoint options for a node's run writing ``path``: about 20 saves per run, at least every 25
    iterations; a later run with the same settings and model resumes from it."""
    return {"checkpoint": checkpoint_path(path), "checkpoint_every": max(1, min(25, iterations // 20))}
