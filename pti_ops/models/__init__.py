"""Models: the `ModelBundle`, where bundles come from (`load_bundle`), and what differs per model family."""

from .bundle import MODEL_FAMILIES, ModelBundle, ModelFamily, detect_family
from .ldm_layout import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from .loaders import check_device, load_bundle, load_diffusers_folder
from .single_file import bundle_from_ldm_state, check_sd15_layout, load_configs, text_encoder_from_ldm_state, tokenizer_from_folder

__all__ = [
    "CLIP_PREFIX", "MODEL_FAMILIES", "UNET_PREFIX", "VAE_PREFIX", "ModelBundle", "ModelFamily", "bundle_from_ldm_state",
    "check_device", "check_sd15_layout", "detect_family", "load_bundle", "load_configs", "load_diffusers_folder",
    "text_encoder_from_ldm_state", "tokenizer_from_folder",
]
