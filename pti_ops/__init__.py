"""Pivotal tuning for text-to-image diffusion models: the core, usable without ComfyUI.

Textual inversion of a new token, then a LoRA fine-tune of the UNet around that frozen token,
kept local by a SLERP regularisation in text-encoder space; plus the measurements that tell
what the tuning did. See README.md for the command line and the ComfyUI nodes.
"""

from .models import ModelBundle, load_bundle
from .dataset import DatasetConfig, ImageDataset, dataset_from_tensor, load_image_folder
from .files import apply_kohya_lora, load_embedding, load_lora, save_embedding, save_lora
from .interpolation import slerp, vslerp
from .inversion import InversionConfig, InversionResult, invert, run_inversion
from .lora_tune import TuneConfig, TuneResult, run_tuning, tune_around
from .norm_stats import NormStats, NormStatsConfig, compute_norm_stats
from .pivot import Pivot
from .pivotal import PivotalResult, pivotal_tune, run_pivotal_tuning
from .placeholder import DEFAULT_TEMPLATES, PlaceholderToken, add_placeholder, fill_placeholder
from .regularizer import MODES, REGULARIZER_MODES, LocalityRegularizer, RegularizerConfig
from .training import StepCallback
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
    "DEFAULT_TEMPLATES",
    "fill_placeholder",
    "Pivot",
    "StepCallback",
    "InversionConfig",
    "InversionResult",
    "invert",
    "run_inversion",
    "TuneConfig",
    "TuneResult",
    "tune_around",
    "run_tuning",
    "PivotalResult",
    "pivotal_tune",
    "run_pivotal_tuning",
    "MODES",
    "REGULARIZER_MODES",
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
