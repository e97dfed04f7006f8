"""Tables: the ``epd`` model folder, the published catalogue, and the nodes that load and draw a table."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..epd_core import EPDFileError, EPDParams, load_params, make_schedule
from ..epd_core.catalogue import CatalogueEntry, load_catalogue
from ..epd_core.rdpo import fitted_final_estimate
from .guard import catalogue_file, user_error, user_text
from .inputs import EPDParamsType, epd_params_input
from .preview import table_image, table_shape

FOLDER = "epd"
EXTENSIONS = {".safetensors", ".pkl"}
PACK_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
CATALOGUE = PACK_WEIGHTS / "catalogue.json"
DOWNLOAD = "[download] "
log = logging.getLogger("epd")


def _other_copy(path: str) -> bool:
    """Whether ``path`` is the ``weights/`` folder of another installed copy of this pack."""
    folder = Path(path)
    return (
        folder.name == PACK_WEIGHTS.name
        and (folder / CATALOGUE.name).is_file()
        and (folder.parent / "epd_core").is_dir()
        and os.path.realpath(folder) != os.path.realpath(PACK_WEIGHTS)
    )


def register_folder() -> None:
    """``models/epd`` (and ``extra_model_paths.yaml`` entries named ``epd``) plus the pack's ``weights/``. Another
    copy of the pack (an old clone beside a new one) registered its own ``weights/`` first, while ComfyUI keeps the
    nodes of the copy loaded last: this copy's bundled tables replace that copy's, so the nodes read their own."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    if isinstance(exts, set):
        exts.update(EXTENSIONS)
    for other in [path for path in paths if _other_copy(path)]:
        paths.remove(other)
        log.warning("EPD: two copies of this pack are installed, %s and %s; ComfyUI uses the nodes of the latter, "
                    "and so its tables. Remove one.", Path(other).parent, PACK_WEIGHTS.parent)  # fmt: skip
    for path in (default, str(PACK_WEIGHTS)):
        if path not in paths:
            paths.append(path)


_CACHE: dict[tuple[str, int, int], EPDParams] = {}
MISSING_TABLE_HINT = (
    ": pick one of EPD Params Loader's tables (press R in ComfyUI to refresh its list), or put the file in one of "
    "these folders"
)


def load_table(name: str) -> EPDParams:
    """Load a table by its name in the ``epd`` folder; errors name the file."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        where = folder_paths.get_folder_paths(FOLDER)
        raise user_error(ValueError(f"EPD table {name!r} not found in {where}{MISSING_TABLE_HINT}"))
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            _CACHE.clear()
            _CACHE[key] = load_params(path)
        except EPDFileError as exc:
            raise user_error(ValueError(f"cannot load EPD table: {exc}")) from None
    return _CACHE[key]


def _all_entries() -> dict[str, CatalogueEntry]:
    try:
        return load_catalogue(CATALOGUE)
    except EPDFileError as exc:
        log.warning("EPD catalogue unavailable: %s", exc)
        return {}


def _comfyui_entries() -> list[CatalogueEntry]:
    return [e for e in _all_entries().values() if e.comfyui]


def download_choice(entry: CatalogueEntry) -> str:
    """``[download] <model family>/<name>``: the loader's list groups published tables by the model they fit."""
    return f"{DOWNLOAD}{entry.family}/{entry.name}"


def table_choices() -> list[str]:
    """Local tables (those for the pack's demo models under ``demo/``), then the catalogue's ComfyUI tables not
    downloaded yet, as ``[download] <family>/<name>``."""
    local = local_tables()
    return local + [download_choice(e) for e in _comfyui_entries() if e.filename not in local]


def local_tables() -> list[str]:
    """The table files in the epd folders, without hidden ones (a download in progress, or one a stopped server
    left behind, is written under a hidden folder there)."""
    names = folder_paths.get_filename_list(FOLDER)
    return [n for n in names if not any(part.startswith(".") for part in n.replace("\\", "/").split("/"))]


def moved_table(name: str, local: list[str] | None = None) -> str:
    """A table's current name: until 2026-11-28 the demo models' tables lay in the pack's ``weights/`` itself, so a
    workflow saved then names ``x.safetensors`` where the pack now lists ``demo/x.safetensors`` (the same table); any
    name that is a table, or has no such twin, is returned unchanged. ``local``: :func:`local_tables`, if listed."""
    local = local_tables() if local is None else local
    if name in local or f"demo/{name}" not in local:
        return name
    return f"demo/{name}"


def table_state(name: str) -> str | None:
    """A local table's path, time and size, or None where there is no such file (yet)."""
    path = folder_paths.get_full_path(FOLDER, name)
    try:
        stat = Path(path).stat()
    except (TypeError, OSError):
        return None
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"


def catalogue_choice(choice: str) -> CatalogueEntry | None:
    """The catalogue entry behind a ``[download]`` choice (downloaded or not), else None; the older form
    ``[download] <name>`` (without the family) still names its entry, so saved workflows keep loading."""
    if not choice.startswith(DOWNLOAD):
        return None
    name = choice[len(DOWNLOAD) :]
    return next((e for e in _comfyui_entries() if name in (e.name, f"{e.family}/{e.name}")), None)


def resolve_table(choice: str) -> str:
    """The file name for a choice; a ``[download]`` table missing locally is fetched into models/epd first. A local
    file whose own name starts with ``[download] `` is that file."""
    if not choice.startswith(DOWNLOAD) or folder_paths.get_full_path(FOLDER, choice) is not None:
        return moved_table(choice)
    entry = catalogue_choice(choice)
    if entry is None:
        raise ValueError(f"{choice!r}: no such published table in the EPD catalogue")
    return catalogue_file(entry)


_BACKENDS = {
    "ldm": "a discrete (SD1.5/SDXL-type) latent model",
    "sd3": "a flow model with a static shift (SD3-type)",
    "flux": "a flow model with ModelSamplingFlux's mu (FLUX-type)",
    "edm": "an EDM-schedule model (the ICCV tables' pixel-space CIFAR-10, FFHQ and ImageNet 64 models, or a "
    "ComfyUI model under ModelSamplingContinuousEDM: Playground v2.5, CosXL)",
}


def made_for(params: EPDParams) -> str:
    """Which model a table was made for, from its metadata: the model or catalogue family, its kind, its grid."""
    meta = params.metadata
    model = meta.get("model") or meta.get("source_file") or "an unrecorded model"
    if meta.get("catalogue_entry"):
        entry = _all_entries().get(meta["catalogue_entry"])
        model = f"the {entry.family} models of the authors ({entry.name})" if entry else meta["catalogue_entry"]
    kind = _BACKENDS.get(params.backend, f"backend {params.backend!r}")
    settings = [f"{name} {value:g}" for name, value in (("shift", params.flowmatch_shift), ("mu", params.flowmatch_mu))
                if value is not None]  # fmt: skip
    if params.t_steps is not None:  # sampled on this grid whatever sigma range, shift or mu the model has
        t = params.t_steps
        grid = f"its own grid {float(t[0]):.4g} to {float(t[-1]):.4g}, kept whatever shift the model has"
        grid += f" (fitted at {', '.join(settings)})" if settings else ""
    else:
        if params.backend == "edm" and (params.sigma_min is None or params.sigma_max is None):
            grid = f"sigma {float(make_schedule(params)[-1]):g} to {float(make_schedule(params)[0]):g}"
        elif params.sigma_min is None or params.sigma_max is None:
            grid = "the model's own sigma range"
        else:
            grid = f"sigma {params.sigma_min:g} to {params.sigma_max:g}"
        grid = ", ".join([grid, *settings])
    return f"made for {model}: {kind}; schedule {params.schedule_type}, {grid}"


def describe(params: EPDParams) -> str:
    source = params.metadata.get("source_file", "")
    return (
        f"{params.backend} table{' from ' + source if source else ''}: {table_shape(params)}, NFE {params.nfe}, "
        f"student {params.student}, schedule {params.schedule_type}\n"
        f"{made_for(params)}"
    )


def ending_note(params: EPDParams) -> str:
    """For a table not fitted to end on its own estimate at sigma 0: the samplers' default ending may not suit it."""
    if fitted_final_estimate(params):
        return ""
    return (
        "\nFitted to end at its last sigma, not on its own estimate at 0: the samplers' default final_step "
        "'estimate' can be less accurate for such a table (10x on some bundled NFE-8 to 10 tables); "
        "final_denoise off (the authors' ending) or final_step 'denoise' (one model call more) keeps its fit"
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
            "code) from models/epd or the pack's weights folder (demo/...: tables for the pack's demo models). "
            "'[download] <model family>/<name>' entries are the authors' published tables: fetched on first run from "
            "their pinned commit, sha256-checked, stored in models/epd. info says which model a table was made for.",
            inputs=[
                io.Combo.Input(
                    "table_name",
                    options=table_choices(),
                    tooltip="EPD table file from models/epd or the pack's weights/ folder; "
                    "'[download] <family>/<name>' downloads that published table when the graph runs; demo/ tables "
                    "fit the pack's demo models.",
                ),
            ],
            outputs=[
                EPDParamsType.Output(display_name="epd_params", tooltip="The table, for EPD's samplers."),
                io.String.Output(display_name="info", tooltip="What the table is, what it was made for and how."),
            ],
        )

    @classmethod
    def validate_inputs(cls, table_name: str | None = None) -> bool | str:
        """Like the combo check, but a ``[download]`` choice stays valid after its table was downloaded, and a demo
        table's name from before it moved to ``demo/`` is that table."""
        local = local_tables()
        if table_name is None or moved_table(table_name, local) in local or catalogue_choice(table_name):
            return True
        where = user_text(str(folder_paths.get_folder_paths(FOLDER)))
        return f"EPD table {table_name!r} not found in {where} nor in the catalogue{MISSING_TABLE_HINT}"

    @classmethod
    def fingerprint_inputs(cls, table_name: str | None = None) -> str:
        """A hash of the file's path, time and size: a table rewritten under its name (EPD Distill with overwrite, the
        CLI, a copy) is loaded again, not taken from ComfyUI's cache of this node's result. Hashed because ComfyUI
        stores the value in the prompt it writes into every saved image. A ``[download]`` choice is its catalogue
        entry (the download is checked against its sha256), fetched or not: the node's own download changes nothing.
        A linked ``table_name`` (None: ComfyUI gives the fingerprint constants only, e.g. a name from Create List) is
        every local table: a table rewritten under a linked name was ComfyUI's cached, old table."""
        if table_name is None:
            states = [table_state(name) for name in local_tables()]
            return hashlib.sha256("\n".join(str(state) for state in states).encode()).hexdigest()
        entry = catalogue_choice(table_name)
        if entry is not None:
            return hashlib.sha256(f"{entry.family}/{entry.name}:{entry.sha256}".encode()).hexdigest()
        state = table_state(moved_table(table_name))
        return str(table_name) if state is None else hashlib.sha256(state.encode()).hexdigest()

    @classmethod
    def execute(cls, table_name: str) -> io.NodeOutput:
        params = load_table(resolve_table(table_name))
        if "source_file" not in params.metadata:  # a table trained from this one records it under trained_from
            params = params.replace(metadata={**params.metadata, "source_file": table_name})
        return io.NodeOutput(params, describe(params) + ending_note(params))


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
            outputs=[io.Image.Output(tooltip="The table's values per step, as a picture.")],
        )

    @classmethod
    def execute(cls, epd_params: EPDParams) -> io.NodeOutput:
        return io.NodeOutput(table_image(epd_params))


NODES = [EPDParamsLoader, EPDParamsPreview]
