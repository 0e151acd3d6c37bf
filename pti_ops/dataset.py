"""Training images: a folder of png/jpg/webp files (+ optional same-name `.txt` captions).

Images are converted to RGB (grayscale, palette, RGBA composited on white, 16-bit scaled, CMYK),
resized so the shorter side equals the resolution, centre-cropped to a square and kept as uint8
`[N, 3, H, W]` (one decoded copy). Captions use `{}` where the placeholder goes.

Sizes (`limits.py`), checked from the file's header before anything is decoded: an image of more than
`MAX_IMAGE_PIXELS` (64 Mpx) is refused, as is one whose shorter side is under resolution / `MAX_UPSCALE`
(128 px at 512: blown up 4x or more it would train on blur); both are skipped with a warning under
`on_bad_image="skip"`, like unreadable files. An image smaller than the resolution but above that is
upscaled with a warning. An animated image (GIF-style WebP, APNG) gives its first frame, with a warning.
"""

import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError, InvalidInputError
from .limits import MAX_IMAGE_PIXELS, MAX_UPSCALE
from .user_warnings import warn_user

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CaptionSource = Literal["template", "files", "files_or_template"]
CAPTION_SOURCES: tuple[str, ...] = ("template", "files", "files_or_template")
BadImagePolicy = Literal["error", "skip"]
BAD_IMAGE_POLICIES: tuple[str, ...] = ("error", "skip")


@dataclass
class DatasetConfig:
    """How to turn image files into training tensors.

    Args:
        resolution (`int`): side of the square training images in pixels (512 for SD1.5).
        flip (`bool`): also train on horizontal mirror images (chosen at random per sample).
        caption_source (`str`): `"template"` uses the prompt templates for every image; `"files"`
            reads `NAME.txt` beside each image (an error if one is missing); `"files_or_template"`
            uses the file where there is one and the templates elsewhere.
        on_bad_image (`str`): `"error"` stops on an unreadable image or one of a refused size (see the
            module's docstring); `"skip"` leaves it out with a warning that lists the files (logged, and
            kept in the dataset's `warnings`).
    """

    resolution: int = 512
    flip: bool = False
    caption_source: CaptionSource = "template"
    on_bad_image: BadImagePolicy = "error"

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise InvalidInputError(f"`resolution` must be an integer of at least 8 pixels, got {self.resolution!r}.")
        if self.caption_source not in CAPTION_SOURCES:
            raise InvalidInputError(f"`caption_source` must be one of {CAPTION_SOURCES}, got {self.caption_source!r}.")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise InvalidInputError(f"`on_bad_image` must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}.")


@dataclass
class ImageDataset:
    """Training images and their captions.

    Args:
        images (`torch.Tensor`): uint8 `[N, 3, resolution, resolution]`.
        names (`list[str]`): a name per image (file name), for messages and reports.
        captions (`list[str | None]`): per-image caption with `{}` for the placeholder, or None
            where the prompt templates are used.
        flip (`bool`): whether mirrored copies are trained on too.
        warnings (`list[str]`): what the user should know about these images (skipped files, upscaled
            images), given when they were loaded; kept so that every run training on them can say it again.
        original_sizes (`list[tuple[int, int]]`): per image, its (height, width) before resizing
            (SDXL's `add_time_ids` condition on it); `(resolution, resolution)` when not given.
        crops_top_left (`list[tuple[int, int]]`): per image, the (top, left) corner of its crop in the
            resized image; `(0, 0)` when not given.
    """

    images: torch.Tensor
    names: list[str]
    captions: list[str | None] = field(default_factory=list)
    flip: bool = False
    warnings: list[str] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crops_top_left: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.captions:
            self.captions = [None] * len(self.names)
        if not self.original_sizes:
            self.original_sizes = [(self.images.shape[-2], self.images.shape[-1])] * len(self.names)
        if not self.crops_top_left:
            self.crops_top_left = [(0, 0)] * len(self.names)
        if not (len(self.original_sizes) == len(self.crops_top_left) == len(self.names)):
            raise DatasetError("original_sizes and crops_top_left must have one (height, width) pair per image.")
        if len(self.images) == 0:
            raise DatasetError("the dataset has no image.")
        if not (len(self.images) == len(self.names) == len(self.captions)):
            raise DatasetError("images, names and captions must have the same length.")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def pixels(self, indices: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Images as float `[n, 3, H, W]` in [-1, 1], the VAE's input range."""
        images = self.images if indices is None else self.images[indices]
        return images.float() / 127.5 - 1.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution`, then crop the centre square."""
    return resize_and_crop_with_box(image, resolution)[0]


def resize_and_crop_with_box(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """`resize_and_crop`, and the crop's (top, left) corner in the resized image (SDXL's crop ids)."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 `[3, H, W]` from an RGB PIL image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class ImageRefused(Exception):
    """An image file that cannot be trained on; the message says why (unreadable, too large, too small)."""

    def __init__(self, reason: str, unreadable: bool = False):
        super().__init__(reason)
        self.unreadable = unreadable


def smallest_side(resolution: int) -> int:
    """The shortest image side accepted at `resolution`: what `MAX_UPSCALE` times upscaling brings to it."""
    return math.ceil(resolution / MAX_UPSCALE)


def check_image_size(width: int, height: int, resolution: int) -> None:
    """Raise `ImageRefused` for an image above `MAX_IMAGE_PIXELS` or with its shorter side under `smallest_side`."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageRefused(f"{width}x{height} px = {width * height / 1e6:.0f} Mpx, above the limit of "
                           f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx")  # fmt: skip
    if min(width, height) < smallest_side(resolution):
        raise ImageRefused(f"{width}x{height} px, shorter side under {smallest_side(resolution)} px = the training "
                           f"resolution {resolution} / {MAX_UPSCALE}: too small to upscale")  # fmt: skip


def read_image(path: Path, resolution: int) -> tuple[Image.Image, int]:
    """An image file as RGB and its number of frames (the first is read), its size checked before decoding.

    Raises `ImageRefused` for an unreadable file or a refused size (`check_image_size`).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 Mpx on, above our own limit, which is checked below with the exact size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_image_size(*image.size, resolution)
                frames = getattr(image, "n_frames", 1)
                image.load()
                return to_rgb(image), frames
    except Image.DecompressionBombError as err:  # a header of more than 179 Mpx: PIL stops at open
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(claimed.group(1)) / 1e6:.0f} Mpx" if claimed else "more pixels than PIL accepts"
        raise ImageRefused(f"{size}, above the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageRefused(f"{type(err).__name__}: {err}", unreadable=True) from err


def list_image_files(folder: Path) -> list[Path]:
    """Image files of `folder` (not recursive), sorted by name so runs are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise DatasetError(f"caption file {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from err
    if not text:
        raise DatasetError(f"caption file {path} is empty: write a caption with {{}} where the placeholder goes, or delete it.")
    return " ".join(text.split())


def load_image_folder(folder: str | Path, config: DatasetConfig | None = None,
                      skip_hint: str | None = "set `on_bad_image` to skip") -> ImageDataset:  # fmt: skip
    """Load every image of `folder` (+ captions) as an `ImageDataset`.

    Args:
        folder (`str`): folder of png/jpg/jpeg/webp files, with optional `NAME.txt` captions.
        config (`DatasetConfig`): resolution, flip, caption source, bad-image policy.
        skip_hint (`str`, *optional*): how the user skips bad images, for the error (the CLI: `pass
            --skip-bad-images`); None where they cannot.
    """
    config = config or DatasetConfig()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"image folder {str(folder)!r} does not exist or is not a folder.")
    files = list_image_files(folder)
    if not files:
        raise DatasetError(
            f"image folder {folder} contains no image: put .png, .jpg, .jpeg or .webp files of the character in it."
        )
    captions = _captions_for(files, config.caption_source)
    # One uint8 tensor filled image by image: a decoded image is held only while it is converted.
    images = torch.empty((len(files), 3, config.resolution, config.resolution), dtype=torch.uint8)
    names, kept_captions, bad, refused, small, animated, sizes, crops = [], [], [], [], [], [], [], []
    for path, caption in zip(files, captions):
        try:
            rgb, frames = read_image(path, config.resolution)
        except ImageRefused as err:
            (bad if err.unreadable else refused).append(f"{path.name} ({err})")
            continue
        if frames > 1:
            animated.append(f"{path.name} ({frames} frames)")
        if min(rgb.size) < config.resolution:
            small.append(f"{path.name} {rgb.size[0]}x{rgb.size[1]}")
        cropped, crop = resize_and_crop_with_box(rgb, config.resolution)
        images[len(names)] = image_to_tensor(cropped)
        sizes.append((rgb.size[1], rgb.size[0]))  # (height, width), as SDXL's original_size
        crops.append(crop)
        names.append(path.name)
        kept_captions.append(caption)
    problems = _report_problems(folder, bad, refused, config, n_good=len(names), skip_hint=skip_hint)
    problems += [warn_user(message) for message in _size_warnings(folder, small, animated, config.resolution)]
    if len(names) < len(files):
        images = images[: len(names)].clone()
    return ImageDataset(images, names, kept_captions, flip=config.flip, warnings=problems, original_sizes=sizes,
                        crops_top_left=crops)


def _captions_for(files: list[Path], source: CaptionSource) -> list[str | None]:
    if source == "template":
        return [None] * len(files)
    paths = [f.with_suffix(".txt") for f in files]
    missing = [f.name for f, p in zip(files, paths) if not p.is_file()]
    if source == "files" and missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise DatasetError(
            f"captions are read from files but {len(missing)} image(s) have no same-name .txt file: {shown}. "
            "Add them, or use caption source `files_or_template`."
        )
    return [read_caption(p) if p.is_file() else None for p in paths]


def _report_problems(folder: Path, bad: list[str], refused: list[str], config: DatasetConfig, n_good: int,
                     skip_hint: str | None) -> list[str]:  # fmt: skip
    """Raise for unreadable or refused images unless skipped; otherwise warn (every time) and return the warnings."""
    found = []
    if bad:
        found.append(f"{len(bad)} file(s) in {folder} could not be read as images: {'; '.join(bad[:5])}")
    if refused:
        found.append(f"{len(refused)} image(s) in {folder} have a size the loader refuses: {'; '.join(refused[:5])}")
    if found and (config.on_bad_image == "error" or n_good == 0):
        raise DatasetError(
            ". ".join(found) + ". "
            + ("No usable image is left." if n_good == 0 else "Fix or remove them"
               + (f", or {skip_hint} (with a warning)." if skip_hint else "."))
        )
    problems = []
    if bad:
        problems.append(f"skipped {len(bad)} unreadable image(s) in {folder}, training on the other {n_good}: "
                        f"{'; '.join(bad)}")  # fmt: skip
    if refused:
        problems.append(f"skipped {len(refused)} image(s) of a refused size in {folder}, training on the other "
                        f"{n_good}: {'; '.join(refused)}")  # fmt: skip
    return [warn_user(message) for message in problems]


def _size_warnings(folder: Path, small: list[str], animated: list[str], resolution: int) -> list[str]:
    """What the user should know about the images kept: upscaled ones, animated ones (first frame only)."""
    messages = [_upscaled_warning(small, resolution)] if small else []
    if animated:
        messages.append(f"{len(animated)} animated image(s) in {folder}: only the first frame of each is trained on: "
                        f"{', '.join(animated[:5])}" + (" …" if len(animated) > 5 else ""))  # fmt: skip
    return messages


def _upscaled_warning(small: list[str], resolution: int) -> str:
    return (
        f"{len(small)} image(s) are smaller than the training resolution {resolution} and were upscaled, which "
        f"blurs them: {', '.join(small[:5])}" + (" …" if len(small) > 5 else "")
    )


def dataset_from_tensor(images: torch.Tensor, resolution: int, flip: bool = False, captions: list[str | None] | None = None) -> ImageDataset:
    """An `ImageDataset` from a float image batch `[N, H, W, 3]` in [0, 1] (ComfyUI's IMAGE layout)."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise DatasetError(f"image batch must be [N, H, W, 3], got shape {tuple(images.shape)}.")
    if min(images.shape[1:3]) < smallest_side(resolution):
        raise DatasetError(
            f"the images are {images.shape[2]}x{images.shape[1]} px: their shorter side is under "
            f"{smallest_side(resolution)} px (`resolution` {resolution} / {MAX_UPSCALE}), too small to upscale. Give "
            "larger images or a smaller `resolution`."
        )
    pil_images = [
        Image.fromarray((img[..., :3].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy(), mode="RGB")
        for img in images
    ]
    cropped = [resize_and_crop_with_box(img, resolution) for img in pil_images]
    tensors = [image_to_tensor(img) for img, _ in cropped]
    names = [f"image_{i:04d}" for i in range(len(tensors))]
    small = [f"{name} {img.size[0]}x{img.size[1]}" for name, img in zip(names, pil_images) if min(img.size) < resolution]
    problems = [warn_user(_upscaled_warning(small, resolution))] if small else []
    return ImageDataset(torch.stack(tensors), names, captions or [None] * len(names), flip=flip, warnings=problems,
                        original_sizes=[(img.size[1], img.size[0]) for img in pil_images],
                        crops_top_left=[crop for _, crop in cropped])
