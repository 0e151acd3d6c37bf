"""SDXL's kohya LoRA names: the original (LDM / sgm) UNet's block names, `lora_te1_` / `lora_te2_`.

kohya's sd-scripts trains SDXL on its own copy of the original UNet (library/sdxl_original_unet.py),
so its LoRA files name UNet modules by LDM blocks, and that is what ComfyUI, A1111/Forge and
diffusers' `load_lora_weights` read for SDXL:
```
diffusers module                                               kohya module (SDXL)
down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q     lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
mid_block.attentions.0.transformer_blocks.9.ff.net.2           lora_unet_middle_block_1_transformer_blocks_9_ff_net_2
up_blocks.0.attentions.2.proj_out                              lora_unet_output_blocks_2_1_proj_out
up_blocks.0.upsamplers.0.conv                                  lora_unet_output_blocks_2_2_conv
CLIP-L  text_model.encoder.layers.0.self_attn.q_proj           lora_te1_text_model_encoder_layers_0_self_attn_q_proj
bigG    text_model.encoder.layers.31.mlp.fc2                   lora_te2_text_model_encoder_layers_31_mlp_fc2
```
Block numbers follow from the UNet's config (levels, `layers_per_block`, which up levels have
attention), so SDXL-shaped variants with other depths (SSD-1B, Vega, KOALA) get their own numbers;
`transformer_layers_per_block` only sets how many `transformer_blocks` a block holds.

The SDXL `ModelFamily` (families/sdxl.py) plugs this in with `lora_unet_prefix=LORA_UNET_PREFIX`,
`unet_lora_module=sdxl_unet_lora_module`, and `lora_prefix=CLIP_L_LORA_PREFIX` / `CLIP_G_LORA_PREFIX`
on its two `TextEncoderSpec`s (whose `lora_name` adds kohya's `text_model_` part).
"""

from collections.abc import Mapping

from ...errors import InvalidInputError
from ..ldm_unet_names import ldm_unet_module_name

LORA_UNET_PREFIX = "lora_unet_"
CLIP_L_LORA_PREFIX = "lora_te1_"  # text_encoder (CLIP ViT-L, 768)
CLIP_G_LORA_PREFIX = "lora_te2_"  # text_encoder_2 (OpenCLIP ViT-bigG, 1280)


def sdxl_unet_lora_module(module_name: str, unet_config: Mapping | None = None) -> str:
    """The kohya name (after `lora_unet_`) of a diffusers SDXL UNet module: its LDM name, `.` → `_`.

    Args:
        module_name (`str`): as `unet.named_modules()` gives it (`down_blocks.1.attentions.0.proj_in`).
        unet_config (`dict`): the UNet's diffusers config (`unet.config`); the block numbers depend on it.
    """
    if unet_config is None:
        raise InvalidInputError(
            f"the SDXL LoRA name of UNet module {module_name!r} depends on the UNet's layout: pass its config "
            "(`unet.config`)."
        )
    return ldm_unet_module_name(module_name, unet_config).replace(".", "_")
