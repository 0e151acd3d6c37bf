"""Options and helpers that several commands share: model, dataset, sampling and precision options,
the terminal progress bar, JSON output."""

import argparse
import json
import sys
from pathlib import Path

from .. import limits
from ..errors import InvalidInputError

# Options whose cost grows with their value, by dest, and their limit (`limits.py`); `--no-limits` lifts them.
LIMITED_OPTIONS = {
    "resolution": limits.MAX_RESOLUTION, "steps": limits.MAX_STEPS, "ti_steps": limits.MAX_STEPS,
    "sample_steps": limits.MAX_SAMPLE_STEPS, "batch_size": limits.MAX_BATCH_SIZE,
    "sample_batch_size": limits.MAX_BATCH_SIZE, "grad_accum": limits.MAX_GRADIENT_ACCUMULATION,
    "rank": limits.MAX_RANK, "reg_samples": limits.MAX_REG_SAMPLES,
}


def add_limits_option(parser: argparse.ArgumentParser) -> None:
    """`--no-limits` on a command that has limited options."""
    shown = ", ".join(f"{name} {LIMITED_OPTIONS[dest]}" for dest, name in sorted(_limited(parser).items()))
    parser.add_argument("--no-limits", action="store_true",
                        help=f"accept values above the documented limits ({shown}): for deliberate very large runs.")


def _limited(parser: argparse.ArgumentParser) -> dict[str, str]:
    from .option_words import option_names

    return {dest: name for dest, name in option_names(parser).items() if dest in LIMITED_OPTIONS}


def check_seed(value: int, option: str = "--seed") -> int:
    """A seed torch's generators take (0 … 2^64 - 1, as ComfyUI's seed widgets)."""
    if not 0 <= value <= limits.MAX_SEED:
        raise InvalidInputError(f"{option} must be a whole number from 0 to {limits.MAX_SEED}, got {value}.")
    return value


def check_limits(args: argparse.Namespace) -> None:
    """Refuse a seed out of range, and a limited option above its limit (before anything loads) unless `--no-limits`."""
    if isinstance(getattr(args, "seed", None), int):
        check_seed(args.seed)
    if getattr(args, "no_limits", True):
        return
    for dest, limit in LIMITED_OPTIONS.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and value > limit:
            option = args.option_names.get(dest, dest)
            raise InvalidInputError(
                f"{option} {value} is above its limit of {limit} (see README, Limits): a typo would otherwise ask "
                f"for days of compute or more memory than the machine has. Give a smaller value, or pass --no-limits "
                "to go past it deliberately."
            )


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
    parser.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images, and images of a refused size (over 64 Mpx, or a shorter side under a "
                        "quarter of the resolution), out with a warning instead of stopping.")


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """Memory/speed options of the training commands."""
    from ..training import MIXED_PRECISION_MODES

    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_MODES, default="no",
                        help="autocast the forward passes to bf16 or fp16 (fp16: GPU only); trained weights stay float32.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass: less memory, about 30%% slower.")


def add_sampling_options(parser, steps_option: str = "--steps", batch_option: str = "--batch-size") -> None:
    """How evaluation images are generated; the defaults are `SamplingConfig`'s.

    Args:
        parser: the command's parser or one of its argument groups.
        steps_option (`str`): the option of the sampling steps (`--sample-steps` where `--steps` trains).
        batch_option (`str`): the option of the sampling batch size (`--sample-batch-size` likewise).
    """
    from ..metrics import SAMPLERS, SamplingConfig

    default = SamplingConfig()
    parser.add_argument(steps_option, dest="sample_steps", type=int, default=default.steps,
                        help=f"sampling steps per image (default: {default.steps}).")
    parser.add_argument("--cfg", type=float, default=default.cfg_scale,
                        help=f"classifier-free guidance scale (default: {default.cfg_scale:g}).")
    parser.add_argument("--sampler", choices=SAMPLERS, default=default.sampler,
                        help=f"{' or '.join(SAMPLERS)} (default: {default.sampler}).")
    parser.add_argument(batch_option, dest="sample_batch_size", type=int, default=default.batch_size,
                        help=f"images generated together (default: {default.batch_size}).")
    parser.add_argument("--clip-skip", type=int, default=default.clip_skip,
                        help="1 = last text-encoder layer, 2 = penultimate, as the model is used; a sweep also trains "
                             f"with it (default: {default.clip_skip}).")


def sampling_config(args: argparse.Namespace):
    """The `SamplingConfig` of the options `add_sampling_options` declared."""
    from ..metrics import SamplingConfig
    from .option_words import in_option_words

    with in_option_words(args, {"steps": "sample_steps", "cfg_scale": "cfg", "batch_size": "sample_batch_size"}):
        return SamplingConfig(steps=args.sample_steps, cfg_scale=args.cfg, sampler=args.sampler,
                              batch_size=args.sample_batch_size, clip_skip=args.clip_skip)


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
