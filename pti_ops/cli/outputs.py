"""Every output of a command, checked before any training, and saved so that a trained result is never lost.

1. `check_output_files` before anything loads: each path is a file that may be written (not a folder, not
   existing without --overwrite, in a writable folder), and no two options name the same file.
2. `check_output_space` once the model is loaded (the shapes are then known), before training: the disk
   has room for the expected sizes (`embedding_bytes`, `lora_bytes`, `history_bytes`).
3. `save_outputs` after training: a write that still fails (the disk filled meanwhile) keeps any earlier
   file of that name, and the trained result goes to a rescue folder in the system's temporary folder
   instead; the error says where it is and where to move it, so nothing needs training again.
"""

import logging
import re
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import InvalidInputError, OutputWriteError
from ..files import check_free_space, check_output_file, embedding_file_size, lora_file_size, output_path
from ..lora_tune import TEXT_ENCODER_TARGETS, UNET_TARGETS, TuneConfig

logger = logging.getLogger(__name__)

# Where a result that could not be written goes (`tempfile.gettempdir()` / this).
RESCUE_FOLDER = "pti_ops_rescue"
# Bytes of one recorded history entry in the JSON (step, losses, distances, nearest tokens), about.
HISTORY_ENTRY_BYTES = 512
# A report's tables and plots (JSON, Markdown, CSV, a few PNG plots), about.
REPORT_BYTES = 2_000_000


def check_output_files(outputs: dict[str, str | None], overwrite: bool) -> dict[str, Path]:
    """`{option: Path}` of the outputs given, each checked (`safe_write.check_output_file`), none the same file."""
    paths = {option: check_output_file(path, overwrite, what=option, hint="pass --overwrite")
             for option, path in outputs.items() if path}  # fmt: skip
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        first = seen.setdefault(path.resolve(), option)
        if first != option:
            raise InvalidInputError(f"{first} and {option} name the same file {path}: give each output its own path.")
    return paths


def embedding_bytes(bundle, num_vectors: int) -> int:
    """The embedding file's expected size for this model."""
    return embedding_file_size(num_vectors, bundle.embedding_dims)


def lora_bytes(bundle, config: TuneConfig, bundled_vectors: int = 0) -> int:
    """The LoRA file's expected size: rank x the adapted modules' shapes (+ a bundled embedding of that many vectors)."""
    models = [(bundle.unet, UNET_TARGETS[config.targets])]
    if config.train_text_encoder:
        models.append((bundle.text_encoder, TEXT_ENCODER_TARGETS))
    return lora_file_size(models, config.rank, extra_bytes=embedding_bytes(bundle, bundled_vectors) if bundled_vectors else 0)


def history_bytes(steps: int, every: int) -> int:
    return (steps // max(every, 1) + 2) * HISTORY_ENTRY_BYTES


def images_bytes(count: int, side: int) -> int:
    """An upper bound for `count` generated images of `side` px in PNG grids (uncompressed RGB) + the tables."""
    return count * side * side * 3 + REPORT_BYTES


def norm_stats_bytes(bundle) -> int:
    """The norm-statistics JSON (per-position centres of 77 tokens, ~24 characters a number) and its plot."""
    return 77 * sum(bundle.embedding_dims.values()) * 24 + REPORT_BYTES


def check_output_space(sizes: dict[Path | None, int]) -> None:
    """The disks have room for the outputs (`None` paths: not asked for)."""
    check_free_space({path: size for path, size in sizes.items() if path is not None})


Save = Callable[[Path, bool], Path]  # save(path, overwrite) -> the path written


def save_outputs(saves: list[tuple[str, Path, Save]], overwrite: bool) -> None:
    """Write each `(option, path, save)`; one that fails goes to the rescue folder, and then the command fails
    with one message saying what was written where.
    """
    failed = []
    for option, path, save in saves:
        try:
            save(path, overwrite)
        except OutputWriteError as err:
            failed.append(f"{option}: {err} {_rescue(path, save)}")
    if failed:
        raise OutputWriteError(" ".join(failed))


def _rescue(path: Path, save: Save) -> str:
    """Save to the rescue folder (a new name there); the sentence saying where it went, or that it did not."""
    folder = Path(tempfile.gettempdir()) / RESCUE_FOLDER
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip(".-") or "result"  # any name the user gave
    try:
        target = output_path(folder, stem, path.suffix, "increment")
        save(target, False)
    except OutputWriteError as err:
        return (f"It could not be saved in {folder} either ({err}): nothing of it was kept. Free space and run the "
                "command again.")  # fmt: skip
    logger.warning("saved %s to %s instead of %s", path.name, target, path)
    return f"The trained result was saved to {target} instead: move it to {path} once there is space; nothing needs training again."
