"""The SDXL family: CLIP-L and OpenCLIP bigG (with projection), a UNet with `text_time` added conditioning.

Conditioning is diffusers' `StableDiffusionXLPipeline.encode_prompt`: both encoders' states at the
same layer, without the final LayerNorm, side by side (`[b, 77, 768 + 1280]`), plus bigG's
`text_embeds` (its final-LayerNorm'd EOS state, projected: `[b, 1280]`) as the pooled embedding.

`clip_skip` n is ComfyUI's `CLIPSetLastLayer` -n applied to both encoders (`comfy/sdxl_clip.py`,
`comfy/sd1_clip.py`: `layer="hidden"`, `layer_idx=-n`, `layer_norm_hidden_state=False`), that is
transformers' `hidden_states[-n]`:
  - 2 (the default, `default_clip_skip`) = the penultimate layer: ComfyUI's SDXL default without
    a `CLIPSetLastLayer` node, the same as `CLIPSetLastLayer` -2, and diffusers' `clip_skip=None`;
  - 1 = the last layer's output, still without the final LayerNorm (`CLIPSetLastLayer` -1);
  - n ≥ 2 = diffusers' `clip_skip=n - 2` ("SDXL always indexes from the penultimate layer").
The pooled embedding never depends on it. SD1.5 counts the same way (`families/sd15.py`) but
applies the final LayerNorm.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ...errors import InvalidInputError
from ..conditioning import NUM_TIME_IDS, Conditioning
from ..family import ModelFamily, TextEncoderSpec
from ..ldm_shapes import unet_config_from_shapes
from .sdxl_lora import CLIP_G_LORA_PREFIX, CLIP_L_LORA_PREFIX, LORA_UNET_PREFIX, sdxl_unet_lora_module

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sdxl"
PENULTIMATE = 2

CLIP_L = TextEncoderSpec(
    name="clip_l",
    width=768,
    lora_prefix=CLIP_L_LORA_PREFIX,
    single_file_prefix="conditioner.embedders.0.transformer.",
    comfy_tokenizer="sd1_tokenizer",
)
CLIP_G = TextEncoderSpec(
    name="clip_g",
    width=1280,
    lora_prefix=CLIP_G_LORA_PREFIX,
    single_file_prefix="conditioner.embedders.1.model.",
    comfy_tokenizer="sd1_tokenizer",  # ComfyUI's SDXLClipGTokenizer reads CLIP-L's BPE files, padding with id 0
    pad_token="!",
    with_projection=True,
    open_clip_layout=True,
)
UNET_PREFIX = "model.diffusion_model."


def _check_clip_skip(text_encoder: torch.nn.Module, clip_skip: int) -> None:
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise InvalidInputError(
            f"`clip_skip` must be between 1 (last layer) and {layers} (this text encoder's layers), got {clip_skip}; "
            f"SDXL uses {PENULTIMATE} (the penultimate layer)."
        )


def encode_hidden_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = PENULTIMATE) -> torch.Tensor:
    """One encoder's block of SDXL's conditioning: `hidden_states[-clip_skip]`, no final LayerNorm, `[b, tokens, width]`."""
    _check_clip_skip(text_encoder, clip_skip)
    out = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-clip_skip]


def encode_sdxl_conditioning(
    text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor], clip_skip: int = PENULTIMATE
) -> Conditioning:
    """SDXL's conditioning: both encoders' `hidden_states[-clip_skip]` side by side, bigG's `text_embeds` pooled.

    Args:
        text_encoders (`Sequence`): `(CLIPTextModel, CLIPTextModelWithProjection)`, CLIP-L then bigG.
        input_ids (`Sequence[torch.Tensor]`): `[b, 77]` ids from each encoder's own tokenizer.
        clip_skip (`int`): layer counted from the end, as `CLIPSetLastLayer` -n (module docstring).
    """
    (clip_l, clip_g), (ids_l, ids_g) = text_encoders, input_ids
    for encoder in (clip_l, clip_g):
        _check_clip_skip(encoder, clip_skip)
    if not isinstance(clip_g, CLIPTextModelWithProjection):
        raise InvalidInputError(f"SDXL's second text encoder must be a CLIPTextModelWithProjection, got {type(clip_g).__name__}.")
    # One forward per encoder gives both its per-token block and (bigG) the pooled embedding.
    out_l = clip_l(ids_l.to(clip_l.device), output_hidden_states=True)
    out_g = clip_g(ids_g.to(clip_g.device), output_hidden_states=True)
    return Conditioning.from_blocks((out_l.hidden_states[-clip_skip], out_g.hidden_states[-clip_skip]), out_g.text_embeds)


def derive_sdxl_unet_config(state: dict[str, torch.Tensor], shipped: dict) -> dict:
    """The UNet config of an SDXL-family single file from its tensor shapes (`ldm_shapes`)."""
    unet = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    projection = state.get(CLIP_G.single_file_prefix + "text_projection")
    # OpenCLIP stores the projection as `x @ P`, P `[width, projection_dim]`.
    return unet_config_from_shapes(unet, shipped, None if projection is None else projection.shape[-1])


SDXL = ModelFamily(
    name="sdxl",
    display_name="SDXL",
    text_encoders=(CLIP_L, CLIP_G),
    config_dir=CONFIG_DIR,
    latent_scaling_factor=0.13025,
    unet_prefix=UNET_PREFIX,
    vae_prefix="first_stage_model.",
    unet_addition_embed_type="text_time",
    lora_unet_prefix=LORA_UNET_PREFIX,
    unet_lora_module=sdxl_unet_lora_module,
    encode_tokens=encode_hidden_tokens,
    encode_conditioning=encode_sdxl_conditioning,
    default_clip_skip=PENULTIMATE,
    conditioning_final_norm=False,
    num_time_ids=NUM_TIME_IDS,
    prediction_markers=("v_pred", "ztsnr"),
    derive_unet_config=derive_sdxl_unet_config,
)
