"""Auto batching decisions, memory pressure, out-of-memory fallback and interrupts inside real ComfyUI."""

from __future__ import annotations

import pytest
import torch

import epd_core
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.shared_data import official_path
from epd_dev.tiny_models import conditioning, latent, network_calls, tiny_model

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]
BATCH = 2


def _run(model, params, mode, pos=None, neg=None, seed=3, batch=BATCH):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    sigmas = N["EPDScheduler"].execute(model, params, 1.0, False).result[0]
    sampler = N["EPDSampler"].execute(params, mode, True, "comfyui").result[0]
    pos = pos or conditioning(batch, 1)
    neg = neg or conditioning(batch, 2)
    return SamplerCustom.execute(model, True, seed, 3.0, pos, neg, sampler, sigmas, latent("eps", batch)).result[0][
        "samples"
    ]


def _params():
    return epd_core.load_params(official_path("sd15-best.pkl"))


def _sizes(calls) -> list[int]:
    return [size for size, _ in calls]


def test_auto_goes_sequential_with_timestep_range_conditioning():
    from node_helpers import conditioning_set_values

    model = tiny_model("eps")
    ranged = conditioning_set_values(conditioning(BATCH, 1), {"start_percent": 0.0, "end_percent": 0.5})
    with network_calls(model) as calls:
        _run(model, _params(), "auto", pos=ranged)
    assert max(_sizes(calls)) <= 2 * BATCH, _sizes(calls)  # never the K points of a step in one call
    with network_calls(model) as calls:
        _run(model, _params(), "batched", pos=ranged)
    assert max(_sizes(calls)) > 2 * BATCH, _sizes(calls)


def _calc_cond_batch(args):
    import comfy.samplers

    return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                          args["model_options"])  # fmt: skip


def _unet_wrapper(apply_model, args):
    return apply_model(args["input"], args["timestep"], **args["c"])


PATCHES = {
    # RenormCFG (Lumina 2), PerpNeg and others replace the cfg function; Skip Layer Guidance (DiT simple) the batch
    # call; ChromaRadianceOptions is a legacy unet wrapper: each may read one sigma per call
    "cfg function": lambda m: m.set_model_sampler_cfg_function(
        lambda a: a["uncond"] + (a["cond"] - a["uncond"]) * a["cond_scale"]
    ),
    "calc_cond_batch function": lambda m: m.set_model_sampler_calc_cond_batch_function(_calc_cond_batch),
    "unet wrapper": lambda m: m.set_model_unet_function_wrapper(_unet_wrapper),
}


@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_auto_goes_point_by_point_under_cfg_functions_and_model_wrappers(patch):
    model = tiny_model("eps").clone()
    PATCHES[patch](model)
    params = _params()
    with network_calls(model) as calls:
        auto = _run(model, params, "auto")
    assert max(_sizes(calls)) <= 2 * BATCH, _sizes(calls)
    with network_calls(model) as calls:
        _run(model, params, "batched")
    assert max(_sizes(calls)) > 2 * BATCH, _sizes(calls)
    assert torch.equal(auto, _run(model, params, "sequential"))


def test_renorm_cfg_runs_under_the_defaults():
    """RenormCFG's cfg function needs a batch of one (a Python ``if`` on a norm): EPD Sampler and EPD Plugin at
    ``auto`` crashed ('Boolean value of Tensor ... ambiguous')."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    from comfy_extras.nodes_lumina2 import RenormCFG

    params = _params()
    (model,) = RenormCFG.execute(tiny_model("eps"), 100.0, 1.0).result
    sigmas = N["EPDScheduler"].execute(model, params, 1.0, True).result[0]
    plugin = N["EPDPlugin"].execute(comfy.samplers.sampler_object("euler"), params, "auto", "estimate").result[0]
    outs = []
    for sampler in (N["EPDSampler"].execute(params, "auto", True, "comfyui", "estimate").result[0], plugin):
        out = SamplerCustom.execute(model, True, 7, 4.0, conditioning(1, 1), conditioning(1, 2), sampler, sigmas,
                                    latent("eps", 1)).result[0]["samples"]  # fmt: skip
        assert torch.isfinite(out).all()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def _amplified(batch: int, seed: int, scale: float = 40.0):
    """A conditioning strong enough that the tiny random network's answer depends on it visibly."""
    ((tensor, extra),) = conditioning(batch, seed)
    return [[tensor * scale, {k: v * scale for k, v in extra.items()}]]


def test_a_prompt_batch_that_does_not_divide_the_latent_batch_reaches_its_samples_in_one_call():
    """Two prompts over three samples: ComfyUI gives sample j prompt j mod 2; in one call of K*3 rows its tiling
    gave point 1's samples prompts [1, 0, 1]. Batched equals sequential, which calls with 3 rows at a time."""
    params = _params()
    model = tiny_model("eps")
    pos, neg = _amplified(2, 1), _amplified(1, 2)
    runs = {}
    for mode in ("batched", "sequential", "auto"):
        with network_calls(model) as calls:
            runs[mode] = _run(model, params, mode, pos=pos, neg=neg, batch=3)
        if mode != "sequential":
            assert max(_sizes(calls)) > 2 * 3, (mode, _sizes(calls))
    ((tensor, extra),) = pos
    swapped = _run(model, params, "sequential", pos=[[tensor.flip(0), extra]], neg=neg, batch=3)
    assert (swapped - runs["sequential"]).abs().max() > 1e-3  # the prompts matter
    for mode in ("batched", "auto"):
        assert torch.allclose(runs[mode], runs["sequential"], rtol=1e-5, atol=1e-5), mode


def test_a_negative_prompt_batch_of_dual_model_guider_reaches_its_samples_in_one_call():
    """0.33's DualModelGuider runs the negative on a model of its own, with conditionings outside the guider's
    ``conds``: two negative prompts over three samples were left to ComfyUI's tiling of K*3 rows, so parallel
    'batched' gave point 1's samples negatives [1, 0, 1] (0.005 off sequential), as the main prompts once did. A
    ComfyUI without the guider (0.3.75) runs the same two negatives through CFGGuider, whose conds hold them."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    params = _params()
    model, negative = tiny_model("eps"), tiny_model("eps", seed=1)
    dual = hasattr(custom, "Guider_DualModel")
    sigmas = N["EPDScheduler"].execute(model, params, 1.0, False).result[0]
    outs = {}
    for negatives in ("two", "flipped"):
        neg = _amplified(2, 2)
        if negatives == "flipped":
            ((tensor, extra),) = neg
            neg = [[tensor.flip(0), extra]]
        guider = custom.Guider_DualModel(model, negative) if dual else comfy.samplers.CFGGuider(model)
        guider.set_conds(_amplified(1, 1), neg)
        guider.set_cfg(3.0)
        for mode in ("batched", "sequential"):
            sampler = N["EPDSampler"].execute(params, mode, True, "comfyui").result[0]
            noise = custom.Noise_RandomNoise(3)
            run = custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent("eps", 3))
            outs[negatives, mode] = run.result[0]["samples"]
    assert (outs["flipped", "sequential"] - outs["two", "sequential"]).abs().max() > 1e-3  # the negatives matter
    for negatives in ("two", "flipped"):
        assert torch.allclose(outs[negatives, "batched"], outs[negatives, "sequential"], rtol=1e-5, atol=1e-5)


def test_perp_neg_guider_projects_each_point_alone():
    """PerpNegGuider's prediction sums over the rows of a call: in one call the K points shared one projection."""
    from comfy_extras.nodes_custom_sampler import RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_perpneg import PerpNegGuider

    params = _params()
    model = tiny_model("eps")
    (guider,) = PerpNegGuider.execute(model, _amplified(1, 1), _amplified(1, 2), _amplified(1, 3), 6.0, 1.0).result
    (noise,) = RandomNoise.execute(11).result
    sigmas = N["EPDScheduler"].execute(model, params, 1.0, True).result[0]
    outs = {}
    for mode in ("auto", "batched", "sequential"):
        sampler = N["EPDSampler"].execute(params, mode, True, "comfyui", "estimate").result[0]
        outs[mode] = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent("eps", 1)).result[0][
            "samples"
        ]
    assert torch.equal(outs["auto"], outs["sequential"])
    assert (outs["batched"] - outs["sequential"]).abs().max() > 1e-6  # what auto avoids


def test_low_free_memory_splits_points_with_same_result(monkeypatch):
    import comfy.model_management

    params = _params()
    model = tiny_model("eps")
    reference = _run(model, params, "batched")

    def low(dev=None, torch_free_too=False):
        return (1 << 20, 1 << 20) if torch_free_too else 1 << 20

    monkeypatch.setattr(comfy.model_management, "get_free_memory", low)
    with network_calls(model) as calls:
        out = _run(model, params, "auto")
    assert max(_sizes(calls)) <= 2 * BATCH, _sizes(calls)
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_auto_prices_a_point_at_one_conditionings_rows(monkeypatch):
    """``auto`` priced each point as if its positive and negative always went in one call: where all K points fit
    ComfyUI's own estimate (cfg 1 runs no negative; above, ComfyUI splits the pair itself when it does not fit) it
    still went one point per call."""
    import comfy.model_management

    params = _params()
    model = tiny_model("eps")
    shape = latent("eps", BATCH)["samples"].shape
    one = model.model.memory_required(list(shape))
    free = int(1.5 * one * params.num_points) + 1
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free)  # fmt: skip
    sampling = H.pack_module("nodes.sampling")
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_model = model.model
    assert sampling._points_per_call(guider, params, torch.zeros(shape)) == params.num_points


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
    assert len(failures) == 1  # remembered: it failed again at every step, emptying the cache each time
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_out_of_memory_while_training_is_an_error_that_names_micro_batch():
    """Redone point by point inside autograd's recomputation (torch.utils.checkpoint), the call gave tensors of other
    shapes than the forward pass saved: a CheckpointError. While training it is an out-of-memory error saying what to
    lower."""
    import comfy.model_management

    training, config_module = H.pack_module("nodes.training"), H.pack_module("epd_core.config")
    model = tiny_model("eps").clone()

    def wrapper(apply_model, args):
        if args["input"].shape[0] > 2 and torch.is_grad_enabled():
            raise comfy.model_management.OOM_EXCEPTION("injected out of memory")
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    config = config_module.DistillConfig(iterations=1, batch=4, teacher="dpm2", teacher_m=1, seed=0, micro_batch=4,
                                         objective="global", gradient="autograd", start_noises=0,
                                         keep_best=0)  # fmt: skip
    start = training.start_tables(model.get_model_object("model_sampling"), 3, 3, False, "carry")
    with pytest.raises(torch.OutOfMemoryError, match="out of memory on a model call of 4 latents while training: "
                       "lower EPD Distill's micro_batch"):  # fmt: skip
        training.distill_on_model(model, conditioning(1, 1), conditioning(1, 2), 3.0, torch.zeros(1, 4, 8, 8), start,
                                  config)  # fmt: skip


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
