"""The model-family seam (pti_ops/models/family.py, families/): lookup, detection, and the keys each
family gives to the files we write (exactly today's SD1.5 keys)."""

import json
import types

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from safetensors import safe_open

from pti_ops.errors import InvalidInputError, ModelLoadError
from pti_ops.files.embedding_file import save_embedding
from pti_ops.files.lora_file import comfyui_lora_key_map
from pti_ops.models import DEFAULT_FAMILY, FAMILIES, ModelFamily, detect_family, get_family
from pti_ops.models.families.sd15 import CLIP_L, SD15
from pti_ops.models.tiny_model import build_tiny_bundle
from pti_ops.training.text_conditioning import encode_tokens, tokenize


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_bundle()


def unet_with(**config):
    """A stand-in UNet: `detect_family` reads only the config."""
    return types.SimpleNamespace(config=FrozenDict(config))


def test_detect_family_picks_sd15_for_the_tiny_model(tiny):
    assert detect_family(tiny.text_encoder, tiny.unet) is SD15
    assert tiny.family is SD15 and DEFAULT_FAMILY is SD15


def test_detect_family_refuses_an_sdxl_unet_with_one_text_encoder(tiny):
    unet = unet_with(addition_embed_type="text_time", cross_attention_dim=2048)
    with pytest.raises(ModelLoadError, match=r"SDXL's added conditioning \('text_time'\) but 1 text encoder\(s\) were given; SDXL needs 2 \(clip_l and clip_g\)"):
        detect_family(tiny.text_encoder, unet)


def test_detect_family_refuses_an_unknown_added_conditioning(tiny):
    unet = unet_with(addition_embed_type="image", cross_attention_dim=32)
    with pytest.raises(ModelLoadError, match=r"added conditioning 'image', which no supported family has: only SD1\.5 and SDXL-family"):
        detect_family(tiny.text_encoder, unet)


def test_detect_family_refuses_mismatched_widths(tiny):
    unet = unet_with(addition_embed_type=None, cross_attention_dim=768)
    with pytest.raises(ModelLoadError, match="the UNet expects 768-wide text conditioning but the text encoder gives 32"):
        detect_family(tiny.text_encoder, unet)


def test_get_family_by_name_or_object():
    assert get_family("sd15") is SD15 and get_family(SD15) is SD15
    assert set(FAMILIES) == {"sd15", "sdxl"} and get_family("sdxl").display_name == "SDXL"
    with pytest.raises(InvalidInputError, match=r"unknown model family 'flux'; known: \['sd15', 'sdxl'\]"):
        get_family("flux")


def test_a_family_compares_equal_to_its_name():
    assert SD15 == "sd15" and "sd15" == SD15 and SD15 != "sdxl"
    assert str(SD15) == "sd15" and hash(SD15) == hash("sd15")
    assert isinstance(SD15, ModelFamily) and SD15.display_name == "SD1.5"


def test_a_bundle_built_with_a_family_name_holds_the_family(tiny):
    bundle = type(tiny)(tiny.tokenizer, tiny.text_encoder, tiny.unet, tiny.vae, tiny.noise_scheduler, family="sd15")
    assert bundle.family is SD15


def test_sd15_single_file_prefixes():
    assert SD15.single_file_prefixes == {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    }


def header_and_data(path):
    """A safetensors file as (parsed JSON header, tensor bytes): safetensors writes the metadata entries
    in hash order, which differs between two writes of the same file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def test_embedding_files_are_the_same_from_the_family_or_its_name(tmp_path):
    vectors = torch.randn(2, 32)
    by_name = save_embedding(tmp_path / "a.safetensors", vectors, "sd15", {"placeholder": "tok1"})
    by_family = save_embedding(tmp_path / "b.safetensors", vectors, SD15, {"placeholder": "tok1"})
    by_default = save_embedding(tmp_path / "c.safetensors", vectors, metadata={"placeholder": "tok1"})
    assert header_and_data(by_name) == header_and_data(by_family) == header_and_data(by_default)
    with safe_open(str(by_family), framework="pt") as file:
        assert list(file.keys()) == ["clip_l"] and file.metadata()["model_family"] == "sd15"
    assert SD15.embedding_keys == ("clip_l",)


def test_lora_names_are_todays_kohya_names(tiny):
    assert SD15.lora_prefixes == ("lora_unet_", "lora_te_")
    assert (
        SD15.unet_lora_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    )
    # transformers 5.x (flat) and 4.x (`text_model.`) module names give the same key
    assert CLIP_L.lora_name("encoder.layers.1.mlp.fc2") == "lora_te_text_model_encoder_layers_1_mlp_fc2"
    assert CLIP_L.lora_name("text_model.encoder.layers.1.mlp.fc2") == "lora_te_text_model_encoder_layers_1_mlp_fc2"


def test_every_sd15_lora_name_of_a_trainable_module_is_one_comfyui_maps(tiny):
    unet_names = [n for n, m in tiny.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    text_names = [n for n, m in tiny.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    accepted = comfyui_lora_key_map(unet_names, text_names)
    ours = {SD15.unet_lora_name(n) for n in unet_names} | {CLIP_L.lora_name(n) for n in text_names}
    # ComfyUI maps every UNet Linear/Conv2d and CLIP's attention and MLP projections: ours name exactly those
    assert ours & accepted == {k for k in accepted if k.startswith(SD15.lora_prefixes)}
    assert {SD15.unet_lora_name(n) for n in unet_names} <= accepted


def test_the_family_encodes_tokens_as_training_does(tiny):
    ids = tokenize(tiny.tokenizer, ["a red cat", "a girl with a hat"])
    with torch.no_grad():
        assert torch.equal(SD15.encode_tokens(tiny.text_encoder, ids, 1), tiny.text_encoder(ids).last_hidden_state)
        assert torch.equal(encode_tokens(tiny.text_encoder, ids, 2), SD15.encode_tokens(tiny.text_encoder, ids, 2))
    for past in (0, tiny.text_encoder.config.num_hidden_layers + 1):
        with pytest.raises(InvalidInputError, match=r"`clip_skip` must be between 1 \(last layer\) and 2 \(this text encoder's layers\)"):
            SD15.encode_tokens(tiny.text_encoder, ids, past)
