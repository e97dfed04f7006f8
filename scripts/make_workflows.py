"""Write the example workflows (ComfyUI's UI format, read by its template browser) and their API-format twins.

The graphs are defined once here, in API form; node input order, widget order and output types come from the
real ComfyUI's node definitions, so the UI files match what the frontend expects.

    python -m scripts.make_workflows     (from the repository root)
"""

from __future__ import annotations

import json
import sys

from epd_dev import ROOT, comfy_harness

OUT = ROOT / "example_workflows"
API = OUT / "api"

ANALYTIC = {"form": "sd15_eps", "mixture": "reference", "shift": 0.0}
TABLE = "analytic-sd15-reference-nfe10.safetensors"

WORKFLOWS: dict[str, dict] = {
    "epd_analytic_demo": {
        "1": ("EPDAnalyticModel", ANALYTIC),
        "2": ("EPDParamsLoader", {"table_name": TABLE}),
        "3": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 16}),
        "4": ("EPDKSampler", {"model": ["1", 0], "seed": 42, "cfg": 1.0, "positive": ["1", 1], "negative": ["1", 1],
                              "latent_image": ["3", 0], "epd_params": ["2", 0], "denoise": 1.0, "parallel": "auto",
                              "final_denoise": False}),
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
        "2": ("EPDParamsLoader", {"table_name": TABLE}),
        "3": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}),
        "4": ("KSamplerSelect", {"sampler_name": "dpmpp_2m"}),
        "5": ("EPDPlugin", {"sampler": ["4", 0], "epd_params": ["2", 0], "parallel": "auto"}),
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
                             "cfg": 1.0, "nfe": 5, "points": 2, "teacher": "heun", "teacher_steps": 4,
                             "iterations": 60, "batch": 16, "learning_rate": 0.01, "seed": 0, "learn_grid": True,
                             "filename": "my_analytic_table", "overwrite": True}),
        "4": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 4}),
        "5": ("EPDKSampler", {"model": ["1", 0], "seed": 1, "cfg": 1.0, "positive": ["1", 1], "negative": ["1", 1],
                              "latent_image": ["4", 0], "epd_params": ["3", 0], "denoise": 1.0, "parallel": "auto",
                              "final_denoise": False}),
        "6": ("SaveLatent", {"samples": ["5", 0], "filename_prefix": "latents/epd_distilled"}),
    },
    "epd_sd15": {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        "2": ("CLIPTextEncode", {"text": "a photograph of a lighthouse at dawn, detailed", "clip": ["1", 1]}),
        "3": ("CLIPTextEncode", {"text": "blurry, low quality", "clip": ["1", 1]}),
        "4": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        "5": ("EPDParamsLoader", {"table_name": "[download] tpami-sd15-best"}),
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
        "6": ("EPDParamsLoader", {"table_name": "[download] tpami-sd3-1024-best"}),
        "7": ("EPDSampler", {"epd_params": ["6", 0], "parallel": "auto", "continuous_time": True,
                             "convention": "comfyui"}),
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
        "8": ("EPDParamsLoader", {"table_name": "[download] tpami-flux-best"}),
        "9": ("EPDSampler", {"epd_params": ["8", 0], "parallel": "auto", "continuous_time": True,
                             "convention": "comfyui"}),
        "10": ("EPDScheduler", {"model": ["4", 0], "epd_params": ["8", 0], "denoise": 1.0, "final_denoise": True}),
        "11": ("RandomNoise", {"noise_seed": 0}),
        "12": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "13": ("SamplerCustomAdvanced", {"noise": ["11", 0], "guider": ["7", 0], "sampler": ["9", 0],
                                         "sigmas": ["10", 0], "latent_image": ["12", 0]}),
        "14": ("VAEDecode", {"samples": ["13", 0], "vae": ["3", 0]}),
        "15": ("SaveImage", {"images": ["14", 0], "filename_prefix": "epd_flux"}),
    },
}  # fmt: skip

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def api_graph(name: str) -> dict:
    return {nid: {"class_type": cls, "inputs": dict(inputs)} for nid, (cls, inputs) in WORKFLOWS[name].items()}


def _inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) in the frontend's order: required then optional."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            kind = "COMBO" if isinstance(kind, list) else kind
            out.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return out


def ui_graph(name: str, object_info: dict) -> dict:
    """The UI-format workflow: nodes with positions, links, and widgets in the frontend's order."""
    graph = WORKFLOWS[name]
    depth: dict[str, int] = {}

    def level(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in graph[nid][1].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(u) for u in ups), default=-1)
        return depth[nid]

    for nid in graph:
        level(nid)
    links, nodes, rows = [], [], {}
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
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        node_inputs, widgets = [], []
        for key, kind, opts in _inputs(info):
            value = inputs.get(key)
            if kind in WIDGET_TYPES and not isinstance(value, list):
                widgets.append(value if value is not None else opts.get("default"))
                if opts.get("control_after_generate"):
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
        nodes.append({
            "id": int(nid), "type": cls, "pos": [40 + 360 * col, 40 + 260 * row], "size": [320, 200], "flags": {},
            "order": order, "mode": 0, "inputs": node_inputs, "outputs": outputs,
            "properties": {"Node name for S&R": cls}, "widgets_values": widgets,
        })  # fmt: skip
    return {
        "last_node_id": max(int(n) for n in graph), "last_link_id": len(links), "nodes": nodes,
        "links": [lk[:6] for lk in links], "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }  # fmt: skip


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


def main() -> int:
    info = object_info_in_process()
    API.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOWS:
        (OUT / f"{name}.json").write_text(json.dumps(ui_graph(name, info), indent=1) + "\n")
        (API / f"{name}.json").write_text(json.dumps(api_graph(name), indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json and api/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
