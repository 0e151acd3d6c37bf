"""diffusers → original LDM single-file layout for SD1.5-family models, and the checkpoint writer.

The LDM layout (that of `v1-5-pruned-emaonly.safetensors`, which ComfyUI and A1111 load; the
prefixes are the family's `single_file_prefixes`) is
  model.diffusion_model.*                       UNet (`input_blocks`, `middle_block`, `output_blocks`)
  first_stage_model.*                           VAE (`encoder.down.N`, `decoder.up.N`, `mid.attn_1`)
  cond_stage_model.transformer.text_model.*     CLIP text encoder (transformers names)
  betas, alphas_cumprod, ...                    DDPM schedule buffers
The renames work for any number of UNet/VAE levels and any (integer) `layers_per_block`, so the tiny
test model round-trips as well as SD1.5. The reverse direction is diffusers' own converters
(`single_file.py`), so a file written here is checked against an independent implementation.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bundle import ModelBundle
from .families import DEFAULT_FAMILY
from .family import ModelFamily
from ..errors import InvalidInputError, OutputExistsError
from ..safe_write import atomic_write

# Metadata keys of the files we write: the diffusers configs let our loader rebuild models of a
# non-standard size (the tiny one); the tokenizer lets it reload without any other file.
META_PREFIX = "pivotal_tuning."
META_CONFIG_KEYS = {
    "unet": META_PREFIX + "unet_config",
    "vae": META_PREFIX + "vae_config",
    "text_encoder": META_PREFIX + "text_encoder_config",
    "scheduler": META_PREFIX + "scheduler_config",
}
META_VOCAB = META_PREFIX + "tokenizer_vocab"
META_MERGES = META_PREFIX + "tokenizer_merges"
META_ADDED_TOKENS = META_PREFIX + "tokenizer_added_tokens"
# Small vocabularies (test and toy models) travel inside the file; CLIP's 49,408 tokens do not
# (about 1.6 MB of JSON that every SD1.5 install already has).
MAX_EMBEDDED_VOCAB = 4096

SAVE_DTYPES = (torch.float16, torch.float32)

# diffusers ResnetBlock2D names -> LDM ResBlock names (UNet only; the VAE keeps diffusers' inner names).
_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
# diffusers Attention names -> LDM AttnBlock names in the VAE's middle block.
_VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _layers_per_block(config: dict, what: str) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"{what} has per-level layers_per_block {layers!r}; the LDM layout needs one integer.")
    return layers


def unet_prefix_map(config: dict) -> dict[str, tuple[str, bool]]:
    """diffusers UNet prefix -> (LDM prefix, whether the block is a resnet), for any number of levels.

    Args:
        config (`dict`): the UNet's diffusers config (`block_out_channels`, `layers_per_block`, `up_block_types`).
    """
    n_levels = len(config["block_out_channels"])
    r = _layers_per_block(config, "the UNet")
    # LDM numbers blocks flat: input block 0 is conv_in, then per level r (resnet, attention) pairs and
    # a downsampler; output blocks are r + 1 per level, the upsampler sitting in the level's last one.
    prefixes = {}
    for i in range(n_levels):
        for j in range(r):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{1 + i * (r + 1) + j}.0.", True)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{1 + i * (r + 1) + j}.1.", False)
        if i < n_levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (r + 1)}.0.op.", False)
    for u in range(n_levels):
        # The upsampler follows the attention when the level has one: index 2, else 1.
        upsampler_index = 2 if "CrossAttn" in config["up_block_types"][u] else 1
        for j in range(r + 1):
            prefixes[f"up_blocks.{u}.resnets.{j}."] = (f"output_blocks.{u * (r + 1) + j}.0.", True)
            prefixes[f"up_blocks.{u}.attentions.{j}."] = (f"output_blocks.{u * (r + 1) + j}.1.", False)
        if u < n_levels - 1:
            prefixes[f"up_blocks.{u}.upsamplers.0."] = (f"output_blocks.{u * (r + 1) + r}.{upsampler_index}.", False)
    prefixes["mid_block.resnets.0."] = ("middle_block.0.", True)
    prefixes["mid_block.attentions.0."] = ("middle_block.1.", False)
    prefixes["mid_block.resnets.1."] = ("middle_block.2.", True)
    return prefixes


def _unet_key_to_ldm(key: str, prefixes: dict[str, tuple[str, bool]]) -> str:
    for old, new in _UNET_TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old):]
    for old, (new, is_resnet) in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            if is_resnet:
                rest = next((b + rest[len(a):] for a, b in _UNET_RESNET_RENAMES if rest.startswith(a)), rest)
            return new + rest
    raise ValueError(f"UNet weight {key!r} has no place in the SD1.5 LDM layout (class or added embeddings?).")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict, family: ModelFamily = DEFAULT_FAMILY) -> dict[str, torch.Tensor]:
    """Rename a diffusers `UNet2DConditionModel` state dict to `model.diffusion_model.*` keys.

    Args:
        state (`dict`): the UNet's `state_dict()`.
        config (`dict`): its diffusers config.
        family (`ModelFamily`): gives the single-file prefix.
    """
    prefixes = unet_prefix_map(config)
    return {family.unet_prefix + _unet_key_to_ldm(key, prefixes): value for key, value in state.items()}


def vae_prefix_map(config: dict) -> dict[str, str]:
    """diffusers VAE prefix -> LDM prefix, for any number of levels.

    Args:
        config (`dict`): the VAE's diffusers config (`block_out_channels`, `layers_per_block`).
    """
    n_levels = len(config["block_out_channels"])
    r = _layers_per_block(config, "the VAE")
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n_levels):
        # The decoder's up blocks are numbered from the lowest resolution in LDM, from the highest in diffusers.
        up = n_levels - 1 - i
        for j in range(r):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(r + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        if i < n_levels - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{up}.upsample."
    return prefixes


def _vae_item_to_ldm(key: str, value: torch.Tensor, prefixes: dict[str, str]) -> tuple[str, torch.Tensor]:
    old = next((p for p in prefixes if key.startswith(p)), None)
    if old is None:
        return key, value  # conv_in, conv_out, quant_conv, post_quant_conv: same names in both layouts
    rest = key[len(old):].replace("conv_shortcut.", "nin_shortcut.")
    if prefixes[old].endswith(".mid.attn_1."):
        rest = next((b + rest[len(a):] for a, b in _VAE_ATTENTION_RENAMES if rest.startswith(a)), rest)
        if rest.endswith("weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention projections are 1x1 convolutions
    return prefixes[old] + rest, value


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict, family: ModelFamily = DEFAULT_FAMILY) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to `first_stage_model.*` keys.

    Args:
        state (`dict`): the VAE's `state_dict()`.
        config (`dict`): its diffusers config.
        family (`ModelFamily`): gives the single-file prefix.
    """
    prefixes = vae_prefix_map(config)
    out = {}
    for key, value in state.items():
        new_key, new_value = _vae_item_to_ldm(key, value, prefixes)
        out[family.vae_prefix + new_key] = new_value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], max_positions: int, family: ModelFamily = DEFAULT_FAMILY) -> dict[str, torch.Tensor]:
    """Prefix a `CLIPTextModel` state dict as `cond_stage_model.transformer.text_model.*`.

    Args:
        state (`dict`): the text encoder's `state_dict()`; transformers 5 drops the `text_model.`
            level that transformers 4 and the LDM layout have, so it is added where missing.
        max_positions (`int`): prompt length; LDM files carry the `position_ids` buffer that
            transformers no longer saves.
        family (`ModelFamily`): gives the single-file prefix (of its first text encoder).
    """
    prefix = family.text_encoders[0].single_file_prefix
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out


def ddpm_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers LDM's `DDPM` class stores, computed in float64, saved as float32.

    Args:
        betas (`torch.Tensor`): the scheduler's betas, `[num_train_timesteps]`.
    """
    betas = betas.double()
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, 0)
    cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # LDM clips the log variance at t=0, where it is 0: it repeats the t=1 value there.
        "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        "posterior_mean_coef1": betas * cumprod_prev.sqrt() / (1 - cumprod),
        "posterior_mean_coef2": (1 - cumprod_prev) * alphas.sqrt() / (1 - cumprod),
    }
    return {name: value.float() for name, value in buffers.items()}


def bundle_to_ldm(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The whole bundle (UNet, VAE, text encoder, schedule) as one LDM-layout state dict, unconverted dtypes.

    Args:
        bundle (`ModelBundle`): an SD1.5-family bundle; it is read, never modified.
    """
    state, family = {}, bundle.family
    state.update(unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config), family))
    state.update(vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config), family))
    state.update(clip_to_ldm(bundle.text_encoder.state_dict(), bundle.text_encoder.config.max_position_embeddings, family))
    state.update(ddpm_buffers(bundle.noise_scheduler.betas))
    return state


# Config entries that describe the run, not the architecture (private `_*` keys are dropped too).
_RUNTIME_CONFIG_KEYS = ("dtype", "torch_dtype", "transformers_version")


def _config_json(config: dict) -> str:
    clean = {k: v for k, v in config.items() if not k.startswith("_") and k not in _RUNTIME_CONFIG_KEYS}
    return json.dumps(clean, default=list)


def tokenizer_vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[str]]:
    """The BPE vocabulary and merges of a CLIP tokenizer, as in its `vocab.json` / `merges.txt`.

    Args:
        tokenizer (`CLIPTokenizer`): a fast (tokenizers-backed) or slow (transformers 4) CLIP tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str())["model"]
        # tokenizers >= 0.20 stores merges as pairs, older versions as "left right" strings.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return dict(model["vocab"]), merges
    ranked = sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    return dict(tokenizer.encoder), [" ".join(pair) for pair, _ in ranked]


def _tokenizer_metadata(tokenizer) -> dict[str, str]:
    vocab, merges = tokenizer_vocab_and_merges(tokenizer)
    meta = {}
    # Tokens added after the BPE vocabulary (placeholders) own rows of the embedding matrix: keep them.
    added = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if t.content not in vocab)
    if added:
        meta[META_ADDED_TOKENS] = json.dumps(added, ensure_ascii=False)
    if len(vocab) <= MAX_EMBEDDED_VOCAB:
        meta[META_VOCAB] = json.dumps(vocab, ensure_ascii=False)
        meta[META_MERGES] = json.dumps(merges, ensure_ascii=False)
    return meta


def checkpoint_metadata(bundle: ModelBundle) -> dict[str, str]:
    """Safetensors metadata of a checkpoint written from `bundle`: configs, name, small tokenizers.

    Args:
        bundle (`ModelBundle`): the bundle being written.
    """
    meta = {"format": "pt", META_PREFIX + "family": bundle.family.name, META_PREFIX + "name": bundle.name}
    configs = {
        "unet": dict(bundle.unet.config),
        "vae": dict(bundle.vae.config),
        "text_encoder": bundle.text_encoder.config.to_dict(),
        "scheduler": dict(bundle.noise_scheduler.config),
    }
    for part, config in configs.items():
        meta[META_CONFIG_KEYS[part]] = _config_json(config)
    meta.update(_tokenizer_metadata(bundle.tokenizer))
    return meta


def save_ldm_checkpoint(
    bundle: ModelBundle, path: str | os.PathLike, dtype: torch.dtype = torch.float16, overwrite: bool = False
) -> Path:
    """Write `bundle` as a single-file SD1.5 LDM checkpoint (`.safetensors`), atomically.

    The file loads in ComfyUI's checkpoint loader (for SD1.5-sized models) and in `load_bundle`
    (any size: the diffusers configs are in the metadata).

    Args:
        bundle (`ModelBundle`): the model to write; it is not modified.
        path (`str`): output file, ending in `.safetensors`.
        dtype (`torch.dtype`): `torch.float16` (the usual distribution size) or `torch.float32` (lossless).
            The schedule buffers stay float32 and `position_ids` int64.
        overwrite (`bool`): replace an existing file; otherwise an existing file raises `OutputExistsError`.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"checkpoint path {str(path)!r} must end in .safetensors (the only format written).")
    if dtype not in SAVE_DTYPES:
        raise InvalidInputError(f"checkpoint dtype {dtype} is not supported: use torch.float16 or torch.float32.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists. Choose another file name or set `overwrite` to replace it.")
    state, model_prefixes = {}, tuple(bundle.family.single_file_prefixes.values())
    for key, value in bundle_to_ldm(bundle).items():
        value = value.detach().to("cpu")
        if value.is_floating_point() and key.startswith(model_prefixes):
            value = value.to(dtype)
        state[key] = value.contiguous()
    metadata = checkpoint_metadata(bundle)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata), overwrite=overwrite)
