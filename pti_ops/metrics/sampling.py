"""Generating images from a bundle (+ a trained embedding, + a LoRA at a strength), for evaluation.

A short loop of our own rather than a diffusers pipeline, so it runs on a `ModelBundle` as it is
(our tokenizers with placeholders, `clip_skip`, peft adapters injected by `lora_file`): encode the
prompts into the family's `Conditioning`, classifier-free guidance, `scheduler.step`, VAE decode.
The scheduler is built from the bundle's training schedule, so its prediction type (ε or v) and
zero-terminal-SNR rescaling are the model's.

SDXL: the UNet also gets the pooled embedding and `add_time_ids` with original size = target size
= the sampled image's size and crop (0, 0), as diffusers' `StableDiffusionXLPipeline` does by
default. The negative prompt is encoded like any prompt, pooled vector included, also when it is
empty: what ComfyUI's CLIPTextEncode gives for an empty negative, and diffusers' pipeline for
`negative_prompt=""` (it zeroes the negative embeddings only when no negative prompt is given at
all and the model sets `force_zeros_for_empty_prompt`; ComfyUI zeroes only with ConditioningZeroOut). The starting noise of every image
is drawn from a CPU generator seeded with that image's seed alone, so an image depends on its
(prompt, seed) only — not on the batch it was computed in, nor on the device — and one seed starts
every prompt from the same noise, as ComfyUI's KSampler does, so prompts compare on equal terms.

LoRA strength is peft's per-layer scaling (`LoraLayer.set_scale`: `strength · alpha / rank`), so the
strength changes without copying weights; strength 0 gives the base model's outputs exactly.
"Base vs tuned" comparisons switch the adapters off in place (`adapters_disabled`), no UNet copy.
"""

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from peft.tuners.lora import LoraLayer
from PIL import Image, ImageDraw, ImageFont

from ..training.adapters import bundle_deltas, lora_layers
from ..models.bundle import ModelBundle
from ..errors import InvalidInputError
from ..files.lora_file import apply_kohya_lora
from ..placeholder import PlaceholderToken, add_placeholders
from ..training.recorder import StepCallback
from ..models.conditioning import Conditioning, add_time_ids
from ..training.text_conditioning import encode_conditioning

logger = logging.getLogger(__name__)

SamplerName = Literal["ddim", "euler"]
SAMPLERS: tuple[str, ...] = ("ddim", "euler")


@dataclass
class SamplingConfig:
    """How images are generated.

    Args:
        steps (`int`): denoising steps (more = cleaner images, proportionally slower).
        cfg_scale (`float`): classifier-free guidance; 1 uses the prompt's prediction alone (half the
            UNet work), higher follows the prompt more closely at the cost of variety.
        sampler (`str`): `ddim` (deterministic DDIM, eta 0) or `euler` (Euler discrete); both built
            from the bundle's training-schedule config.
        negative_prompt (`str`): the unconditional prompt of guidance (`""` as in the TI paper), encoded
            like any prompt (SDXL: pooled vector included; see the module docstring).
        batch_size (`int`): images denoised together; does not change any image.
        clip_skip (`int`, *optional*): 1 = last text-encoder layer, 2 = penultimate (as the model was
            trained); None = the family's default (SD1.5 1, SDXL 2).
        resolution (`int`, *optional*): image side in pixels (SDXL: also its size time ids); default the
            model's native size (the UNet's `sample_size` × the VAE factor).
    """

    steps: int = 30
    cfg_scale: float = 5.0
    sampler: SamplerName = "ddim"
    negative_prompt: str = ""
    batch_size: int = 4
    clip_skip: int | None = None
    resolution: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "clip_skip", "resolution"):
            value = getattr(self, name)
            if value is None and name in ("clip_skip", "resolution"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.sampler not in SAMPLERS:
            raise InvalidInputError(f"`sampler` must be one of {SAMPLERS}, got {self.sampler!r}.")
        if not self.cfg_scale >= 0:
            raise InvalidInputError(f"`cfg_scale` must be 0 or more, got {self.cfg_scale!r}.")


@dataclass
class SampleResult:
    """Generated images and what produced each.

    Args:
        images (`torch.Tensor`): float32 `[N, H, W, 3]` in [0, 1] on the CPU (ComfyUI IMAGE layout).
        items (`list[tuple[str, int]]`): `(prompt, seed)` of each image, prompt-major order.
    """

    images: torch.Tensor
    items: list[tuple[str, int]]


def build_scheduler(bundle: ModelBundle, sampler: SamplerName):
    """A fresh inference scheduler from the bundle's training-schedule config.

    Args:
        bundle (`ModelBundle`): its `noise_scheduler.config` gives betas and prediction type.
        sampler (`str`): `ddim` or `euler`.
    """
    config = bundle.noise_scheduler.config
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    elif sampler == "euler":
        return EulerDiscreteScheduler.from_config(config)
    else:
        raise InvalidInputError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")


def initial_noise(bundle: ModelBundle, seed: int, resolution: int | None = None) -> torch.Tensor:
    """Unit Gaussian starting latent `[1, C, h, w]` of one image, from a CPU generator seeded with `seed`.

    Args:
        bundle (`ModelBundle`): fixes latent channels and the pixels-per-latent factor.
        seed (`int`): the image's seed.
        resolution (`int`, *optional*): image side in pixels; default the model's native size.
    """
    side = _latent_side(bundle, resolution)
    generator = torch.Generator().manual_seed(int(seed))
    shape = (1, bundle.unet.config.in_channels, side, side)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def sampling_side(bundle: ModelBundle, resolution: int | None = None) -> int:
    """The side in pixels images are generated at: `resolution`, or the model's native size when None."""
    return resolution or bundle.unet.config.sample_size * bundle.vae_scale_factor


def _latent_side(bundle: ModelBundle, resolution: int | None) -> int:
    if resolution is None:
        return bundle.unet.config.sample_size
    factor = bundle.vae_scale_factor
    if resolution < factor or resolution % factor:
        raise InvalidInputError(f"`resolution` must be a positive multiple of {factor} pixels, got {resolution}.")
    return resolution // factor


@torch.no_grad()
def sample_images(
    bundle: ModelBundle,
    prompts: list[str],
    seeds: list[int],
    config: SamplingConfig | None = None,
    token: PlaceholderToken | None = None,
    on_step: StepCallback | None = None,
) -> SampleResult:
    """Generate one image per (prompt, seed), prompt-major, in batches.

    Args:
        bundle (`ModelBundle`): the model, with any embedding and LoRA already applied.
        prompts (`list[str]`): prompts as they are encoded (fill `{}` first with `fill_placeholder`).
        seeds (`list[int]`): one image per seed and prompt.
        config (`SamplingConfig`): steps, guidance, sampler, batch size.
        token (`PlaceholderToken`, *optional*): expands a multi-vector placeholder in the prompts.
        on_step (`callable`, *optional*): `on_step(done_batches, total_batches, {})`; may raise to stop.
    """
    config = config or SamplingConfig()
    if not prompts or not seeds:
        raise InvalidInputError("sampling needs at least one prompt and one seed.")
    items = [(prompt, int(seed)) for prompt in prompts for seed in seeds]
    starts = range(0, len(items), config.batch_size)
    images = []
    for done, start in enumerate(starts, 1):
        chunk = items[start : start + config.batch_size]
        texts = [token.expand(p) if token else p for p, _ in chunk]
        noise = torch.cat([initial_noise(bundle, seed, config.resolution) for _, seed in chunk])
        latents = denoise(bundle, texts, noise, config)
        images.append(decode_latents(bundle, latents))
        if on_step is not None:
            on_step(done, len(starts), {})
    return SampleResult(torch.cat(images), items)


@torch.no_grad()
def denoise(bundle: ModelBundle, prompts: list[str], noise: torch.Tensor, config: SamplingConfig,
            time_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Run the sampler from unit noise `[B, C, h, w]` to clean latents, one prompt per latent.

    Args:
        bundle (`ModelBundle`): the model.
        prompts (`list[str]`): `B` prompts, already expanded.
        noise (`torch.Tensor`): unit Gaussian latents from `initial_noise`.
        config (`SamplingConfig`): steps, guidance, sampler, negative prompt, clip skip.
        time_ids (`torch.Tensor`, *optional*): SDXL's `add_time_ids` `[B, 6]` or `[6]`; default
            `sampling_time_ids` of the latents' size. Families without time ids take none.
    """
    dtype = bundle.unet.dtype
    scheduler = build_scheduler(bundle, config.sampler)
    scheduler.set_timesteps(config.steps, device=bundle.device)
    if time_ids is None:
        time_ids = sampling_time_ids(bundle, noise.shape)
    cond = encode_conditioning(bundle, prompts, config.clip_skip).to(dtype=dtype)
    # At cfg 1 the guided prediction equals the conditional one: skip the unconditional pass.
    uncond = None
    if config.cfg_scale != 1.0:
        uncond = encode_conditioning(bundle, [config.negative_prompt] * len(prompts), config.clip_skip).to(dtype=dtype)
    # Euler starts at sigma_max, DDIM at 1: the scheduler says how far to scale unit noise.
    latents = noise.to(bundle.device, dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        prediction = _guided_prediction(bundle, model_input, t, cond, uncond, config.cfg_scale, time_ids)
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents


def sampling_time_ids(bundle: ModelBundle, latent_shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
    """SDXL's `add_time_ids` `[B, 6]` for images of this latent shape: original = target = the image's
    (height, width) in pixels, crop (0, 0); None for families without time ids (SD1.5).

    Args:
        bundle (`ModelBundle`): gives the family and the pixels per latent cell.
        latent_shape (`tuple`): `[B, C, h, w]`.
    """
    if not bundle.family.num_time_ids:
        return None
    batch, _, h, w = latent_shape
    size = (h * bundle.vae_scale_factor, w * bundle.vae_scale_factor)
    return add_time_ids(size, (0, 0), size, batch_size=batch, device=bundle.device)


def _guided_prediction(bundle, latents, t, cond: Conditioning, uncond: Conditioning | None, cfg_scale: float,
                       time_ids: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Classifier-free guidance: `uncond + cfg · (cond − uncond)`, both halves in one UNet call."""
    if uncond is None:
        return bundle.unet(latents, t, **cond.unet_kwargs(time_ids)).sample
    if time_ids is not None and time_ids.ndim == 2:
        time_ids = torch.cat([time_ids, time_ids])
    both = Conditioning.cat([uncond, cond])
    prediction = bundle.unet(torch.cat([latents, latents]), t, **both.unet_kwargs(time_ids)).sample
    pred_uncond, pred_cond = prediction.chunk(2)
    return pred_uncond + cfg_scale * (pred_cond - pred_uncond)


@torch.no_grad()
def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode scaled latents `[B, C, h, w]` to float32 images `[B, H, W, 3]` in [0, 1] on the CPU."""
    vae = bundle.vae
    shift = vae.config.get("shift_factor", None) or 0.0
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample  # (b, 3, H, W) in [-1, 1]
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def predict_noise(
    bundle: ModelBundle,
    prompts: list[str],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    clip_skip: int | None = None,
    token: PlaceholderToken | None = None,
) -> torch.Tensor:
    """The UNet's prediction (ε for epsilon models, v for v-prediction ones) for each noisy latent and its
    prompt, float32; SDXL's time ids are `sampling_time_ids` of the latents' size.

    Args:
        bundle (`ModelBundle`): the model as it is now (adapters on or off).
        prompts (`list[str]`): one prompt per latent.
        noisy_latents (`torch.Tensor`): `[B, C, h, w]` noised latents.
        timesteps (`torch.Tensor`): `[B]` training timesteps of the noise.
        clip_skip (`int`, *optional*): text-encoder layer, as in `SamplingConfig` (None: the family's).
        token (`PlaceholderToken`, *optional*): expands a multi-vector placeholder.
    """
    if len(prompts) != noisy_latents.shape[0]:
        raise InvalidInputError(f"{len(prompts)} prompt(s) for {noisy_latents.shape[0]} latent(s): give one prompt per latent.")
    texts = [token.expand(p) if token else p for p in prompts]
    cond = encode_conditioning(bundle, texts, clip_skip).to(dtype=bundle.unet.dtype)
    latents = noisy_latents.to(bundle.device, bundle.unet.dtype)
    time_ids = sampling_time_ids(bundle, latents.shape)
    return bundle.unet(latents, timesteps.to(bundle.device), **cond.unet_kwargs(time_ids)).sample.float()


# ---------------------------------------------------------------------------------------------
# Embedding and LoRA on a bundle; base vs tuned
# ---------------------------------------------------------------------------------------------


def apply_embedding(bundle: ModelBundle, vectors: torch.Tensor | dict[str, torch.Tensor], placeholder: str,
                    initializer: str = "character") -> PlaceholderToken:  # fmt: skip
    """Add a trained placeholder to the bundle's tokenizers and text encoders (in place).

    Args:
        bundle (`ModelBundle`): a bundle the caller may modify (load a fresh one to keep the base).
        vectors (`torch.Tensor` or `dict[str, torch.Tensor]`): `[num_vectors, dim]` trained rows of a
            one-encoder family (`EmbeddingFile.for_family`), or one set per embedding key
            (`EmbeddingFile.vectors_for`: SDXL's `clip_l` and `clip_g`).
        placeholder (`str`): the word prompts use for it, e.g. `tok1`.
        initializer (`str`): its class word, kept as the reference of distances and edit prompts.

    Returns the placeholder as the first tokenizer holds it (the same strings in every tokenizer).
    """
    keys = bundle.family.embedding_keys
    if isinstance(vectors, torch.Tensor):
        if len(keys) != 1:
            raise InvalidInputError(f"a {bundle.family.display_name} model needs one vector set per text encoder "
                                    f"({', '.join(keys)}): give them as a dict keyed so.")  # fmt: skip
        vectors = {keys[0]: vectors}
    missing = [key for key in keys if key not in vectors]
    if missing:
        raise InvalidInputError(f"embedding vectors for {sorted(vectors)} but this model's text encoders are {list(keys)} (missing {missing}).")
    rows = [vectors[key] for key in keys]
    return add_placeholders(bundle.tokenizers, bundle.text_encoders, placeholder, initializer, vectors=rows)[0]


def apply_lora(bundle: ModelBundle, kohya_dict: dict[str, torch.Tensor], strength: float = 1.0, adapter_name: str = "default") -> None:
    """Inject a kohya LoRA as peft adapters into the bundle's UNet and text encoder at `strength` (in place).

    The adapters are frozen (`requires_grad` off): this is for inference.

    Args:
        bundle (`ModelBundle`): a bundle the caller may modify.
        kohya_dict (`dict[str, Tensor]`): from `lora_file.load_lora`, or a LORA_MODEL of ComfyUI's stock nodes (any
            layout `files/lora_formats.py` reads); every key must match a module.
        strength (`float`): multiplier of the LoRA update (1 = as trained, 0 = base model).
        adapter_name (`str`): peft adapter name; must not exist yet.
    """
    # SDXL's `lora_te1_` / `lora_te2_` modules go to the encoders in family order.
    encoders = bundle.text_encoder if len(bundle.text_encoders) == 1 else list(bundle.text_encoders)
    apply_kohya_lora(bundle.unet, encoders, kohya_dict, adapter_name=adapter_name, strict=True, family=bundle.family)
    for layer in lora_layers(bundle):
        layer.requires_grad_(False)
    set_lora_strength(bundle, strength, adapter_name)


def set_lora_strength(bundle: ModelBundle, strength: float, adapter_name: str | None = None) -> None:
    """Set every LoRA layer's scaling to `strength · alpha / rank` (per layer, so mixed ranks stay right).

    Args:
        bundle (`ModelBundle`): a bundle with LoRA adapters.
        strength (`float`): 1 = as trained, 0 = off, negative = the opposite direction.
        adapter_name (`str`, *optional*): only this adapter; default every adapter.
    """
    layers = [m for m in lora_layers(bundle) if isinstance(m, LoraLayer)]
    deltas = bundle_deltas(bundle)  # full weight deltas follow the strength as ComfyUI's "diff" patches do
    if not layers and not deltas:
        raise InvalidInputError("the model has no LoRA adapter to set the strength of: apply a LoRA first.")
    for delta in deltas:
        delta.scale = float(strength)
    for layer in layers:
        for name in list(layer.scaling):
            if adapter_name is None or name == adapter_name:
                layer.set_scale(name, float(strength))


# ---------------------------------------------------------------------------------------------
# Image grid
# ---------------------------------------------------------------------------------------------

GRID_PAD = 2  # pixels between cells
LABEL_HEIGHT = 12  # pixels of a text band (PIL's default font is about 11 px high)
ROW_LABEL_MAX_WIDTH = 320  # pixels; longer row labels are cut with "..."


def image_grid(images, rows: int, cols: int, labels: list[str] | None = None,
               row_labels: list[str] | None = None, col_labels: list[str] | None = None) -> np.ndarray:
    """Tile images row by row into one float32 image `[H, W, 3]` in [0, 1] (white gaps).

    Args:
        images (`torch.Tensor` or `np.ndarray`): `[N, h, w, 3]` in [0, 1], `N <= rows · cols`.
        rows (`int`): grid rows.
        cols (`int`): grid columns.
        labels (`list[str]`, *optional*): one caption per image, drawn above it (cut to the cell width).
        row_labels (`list[str]`, *optional*): one caption per row, drawn left of it (e.g. the prompt).
        col_labels (`list[str]`, *optional*): one caption per column, drawn above it (e.g. the seed).
    """
    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InvalidInputError(f"images must be [N, H, W, 3], got shape {tuple(array.shape)}.")
    n, h, w, _ = array.shape
    if rows < 1 or cols < 1 or n > rows * cols:
        raise InvalidInputError(f"{n} image(s) do not fit a {rows} x {cols} grid.")
    for name, given, expected in (("labels", labels, n), ("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if given is not None and len(given) != expected:
            raise InvalidInputError(f"{len(given)} {name} for {expected} {'images' if name == 'labels' else name[:3] + 's'}: give one each.")
    font = ImageFont.load_default()
    band = LABEL_HEIGHT if labels else 0
    left = _row_label_width(font, row_labels)
    top = LABEL_HEIGHT if col_labels else 0
    cell_h, cell_w = h + band + GRID_PAD, w + GRID_PAD
    canvas = Image.new("RGB", (left + cols * cell_w + GRID_PAD, top + rows * cell_h + GRID_PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x, y = left + GRID_PAD + (i % cols) * cell_w, top + GRID_PAD + (i // cols) * cell_h
        canvas.paste(Image.fromarray((np.clip(array[i], 0, 1) * 255 + 0.5).astype(np.uint8)), (x, y + band))
        if labels:
            draw.text((x, y), _fit_text(draw, font, labels[i], w), fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels or []):
        y = top + GRID_PAD + r * cell_h + band + max(0, (h - LABEL_HEIGHT) // 2)
        draw.text((GRID_PAD, y), _fit_text(draw, font, text, left - 2 * GRID_PAD), fill=(0, 0, 0), font=font)
    for c, text in enumerate(col_labels or []):
        draw.text((left + GRID_PAD + c * cell_w, 0), _fit_text(draw, font, text, w), fill=(0, 0, 0), font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _row_label_width(font, row_labels: list[str] | None) -> int:
    if not row_labels:
        return 0
    widest = max(font.getlength(text) for text in row_labels)
    return int(min(widest, ROW_LABEL_MAX_WIDTH)) + 2 * GRID_PAD


def _fit_text(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text` shortened with "..." until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""
