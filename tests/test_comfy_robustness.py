"""Auto batching decisions, memory pressure, out-of-memory fallback and interrupts inside real ComfyUI."""

from __future__ import annotations

import pytest
import torch

import epd_core
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.shared_data import official_path
from epd_dev.tiny_models import conditioning, latent, tiny_model

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]
BATCH = 2


def _run(model, params, mode, pos=None, neg=None, seed=3):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    sigmas = N["EPDScheduler"].execute(model, params, 1.0, False).result[0]
    sampler = N["EPDSampler"].execute(params, mode, True, "comfyui").result[0]
    pos = pos or conditioning(BATCH, 1)
    neg = neg or conditioning(BATCH, 2)
    return SamplerCustom.execute(model, True, seed, 3.0, pos, neg, sampler, sigmas, latent("eps", BATCH)).result[0][
        "samples"
    ]


def _recording(model):
    sizes: list[int] = []
    m = model.clone()

    def wrapper(apply_model, args):
        sizes.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m, sizes


def _params():
    return epd_core.load_params(official_path("sd15-best.pkl"))


def test_auto_goes_sequential_with_timestep_range_conditioning():
    from node_helpers import conditioning_set_values

    model, sizes = _recording(tiny_model("eps"))
    ranged = conditioning_set_values(conditioning(BATCH, 1), {"start_percent": 0.0, "end_percent": 0.5})
    _run(model, _params(), "auto", pos=ranged)
    assert max(sizes) <= 2 * BATCH, sizes  # never the K points of a step in one call
    sizes.clear()
    _run(model, _params(), "batched", pos=ranged)
    assert max(sizes) > 2 * BATCH, sizes


def test_low_free_memory_splits_points_with_same_result(monkeypatch):
    import comfy.model_management

    params = _params()
    reference = _run(tiny_model("eps"), params, "batched")
    model, sizes = _recording(tiny_model("eps"))

    def low(dev=None, torch_free_too=False):
        return (1 << 20, 1 << 20) if torch_free_too else 1 << 20

    monkeypatch.setattr(comfy.model_management, "get_free_memory", low)
    out = _run(model, params, "auto")
    assert max(sizes) <= 2 * BATCH, sizes
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_out_of_memory_on_batched_call_redone_sequentially():
    import comfy.model_management

    params = _params()
    reference = _run(tiny_model("eps"), params, "sequential")
    m = tiny_model("eps").clone()
    failures = []

    def wrapper(apply_model, args):
        if args["input"].shape[0] > 2 * BATCH:
            failures.append(args["input"].shape[0])
            raise comfy.model_management.OOM_EXCEPTION("injected out of memory")
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    out = _run(m, params, "batched")
    assert len(failures) == params.num_steps - 1
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_interrupt_mid_sampling_and_next_run_is_fresh():
    import comfy.model_management

    params = _params()
    model = tiny_model("eps")
    fresh = _run(model, params, "auto")
    base_sampling = type(model.model.model_sampling)
    steps: list[int] = []
    with H.interrupt_at(1, steps), pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(model, params, "auto")
    assert steps == [1] and params.num_steps > 2, "stopped after the first of several steps"
    assert type(model.model.model_sampling) is base_sampling, "continuous-time patch left behind"
    assert torch.equal(_run(model, params, "auto"), fresh)
