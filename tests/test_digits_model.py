"""The demo digits model: a UNet trained by this project, loaded as a genuine ComfyUI model, sampled by
ComfyUI's KSampler and by the EPD sampler, and its training script."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import epd_core
from epd_core.schedules import sd15_alphas_cumprod
from epd_dev import ROOT
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.digits import training_digits

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]
WEIGHTS = ROOT / "demo_models" / "digits-unet.safetensors"
START_TABLE = ROOT / "weights" / "demo" / "analytic-sd15-start-nfe10.safetensors"


@pytest.fixture(scope="module")
def digits():
    return training_digits()


@pytest.fixture(scope="module")
def model_and_cond(comfy_nodes):
    return comfy_nodes["EPDDigitsModel"].execute().result


def _nearest(samples: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS (per latent element) distance of each sample to its nearest training image, and that image's index."""
    dist, idx = torch.cdist(samples.flatten(1).double(), data.flatten(1).double()).min(dim=1)
    return dist / samples[0].numel() ** 0.5, idx


def test_weights_file_is_small_and_records_its_training():
    dm = H.pack_module("nodes.digits_model")

    assert WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    meta = dm.read_metadata(WEIGHTS)
    assert meta["format"] == dm.FORMAT
    assert meta["command"].startswith("python -m scripts.train_digits_unet")  # a command that runs as written
    for key in ("seed", "iterations", "dataset", "final_loss", "wall_time_s", "unet_config"):
        assert meta[key], key
    assert "load_digits" in meta["dataset"]
    assert float(meta["eval_loss_final_ema"]) < 0.1 * float(meta["eval_loss_start"])
    with safe_open(str(WEIGHTS), "pt") as fh:
        assert all(fh.get_slice(k).get_dtype() == "F32" for k in fh.keys())


def test_loads_into_a_genuine_comfyui_model(model_and_cond):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_sampling
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model, cond = model_and_cond
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    base = model.model
    assert isinstance(base, comfy.model_base.BaseModel) and base.model_type == comfy.model_base.ModelType.EPS
    assert type(base.diffusion_model) is UNetModel
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) and isinstance(ms, comfy.model_sampling.EPS)
    sd15 = ((1 - sd15_alphas_cumprod()) / sd15_alphas_cumprod()).sqrt()
    assert torch.allclose(ms.sigmas.double(), sd15, rtol=1e-5)
    assert base.latent_format.latent_channels == 4
    with safe_open(str(WEIGHTS), "pt") as fh:
        state = base.diffusion_model.state_dict()
        assert sorted(fh.keys()) == sorted(state)
        assert all(torch.equal(fh.get_tensor(k), state[k]) for k in fh.keys())
    assert isinstance(cond, list) and torch.is_tensor(cond[0][0])


def test_prediction_is_the_training_parametrisation(model_and_cond):
    """ComfyUI's sigma -> (input scaling, timestep) is exactly what the training script used: for the schedule's
    sigma at integer t, D(x) = x - sigma * unet(x / sqrt(1 + sigma^2), t); any text conditioning is ignored."""
    base = model_and_cond[0].model
    ms = base.model_sampling
    train = _train_script()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 4, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 37.0, 500.0, 999.0])
    sigma = ms.sigma(t)
    assert torch.equal(ms.timestep(sigma), t.long())
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        denoised = base.apply_model(x, sigma)
        eps_pred = base.diffusion_model(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), t, transformer_options={})
        prompt = base.apply_model(x, sigma, c_crossattn=torch.randn(4, 77, 768, generator=g))
        loss = train.eps_loss(base.diffusion_model, ms, x0, t, eps)
    assert torch.allclose(denoised, x - sigma.reshape(-1, 1, 1, 1) * eps_pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(prompt, denoised)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(eps_pred, eps), rtol=1e-5)
    with pytest.raises(ValueError, match="64x64 EmptyLatentImage"):
        base.apply_model(torch.zeros(1, 4, 16, 16), sigma[:1])


def test_ksampler_euler_samples_are_digits(model_and_cond, digits):
    """ComfyUI's KSampler (euler, 20 steps) through the real nodes gives latents near the digits data: their mean
    nearest-neighbour distance to the training set is far below that of noise or of a per-pixel Gaussian fitted to
    the data, and they are not all the same digit."""
    import nodes

    model, cond = model_and_cond
    data, labels = digits
    (latent,) = nodes.EmptyLatentImage().generate(64, 64, 32)
    assert latent["samples"].shape == (32, 4, 8, 8)
    (out,) = nodes.KSampler().sample(model, 7, 20, 1.0, "euler", "normal", cond, cond, latent, denoise=1.0)
    samples = out["samples"]
    assert torch.isfinite(samples).all()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(samples.shape, generator=g)
    gauss = data.mean(0) + data.std(0) * torch.randn(samples.shape, generator=g)
    d_samples, idx = _nearest(samples, data)
    d_noise, d_gauss = _nearest(noise, data)[0].mean(), _nearest(gauss, data)[0].mean()
    assert d_samples.mean() < 0.6 * d_gauss < 0.5 * d_noise, (d_samples.mean(), d_gauss, d_noise)
    assert len(set(labels[idx].tolist())) >= 5
    images = H.pack_module("nodes.mnist_model").latent_to_grey(samples)
    assert images.shape == (32, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_epd_sampler_batched_equals_sequential(model_and_cond, digits):
    """The EPD sampler with the bundled untrained start table (SD1.5 schedule) runs on the neural model;
    batched and sequential evaluation of the parallel points agree, and the result is near the data."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, cond = model_and_cond
    params = epd_core.load_params(START_TABLE)
    (sigmas,) = N["EPDScheduler"].execute(model, params, 1.0, True).result
    latent = {"samples": torch.zeros(6, 4, 8, 8)}
    results = {}
    for mode in ("batched", "sequential"):
        (sampler,) = N["EPDSampler"].execute(params, mode, True, "comfyui").result
        results[mode] = SamplerCustom.execute(model, True, 3, 1.0, cond, cond, sampler, sigmas, latent).result[0]
    a, b = results["batched"]["samples"], results["sequential"]["samples"]
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
    assert _nearest(a, digits[0])[0].mean() < 0.5 * _nearest(noise, digits[0])[0].mean()


def test_refuses_files_that_are_not_its_weights(tmp_path):
    dm = H.pack_module("nodes.digits_model")

    with pytest.raises(ValueError, match="not an EPD digits UNet"):
        dm.digits_model(START_TABLE)
    with pytest.raises(FileNotFoundError, match="train_digits_unet"):
        dm.digits_model(tmp_path / "missing.safetensors")


def _train_script():
    from scripts import train_digits_unet

    return train_digits_unet


def test_training_script_quick_mode(tmp_path):
    """--quick trains a few iterations (loss decreases), writes a loadable file, and is deterministic for a seed."""
    dm = H.pack_module("nodes.digits_model")

    train = _train_script()
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            first = train.main(["--quick", "--out", str(tmp_path / "a.safetensors")])
            again = train.main(["--quick", "--out", str(tmp_path / "b.safetensors")])
    finally:
        torch.set_num_threads(threads)
    assert float(first["eval_loss_final"]) < 0.7 * float(first["eval_loss_start"])
    assert float(first["final_loss"]) < float(first["first_loss"])
    assert first["iterations"] == "30" and "--quick" in first["command"]
    assert again["losses"] == first["losses"]
    a = dm.digits_model(tmp_path / "a.safetensors").diffusion_model.state_dict()
    b = dm.digits_model(tmp_path / "b.safetensors").diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit):
        train.main(["--quick"])


def test_loader_does_not_offer_the_unet_as_a_table():
    choices = H.pack_module("nodes.nodes_tables").table_choices()
    assert WEIGHTS.name not in choices
    assert "demo/analytic-sd15-reference-nfe5.safetensors" in choices


def test_tables_script_distils_then_refines_with_rdpo(tmp_path):
    """make_digits_tables: Stage 1 through ComfyUI, then Stage 2 (RDPO) from the Stage 1 file it wrote. Its AFS
    table is of the bundled one's kind: no data mean (the script fitted one, 0.5 off the bundled table's 0)."""
    from scripts import make_digits_tables

    threads = torch.get_num_threads()
    args = ["--iterations", "2", "--batch", "4", "--rdpo-iterations", "2", "--nfe", "5", "--rdpo-nfe", "5",
            "--out-dir", str(tmp_path)]  # fmt: skip
    try:
        assert make_digits_tables.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    distilled = epd_core.load_params(tmp_path / "digits-nfe5.safetensors")
    refined = epd_core.load_params(tmp_path / "digits-nfe5-rdpo.safetensors")
    assert distilled.nfe == refined.nfe == 5 and distilled.metadata["distilled"]["iterations"] == 2
    bundled = epd_core.load_params(ROOT / "weights" / "demo" / "digits-nfe5.safetensors")
    assert distilled.afs and bundled.afs and distilled.afs_mean is None and bundled.afs_mean is None
    rdpo = refined.metadata["rdpo"]
    assert rdpo["iterations"] == 2 and rdpo["reward"] == "fidelity"
    assert refined.metadata["rdpo_start_file"] == "digits-nfe5.safetensors"
    assert torch.equal(refined.t_steps, distilled.t_steps)
    assert not torch.equal(refined.weight_s, distilled.weight_s)


def test_bundled_digits_tables_record_their_generator():
    """The bundled digits tables were made by make_digits_tables (Stage 2 ones from the bundled Stage 1 file)."""
    for nfe in (5,):
        distilled = epd_core.load_params(ROOT / "weights" / "demo" / f"digits-nfe{nfe}.safetensors")
        refined = epd_core.load_params(ROOT / "weights" / "demo" / f"digits-nfe{nfe}-rdpo.safetensors")
        for table in (distilled, refined):
            assert table.metadata["command"].startswith("python -m scripts.make_digits_tables")
            assert table.metadata["model"] == "digits UNet (demo_models/digits-unet.safetensors)"
            assert table.nfe == nfe
        assert refined.metadata["rdpo_start_file"] == f"digits-nfe{nfe}.safetensors"
        assert refined.metadata["distilled"] == distilled.metadata["distilled"]
