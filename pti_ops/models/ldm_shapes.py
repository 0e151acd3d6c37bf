"""A diffusers UNet config read off the tensors of an LDM-layout UNet (SDXL, SSD-1B, Vega, KOALA).

Real single files carry no config, and the SDXL-family variants differ from SDXL base in the number
of res blocks per level (KOALA: 1), of transformer blocks per res block (SSD-1B, Vega, KOALA) and in
the middle block (with attention, res block only, none). Those are counted from the key names, as
ComfyUI's `comfy/model_detection.py` does; widths come from weight shapes. What no shape shows is
taken from the family: attention heads of `HEAD_CHANNELS` channels, the sinusoidal settings.
"""

import re

import torch

from ..errors import ModelLoadError
from .conditioning import NUM_TIME_IDS

# Every SDXL-family UNet uses 64-channel attention heads (ComfyUI: `num_head_channels` 64): 320 → 5 heads.
HEAD_CHANNELS = 64


def _indices(keys, prefix: str) -> list[int]:
    """Sorted block numbers N of keys `prefix + "N."…`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in keys if (m := pattern.match(key))})


def _depth(unet: dict, block: str) -> int:
    """Transformer blocks in the attention of an LDM block (`input_blocks.4` → `input_blocks.4.1.transformer_blocks.M`)."""
    return len(_indices(unet, f"{block}.1.transformer_blocks."))


def _levels(unet: dict) -> list[list[int]]:
    """The input res blocks of each level: input block 0 is `conv_in`, each level but the last ends in a downsampler."""
    blocks = _indices(unet, "input_blocks.")
    if not blocks or blocks != list(range(len(blocks))) or "input_blocks.0.0.weight" not in unet:
        raise ModelLoadError(f"the UNet has input blocks {blocks[:12]}, not LDM's 0, 1, 2 …: not an LDM UNet.")
    levels, current = [], []
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in unet:
            levels.append(current)
            current = []
        else:
            current.append(i)
    return levels + [current]


def _attention_level(depths: list[int], where: str) -> bool:
    if any(depths) and not all(depths):
        raise ModelLoadError(f"the UNet's {where} has attention in some res blocks only ({depths}); diffusers cannot build it.")
    return bool(depths and depths[0])


def unet_config_from_shapes(unet: dict[str, torch.Tensor], base: dict, pooled_dim: int | None = None) -> dict:
    """`base` (a family's shipped UNet config) updated with what the tensors of `unet` say.

    Args:
        unet (`dict`): the UNet's tensors in the LDM layout without prefix (`input_blocks.0.0.weight`, …).
        base (`dict`): the family's diffusers UNet config (heads, sinusoids and the rest no shape shows).
        pooled_dim (`int`, *optional*): width of the pooled text embedding in the added conditioning
            (SDXL 1280), to split `label_emb`'s input into it and the time ids; `base`'s time-id width when None.
    """
    levels = _levels(unet)
    res_blocks = {len(level) for level in levels}
    if len(res_blocks) != 1 or 0 in res_blocks:
        counts = [len(level) for level in levels]
        raise ModelLoadError(f"the UNet has {counts} res blocks per level; diffusers needs the same number (≥ 1) in each.")
    r = res_blocks.pop()
    channels = [unet[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    down = [[_depth(unet, f"input_blocks.{i}") for i in level] for level in levels]
    down_attention = [_attention_level(d, f"input level {n}") for n, d in enumerate(down)]
    if any(len(set(d)) > 1 for d in down):
        raise ModelLoadError(f"the UNet's input transformer depths {down} vary within a level; diffusers cannot build it.")
    n = len(levels)
    outputs = _indices(unet, "output_blocks.")
    if outputs != list(range(n * (r + 1))):
        raise ModelLoadError(f"the UNet has {len(outputs)} output blocks; {n} levels of {r} res blocks need {n * (r + 1)}.")
    up = [[_depth(unet, f"output_blocks.{u * (r + 1) + j}") for j in range(r + 1)] for u in range(n)]
    up_attention = [_attention_level(d, f"output level {u}") for u, d in enumerate(up)]
    down_layers = [d[0] if has else 1 for d, has in zip(down, down_attention)]  # 1 where unused, as SDXL's config
    up_layers = [d if has else [1] * (r + 1) for d, has in zip(up, up_attention)]
    # diffusers gives up level u the depth of down level n-1-u unless told otherwise (levels without attention ignore it).
    default = all(up[u] == [down_layers[n - 1 - u]] * (r + 1) for u in range(n) if up_attention[u])
    reverse = None if default else up_layers

    config = dict(base)
    config.update(_middle_block(unet, down_layers[-1]))
    config.update(_attention_settings(unet, channels))
    config.update(_added_conditioning(unet, base, pooled_dim))
    conv_in = unet["input_blocks.0.0.weight"]
    config.update(
        in_channels=conv_in.shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=r,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        transformer_layers_per_block=down_layers,
        reverse_transformer_layers_per_block=reverse,
    )
    time_embed_dim = unet["time_embed.0.weight"].shape[0]
    config["time_embedding_dim"] = None if time_embed_dim == 4 * channels[0] else time_embed_dim  # diffusers' default: 4×
    return config


def _middle_block(unet: dict, last_down_depth: int) -> dict:
    if "middle_block.1.proj_in.weight" in unet:
        depth = _depth(unet, "middle_block")
        if depth != last_down_depth:
            raise ModelLoadError(
                f"the UNet's middle block has {depth} transformer blocks and its last level {last_down_depth}: "
                "diffusers gives both the same depth."
            )
        return {"mid_block_type": "UNetMidBlock2DCrossAttn"}
    if "middle_block.0.in_layers.0.weight" in unet:
        return {"mid_block_type": "UNetMidBlock2D"}  # one res block (SSD-1B, Vega; ComfyUI depth -1)
    return {"mid_block_type": None}  # KOALA-700M (ComfyUI depth -2)


def _attention_settings(unet: dict, channels: list[int]) -> dict:
    proj_in = next((v for k, v in sorted(unet.items()) if k.endswith(".1.proj_in.weight")), None)
    to_k = next((v for k, v in sorted(unet.items()) if k.endswith("attn2.to_k.weight")), None)
    if proj_in is None or to_k is None:
        raise ModelLoadError("the UNet has no cross-attention (`….1.proj_in`, `attn2.to_k`): not a text-conditioned UNet.")
    return {
        "cross_attention_dim": to_k.shape[1],
        "use_linear_projection": proj_in.ndim == 2,
        "attention_head_dim": [max(1, c // HEAD_CHANNELS) for c in channels],  # diffusers' legacy name: heads per level
    }


def _added_conditioning(unet: dict, base: dict, pooled_dim: int | None) -> dict:
    label = unet.get("label_emb.0.0.weight")
    if label is None:
        return {"addition_embed_type": None, "projection_class_embeddings_input_dim": None}
    inputs = label.shape[1]
    time_width = base.get("addition_time_embed_dim") or 0
    if pooled_dim is not None:
        time_width, rest = divmod(inputs - pooled_dim, NUM_TIME_IDS)
        if rest or time_width <= 0:
            raise ModelLoadError(
                f"the UNet's added conditioning takes {inputs} inputs, which is not the pooled text width {pooled_dim} "
                f"plus {NUM_TIME_IDS} time-id embeddings: the text encoder does not belong to this UNet."
            )
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": time_width, "projection_class_embeddings_input_dim": inputs}
