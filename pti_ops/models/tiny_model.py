"""A tiny random model with SD1.5's structure, built from configs in code.

Same classes and code paths as SD1.5 (CLIP tokenizer and text model, UNet2DConditionModel with
cross-attention, AutoencoderKL, DDPM schedule), widths shrunk so a training step takes
milliseconds on a CPU. Weights are random but seeded: two builds are identical.
"""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .bundle import ModelBundle
from .clip_vocab import make_clip_tokenizer
from .families.sd15 import SD15

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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=TINY_RESOLUTION,
            scaling_factor=SD15.latent_scaling_factor,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return ModelBundle(tokenizer, text_encoder, unet, vae, scheduler, family=SD15, name="tiny-sd15", source="tiny")
