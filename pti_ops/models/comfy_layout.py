"""ComfyUI's MODEL / CLIP / VAE, given as plain values, → a `ModelBundle`. No ComfyUI import.

The bridge (`nodes/bridge.py`) reads ComfyUI's objects — the weights with every patch applied, the
UNet config ComfyUI detected, the latent scale, the prediction type and zero-terminal-SNR switch of
the MODEL's sampling (an upstream ModelSamplingDiscrete included), the text encoders' attention
heads — and hands them here as `ComfyModels`. Here the weights are renamed to the family's LDM
single-file layout (SDXL's bigG, which ComfyUI holds in transformers' names, back into OpenCLIP's
with `ldm_layout.clip_to_open_clip`) and converted with diffusers' own LDM → diffusers functions
(`single_file.bundle_from_ldm_state`), as a single-file checkpoint is. The configs come from
tensor shapes (an SDXL-family UNet as `ldm_shapes` derives it for single files; VAEs; text
encoders) and, for SD1.5's UNet, from ComfyUI's detected config, so non-standard sizes work too.
The tokenizers are the BPE files ComfyUI ships beside `comfy/sd1_clip.py` (`sd1_tokenizer/`,
which its SDXL tokenizers read too; bigG pads with `!`).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import ModelLoadError
from .bundle import ModelBundle
from .clip_vocab import EOS_TOKEN
from .families import DEFAULT_FAMILY
from .families.sd15 import SD15
from .families.sdxl import SDXL
from .family import ModelFamily, TextEncoderSpec
from .ldm_layout import clip_to_open_clip
from .single_file import bundle_from_ldm_state, check_layout, load_configs, prediction_config, text_encoders_from_ldm_state
from .tokenizer_files import tokenizer_from_folder

# ComfyUI's attribute names of the text encoders in `clip.cond_stage_model`, for the families it knows:
# SD1.x `clip_l`; SDXL `clip_l` + `clip_g`; SD3 and Flux add `t5xxl`.
COMFY_TEXT_ENCODER_NAMES = ("clip_l", "clip_g", "t5xxl")
# What error messages call the converted models (`Path(...).name` in the core's messages).
CONNECTED = Path("the connected MODEL, CLIP and VAE")
CONNECTED_CLIP = Path("the connected CLIP")
# CLIP's attention heads are 64 wide (CLIP-L: 768 / 12); used when ComfyUI's module does not say.
CLIP_HEAD_WIDTH = 64
# The families whose ComfyUI MODEL/CLIP conversion exists here, told apart by their CLIP's text encoders.
COMFY_FAMILIES: tuple[ModelFamily, ...] = (SD15, SDXL)
# ComfyUI's prediction types (classes of comfy/model_sampling.py; ModelSamplingDiscrete's `eps`, `v_prediction`)
# → diffusers' `prediction_type`.
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


@dataclass
class ComfyModels:
    """What the bridge reads from ComfyUI's MODEL, CLIP and VAE, as plain values.

    Args:
        family (`ModelFamily`): from `comfy_family`.
        unet (`dict`): float32 `diffusion_model.*` weights of `model.model`, patches applied.
        clip (`dict`): float32 weights of `clip.cond_stage_model` (`clip_l.*`, `clip_g.*`), patches applied.
        vae (`dict`): float32 weights of `vae.first_stage_model`.
        unet_config (`dict`): `model.model.model_config.unet_config`, ComfyUI's detected LDM config.
        model_type (`str`): the prediction type of the MODEL's sampling as ComfyUI samples it (an upstream
            ModelSamplingDiscrete's included): `EPS`, `V_PREDICTION` (its class in comfy/model_sampling.py).
        latent_scale (`float`, *optional*): `model.model.latent_format.scale_factor`; the family's when None.
        clip_heads (`tuple`): attention heads of each text encoder, in family order; from its width where None.
        tokenizer_root (`Path`): the folder of ComfyUI's `comfy/sd1_clip.py`, which holds its tokenizers.
        name (`str`): base model name recorded in the files written from the bundle.
        zero_terminal_snr (`bool`): the sampling's `zsnr` (from a `ztsnr` checkpoint or ModelSamplingDiscrete).
    """

    family: ModelFamily
    unet: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    unet_config: dict
    model_type: str
    latent_scale: float | None
    clip_heads: tuple[int | None, ...]
    tokenizer_root: Path
    name: str
    zero_terminal_snr: bool = False


def comfy_family(text_encoder_names: Iterable[str]) -> ModelFamily:
    """The family whose text encoders are exactly those ComfyUI's CLIP has.

    Args:
        text_encoder_names (`Iterable[str]`): the `COMFY_TEXT_ENCODER_NAMES` that `clip.cond_stage_model` has.
    """
    present = set(text_encoder_names)
    for family in COMFY_FAMILIES:
        if present == {encoder.name for encoder in family.text_encoders}:
            return family
    known = "; ".join(f"{family.display_name}: {' + '.join(family.embedding_keys)}" for family in COMFY_FAMILIES)
    found = " + ".join(name for name in COMFY_TEXT_ENCODER_NAMES if name in present) or "none"
    raise ModelLoadError(
        f"the connected CLIP has the text encoders {found}, which no supported family has ({known}): only "
        f"{comfy_families()}-family models are supported."
    )


def comfy_families() -> str:
    """The display names of `COMFY_FAMILIES`, for messages (`SD1.5 and SDXL`)."""
    return " and ".join(family.display_name for family in COMFY_FAMILIES)


def bundle_from_comfy_models(models: ComfyModels) -> ModelBundle:
    """A float32 `ModelBundle` (on the CPU, not frozen) from ComfyUI's weights and settings.

    Args:
        models (`ComfyModels`): what the bridge read from the MODEL, CLIP and VAE.
    """
    family = models.family
    state = ldm_state_dict(models.unet, models.clip, models.vae, family)
    check_layout(state, CONNECTED, family)
    latent_scale = family.latent_scaling_factor if models.latent_scale is None else models.latent_scale
    # The family's shipped configs, with an SDXL-family UNet's from its shapes, as for a single file.
    configs = load_configs({}, family, state)
    if family.derive_unet_config is None:
        configs["unet"] = diffusers_unet_config(models.unet_config, family)
    configs["vae"] = diffusers_vae_config(models.vae, latent_scale, family)
    for index, part in enumerate(family.text_encoder_parts):
        configs[part] = text_encoder_config(models.clip, _heads(models.clip_heads, index), family, index)
    configs["scheduler"] = scheduler_config(models.model_type, family, models.zero_terminal_snr)
    tokenizers = comfy_tokenizers(models.tokenizer_root, configs, family)
    return bundle_from_ldm_state(
        state, configs, tokenizers[0], name=models.name, source="comfyui", where=CONNECTED, family=family,
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
    )  # fmt: skip


def _heads(clip_heads: tuple[int | None, ...] | None, index: int) -> int | None:
    return clip_heads[index] if clip_heads is not None and index < len(clip_heads) else None


def text_encoders_from_comfy_state(
    family: ModelFamily, clip: dict[str, torch.Tensor], clip_heads: tuple[int | None, ...], tokenizer_root: Path
) -> tuple[tuple[CLIPTokenizer, ...], tuple[CLIPTextModel, ...]]:
    """`(tokenizers, text_encoders)` of the family in family order (SDXL's bigG a `CLIPTextModelWithProjection`),
    float32 on the CPU, from the weights of ComfyUI's CLIP alone.

    Args:
        family (`ModelFamily`): from `comfy_family`.
        clip (`dict`): float32 weights of `clip.cond_stage_model`.
        clip_heads (`tuple`): attention heads of each text encoder (`ComfyModels.clip_heads`).
        tokenizer_root (`Path`): the folder of ComfyUI's `comfy/sd1_clip.py`.
    """
    state, configs = {}, {}
    for index, (spec, part) in enumerate(zip(family.text_encoders, family.text_encoder_parts)):
        state.update(encoder_ldm_state(clip, spec))
        configs[part] = text_encoder_config(clip, _heads(clip_heads, index), family, index)
    encoders = text_encoders_from_ldm_state(state, configs, family, CONNECTED_CLIP)
    return comfy_tokenizers(tokenizer_root, configs, family), tuple(encoders)


def comfy_tokenizer(tokenizer_root: Path, spec: TextEncoderSpec, model_max_length: int) -> CLIPTokenizer:
    """One text encoder's CLIP tokenizer from the vocab.json / merges.txt ComfyUI ships, padding as ComfyUI does."""
    return tokenizer_from_folder(tokenizer_root / spec.comfy_tokenizer, model_max_length, spec.pad_token or EOS_TOKEN)


def comfy_tokenizers(tokenizer_root: Path, configs: dict[str, dict], family: ModelFamily) -> tuple[CLIPTokenizer, ...]:
    """Every text encoder's tokenizer in family order, as long as its encoder's positions (`configs` by part)."""
    return tuple(
        comfy_tokenizer(tokenizer_root, spec, configs[part]["max_position_embeddings"])
        for spec, part in zip(family.text_encoders, family.text_encoder_parts)
    )


def encoder_ldm_state(clip: dict[str, torch.Tensor], spec: TextEncoderSpec) -> dict[str, torch.Tensor]:
    """One text encoder's weights of ComfyUI's CLIP (`clip_g.transformer.*`, in transformers' names) in the
    single-file layout: under the encoder's single-file prefix, in OpenCLIP's names where the family stores
    it so (SDXL's bigG). ComfyUI's `logit_scale` (unused) is left out.

    Args:
        clip (`dict`): weights of `clip.cond_stage_model`.
        spec (`TextEncoderSpec`): the encoder.
    """
    transformer = spec.comfy_prefix + "transformer."
    weights = {key[len(transformer) :]: value for key, value in clip.items() if key.startswith(transformer)}
    if spec.open_clip_layout:
        return clip_to_open_clip(weights, spec.single_file_prefix)
    return {spec.single_file_prefix + key: value for key, value in weights.items()}


def ldm_state_dict(unet: dict, clip: dict, vae: dict, family: ModelFamily) -> dict[str, torch.Tensor]:
    """Rename ComfyUI's state dicts to the family's LDM single-file layout (`model.diffusion_model.*`, …).

    Args:
        unet (`dict`): `diffusion_model.*` keys of `model.model`.
        clip (`dict`): `clip_l.*` (and `clip_g.*`) keys of `clip.cond_stage_model` (`encoder_ldm_state`).
        vae (`dict`): keys of `vae.first_stage_model`.
        family (`ModelFamily`): gives the prefixes on both sides.
    """
    state = {family.unet_prefix + key.removeprefix("diffusion_model."): value for key, value in unet.items()}
    for encoder in family.text_encoders:
        state.update(encoder_ldm_state(clip, encoder))
    state.update({family.vae_prefix + key: value for key, value in vae.items()})
    return state


def diffusers_unet_config(unet_config: dict, family: ModelFamily = DEFAULT_FAMILY) -> dict:
    """diffusers `UNet2DConditionModel` config from ComfyUI's detected LDM UNet config.

    ComfyUI describes the UNet as LDM's `openaimodel` does: `model_channels` × `channel_mult` per
    level, `num_res_blocks` per level, `transformer_depth` per input res block (0 = no attention),
    `transformer_depth_output` per output block *from the last one back* (`openaimodel` pops it from
    the end while building the output blocks), `num_heads` or `num_head_channels`.

    Args:
        unet_config (`dict`): `model.model.model_config.unet_config`.
        family (`ModelFamily`): whose shipped UNet config fills in the rest.
    """
    c = unet_config
    if c.get("adm_in_channels") or c.get("use_temporal_attention") or c.get("use_temporal_resblock"):
        raise ModelLoadError(
            "the connected MODEL is not an SD1.x model (it has added conditioning or temporal layers, as SDXL and "
            "video models do) but the connected CLIP is SD1.x's (CLIP-L alone): connect the MODEL and CLIP of one "
            f"checkpoint; {comfy_families()}-family models are supported."
        )
    levels = len(c["channel_mult"])
    res_blocks = _per_level(c["num_res_blocks"], levels, "num_res_blocks")
    if len(set(res_blocks)) != 1:
        raise ModelLoadError(f"the connected MODEL has a different number of res blocks per level {res_blocks}; not supported.")
    r = res_blocks[0]
    depth_in = _per_block(c.get("transformer_depth", 1), levels * r)
    depth_out = _per_block(c.get("transformer_depth_output", depth_in[0]), levels * (r + 1))[::-1]  # first block first
    down_depth = [depth_in[i * r] for i in range(levels)]
    up_depth = [depth_out[u * (r + 1)] for u in range(levels)]
    channels = [c["model_channels"] * m for m in c["channel_mult"]]
    if c.get("num_head_channels", -1) not in (-1, None):
        heads: int | list[int] = [ch // c["num_head_channels"] for ch in channels]
    else:
        heads = c["num_heads"]
    middle = c.get("transformer_depth_middle", 1)
    if middle is None or middle < 1:
        raise ModelLoadError(f"the connected MODEL's middle block has no attention (depth {middle}); not an SD1.x UNet.")
    config = load_configs({}, family)["unet"]
    config.update(
        in_channels=c.get("in_channels", 4),
        out_channels=c.get("out_channels", 4),
        block_out_channels=channels,
        layers_per_block=r,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth],
        transformer_layers_per_block=[d or 1 for d in down_depth],
        cross_attention_dim=c["context_dim"],
        attention_head_dim=heads,
        use_linear_projection=bool(c.get("use_linear_in_transformer", False)),
    )
    return config


def _per_level(value, levels: int, name: str) -> list[int]:
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise ModelLoadError(f"the connected MODEL's `{name}` {value!r} does not have one entry per level ({levels}).")
    return values


def _per_block(value, blocks: int) -> list[int]:
    values = [value] * blocks if isinstance(value, int) else list(value)
    return values + [0] * (blocks - len(values))


def diffusers_vae_config(state: dict[str, torch.Tensor], scaling_factor: float, family: ModelFamily = DEFAULT_FAMILY) -> dict:
    """diffusers `AutoencoderKL` config from the shapes of an LDM VAE state dict (no prefix).

    Args:
        state (`dict`): `vae.first_stage_model.state_dict()` (keys `encoder.down.0.block.0…`).
        scaling_factor (`float`): the latent scale of the model (0.18215 for SD1.x).
        family (`ModelFamily`): whose shipped VAE config fills in the rest.
    """
    levels = _count_indices(state, "encoder.down.")
    blocks = _count_indices(state, "encoder.down.0.block.")
    if levels == 0 or blocks == 0 or "encoder.conv_in.weight" not in state:
        raise ModelLoadError("the connected VAE is not an SD-style AutoencoderKL (no `encoder.down.N.block.M` weights).")
    config = load_configs({}, family)["vae"]
    config.update(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["decoder.conv_in.weight"].shape[1],
        block_out_channels=[state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
        layers_per_block=blocks,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        scaling_factor=float(scaling_factor),
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
    )
    return config


def _count_indices(state: dict, prefix: str) -> int:
    indices = {key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def text_encoder_config(
    clip_state: dict[str, torch.Tensor], heads: int | None, family: ModelFamily = DEFAULT_FAMILY, index: int = 0
) -> dict:
    """transformers `CLIPTextConfig` dict of one text encoder from the shapes of ComfyUI's CLIP state dict.

    Args:
        clip_state (`dict`): weights of `clip.cond_stage_model` (`clip_l.*`, `clip_g.*`).
        heads (`int`, *optional*): attention heads; from the width when None.
        family (`ModelFamily`): gives the encoder's ComfyUI prefix and shipped config.
        index (`int`): which of the family's text encoders (0: CLIP-L; SDXL's 1: bigG).
    """
    spec, part = family.text_encoders[index], family.text_encoder_parts[index]
    prefix = spec.comfy_prefix + "transformer.text_model."
    tokens = clip_state[prefix + "embeddings.token_embedding.weight"]
    positions = clip_state[prefix + "embeddings.position_embedding.weight"]
    width = tokens.shape[1]
    # bigG's projection makes the pooled embedding; CLIP-L's (ComfyUI's CLIP always holds one) is unused.
    projection = clip_state.get(spec.comfy_prefix + "transformer.text_projection.weight")
    config = load_configs({}, family)[part]
    config.update(
        vocab_size=tokens.shape[0],
        hidden_size=width,
        projection_dim=projection.shape[0] if spec.with_projection and projection is not None else width,
        max_position_embeddings=positions.shape[0],
        num_hidden_layers=_count_indices(clip_state, prefix + "encoder.layers."),
        intermediate_size=clip_state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=heads or max(1, width // CLIP_HEAD_WIDTH),
    )
    return config


def scheduler_config(model_type: str, family: ModelFamily = DEFAULT_FAMILY, zero_terminal_snr: bool = False) -> dict:
    """The family's DDPM training schedule with the MODEL's prediction type (epsilon or v) and zero terminal SNR.

    Args:
        model_type (`str`): ComfyUI's prediction type of the MODEL's sampling (`EPS`, `V_PREDICTION`).
        family (`ModelFamily`): whose shipped scheduler config is used.
        zero_terminal_snr (`bool`): the sampling's `zsnr`.
    """
    if model_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"the connected MODEL predicts `{model_type}`; training supports epsilon and v-prediction models "
            "(ModelSamplingDiscrete's `eps` and `v_prediction`)."
        )
    return prediction_config(load_configs({}, family)["scheduler"], PREDICTION_TYPES[model_type], zero_terminal_snr)
