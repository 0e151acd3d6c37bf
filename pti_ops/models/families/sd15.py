"""The SD1.5 family: one CLIP-L text encoder, a UNet conditioned on its per-token output alone.

`clip_skip` counts layers A1111-style (ComfyUI's `CLIPSetLastLayer` -1/-2): 1 is the last layer,
2 the penultimate; the final LayerNorm is applied in every case, as A1111 and ComfyUI do for SD1.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import CLIPTextModel

from ...errors import InvalidInputError
from ..conditioning import Conditioning
from ..family import ModelFamily, TextEncoderSpec

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd15"


def text_transformer(text_encoder: CLIPTextModel) -> torch.nn.Module:
    """The module holding `final_layer_norm` (`text_model` in transformers 4.x, the model itself in 5.x)."""
    return getattr(text_encoder, "text_model", text_encoder)


def encode_clip_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Per-token conditioning `[batch, tokens, dim]` of `input_ids` (gradients flow if enabled)."""
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise InvalidInputError(
            f"`clip_skip` must be between 1 (last layer) and {layers} (this text encoder's layers), got {clip_skip}."
        )
    input_ids = input_ids.to(text_encoder.device)
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    # hidden_states[-1] is the last layer before the final LayerNorm.
    return text_transformer(text_encoder).final_layer_norm(out.hidden_states[-clip_skip])


def encode_clip_conditioning(
    text_encoders: Sequence[CLIPTextModel], input_ids: Sequence[torch.Tensor], clip_skip: int = 1
) -> Conditioning:
    """SD1.5's conditioning: CLIP-L's per-token states (`encode_clip_tokens`), no pooled embedding."""
    (text_encoder,), (ids,) = text_encoders, input_ids
    hidden = encode_clip_tokens(text_encoder, ids, clip_skip)
    return Conditioning(hidden, None, (hidden.shape[-1],))


def diffusers_module_lora_name(module_name: str, unet_config: Mapping | None = None) -> str:
    """Kohya names on diffusers module names: `down_blocks.0.….to_out.0` → `down_blocks_0_…_to_out_0`
    (kohya's sd-scripts trains SD1.5 on the diffusers UNet; the config is not needed)."""
    return module_name.replace(".", "_")


CLIP_L = TextEncoderSpec(
    name="clip_l",
    width=768,
    lora_prefix="lora_te_",
    single_file_prefix="cond_stage_model.transformer.",
    comfy_tokenizer="sd1_tokenizer",
)

SD15 = ModelFamily(
    name="sd15",
    display_name="SD1.5",
    text_encoders=(CLIP_L,),
    config_dir=CONFIG_DIR,
    latent_scaling_factor=0.18215,
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    unet_addition_embed_type=None,
    lora_unet_prefix="lora_unet_",
    unet_lora_module=diffusers_module_lora_name,
    encode_tokens=encode_clip_tokens,
    encode_conditioning=encode_clip_conditioning,
)
