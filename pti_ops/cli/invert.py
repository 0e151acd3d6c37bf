"""`python -m pti_ops invert`: textual inversion of a placeholder token from an image folder."""

import argparse
import logging
from pathlib import Path

from ..checks import default_of
from ..dataset import DatasetConfig, ImageDataset, load_image_folder
from ..errors import InvalidInputError
from ..inversion import NORM_MODES, InversionConfig, invert
from ..models import load_bundle
from ..placeholder import DEFAULT_TEMPLATES
from .option_words import in_option_words
from .outputs import check_output_files, check_output_space, embedding_bytes, history_bytes, save_outputs
from .options import (TerminalProgress, add_dataset_options, add_model_options, add_precision_options, add_preview_options,
                      add_training_options, at_resolution, dataset_training_settings, previews_for, snapshots_for,
                      training_options_from, write_json)

logger = logging.getLogger(__name__)


def add_invert_command(subparsers) -> None:
    p = subparsers.add_parser(
        "invert",
        help="learn a new token's embedding from images (textual inversion).",
        description="Textual inversion: learn the embedding of a new placeholder token from images of a character. "
        "Only the placeholder's rows are trained; the model is frozen. Writes a .safetensors embedding that "
        "ComfyUI (embedding:NAME) and diffusers (load_textual_inversion) load.",
    )
    add_model_options(p)
    add_dataset_options(p)
    add_inversion_options(p)
    p.add_argument("--batch-size", type=int, default=default_of(InversionConfig, "batch_size"),
                   help=f"images per micro-batch (default: {default_of(InversionConfig, 'batch_size')}).")
    p.add_argument("--grad-accum", type=int, default=default_of(InversionConfig, "gradient_accumulation_steps"),
                   help=f"micro-batches per optimiser step (default: {default_of(InversionConfig, 'gradient_accumulation_steps')}).")
    p.add_argument("--seed", type=int, default=default_of(InversionConfig, "seed"),
                   help=f"random seed; the same seed gives the same embedding on CPU (default: {default_of(InversionConfig, 'seed')}).")
    p.add_argument("--clip-skip", type=int, default=default_of(InversionConfig, "clip_skip"),
                   help="1 = last text-encoder layer, 2 = penultimate (default: the model's, 1 for SD1.5 and 2 for SDXL).")
    p.add_argument("--history-every", type=int, default=default_of(InversionConfig, "history_every"),
                   help=f"record loss and distances every N steps (default: {default_of(InversionConfig, 'history_every')}).")
    add_precision_options(p)
    add_training_options(p)
    add_preview_options(p)
    p.add_argument("--out", required=True, help="output embedding file (.safetensors).")
    p.add_argument("--history", default=None, help="also write the run's history (loss, distance, norm, cosine, nearest tokens) as JSON here.")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files.")
    p.set_defaults(handler=run_invert_command, option_fields=inversion_fields())


def add_inversion_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The inversion's options; `prefix` (e.g. `ti-`) names steps and lr apart from the LoRA's."""
    g = p.add_argument_group("textual inversion")
    g.add_argument("--token", default=default_of(InversionConfig, "placeholder"),
                   help=f"placeholder word to learn, used in prompts (default: {default_of(InversionConfig, 'placeholder')}).")
    g.add_argument("--init-word", default=default_of(InversionConfig, "initializer"),
                   help=f"class word the embedding starts from (default: {default_of(InversionConfig, 'initializer')}).")
    g.add_argument("--num-vectors", type=int, default=default_of(InversionConfig, "num_vectors"),
                   help=f"embedding vectors behind the token: more capacity, less editability (default: {default_of(InversionConfig, 'num_vectors')}).")
    g.add_argument("--template", action="append", default=None,
                   help=f"prompt template with {{}} for the token; repeat for several (default: {DEFAULT_TEMPLATES[0]!r}).")
    g.add_argument(f"--{prefix}steps", type=int, default=default_of(InversionConfig, "steps"),
                   help=f"inversion optimiser steps (default: {default_of(InversionConfig, 'steps')}).")
    g.add_argument(f"--{prefix}lr", type=float, default=default_of(InversionConfig, "learning_rate"),
                   help=f"inversion learning rate; distance travelled grows with lr x steps (default: {default_of(InversionConfig, 'learning_rate'):g}).")
    g.add_argument("--norm-mode", choices=NORM_MODES, default=default_of(InversionConfig, "norm_mode"),
                   help="none; pull (pull the norm toward the vocabulary's mean norm); fixed (train the direction only).")
    g.add_argument("--norm-strength", type=float, default=default_of(InversionConfig, "norm_strength"),
                   help=f"weight of the pull term (default: {default_of(InversionConfig, 'norm_strength')}).")


def inversion_fields(prefix: str = "") -> dict[str, str]:
    """`InversionConfig` field → the dest of the option that fills it, where the two differ."""
    return {"placeholder": "token", "initializer": "init_word", "templates": "template", "steps": f"{prefix}steps",
            "learning_rate": f"{prefix}lr", "gradient_accumulation_steps": "grad_accum",
            "timestep_range": "--t-min/--t-max"}


def inversion_config_from(args: argparse.Namespace, prefix: str = "") -> InversionConfig:
    """The `InversionConfig` of the parsed options (`prefix` as given to `add_inversion_options`, with `_`)."""
    with in_option_words(args, inversion_fields(prefix)):
        return _inversion_config(args, prefix)


def _inversion_config(args: argparse.Namespace, prefix: str) -> InversionConfig:
    return InversionConfig(
        placeholder=args.token, initializer=args.init_word, num_vectors=args.num_vectors,
        templates=args.template or list(DEFAULT_TEMPLATES), steps=getattr(args, f"{prefix}steps"),
        learning_rate=getattr(args, f"{prefix}lr"), batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        seed=args.seed, timestep_range=timestep_range_from(args), norm_mode=args.norm_mode,
        norm_strength=args.norm_strength, clip_skip=args.clip_skip, history_every=args.history_every,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        **training_options_from(args),
    )


# `DatasetConfig` field → dest, where they differ.
DATASET_FIELDS = {"caption_source": "captions", "on_bad_image": "skip_bad_images"}


def load_dataset_for(args: argparse.Namespace, bundle) -> ImageDataset:
    """The image folder of the options, at `--resolution` or the model's native size."""
    resolution = args.resolution or bundle.unet.config.sample_size * bundle.vae_scale_factor
    with in_option_words(args, DATASET_FIELDS):
        dataset = load_image_folder(args.images, DatasetConfig(
            resolution=resolution, flip=args.flip, caption_source=args.captions,
            on_bad_image="skip" if args.skip_bad_images else "error",
            **dataset_training_settings(args, resolution, bundle.resolution_multiple),
        ), skip_hint="pass --skip-bad-images")
    logger.info("model %s, %d image(s) at %d px", bundle.name, len(dataset), resolution)
    return dataset


def timestep_range_from(args: argparse.Namespace) -> tuple[int, int] | None:
    t_min, t_max = getattr(args, "t_min", None), getattr(args, "t_max", None)
    if getattr(args, "max_timestep", None) is not None:
        t_max = args.max_timestep
    if t_min is None and t_max is None:
        return None
    return (t_min or 0, t_max if t_max is not None else 1000)


def run_invert_command(args: argparse.Namespace) -> int:
    if not args.out.endswith(".safetensors"):
        raise InvalidInputError(f"--out {args.out!r} must end in .safetensors.")
    outputs = check_output_files({"--out": args.out, "--history": args.history}, args.overwrite)
    config = inversion_config_from(args)
    snapshots, previews = snapshots_for(args, args.out), previews_for(args, args.out)
    if snapshots is not None:
        snapshots.check(config.steps)
    if previews is not None:
        previews.check(config.steps)
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    check_output_space({outputs["--out"]: embedding_bytes(bundle, config.num_vectors),
                        outputs.get("--history"): history_bytes(config.steps, config.history_every)})  # fmt: skip
    dataset = load_dataset_for(args, bundle)
    at_resolution(previews, dataset.resolution)
    progress = TerminalProgress(config.steps, f"invert {config.placeholder}")
    try:
        result = invert(bundle, dataset, config, on_step=progress, snapshots=snapshots, previews=previews)
    finally:
        progress.close()
    history = {"config": config.to_dict(), "vocabulary_norm": result.vocabulary_norm, "history": result.history}
    save_outputs([("--out", outputs["--out"], lambda path, overwrite: result.save(path, overwrite=overwrite))]
                 + history_save(outputs, history), args.overwrite)  # fmt: skip
    last = result.history[-1]
    logger.info("wrote %s (%d vector(s)); distance from init %.4g, norm %.4g, cos %.3f",
                outputs["--out"], result.token.num_vectors, last["distance"], last["norm"], last["cosine"])
    return 0


def history_save(outputs: dict[str, Path], data: dict) -> list:
    """The `save_outputs` entry of --history (none when not asked for)."""
    if "--history" not in outputs:
        return []
    return [("--history", outputs["--history"], lambda path, overwrite: write_json(path, data, overwrite=overwrite))]
