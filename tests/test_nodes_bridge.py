"""The bridge (nodes/bridge.py): ComfyUI MODEL/CLIP/VAE ⇄ ModelBundle, LoRA application (config translation: test_comfy_layout.py)."""

import importlib

import pytest
import torch
from comfy_stubs import PACK_NAME, V_PREDICTION, X0, ModelSamplingContinuousEDM, comfy_env, fake_comfy_models, fake_models  # noqa: F401
from comfy_stubs import model_sampling

from pti_ops.models.tiny_model import build_tiny_bundle, build_tiny_sdxl_bundle


@pytest.fixture(scope="module")
def bridge(comfy_env):
    return importlib.import_module(PACK_NAME + ".nodes.bridge")


def test_bundle_from_comfy_reproduces_every_weight(bridge, fake_models):
    reference = build_tiny_bundle()
    model, clip, vae = fake_models
    bundle = bridge.bundle_from_comfy(model, clip, vae)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(reference, part).state_dict(), getattr(bundle, part).state_dict()
        assert set(want) == set(got), part
        assert all(torch.equal(want[key], got[key]) for key in want), part
    assert bundle.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert bundle.noise_scheduler.config.prediction_type == "epsilon"
    assert bundle.vae.config.scaling_factor == pytest.approx(0.18215)
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    with torch.no_grad():
        latents, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        text = torch.randn(1, 77, 32)
        assert torch.equal(reference.unet(latents, t, text).sample, bundle.unet(latents, t, text).sample)


def test_bundle_applies_upstream_patches_without_touching_them(bridge):
    model, clip, vae = fake_comfy_models()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    original = model.weights[key].clone()
    patched = model.clone()  # as LoraLoader does
    patched.add_patches({key: ("diff", (torch.ones_like(original),))}, 0.5)
    bundle = bridge.bundle_from_comfy(patched, clip, vae)
    to_k = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.allclose(to_k, original + 0.5)
    assert torch.equal(model.weights[key], original) and model.patches == {}


def test_v_prediction_models_train_with_v_targets(bridge):
    model, clip, vae = fake_comfy_models(prediction=V_PREDICTION, zsnr=True)  # a checkpoint with v_pred + ztsnr
    config = bridge.bundle_from_comfy(model, clip, vae).noise_scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr


@pytest.mark.parametrize("bundle_factory", [build_tiny_bundle, build_tiny_sdxl_bundle], ids=["sd15", "sdxl"])
def test_upstream_model_sampling_discrete_is_honoured(bridge, bundle_factory):
    """ModelSamplingDiscrete patches the MODEL's `model_sampling` object, not `model_type`: read what ComfyUI samples with."""
    model, clip, vae = fake_comfy_models(bundle_factory())
    patched = model.clone()  # as ModelSamplingDiscrete(sampling=v_prediction, zsnr=true) does
    patched.add_object_patch("model_sampling", model_sampling(V_PREDICTION, zsnr=True))
    config = bridge.bundle_from_comfy(patched, clip, vae).noise_scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert model.model.model_type.name == "EPS"  # the checkpoint's own type says eps: it is not what counts
    plain = bridge.bundle_from_comfy(model, clip, vae).noise_scheduler.config
    assert plain.prediction_type == "epsilon" and not plain.get("rescale_betas_zero_snr", False)
    back = patched.clone()  # ModelSamplingDiscrete(sampling=eps) after a v-prediction one
    back.add_object_patch("model_sampling", model_sampling())
    assert bridge.bundle_from_comfy(back, clip, vae).noise_scheduler.config.prediction_type == "epsilon"


def test_sampling_the_core_cannot_train_is_refused(bridge, fake_models):
    model, clip, vae = fake_models
    x0 = model.clone()
    x0.add_object_patch("model_sampling", model_sampling(X0))
    with pytest.raises(ValueError, match="the connected MODEL predicts `X0`"):
        bridge.bundle_from_comfy(x0, clip, vae)
    edm = model.clone()
    edm.add_object_patch("model_sampling", model_sampling(V_PREDICTION, base=ModelSamplingContinuousEDM))
    with pytest.raises(ValueError, match="samples with ModelSamplingAdvanced, not a discrete DDPM schedule"):
        bridge.bundle_from_comfy(edm, clip, vae)


@pytest.fixture(scope="module")
def sdxl_models():
    return fake_comfy_models(build_tiny_sdxl_bundle())


def test_sdxl_bundle_from_comfy_reproduces_every_weight(bridge, sdxl_models):
    reference = build_tiny_sdxl_bundle()
    bundle = bridge.bundle_from_comfy(*sdxl_models)
    assert bundle.family == "sdxl" and bundle.name == "comfyui-SDXL"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(reference, part).state_dict(), getattr(bundle, part).state_dict()
        assert set(want) == set(got) and all(torch.equal(want[key], got[key]) for key in want), part
    assert bundle.vae.config.scaling_factor == pytest.approx(0.13025)
    assert not any(p.requires_grad for p in bundle.text_encoder_2.parameters())


def test_sdxl_bundle_applies_upstream_patches_of_both_text_encoders(bridge, sdxl_models):
    model, clip, vae = sdxl_models
    key = "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    original = clip.patcher.weights[key].clone()
    patched = clip.clone()  # as LoraLoader does
    patched.add_patches({key: ("diff", (torch.ones_like(original),))}, 0.5)
    bundle = bridge.bundle_from_comfy(model, patched, vae)
    layer = getattr(bundle.text_encoder_2, "text_model", bundle.text_encoder_2).encoder.layers[0]
    assert torch.allclose(layer.self_attn.q_proj.weight, original + 0.5)
    assert torch.equal(clip.patcher.weights[key], original) and clip.patcher.patches == {}


def test_clip_skip_defaults_to_the_familys_layer(bridge, sdxl_models):
    """SDXL's CLIP without CLIPSetLastLayer conditions on the penultimate layer (ComfyUI's SDXL default)."""
    clip = sdxl_models[1].clone()
    assert bridge.clip_skip(clip) == 2
    clip.layer_idx = -1  # CLIPSetLastLayer -1
    assert bridge.clip_skip(clip) == 1
    clip.layer_idx = -3
    assert bridge.clip_skip(clip) == 3


def test_missing_clip_is_named(bridge, fake_models):
    model, _, vae = fake_models
    with pytest.raises(ValueError, match="clip input is invalid: None"):
        bridge.bundle_from_comfy(model, None, vae)


def test_clip_skip_follows_clip_set_last_layer(bridge, fake_models):
    clip = fake_models[1].clone()
    assert bridge.clip_skip(clip) == 1
    clip.layer_idx = -2
    assert bridge.clip_skip(clip) == 2


def test_text_encoder_alone(bridge, fake_models):
    reference = build_tiny_bundle()
    family, (tokenizer,), (encoder,) = bridge.text_encoders_from_comfy(fake_models[1])
    assert family == "sd15" and not any(p.requires_grad for p in encoder.parameters())
    ids = tokenizer(["a girl with a hat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, reference.text_encoder(ids).last_hidden_state)


def test_apply_lora_returns_patched_clones(comfy_env, bridge, fake_models):
    model, clip, _ = fake_models
    lora = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0),
    }
    new_model, new_clip = bridge.apply_lora(model, clip, lora)
    assert new_model is not model and new_clip is not clip
    assert model.patches == {} and clip.patcher.patches == {}
    assert new_model.patches["lora"] and comfy_env[1].not_loaded == []


def test_apply_lora_refuses_keys_comfyui_would_drop(bridge, fake_models):
    model, clip, _ = fake_models
    lora = {
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2),
        "lora_unet_down_blocks_7_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    with pytest.raises(ValueError, match="ComfyUI would not load 1 module"):
        bridge.apply_lora(model, clip, lora)


def test_value_types(bridge):
    image = bridge.image_from_array(torch.rand(12, 20, 3).numpy())
    assert image.shape == (1, 12, 20, 3) and image.dtype == torch.float32
    history = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "reg_loss": 0.1}]
    assert bridge.loss_map(history) == {"loss": [0.5, 0.25]}
