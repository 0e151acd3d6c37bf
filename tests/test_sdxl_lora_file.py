"""SDXL LoRA files: kohya's names on the original UNet's blocks (`lora_unet_input_blocks_4_1_…`) and
`lora_te1_` / `lora_te2_`, read back by ComfyUI's key map, diffusers' SDXL `load_lora_weights` and our
own `apply_kohya_lora`, with outputs equal to the adapters they were exported from."""

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pti_ops.errors import InvalidInputError
from pti_ops.files.comfy_lora_keys import _comfy_unet_config, comfyui_sdxl_lora_key_map
from pti_ops.files.lora_file import apply_kohya_lora, load_lora, lora_state_dict_to_kohya, save_lora
from pti_ops.models import FAMILIES
from pti_ops.models.clip_vocab import make_clip_tokenizer
from pti_ops.models.families.sdxl_lora import sdxl_unet_lora_module
from pti_ops.models.ldm_unet_names import ldm_unet_module_name

# SDXL base 1.0's unet/config.json (the fields that shape the model).
SDXL_UNET_CONFIG = dict(
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    layers_per_block=2,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
CLIP_L_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)

# A tiny SDXL-shaped model: three levels, the first without attention, two transformer layers in the
# last level (and so in the mid block and the first up level), CLIP-L 32 + bigG 64 wide → 96-wide
# conditioning, pooled 32 + six time ids × 8 → 80 added features.
TIME_ID_WIDTH, POOLED_WIDTH = 8, 32
TINY_UNET_CONFIG = dict(
    sample_size=8,
    block_out_channels=[16, 32, 64],
    layers_per_block=2,
    norm_num_groups=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 2, 4],
    cross_attention_dim=96,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_ID_WIDTH,
    projection_class_embeddings_input_dim=6 * TIME_ID_WIDTH + POOLED_WIDTH,
)
TINY_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
TINY_CLIP_G = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, projection_dim=POOLED_WIDTH)
WORDS = ["a", "red", "cat", "photo", "of", "dog"]

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
METADATA = {"pivotal.placeholder": "<sks>", "pivotal.base_model": "tiny-sdxl"}


SDXL = FAMILIES["sdxl"]


def tiny_sdxl(seed: int = 0):
    """(tokenizer, unet, clip_l, clip_g): seeded, so two builds are identical."""
    tokenizer = make_clip_tokenizer(WORDS)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=tokenizer.model_max_length)
    torch.manual_seed(seed)
    clip_l = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L, **ids, hidden_act="quick_gelu"))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G, **ids, hidden_act="gelu"))
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    return tokenizer, unet, clip_l, clip_g


def tuned_sdxl(unet_targets=UNET_TARGETS, text_targets=TEXT_TARGETS, **config):
    """A tiny SDXL model with peft LoRAs (rank 4, alpha 8 unless overridden) on the UNet and both
    encoders, lora_B seeded non-zero so that every module changes the outputs."""
    tokenizer, unet, clip_l, clip_g = tiny_sdxl()
    torch.manual_seed(1)
    for model, targets in ((unet, unet_targets), (clip_l, text_targets), (clip_g, text_targets)):
        inject_adapter_in_model(LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **config}), model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
    return tokenizer, unet, clip_l, clip_g


def outputs(tokenizer, unet, clip_l, clip_g):
    """Both encoders' outputs and the UNet's noise prediction, SDXL-style conditioned, for fixed inputs."""
    ids = tokenizer(["a red cat"], padding="max_length", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 8, 8, generator=generator)  # (b, c, h, w)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])  # original size, crop top-left, target size
    with torch.no_grad():
        out_l = clip_l(ids, output_hidden_states=True)
        out_g = clip_g(ids, output_hidden_states=True)
        # penultimate layers concatenated: (b, 77, 32 + 64)
        cond = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out_g.text_embeds, "time_ids": time_ids}
        noise = unet(latent, 500, cond, added_cond_kwargs=added).sample
    return out_l.last_hidden_state, out_g.last_hidden_state, out_g.text_embeds, noise


def assert_same_outputs(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def export(unet, clip_l, clip_g):
    return lora_state_dict_to_kohya(unet, [clip_l, clip_g], family=SDXL)


def prefixes(kohya):
    return {key.split(".")[0] for key in kohya}


def meta_sdxl():
    """SDXL-sized UNet and encoders on the meta device (names and shapes, no memory, no time)."""
    with torch.device("meta"):
        return (
            UNet2DConditionModel(**SDXL_UNET_CONFIG),
            CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG)),
        )


def module_names(model, types=(torch.nn.Linear, torch.nn.Conv2d)):
    return [name for name, module in model.named_modules() if isinstance(module, types)]


# -- the names ---------------------------------------------------------------------------------


# diffusers module of SDXL base → the kohya module sd-scripts writes (its LDM name).
KOHYA_SDXL_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
    "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0": "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
    "up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_k": "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k",
    "up_blocks.1.attentions.2.proj_out": "lora_unet_output_blocks_5_1_proj_out",
    # outside attention (kohya's conv / full-network LoRAs): resnets, samplers, embeddings
    "down_blocks.0.resnets.0.conv1": "lora_unet_input_blocks_1_0_in_layers_2",
    "down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_4_0_skip_connection",
    "up_blocks.2.resnets.2.time_emb_proj": "lora_unet_output_blocks_8_0_emb_layers_1",
    "mid_block.resnets.1.conv2": "lora_unet_middle_block_2_out_layers_3",
    "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
    "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "add_embedding.linear_1": "lora_unet_label_emb_0_0",
    "time_embedding.linear_2": "lora_unet_time_embed_2",
    "conv_in": "lora_unet_input_blocks_0_0",
    "conv_out": "lora_unet_out_2",
}


def test_sdxl_unet_names_are_kohyas_ldm_block_names():
    unet, _, _ = meta_sdxl()
    assert {module: SDXL.unet_lora_name(module, unet.config) for module in KOHYA_SDXL_NAMES} == KOHYA_SDXL_NAMES
    # kohya's default SDXL LoRA: every Linear of the Transformer2DModels, 722 modules
    attention = {SDXL.unet_lora_name(n, unet.config) for n in module_names(unet, torch.nn.Linear) if ".attentions." in n}
    assert len(attention) == 722


@pytest.mark.parametrize("config", [SDXL_UNET_CONFIG, TINY_UNET_CONFIG], ids=["sdxl", "tiny"])
def test_ldm_names_of_every_weight_convert_back_with_diffusers_own_converter(config):
    """Our LDM module names, given to diffusers' own LDM→diffusers UNet converter (an independent
    implementation), come back as exactly the diffusers model's weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    ldm = {}
    for key, tensor in unet.state_dict().items():
        module, parameter = key.rsplit(".", 1)
        # each tensor is a zero-strided view of one scalar: SDXL's shapes without its memory
        ldm_key = f"model.diffusion_model.{ldm_unet_module_name(module, unet.config)}.{parameter}"
        ldm[ldm_key] = torch.zeros(()).expand(tensor.shape)
    assert len(ldm) == len(unet.state_dict())  # no two weights share a name
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet.state_dict())


def test_export_writes_ldm_names_te1_te2_and_alpha_for_every_module(tmp_path):
    kohya = export(*tuned_sdxl()[1:])
    names = prefixes(kohya)
    for prefix in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_2",  # two transformer layers in the last level
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_k",
        "lora_unet_output_blocks_5_1_proj_out",
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_2_mlp_fc2",
    ):
        assert prefix in names
    assert not any(block in key for key in kohya for block in ("down_blocks", "mid_block", "up_blocks"))
    assert not any(p.startswith("lora_unet_input_blocks_1_1") for p in names)  # the first level has no attention
    assert all({f"{p}.lora_down.weight", f"{p}.lora_up.weight", f"{p}.alpha"} <= set(kohya) for p in names)
    assert all(kohya[f"{p}.alpha"].item() == 8.0 for p in names)
    # 11 Transformer2DModels (4 down, 1 mid, 6 up) x 2 projections + 17 transformer layers x 10; 2 + 3 CLIP layers x 6
    assert len(names) == 11 * 2 + 17 * 10 + 5 * 6
    tensors, metadata = load_lora(save_lora(tmp_path / "sdxl.safetensors", kohya, METADATA))
    assert set(tensors) == set(kohya) and (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")


def test_text_encoder_names_for_transformers_4_and_5_and_the_projection():
    clip_l, clip_g = SDXL.text_encoders
    assert (clip_l.lora_prefix, clip_g.lora_prefix) == ("lora_te1_", "lora_te2_")
    # transformers 5.x CLIPTextModel is flat (encoder.…); 4.x and CLIPTextModelWithProjection keep text_model.
    for module in ("encoder.layers.3.mlp.fc1", "text_model.encoder.layers.3.mlp.fc1"):
        assert clip_l.lora_name(module) == "lora_te1_text_model_encoder_layers_3_mlp_fc1"
        assert clip_g.lora_name(module) == "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    # bigG's projection sits beside text_model, as ComfyUI and diffusers read it
    assert clip_g.lora_name("text_projection") == "lora_te2_text_projection"


# -- what ComfyUI accepts ----------------------------------------------------------------------


def test_every_key_written_for_every_module_is_one_comfyui_maps(tmp_path):
    """LoRA on every Linear and Conv2d of the UNet and every projection of both encoders: ComfyUI's
    stock LoraLoader maps every written module (no "lora key not loaded")."""
    _, unet, clip_l, clip_g = tiny_sdxl()
    everything = module_names(unet)
    kohya = export(*tuned_sdxl(unet_targets=everything, text_targets=TEXT_TARGETS + ["text_projection"])[1:])
    assert len(kohya) == 3 * (len(everything) + 6 * 2 + 6 * 3 + 1)
    accepted = comfyui_sdxl_lora_key_map(module_names(unet, torch.nn.Module), module_names(clip_l, torch.nn.Module),
                                         module_names(clip_g, torch.nn.Module))
    assert prefixes(kohya) - accepted == set()
    assert "lora_te2_text_projection" in prefixes(kohya)


def test_comfyui_sdxl_key_map_known_entries():
    unet, clip_l, clip_g = meta_sdxl()
    # the UNet config the re-derivation counts is ComfyUI's own SDXL entry (comfy/model_detection.py)
    assert _comfy_unet_config(set(module_names(unet, torch.nn.Module))) == {
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 10,
    }
    accepted = comfyui_sdxl_lora_key_map(module_names(unet, torch.nn.Module), module_names(clip_l, torch.nn.Module),
                                         module_names(clip_g, torch.nn.Module))
    for key in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # kohya, on ComfyUI's own LDM names
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_label_emb_0_0",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",  # diffusers names, through unet_to_diffusers
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
    ):
        assert key in accepted
    for key in (
        "lora_unet_input_blocks_1_1_proj_in",  # SDXL's first level has no attention
        "lora_unet_output_blocks_8_2_conv",  # nor an upsampler in its last up level
        "lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q",  # the second level has two layers
        "lora_te1_text_model_encoder_layers_12_mlp_fc1",  # CLIP-L has 12 layers
        "lora_te2_text_model_encoder_layers_32_mlp_fc1",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1",  # a container, no weight
    ):
        assert key not in accepted
    ours = {SDXL.unet_lora_name(n, unet.config) for n in module_names(unet)}
    assert ours <= accepted and len(ours) == len(module_names(unet))


# -- diffusers and our own tooling read it back ------------------------------------------------


def test_diffusers_sdxl_load_lora_weights_loads_every_key_with_equal_outputs(tmp_path):
    # Mixed ranks, one alpha: diffusers 0.42 drops per-module alphas that differ from the most common one
    # (its alpha_pattern names UNet attention modules `….processor.to_v_lora.down.weight`, CLIP-L's
    # `text_model.encoder.…`, which match no module), for any kohya file; ComfyUI and we read them.
    tuned = tuned_sdxl(rank_pattern={"to_k": 2, "k_proj": 2})
    kohya = export(*tuned[1:])
    path = save_lora(tmp_path / "sdxl.safetensors", kohya, METADATA)
    tokenizer, unet, clip_l, clip_g = tiny_sdxl()
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    pipe.load_lora_weights(str(path))
    # every file module became one peft layer in the model its prefix names (diffusers raises on keys it cannot rename)
    for model, prefix in ((unet, "lora_unet_"), (clip_l, "lora_te1_"), (clip_g, "lora_te2_")):
        loaded = sum(isinstance(m, LoraLayer) for m in model.modules())
        assert loaded == sum(p.startswith(prefix) for p in prefixes(kohya)) > 0
    assert_same_outputs(outputs(tokenizer, unet, clip_l, clip_g), outputs(*tuned))
    assert not torch.allclose(outputs(*tiny_sdxl())[3], outputs(*tuned)[3], atol=1e-3)  # the LoRA matters


def test_apply_kohya_lora_imports_the_sdxl_file_back(tmp_path):
    tuned = tuned_sdxl(rank_pattern={"to_k": 2}, use_rslora=True)
    tensors, _ = load_lora(save_lora(tmp_path / "sdxl.safetensors", export(*tuned[1:]), METADATA))
    tokenizer, unet, clip_l, clip_g = tiny_sdxl()
    assert apply_kohya_lora(unet, [clip_l, clip_g], tensors, family=SDXL) == []
    assert_same_outputs(outputs(tokenizer, unet, clip_l, clip_g), outputs(*tuned))
    assert unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k").r["default"] == 2


def test_apply_accounts_for_the_second_encoder(tmp_path):
    tensors = export(*tuned_sdxl(unet_targets=["to_q"], text_targets=["q_proj"])[1:])
    _, unet, clip_l, clip_g = tiny_sdxl()
    with pytest.raises(InvalidInputError, match=r"9 LoRA keys match no module .* first: lora_te2_text_model_encoder_layers_0_self_attn_q_proj\.alpha"):
        apply_kohya_lora(unet, clip_l, tensors, family=SDXL)  # one model is the first encoder
    parts = ("alpha", "lora_down.weight", "lora_up.weight")
    assert apply_kohya_lora(unet, [None, clip_g], tensors, family=SDXL, strict=False) == [
        f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj.{part}" for i in range(2) for part in parts
    ]
    with pytest.raises(InvalidInputError, match=r"3 text encoders were given but SDXL has 2 \(clip_l, clip_g\)"):
        lora_state_dict_to_kohya(unet, [clip_l, clip_g, clip_l], family=SDXL)


# -- what cannot be named ----------------------------------------------------------------------


def test_sdxl_names_need_the_unet_config_and_one_layer_count():
    with pytest.raises(InvalidInputError, match=r"the SDXL LoRA name of UNet module 'conv_in' depends on the UNet's layout: pass its config"):
        SDXL.unet_lora_name("conv_in")
    with pytest.raises(InvalidInputError, match=r"the UNet has per-level layers_per_block \[1, 2, 2\]; the LDM layout needs one integer"):
        sdxl_unet_lora_module("conv_in", {**TINY_UNET_CONFIG, "layers_per_block": [1, 2, 2]})
    assert sdxl_unet_lora_module("conv_in", {**TINY_UNET_CONFIG, "layers_per_block": [2, 2, 2]}) == "input_blocks_0_0"
    with pytest.raises(InvalidInputError, match=r"UNet weight 'class_embedding.linear_1' has no place in the LDM layout"):
        sdxl_unet_lora_module("class_embedding.linear_1", TINY_UNET_CONFIG)
