"""Where a `ModelBundle` comes from. `load_bundle(source)` builds one from
- `"tiny"`: a tiny random SD1.5-shaped model built from configs in code (tests, smoke runs);
- `"toy"`: the small trained model of the toy world shipped in `pti_ops/toyworld/model/`;
- a diffusers folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`);
- a single-file SD1.5 LDM checkpoint (`.safetensors`), converted with diffusers' own functions
  and the configs shipped in this package (see `single_file.py`).
Nothing is ever downloaded: a missing file is an error that names it.
"""

import contextlib
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from ..errors import InvalidInputError, MissingModelFileError, ModelLoadError
from .bundle import ModelBundle
from .families import detect_family

# Sub-folders of a diffusers Stable Diffusion folder that training needs.
DIFFUSERS_SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

TOY_MODEL_FOLDER = Path(__file__).parent.parent / "toyworld" / "model"


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
        bundle = load_diffusers_folder(TOY_MODEL_FOLDER)
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
