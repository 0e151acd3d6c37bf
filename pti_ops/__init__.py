"""Pivotal tuning for text-to-image diffusion models: the core, usable without ComfyUI.

Textual inversion of a new token, then a LoRA fine-tune of the UNet around that frozen token,
kept local by a SLERP regularisation in text-encoder space; plus the measurements that tell
what the tuning did. See README.md for the command line and the ComfyUI nodes.
"""

from .models import ModelBundle, load_bundle
from .dataset import DatasetConfig, ImageDataset, dataset_from_tensor, load_image_folder
from .files.embedding_file import load_embedding, save_embedding
from .interpolation import slerp, vslerp
from .inversion import InversionConfig, InversionResult, run_inversion
from .files.lora_file import apply_kohya_lora, load_lora, save_lora
from .lora_tune import TuneConfig, TuneResult, run_tuning
from .norm_stats.compute import NormStats, NormStatsConfig, compute_norm_stats
from .pivotal import run_pivotal_tuning
from .placeholder import PlaceholderToken, add_placeholder
from .regularizer import LocalityRegularizer, RegularizerConfig
from .errors import (
    DatasetError,
    InvalidInputError,
    MissingModelFileError,
    ModelLoadError,
    OutputExistsError,
    PivotalError,
    TokenizerError,
    TrainingStopped,
)

__all__ = [
    "ModelBundle",
    "load_bundle",
    "DatasetConfig",
    "ImageDataset",
    "load_image_folder",
    "dataset_from_tensor",
    "PlaceholderToken",
    "add_placeholder",
    "InversionConfig",
    "InversionResult",
    "run_inversion",
    "TuneConfig",
    "TuneResult",
    "run_tuning",
    "run_pivotal_tuning",
    "RegularizerConfig",
    "LocalityRegularizer",
    "slerp",
    "vslerp",
    "NormStatsConfig",
    "NormStats",
    "compute_norm_stats",
    "save_embedding",
    "load_embedding",
    "save_lora",
    "load_lora",
    "apply_kohya_lora",
    "PivotalError",
    "InvalidInputError",
    "DatasetError",
    "ModelLoadError",
    "MissingModelFileError",
    "TokenizerError",
    "OutputExistsError",
    "TrainingStopped",
]
