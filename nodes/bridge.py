"""The bridge: ComfyUI's MODEL / CLIP / VAE and value types ⇄ the core's objects.

The only module of the pack that reads or builds ComfyUI objects. Everything else in `nodes/`
builds a config, calls this module and one core function.

ComfyUI → core: this module reads the weights ComfyUI holds (with every patch already on its
ModelPatcher applied, e.g. an upstream LoraLoader) and the settings ComfyUI detected, and hands
them as plain values to `pti_ops.models.bundle_from_comfy_models`, which renames and converts them
(`pti_ops/models/comfy_layout.py`, no ComfyUI import).

Core → ComfyUI: a kohya LoRA dict is applied with ComfyUI's own `comfy.sd.load_lora_for_models`
(which clones the patchers, never mutating its inputs), after checking that ComfyUI maps every
key (ComfyUI itself only logs "lora key not loaded"). Embeddings reach CLIP through the file
written to ComfyUI's embeddings folder (`embedding:NAME` in a prompt).
"""

import copy
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

from ..pti_ops.errors import InvalidInputError
from ..pti_ops.files import group_kohya_modules, is_kohya_key
from ..pti_ops.models import (
    COMFY_TEXT_ENCODER_NAMES,
    ComfyModels,
    ModelBundle,
    ModelFamily,
    bundle_from_comfy_models,
    comfy_family,
    text_encoders_from_comfy_state,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# ComfyUI → core
# ---------------------------------------------------------------------------------------------


def bundle_from_comfy(model, clip, vae) -> ModelBundle:
    """A trainable float32 `ModelBundle` from ComfyUI's MODEL, CLIP and VAE (which are not modified).

    ComfyUI's own copies are unloaded from the accelerator first, so that only one copy of each
    model sits in its memory while training.

    Args:
        model (`ModelPatcher`): ComfyUI's MODEL (an SD1.x or SDXL-family UNet; its sampling, an upstream
            ModelSamplingDiscrete's included, sets the prediction type and zero terminal SNR).
        clip (`comfy.sd.CLIP`): ComfyUI's CLIP of the same checkpoint (its text encoders give the family).
        vae (`comfy.sd.VAE`): ComfyUI's VAE.
    """
    _check_inputs(model, clip, vae)
    family = _clip_family(clip)
    prediction, zero_terminal_snr = sampling_settings(model)
    free_accelerator_memory()
    models = ComfyModels(
        family=family,
        unet=effective_weights(model, "diffusion_model."),
        clip=_clip_weights(clip, family),
        vae=effective_weights(vae.patcher, ""),
        unet_config=model.model.model_config.unet_config,
        model_type=prediction,
        latent_scale=_latent_scale(model),
        clip_heads=_clip_heads(clip, family),
        tokenizer_root=_tokenizer_root(),
        name=f"comfyui-{type(model.model.model_config).__name__}",
        zero_terminal_snr=zero_terminal_snr,
    )
    bundle = bundle_from_comfy_models(models)
    del models
    bundle.freeze()
    return bundle.to(comfy.model_management.get_torch_device())


def text_encoders_from_comfy(clip):
    """`(family, tokenizers, text_encoders)` of ComfyUI's CLIP in family order, float32 on the CPU (not modified):
    SD1.5's CLIP-L; SDXL's CLIP-L and bigG (with its projection)."""
    _check_clip(clip)
    family = _clip_family(clip)
    tokenizers, encoders = text_encoders_from_comfy_state(family, _clip_weights(clip, family), _clip_heads(clip, family),
                                                          _tokenizer_root())  # fmt: skip
    return family, tokenizers, tuple(encoder.requires_grad_(False) for encoder in encoders)


def clip_skip(clip) -> int:
    """The text-encoder layer ComfyUI's CLIP uses, as `clip_skip` (CLIPSetLastLayer -n → n; 1 = last).

    Without CLIPSetLastLayer, the family's own layer (SD1.5: the last; SDXL: the penultimate, as ComfyUI's
    SDXL text encoders default to).
    """
    layer_idx = getattr(clip, "layer_idx", None)
    if layer_idx is None:
        return _clip_family(clip).default_clip_skip
    return 1 if layer_idx >= 0 else -int(layer_idx)


def sampling_settings(model) -> tuple[str, bool]:
    """`(prediction type, zsnr)` of the MODEL's sampling as ComfyUI samples it (`EPS`, `V_PREDICTION`, …).

    Read from the patcher's `model_sampling` object, so an upstream ModelSamplingDiscrete (an object patch)
    counts, not only the checkpoint's own `model_type`. The prediction type is the class of
    comfy/model_sampling.py that defines `calculate_denoised` first in its MRO (V_PREDICTION before EPS).
    """
    getter = getattr(model, "get_model_object", None)
    sampling = getter("model_sampling") if getter is not None else model.model.model_sampling
    classes = type(sampling).__mro__
    if not any(cls.__name__ == "ModelSamplingDiscrete" for cls in classes):
        raise InvalidInputError(
            f"the connected MODEL samples with {type(sampling).__name__}, not a discrete DDPM schedule: training "
            "supports ComfyUI's ModelSamplingDiscrete (eps or v_prediction, zsnr on or off) only."
        )
    prediction = next((cls.__name__ for cls in classes if "calculate_denoised" in vars(cls)), "EPS")
    return prediction, bool(getattr(sampling, "zsnr", False))


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


def _clip_weights(clip, family: ModelFamily) -> dict[str, torch.Tensor]:
    weights = {}
    for encoder in family.text_encoders:
        weights.update(effective_weights(clip.patcher, encoder.comfy_prefix))
    return weights


def _tokenizer_root() -> Path:
    """The folder of ComfyUI's `comfy/sd1_clip.py`, beside which it ships its tokenizers."""
    return Path(comfy.sd1_clip.__file__).parent


def _clip_family(clip) -> ModelFamily:
    """The model family of ComfyUI's CLIP, from the text encoders it has."""
    return comfy_family(name for name in COMFY_TEXT_ENCODER_NAMES if hasattr(clip.cond_stage_model, name))


def _clip_heads(clip, family: ModelFamily) -> tuple[int | None, ...]:
    """Attention heads of each text encoder (None where ComfyUI's module does not say)."""
    heads = []
    for spec in family.text_encoders:
        try:
            encoder = getattr(clip.cond_stage_model, spec.name)
            heads.append(int(encoder.transformer.text_model.encoder.layers[0].self_attn.heads))
        except (AttributeError, IndexError, TypeError):
            heads.append(None)
    return tuple(heads)


def _latent_scale(model) -> float | None:
    scale = getattr(getattr(model.model, "latent_format", None), "scale_factor", None)
    return None if scale is None else float(scale)


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


def apply_lora_file(model, clip, lora: dict[str, torch.Tensor], strength_model: float, strength_clip: float):
    """`(model, clip)` clones with a LoRA file's weights applied by ComfyUI.

    A kohya file is checked key by key first (`apply_lora`); other layouts go to ComfyUI's loader as they are, as
    stock LoraLoader would load them.
    """
    if all(is_kohya_key(key) for key in lora):
        return apply_lora(model, clip, lora, strength_model, strength_clip)
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


def clip_with_embedding_folder(clip, folder: Path):
    """A clone of `clip` whose tokenizers look for `embedding:NAME` in `folder` before ComfyUI's embeddings folders.

    ComfyUI's CLIP clones share one tokenizer object; this clone gets shallow copies of it and of each of its text
    encoders' tokenizers (those with an `embedding_directory`), so no other CLIP sees the folder.
    """
    out = clip.clone()
    tokenizer = copy.copy(clip.tokenizer)
    changed = False
    for name, part in list(vars(tokenizer).items()):
        if not hasattr(part, "embedding_directory"):
            continue
        part = copy.copy(part)
        before = part.embedding_directory
        before = [before] if isinstance(before, str) else list(before or [])
        part.embedding_directory = [str(folder), *before]
        setattr(tokenizer, name, part)
        changed = True
    if not changed:
        raise InvalidInputError("this CLIP's tokenizer reads no embeddings (no embedding folder): connect an SD1.5 or SDXL CLIP.")
    out.tokenizer = tokenizer
    return out


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
        preview = logs.get("preview")  # a training preview grid: shown as the sampler nodes show theirs
        bar.update_absolute(step, steps, None if preview is None else ("JPEG", _pil_image(preview), PREVIEW_MAX_SIDE))

    return on_step


# The longest side of a preview sent to the browser, as ComfyUI's latent previews are sized.
PREVIEW_MAX_SIDE = 512


def _pil_image(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy())


def show_text(node_id, text: str) -> None:
    """Show `text` on the node in ComfyUI's window (the progress text its frontend draws under the node).

    ComfyUI's `PromptServer.send_progress_text` (0.3.4x and later); without a server or that method, nothing.
    """
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    send = getattr(getattr(PromptServer, "instance", None), "send_progress_text", None)
    if send is not None:
        send(text, str(node_id))


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


def lora_file_names() -> list[str]:
    """The LoRA files ComfyUI lists (LoraLoader's choices)."""
    return folder_paths.get_filename_list("loras")


def lora_file_path(name: str) -> Path:
    """The path of a LoRA file listed by `lora_file_names`."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise InvalidInputError(f"`lora_name` {name!r} is not in ComfyUI's loras folders: refresh the node list.")
    return Path(path)


def temp_directory() -> Path:
    """ComfyUI's temporary folder (emptied when ComfyUI starts)."""
    return Path(folder_paths.get_temp_directory())


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
