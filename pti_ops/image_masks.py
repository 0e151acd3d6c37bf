"""Loss masks of training images: where the character is, so the background stays out of the loss.

A mask comes from the image's alpha channel (`mask_from="alpha"`), from a `NAME_mask.png` beside
`NAME.png` (`mask_from="files"`: white counts, black does not, grey in between), or from a
ComfyUI MASK batch (1 counts). It is kept as 8-bit `[1, H, W]` at the image's training size (it
goes through the image's own resize and crop); the training loops bring it to the latent grid
(`training/loss_masks.py`). An image without one counts everywhere.
"""

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError
from .user_warnings import warn_user

MaskSource = Literal["none", "alpha", "files"]
MASK_SOURCES: tuple[str, ...] = ("none", "alpha", "files")
MASK_SUFFIX = "_mask"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_path_for(image_path: Path) -> Path:
    """`NAME_mask.png` beside `NAME.ext`."""
    return image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}.png")


def split_mask_files(files: list[Path], source: MaskSource) -> list[Path]:
    """The training images among `files`: with `source="files"`, the `NAME_mask.png` of another image is a mask, not one."""
    if source != "files":
        return files
    names = {f.name for f in files}
    return [f for f in files if not (f.stem.endswith(MASK_SUFFIX) and _is_mask_of_an_image(f, names))]


def _is_mask_of_an_image(path: Path, names: set[str]) -> bool:
    stem = path.stem[: -len(MASK_SUFFIX)]
    return any(name != path.name and Path(name).stem == stem for name in names)


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The image's alpha channel as an 8-bit mask (upright, as `to_rgb` turns the image), or None if it has none."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in _ALPHA_MODES:
        return None
    return image.convert("RGBA").getchannel("A")


def read_mask_file(path: Path, image_size: tuple[int, int]) -> Image.Image:
    """The 8-bit mask in `path`, checked to be as large as its image (`image_size` as PIL's (width, height))."""
    try:
        with Image.open(path) as opened:
            opened.load()
            mask = ImageOps.exif_transpose(opened).convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"mask file {path} could not be read as an image ({type(err).__name__}: {err}): "
                           "fix or delete it.") from err  # fmt: skip
    if mask.size != image_size:
        raise DatasetError(
            f"mask file {path} is {mask.size[0]}x{mask.size[1]} but its image is {image_size[0]}x{image_size[1]}: "
            "a mask must have its image's size (white where the loss counts, black elsewhere)."
        )
    return mask


def mask_from_tensor(mask: torch.Tensor) -> Image.Image:
    """A ComfyUI MASK `[H, W]` in [0, 1] as an 8-bit mask image."""
    return Image.fromarray((mask.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy(), mode="L")


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """uint8 `[1, H, W]`."""
    return torch.from_numpy(np.array(mask, dtype=np.uint8)).unsqueeze(0).contiguous()


def check_mask_batch(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK `[N, H, W]` (or `[H, W]` for one image) matching the IMAGE batch `[N, H, W, 3]`."""
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3 or tuple(masks.shape) != tuple(images.shape[:3]):
        raise DatasetError(
            f"`mask` has shape {tuple(masks.shape)} but the images are {tuple(images.shape[:3])} (count, height, "
            "width): give one mask per image, of the images' size."
        )
    return masks


def warn_unmasked(unmasked: list[str], source: MaskSource, total: int) -> list[str]:
    """The warning for images that have no mask while masks were asked for (they count everywhere)."""
    if not unmasked:
        return []
    what = "alpha channel" if source == "alpha" else f"NAME{MASK_SUFFIX}.png file"
    shown = ", ".join(unmasked[:5]) + (" …" if len(unmasked) > 5 else "")
    return [warn_user(f"{len(unmasked)} of {total} image(s) have no {what}, so the whole image counts in their loss: {shown}")]
