"""The model bundle: tokenizer(s), text encoder(s), UNet, VAE and noise scheduler of one model family.

`loaders.load_bundle(source)` builds one; this module holds only the object itself.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import InvalidInputError
from .families import DEFAULT_FAMILY, get_family
from .family import ModelFamily

logger = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """The parts of a text-to-image latent diffusion model that pivotal tuning touches.

    Args:
        tokenizer (`CLIPTokenizer`): turns prompts into token ids; placeholders are added to it.
        text_encoder (`CLIPTextModel`): encodes token ids into the per-token conditioning.
        unet (`UNet2DConditionModel`): the denoiser, tuned with LoRA.
        vae (`AutoencoderKL`): encodes training images to latents (once per run), decodes samples.
        noise_scheduler (`DDPMScheduler`): the training noise schedule and prediction type.
        family (`ModelFamily`): what differs per model family; a family name is looked up; SD1.5
            (`DEFAULT_FAMILY`) when not given.
        name (`str`): base model name, recorded in the metadata of the files we write.
        source (`str`): where the weights came from (`tiny`, a path, `comfyui`).
        tokenizer_2 (`CLIPTokenizer`, *optional*): SDXL's second tokenizer (bigG's; pads with `!`).
        text_encoder_2 (`CLIPTextModelWithProjection`, *optional*): SDXL's OpenCLIP bigG encoder, whose
            projected EOS state is the pooled embedding. Both None for SD1.5.

    Family-agnostic code reads the encoders through `tokenizers`, `text_encoders` and
    `embedding_dims`, in the family's order (that of `family.embedding_keys`).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    family: ModelFamily = DEFAULT_FAMILY
    name: str = "unknown"
    source: str = field(default="", repr=False)
    tokenizer_2: CLIPTokenizer | None = field(default=None, kw_only=True, repr=False)
    text_encoder_2: CLIPTextModelWithProjection | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self):
        self.family = get_family(self.family)
        given = 1 + (self.text_encoder_2 is not None)
        if given != len(self.family.text_encoders) or (self.tokenizer_2 is None) != (self.text_encoder_2 is None):
            raise InvalidInputError(
                f"{self.family.display_name} models have {len(self.family.text_encoders)} tokenizer/text-encoder "
                f"pair(s); got text_encoder_2={type(self.text_encoder_2).__name__}, tokenizer_2={type(self.tokenizer_2).__name__}."
            )
        for spec, tokenizer, encoder in zip(self.family.text_encoders, self.tokenizers, self.text_encoders):
            if spec.with_projection:
                _pool_at_first_end_token(tokenizer, encoder)

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """The tokenizers in family order (SD1.5: `(tokenizer,)`; SDXL: `(tokenizer, tokenizer_2)`)."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The text encoders in family order (SD1.5: `(text_encoder,)`; SDXL: `(text_encoder, text_encoder_2)`)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        """Every torch module of the bundle: the text encoders, the UNet, the VAE."""
        return (*self.text_encoders, self.unet, self.vae)

    @property
    def device(self) -> torch.device:
        # The first parameter's device: diffusers' `ModelMixin.device` walks every module (for its
        # offloading hooks), which cost ~5 % of a small training step when called each step.
        return next(self.unet.parameters()).device

    @property
    def embedding_dim(self) -> int:
        """Width of a token embedding row of the first text encoder (768 for SD1.5 and SDXL's CLIP-L)."""
        return self.text_encoder.get_input_embeddings().weight.shape[1]

    @property
    def embedding_dims(self) -> dict[str, int]:
        """Token-embedding width per embedding-file key, in family order (SDXL: `{"clip_l": 768, "clip_g": 1280}`)."""
        keys = self.family.embedding_keys
        return {key: encoder.get_input_embeddings().weight.shape[1] for key, encoder in zip(keys, self.text_encoders)}

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Training and sampling sides must be multiples of this (64 for SD1.5): VAE factor × UNet downsamplings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_resolution(self, resolution: int) -> None:
        """Raise unless `resolution` is a side this model can train and sample at."""
        multiple = self.resolution_multiple
        if resolution % multiple:
            nearest = max(multiple, round(resolution / multiple) * multiple)
            raise InvalidInputError(
                f"`resolution` {resolution} is not a multiple of {multiple}, which this model needs (its VAE and "
                f"UNet downsample by that factor): use {nearest}."
            )

    def to(self, device: str | torch.device) -> "ModelBundle":
        """Move every module to `device` (in place) and return the bundle."""
        for module in self.modules:
            module.to(device)
        return self

    def freeze(self) -> None:
        """Turn gradients off for every weight; trainers then enable only what they train."""
        for module in self.modules:
            module.requires_grad_(False)
            module.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Save as a diffusers Stable Diffusion (XL) folder (loadable by `load_bundle` and diffusers)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.text_encoder_2 is not None:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.noise_scheduler,
            )
            pipe.save_pretrained(folder, safe_serialization=True)
            return Path(folder)
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        return Path(folder)


def _pool_at_first_end_token(tokenizer: CLIPTokenizer, text_encoder: torch.nn.Module) -> None:
    """Make the pooled embedding come from the first end token, as ComfyUI pools, whatever ids were added.

    Released CLIP configs keep transformers' legacy `eos_token_id` 2, with which transformers pools at
    the highest token id: a placeholder added to the tokenizer (id > 49407) would become the pooled
    token. With the tokenizer's real end-token id it pools at the first end token instead; prompts
    without added tokens pool at the same position either way.
    """
    eos = tokenizer.eos_token_id
    if eos is None or text_encoder.config.eos_token_id == eos:
        return
    text_encoder.config.eos_token_id = eos
    for module in text_encoder.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = eos
