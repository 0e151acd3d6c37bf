"""Pivotal tuning for text-to-image diffusion models: the core, usable without ComfyUI.

Textual inversion of a new token, then a LoRA fine-tune of the UNet around that frozen token,
kept local by a SLERP regularisation in text-encoder space; plus the measurements that tell
what the tuning did. See README.md for the command line and the ComfyUI nodes.
"""

from .bundle import ModelBundle, load_bundle
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
    "PivotalError",
    "InvalidInputError",
    "DatasetError",
    "ModelLoadError",
    "MissingModelFileError",
    "TokenizerError",
    "OutputExistsError",
    "TrainingStopped",
]
