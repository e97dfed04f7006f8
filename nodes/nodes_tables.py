"""Tables: the ``epd`` model folder, the published catalogue, and the nodes that load and draw a table."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..epd_core import EPDFileError, EPDParams, load_params
from ..epd_core.catalogue import CatalogueEntry, load_catalogue
from .guard import catalogue_file, user_error, user_text
from .inputs import EPDParamsType, epd_params_input
from .preview import table_image

FOLDER = "epd"
EXTENSIONS = {".safetensors", ".pkl"}
PACK_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
CATALOGUE = PACK_WEIGHTS / "catalogue.json"
DOWNLOAD = "[download] "
log = logging.getLogger("epd")


def register_folder() -> None:
    """``models/epd`` (and ``extra_model_paths.yaml`` entries named ``epd``) plus the pack's ``weights/``."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    if isinstance(exts, set):
        exts.update(EXTENSIONS)
    for path in (default, str(PACK_WEIGHTS)):
        if path not in paths:
            paths.append(path)


_CACHE: dict[tuple[str, int, int], EPDParams] = {}


def load_table(name: str) -> EPDParams:
    """Load a table by its name in the ``epd`` folder; errors name the file."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise user_error(ValueError(f"EPD table {name!r} not found in {folder_paths.get_folder_paths(FOLDER)}"))
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            _CACHE.clear()
            _CACHE[key] = load_params(path)
        except EPDFileError as exc:
            raise user_error(ValueError(f"cannot load EPD table: {exc}")) from None
    return _CACHE[key]


def _comfyui_entries() -> list[CatalogueEntry]:
    try:
        return [e for e in load_catalogue(CATALOGUE).values() if e.comfyui]
    except EPDFileError as exc:
        log.warning("EPD catalogue unavailable: %s", exc)
        return []


def table_choices() -> list[str]:
    """Local tables, then the catalogue's ComfyUI tables not downloaded yet, as ``[download] <name>``."""
    local = folder_paths.get_filename_list(FOLDER)
    return local + [DOWNLOAD + e.name for e in _comfyui_entries() if e.filename not in local]


def catalogue_choice(choice: str) -> CatalogueEntry | None:
    """The catalogue entry behind a ``[download]`` choice (downloaded or not), else None."""
    if not choice.startswith(DOWNLOAD):
        return None
    name = choice[len(DOWNLOAD) :]
    return next((e for e in _comfyui_entries() if e.name == name), None)


def resolve_table(choice: str) -> str:
    """The file name for a choice; a ``[download]`` table missing locally is fetched into models/epd first."""
    if not choice.startswith(DOWNLOAD):
        return choice
    entry = catalogue_choice(choice)
    if entry is None:
        raise ValueError(f"{choice!r}: no such published table in the EPD catalogue")
    return catalogue_file(entry)


def describe(params: EPDParams) -> str:
    source = params.metadata.get("source_file", "")
    return (
        f"{params.backend} table{' from ' + source if source else ''}: {params.num_steps - 1} steps x "
        f"{params.num_points} points, NFE {params.nfe}, student {params.student}, schedule {params.schedule_type}"
    )


class EPDParamsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="EPDParamsLoader",
            display_name="EPD Parameters Loader",
            category="loaders",
            description="Loads an EPD table (the project's .safetensors or the authors' .pkl, read without running "
            "code) from models/epd or the pack's weights folder. '[download]' entries are the authors' published "
            "tables: fetched on first run from their pinned commit, sha256-checked, stored in models/epd.",
            inputs=[
                io.Combo.Input(
                    "table_name",
                    options=table_choices(),
                    tooltip="EPD table file from models/epd or the pack's weights/ folder; '[download] <name>' "
                    "downloads that published table when the graph runs.",
                ),
            ],
            outputs=[
                EPDParamsType.Output(display_name="epd_params"),
                io.String.Output(display_name="info"),
            ],
        )

    @classmethod
    def validate_inputs(cls, table_name: str | None = None) -> bool | str:
        """Like the combo check, but a ``[download]`` choice stays valid after its table was downloaded."""
        if table_name is None or table_name in folder_paths.get_filename_list(FOLDER) or catalogue_choice(table_name):
            return True
        where = user_text(str(folder_paths.get_folder_paths(FOLDER)))
        return f"EPD table {table_name!r} not found in {where} nor in the catalogue"

    @classmethod
    def execute(cls, table_name: str) -> io.NodeOutput:
        params = load_table(resolve_table(table_name))
        return io.NodeOutput(params, describe(params))


class EPDParamsPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EPDParamsPreview",
            display_name="EPD Parameters Preview",
            category="loaders",
            description="Draws an EPD table: each step's interval on a log-sigma axis, where its intermediate points "
            "sit and how much each weighs, with the time and direction scales.",
            inputs=[epd_params_input(tooltip="The EPD table to draw.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, epd_params) -> io.NodeOutput:
        return io.NodeOutput(table_image(epd_params))


NODES = [EPDParamsLoader, EPDParamsPreview]
