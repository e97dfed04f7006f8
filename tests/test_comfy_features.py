"""EPD Distill's feature loss: the encoders (a tiny VAE + CLIP vision, the MNIST classifier) and the node's use."""

from __future__ import annotations

import pytest
import torch

import epd_core
from epd_core.params import time_points_for_nfe
from epd_dev import comfy_harness as H
from epd_dev import mnist_metrics
from epd_dev.comfy_harness import NODES as N
from epd_dev.tiny_models import VISION, conditioning, latent, tiny_clip_vision, tiny_model, tiny_vae, tiny_wan_vae

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    with torch.inference_mode():  # as ComfyUI's loader nodes build them: weights autograd cannot save
        return tiny_vae(), tiny_clip_vision(tmp_path_factory.mktemp("cv"))


@pytest.fixture
def epd_dir(tmp_path, monkeypatch, few_held_out):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["epd"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(tmp_path)] + list(paths), exts))
    return tmp_path


def test_clip_pixels_are_comfyuis_preprocessing_without_the_rounding():
    from comfy.clip_vision import clip_preprocess  # 0.33 re-exports comfy.clip_model's

    features = H.pack_module("nodes.features")
    images = torch.rand(3, 40, 56, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = features.clip_pixels(images, 32, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    theirs = clip_preprocess(images.detach(), size=32, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    assert ours.shape == theirs.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours.detach(), theirs, atol=0.5 / 255 / 0.2 + 1e-6, rtol=0)
    assert not torch.equal(ours.detach(), theirs)  # no 8-bit rounding
    ours.square().sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_clip_vision_encoder_is_encode_image_of_the_decoded_latents_and_passes_gradients(towers):
    vae, clip_vision = towers
    features = H.pack_module("nodes.features")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    (encoder,) = N["EPDFeatureEncoder"].execute(vae, clip_vision).result
    assert encoder.name == "clip_vision"
    with torch.no_grad():
        reference = clip_vision.encode_image(vae.decode(latents))["image_embeds"]
    x = latents.clone().requires_grad_(True)
    got = encoder.embed(x)
    assert got.shape == (2, VISION["projection_dim"])
    torch.testing.assert_close(got.detach(), reference, atol=2e-2, rtol=2e-2)  # ComfyUI rounds pixels to 8 bits
    got.square().sum().backward()
    assert float(x.grad.abs().sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(features.decode(vae, latents)[:, 0], vae.decode(latents), atol=1e-5, rtol=0)


def test_a_siglip_encoder_gives_one_vector_per_image(tmp_path, towers):
    """SigLIP's image_embeds are one per patch ([B, tokens, D]); the feature loss refused them after training had
    begun. The encoder averages the patch embeddings."""
    vae, _ = towers
    with torch.inference_mode():
        siglip = tiny_clip_vision(tmp_path, siglip=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    (encoder,) = N["EPDFeatureEncoder"].execute(vae, siglip).result
    with torch.no_grad():
        tokens = siglip.encode_image(vae.decode(latents))["image_embeds"]
    assert tokens.ndim == 3
    x = latents.clone().requires_grad_(True)
    got = encoder.embed(x)
    torch.testing.assert_close(got.detach(), tokens.mean(dim=1), atol=2e-2, rtol=2e-2)  # ComfyUI's 8-bit pixels
    got.square().sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_a_video_vaes_frames_are_encoded_side_by_side(towers):
    """Wan's VAE decodes [B, 16, T, h, w] latents to [B, 3, frames, H, W]; the feature loss wanted 4-D images."""
    _, clip_vision = towers
    wan = tiny_wan_vae()
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    (encoder,) = N["EPDFeatureEncoder"].execute(wan, clip_vision).result
    with torch.no_grad():
        frames = wan.decode(latents)  # ComfyUI's VAE Decode: [B, frames, H, W, 3]
        reference = clip_vision.encode_image(frames.flatten(0, 1))["image_embeds"].reshape(2, -1)
    x = latents.clone().requires_grad_(True)
    got = encoder.embed(x)
    assert frames.shape[1] == 5 and got.shape == (2, 5 * VISION["projection_dim"])
    torch.testing.assert_close(got.detach(), reference, atol=2e-2, rtol=2e-2)
    got.square().sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_mnist_features_are_the_digits_fid_features():
    (encoder,) = N["EPDMnistFeatures"].execute().result
    mm = H.pack_module("nodes.mnist_model")
    latents = mm.images_to_latent(torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(2)))
    expected = mnist_metrics.features(mm.latent_to_images(latents))
    torch.testing.assert_close(encoder.embed(latents).double(), expected, atol=1e-5, rtol=1e-5)
    assert encoder.name == "mnist_classifier"


def test_final_feature_loss_is_the_weighted_feature_distance():
    features = H.pack_module("nodes.features")
    proj = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    encoder = features.Encoder("linear", lambda z: z.flatten(1) @ proj)
    reloads = []
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    target = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    loss = features.final_feature_loss(encoder, 2.5, lambda z: 2 * z, lambda: reloads.append(1))(x, target)
    expected = 2.5 * ((2 * x.flatten(1) @ proj - 2 * target.flatten(1) @ proj) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert reloads and float(x.grad.abs().sum()) > 0

    bad = features.Encoder("bad", lambda z: z)
    with pytest.raises(ValueError, match="one vector per image"):
        features.final_feature_loss(bad, 1.0, lambda z: z, lambda: None)(x, target)


def _distill(model, name, encoder=None, weight=1.0, objective="global", iterations=3):
    args = (conditioning(1, 1), conditioning(1, 2), latent("eps", 1), 1.0, 4, 2, "dpm2", 1, iterations, 2, 0.05, 0,
            False, name, False)  # fmt: skip
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return N["EPDDistill"].execute(model, *args, objective=objective, feature_encoder=encoder,
                                       feature_weight=weight, start_check=16).result  # fmt: skip


def test_distill_node_trains_on_the_feature_loss(epd_dir, towers):
    vae, clip_vision = towers
    model = tiny_model("eps")
    (encoder,) = N["EPDFeatureEncoder"].execute(vae, clip_vision).result
    plain, _ = _distill(model, "plain")
    featured, info = _distill(model, "featured", encoder, weight=10.0)
    saved = epd_core.load_params(epd_dir / "featured.safetensors")
    assert saved.metadata["feature_loss"] == {"encoder": "clip_vision", "weight": 10.0}
    assert "(last step: clip_vision features x 10)" in info
    assert "feature_loss" not in plain.metadata
    assert not torch.allclose(featured.r_params, plain.r_params)  # the final step's loss is another one
    # the global objective's only loss is the last step's: weight 0 leaves the start table's tables untouched
    zero, _ = _distill(model, "zero", encoder, weight=0.0)
    steps, afs = time_points_for_nfe(4, "carry")
    start = H.pack_module("nodes.training").start_table(model.get_model_object("model_sampling"), steps, 2, afs,
                                                        "carry")  # fmt: skip
    torch.testing.assert_close(zero.r_params, start.r_params)
    torch.testing.assert_close(zero.weight_s, start.weight_s)
    assert not torch.allclose(plain.r_params, start.r_params)
    # the default objective (per step, finite differences through the model) takes the feature loss at its last step
    local_plain, _ = _distill(model, "local_plain", objective="local")
    local, _ = _distill(model, "local", encoder, weight=10.0, objective="local")
    assert local.metadata["distilled"]["gradient"] == "fd" and torch.isfinite(local.r_params).all()
    assert not torch.allclose(local.r_params, local_plain.r_params)


def test_a_model_sampling_node_keeps_continuous_timesteps_after_the_encoder_unloads_the_model(epd_dir):
    """A feature encoder (a VAE, CLIP vision) that needs the memory makes ComfyUI unload the sampled model, and
    training loads it back; loading re-sets the model's object patches, so under a ModelSamplingDiscrete node
    (v-prediction or zero-terminal-SNR checkpoints need one) every later call got ComfyUI's rounded timesteps, while
    sampling sees continuous ones: the table was fitted to another model function."""
    import comfy.model_management
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from epd_dev.tiny_models import network_calls

    features = H.pack_module("nodes.features")
    (model,) = ModelSamplingDiscrete().patch(tiny_model("eps"), "v_prediction", False)
    patched = model.get_model_object("model_sampling")
    embedded = []

    def embed(z):
        embedded.append(1)
        comfy.model_management.unload_all_models()  # what loading a VAE does where memory is short
        return z.flatten(1)

    args = (conditioning(1, 1), conditioning(1, 2), latent("eps", 1), 1.0, 4, 2, "dpm2", 1, 1, 2, 0.05, 0, False,
            "unloaded", False)  # fmt: skip
    with network_calls(model) as calls, torch.inference_mode():
        N["EPDDistill"].execute(model, *args, feature_encoder=features.Encoder("unloading", embed), start_check=0)
    assert embedded
    rounded = [bool(torch.equal(t, t.round())) for _, t in calls]
    assert not all(rounded[-len(rounded) // 2 :]), "the model saw only integer timesteps after it was loaded back"
    assert model.model.model_sampling is patched
