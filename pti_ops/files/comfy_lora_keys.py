"""What stock ComfyUI's LoraLoader accepts, re-derived from its rules for tests and checks.

ComfyUI loads a LoRA by building a key map (comfy/lora.py `model_lora_keys_unet`,
`model_lora_keys_clip`; the UNet's diffusers names come from comfy/utils.py `unet_to_diffusers`) and
logs "lora key not loaded" for every file key outside it. These functions rebuild that map from a
model's diffusers/transformers module names, on their own (they share nothing with our writer), so a
test can check that every module prefix we write is one ComfyUI maps. Read from Comfy-Org/ComfyUI
at a125cd8 (2025-10).
"""

import re
from collections.abc import Iterable

# ---------------------------------------------------------------------------------------------
# SD1.5 (keys on diffusers names)
# ---------------------------------------------------------------------------------------------

# ComfyUI's `unet_to_diffusers` lists, per SD1.5 UNet part, the diffusers weights it knows; a LoRA
# key is accepted for every one of them. Module-name suffixes of those weights:
_RESNET_PARTS = r"(?:conv1|time_emb_proj|conv2|conv_shortcut|norm1|norm2)"
_ATTENTION_PARTS = r"(?:proj_in|proj_out|norm)"
_TRANSFORMER_PARTS = r"(?:norm[123]|attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
_UNET_MODULES = re.compile(
    "|".join(
        (
            rf"(?:down_blocks|up_blocks)\.\d+\.resnets\.\d+\.{_RESNET_PARTS}",
            rf"mid_block\.resnets\.[01]\.{_RESNET_PARTS}",
            rf"(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.attentions\.\d+\.{_ATTENTION_PARTS}",
            rf"(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.{_TRANSFORMER_PARTS}",
            r"down_blocks\.\d+\.downsamplers\.0\.conv",
            r"up_blocks\.\d+\.upsamplers\.0\.conv",
            r"conv_in|conv_norm_out|conv_out|(?:time_embedding|class_embedding|add_embedding)\.linear_[12]",
        )
    )
)
# ComfyUI's LORA_CLIP_MAP (in its order), for layers 0..31 of a CLIP text model.
_LORA_CLIP_PARTS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
_CLIP_MODULES = re.compile(r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])")
_CLIP_MAX_LAYERS = 32


def _diffusers_spellings(name: str) -> set[str]:
    """The keys `model_lora_keys_unet` accepts for one diffusers UNet module (from `unet_to_diffusers`)."""
    flat = name.replace(".", "_")
    # diffusers' old attention-processor spelling, with and without the `unet.` prefix
    processor_name = name.replace(".to_", ".processor.to_")
    if processor_name.endswith(".to_out.0"):
        processor_name = processor_name[: -len(".0")]
    return {"lora_unet_" + flat, "lycoris_" + flat, processor_name, "unet." + processor_name}


def _clip_layers(module_names: Iterable[str]) -> set[tuple[int, str]]:
    """(layer, part) of every CLIP module in `LORA_CLIP_MAP`, for transformers 4.x or 5.x names."""
    found = set()
    for name in module_names:
        match = _CLIP_MODULES.fullmatch(name.removeprefix("text_model."))
        if match and int(match.group(1)) < _CLIP_MAX_LAYERS:
            found.add((int(match.group(1)), match.group(2)))
    return found


def comfyui_lora_key_map(unet_module_names: Iterable[str], text_encoder_module_names: Iterable[str]) -> set[str]:
    """The LoRA module prefixes stock ComfyUI maps for an SD1.5 model with these diffusers module names.

    A re-derivation of `model_lora_keys_unet` / `model_lora_keys_clip` (comfy/lora.py) for the keys
    spelled on diffusers names: kohya `lora_unet_…` / `lycoris_…`, diffusers' own (`unet.…processor.to_q`,
    `to_out.0` → `to_out`), and CLIP `lora_te_` / `lora_te1_` / `text_encoder.text_model.…`. Keys spelled on
    ComfyUI's internal LDM names, which we never write for SD1.5, are left out.

    Args:
        unet_module_names (`Iterable[str]`): `name for name, _ in unet.named_modules()`.
        text_encoder_module_names (`Iterable[str]`): the same for the CLIP text encoder (4.x or 5.x names).
    """
    accepted = set()
    for name in unet_module_names:
        if _UNET_MODULES.fullmatch(name):
            accepted |= _diffusers_spellings(name)
    for layer, part in _clip_layers(text_encoder_module_names):
        flat = f"{layer}_{part.replace('.', '_')}"
        accepted.update(
            (
                f"lora_te_text_model_encoder_layers_{flat}",
                f"lora_te1_text_model_encoder_layers_{flat}",
                f"text_encoder.text_model.encoder.layers.{layer}.{part}",
            )
        )
    return accepted


# ---------------------------------------------------------------------------------------------
# SDXL (keys on the LDM model's own names, and on diffusers names through `unet_to_diffusers`)
# ---------------------------------------------------------------------------------------------

# comfy/utils.py, weight entries only (a LoRA key names a module with a `.weight`), module names:
_COMFY_RESNET = {  # UNET_MAP_RESNET: LDM ResBlock part → diffusers ResnetBlock2D part
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")  # UNET_MAP_ATTENTIONS
_COMFY_TRANSFORMER = (  # TRANSFORMER_BLOCKS
    "norm1", "norm2", "norm3",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
_COMFY_BASIC = {  # UNET_MAP_BASIC: diffusers → LDM
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
}


def _count(names: set[str], prefix: str) -> int:
    """ComfyUI's `count_blocks`: how many of `prefix.0`, `prefix.1`, … exist."""
    count = 0
    while f"{prefix}.{count}" in names:
        count += 1
    return count


def _comfy_unet_config(names: set[str]) -> dict:
    """ComfyUI's UNet config fields `unet_to_diffusers` reads, counted from diffusers module names as
    `model_detection.unet_config_from_diffusers_unet` counts `transformer_depth`.

    `transformer_depth` has one entry per input res block; `transformer_depth_output` one per output
    block, from the last block back (as `detect_unet_config` lists it; `unet_to_diffusers` pops from the end).
    """
    levels = _count(names, "down_blocks")
    res_blocks = [_count(names, f"down_blocks.{x}.resnets") for x in range(levels)]
    up_res_blocks = [_count(names, f"up_blocks.{x}.resnets") for x in range(levels)]
    depth = [_count(names, f"down_blocks.{x}.attentions.{i}.transformer_blocks") for x in range(levels) for i in range(res_blocks[x])]
    depth_output = [
        _count(names, f"up_blocks.{x}.attentions.{i}.transformer_blocks") for x in range(levels) for i in range(up_res_blocks[x])
    ]
    return {
        "num_res_blocks": res_blocks,
        "transformer_depth": depth,
        "transformer_depth_output": depth_output[::-1],
        "transformer_depth_middle": _count(names, "mid_block.attentions.0.transformer_blocks"),
    }


def _comfy_unet_to_diffusers(config: dict) -> dict[str, str]:
    """comfy/utils.py `unet_to_diffusers`, on module names: diffusers module → LDM module."""
    num_res_blocks = config["num_res_blocks"]
    depth = list(config["transformer_depth"])
    depth_output = list(config["transformer_depth_output"])
    mapping = {}

    def add_block(diffusers: str, ldm: str, transformers: int) -> None:
        for part in _COMFY_ATTENTION:
            mapping[f"{diffusers}.{part}"] = f"{ldm}.{part}"
        for t in range(transformers):
            for part in _COMFY_TRANSFORMER:
                mapping[f"{diffusers}.transformer_blocks.{t}.{part}"] = f"{ldm}.transformer_blocks.{t}.{part}"

    def add_resnet(diffusers: str, ldm: str) -> None:
        for ldm_part, diffusers_part in _COMFY_RESNET.items():
            mapping[f"{diffusers}.{diffusers_part}"] = f"{ldm}.{ldm_part}"

    for x in range(len(num_res_blocks)):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            add_resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            transformers = depth.pop(0)
            if transformers > 0:
                add_block(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", transformers)
            n += 1
        mapping[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    add_block("mid_block.attentions.0", "middle_block.1", config["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        add_resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    reversed_res_blocks = list(reversed(num_res_blocks))
    for x in range(len(num_res_blocks)):
        n = (reversed_res_blocks[x] + 1) * x
        blocks = reversed_res_blocks[x] + 1
        for i in range(blocks):
            add_resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            c = 1
            transformers = depth_output.pop()
            if transformers > 0:
                c += 1
                add_block(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", transformers)
            if i == blocks - 1:
                mapping[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    mapping.update(_COMFY_BASIC)
    return mapping


def _sdxl_clip_keys(clip_l_module_names: Iterable[str], clip_g_module_names: Iterable[str]) -> set[str]:
    """`model_lora_keys_clip` for ComfyUI's SDXL CLIP (`clip_l` and `clip_g`)."""
    clip_l, clip_g = _clip_layers(clip_l_module_names), _clip_layers(clip_g_module_names)
    accepted = set()
    clip_l_present = False
    for layer in range(_CLIP_MAX_LAYERS):
        for part in _LORA_CLIP_PARTS:
            flat = f"encoder_layers_{layer}_{part.replace('.', '_')}"
            diffusers_name = f"text_model.encoder.layers.{layer}.{part}"
            if (layer, part) in clip_l:
                accepted |= {f"lora_te_text_model_{flat}", f"lora_te1_text_model_{flat}", f"text_encoder.{diffusers_name}"}
                clip_l_present = True
            if (layer, part) in clip_g:
                if clip_l_present:
                    accepted |= {f"lora_te2_text_model_{flat}", f"text_encoder_2.{diffusers_name}"}
                else:  # ComfyUI's reading of a bigG-only CLIP (SDXL refiner, Stable Cascade)
                    accepted |= {f"lora_te_text_model_{flat}", f"text_encoder.{diffusers_name}", f"lora_prior_te_text_model_{flat}"}
    # ComfyUI's own CLIP models always carry a text projection (transformers' CLIPTextModel has none).
    accepted |= {"lora_prior_te_text_projection", "lora_te2_text_projection", "lora_te1_text_projection"}
    return accepted


def comfyui_sdxl_lora_key_map(
    unet_module_names: Iterable[str],
    clip_l_module_names: Iterable[str],
    clip_g_module_names: Iterable[str],
) -> set[str]:
    """The LoRA module prefixes stock ComfyUI maps for an SDXL model with these diffusers module names.

    A re-derivation of `model_lora_keys_unet` for an SDXL-shaped UNet: every weight of ComfyUI's model under
    its LDM name (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, what kohya writes), and the
    diffusers spellings `unet_to_diffusers` lists (`lora_unet_down_blocks_…`, `lycoris_…`, `unet.…processor.to_q`);
    and of `model_lora_keys_clip` for `clip_l` + `clip_g` (`lora_te1_…`, `lora_te2_…`, `text_encoder_2.…`).
    ComfyUI's generic keys (`diffusion_model.…`, `text_encoders.…`) are left out.

    Args:
        unet_module_names (`Iterable[str]`): `name for name, _ in unet.named_modules()` of the diffusers UNet.
        clip_l_module_names (`Iterable[str]`): the same for the CLIP-L `CLIPTextModel` (4.x or 5.x names).
        clip_g_module_names (`Iterable[str]`): the same for the bigG `CLIPTextModelWithProjection`.
    """
    # Every dotted prefix is a module (`down_blocks.0` for `down_blocks.0.resnets.0.conv1`), as in named_modules.
    names = {".".join(parts[:i]) for parts in (name.split(".") for name in unet_module_names) for i in range(1, len(parts) + 1)}
    accepted = set()
    for diffusers_name, ldm_name in _comfy_unet_to_diffusers(_comfy_unet_config(names)).items():
        if diffusers_name in names:  # ComfyUI's model has this weight, under its LDM name
            accepted.add("lora_unet_" + ldm_name.replace(".", "_"))
        accepted |= _diffusers_spellings(diffusers_name)
    return accepted | _sdxl_clip_keys(clip_l_module_names, clip_g_module_names)
