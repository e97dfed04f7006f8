"""Write the example workflows (ComfyUI's UI format, read by its template browser) and their API-format twins.

The graphs are defined once here, in API form; node input order, widget order and output types come from the
real ComfyUI's node definitions, so the UI files match what the frontend expects.

    python -m scripts.make_workflows     (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import sys

from epd_core.config import NODE_DISTILL, NODE_ITERATIONS, NODE_ITERATIONS_NFE, node_iterations
from epd_core.files import write_atomic
from epd_dev import ROOT, comfy_harness

OUT = ROOT / "example_workflows"
API = OUT / "api"

ANALYTIC = {"form": "sd15_eps", "mixture": "reference", "shift": 0.0}
# Fitted (EPD Distill's defaults) for the samplers' default ending, on its own estimate at sigma 0, and one round per
# step, so EPD Plugin over any base keeps the base's rounds.
TABLE = PLUGIN_TABLE = "demo/analytic-sd15-reference-nfe10-carry.safetensors"
MNIST_TABLE = "demo/mnist-eps-nfe5-k4scg.safetensors"
MNIST_NFE = 5
DISTILL_NFE = 5  # the Distill example's
MNIST_CFG = 3.0
MNIST_SEED = 0
# The authors' flow tables were fitted to end at sigma_min: a final denoise (one call more) is about 10% more accurate
# there than the estimate (README "End of the grid"); on their SD1.5 table the estimate is 2x better.
AUTHORS_FLOW_ENDING = "denoise"
EXACT = {"sampler_name": "heun", "steps": 100}  # the "exact ODE": 199 model rounds of a second-order solver
BUILTINS = ("uni_pc", "dpmpp_2m", "ipndm", "euler")  # one model round per step: steps = NFE
MNIST_LABELS = [f"exact ODE ({EXACT['sampler_name']}, {EXACT['steps']} steps)", f"EPD, NFE {MNIST_NFE}",
                *(f"{name}, NFE {MNIST_NFE}" for name in BUILTINS)]  # fmt: skip


def _mnist_demo() -> dict:
    common = {"model": ["1", 0], "seed": MNIST_SEED, "cfg": MNIST_CFG, "positive": ["2", 0], "negative": ["2", 1],
              "latent_image": ["3", 0], "denoise": 1.0}  # fmt: skip
    graph = {
        "1": ("EPDMnistModel", {"which": "eps"}),
        "2": ("EPDMnistClass", {"digit": "0-9"}),
        "3": ("EmptyLatentImage", {"width": 112, "height": 112, "batch_size": 10}),
        "4": ("EPDParamsLoader", {"table_name": MNIST_TABLE}),
        "5": ("KSampler", {**common, **EXACT, "scheduler": "normal"}),
        "6": ("EPDKSampler", {**common, "epd_params": ["4", 0], "parallel": "auto", "final_denoise": True,
                              "final_step": "estimate"}),
    }  # fmt: skip
    for i, name in enumerate(BUILTINS):
        graph[str(7 + i)] = ("KSampler", {**common, "steps": MNIST_NFE, "sampler_name": name, "scheduler": "normal"})
    samplers = [str(i) for i in range(5, 7 + len(BUILTINS))]
    decodes = [str(int(samplers[-1]) + 1 + i) for i in range(len(samplers))]
    for s, d in zip(samplers, decodes, strict=True):
        graph[d] = ("EPDMnistDecode", {"samples": [s, 0], "scale": 3})
    grid, preview = str(int(decodes[-1]) + 1), str(int(decodes[-1]) + 2)
    rows = {f"row_{i + 1}": [d, 0] for i, d in enumerate(decodes)}
    graph[grid] = ("EPDImageGrid", {"labels": "\n".join(MNIST_LABELS), **rows})
    graph[preview] = ("PreviewImage", {"images": [grid, 0]})
    return graph


# Each example: its API-format file name (api/<id>.json), the UI file's name (the template browser's title: ComfyUI
# lists a custom node's templates by file name, so the number orders them), the Note shown in the graph, the graph.
EXAMPLES: list[dict] = [
    {
        "id": "epd_mnist_demo",
        "title": "1 EPD vs built-in samplers on MNIST digits (no download)",
        "note": "EPD next to ComfyUI's best built-in samplers at the same NFE (5 sequential model rounds), and the "
        "exact ODE solution (Heun, 100 steps), on the same ten noises: one row per sampler, digits 0-9 (Queue, then "
        "see EPD Image Grid's preview).\n\nNeeds nothing to download: EPD MNIST Model is a small class-conditional "
        "UNet bundled with the pack (SD1.5-type EPS schedule), and the table "
        f"{MNIST_TABLE.removesuffix('.safetensors')} (4 parallel points per round) was distilled for it with EPD "
        "Distill's core at cfg 3 (its command is in weights/README.md).",
        "graph": _mnist_demo(),
    },
    {
        "id": "epd_analytic_demo",
        "title": "2 EPD KSampler vs Euler on an exact model (no download)",
        "note": "EPD KSampler and KSampler (euler) at NFE 10 on an exact Gaussian-mixture model whose ODE solution "
        "is known (the tests compare this workflow's result with the core's). Results are 4x8x8 latents saved to "
        "output/latents.\n\nNeeds nothing to download: EPD Analytic Model is computed, the table is bundled.",
        "graph": None,
    },
    {
        "id": "epd_sampler_custom_advanced",
        "title": "3 EPD Sampler in SamplerCustomAdvanced (no download)",
        "note": "The building blocks: EPD Sampler gives SamplerCustomAdvanced its SAMPLER and EPD Scheduler the "
        "table's own sigmas for this model (any guider works). Same result as EPD KSampler.\n\nNeeds nothing "
        "to download (analytic model, bundled table).",
        "graph": None,
    },
    {
        "id": "epd_plugin_dpmpp_2m",
        "title": "4 EPD Plugin over dpmpp_2m (no download)",
        "note": "EPD Plugin keeps your sampler (here dpmpp_2m from KSamplerSelect) and answers its model calls so "
        "that its own update takes the EPD table's step. Use EPD Scheduler's sigmas. With a carry table (this one) "
        "the run costs the bare sampler's rounds: 10 here, ended on the last step's estimate (final_step).\n\n"
        "Needs nothing to download (analytic model, bundled table).",
        "graph": None,
    },
    {
        "id": "epd_distill_analytic",
        "title": "5 EPD Distill a table for your model (no download)",
        "note": "EPD Distill fits a table to the model it is given (here the analytic model, with quick settings: "
        "60 iterations of 16 noises, under a minute on a CPU; the node's defaults, "
        f"{node_iterations(DISTILL_NFE):,} iterations of {NODE_DISTILL['batch']} noises at NFE {DISTILL_NFE}, "
        f"{NODE_ITERATIONS:,} from NFE {NODE_ITERATIONS_NFE} on, fit a better table in minutes) and saves it as "
        "models/epd/my_analytic_table.safetensors; EPD KSampler then samples with it.\n\n"
        "Needs nothing to download. For your own model, connect its MODEL and prompts instead.",
        "graph": None,
    },
    {
        "id": "epd_sd15",
        "title": "6 SD1.5 with EPD KSampler (needs an SD1.5 checkpoint)",
        "note": "Stable Diffusion 1.5 sampled by EPD KSampler with the authors' published SD1.5 table: NFE 20, "
        "ended at sigma 0 on the last step's own estimate (final_step), no extra call.\n\nNeeds "
        "models/checkpoints/v1-5-pruned-emaonly.safetensors; the table ([download] sd15/tpami-sd15-best) is "
        "fetched on the first run (a few kB, sha256-checked).",
        "graph": None,
    },
    {
        "id": "epd_sd3",
        "title": "7 SD3 with EPD Sampler (needs SD3 medium)",
        "note": "SD3 medium with SamplerCustom, EPD Sampler and EPD Scheduler (the table's grid at this model's "
        "shift, from ModelSamplingSD3), ended by one more model call (final_step denoise: the authors' table was "
        "fitted to end at sigma_min, and is more accurate so than on its own estimate).\n\nNeeds "
        "models/checkpoints/sd3_medium_incl_clips.safetensors; the "
        "table ([download] sd3-1024/tpami-sd3-1024-best) is fetched on the first run.",
        "graph": None,
    },
    {
        "id": "epd_flux",
        "title": "8 FLUX.1 dev with EPD Sampler (needs FLUX.1 dev)",
        "note": "FLUX.1 dev with SamplerCustomAdvanced, EPD Sampler and EPD Scheduler (the grid at the mu of "
        "ModelSamplingFlux), ended by one more model call (final_step denoise, as example 7).\n\nNeeds "
        "models/unet/flux1-dev.safetensors, models/clip/clip_l.safetensors and "
        "t5xxl_fp16.safetensors, models/vae/ae.safetensors; the table ([download] flux/tpami-flux-best) is "
        "fetched on the first run.",
        "graph": None,
    },
]

WORKFLOWS: dict[str, dict] = {
    "epd_analytic_demo": {
        "1": ("EPDAnalyticModel", ANALYTIC),
        "2": ("EPDParamsLoader", {"table_name": TABLE}),
        "3": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 16}),
        "4": ("EPDKSampler", {"model": ["1", 0], "seed": 42, "cfg": 1.0, "positive": ["1", 1], "negative": ["1", 1],
                              "latent_image": ["3", 0], "epd_params": ["2", 0], "denoise": 1.0, "parallel": "auto"}),
        "5": ("SaveLatent", {"samples": ["4", 0], "filename_prefix": "latents/epd_demo_epd"}),
        "6": ("KSampler", {"model": ["1", 0], "seed": 42, "steps": 10, "cfg": 1.0, "sampler_name": "euler",
                           "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 1],
                           "latent_image": ["3", 0], "denoise": 1.0}),
        "7": ("SaveLatent", {"samples": ["6", 0], "filename_prefix": "latents/epd_demo_euler"}),
    },
    "epd_sampler_custom_advanced": {
        "1": ("EPDAnalyticModel", ANALYTIC),
        "2": ("EPDParamsLoader", {"table_name": TABLE}),
        "3": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}),
        "4": ("EPDSampler", {"epd_params": ["2", 0], "parallel": "auto", "continuous_time": True,
                             "convention": "comfyui"}),
        "5": ("EPDScheduler", {"model": ["1", 0], "epd_params": ["2", 0], "denoise": 1.0, "final_denoise": True}),
        "6": ("RandomNoise", {"noise_seed": 7}),
        "7": ("CFGGuider", {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "cfg": 1.0}),
        "8": ("SamplerCustomAdvanced", {"noise": ["6", 0], "guider": ["7", 0], "sampler": ["4", 0],
                                        "sigmas": ["5", 0], "latent_image": ["3", 0]}),
        "9": ("SaveLatent", {"samples": ["8", 0], "filename_prefix": "latents/epd_advanced"}),
    },
    "epd_plugin_dpmpp_2m": {
        "1": ("EPDAnalyticModel", ANALYTIC),
        "2": ("EPDParamsLoader", {"table_name": PLUGIN_TABLE}),
        "3": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}),
        "4": ("KSamplerSelect", {"sampler_name": "dpmpp_2m"}),
        "5": ("EPDPlugin", {"sampler": ["4", 0], "epd_params": ["2", 0], "parallel": "auto",
                            "final_step": "estimate"}),  # fmt: skip
        "6": ("EPDScheduler", {"model": ["1", 0], "epd_params": ["2", 0], "denoise": 1.0, "final_denoise": True}),
        "7": ("RandomNoise", {"noise_seed": 7}),
        "8": ("CFGGuider", {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "cfg": 1.0}),
        "9": ("SamplerCustomAdvanced", {"noise": ["7", 0], "guider": ["8", 0], "sampler": ["5", 0],
                                        "sigmas": ["6", 0], "latent_image": ["3", 0]}),
        "10": ("SaveLatent", {"samples": ["9", 0], "filename_prefix": "latents/epd_plugin"}),
    },
    "epd_distill_analytic": {
        "1": ("EPDAnalyticModel", ANALYTIC),
        "2": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        "3": ("EPDDistill", {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "latent_image": ["2", 0],
                             "cfg": 1.0, "nfe": DISTILL_NFE, "points": 2, "teacher": "heun", "teacher_steps": 4,
                             "iterations": 60, "batch": 16, "learning_rate": 0.01, "seed": 0, "learn_grid": True,
                             "filename": "my_analytic_table", "overwrite": True}),
        "4": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 4}),
        "5": ("EPDKSampler", {"model": ["1", 0], "seed": 1, "cfg": 1.0, "positive": ["1", 1], "negative": ["1", 1],
                              "latent_image": ["4", 0], "epd_params": ["3", 0], "denoise": 1.0, "parallel": "auto"}),
        "6": ("SaveLatent", {"samples": ["5", 0], "filename_prefix": "latents/epd_distilled"}),
    },
    "epd_sd15": {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        "2": ("CLIPTextEncode", {"text": "a photograph of a lighthouse at dawn, detailed", "clip": ["1", 1]}),
        "3": ("CLIPTextEncode", {"text": "blurry, low quality", "clip": ["1", 1]}),
        "4": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        "5": ("EPDParamsLoader", {"table_name": "[download] sd15/tpami-sd15-best"}),
        "6": ("EPDKSampler", {"model": ["1", 0], "seed": 0, "cfg": 7.5, "positive": ["2", 0], "negative": ["3", 0],
                              "latent_image": ["4", 0], "epd_params": ["5", 0], "denoise": 1.0, "parallel": "auto",
                              "final_denoise": True}),
        "7": ("VAEDecode", {"samples": ["6", 0], "vae": ["1", 2]}),
        "8": ("SaveImage", {"images": ["7", 0], "filename_prefix": "epd_sd15"}),
    },
    "epd_sd3": {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": "sd3_medium_incl_clips.safetensors"}),
        "2": ("ModelSamplingSD3", {"model": ["1", 0], "shift": 3.0}),
        "3": ("CLIPTextEncode", {"text": "a red fox in fresh snow, golden hour", "clip": ["1", 1]}),
        "4": ("CLIPTextEncode", {"text": "", "clip": ["1", 1]}),
        "5": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "6": ("EPDParamsLoader", {"table_name": "[download] sd3-1024/tpami-sd3-1024-best"}),
        "7": ("EPDSampler", {"epd_params": ["6", 0], "parallel": "auto", "continuous_time": True,
                             "convention": "comfyui", "final_step": AUTHORS_FLOW_ENDING}),
        "8": ("EPDScheduler", {"model": ["2", 0], "epd_params": ["6", 0], "denoise": 1.0, "final_denoise": True}),
        "9": ("SamplerCustom", {"model": ["2", 0], "add_noise": True, "noise_seed": 0, "cfg": 4.5,
                                "positive": ["3", 0], "negative": ["4", 0], "sampler": ["7", 0], "sigmas": ["8", 0],
                                "latent_image": ["5", 0]}),
        "10": ("VAEDecode", {"samples": ["9", 0], "vae": ["1", 2]}),
        "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "epd_sd3"}),
    },
    "epd_flux": {
        "1": ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        "2": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                 "type": "flux", "device": "default"}),
        "3": ("VAELoader", {"vae_name": "ae.safetensors"}),
        "4": ("ModelSamplingFlux", {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": 1024,
                                    "height": 1024}),
        "5": ("CLIPTextEncode", {"text": "a cosy reading nook with plants, soft window light", "clip": ["2", 0]}),
        "6": ("FluxGuidance", {"conditioning": ["5", 0], "guidance": 3.5}),
        "7": ("BasicGuider", {"model": ["4", 0], "conditioning": ["6", 0]}),
        "8": ("EPDParamsLoader", {"table_name": "[download] flux/tpami-flux-best"}),
        "9": ("EPDSampler", {"epd_params": ["8", 0], "parallel": "auto", "continuous_time": True,
                             "convention": "comfyui", "final_step": AUTHORS_FLOW_ENDING}),
        "10": ("EPDScheduler", {"model": ["4", 0], "epd_params": ["8", 0], "denoise": 1.0, "final_denoise": True}),
        "11": ("RandomNoise", {"noise_seed": 0}),
        "12": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "13": ("SamplerCustomAdvanced", {"noise": ["11", 0], "guider": ["7", 0], "sampler": ["9", 0],
                                         "sigmas": ["10", 0], "latent_image": ["12", 0]}),
        "14": ("VAEDecode", {"samples": ["13", 0], "vae": ["3", 0]}),
        "15": ("SaveImage", {"images": ["14", 0], "filename_prefix": "epd_flux"}),
    },
}  # fmt: skip

for _example in EXAMPLES:
    _example["graph"] = _example["graph"] or WORKFLOWS[_example["id"]]
WORKFLOWS.update({e["id"]: e["graph"] for e in EXAMPLES})
BY_ID = {e["id"]: e for e in EXAMPLES}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds "control after generate" to these INTs, and where asked
# Node sizes, generous: LiteGraph draws the title bar (30 px) above a node's position, slots 20 px apart, widgets
# about 24 px apart; a multiline text box and an image preview need room of their own.
TITLE_H, SLOT_H, WIDGET_H, GAP_X, GAP_Y = 30, 22, 28, 70, 50
NOTE_SIZE = (520, 190)
PREVIEW_SIZE = (760, 560)
MAX_COLUMN_H = 1100


def api_graph(name: str, object_info: dict) -> dict:
    """The API-format graph; widget inputs the definition leaves out get their defaults, as in the UI file."""
    graph = {}
    for nid, (cls, inputs) in WORKFLOWS[name].items():
        full = dict(inputs)
        for key, kind, opts in _inputs(object_info[cls]):
            if kind in WIDGET_TYPES and key not in full and "default" in opts:
                full[key] = opts["default"]
        graph[nid] = {"class_type": cls, "inputs": full}
    return graph


def _inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) in the frontend's order: required then optional."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            kind = "COMBO" if isinstance(kind, list) else kind
            out.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return out


def has_control(name: str, kind: str, opts: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input."""
    return kind == "INT" and (bool(opts.get("control_after_generate")) or name in SEED_NAMES)


def _size(cls: str, n_in: int, n_out: int, widgets: list, multiline: int) -> list[int]:
    if cls in ("PreviewImage", "SaveImage"):
        return list(PREVIEW_SIZE)
    longest = max([len(str(w)) for w in widgets if isinstance(w, str) and "\n" not in w] + [0])
    width = max(340, min(520, 150 + 7 * longest))
    height = SLOT_H * max(n_in, n_out, 1) + WIDGET_H * (len(widgets) - multiline) + 150 * multiline + 24
    return [width, height]


def ui_graph(name: str, object_info: dict) -> dict:
    """The UI-format workflow: nodes laid out in columns by depth without overlaps, links, widgets in the
    frontend's order (with the "control after generate" values it adds), and a Note on top."""
    graph = WORKFLOWS[name]
    depth: dict[str, int] = {}

    def level(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in graph[nid][1].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(u) for u in ups), default=-1)
        return depth[nid]

    for nid in graph:
        level(nid)
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, (cls, inputs) in graph.items():
        for key, value in inputs.items():
            if isinstance(value, list):
                link_id = len(links) + 1
                kind = next(k for n, k, _ in _inputs(object_info[cls]) if n == key)
                links.append([link_id, int(value[0]), value[1], int(nid), None, kind, key])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
    for order, (nid, (cls, inputs)) in enumerate(sorted(graph.items(), key=lambda kv: (depth[kv[0]], int(kv[0])))):
        info = object_info[cls]
        node_inputs, widgets, multiline = [], [], 0
        for key, kind, opts in _inputs(info):
            value = inputs.get(key)
            if kind in WIDGET_TYPES and not isinstance(value, list):
                widgets.append(value if value is not None else opts.get("default"))
                multiline += int(bool(opts.get("multiline")))
                if has_control(key, kind, opts):
                    widgets.append("fixed")
            elif isinstance(value, list) or kind not in WIDGET_TYPES:
                link = next((lk for lk in links if lk[3] == int(nid) and lk[6] == key), None)
                slot = len(node_inputs)
                if link is not None:
                    link[4] = slot
                node_inputs.append({"name": key, "type": kind, "link": link[0] if link else None})
        outputs = []
        for slot, (kind, oname) in enumerate(zip(info["output"], info["output_name"], strict=True)):
            outputs.append({"name": oname, "type": kind if isinstance(kind, str) else "COMBO",
                            "links": out_links.get((nid, slot), []), "slot_index": slot})  # fmt: skip
        size = _size(cls, len(node_inputs), len(outputs), widgets, multiline)
        nodes.append({
            "id": int(nid), "type": cls, "pos": [0, 0], "size": size, "flags": {},
            "order": order, "mode": 0, "inputs": node_inputs, "outputs": outputs,
            "properties": {"Node name for S&R": cls}, "widgets_values": widgets,
        })  # fmt: skip
    # Columns by depth, each as wide as its widest node; nodes stacked with their title bars; the Note above all.
    top = 40 + TITLE_H + NOTE_SIZE[1] + GAP_Y
    x = 40
    for col in sorted(set(depth.values())):
        members = [n for n in nodes if depth[str(n["id"])] == col]
        y, width = top + TITLE_H, 0
        for n in members:
            if y > top + TITLE_H and y + n["size"][1] > top + MAX_COLUMN_H:  # a long column wraps into another
                x, y, width = x + width + GAP_X, top + TITLE_H, 0
            n["pos"] = [x, y]
            y += n["size"][1] + TITLE_H + GAP_Y
            width = max(width, n["size"][0])
        x += width + GAP_X
    note_id = max(int(n) for n in graph) + 1
    nodes.append({
        "id": note_id, "type": "Note", "pos": [40, 40 + TITLE_H], "size": list(NOTE_SIZE), "flags": {},
        "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
        "widgets_values": [BY_ID[name]["note"]], "color": "#432", "bgcolor": "#653",
    })  # fmt: skip
    return {
        "last_node_id": note_id, "last_link_id": len(links), "nodes": nodes,
        "links": [lk[:6] for lk in links], "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}, "epd_api": f"api/{name}.json"}, "version": 0.4,
    }  # fmt: skip


def ui_path(name: str):
    """The UI file of example ``name`` (its title is the file name)."""
    return OUT / f"{BY_ID[name]['title']}.json"


def object_info_in_process() -> dict:
    comfy_harness.load_builtin_extras()
    import nodes

    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        outputs = list(getattr(cls, "RETURN_TYPES", ()))
        names = list(getattr(cls, "RETURN_NAMES", None) or outputs)
        info[name] = {"input": spec, "output": outputs, "output_name": names}
    return info


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m scripts.make_workflows", description=__doc__.split("\n\n")[0]).parse_args(
        argv
    )
    info = object_info_in_process()
    files = {}  # every graph is built before anything is written
    for example in EXAMPLES:
        name = example["id"]
        files[ui_path(name)] = json.dumps(ui_graph(name, info), indent=1) + "\n"
        files[API / f"{name}.json"] = json.dumps(api_graph(name, info), indent=1) + "\n"
    API.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        write_atomic(text.encode(), path, overwrite=True)
    print(f"wrote {len(EXAMPLES)} workflows to example_workflows/ and their API twins to example_workflows/api/")
    stale = [*OUT.glob("[0-9]* *.json"), *API.glob("epd_*.json")]  # examples renamed or dropped; not the user's files
    for old in sorted(set(stale) - set(files)):
        old.unlink()
        print(f"removed {old.relative_to(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
