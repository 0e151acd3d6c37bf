"""The bridge: ComfyUI's MODEL / CLIP / VAE and value types ⇄ the core's objects.

The only module of the pack that reads or builds ComfyUI objects. Everything else in `nodes/`
builds a config, calls this module and one core function.

ComfyUI → core: the weights ComfyUI holds (with every patch already on its ModelPatcher applied,
e.g. an upstream LoraLoader) are renamed to the LDM single-file layout and converted with
diffusers' own LDM → diffusers functions (`pti_ops.models.single_file.bundle_from_ldm_state`). The
diffusers configs are derived from what ComfyUI detected (`model_config.unet_config`) and from
tensor shapes, so UNets and VAEs of non-standard sizes work too. The tokenizer is the one ComfyUI
ships for SD1.x (`comfy/sd1_tokenizer/`).

Core → ComfyUI: a kohya LoRA dict is applied with ComfyUI's own `comfy.sd.load_lora_for_models`
(which clones the patchers, never mutating its inputs), after checking that ComfyUI maps every
key (ComfyUI itself only logs "lora key not loaded"). Embeddings reach CLIP through the file
written to ComfyUI's embeddings folder (`embedding:NAME` in a prompt).
"""

import gc
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

import comfy.lora
import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import comfy.utils
import folder_paths

from ..pti_ops.models import ModelBundle
from ..pti_ops.errors import InvalidInputError, ModelLoadError
from ..pti_ops.models import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from ..pti_ops.files import group_kohya_modules
from ..pti_ops.models import tokenizer_from_folder, bundle_from_ldm_state, check_sd15_layout, load_configs, text_encoder_from_ldm_state

logger = logging.getLogger(__name__)

# What error messages call the converted models (`Path(...).name` in the core's messages).
CONNECTED = Path("the connected MODEL, CLIP and VAE")
# ComfyUI's SD1.x text encoder lives under this prefix in `clip.cond_stage_model`.
COMFY_CLIP_PREFIX = "clip_l."
# CLIP's attention heads are 64 wide (CLIP-L: 768 / 12); used when the module does not say.
CLIP_HEAD_WIDTH = 64
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


# ---------------------------------------------------------------------------------------------
# ComfyUI → core
# ---------------------------------------------------------------------------------------------


def bundle_from_comfy(model, clip, vae) -> ModelBundle:
    """A trainable float32 `ModelBundle` from ComfyUI's MODEL, CLIP and VAE (which are not modified).

    ComfyUI's own copies are unloaded from the accelerator first, so that only one copy of each
    model sits in its memory while training.

    Args:
        model (`ModelPatcher`): ComfyUI's MODEL (an SD1.x UNet).
        clip (`comfy.sd.CLIP`): ComfyUI's CLIP of the same checkpoint.
        vae (`comfy.sd.VAE`): ComfyUI's VAE.
    """
    _check_inputs(model, clip, vae)
    free_accelerator_memory()
    unet_state = effective_weights(model, "diffusion_model.")
    clip_state = effective_weights(clip.patcher, COMFY_CLIP_PREFIX)
    vae_state = effective_weights(vae.patcher, "")
    state = ldm_state_dict(unet_state, clip_state, vae_state)
    check_sd15_layout(state, CONNECTED)
    text_config = text_encoder_config(clip_state, _clip_heads(clip))
    configs = {
        "unet": diffusers_unet_config(model.model.model_config.unet_config),
        "vae": diffusers_vae_config(vae_state, _latent_scale(model)),
        "text_encoder": text_config,
        "scheduler": scheduler_config(model),
    }
    tokenizer = comfy_tokenizer(text_config["max_position_embeddings"])
    name = f"comfyui-{type(model.model.model_config).__name__}"
    bundle = bundle_from_ldm_state(state, configs, tokenizer, name=name, source="comfyui", where=CONNECTED)
    del state, unet_state, clip_state, vae_state
    bundle.freeze()
    return bundle.to(comfy.model_management.get_torch_device())


def text_encoder_from_comfy(clip):
    """`(tokenizer, text_encoder)`, float32 on the CPU, from ComfyUI's CLIP (which is not modified)."""
    _check_clip(clip)
    clip_state = effective_weights(clip.patcher, COMFY_CLIP_PREFIX)
    text_config = text_encoder_config(clip_state, _clip_heads(clip))
    tokenizer = comfy_tokenizer(text_config["max_position_embeddings"])
    encoder = text_encoder_from_ldm_state(ldm_state_dict({}, clip_state, {}), text_config, Path("the connected CLIP"))
    return tokenizer, encoder.requires_grad_(False)


def clip_skip(clip) -> int:
    """The text-encoder layer ComfyUI's CLIP uses, as `clip_skip` (1 = last; CLIPSetLastLayer -2 → 2)."""
    layer_idx = getattr(clip, "layer_idx", None)
    return 1 if layer_idx is None or layer_idx >= 0 else -int(layer_idx)


def effective_weights(patcher, prefix: str) -> dict[str, torch.Tensor]:
    """The patcher's float32 CPU weights under `prefix`, with its patches (e.g. LoRAs) applied.

    Reads the original weights (ComfyUI keeps them aside while a patched copy is loaded) and
    applies the patches with ComfyUI's own `comfy.lora.calculate_weight`, so the result does not
    depend on which clone of the model is loaded at the moment.
    """
    out = {}
    for key, (base, *patches) in patcher.get_key_patches(prefix).items():
        weight, convert = base
        if not weight.is_floating_point():
            out[key] = weight.to("cpu", copy=True)
            continue
        value = convert(weight.to("cpu", torch.float32, copy=True), inplace=True)
        if patches:
            value = comfy.lora.calculate_weight(patches, value, key)
        out[key] = value.float()
    return out


def ldm_state_dict(unet: dict, clip: dict, vae: dict) -> dict[str, torch.Tensor]:
    """Rename ComfyUI's state dicts to the LDM single-file layout (`model.diffusion_model.*`, …).

    Args:
        unet (`dict`): `diffusion_model.*` keys of `model.model`.
        clip (`dict`): `clip_l.*` keys of `clip.cond_stage_model` (the logit scale is dropped).
        vae (`dict`): keys of `vae.first_stage_model`.
    """
    state = {UNET_PREFIX + key.removeprefix("diffusion_model."): value for key, value in unet.items()}
    transformer = COMFY_CLIP_PREFIX + "transformer."
    state.update({CLIP_PREFIX + key[len(transformer) :]: value for key, value in clip.items() if key.startswith(transformer)})
    state.update({VAE_PREFIX + key: value for key, value in vae.items()})
    return state


def diffusers_unet_config(unet_config: dict) -> dict:
    """diffusers `UNet2DConditionModel` config from ComfyUI's detected LDM UNet config.

    ComfyUI describes the UNet as LDM's `openaimodel` does: `model_channels` × `channel_mult` per
    level, `num_res_blocks` per level, `transformer_depth` per input res block (0 = no attention),
    `transformer_depth_output` per output block *from the last one back* (`openaimodel` pops it from
    the end while building the output blocks), `num_heads` or `num_head_channels`.

    Args:
        unet_config (`dict`): `model.model.model_config.unet_config`.
    """
    c = unet_config
    if c.get("adm_in_channels") or c.get("use_temporal_attention") or c.get("use_temporal_resblock"):
        raise ModelLoadError(
            "the connected MODEL is not an SD1.x model (it has added conditioning or temporal layers, "
            "as SDXL and video models do): only SD1.5-family models are supported for now."
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
    config = load_configs({})["unet"]
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


def diffusers_vae_config(state: dict[str, torch.Tensor], scaling_factor: float) -> dict:
    """diffusers `AutoencoderKL` config from the shapes of an LDM VAE state dict (no prefix).

    Args:
        state (`dict`): `vae.first_stage_model.state_dict()` (keys `encoder.down.0.block.0…`).
        scaling_factor (`float`): the latent scale of the model family (0.18215 for SD1.x).
    """
    levels = _count_indices(state, "encoder.down.")
    blocks = _count_indices(state, "encoder.down.0.block.")
    if levels == 0 or blocks == 0 or "encoder.conv_in.weight" not in state:
        raise ModelLoadError("the connected VAE is not an SD-style AutoencoderKL (no `encoder.down.N.block.M` weights).")
    config = load_configs({})["vae"]
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


def text_encoder_config(clip_state: dict[str, torch.Tensor], heads: int | None) -> dict:
    """transformers `CLIPTextConfig` dict from the shapes of ComfyUI's `clip_l.*` state dict."""
    prefix = COMFY_CLIP_PREFIX + "transformer.text_model."
    tokens = clip_state[prefix + "embeddings.token_embedding.weight"]
    positions = clip_state[prefix + "embeddings.position_embedding.weight"]
    width = tokens.shape[1]
    config = load_configs({})["text_encoder"]
    config.update(
        vocab_size=tokens.shape[0],
        hidden_size=width,
        projection_dim=width,
        max_position_embeddings=positions.shape[0],
        num_hidden_layers=_count_indices(clip_state, prefix + "encoder.layers."),
        intermediate_size=clip_state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=heads or max(1, width // CLIP_HEAD_WIDTH),
    )
    return config


def scheduler_config(model) -> dict:
    """The SD1.x DDPM training schedule with the MODEL's prediction type (epsilon or v)."""
    kind = getattr(getattr(model.model, "model_type", None), "name", "EPS")
    if kind not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"the connected MODEL predicts `{kind}`; training supports epsilon and v-prediction SD1.x models."
        )
    config = load_configs({})["scheduler"]
    config["prediction_type"] = PREDICTION_TYPES[kind]
    return config


def comfy_tokenizer(model_max_length: int = 77):
    """CLIP's tokenizer from the vocab.json / merges.txt that ComfyUI ships in `comfy/sd1_tokenizer/`."""
    return tokenizer_from_folder(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer", model_max_length)


def _clip_heads(clip) -> int | None:
    try:
        return int(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].self_attn.heads)
    except (AttributeError, IndexError, TypeError):
        return None


def _latent_scale(model) -> float:
    return float(getattr(getattr(model.model, "latent_format", None), "scale_factor", 0.18215))


def _check_inputs(model, clip, vae) -> None:
    for name, value, attr in (("model", model, "model"), ("vae", vae, "first_stage_model")):
        if value is None or not hasattr(value, attr):
            raise InvalidInputError(
                f"{name} input is invalid: {value!r}. Connect the {name.upper()} output of a checkpoint loader."
            )
    _check_clip(clip)


def _check_clip(clip) -> None:
    if clip is None or not hasattr(clip, "cond_stage_model"):
        raise InvalidInputError(
            f"clip input is invalid: {clip!r}. If the clip is from a checkpoint loader node your checkpoint "
            "does not contain a valid clip or text encoder model."
        )
    if not hasattr(clip.cond_stage_model, COMFY_CLIP_PREFIX.rstrip(".")) or hasattr(clip.cond_stage_model, "clip_g"):
        raise ModelLoadError(
            "the connected CLIP is not an SD1.x text encoder (CLIP-L alone): only SD1.5-family models are "
            "supported for now."
        )


def free_accelerator_memory() -> None:
    """Unload ComfyUI's models from the accelerator and release cached blocks."""
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def release() -> None:
    """Collect what the caller just dropped (a bundle, its optimiser) and release the accelerator's cache."""
    gc.collect()
    comfy.model_management.soft_empty_cache()


# ---------------------------------------------------------------------------------------------
# core → ComfyUI
# ---------------------------------------------------------------------------------------------


def apply_lora(model, clip, lora: dict[str, torch.Tensor], strength_model: float = 1.0, strength_clip: float = 1.0):
    """`(model, clip)` clones with the kohya LoRA applied by ComfyUI; the inputs are not modified.

    Every LoRA module must be one ComfyUI maps to a weight of these models, otherwise
    `InvalidInputError` names the first ones (ComfyUI itself would only log "lora key not loaded").
    """
    missing = unmapped_lora_modules(model, clip, lora)
    if missing:
        raise InvalidInputError(
            f"ComfyUI would not load {len(missing)} module(s) of the trained LoRA, e.g. {', '.join(missing[:3])}: "
            "the connected MODEL/CLIP do not match the trained model."
        )
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


def unmapped_lora_modules(model, clip, lora: dict[str, torch.Tensor]) -> list[str]:
    """The kohya module prefixes of `lora` that ComfyUI's key maps for `model` / `clip` lack."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    modules = group_kohya_modules(lora, "trained LoRA")
    return sorted(prefix for prefix in modules if prefix not in key_map)


def torch_device() -> torch.device:
    """The device ComfyUI computes on (where the scorers of the evaluation nodes go)."""
    return comfy.model_management.get_torch_device()


def image_from_array(array: np.ndarray) -> torch.Tensor:
    """ComfyUI IMAGE `[1, H, W, 3]` float32 in [0, 1] from one `[H, W, 3]` array."""
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"a plot must be [H, W, 3], got {tuple(image.shape)}")
    return image.clamp(0, 1)[None]


def images_from_arrays(arrays: list[np.ndarray]) -> torch.Tensor:
    """One ComfyUI IMAGE batch `[N, H, W, 3]` from `[H, W, 3]` arrays of different sizes.

    An IMAGE batch has one size: smaller arrays are padded with white at the right and bottom.
    """
    if not arrays:
        raise ValueError("no image to return")
    images = [image_from_array(array)[0] for array in arrays]
    height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    batch = torch.ones(len(images), height, width, 3)
    for index, image in enumerate(images):
        batch[index, : image.shape[0], : image.shape[1]] = image
    return batch


def loss_map(history: list[dict], key: str = "loss") -> dict[str, list[float]]:
    """ComfyUI's LOSS_MAP (`{"loss": [float, ...]}`, as stock LossGraph reads) from a core history."""
    return {"loss": [float(record[key]) for record in history if key in record]}


def progress(total: int):
    """An `on_step(step, total, logs)` callback reporting to ComfyUI's progress bar.

    ComfyUI's Cancel reaches training here: the progress hook (and the explicit check) raise
    ComfyUI's interrupt exception inside the loop, which stops it within one step.
    """
    bar = comfy.utils.ProgressBar(total)

    def on_step(step: int, steps: int, logs: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, steps)

    return on_step


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def embeddings_folder() -> Path:
    """ComfyUI's first embeddings folder, where `embedding:NAME` finds a file written in this run."""
    return Path(folder_paths.get_folder_paths("embeddings")[0])


def loras_folder() -> Path:
    """ComfyUI's first loras folder (LoraLoader lists it after a refresh)."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def output_directory() -> Path:
    """ComfyUI's output folder (where SaveImage writes)."""
    return Path(folder_paths.get_output_directory())


def resolve_clip_folder(path: str) -> Path:
    """A CLIP model folder: an absolute path as given, or a path inside one of ComfyUI's `clip_vision` folders.

    A relative path that exists in none of them resolves inside the first (for the error message).
    """
    candidate = Path(os.path.expanduser(path.strip()))
    if candidate.is_absolute():
        return candidate
    roots = [Path(root) for root in folder_paths.get_folder_paths("clip_vision")]
    return next((root / candidate for root in roots if (root / candidate).exists()), roots[0] / candidate)


def resolve_input_path(path: str) -> Path:
    """An absolute path as given, or a path relative to ComfyUI's input folder."""
    candidate = Path(os.path.expanduser(path.strip()))
    if candidate.is_absolute():
        return candidate
    return Path(folder_paths.get_input_directory()) / candidate


def stat_folder(folder: Path) -> str:
    """A cheap digest of a model folder (names, sizes, modification times; no content read), for `IS_CHANGED`."""
    if not folder.is_dir():
        return f"missing:{folder}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode("utf-8"))
    return digest.hexdigest()


def hash_files(paths: list[Path]) -> str:
    """A digest of the names and contents of `paths` (for `IS_CHANGED`)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode("utf-8") + b"\0")
        try:
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()
