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
    add_dataset_training_options(parser)


def add_dataset_training_options(parser: argparse.ArgumentParser) -> None:
    """Aspect-ratio buckets, masked loss and tag captions: options of the images that every training reads."""
    from ..checks import default_of
    from ..dataset import DatasetConfig
    from ..image_masks import MASK_SOURCES

    def default(name: str):
        return default_of(DatasetConfig, name)

    g = parser.add_argument_group("buckets, masks and tag captions")
    g.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets: each image keeps its aspect ratio, resized to the bucket of nearest aspect "
                        "ratio at about the resolution's pixel area, instead of a centre-cropped square; a batch holds one "
                        "bucket's images (the histogram is printed at the start).")
    g.add_argument("--bucket-step", type=int, default=default("bucket_step"),
                   help="bucket sides are multiples of this many pixels (default: 64 from 256 px up, resolution/8 below, "
                        "rounded up to what the model needs).")
    g.add_argument("--mask-from", choices=MASK_SOURCES, default=default("mask_from"),
                   help="loss masks: none; alpha (each image's alpha channel: the transparent background stays out of the "
                        "loss); files (NAME_mask.png beside NAME.png, white counts, black does not). "
                        f"Default: {default('mask_from')}.")
    g.add_argument("--mask-floor", type=float, default=default("mask_floor"),
                   help=f"loss weight outside the mask, 0 to 1 (default: {default('mask_floor'):g}).")
    g.add_argument("--shuffle-tags", action="store_true",
                   help="captions are comma-separated tags (booru style): shuffle them each time they are drawn.")
    g.add_argument("--keep-tokens", type=int, default=default("keep_tokens"),
                   help=f"with --shuffle-tags, the first N tags stay in place; a caption without {{}} gets the token "
                        f"prepended as its first tag (default: {default('keep_tokens')}).")
    g.add_argument("--caption-dropout", type=float, default=default("caption_dropout"),
                   help=f"probability that a drawn caption is replaced by the empty prompt, as kohya's caption_dropout_rate "
                        f"(default: {default('caption_dropout'):g}).")


def dataset_training_settings(args: argparse.Namespace, resolution: int, multiple: int) -> dict:
    """The `DatasetConfig` fields of the options `add_dataset_training_options` declared.

    Args:
        resolution (`int`): the training resolution.
        multiple (`int`): the model's `resolution_multiple`, which the default bucket step is rounded up to.
    """
    from ..aspect_buckets import default_bucket_step

    step = args.bucket_step
    if args.buckets and step is None:
        step = default_bucket_step(resolution, multiple)
    return dict(buckets=args.buckets, bucket_step=step, mask_from=args.mask_from, mask_floor=args.mask_floor,
                shuffle_tags=args.shuffle_tags, keep_tokens=args.keep_tokens, caption_dropout=args.caption_dropout)


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """Memory/speed options of the training commands."""
    from ..training import MIXED_PRECISION_MODES

    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_MODES, default="no",
                        help="autocast the forward passes to bf16 or fp16 (fp16: GPU only); trained weights stay float32.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass: less memory, about 30%% slower.")


def add_training_options(parser) -> None:
    """Optimiser, schedule and loss options (`TrainingOptions`, shared by both phases of `run`)."""
    from ..checks import default_of
    from ..training import LR_SCHEDULES, OPTIMIZERS, TrainingOptions

    def default(name):
        return default_of(TrainingOptions, name)

    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=default("optimizer"),
                        help="adamw (default); adafactor; prodigy (pip install prodigyopt; it sets its own step size: "
                             "give --lr 1, and --ti-lr 1 in `run`).")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=default("lr_schedule"),
                        help="learning-rate schedule after --warmup-steps of linear warm-up (default: constant).")
    parser.add_argument("--warmup-steps", type=int, default=default("warmup_steps"),
                        help="steps of linear warm-up from 0 (not with --lr-schedule constant; default: 0).")
    parser.add_argument("--snr-gamma", type=float, default=default("snr_gamma"),
                        help="min-SNR-γ loss weighting, e.g. 5 (default: off).")
    parser.add_argument("--noise-offset", type=float, default=default("noise_offset"),
                        help="offset noise per image and channel, e.g. 0.05 (default: 0, off).")
    parser.add_argument("--t-min", type=int, default=None, help="lowest training timestep (default: 0).")
    parser.add_argument("--t-max", type=int, default=None, help="highest training timestep, exclusive (default: the schedule's length).")
    parser.add_argument("--save-every", type=int, default=None,
                        help="also write the embedding / LoRA every N steps beside the output, as NAME_stepNNNN.safetensors "
                             "(pick the step before the LoRA learns the images' positions; default: off).")


def add_preview_options(parser) -> None:
    """Preview images along the run (`invert`, `tune`, `run`)."""
    parser.add_argument("--preview-every", type=int, default=None,
                        help="sample preview images every N steps (and at the end) into --preview-dir as step_NNNN.png "
                             "grids (default: off; costs a sampling of every prompt and seed each time).")
    parser.add_argument("--preview-prompt", action="append", default=None,
                        help="prompt of the previews, with {} for the token; repeat for several (default: 'an anime illustration of {}').")
    parser.add_argument("--preview-seeds", default="0", help="comma-separated seeds of the previews (default: 0).")
    parser.add_argument("--preview-steps", type=int, default=20, help="sampling steps of a preview (default: 20).")
    parser.add_argument("--preview-dir", default=None, help="folder of the preview grids (default: previews/ beside the output).")


def previews_for(args, output_path, resolution: int | None = None):
    """The `--preview-every` previews of a command writing `output_path` (None when off), sampled at `resolution`."""
    if args.preview_every is None:
        return None
    from ..metrics import PreviewConfig, Previews, SamplingConfig

    try:
        seeds = [int(s) for s in args.preview_seeds.split(",") if s.strip()]
    except ValueError:
        raise InvalidInputError(f"--preview-seeds {args.preview_seeds!r} must be comma-separated whole numbers, e.g. 0,1,2.") from None
    layer = {"clip_skip": args.clip_skip} if getattr(args, "clip_skip", None) else {}
    sampling = SamplingConfig(steps=args.preview_steps, resolution=resolution, **layer)
    config = PreviewConfig(args.preview_every, args.preview_prompt or ["an anime illustration of {}"], seeds, sampling)
    folder = Path(args.preview_dir) if args.preview_dir else Path(output_path).parent / "previews"
    return Previews(config, folder, overwrite=args.overwrite)


def at_resolution(previews, resolution: int):
    """`previews` sampled at the dataset's `resolution` (known once the dataset is loaded)."""
    if previews is not None:
        from dataclasses import replace

        previews.config.sampling = replace(previews.config.sampling, resolution=resolution)
    return previews


def snapshots_for(args, path) -> "Snapshots | None":
    """The `--save-every` snapshots beside output `path` (None when off)."""
    from ..training import Snapshots

    return None if args.save_every is None else Snapshots(path, args.save_every, overwrite=args.overwrite)


def training_options_from(args) -> dict:
    """The `TrainingOptions` fields of the parsed options, as keyword arguments."""
    return {"optimizer": args.optimizer, "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps,
            "snr_gamma": args.snr_gamma, "noise_offset": args.noise_offset}


def add_sampling_options(parser, steps_option: str = "--steps", batch_option: str = "--batch-size",
                         resolution_option: str = "--resolution") -> None:  # fmt: skip
    """How evaluation images are generated; the defaults are `SamplingConfig`'s.

    Args:
        parser: the command's parser or one of its argument groups.
        steps_option (`str`): the option of the sampling steps (`--sample-steps` where `--steps` trains).
        batch_option (`str`): the option of the sampling batch size (`--sample-batch-size` likewise).
        resolution_option (`str`): the option of the image side (`--sample-resolution` where `--resolution`
            is the training images').
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
                             "with it (default: the model family's: 1 for SD1.5, 2 for SDXL).")
    parser.add_argument(resolution_option, dest="sample_resolution", type=int, default=default.resolution,
                        help="side of the generated images in pixels, a multiple of the model's latent factor; SDXL's "
                             "size time ids follow it (default: the model's native size, 512 for SD1.5, 1024 for SDXL).")


def sampling_config(args: argparse.Namespace):
    """The `SamplingConfig` of the options `add_sampling_options` declared."""
    from ..metrics import SamplingConfig
    from .option_words import in_option_words

    with in_option_words(args, {"steps": "sample_steps", "cfg_scale": "cfg", "batch_size": "sample_batch_size",
                                "resolution": "sample_resolution"}):
        return SamplingConfig(steps=args.sample_steps, cfg_scale=args.cfg, sampler=args.sampler,
                              batch_size=args.sample_batch_size, clip_skip=args.clip_skip, resolution=args.sample_resolution)


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
