"""Training images: a folder of png/jpg/webp files (+ optional same-name `.txt` captions).

Images are converted to RGB (grayscale, palette, RGBA composited on white, 16-bit scaled, CMYK),
resized so the shorter side equals the resolution, centre-cropped to a square and kept as uint8
`[N, 3, H, W]` (one decoded copy). Captions use `{}` where the placeholder goes.

Options a run reads from the dataset (all off by default): aspect-ratio buckets (`aspect_buckets.py`:
each image at the bucket of nearest aspect ratio instead of a square crop, kept as a list of
`[3, h, w]`), loss masks (`image_masks.py`) and tag-caption shuffling and dropout (`tag_captions.py`).

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

from .aspect_buckets import Size, bucket_sizes, check_bucket_step, default_bucket_step, nearest_bucket
from .checks import check_choice, check_number
from .errors import DatasetError, InvalidInputError
from .image_masks import (MASK_SOURCES, MaskSource, alpha_mask, check_mask_batch, mask_from_tensor, mask_to_tensor,
                          read_mask_file, mask_path_for, split_mask_files, warn_unmasked)
from .tag_captions import TagCaptions
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
        buckets (`bool`): aspect-ratio buckets: each image keeps its aspect ratio, resized to the bucket of
            nearest aspect ratio at about `resolution`² pixels (sides multiples of `bucket_step`) instead of
            a centre-cropped square; every batch comes from one bucket.
        bucket_step (`int`, *optional*): bucket sides are multiples of this many pixels; None: 64 from 256 px
            up (kohya's step; SD1.5 needs 64, SDXL 32), resolution / 8 below.
        mask_from (`str`): `"none"`; `"alpha"`: each image's alpha channel is its loss mask (the image is still
            composited on white); `"files"`: `NAME_mask.png` beside `NAME.png` (white counts, black does not).
        mask_floor (`float`): loss weight outside the mask (0: the background is not trained on at all).
        shuffle_tags (`bool`): captions are comma-separated tags, shuffled each time they are drawn.
        keep_tokens (`int`): with `shuffle_tags`, the first N tags stay in place (put the placeholder among them).
        caption_dropout (`float`): probability that a drawn caption is replaced by the empty prompt (kohya's
            `caption_dropout_rate`).
    """

    resolution: int = 512
    flip: bool = False
    caption_source: CaptionSource = "template"
    on_bad_image: BadImagePolicy = "error"
    buckets: bool = False
    bucket_step: int | None = None
    mask_from: MaskSource = "none"
    mask_floor: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise InvalidInputError(f"`resolution` must be an integer of at least 8 pixels, got {self.resolution!r}.")
        if self.caption_source not in CAPTION_SOURCES:
            raise InvalidInputError(f"`caption_source` must be one of {CAPTION_SOURCES}, got {self.caption_source!r}.")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise InvalidInputError(f"`on_bad_image` must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}.")
        if self.bucket_step is not None:
            check_bucket_step(self.bucket_step, self.resolution)
        check_choice("mask_from", self.mask_from, MASK_SOURCES)
        self.mask_floor = check_number("mask_floor", self.mask_floor, 0.0, 1.0)
        self.tag_captions()

    def tag_captions(self) -> TagCaptions:
        """The tag-caption options (checked)."""
        return TagCaptions(self.shuffle_tags, self.keep_tokens, self.caption_dropout)

    def bucket_list(self) -> list[Size] | None:
        """The aspect-ratio buckets `(height, width)`, or None without `buckets`."""
        if not self.buckets:
            return None
        return bucket_sizes(self.resolution, self.bucket_step or default_bucket_step(self.resolution))


@dataclass
class ImageDataset:
    """Training images and their captions.

    Args:
        images (`torch.Tensor` or `list[torch.Tensor]`): uint8 `[N, 3, resolution, resolution]`; with
            aspect-ratio buckets, one uint8 `[3, h, w]` per image at its bucket's size.
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
        masks (`torch.Tensor` or `list[torch.Tensor]`, *optional*): loss masks, uint8 `[N, 1, H, W]` (or one
            `[1, h, w]` per image with buckets), 255 where the loss counts; None: no masks.
        mask_floor (`float`): loss weight outside the masks.
        tag_captions (`TagCaptions`): tag shuffling and caption dropout (off by default).
        bucket_resolution (`int`, *optional*): with buckets (a list of `images`), the resolution whose pixel
            area the buckets share.
    """

    images: torch.Tensor
    names: list[str]
    captions: list[str | None] = field(default_factory=list)
    flip: bool = False
    warnings: list[str] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crops_top_left: list[tuple[int, int]] = field(default_factory=list)
    masks: torch.Tensor | list[torch.Tensor] | None = None
    mask_floor: float = 0.0
    tag_captions: TagCaptions = field(default_factory=TagCaptions)
    bucket_resolution: int | None = None

    def __post_init__(self):
        if not self.captions:
            self.captions = [None] * len(self.names)
        if isinstance(self.images, list) and self.bucket_resolution is None:
            raise DatasetError("a list of images (aspect-ratio buckets) needs `bucket_resolution`.")
        if not self.original_sizes:
            self.original_sizes = [self.image_size(i) for i in range(len(self.images))]
        if not self.crops_top_left:
            self.crops_top_left = [(0, 0)] * len(self.names)
        if not (len(self.original_sizes) == len(self.crops_top_left) == len(self.names)):
            raise DatasetError("original_sizes and crops_top_left must have one (height, width) pair per image.")
        if len(self.images) == 0:
            raise DatasetError("the dataset has no image.")
        if not (len(self.images) == len(self.names) == len(self.captions)):
            raise DatasetError("images, names and captions must have the same length.")
        if self.masks is not None and (len(self.masks) != len(self.images) or any(
                tuple(self.masks[i].shape[-2:]) != self.image_size(i) for i in range(len(self.images)))):
            raise DatasetError("masks must have one [1, H, W] mask per image, of its image's size.")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def bucketed(self) -> bool:
        """Whether the images are in aspect-ratio buckets (a list of `[3, h, w]`)."""
        return isinstance(self.images, list)

    @property
    def resolution(self) -> int:
        """The training resolution (with buckets: the one whose pixel area they share)."""
        return self.bucket_resolution if self.bucketed else self.images.shape[-1]

    def image_size(self, index: int) -> Size:
        """`(height, width)` of image `index` as trained on."""
        return tuple(self.images[index].shape[-2:])

    def groups(self) -> list[list[int]]:
        """Image indices by training size (one group without buckets), in size order."""
        by_size: dict[Size, list[int]] = {}
        for i in range(len(self)):
            by_size.setdefault(self.image_size(i), []).append(i)
        return [by_size[size] for size in sorted(by_size)]

    def pixels(self, indices: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Images as float `[n, 3, H, W]` in [-1, 1], the VAE's input range (with buckets: of one size)."""
        return _stack(self.images, indices, "images").float() / 127.5 - 1.0

    def mask_pixels(self, indices: torch.Tensor | list[int] | None = None) -> torch.Tensor | None:
        """Masks as float `[n, 1, H, W]` in [0, 1] (1: the loss counts), or None without masks."""
        return None if self.masks is None else _stack(self.masks, indices, "masks").float() / 255.0


def _stack(images: torch.Tensor | list[torch.Tensor], indices, what: str) -> torch.Tensor:
    """`images[indices]` as one tensor; a list (buckets) must give images of one size."""
    if isinstance(images, torch.Tensor):
        return images if indices is None else images[indices]
    rows = range(len(images)) if indices is None else (indices.tolist() if isinstance(indices, torch.Tensor) else indices)
    picked = [images[i] for i in rows]
    if len({tuple(p.shape) for p in picked}) > 1:
        raise DatasetError(f"these {what} are of different aspect-ratio buckets: take them one bucket at a time.")
    return torch.stack(picked)


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
    return resize_and_crop_to(image, (resolution, resolution))


def resize_and_crop_to(image: Image.Image, size: Size, resample=Image.Resampling.LANCZOS) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `size` `(height, width)`, centre-crop the excess; the crop's (top, left) in the resized image."""
    width, height = image.size
    target_h, target_w = size
    scale = max(target_w / width, target_h / height)
    new_size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    image = image.resize(new_size, resample)
    left = (new_size[0] - target_w) // 2
    top = (new_size[1] - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h)), (top, left)


def training_size(image_size: tuple[int, int], resolution: int, buckets: list[Size] | None) -> Size:
    """`(height, width)` an image of PIL size `(width, height)` trains at: the square, or its bucket."""
    return (resolution, resolution) if buckets is None else nearest_bucket((image_size[1], image_size[0]), buckets)


def fitted_mask(mask: Image.Image | None, size: Size) -> torch.Tensor | None:
    """The mask through its image's resize and crop (bilinear: a mask has no detail to keep sharp), uint8 `[1, h, w]`."""
    return None if mask is None else mask_to_tensor(resize_and_crop_to(mask, size, Image.Resampling.BILINEAR)[0])


def kept_masks(masks: list[torch.Tensor | None], names: list[str], source: MaskSource, images) -> tuple:
    """`(masks or None, warnings)`: a full mask for every image without one, when masks were asked for."""
    if source == "none":
        return None, []
    warnings = warn_unmasked([n for n, m in zip(names, masks) if m is None], source, len(names))
    full = [torch.full((1, *images[i].shape[-2:]), 255, dtype=torch.uint8) if m is None else m for i, m in enumerate(masks)]
    return (torch.stack(full) if isinstance(images, torch.Tensor) else full), warnings


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


def read_image(path: Path, resolution: int, with_alpha_mask: bool = False) -> tuple[Image.Image, int, Image.Image | None]:
    """An image file as RGB, its number of frames (the first is read) and, with `with_alpha_mask`, its alpha
    channel as a loss mask (None without one); its size is checked before decoding.

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
                return to_rgb(image), frames, alpha_mask(image) if with_alpha_mask else None
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
        config (`DatasetConfig`): resolution, flip, caption source, bad-image policy, buckets, masks, tag captions.
        skip_hint (`str`, *optional*): how the user skips bad images, for the error (the CLI: `pass
            --skip-bad-images`); None where they cannot.
    """
    config = config or DatasetConfig()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"image folder {str(folder)!r} does not exist or is not a folder.")
    files = split_mask_files(list_image_files(folder), config.mask_from)
    if not files:
        raise DatasetError(
            f"image folder {folder} contains no image: put .png, .jpg, .jpeg or .webp files of the character in it."
        )
    captions = _captions_for(files, config.caption_source)
    # One uint8 tensor filled image by image: a decoded image is held only while it is converted.
    buckets = config.bucket_list()  # with buckets, a list: one size per image
    side = config.resolution
    images = torch.empty((len(files), 3, side, side), dtype=torch.uint8) if buckets is None else [None] * len(files)
    names, kept_captions, bad, refused, small, animated, sizes, crops, masks = [], [], [], [], [], [], [], [], []
    for path, caption in zip(files, captions):
        try:
            rgb, frames, mask = read_image(path, config.resolution, with_alpha_mask=config.mask_from == "alpha")
        except ImageRefused as err:
            (bad if err.unreadable else refused).append(f"{path.name} ({err})")
            continue
        if frames > 1:
            animated.append(f"{path.name} ({frames} frames)")
        if min(rgb.size) < config.resolution:
            small.append(f"{path.name} {rgb.size[0]}x{rgb.size[1]}")
        if config.mask_from == "files" and mask_path_for(path).is_file():
            mask = read_mask_file(mask_path_for(path), rgb.size)
        target = training_size(rgb.size, config.resolution, buckets)
        cropped, crop = resize_and_crop_to(rgb, target)
        images[len(names)] = image_to_tensor(cropped)
        masks.append(fitted_mask(mask, target))
        sizes.append((rgb.size[1], rgb.size[0]))  # (height, width), as SDXL's original_size
        crops.append(crop)
        names.append(path.name)
        kept_captions.append(caption)
    problems = _report_problems(folder, bad, refused, config, n_good=len(names), skip_hint=skip_hint)
    problems += [warn_user(message) for message in _size_warnings(folder, small, animated, config.resolution)]
    if len(names) < len(files):
        images = images[: len(names)].clone() if buckets is None else images[: len(names)]
    masks, mask_warnings = kept_masks(masks, names, config.mask_from, images)
    return ImageDataset(images, names, kept_captions, flip=config.flip, warnings=problems + mask_warnings,
                        original_sizes=sizes, crops_top_left=crops, **_options(config, masks))


def _options(config: "DatasetConfig", masks) -> dict:
    """The dataset's training options from its config (`ImageDataset`'s keyword arguments)."""
    return dict(masks=masks, mask_floor=config.mask_floor, tag_captions=config.tag_captions(),
                bucket_resolution=config.resolution if config.buckets else None)


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


def dataset_from_tensor(
    images: torch.Tensor, resolution: int | None = None, flip: bool = False, captions: list[str | None] | None = None,
    masks: torch.Tensor | None = None, config: DatasetConfig | None = None,
) -> ImageDataset:
    """An `ImageDataset` from a float image batch `[N, H, W, 3]` in [0, 1] (ComfyUI's IMAGE layout).

    Args:
        masks (`torch.Tensor`, *optional*): ComfyUI MASK `[N, H, W]` in [0, 1], 1 where the loss counts.
        config (`DatasetConfig`, *optional*): resolution, flip, buckets, mask floor and tag captions; without
            it, `DatasetConfig(resolution, flip)` (`caption_source`, `on_bad_image` and `mask_from` do not apply).
    """
    config = config or DatasetConfig(resolution=resolution, flip=flip)
    resolution, buckets = config.resolution, config.bucket_list()
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise DatasetError(f"image batch must be [N, H, W, 3], got shape {tuple(images.shape)}.")
    masks = None if masks is None else check_mask_batch(masks, images)
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
    targets = [training_size(img.size, resolution, buckets) for img in pil_images]
    cropped = [resize_and_crop_to(img, target) for img, target in zip(pil_images, targets)]
    tensors = [image_to_tensor(img) for img, _ in cropped]
    names = [f"image_{i:04d}" for i in range(len(tensors))]
    small = [f"{name} {img.size[0]}x{img.size[1]}" for name, img in zip(names, pil_images) if min(img.size) < resolution]
    problems = [warn_user(_upscaled_warning(small, resolution))] if small else []
    kept = tensors if buckets is not None else torch.stack(tensors)
    fitted = None if masks is None else [fitted_mask(mask_from_tensor(m), t) for m, t in zip(masks, targets)]
    if fitted is not None and buckets is None:
        fitted = torch.stack(fitted)
    return ImageDataset(kept, names, captions or [None] * len(names), flip=config.flip, warnings=problems,
                        original_sizes=[(img.size[1], img.size[0]) for img in pil_images],
                        crops_top_left=[crop for _, crop in cropped], **_options(config, fitted))
