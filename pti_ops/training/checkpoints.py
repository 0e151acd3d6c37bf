"""Resumable checkpoints of a LoRA tuning run, written when a run is stopped (cancel, interrupt).

A checkpoint holds everything the loop's future depends on: the trained tensors, AdamW's
state, the random generators, the image order of the current epoch, the partial loss sums and
the history. Resuming from it gives, on the CPU, bit for bit the result of a run that was
never stopped. Stored with `torch.save` and read with `weights_only=True` (no code in it).
"""

import os
from pathlib import Path

import torch

from ..checks import check_finite
from ..errors import InvalidInputError
from ..safe_write import atomic_write

CHECKPOINT_FORMAT = "pti_ops.training.checkpoints"
CHECKPOINT_VERSION = 1
# Settings that may differ on resume: more steps, another logging interval.
RESUMABLE_CHANGES = ("steps", "history_every")


def save_checkpoint(path: str | os.PathLike, state: dict, overwrite: bool = True) -> Path:
    """Write a run's state (from the trainer) atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=overwrite)


def load_checkpoint(path: str | os.PathLike, config: dict) -> dict:
    """Read a checkpoint and check it belongs to a run with the same settings as `config`.

    Args:
        path (`str`): the checkpoint file.
        config (`dict`): `TuneConfig.to_dict()` of the run that resumes.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {str(path)!r} does not exist.")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in several types
        raise InvalidInputError(f"checkpoint {path} could not be read safely ({type(err).__name__}: {err}).") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInputError(f"{path} is not a tuning checkpoint of this tool.")
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
    wanted = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if changed:
        raise InvalidInputError(
            f"checkpoint {path} was made with other settings ({', '.join(changed)} differ): resume with the same "
            f"settings; only {', '.join(RESUMABLE_CHANGES)} may change."
        )
    for index, tensor in enumerate(state["trained"]):
        check_finite(tensor, f"trained tensor {index} of checkpoint {path}")
    if state["step"] > config["steps"]:
        raise InvalidInputError(f"checkpoint {path} is at step {state['step']}, past the {config['steps']} steps asked.")
    return state
