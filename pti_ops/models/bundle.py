"""The model bundle: tokenizer, text encoder, UNet, VAE and noise scheduler of one model family.

`loaders.load_bundle(source)` builds one; this module holds only the object itself.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

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
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    family: ModelFamily = DEFAULT_FAMILY
    name: str = "unknown"
    source: str = field(default="", repr=False)

    def __post_init__(self):
        self.family = get_family(self.family)

    @property
    def device(self) -> torch.device:
        # The first parameter's device: diffusers' `ModelMixin.device` walks every module (for its
        # offloading hooks), which cost ~5 % of a small training step when called each step.
        return next(self.unet.parameters()).device

    @property
    def embedding_dim(self) -> int:
        """Width of a token embedding row (768 for SD1.5)."""
        return self.text_encoder.get_input_embeddings().weight.shape[1]

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
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device)
        return self

    def freeze(self) -> None:
        """Turn gradients off for every weight; trainers then enable only what they train."""
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Save as a diffusers Stable Diffusion folder (loadable by `load_bundle` and diffusers)."""
        from diffusers import StableDiffusionPipeline

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
