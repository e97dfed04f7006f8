"""EPD RDPO's clip_score reward on tiny genuine ComfyUI models: VAE, CLIP vision, CLIP text (random weights)."""

from __future__ import annotations

import pytest
import torch

import epd_core
from epd_dev import comfy_harness as H
from epd_dev.comfy_harness import NODES as N
from epd_dev.tiny_models import (
    VISION,
    conditioning,
    latent,
    tiny_clip,
    tiny_clip_vision,
    tiny_model,
    tiny_vae,
    tiny_wan_vae,
)

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]
PROMPT = "a photo of a red bicycle"


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tiny_vae(), tiny_clip_vision(tmp_path_factory.mktemp("cv")), tiny_clip()


@pytest.fixture
def epd_dir(tmp_path, monkeypatch):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["epd"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd", ([str(tmp_path)] + list(paths), exts))
    return tmp_path


def _start(model) -> epd_core.EPDParams:
    training = H.pack_module("nodes.training")

    return training.start_table(model.get_model_object("model_sampling"), 4, 2, False)


def _moved(table: epd_core.EPDParams, start: epd_core.EPDParams) -> bool:
    """Whether training changed the table's positions or weights (a node that returned its start would not)."""
    return not (torch.equal(table.r_params, start.r_params) and torch.equal(table.weight_s, start.weight_s))


def _run_node(model, name: str, reward: str = "clip_score", prompts: int | None = None, **optional):
    """EPD RDPO's node on two prompts, one for clip_score (which scores against its one prompt)."""
    prompts = prompts or (1 if reward == "clip_score" else 2)
    args = (conditioning(prompts, 1), conditioning(prompts, 2), latent("eps", 1), _start(model), 2.0, reward, 2, 2, 2,
            2, 20.0)  # fmt: skip
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return N["EPDRDPO"].execute(model, *args, 1e-3, 0, name, False, **optional).result


def test_clip_score_is_100_cosine_of_the_projected_embeddings(towers):
    import comfy.clip_vision

    rewards = H.pack_module("nodes.rewards")

    vae, clip_vision, clip = towers
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = rewards.clip_score_reward(vae, clip_vision, clip, PROMPT)
    got = reward(latents, torch.arange(4))
    assert reward.__name__ == "clip_score" and got.shape == (4,)

    transformer = clip.cond_stage_model.clip_l.transformer
    ids = torch.tensor([[token for token, _ in clip.tokenize(PROMPT)["l"][0]]])
    with torch.no_grad():
        pooled = transformer.text_model(input_tokens=ids)[2][0]
        text = transformer.text_projection(pooled)
        images = ((vae.first_stage_model.decode(latents) + 1) / 2).clamp(0, 1).movedim(1, -1)
        pixels = comfy.clip_vision.clip_preprocess(images, size=VISION["image_size"])
        image = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[2]
    cos = (image @ text) / (image.norm(dim=-1) * text.norm())
    torch.testing.assert_close(got, 100 * cos, atol=2e-3, rtol=1e-4)
    assert float(got.std()) > 1e-3  # the score depends on the image

    # ComfyUI's own pooled output for an SD1 CLIP is the unprojected one; the reward asks for the projection
    unprojected = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)[1][0]
    torch.testing.assert_close(unprojected, pooled, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(rewards.prompt_embedding(clip, PROMPT), pooled, atol=1e-2)


def test_rdpo_node_trains_on_clip_score(epd_dir, towers):
    import comfy.model_management

    vae, clip_vision, clip = towers
    model = tiny_model("eps")
    params, info = _run_node(model, "clip", vae=vae, clip_vision=clip_vision, clip=clip, prompt=PROMPT)
    loaded = epd_core.load_params(epd_dir / "clip.safetensors")
    assert loaded.metadata["rdpo"]["reward"] == "clip_score" and loaded.metadata["reward_prompt"] == PROMPT
    assert -100 <= loaded.metadata["rdpo"]["first_reward"] <= 100 and "reward" in info
    assert torch.isfinite(loaded.r_params).all() and torch.equal(loaded.r_params, params.r_params)
    assert _moved(loaded, _start(model))
    loaded_models = comfy.model_management.loaded_models()
    assert {id(m) for m in (model, vae.patcher, clip_vision.patcher)} <= {id(m) for m in loaded_models}


def test_reward_may_push_the_model_off_the_device(epd_dir):
    """Loading a reward's models can unload the sampled one (low VRAM); it is loaded back, with its patches."""
    import comfy.model_management

    training = H.pack_module("nodes.training")

    def patched():
        model = tiny_model("eps")
        weight = model.model.state_dict()["diffusion_model.out.2.weight"]
        model.add_patches({"diffusion_model.out.2.weight": (torch.full_like(weight, 0.05),)})
        return model

    def run(squeeze: bool):
        model = patched()

        def contrast(latents, context):
            if squeeze:
                comfy.model_management.unload_all_models()
            return latents.flatten(1).std(1)

        config = H.pack_module("epd_core.config").RDPOConfig(iterations=3, groups=2, k=2)
        return training.rdpo_on_model(model, conditioning(1, 1), conditioning(1, 2), 1.0, latent("eps", 1)["samples"],
                                      _start(model), config, reward=contrast)  # fmt: skip

    (squeezed, curve_squeezed), (calm, curve_calm) = run(True), run(False)
    assert curve_squeezed == curve_calm
    assert torch.equal(squeezed.r_params, calm.r_params) and squeezed.metadata["rdpo"]["reward"] == "contrast"


def test_a_reward_gets_latents_in_comfyui_latent_format():
    """A model that always denoises to 10 ends near 10 inside the sampling, near 10 / 0.18215 as a LATENT."""
    training = H.pack_module("nodes.training")
    config = H.pack_module("epd_core.config").RDPOConfig(iterations=1, groups=2, k=2)
    model = tiny_model("eps")
    model.set_model_sampler_post_cfg_function(lambda args: torch.full_like(args["denoised"], 10.0))
    seen: list[torch.Tensor] = []

    def record(latents, context):
        seen.append(latents.clone())
        return latents.flatten(1).std(1)

    training.rdpo_on_model(model, conditioning(1, 1), conditioning(1, 2), 1.0, latent("eps", 1)["samples"],
                           _start(model), config, reward=record)  # fmt: skip
    inside = seen[0] * model.model.latent_format.scale_factor
    assert seen[0].shape == (4, 4, 8, 8) and (inside - 10).abs().max() < 0.5


def test_a_clip_without_its_text_projection_is_refused(towers):
    """An SD1.5 checkpoint stores no projection for its CLIP-L; ComfyUI leaves the weight uninitialised (zeros)."""
    rewards = H.pack_module("nodes.rewards")

    vae, clip_vision, _ = towers
    clip = tiny_clip()
    with torch.no_grad():
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.zero_()
    with pytest.raises(ValueError, match="lacks its projection"):
        rewards.clip_score_reward(vae, clip_vision, clip, PROMPT)


@pytest.mark.parametrize("missing", ["vae", "clip_vision", "clip", "prompt"])
def test_clip_score_without_its_inputs_is_a_clear_error(epd_dir, towers, missing):
    vae, clip_vision, clip = towers
    given = {"vae": vae, "clip_vision": clip_vision, "clip": clip, "prompt": PROMPT}
    given[missing] = "  " if missing == "prompt" else None
    with pytest.raises(ValueError, match=f"clip_score needs .*missing: {missing}$"):
        _run_node(tiny_model("eps"), "missing", **given)
    assert list(epd_dir.iterdir()) == []


def test_text_and_vision_widths_must_match(epd_dir, towers):
    vae, clip_vision, _ = towers
    with pytest.raises(ValueError, match="text embedding has 24 dimensions but the CLIP vision embedding 16"):
        _run_node(tiny_model("eps"), "mismatch", vae=vae, clip_vision=clip_vision, clip=tiny_clip(24), prompt=PROMPT)
    assert list(epd_dir.iterdir()) == []


def test_clip_score_refuses_a_conditioning_of_several_prompts(epd_dir, towers):
    """Every rollout is scored against the node's one prompt: with a batch of 'a cat' and 'a dog' the dogs were
    rewarded for looking like a cat."""
    vae, clip_vision, clip = towers
    with pytest.raises(ValueError, match="conditioning holds 2 prompts"):
        _run_node(tiny_model("eps"), "two", prompts=2, vae=vae, clip_vision=clip_vision, clip=clip, prompt=PROMPT)
    assert list(epd_dir.iterdir()) == []


def test_rewards_score_a_video_vaes_frames(towers, tmp_path):
    """Wan's VAE decodes a rollout to frames [T, H, W, 3] (ComfyUI's VAE Decode); clip_score refused them and
    preference failed in torch. A rollout scores the mean over its frames."""
    from safetensors.torch import save_file

    rewards = H.pack_module("nodes.rewards")
    _, clip_vision, clip = towers
    wan = tiny_wan_vae()
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        frames = wan.decode(latents)
        embeds = rewards.image_embeddings(clip_vision, frames.flatten(0, 1)).reshape(2, frames.shape[1], -1)
    text = rewards.prompt_embedding(clip, PROMPT)
    cos = 100 * torch.nn.functional.cosine_similarity(embeds, text[None, None], dim=-1)
    got = rewards.clip_score_reward(wan, clip_vision, clip, PROMPT)(latents, torch.arange(2))
    assert frames.shape[1] == 5 and got.shape == (2,)
    torch.testing.assert_close(got, cos.mean(dim=1), atol=1e-4, rtol=1e-4)
    head = tmp_path / "linear.safetensors"
    weight = torch.randn(1, VISION["projection_dim"], generator=torch.Generator().manual_seed(4))
    save_file({"layers.0.weight": weight, "layers.0.bias": torch.zeros(1)}, str(head),
              metadata={"format": "epd-reward-head-v1", "normalize": "false"})  # fmt: skip
    got = rewards.preference_reward(wan, clip_vision, str(head))(latents, torch.arange(2))
    torch.testing.assert_close(got, (embeds @ weight[0]).mean(dim=1), atol=1e-4, rtol=1e-4)


def test_a_vae_of_another_latent_format_is_named_with_what_to_do(towers, tmp_path):
    """An SD1.5 VAE (4 channels) on an SD3 model's latents (16) failed in the rewards and the feature loss with
    torch's convolution error, which names no VAE. A VAE whose channels match still fails as torch says."""
    rewards = H.pack_module("nodes.rewards")
    vae, clip_vision, clip = towers
    head = tmp_path / "head.safetensors"
    _tiny_head(head)
    (encoder,) = N["EPDFeatureEncoder"].execute(vae, clip_vision).result
    sd3 = torch.randn(2, 16, 4, 4)
    what = "this VAE decodes latents of 4 channels and the model's have 16; connect the VAE that belongs to the model"
    for who, run in (
        ("clip_score", lambda x: rewards.clip_score_reward(vae, clip_vision, clip, PROMPT)(x, torch.arange(2))),
        ("preference", lambda x: rewards.preference_reward(vae, clip_vision, str(head))(x, torch.arange(2))),
        ("feature loss", encoder.embed),
    ):
        with pytest.raises(ValueError, match=f"^{who}: {what}$"):
            run(sd3)
    with pytest.raises(RuntimeError, match="^the VAE's own failure$"):  # channels that match: not renamed
        with H.pack_module("nodes.features").vae_of_the_model(vae, torch.zeros(2, 4, 4, 4), "clip_score"):
            raise RuntimeError("the VAE's own failure")


def test_a_siglip_vision_model_is_refused_by_the_reward_it_was_given(towers, tmp_path):
    """SigLIP gives no pooled embedding; the preference reward's error said 'clip_score'."""
    rewards = H.pack_module("nodes.rewards")
    vae, _, _ = towers
    siglip = tiny_clip_vision(tmp_path, siglip=True)
    _tiny_head(tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match="^preference: this CLIP vision model gives no pooled image embedding"):
        rewards.preference_reward(vae, siglip, str(tmp_path / "head.safetensors"))


@pytest.fixture
def rewards_dir(tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "epd_rewards"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd_rewards", ([str(folder)], {".safetensors"}))
    return folder


def _tiny_head(path, width: int = 16, seed: int = 6, **meta) -> list[torch.Tensor]:
    """A stand-in preference head (the LAION aesthetic predictor's form, scaled down): width -> 8 -> 1."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = [(8, width), (1, 8)]
    tensors = {}
    for i, shape in enumerate(shapes):
        tensors[f"layers.{i}.weight"] = torch.randn(shape, generator=g)
        tensors[f"layers.{i}.bias"] = torch.randn(shape[0], generator=g)
    save_file(tensors, str(path), metadata={"format": "epd-reward-head-v1", "activation": "relu", **meta})
    return [tensors[f"layers.{i}.{p}"] for i in range(2) for p in ("weight", "bias")]


def test_preference_head_scores_the_normalised_image_embedding(towers, rewards_dir, epd_dir):
    rewards = H.pack_module("nodes.rewards")
    vae, clip_vision, _ = towers
    w0, b0, w1, b1 = _tiny_head(rewards_dir / "head.safetensors")
    reward = rewards.preference_reward(vae, clip_vision, str(rewards_dir / "head.safetensors"))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = reward(latents, torch.arange(3))
    with torch.no_grad():
        embeds = rewards.image_embeddings(clip_vision, vae.decode(latents))
        e = torch.nn.functional.normalize(embeds, dim=-1)
        expected = (torch.relu(e @ w0.T + b0) @ w1.T + b1)[:, 0]
    assert reward.__name__ == "preference" and got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float(got.std()) > 1e-4

    model = tiny_model("eps")
    params, info = _run_node(
        model, "pref", "preference", vae=vae, clip_vision=clip_vision, reward_model="head.safetensors"
    )
    loaded = epd_core.load_params(epd_dir / "pref.safetensors")
    assert loaded.metadata["rdpo"]["reward"] == "preference" and loaded.metadata["reward_model"] == "head.safetensors"
    assert "KL to the start" in info and torch.isfinite(loaded.r_params).all() and _moved(loaded, _start(model))


def test_preference_head_files_are_checked(towers, rewards_dir, epd_dir):
    rewards = H.pack_module("nodes.rewards")
    vae, clip_vision, _ = towers
    torch.save({"layers.0.weight": torch.zeros(1, 16)}, rewards_dir / "head.pt")
    with pytest.raises(ValueError, match="no safetensors file 'head.pt'"):
        _run_node(tiny_model("eps"), "x", "preference", vae=vae, clip_vision=clip_vision, reward_model="head.pt")
    with pytest.raises(ValueError, match="no safetensors file"):
        _run_node(tiny_model("eps"), "x", "preference", vae=vae, clip_vision=clip_vision,
                  reward_model="../epd_rewards/head.safetensors")  # fmt: skip
    _tiny_head(rewards_dir / "wide.safetensors", width=24)
    with pytest.raises(ValueError, match="takes 24-dimensional embeddings but the CLIP vision model gives 16"):
        rewards.preference_reward(vae, clip_vision, str(rewards_dir / "wide.safetensors"))
    _tiny_head(rewards_dir / "odd.safetensors", format="something-else")
    with pytest.raises(ValueError, match="metadata format"):
        rewards.preference_reward(vae, clip_vision, str(rewards_dir / "odd.safetensors"))
    with pytest.raises(ValueError, match="needs vae, clip_vision; missing: clip_vision"):
        _run_node(tiny_model("eps"), "x", "preference", vae=vae, reward_model="wide.safetensors")
    assert list(epd_dir.glob("x*")) == []


@pytest.mark.parametrize("preset", ["ours", "authors"])
def test_rdpo_node_trains_on_every_prompt_of_a_batch(epd_dir, preset):
    """Three prompts: groups round up to 3 and rollout j is scored as prompt j % 3, as ComfyUI tiles them."""
    seen = []

    def by_index(latents, context):
        seen.append(len(latents))
        return latents.flatten(1).std(1)

    training = H.pack_module("nodes.training")
    model = tiny_model("eps")
    config = H.pack_module("epd_core.config").rdpo_preset(preset, iterations=2, groups=2, k=2)
    params, _ = training.rdpo_on_model(model, conditioning(3, 1), conditioning(1, 2), 2.0, latent("eps", 1)["samples"],
                                       _start(model), config, reward=by_index)  # fmt: skip
    info = params.metadata["rdpo"]
    assert info["prompts"] == 3 and info["groups"] == 3 and seen == [6, 6]
    assert info["grouping"] == ("prompt" if preset == "authors" else "noise") and params.metadata["prompts"] == 3


def test_the_guard_sees_latents_as_the_reward_does():
    """From a mutation audit: a guard handed the model's own latents instead of the LATENT format a VAE decodes (SD1.5's
    are 1 / 0.18215 = 5.5x larger) went unnoticed. With the guard's seed and a policy pinned to its start, the guard's
    first check and the first rollouts sample the same noises with (nearly) the same table, so they see the same."""
    training, rdpo_module = H.pack_module("nodes.training"), H.pack_module("epd_core.rdpo")
    model = tiny_model("eps")
    config = H.pack_module("epd_core.config").RDPOConfig(
        iterations=1, groups=4, k=2, concentration=1e6, scale_heads=False, seed=rdpo_module.GUARD_SEED
    )
    rewarded, guarded = [], []

    def reward(latents, context):
        rewarded.append(latents.clone())
        return latents.flatten(1).mean(1)

    def guard(latents):
        guarded.append(latents.clone())
        return 0.0

    training.rdpo_on_model(model, conditioning(1, 1), conditioning(1, 2), 2.0, latent("eps", 1)["samples"],
                           _start(model), config, reward=reward, guard=guard, guard_samples=4)  # fmt: skip
    assert guarded[0].shape == rewarded[0][:4].shape == (4, 4, 8, 8)
    assert torch.allclose(guarded[0], rewarded[0][:4], rtol=1e-2, atol=1e-2 * float(rewarded[0].abs().max()))
