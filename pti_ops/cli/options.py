"""Options and helpers that several commands share: model, dataset and precision options, the
terminal progress bar, JSON output."""

import argparse
import json
import sys
from pathlib import Path


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    parser.add_argument("--model", required=True, help="`tiny` (random test model), a diffusers folder, or an SD1.5 .safetensors checkpoint.")
    parser.add_argument("--tokenizer-dir", default=None, help="folder with CLIP's vocab.json and merges.txt, for single-file checkpoints (see README).")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cpu).")


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """Options that describe the training images."""
    parser.add_argument("--images", required=True, help="folder of .png/.jpg/.webp images of the character (optional NAME.txt captions beside them).")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution in pixels (default: the model's native size, 512 for SD1.5).")
    parser.add_argument("--flip", action="store_true", help="also train on mirrored images.")
    parser.add_argument("--captions", default="template", choices=["template", "files", "files_or_template"],
                        help="where prompts come from: the templates, NAME.txt files (with {} for the placeholder), or files where present.")
    parser.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out with a warning instead of stopping.")


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """Memory/speed options of the training commands."""
    from ..training import MIXED_PRECISION_MODES

    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_MODES, default="no",
                        help="autocast the forward passes to bf16 or fp16 (fp16: GPU only); trained weights stay float32.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass: less memory, about 30%% slower.")


class TerminalProgress:
    """`on_step` callback drawing a tqdm bar with the latest loss and distance."""

    def __init__(self, total: int, description: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, step: int, total: int, logs: dict) -> None:
        self.bar.update(step - self.bar.n)
        shown = {k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()


def write_json(path: str | Path, data, overwrite: bool = True) -> Path:
    """Write `data` as indented JSON atomically."""
    from ..files import atomic_write

    text = json.dumps(data, indent=2, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"), overwrite=overwrite)
