"""diffusers → original single-file layout (SD1.5's LDM, SDXL's SGM), and the checkpoint writer.

The SD1.5 layout (that of `v1-5-pruned-emaonly.safetensors`, which ComfyUI and A1111 load; the
prefixes are the family's `single_file_prefixes`) is
  model.diffusion_model.*                       UNet (`input_blocks`, `middle_block`, `output_blocks`)
  first_stage_model.*                           VAE (`encoder.down.N`, `decoder.up.N`, `mid.attn_1`)
  cond_stage_model.transformer.text_model.*     CLIP text encoder (transformers names)
  betas, alphas_cumprod, ...                    DDPM schedule buffers
SDXL's (that of `sd_xl_base_1.0.safetensors`) has the same UNet (plus `label_emb`) and VAE, and
  conditioner.embedders.0.transformer.text_model.*  CLIP-L (transformers names)
  conditioner.embedders.1.model.*                   OpenCLIP bigG (`transformer.resblocks.N`, fused
                                                    `attn.in_proj_*`, `text_projection` as `x @ P`)
  v_pred, ztsnr                                     empty marker tensors, only for v-prediction / zero SNR
The renames work for any number of UNet/VAE levels, any (integer) `layers_per_block` and any number
of transformer blocks per res block, so the tiny test models and SDXL's variants round-trip; the
UNet's live in `ldm_unet_names.py` (SDXL's LoRA names use them too). The reverse direction is diffusers' own converters (`single_file.py`), so a file written here is checked
against an independent implementation.
"""

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bundle import ModelBundle
from .families import DEFAULT_FAMILY
from .family import ModelFamily
from .ldm_unet_names import ldm_unet_key, uniform_layers_per_block, unet_prefix_map
from ..errors import InvalidInputError, OutputExistsError
from ..safe_write import atomic_write

# Metadata keys of the files we write: the diffusers configs let our loader rebuild models of a
# non-standard size (the tiny one); the tokenizer lets it reload without any other file.
META_PREFIX = "pivotal_tuning."
META_CONFIG_KEYS = {
    "unet": META_PREFIX + "unet_config",
    "vae": META_PREFIX + "vae_config",
    "text_encoder": META_PREFIX + "text_encoder_config",
    "text_encoder_2": META_PREFIX + "text_encoder_2_config",
    "scheduler": META_PREFIX + "scheduler_config",
}
META_VOCAB = META_PREFIX + "tokenizer_vocab"
META_MERGES = META_PREFIX + "tokenizer_merges"
META_ADDED_TOKENS = META_PREFIX + "tokenizer_added_tokens"
# Small vocabularies (test and toy models) travel inside the file; CLIP's 49,408 tokens do not
# (about 1.6 MB of JSON that every SD1.5 install already has).
MAX_EMBEDDED_VOCAB = 4096

SAVE_DTYPES = (torch.float16, torch.float32)

# diffusers Attention names -> LDM AttnBlock names in the VAE's middle block.
_VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict, family: ModelFamily = DEFAULT_FAMILY) -> dict[str, torch.Tensor]:
    """Rename a diffusers `UNet2DConditionModel` state dict to `model.diffusion_model.*` keys.

    Args:
        state (`dict`): the UNet's `state_dict()`.
        config (`dict`): its diffusers config.
        family (`ModelFamily`): gives the single-file prefix.
    """
    prefixes = unet_prefix_map(config)
    return {family.unet_prefix + ldm_unet_key(key, prefixes): value for key, value in state.items()}


def vae_prefix_map(config: dict) -> dict[str, str]:
    """diffusers VAE prefix -> LDM prefix, for any number of levels.

    Args:
        config (`dict`): the VAE's diffusers config (`block_out_channels`, `layers_per_block`).
    """
    n_levels = len(config["block_out_channels"])
    r = uniform_layers_per_block(config, "the VAE")
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


def clip_to_ldm(
    state: dict[str, torch.Tensor], max_positions: int, family: ModelFamily = DEFAULT_FAMILY, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Prefix a `CLIPTextModel` state dict as `cond_stage_model.transformer.text_model.*` (SD1.5).

    Args:
        state (`dict`): the text encoder's `state_dict()`; transformers 5 drops the `text_model.`
            level that transformers 4 and the LDM layout have, so it is added where missing.
        max_positions (`int`): prompt length; LDM files carry the `position_ids` buffer that
            transformers no longer saves.
        family (`ModelFamily`): gives the single-file prefix (of its first text encoder).
        prefix (`str`, *optional*): another prefix (SDXL's CLIP-L: `conditioner.embedders.0.transformer.`).
    """
    prefix = family.text_encoders[0].single_file_prefix if prefix is None else prefix
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out


# transformers CLIP names -> OpenCLIP's, for SDXL's bigG (`conditioner.embedders.1.model.*`).
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_RENAMES = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
# OpenCLIP's trained temperature, ln(100): released SDXL files carry it (unused for generation).
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)


def clip_to_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection` state dict in OpenCLIP's text-tower names (SDXL's bigG).

    q, k and v are fused into `attn.in_proj_weight` / `in_proj_bias` (in that order), and the
    projection is stored transposed, as OpenCLIP computes `x @ text_projection`.

    Args:
        state (`dict`): the encoder's `state_dict()` (`text_model.` level optional, as in `clip_to_ldm`).
        prefix (`str`): the single-file prefix (`conditioner.embedders.1.model.`).
    """
    out, fused = {}, {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        elif name in _OPEN_CLIP_TOP_LEVEL:
            out[prefix + _OPEN_CLIP_TOP_LEVEL[name]] = value
        elif name.startswith("encoder.layers."):
            layer, rest = name.removeprefix("encoder.layers.").split(".", 1)
            block = f"{prefix}transformer.resblocks.{layer}."
            projection, _, kind = rest.removeprefix("self_attn.").partition(".")
            if rest.startswith("self_attn.") and projection in ("q_proj", "k_proj", "v_proj"):
                fused.setdefault(block + f"attn.in_proj_{kind}", {})[projection[0]] = value
                continue
            renamed = next((new + rest[len(old):] for old, new in _OPEN_CLIP_LAYER_RENAMES if rest.startswith(old)), None)
            if renamed is None:
                raise ValueError(f"text encoder weight {key!r} has no place in the OpenCLIP layout.")
            out[block + renamed] = value
        elif not name.endswith("position_ids"):
            raise ValueError(f"text encoder weight {key!r} has no place in the OpenCLIP layout.")
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out[prefix + "logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE)
    return out


def text_encoders_to_ldm(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """Every text encoder of `bundle` under its family's single-file prefix and naming."""
    out = {}
    for spec, encoder in zip(bundle.family.text_encoders, bundle.text_encoders):
        if spec.open_clip_layout:
            out.update(clip_to_open_clip(encoder.state_dict(), spec.single_file_prefix))
        else:
            out.update(clip_to_ldm(encoder.state_dict(), encoder.config.max_position_embeddings, prefix=spec.single_file_prefix))
    return out


def prediction_markers(scheduler_config: dict, family: ModelFamily) -> dict[str, torch.Tensor]:
    """The empty marker tensors that flag v-prediction and zero terminal SNR in `family`'s files (SDXL:
    `v_pred`, `ztsnr`, as ComfyUI's checkpoint saver writes and its loader reads them)."""
    if not family.prediction_markers or scheduler_config.get("prediction_type") != "v_prediction":
        return {}
    v_pred, ztsnr = family.prediction_markers
    markers = {v_pred: torch.tensor([])}
    if scheduler_config.get("rescale_betas_zero_snr"):
        markers[ztsnr] = torch.tensor([])
    return markers


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
    """The whole bundle (UNet, VAE, text encoders, schedule) as one single-file state dict, unconverted dtypes.

    Args:
        bundle (`ModelBundle`): an SD1.5- or SDXL-family bundle; it is read, never modified.
    """
    state, family = {}, bundle.family
    state.update(unet_to_ldm(bundle.unet.state_dict(), dict(bundle.unet.config), family))
    state.update(vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config), family))
    state.update(text_encoders_to_ldm(bundle))
    if family.prediction_markers:
        # SDXL files carry no schedule buffers (the SGM code computes its schedule); only markers.
        state.update(prediction_markers(dict(bundle.noise_scheduler.config), family))
    else:
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


def tokenizer_meta_keys(index: int) -> tuple[str, str, str]:
    """Metadata keys (vocab, merges, added tokens) of the `index`-th tokenizer (0: SD1.5's names; 1: `tokenizer_2_*`)."""
    if index == 0:
        return META_VOCAB, META_MERGES, META_ADDED_TOKENS
    stem = f"{META_PREFIX}tokenizer_{index + 1}_"
    return stem + "vocab", stem + "merges", stem + "added_tokens"


def _tokenizer_metadata(tokenizer, index: int = 0) -> dict[str, str]:
    vocab_key, merges_key, added_key = tokenizer_meta_keys(index)
    vocab, merges = tokenizer_vocab_and_merges(tokenizer)
    meta = {}
    # Tokens added after the BPE vocabulary (placeholders) own rows of the embedding matrix: keep them.
    added = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if t.content not in vocab)
    if added:
        meta[added_key] = json.dumps(added, ensure_ascii=False)
    if len(vocab) <= MAX_EMBEDDED_VOCAB:
        meta[vocab_key] = json.dumps(vocab, ensure_ascii=False)
        meta[merges_key] = json.dumps(merges, ensure_ascii=False)
    return meta


def checkpoint_metadata(bundle: ModelBundle) -> dict[str, str]:
    """Safetensors metadata of a checkpoint written from `bundle`: configs, name, small tokenizers.

    Args:
        bundle (`ModelBundle`): the bundle being written.
    """
    meta = {"format": "pt", META_PREFIX + "family": bundle.family.name, META_PREFIX + "name": bundle.name}
    configs = {"unet": dict(bundle.unet.config), "vae": dict(bundle.vae.config)}
    for part, encoder in zip(bundle.family.text_encoder_parts, bundle.text_encoders):
        configs[part] = encoder.config.to_dict()
    configs["scheduler"] = dict(bundle.noise_scheduler.config)
    for part, config in configs.items():
        meta[META_CONFIG_KEYS[part]] = _config_json(config)
    for index, tokenizer in enumerate(bundle.tokenizers):
        meta.update(_tokenizer_metadata(tokenizer, index))
    return meta


def save_ldm_checkpoint(
    bundle: ModelBundle, path: str | os.PathLike, dtype: torch.dtype = torch.float16, overwrite: bool = False
) -> Path:
    """Write `bundle` as a single-file checkpoint in its family's original layout (`.safetensors`), atomically.

    The file loads in ComfyUI's checkpoint loader (for models of the real widths) and in `load_bundle`
    (any size: the diffusers configs are in the metadata).

    Args:
        bundle (`ModelBundle`): the model to write; it is not modified.
        path (`str`): output file, ending in `.safetensors`.
        dtype (`torch.dtype`): `torch.float16` (the usual distribution size) or `torch.float32` (lossless).
            The schedule buffers and markers stay float32 and `position_ids` int64.
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
