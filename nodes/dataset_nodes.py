"""Training images as a `PIVOTAL_DATASET`: from a folder of files, or from an IMAGE batch.

Buckets, loss masks and tag captions are optional inputs at the end (saved workflows keep their
defaults, which train as before); the training nodes read them from the dataset.
"""

from ..pti_ops.limits import MAX_IMAGE_PIXELS, MAX_RESOLUTION, MAX_UPSCALE
from ..pti_ops.dataset import (
    BAD_IMAGE_POLICIES,
    CAPTION_SOURCES,
    DatasetConfig,
    dataset_from_tensor,
    list_image_files,
    load_image_folder,
)
from ..pti_ops.errors import DatasetError
from ..pti_ops.image_masks import MASK_SOURCES
from . import bridge
from .common import node_result, node_warnings, split_lines
from .inputs import NODE_ID, bool_input, combo, default_of, float_input, int_input, link, string_input

CATEGORY = "pivotal_tuning/dataset"
RESOLUTION = int_input(default_of(DatasetConfig, "resolution"), 64, MAX_RESOLUTION, "Side of the square training images in "
    "pixels: images are resized (shorter side) and centre-cropped to it. 512 for SD1.5; smaller trains faster but "
    f"learns less detail. Images smaller than it are upscaled (a warning); under a {MAX_UPSCALE}th of it (128 px at "
    "512) they are refused.", step=8)
FLIP = bool_input(default_of(DatasetConfig, "flip"), "Also train on mirror images (picked at random per sample). "
    "Doubles the variety; leave off for asymmetric characters (a scar on one side, text on clothes).")  # fmt: skip
# Options every training reads from the dataset (optional inputs, appended: workflows store widgets by position).
BUCKETS = bool_input(default_of(DatasetConfig, "buckets"), "Aspect-ratio buckets: each image keeps its aspect ratio, "
    "resized to the bucket of nearest aspect ratio at about resolution x resolution pixels (sides in steps of 64 px) "
    "instead of a centre-cropped square; every batch holds one bucket's images. Off: square crops, as before.")
MASK_FLOOR = float_input(default_of(DatasetConfig, "mask_floor"), 0.0, 1.0, 0.01, "Loss weight outside the mask: 0 "
    "leaves the background out of the training entirely; e.g. 0.1 still learns a little of it. No effect without masks.")
TAG_OPTIONS = {
    "shuffle_tags": bool_input(default_of(DatasetConfig, "shuffle_tags"), "Captions are comma-separated tags (booru "
        "style): shuffle them each time they are drawn, so no tag order is learnt. New prompts every step: the LoRA "
        "training then encodes each batch's captions (a text-encoder pass per step)."),
    "keep_tokens": int_input(default_of(DatasetConfig, "keep_tokens"), 0, 255, "With shuffle_tags, the first N tags stay "
        "in place. A caption without {} gets the placeholder as its first tag, which 1 keeps first."),
    "caption_dropout": float_input(default_of(DatasetConfig, "caption_dropout"), 0.0, 0.99, 0.01, "Probability that a "
        "drawn caption is replaced by the empty prompt (as kohya's caption_dropout_rate). Such steps do not train the "
        "token, and teach the LoRA the character without it (less local): keep it low, or 0."),
}  # fmt: skip


class PivotalDatasetFromFolder:
    """A folder of images (+ optional same-name `.txt` captions) → `PIVOTAL_DATASET`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": string_input("pivotal/character", "Folder of .png/.jpg/.jpeg/.webp images of the character: "
                    "a path inside ComfyUI's input folder, or an absolute path. Captions: NAME.txt beside NAME.png, with "
                    "{} where the placeholder goes."),
                "resolution": RESOLUTION,
                "flip": FLIP,
                "caption_source": combo(CAPTION_SOURCES, default_of(DatasetConfig, "caption_source"), "template: the "
                    "training node's prompt templates for every image. files: each image's NAME.txt caption (an error "
                    "if one is missing). files_or_template: the caption file where there is one, the templates "
                    "elsewhere."),
                "on_bad_image": combo(BAD_IMAGE_POLICIES, default_of(DatasetConfig, "on_bad_image"), "error: stop on "
                    f"an unreadable image file or one of a refused size (over {MAX_IMAGE_PIXELS // 10**6} Mpx, or a "
                    f"shorter side under resolution / {MAX_UPSCALE}). skip: leave it out with a warning (on this node, "
                    "in the log, and on every training node using these images, on every run). An animated image "
                    "gives its first frame, with a warning."),
            },
            "optional": {
                "buckets": BUCKETS,
                "mask_from": combo(MASK_SOURCES, default_of(DatasetConfig, "mask_from"), "Masked loss: none; alpha: each "
                    "image's alpha channel (the transparent background stays out of the loss; the image is still "
                    "composited on white); files: NAME_mask.png beside NAME.png, white where the loss counts, black "
                    "where it does not (same size as the image)."),
                "mask_floor": MASK_FLOOR,
                **TAG_OPTIONS,
            },
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("PIVOTAL_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The training images (decoded once, kept as 8-bit tensors) and their captions.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads the character's training images from a folder (under ComfyUI's input folder or an absolute "
        "path), converted to RGB and cropped to a square of the given resolution."
    )

    def load(self, folder, resolution, flip, caption_source, on_bad_image, unique_id=None, **options):
        config = DatasetConfig(resolution=resolution, flip=flip, caption_source=caption_source, on_bad_image=on_bad_image,
                               **options)
        with node_warnings() as warned:
            dataset = load_image_folder(bridge.resolve_input_path(folder), config)
        return node_result((dataset,), warned, unique_id)

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        path = bridge.resolve_input_path(folder)
        if not path.is_dir():
            return f"missing:{path}"
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        return bridge.hash_files(files)

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None):
        if folder is None:  # fed by a link: checked when the node runs
            return True
        path = bridge.resolve_input_path(folder)
        if not path.is_dir():
            return f"folder {folder!r} does not exist ({path}): put the character's images in a folder under ComfyUI's input folder, or give an absolute path."
        if not list_image_files(path):
            return f"folder {path} contains no .png, .jpg, .jpeg or .webp image."
        return True


class PivotalDatasetFromImages:
    """An IMAGE batch (e.g. from Load Image nodes) → `PIVOTAL_DATASET`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": link("IMAGE", "The character's training images, one batch (all the same size)."),
                "resolution": RESOLUTION,
                "flip": FLIP,
                "captions": string_input("", "Optional: one caption per image, one per line, in batch order, with {} "
                    "where the placeholder goes (a line without it gets the placeholder prepended). Empty: the "
                    "training node's prompt templates are used.", multiline=True),
            },
            "optional": {
                "mask": link("MASK", "Optional loss masks, one per image (the images' size): 1 where the loss counts "
                    "(the character), 0 where it does not. Load Image's MASK of a transparent PNG is 1 on the "
                    "transparent background: put an Invert Mask node between."),
                "buckets": BUCKETS,
                "mask_floor": MASK_FLOOR,
                **TAG_OPTIONS,
            },
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("PIVOTAL_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The training images (kept as 8-bit tensors) and their captions.",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Turns an IMAGE batch into training images, cropped to a square of the given resolution."

    def build(self, images, resolution, flip, captions, unique_id=None, mask=None, **options):
        config = DatasetConfig(resolution=resolution, flip=flip, **options)
        with node_warnings() as warned:
            dataset = dataset_from_tensor(images, captions=_captions(captions, len(images)), masks=mask, config=config)
        return node_result((dataset,), warned, unique_id)


def _captions(text: str, count: int) -> list[str] | None:
    """One caption per image from the multiline widget; None when it is empty."""
    lines = split_lines(text)
    if lines and len(lines) != count:
        raise DatasetError(
            f"`captions` has {len(lines)} line(s) but the batch has {count} image(s): give one caption per "
            "image, or leave it empty to use the prompt templates."
        )
    return lines or None


NODE_CLASS_MAPPINGS = {
    "PivotalDatasetFromFolder": PivotalDatasetFromFolder,
    "PivotalDatasetFromImages": PivotalDatasetFromImages,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PivotalDatasetFromFolder": "Pivotal Dataset (folder)",
    "PivotalDatasetFromImages": "Pivotal Dataset (images)",
}
