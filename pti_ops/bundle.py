"""The model bundle: tokenizer, text encoder, UNet, VAE and noise scheduler of one model family.

`load_bundle(source)` builds one from
- `"tiny"`: a tiny random SD1.5-shaped model built from configs in code (tests, smoke runs);
- `"toy"`: the small trained model of the toy world shipped in `pti_ops/toyworld/model/`;
- a diffusers folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`);
- a single-file SD1.5 LDM checkpoint (`.safetensors`), converted with diffusers' own functions
  and the configs shipped in this package (see `single_file.py`).
Nothing is ever downloaded: a missing file is an error that names it.
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from .errors import InvalidInputError, MissingModelFileError, ModelLoadError

logger = logging.getLogger(__name__)

ModelFamily = Literal["sd15"]
MODEL_FAMILIES: tuple[str, ...] = ("sd15",)

# Sub-folders of a diffusers Stable Diffusion folder that training needs.
DIFFUSERS_SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass
class ModelBundle:
    """The parts of a text-to-image latent diffusion model that pivotal tuning touches.

    Args:
        tokenizer (`CLIPTokenizer`): turns prompts into token ids; placeholders are added to it.
        text_encoder (`CLIPTextModel`): encodes token ids into the per-token conditioning.
        unet (`UNet2DConditionModel`): the denoiser, tuned with LoRA.
        vae (`AutoencoderKL`): encodes training images to latents (once per run), decodes samples.
        noise_scheduler (`DDPMScheduler`): the training noise schedule and prediction type.
        family (`str`): model family, `"sd15"` (SDXL comes later).
        name (`str`): base model name, recorded in the metadata of the files we write.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    family: ModelFamily = "sd15"
    name: str = "unknown"
    source: str = field(default="", repr=False)

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


def load_bundle(source: str | os.PathLike, device: str | torch.device = "cpu", tokenizer_dir: str | None = None) -> ModelBundle:
    """Build a `ModelBundle` from `"tiny"`, `"toy"`, a diffusers folder or a single-file checkpoint.

    Args:
        source (`str`): `"tiny"`, `"toy"` (the shipped toy-world model), a diffusers folder, or an
            SD1.5 `.safetensors` checkpoint.
        device (`str`): where to put the modules.
        tokenizer_dir (`str`, *optional*): folder with CLIP's `vocab.json` and `merges.txt`,
            for single-file checkpoints (see `single_file.py` for where it is looked for otherwise).
    """
    device = check_device(device)
    source_str = str(source)
    if source_str == "tiny":
        from .tiny_model import build_tiny_bundle

        bundle = build_tiny_bundle()
    elif source_str == "toy":
        bundle = load_diffusers_folder(Path(__file__).parent / "toyworld" / "model")
        bundle.name, bundle.source = "toyworld", "toy"
    else:
        path = Path(source_str).expanduser()
        if not path.exists():
            raise MissingModelFileError(
                f"model {source_str!r} not found: give `tiny`, a diffusers model folder or an SD1.5 "
                ".safetensors checkpoint that exists on this machine (nothing is downloaded)."
            )
        if path.is_dir():
            bundle = load_diffusers_folder(path)
        elif path.suffix.lower() in (".safetensors", ".sft"):
            from .single_file import load_single_file

            bundle = load_single_file(path, tokenizer_dir=tokenizer_dir)
        else:
            raise ModelLoadError(
                f"model {source_str!r} is neither a folder nor a .safetensors checkpoint. "
                "Pickled checkpoints (.ckpt/.pt) are refused because loading them can run arbitrary code; "
                "convert them to .safetensors first."
            )
    bundle.freeze()
    return bundle.to(device)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by `device`, if this machine has it; a clear error otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device {device!r} is not a torch device name; use cpu, cuda, cuda:1 or mps.") from err
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not available:
        raise InvalidInputError(f"device {str(device)!r} is not available on this machine; use cpu, or a GPU that torch can see.")
    return device


def load_diffusers_folder(folder: Path) -> ModelBundle:
    """Load a diffusers Stable Diffusion folder from disk only (`local_files_only`)."""
    missing = [sub for sub in DIFFUSERS_SUBFOLDERS if not (folder / sub).is_dir()]
    if missing:
        raise MissingModelFileError(
            f"model folder {folder} lacks the sub-folder(s) {', '.join(missing)}: a diffusers Stable "
            f"Diffusion folder needs {', '.join(DIFFUSERS_SUBFOLDERS)}."
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        with no_weight_loading_bar():
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
        noise_scheduler = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the diffusers model folder {folder}: {err}") from err
    family = detect_family(text_encoder, unet)
    return ModelBundle(tokenizer, text_encoder, unet, vae, noise_scheduler, family=family, name=folder.name, source=str(folder))


@contextlib.contextmanager
def no_weight_loading_bar():
    """transformers 5 draws a "Loading weights" bar for every model: clutter in our progress output."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def detect_family(text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> ModelFamily:
    """The model family, from the UNet: SD1.x conditions on one text encoder without extra embeddings."""
    if unet.config.get("addition_embed_type") is not None:
        raise ModelLoadError(
            f"this UNet uses added conditioning ({unet.config.addition_embed_type!r}, as SDXL does): only "
            "SD1.5-family models are supported for now."
        )
    width = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise ModelLoadError(
            f"the UNet expects {unet.config.cross_attention_dim}-wide text conditioning but the text encoder "
            f"gives {width}: the folder mixes parts of different models."
        )
    return "sd15"
