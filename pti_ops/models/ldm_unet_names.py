"""diffusers → original LDM names of a UNet's weights and modules, for any number of levels.

The original UNet (`openaimodel`, and sgm's for SDXL; what single-file checkpoints, ComfyUI and
kohya's SDXL trainer use) numbers its blocks flat:
```
input_blocks.0.0                 conv_in
input_blocks.N.0 / .N.1          a level's resnet / its attention (N counts on through the levels)
input_blocks.N.0.op              a level's downsampler, after its resnets
middle_block.0 / .1 / .2         resnet, attention, resnet
output_blocks.N.0 / .N.1         resnet / attention, `layers_per_block + 1` of them per level
output_blocks.N.1.conv or .2.conv  the level's upsampler, in its last block (index 2 after an attention)
time_embed.0/2, label_emb.0.0/2, out.0/2   time MLP, SDXL's added-conditioning MLP, final norm and conv
```
Inside a block the names are diffusers' except in resnets (`conv1` → `in_layers.2` …, below).
One rule for two users: the single-file writer (`ldm_layout.py`) renames weights, and SDXL LoRA
files (`families/sdxl_lora.py`) name modules, as kohya's sd-scripts writes them for SDXL.
"""

from collections.abc import Mapping
from functools import lru_cache

from ..errors import InvalidInputError

# diffusers ResnetBlock2D names -> LDM ResBlock names.
UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
# Modules outside the blocks. SDXL's `add_embedding` is LDM's `label_emb.0` (a Sequential: Linear, SiLU, Linear).
UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def uniform_layers_per_block(config: Mapping, what: str) -> int:
    """The config's `layers_per_block` as one integer (a list with one value for every level is accepted).

    Per-level counts are refused: ComfyUI's `unet_to_diffusers` and diffusers' SDXL LoRA loader both
    number the blocks as if every level had the same count.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise InvalidInputError(f"{what} has per-level layers_per_block {list(layers)!r}; the LDM layout needs one integer.")
        layers = layers[0]
    return int(layers)


def unet_prefix_map(config: Mapping) -> dict[str, tuple[str, bool]]:
    """diffusers UNet prefix → (LDM prefix, whether the block is a resnet), for any number of levels.

    Args:
        config (`dict`): the UNet's diffusers config (`block_out_channels`, `layers_per_block`, `up_block_types`).
    """
    return dict(_shared_prefix_map(config))


def _shared_prefix_map(config: Mapping) -> dict[str, tuple[str, bool]]:
    """The cached map for this config (callers must not change it): LoRA naming asks once per module."""
    levels = len(config["block_out_channels"])
    layers = uniform_layers_per_block(config, "the UNet")
    # Whether each up level has attention: its upsampler then sits after it, at index 2 instead of 1.
    up_attention = tuple("CrossAttn" in block_type for block_type in config["up_block_types"])
    return _prefix_map(levels, layers, up_attention)


@lru_cache(maxsize=16)
def _prefix_map(levels: int, r: int, up_attention: tuple[bool, ...]) -> dict[str, tuple[str, bool]]:
    # LDM numbers blocks flat: input block 0 is conv_in, then per level r (resnet, attention) pairs and
    # a downsampler; output blocks are r + 1 per level, the upsampler sitting in the level's last one.
    prefixes = {}
    for i in range(levels):
        for j in range(r):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{1 + i * (r + 1) + j}.0.", True)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{1 + i * (r + 1) + j}.1.", False)
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (r + 1)}.0.op.", False)
    for u in range(levels):
        upsampler_index = 2 if up_attention[u] else 1
        for j in range(r + 1):
            prefixes[f"up_blocks.{u}.resnets.{j}."] = (f"output_blocks.{u * (r + 1) + j}.0.", True)
            prefixes[f"up_blocks.{u}.attentions.{j}."] = (f"output_blocks.{u * (r + 1) + j}.1.", False)
        if u < levels - 1:
            prefixes[f"up_blocks.{u}.upsamplers.0."] = (f"output_blocks.{u * (r + 1) + r}.{upsampler_index}.", False)
    prefixes["mid_block.resnets.0."] = ("middle_block.0.", True)
    prefixes["mid_block.attentions.0."] = ("middle_block.1.", False)
    prefixes["mid_block.resnets.1."] = ("middle_block.2.", True)
    return prefixes


def ldm_unet_key(key: str, prefixes: Mapping[str, tuple[str, bool]]) -> str:
    """The LDM name of a diffusers UNet weight (`down_blocks.1.resnets.0.conv1.weight` → `input_blocks.4.0.in_layers.2.weight`).

    Args:
        key (`str`): a diffusers state-dict key (or a module name followed by `.`).
        prefixes (`dict`): from `unet_prefix_map`.
    """
    for old, new in UNET_TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old):]
    for old, (new, is_resnet) in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            if is_resnet:
                rest = next((b + rest[len(a):] for a, b in UNET_RESNET_RENAMES if rest.startswith(a)), rest)
            return new + rest
    raise InvalidInputError(f"UNet weight {key.rstrip('.')!r} has no place in the LDM layout (class embeddings?).")


def ldm_unet_module_name(module_name: str, config: Mapping) -> str:
    """The LDM name of a diffusers UNet module (`down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`).

    Args:
        module_name (`str`): as `unet.named_modules()` gives it.
        config (`dict`): the UNet's diffusers config.
    """
    # The maps hold dotted prefixes: a module name is one with its trailing dot.
    return ldm_unet_key(module_name + ".", _shared_prefix_map(config))[:-1]
