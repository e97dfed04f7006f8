"""The class-conditional MNIST demo models: genuine ComfyUI models sampled by ComfyUI's own KSampler with CFG,
judged by a classifier trained here (class accuracy, digits FID); their data, training script and weight checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import epd_core
from epd_core.schedules import sd15_alphas_cumprod
from epd_dev import comfy_harness as H
from epd_dev import mnist_data, mnist_metrics

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]
ROOT = Path(__file__).resolve().parents[1]
comfy = nodes = UNetModel = mm = mn = None  # ComfyUI's modules and the pack's MNIST modules, once ComfyUI runs


@pytest.fixture(scope="module", autouse=True)
def _comfy_modules(comfy_nodes):
    """Import ComfyUI's modules and the pack's MNIST modules once the session has started ComfyUI."""
    global comfy, nodes, UNetModel, mm, mn
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_sampling
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    import nodes

    mm, mn = H.pack_module("nodes.mnist_model"), H.pack_module("nodes.nodes_mnist")


KINDS = ("eps", "flow")
SAMPLES_PER_CLASS = 10
# Floors under what the shipped weights give here (dpmpp_2m, 20 steps, cfg 3, seeds 0-9, 10 per class): class
# accuracy, and digits FID as a share of uniform noise's (README: 100 per class, flow 99.9% / FID 59, eps 90.8% /
# FID 56; eps mixes up some 3s and 5s).
FLOORS = {"flow": (0.9, 0.1), "eps": (0.8, 0.1)}


@pytest.fixture(scope="module")
def heldout():
    return mnist_data.split("heldout")


@pytest.fixture(scope="module")
def classifier():
    return mnist_metrics.load_classifier()


def test_data_is_pinned_and_split():
    images, labels = mnist_data.split("train")
    held_images, held_labels = mnist_data.split("heldout")
    assert images.shape == (9000, 28, 28) and held_images.shape == (1000, 28, 28)
    assert torch.equal(held_labels.bincount(), torch.full((10,), 100))
    assert 0 <= images.min() and images.max() <= 1
    assert mnist_data._sha256(mnist_data.tarball(download=False)) == mnist_data.TARBALL_SHA256
    # no held-out digit is also a training digit
    flat = images.flatten(1)
    assert torch.cdist(held_images.flatten(1)[:200], flat).min() > 0
    with pytest.raises(ValueError, match="part must be"):
        mnist_data.split("test")


def test_tampered_tarball_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EPD_MNIST_CACHE", str(tmp_path))
    (tmp_path / mnist_data.TARBALL).write_bytes(b"not the package")
    with pytest.raises(ValueError, match="sha256"):
        mnist_data.tarball(download=False)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_are_small_and_record_their_training(kind):
    path = mm.weights_path(kind)
    assert path.stat().st_size <= 10 * 1024 * 1024
    meta = mm.read_metadata(path)
    assert meta["format"] == mm.FORMAT and meta["kind"] == kind
    assert meta["command"] == f"python -m scripts.train_mnist --kind {kind}"
    assert meta["data_sha256"] == mnist_data.TARBALL_SHA256 and "mnist@1.1.0" in meta["dataset"]
    for key in ("seed", "iterations", "batch", "lr", "ema_decay", "label_dropout", "wall_time_s", "versions"):
        assert meta[key], key
    curve = json.loads(meta["loss_curve"])
    assert len(curve) >= 10 and curve[-1] < 0.5 * curve[0]
    assert float(meta["eval_loss_final_ema_fp16"]) < 0.5 * float(meta["eval_loss_start"])
    assert json.loads(meta["sampling"]) == json.loads(mm.sampling_json(kind))
    with safe_open(str(path), "pt") as fh:
        assert all(fh.get_slice(k).get_dtype() == "F16" for k in fh.keys())


@pytest.mark.parametrize("kind", KINDS)
def test_loads_into_a_genuine_comfyui_model(kind):
    (model,) = mn.EPDMnistModel.execute(kind).result
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    base = model.model
    assert isinstance(base, comfy.model_base.BaseModel) and type(base.diffusion_model) is UNetModel
    ms = model.get_model_object("model_sampling")
    if kind == "eps":
        assert base.model_type == comfy.model_base.ModelType.EPS
        assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) and isinstance(ms, comfy.model_sampling.EPS)
        sd15 = ((1 - sd15_alphas_cumprod()) / sd15_alphas_cumprod()).sqrt()
        assert torch.allclose(ms.sigmas.double(), sd15, rtol=1e-5)
    else:
        assert base.model_type == comfy.model_base.ModelType.FLOW
        assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow)
        assert isinstance(ms, comfy.model_sampling.CONST) and ms.shift == 3.0 and ms.multiplier == 1000
        t = torch.arange(1, 1001) / 1000
        assert torch.allclose(ms.sigmas, 3 * t / (1 + 2 * t), atol=1e-6)
    state = base.diffusion_model.state_dict()
    for key, tensor in load_file(str(mm.weights_path(kind))).items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], tensor.float()), key


@pytest.mark.parametrize("kind", KINDS)
def test_prediction_is_the_training_parametrisation(kind):
    """ComfyUI's denoised output is the training script's parametrisation, and the loss it trained is the same
    network call: eps: D = x - sigma * unet(x / sqrt(1 + sigma^2), t); flow: D = x - sigma * unet(x, 1000 sigma)."""
    from scripts import train_mnist

    base = mm.mnist_model(kind)
    ms = base.model_sampling
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, *mm.LATENT_SHAPE, generator=g) * 2 - 1
    eps = torch.randn(4, *mm.LATENT_SHAPE, generator=g)
    y = mm.class_token([3, 7, None, 0])[:, 0]
    u = torch.tensor([0.0, 0.25, 0.6, 1.0])
    if kind == "eps":
        t = u * 999
        sigma = ms.sigma(t)
        x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        net_in, target = x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), eps
    else:
        sigma = ms.sigma(u * 1000)
        t = sigma * 1000
        x = (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * eps
        net_in, target = x, eps - x0
    with torch.no_grad():
        pred = base.diffusion_model(net_in, t, y=y, transformer_options={})
        loss = train_mnist.diffusion_loss(kind, base.diffusion_model, ms, x0, y, u, eps)
        if kind == "flow":  # ComfyUI's timestep for these sigmas is the training one (continuous)
            denoised = base.apply_model(x, sigma, y=y)
            assert torch.allclose(denoised, x - sigma.reshape(-1, 1, 1, 1) * pred, rtol=1e-4, atol=1e-4)
        else:  # ComfyUI rounds sigma to the schedule's integer timestep; compare at integer t
            ti = torch.tensor([0.0, 250.0, 600.0, 999.0])
            si = ms.sigma(ti)
            xi = x0 + si.reshape(-1, 1, 1, 1) * eps
            pi = base.diffusion_model(xi / (1 + si.reshape(-1, 1, 1, 1) ** 2).sqrt(), ti, y=y, transformer_options={})
            assert torch.allclose(base.apply_model(xi, si, y=y), xi - si.reshape(-1, 1, 1, 1) * pi, atol=1e-4)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, target), rtol=1e-5)
    # the class changes the prediction (the conditioning is read)
    with torch.no_grad():
        other = base.diffusion_model(net_in, t, y=mm.class_token([5, 1, 8, 9])[:, 0], transformer_options={})
    assert (other - pred).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="112x112 EmptyLatentImage"):
        base.apply_model(torch.zeros(1, 4, 8, 8), sigma[:1], y=y[:1])


def _sample(model, digit: int | None, count: int, seed: int, cfg: float = 3.0, sampler: str = "dpmpp_2m"):
    positive, negative = mn.EPDMnistClass.execute("none" if digit is None else str(digit)).result
    (latent,) = nodes.EmptyLatentImage().generate(112, 112, count)
    (out,) = nodes.KSampler().sample(model, seed, 20, cfg, sampler, "normal", positive, negative, latent, denoise=1.0)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_ksampler_with_cfg_draws_the_prompted_digit(kind, heldout, classifier):
    """ComfyUI's KSampler (dpmpp_2m, 20 steps, cfg 3) per class through the pack's nodes: the classifier reads the
    prompted digit (flow: in at least 90% of the samples, eps: 80%), and their digits FID against the held-out
    digits is far below that of uniform noise."""
    (model,) = mn.EPDMnistModel.execute(kind).result
    images, labels = [], []
    for digit in range(10):
        out = _sample(model, digit, SAMPLES_PER_CLASS, seed=digit)
        (decoded,) = mn.EPDMnistDecode.execute(out, 1).result
        assert decoded.shape == (SAMPLES_PER_CLASS, 28, 28, 3)
        images.append(decoded[..., 0])
        labels.append(torch.full((SAMPLES_PER_CLASS,), digit))
    images, labels = torch.cat(images), torch.cat(labels)
    assert torch.isfinite(images).all()
    accuracy = mnist_metrics.class_accuracy(images, labels, classifier)
    held_images, _ = heldout
    fid = mnist_metrics.digits_fid(images, held_images, classifier)
    noise = torch.rand(len(images), 28, 28, generator=torch.Generator().manual_seed(0))
    fid_noise = mnist_metrics.digits_fid(noise, held_images, classifier)
    # the same number of real training digits: the floor that the sample count allows
    train_images, _ = mnist_data.split("train")
    fid_real = mnist_metrics.digits_fid(train_images[:: len(train_images) // len(images)][: len(images)], held_images)
    print(f"{kind}: accuracy {accuracy:.3f}, digits FID {fid:.2f} (real {fid_real:.2f}, noise {fid_noise:.2f})")
    min_accuracy, max_fid_share = FLOORS[kind]
    assert accuracy >= min_accuracy
    assert fid < max_fid_share * fid_noise


def test_nodes_module_declares_its_four_nodes():
    """One module with a NODES list, as the entry point collects them; schemas ComfyUI can turn into node info."""
    ids = {cls.GET_SCHEMA().node_id: cls for cls in mn.NODES}
    assert set(ids) == {"EPDMnistModel", "EPDMnistClass", "EPDMnistDecode", "EPDMnistFeatures"}
    assert ids["EPDMnistFeatures"].RETURN_TYPES == ["EPD_ENCODER"]
    assert ids["EPDMnistModel"].RETURN_TYPES == ["MODEL"]
    assert ids["EPDMnistClass"].RETURN_TYPES == ["CONDITIONING", "CONDITIONING"]
    assert ids["EPDMnistDecode"].RETURN_TYPES == ["IMAGE"]
    assert ids["EPDMnistModel"].INPUT_TYPES()["required"]["which"][1]["options"] == ["eps", "flow"]


def test_class_node_and_decode_node():
    positive, negative = mn.EPDMnistClass.execute("7").result
    assert torch.equal(positive[0][0], mm.class_token([7])) and positive[0][0].shape == (1, 1, 10)
    assert torch.equal(negative[0][0], torch.zeros(1, 1, 10))
    none, _ = mn.EPDMnistClass.execute("none").result
    assert torch.equal(none[0][0], torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="digit must be"):
        mn.EPDMnistClass.execute("12")
    images, _ = mnist_data.split("heldout")
    latent = mm.images_to_latent(images[:3])
    assert latent.shape == (3, *mm.LATENT_SHAPE)
    (decoded,) = mn.EPDMnistDecode.execute({"samples": latent}, 4).result
    assert decoded.shape == (3, 112, 112, 3)
    assert torch.allclose(decoded[:, ::4, ::4, 0], images[:3], atol=1e-6)
    with pytest.raises(ValueError, match="MNIST latents"):
        mn.EPDMnistDecode.execute({"samples": torch.zeros(1, 4, 64, 64)}, 1)


def test_the_decode_node_shows_the_demo_digits_model_s_latents():
    """EPD Demo Digits Model's samples ([B, 4, 8, 8]) could not be shown by any node of the pack: EPD MNIST Decode
    refused them, though they decode by the same pixel shuffle into a 16x16 digit."""
    dm = H.pack_module("nodes.digits_model")
    digits = torch.randint(0, 17, (2, 8, 8), generator=torch.Generator().manual_seed(0)).float()  # grey levels 0..16
    latent = dm.digits_to_latent(digits)
    (decoded,) = mn.EPDMnistDecode.execute({"samples": latent}, 2).result
    assert decoded.shape == (2, 32, 32, 3)
    upsampled = torch.nn.functional.interpolate(digits[:, None] / 16.0, size=(16, 16), mode="bilinear")[:, 0]
    assert torch.allclose(decoded[:, ::2, ::2, 0], upsampled, atol=1e-6)  # the inverse of digits_to_latent


def test_a_text_prompt_is_refused_with_a_clear_error():
    (model,) = mn.EPDMnistModel.execute("flow").result
    positive = [[torch.zeros(1, 77, 768), {}]]
    (latent,) = nodes.EmptyLatentImage().generate(112, 112, 1)
    with pytest.raises(ValueError, match="class token"):
        nodes.KSampler().sample(model, 0, 2, 3.0, "euler", "normal", positive, positive, latent, denoise=1.0)


def _bad(tmp_path: Path, name: str, state: dict, meta: dict) -> Path:
    path = tmp_path / name
    save_file(state, str(path), metadata=meta)
    return path


def test_bad_weight_files_are_refused(tmp_path):
    good = mm.weights_path("eps")
    meta = mm.read_metadata(good)
    state = load_file(str(good))
    with pytest.raises(FileNotFoundError, match="train them"):
        mm.mnist_model("eps", tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mm.mnist_model("eps", junk)
    with pytest.raises(ValueError, match="is the 'eps' MNIST model, not 'flow'"):
        mm.mnist_model("flow", good)
    cases = {
        "format": ({**meta, "format": "something-else"}, state, "not an EPD MNIST UNet"),
        "config": ({**meta, "unet_config": json.dumps({"model_channels": 64})}, state, "another UNet configuration"),
        "sampling": ({**meta, "sampling": json.dumps({"model_type": "EPS"})}, state, "another schedule"),
        "missing": (meta, {k: v for k, v in state.items() if k != "out.2.weight"}, "missing"),
        "extra": (meta, {**state, "extra.weight": torch.zeros(1)}, "unexpected"),
        "shape": (meta, {**state, "out.2.bias": torch.zeros(5, dtype=torch.float16)}, "expected float16/float32"),
        "dtype": (meta, {**state, "out.2.bias": state["out.2.bias"].to(torch.int16)}, "expected float16/float32"),
        "nan": (meta, {**state, "out.2.bias": torch.full_like(state["out.2.bias"], float("nan"))}, "non-finite"),
    }
    for name, (bad_meta, bad_state, message) in cases.items():
        path = _bad(tmp_path, f"{name}.safetensors", bad_state, bad_meta)
        with pytest.raises(ValueError, match=message):
            mm.mnist_model("eps", path)
    with pytest.raises(ValueError, match="kind must be one of"):
        mm.weights_path("v")


def test_training_script_quick_mode(tmp_path):
    """--quick trains a few iterations, writes a loadable file with its provenance, and is deterministic."""
    from scripts import train_mnist

    runs = []
    for name in ("a", "b"):
        with torch.random.fork_rng():
            runs.append(train_mnist.main(["--kind", "flow", "--quick", "--out", str(tmp_path / f"{name}.safetensors")]))
    first, again = runs
    assert first["iterations"] == "20" and "--quick" in first["command"] and first["kind"] == "flow"
    assert float(first["final_loss"]) < float(first["first_loss"])
    assert again["losses"] == first["losses"]
    a = mm.mnist_model("flow", tmp_path / "a.safetensors").diffusion_model.state_dict()
    b = mm.mnist_model("flow", tmp_path / "b.safetensors").diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit):
        train_mnist.main(["--kind", "eps", "--quick"])


def test_the_mnist_scripts_refuse_bad_arguments_before_training(tmp_path, capsys):
    """From a review of the testbed's scripts: each of these trained for minutes (hours on the real settings) and
    then failed or wrote the wrong thing: a folder at the destination, a kind 'Flow', an --init table of another
    NFE saved under every --nfes name (over the bundled tables with --out weights/demo), negative iterations (an
    untrained model), 0 taken as the default, --quick overriding --iterations."""
    from scripts import make_mnist_tables, train_mnist

    (tmp_path / "taken.safetensors").mkdir()
    (tmp_path / "mnist-eps-nfe5.safetensors").mkdir()
    init = H.ROOT / "weights" / "demo" / "mnist-eps-nfe5-k4.safetensors"
    cases = [
        (train_mnist.main, ["--kind", "classifier", "--out", str(tmp_path / "taken.safetensors")], "is a folder"),
        (train_mnist.main, ["--kind", "classifier", "--iterations", "-5", "--out", str(tmp_path / "c.st")],
         "--iterations must be positive"),
        (train_mnist.main, ["--kind", "classifier", "--batch", "0", "--out", str(tmp_path / "c.st")],
         "--batch must be positive"),
        (train_mnist.main, ["--kind", "flow", "--quick", "--iterations", "5", "--out", str(tmp_path / "q.st")],
         "leave out --iterations"),
        (make_mnist_tables.main, ["--kinds", "eps", "Flow", "--out", str(tmp_path)], "invalid choice: 'Flow'"),
        (make_mnist_tables.main, ["--kinds", "eps", "--nfes", "5", "--out", str(tmp_path)], "is a folder"),
        (make_mnist_tables.main, ["--kinds", "eps", "--nfes", "10", "--init", str(init), "--out", str(tmp_path)],
         "is an NFE-5 carry table"),
    ]  # fmt: skip
    for main, argv, problem in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and problem in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-eps-nfe5.safetensors", "taken.safetensors"]


def test_the_sample_grid_takes_fewer_than_ten_per_class():
    """make_mnist_grid's picture put ten columns in a row whatever --per-class was: with 5 a row took the next
    digit's samples and the last row was short (a crash after all the sampling, the scores lost)."""
    from scripts import make_mnist_grid

    images = torch.arange(10).repeat_interleave(5)[:, None, None].expand(50, 28, 28).float() / 10
    picture = make_mnist_grid.grid([images], scale=1)
    assert picture.size == (5 * 28, 10 * 28)
    rows = torch.tensor(np.asarray(picture)).float()[::28, 0] / 255
    assert torch.allclose(rows, torch.arange(10) / 10, atol=1 / 255)


def test_classifier_and_metrics(heldout, classifier):
    meta = safe_open(str(mnist_metrics.CLASSIFIER), "pt").metadata()
    assert meta["command"] == "python -m scripts.train_mnist --kind classifier"
    images, labels = heldout
    accuracy = mnist_metrics.class_accuracy(images, labels, classifier)
    assert accuracy >= 0.97 and f"{accuracy:.4f}" == meta["heldout_accuracy"]
    feats = mnist_metrics.features(images, classifier)
    assert feats.shape == (1000, mnist_metrics.FEATURES) and feats.dtype == torch.float64
    assert abs(mnist_metrics.frechet_distance(feats, feats)) < 1e-6
    # exact moments: the 8 sign patterns of 3 dimensions have mean 0 and sample covariance 8/7 I; an affine map
    # diag(s) x + mu of them is at distance |mu|^2 + 8/7 sum (1 - s)^2
    a = torch.tensor([[(i >> j & 1) * 2.0 - 1.0 for j in range(3)] for i in range(8)], dtype=torch.float64)
    s, mu = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    expected = 5.0 + 8 / 7 * (1.0 + 0.0 + 0.25)
    assert abs(mnist_metrics.frechet_distance(a, a * s + mu) - expected) < 1e-9
    with pytest.raises(ValueError, match="same D"):
        mnist_metrics.frechet_distance(feats, feats[:, :5])
    bad = mnist_metrics.CLASSIFIER.parent / "not-there.safetensors"
    with pytest.raises(FileNotFoundError):
        mnist_metrics.load_classifier(bad)


def test_all_digits_class_conditions_sample_i_on_digit_i():
    """'0-9' is a batch of the ten class tokens: in a batch of 10, sample i is what digit i gives on its noise."""
    (model,) = mn.EPDMnistModel.execute("eps").result
    all_pos, neg = mn.EPDMnistClass.execute("0-9").result
    assert torch.equal(all_pos[0][0], mm.class_token(list(range(10))))
    (latent,) = nodes.EmptyLatentImage().generate(112, 112, 10)
    (everything,) = nodes.KSampler().sample(model, 5, 3, 3.0, "euler", "normal", all_pos, neg, latent)
    for digit in (2, 7):
        pos, _ = mn.EPDMnistClass.execute(str(digit)).result
        (one,) = nodes.KSampler().sample(model, 5, 3, 3.0, "euler", "normal", pos, neg, latent)
        assert torch.allclose(everything["samples"][digit], one["samples"][digit], atol=1e-5)
        assert not torch.allclose(everything["samples"][digit + 1], one["samples"][digit + 1], atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_epd_ksampler_keeps_sample_j_on_class_j_mod_10_in_a_batch_of_four(kind):
    """The demo's '0-9' over a latent batch of 4 (10 does not divide 4): EPD KSampler's batched points drew other
    digits (ComfyUI tiles the ten class tokens over the K*4 rows of a call). Batched equals one point per call, and
    each sample equals its own class sampled alone."""
    (model,) = mn.EPDMnistModel.execute(kind).result
    all_pos, neg = mn.EPDMnistClass.execute("0-9").result
    params = epd_core.load_params(H.ROOT / "weights" / "demo" / f"mnist-{kind}-nfe5.safetensors")
    (latent,) = nodes.EmptyLatentImage().generate(112, 112, 4)
    epd = H.NODES["EPDKSampler"]
    runs = {mode: epd.execute(model, 3, 3.0, all_pos, neg, latent, params, 1.0, mode, True, "estimate").result[0]
            for mode in ("batched", "sequential")}  # fmt: skip
    assert torch.allclose(runs["batched"]["samples"], runs["sequential"]["samples"], atol=1e-5)
    pos3, _ = mn.EPDMnistClass.execute("3").result
    (alone,) = epd.execute(model, 3, 3.0, pos3, neg, latent, params, 1.0, "batched", True, "estimate").result
    assert torch.allclose(runs["batched"]["samples"][3], alone["samples"][3], atol=1e-5)


@pytest.mark.usefixtures("few_held_out")
def test_table_script_fine_tunes_on_a_given_grid(tmp_path, request):
    """``make_mnist_tables --grid`` starts from the given time points instead of the ``--init`` table's own; with
    the grid frozen the trained table keeps them and records the command that made it. A grid of the wrong length
    is refused with the table's own message."""
    import logging

    from epd_core.files import load_params
    from scripts import make_mnist_tables

    level = logging.getLogger("epd").level
    request.addfinalizer(lambda: logging.getLogger("epd").setLevel(level))  # main logs the training curve at INFO
    init = Path(__file__).resolve().parents[1] / "weights" / "demo" / "mnist-eps-nfe5-k4scg.safetensors"
    grid = [14.6146, 8.4321, 3.8631, 1.5191, 0.3, 0.0292]
    args = ["--kinds", "eps", "--nfes", "5", "--points", "4", "--no-learn-grid", "--objective", "global",
            "--final-estimate", "--init", str(init), "--iterations", "1", "--batch", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert make_mnist_tables.main([*args, "--grid", *map(str, grid)]) == 0
    made = load_params(tmp_path / "mnist-eps-nfe5.safetensors")
    assert torch.equal(made.t_steps, torch.tensor(grid, dtype=torch.float64))
    assert not torch.equal(load_params(init).t_steps, made.t_steps)
    assert "--grid 14.6146 8.4321 3.8631 1.5191 0.3 0.0292" in made.metadata["command"]
    with pytest.raises(ValueError, match="t_steps"):
        make_mnist_tables.main([*args, "--grid", *map(str, grid[:-1])])


@pytest.mark.usefixtures("few_held_out")
def test_table_script_resumes_a_stopped_run(tmp_path, request, monkeypatch, caplog, capsys):
    """``make_mnist_tables --resume`` (what scripts/gpu_mnist.sh runs) keeps a checkpoint next to the table: a run
    stopped before its table was written continues from it, without training again, to the table an uninterrupted
    run makes, and the checkpoint goes once the table is saved. The same command again keeps the finished table
    (it trained afresh: scripts/gpu_mnist.sh's next call restarted a finished job); another command trains."""
    import logging

    from epd_core.files import load_params
    from epd_dev import comfy_harness
    from scripts import make_mnist_tables

    level = logging.getLogger("epd").level
    request.addfinalizer(lambda: logging.getLogger("epd").setLevel(level))
    init = Path(__file__).resolve().parents[1] / "weights" / "demo" / "mnist-eps-nfe5-k4scg.safetensors"
    args = ["--kinds", "eps", "--nfes", "5", "--points", "4", "--objective", "global", "--final-estimate",
            "--init", str(init), "--iterations", "3", "--batch", "2", "--teacher-m", "1"]  # fmt: skip
    assert make_mnist_tables.main([*args, "--out", str(tmp_path / "whole")]) == 0
    training, files = comfy_harness.pack_module("nodes.training"), comfy_harness.pack_module("nodes.table_files")

    def stopped(*_, **__):
        raise KeyboardInterrupt("stopped at the deadline")

    with monkeypatch.context() as patch:
        patch.setattr(files, "save_params", stopped)
        with pytest.raises(KeyboardInterrupt):
            make_mnist_tables.main([*args, "--resume", "--out", str(tmp_path / "resumed")])
    checkpoint = tmp_path / "resumed" / "mnist-eps-nfe5.epd-checkpoint"
    assert checkpoint.is_file() and not (tmp_path / "resumed" / "mnist-eps-nfe5.safetensors").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="epd"):
        assert make_mnist_tables.main([*args, "--resume", "--out", str(tmp_path / "resumed")]) == 0
    assert not any("EPD: 1 / 3" in message for message in caplog.messages)  # continued, not trained afresh
    assert not checkpoint.exists()
    whole, resumed = (load_params(tmp_path / d / "mnist-eps-nfe5.safetensors") for d in ("whole", "resumed"))
    for name in ("t_steps", "r_params", "weight_s", "scale_dir_params", "scale_time_params"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name)), name
    table = tmp_path / "resumed" / "mnist-eps-nfe5.safetensors"
    made = table.read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="epd"), monkeypatch.context() as patch:
        patch.setattr(training, "distill_on_model", stopped)  # training again would stop
        assert make_mnist_tables.main([*args, "--resume", "--out", str(tmp_path / "resumed")]) == 0
        assert table.read_bytes() == made
        with pytest.raises(KeyboardInterrupt):  # another command: its own run
            make_mnist_tables.main([*args, "--seed", "1", "--resume", "--out", str(tmp_path / "resumed")])
    assert "finished by this command earlier, kept" in capsys.readouterr().out


def test_table_script_splits_points_of_a_narrower_start():
    """``make_mnist_tables --points 8 --init <K = 4 table>`` starts from the table with each point split in two:
    with no spread the wider table samples exactly as the narrow one; with the default spread each point's
    weight is kept, its copies sit on either side of it, and the samples stay close. K = 6 splits the first two."""
    from epd_core import GaussianMixture, sample
    from epd_core.files import load_params
    from scripts.make_mnist_tables import split_points

    narrow = load_params(Path(__file__).resolve().parents[1] / "weights" / "demo" / "mnist-eps-nfe5-k4scg.safetensors")
    gm = GaussianMixture.reference()
    x = torch.randn(16, *gm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.cat([narrow.t_steps, torch.zeros(1, dtype=torch.float64)])
    base = sample(gm.denoise_ve, x * sigmas[0], sigmas, narrow)
    exact = sample(gm.denoise_ve, x * sigmas[0], sigmas, split_points(narrow, 8, spread=0.0))
    assert torch.allclose(exact, base, atol=1e-12)
    for points, copies in ((8, [2, 2, 2, 2]), (6, [2, 2, 1, 1])):
        wide = split_points(narrow, points)
        assert wide.num_points == points
        d, e = narrow.decoded(), wide.decoded()
        owner = torch.tensor([j for j, n in enumerate(copies) for _ in range(n)])
        assert torch.allclose(torch.zeros_like(d.weight).index_add_(1, owner, e.weight), d.weight, atol=1e-12)
        for j, n in enumerate(copies):
            r = e.r[:, owner == j]
            if n == 1:
                assert torch.equal(r[:, 0], d.r[:, j])
            else:
                assert bool((r.min(1).values < d.r[:, j]).all() and (r.max(1).values > d.r[:, j]).all())
        moved = sample(gm.denoise_ve, x * sigmas[0], sigmas, wide)
        assert 0 < float((moved - base).abs().max()) < 0.01 * float(base.abs().max())


def test_training_takes_the_finite_difference_step_of_the_dtype_the_model_computes_in():
    """EPD Distill's per-step objective differences the model's answers: a model loaded in half precision (weights
    stored so, or cast per layer) needs the step its rounding allows, a float32 one keeps the float32 step."""
    tr = H.pack_module("nodes.training")
    objective = H.pack_module("epd_core.objective")
    (model,) = mn.EPDMnistModel.execute("eps").result
    assert tr.compute_dtype(model) == torch.float32
    from epd_dev.tiny_models import tiny_model

    analytic = H.pack_module("nodes.nodes_demo").EPDAnalyticModel
    for form in H.pack_module("nodes.analytic_model").FORMS:
        assert tr.compute_dtype(analytic.execute(form, "reference", 0.0).result[0]) == torch.float32
    assert tr.compute_dtype(tiny_model("flux")) == torch.float32  # a network whose config names no dtype
    for weights, cast in ((torch.bfloat16, None), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)):
        config = mm.MnistConfig("eps")
        config.set_inference_dtype(weights, cast)
        base = comfy.model_base.BaseModel(config, model_type=model.model.model_type)
        cpu = torch.device("cpu")
        half = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
        computes = cast or weights
        assert tr.compute_dtype(half) == computes
        step = objective.fd_step(tr.compute_dtype(half))
        assert step == (objective.FD_STEP if computes == torch.float32 else torch.finfo(computes).eps ** 0.5)
