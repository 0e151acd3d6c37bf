"""Training images as a `PIVOTAL_DATASET`: from a folder of files, or from an IMAGE batch."""

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
from . import bridge
from .common import node_result, node_warnings, split_lines
from .inputs import NODE_ID, bool_input, combo, default_of, int_input, link, string_input

CATEGORY = "pivotal_tuning/dataset"
RESOLUTION = int_input(default_of(DatasetConfig, "resolution"), 64, MAX_RESOLUTION, "Side of the square training images in "
    "pixels: images are resized (shorter side) and centre-cropped to it. 512 for SD1.5; smaller trains faster but "
    f"learns less detail. Images smaller than it are upscaled (a warning); under a {MAX_UPSCALE}th of it (128 px at "
    "512) they are refused.", step=8)
FLIP = bool_input(default_of(DatasetConfig, "flip"), "Also train on mirror images (picked at random per sample). "
    "Doubles the variety; leave off for asymmetric characters (a scar on one side, text on clothes).")  # fmt: skip


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

    def load(self, folder, resolution, flip, caption_source, on_bad_image, unique_id=None):
        config = DatasetConfig(resolution=resolution, flip=flip, caption_source=caption_source, on_bad_image=on_bad_image)
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
                    "where the placeholder goes. Empty: the training node's prompt templates are used.", multiline=True),
            },
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("PIVOTAL_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The training images (kept as 8-bit tensors) and their captions.",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Turns an IMAGE batch into training images, cropped to a square of the given resolution."

    def build(self, images, resolution, flip, captions, unique_id=None):
        with node_warnings() as warned:
            dataset = dataset_from_tensor(images, resolution, flip=flip, captions=_captions(captions, len(images)))
        return node_result((dataset,), warned, unique_id)


def _captions(text: str, count: int) -> list[str] | None:
    """One caption per image from the multiline widget, each with {}; None when it is empty."""
    lines = split_lines(text)
    if lines and len(lines) != count:
        raise DatasetError(
            f"`captions` has {len(lines)} line(s) but the batch has {count} image(s): give one caption per "
            "image, or leave it empty to use the prompt templates."
        )
    bad = [line for line in lines if "{}" not in line]
    if bad:
        raise DatasetError(f"caption {bad[0]!r} has no {{}} where the placeholder goes.")
    return lines or None


NODE_CLASS_MAPPINGS = {
    "PivotalDatasetFromFolder": PivotalDatasetFromFolder,
    "PivotalDatasetFromImages": PivotalDatasetFromImages,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PivotalDatasetFromFolder": "Pivotal Dataset (folder)",
    "PivotalDatasetFromImages": "Pivotal Dataset (images)",
}
