"""Models: the `ModelBundle`, where bundles come from (`load_bundle`, ComfyUI's models), and what
differs per model family (`ModelFamily`, chosen by `detect_family`)."""

from .bundle import ModelBundle
from .conditioning import NUM_TIME_IDS, Conditioning, add_time_ids
from .comfy_layout import COMFY_TEXT_ENCODER_NAMES, ComfyModels, bundle_from_comfy_models, comfy_family, text_encoders_from_comfy_state
from .families import DEFAULT_FAMILY, FAMILIES, detect_family, get_family, supported_families
from .families.sd15 import text_transformer
from .family import ModelFamily, TextEncoderSpec
from .loaders import check_device, load_bundle, load_diffusers_folder

__all__ = [
    "COMFY_TEXT_ENCODER_NAMES", "DEFAULT_FAMILY", "FAMILIES", "NUM_TIME_IDS", "ComfyModels", "Conditioning", "ModelBundle",
    "ModelFamily", "TextEncoderSpec", "add_time_ids", "bundle_from_comfy_models", "check_device", "comfy_family",
    "detect_family", "get_family", "load_bundle", "load_diffusers_folder", "supported_families",
    "text_encoders_from_comfy_state", "text_transformer",
]
