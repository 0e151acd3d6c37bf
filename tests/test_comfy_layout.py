"""ComfyUI's model layout → ours (pti_ops/models/comfy_layout.py), without ComfyUI: plain dicts in, a bundle out.

The same conversion behind the bridge, with fake ComfyUI objects, is tested in test_nodes_bridge.py.
"""

import json

import numpy as np
import pytest
import torch
from comfy_stubs import fake_comfy_models

from pti_ops.errors import ModelLoadError
from pti_ops.models import ComfyModels, bundle_from_comfy_models, comfy_family, text_encoders_from_comfy_state
from pti_ops.models.clip_vocab import write_clip_vocab
from pti_ops.models.comfy_layout import diffusers_unet_config, scheduler_config
from pti_ops.models.families.sd15 import CONFIG_DIR, SD15
from pti_ops.models.families.sdxl import SDXL
from pti_ops.models.tiny_model import TINY_WORDS, build_tiny_bundle, build_tiny_sdxl_bundle
from pti_ops.training.text_conditioning import encode_conditioning

# ComfyUI's detected unet_config for v1-5-pruned-emaonly (comfy/model_detection.py + supported_models.SD15).
SD15_COMFY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8, "num_head_channels": -1,
}  # fmt: skip


def test_sd15_unet_config_translates_to_diffusers_sd15():
    config = diffusers_unet_config(SD15_COMFY_UNET_CONFIG)
    with open(CONFIG_DIR / "unet_config.json") as file:
        sd15 = json.load(file)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                "attention_head_dim", "use_linear_projection", "in_channels", "out_channels"):  # fmt: skip
        assert config[key] == sd15[key], key


def test_one_level_unet_config_of_the_tiny_checkpoint():
    # make_tiny_sd15.py --preset tiny, as ComfyUI detects it.
    comfy = dict(SD15_COMFY_UNET_CONFIG, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1])
    config = diffusers_unet_config(comfy)
    assert config["block_out_channels"] == [320] and config["layers_per_block"] == 1
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] and config["up_block_types"] == ["CrossAttnUpBlock2D"]


def test_two_level_unet_config_reads_output_depths_from_the_end():
    # make_tiny_sd15.py --preset fast, as ComfyUI detects it: attention only at the half-resolution level.
    comfy = dict(SD15_COMFY_UNET_CONFIG, num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[0, 1],
                 transformer_depth_output=[0, 0, 1, 1])  # fmt: skip
    config = diffusers_unet_config(comfy)
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert config["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]


def test_head_width_config_gives_heads_per_level():
    config = diffusers_unet_config(dict(SD15_COMFY_UNET_CONFIG, num_heads=-1, num_head_channels=64))
    assert config["attention_head_dim"] == [5, 10, 20, 20]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"adm_in_channels": 2816}, "not an SD1.x model .* connect the MODEL and CLIP of one checkpoint"),
        ({"num_res_blocks": [2, 1, 2, 2]}, "different number of res blocks"),
        ({"transformer_depth_middle": -1}, "middle block has no attention"),
    ],
)
def test_unsupported_unets_are_refused_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        diffusers_unet_config(dict(SD15_COMFY_UNET_CONFIG, **change))


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    write_clip_vocab(root / "sd1_tokenizer", list(TINY_WORDS))
    return root


def comfy_models(tokenizer_root, **changes) -> ComfyModels:
    """What the bridge reads from ComfyUI's models of the tiny bundle, as plain values."""
    model, clip, vae = fake_comfy_models()
    values = dict(
        family=SD15, unet=model.weights, clip=clip.patcher.weights, vae=vae.patcher.weights,
        unet_config=model.model.model_config.unet_config, model_type="EPS", latent_scale=None, clip_heads=(None,),
        tokenizer_root=tokenizer_root, name="comfyui-SD15",
    )  # fmt: skip
    values.update(changes)
    return ComfyModels(**values)


def test_comfy_weights_round_trip_to_the_same_bundle(tokenizer_root):
    reference = build_tiny_bundle()
    bundle = bundle_from_comfy_models(comfy_models(tokenizer_root))
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(reference, part).state_dict(), getattr(bundle, part).state_dict()
        assert set(want) == set(got) and all(torch.equal(want[key], got[key]) for key in want), part
    assert bundle.family is SD15 and bundle.name == "comfyui-SD15" and bundle.source == "comfyui"
    assert bundle.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    # without a latent format, the family's scale; without heads, 64-wide heads (the tiny CLIP: 32 wide → 1)
    assert bundle.vae.config.scaling_factor == pytest.approx(SD15.latent_scaling_factor)
    assert bundle.text_encoder.config.num_attention_heads == 1


def test_settings_read_from_comfyui_reach_the_bundle(tokenizer_root):
    bundle = bundle_from_comfy_models(comfy_models(tokenizer_root, model_type="V_PREDICTION", latent_scale=0.5, clip_heads=(4,)))
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert bundle.vae.config.scaling_factor == 0.5 and bundle.text_encoder.config.num_attention_heads == 4


def test_text_encoder_alone(tokenizer_root):
    reference = build_tiny_bundle()
    models = comfy_models(tokenizer_root, clip_heads=(4,))
    (tokenizer,), (encoder,) = text_encoders_from_comfy_state(SD15, models.clip, models.clip_heads, tokenizer_root)
    assert set(encoder.state_dict()) == set(reference.text_encoder.state_dict())
    ids = tokenizer(["a girl with a hat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, reference.text_encoder(ids).last_hidden_state)


def test_comfy_family_is_chosen_by_the_clips_text_encoders():
    assert comfy_family(["clip_l"]) is SD15
    assert comfy_family(["clip_g", "clip_l"]) is SDXL
    for names, found in ((["clip_g"], "clip_g"), ([], "none"), (["clip_l", "clip_g", "t5xxl"], r"clip_l \+ clip_g \+ t5xxl")):
        with pytest.raises(ModelLoadError, match=rf"the connected CLIP has the text encoders {found}, which no supported "
                                                 r"family has \(SD1\.5: clip_l; SDXL: clip_l \+ clip_g\)"):  # fmt: skip
            comfy_family(names)


def test_prediction_types():
    assert scheduler_config("EPS")["prediction_type"] == "epsilon"
    assert scheduler_config("V_PREDICTION")["prediction_type"] == "v_prediction"
    assert "rescale_betas_zero_snr" not in scheduler_config("V_PREDICTION")
    zsnr = scheduler_config("V_PREDICTION", SDXL, zero_terminal_snr=True)
    assert zsnr["rescale_betas_zero_snr"] is True and zsnr["timestep_spacing"] == "trailing"
    with pytest.raises(ModelLoadError, match="the connected MODEL predicts `EDM`"):
        scheduler_config("EDM")


# ---------------------------------------------------------------------------------------------
# SDXL: ComfyUI's SDXLClipModel (clip_l + clip_g in transformers' names) and an SDXL-family UNet
# ---------------------------------------------------------------------------------------------


def sdxl_comfy_models(tokenizer_root, bundle, **changes) -> ComfyModels:
    model, clip, vae = fake_comfy_models(bundle)
    values = dict(
        family=SDXL, unet=model.weights, clip=clip.patcher.weights, vae=vae.patcher.weights,
        unet_config=model.model.model_config.unet_config, model_type="EPS", latent_scale=None,
        clip_heads=tuple(encoder.config.num_attention_heads for encoder in bundle.text_encoders),
        tokenizer_root=tokenizer_root, name="comfyui-SDXL",
    )  # fmt: skip
    values.update(changes)
    return ComfyModels(**values)


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_tiny_sdxl_bundle()


def test_sdxl_comfy_weights_round_trip_to_the_same_bundle(tokenizer_root, tiny_sdxl):
    bundle = bundle_from_comfy_models(sdxl_comfy_models(tokenizer_root, tiny_sdxl))
    assert bundle.family is SDXL and len(bundle.text_encoders) == 2
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(tiny_sdxl, part).state_dict(), getattr(bundle, part).state_dict()
        assert set(want) == set(got) and all(torch.equal(want[key], got[key]) for key in want), part
    for part in ("text_encoder", "text_encoder_2"):
        want, got = getattr(tiny_sdxl, part).config, getattr(bundle, part).config
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "projection_dim",
                    "hidden_act", "max_position_embeddings"):  # fmt: skip
            assert getattr(got, key) == getattr(want, key), (part, key)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "transformer_layers_per_block",
                "mid_block_type", "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):  # fmt: skip
        assert list(np.atleast_1d(bundle.unet.config[key])) == list(np.atleast_1d(tiny_sdxl.unet.config[key])), key
    assert bundle.vae.config.scaling_factor == pytest.approx(SDXL.latent_scaling_factor)
    # bigG pads with `!` (id 0), CLIP-L with its end token, as ComfyUI's SDXL tokenizers do
    assert bundle.tokenizers[1].pad_token == "!" and bundle.tokenizers[0].pad_token == bundle.tokenizers[0].eos_token


def test_sdxl_conditioning_is_what_the_reference_bundle_computes(tokenizer_root, tiny_sdxl):
    bundle = bundle_from_comfy_models(sdxl_comfy_models(tokenizer_root, tiny_sdxl))
    prompts = ["a girl with a hat"]
    with torch.no_grad():
        want, got = (encode_conditioning(b, prompts, None) for b in (tiny_sdxl, bundle))
        assert torch.equal(want.hidden, got.hidden) and torch.equal(want.pooled, got.pooled)
        latents, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        outputs = [b.unet(latents, t, **want.unet_kwargs(time_ids)).sample for b in (tiny_sdxl, bundle)]
        assert torch.equal(*outputs)


def test_sdxl_prediction_and_zero_terminal_snr_reach_the_scheduler(tokenizer_root, tiny_sdxl):
    models = sdxl_comfy_models(tokenizer_root, tiny_sdxl, model_type="V_PREDICTION", zero_terminal_snr=True)
    config = bundle_from_comfy_models(models).noise_scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"


def test_sdxl_clip_with_an_sd15_model_is_refused(tokenizer_root, tiny_sdxl):
    sd15_model = fake_comfy_models()[0]
    models = sdxl_comfy_models(tokenizer_root, tiny_sdxl, unet=sd15_model.weights)
    with pytest.raises(ModelLoadError, match="do not belong together"):
        bundle_from_comfy_models(models)


def test_sdxl_text_encoders_alone(tokenizer_root, tiny_sdxl):
    models = sdxl_comfy_models(tokenizer_root, tiny_sdxl)
    tokenizers, encoders = text_encoders_from_comfy_state(SDXL, models.clip, models.clip_heads, tokenizer_root)
    assert [type(e).__name__ for e in encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert tokenizers[1].pad_token == "!"
    for encoder, reference in zip(encoders, tiny_sdxl.text_encoders):
        want = reference.state_dict()
        assert set(encoder.state_dict()) == set(want)
        assert all(torch.equal(value, want[key]) for key, value in encoder.state_dict().items())
