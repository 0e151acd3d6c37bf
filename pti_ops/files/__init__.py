"""The files we read and write: embeddings, LoRAs, and the atomic write both use."""

from .bundled_embeddings import BUNDLE_PREFIX, bundle_tensors, split_bundled
from .embedding_file import EmbeddingFile, embedding_file_size, load_embedding, save_embedding
from .comfy_lora_keys import comfyui_lora_key_map, comfyui_sdxl_lora_key_map
from .lora_file import apply_kohya_lora, group_kohya_modules, is_kohya_key, load_lora, lora_file_size, lora_state_dict_to_kohya
from .lora_file import save_lora
from ..safe_write import IF_EXISTS_POLICIES, atomic_write, check_free_space, check_if_exists, check_output_file
from ..safe_write import check_output_folder, check_output_name
from ..safe_write import output_folder, output_path, output_paths

__all__ = [
    "BUNDLE_PREFIX", "bundle_tensors", "split_bundled", "IF_EXISTS_POLICIES", "EmbeddingFile", "check_if_exists", "output_folder", "output_paths", "apply_kohya_lora", "atomic_write", "check_output_folder", "check_output_name", "comfyui_lora_key_map",
    "check_free_space", "check_output_file", "embedding_file_size", "lora_file_size",
    "comfyui_sdxl_lora_key_map", "group_kohya_modules", "is_kohya_key", "load_embedding", "load_lora", "lora_state_dict_to_kohya",
    "output_path", "save_embedding", "save_lora",
]
