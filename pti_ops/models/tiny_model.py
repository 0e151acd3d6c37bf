"""Tiny random models with SD1.5's and SDXL's structure, built from configs in code.

Same classes and code paths as the real models (CLIP tokenizers and text models, SDXL's bigG with
projection, UNet2DConditionModel with cross-attention and, for SDXL, `text_time` added conditioning,
AutoencoderKL, DDPM schedule), widths shrunk so a training step takes milliseconds on a CPU.
Weights are random but seeded: two builds are identical.
"""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .bundle import ModelBundle
from .clip_vocab import make_clip_tokenizer
from .families.sd15 import SD15
from .families.sdxl import SDXL

# Words that become single tokens: those of the method's prompts, plus a few for edit prompts.
TINY_WORDS = (
    "a an the of in on at and with by to is"
    " illustration anime photo picture drawing painting portrait sketch render toy"
    " character person man woman girl boy cat dog robot creature"
    " red blue green yellow black white orange purple small big left right top bottom"
    " standing sitting running holding hat sword beach forest city snow style"
).split()

TINY_TEXT_WIDTH = 32
TINY_RESOLUTION = 32  # pixels; the VAE halves it once, so latents are 16x16

# SD1.5's scheduler_config.json (PNDM keys included; DDPM ignores those it does not use).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


# SDXL-shaped, shrunk: CLIP-L-like 32 wide, bigG-like 64 wide projecting to 48, 3 layers each (clip_skip 1-3);
# UNet attention heads of 64 channels, as every SDXL-family UNet (what `ldm_shapes` assumes).
TINY_SDXL_TEXT_WIDTHS = (32, 64)
TINY_SDXL_POOLED_WIDTH = 48
TINY_SDXL_TIME_WIDTH = 8  # SDXL: 256 per time id
TINY_SDXL_UNET = dict(
    sample_size=TINY_RESOLUTION // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(1, 1),  # diffusers' legacy name: heads per level (64 channels each)
    cross_attention_dim=sum(TINY_SDXL_TEXT_WIDTHS),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_WIDTH,
    projection_class_embeddings_input_dim=TINY_SDXL_POOLED_WIDTH + 6 * TINY_SDXL_TIME_WIDTH,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
)
# SDXL base's training schedule (its scheduler_config.json, as a DDPM schedule).
SDXL_SCHEDULER_CONFIG = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading"}


def build_tiny_bundle(seed: int = 0, prediction_type: str = "epsilon") -> ModelBundle:
    """A seeded tiny SD1.5-shaped bundle (32-wide text encoder, 2-level UNet and VAE)."""
    tokenizer = make_clip_tokenizer(list(TINY_WORDS))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_TEXT_WIDTH,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                hidden_act="quick_gelu",
                projection_dim=TINY_TEXT_WIDTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = _tiny_vae(SD15.latent_scaling_factor)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return ModelBundle(tokenizer, text_encoder, unet, vae, scheduler, family=SD15, name="tiny-sd15", source="tiny")


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _tiny_clip_config(tokenizer, width: int, layers: int, hidden_act: str, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl_bundle(seed: int = 0, prediction_type: str = "epsilon", unet_overrides: dict | None = None) -> ModelBundle:
    """A seeded tiny SDXL-shaped bundle: two tokenizers (the second pads with `!`), a CLIP-L-like and a
    bigG-like encoder with projection, a 2-level `text_time` UNet, a 2-level VAE, SDXL's DDPM schedule.

    Args:
        seed (`int`): seeds the weights.
        prediction_type (`str`): `epsilon` or `v_prediction`.
        unet_overrides (`dict`, *optional*): UNet config entries replacing `TINY_SDXL_UNET`'s (variant layouts).
    """
    tokenizer = make_clip_tokenizer(list(TINY_WORDS))
    tokenizer_2 = make_clip_tokenizer(list(TINY_WORDS), pad_token="!")
    width_l, width_g = TINY_SDXL_TEXT_WIDTHS
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, width_l, 3, "quick_gelu", width_l))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, width_g, 3, "gelu", TINY_SDXL_POOLED_WIDTH))
        unet = UNet2DConditionModel(**{**TINY_SDXL_UNET, **(unet_overrides or {})})
        vae = _tiny_vae(SDXL.latent_scaling_factor)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return ModelBundle(
        tokenizer, text_encoder, unet, vae, scheduler, family=SDXL, name="tiny-sdxl", source="tiny-sdxl",
        tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
    )  # fmt: skip
