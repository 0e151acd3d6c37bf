"""`python -m pti_ops tune` (LoRA around a trained token) and `python -m pti_ops run` (both phases)."""

import argparse
import logging

from ..models import load_bundle
from .options import TerminalProgress, add_dataset_options, add_model_options, add_precision_options, write_json
from .invert import add_inversion_options, check_outputs, inversion_config_from, load_dataset_for
from ..files import load_embedding, save_embedding
from ..errors import InvalidInputError
from ..inversion import config_to_dict
from ..files import save_lora
from ..lora_tune import SCHEDULES, UNET_TARGETS, TuneConfig, run_tuning
from ..pivotal import run_pivotal_tuning
from ..placeholder import add_placeholder
from ..regularizer import INTERPOLATION_MODES, REGULARIZER_MODES, RegularizerConfig, check_centre_given

logger = logging.getLogger(__name__)


def add_tune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA tuning")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4).")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; updates are scaled by alpha/rank (default: rank).")
    g.add_argument("--targets", choices=tuple(UNET_TARGETS), default="attention", help="UNet layers that get LoRA (default: attention).")
    g.add_argument("--train-text-encoder", action="store_true", help="also put LoRA on the text encoder's attention.")
    g.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate (default: 1e-4).")
    g.add_argument("--steps", type=int, default=1000, help="LoRA optimiser steps (default: 1000).")
    g.add_argument("--batch-size", type=int, default=1, help="images per micro-batch (default: 1).")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default: 1).")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0).")
    g.add_argument("--max-timestep", type=int, default=None, help="train only on timesteps below this (default: all).")
    g.add_argument("--clip-skip", type=int, default=1, help="1 = last text-encoder layer, 2 = penultimate (default: 1).")
    g.add_argument("--history-every", type=int, default=10, help="record losses every N steps (default: 10).")
    add_precision_options(g)


def add_regularizer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("locality regulariser")
    g.add_argument("--reg", choices=REGULARIZER_MODES, default="none",
                   help="none; empty (prompt ''); class (class word instead of the token); path (SLERP between the "
                        "token prompt and the class prompt, per token position); sphere (random points at the same angle).")
    g.add_argument("--reg-weight", type=float, default=1.0, help="λ_R, weight of the locality loss (default: 1.0).")
    g.add_argument("--reg-t", type=float, default=0.5, help="position on the path, 0 = token prompt, 1 = class prompt (default: 0.5).")
    g.add_argument("--reg-t-range", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"), help="sample t in this range each time instead.")
    g.add_argument("--reg-every", type=int, default=1, help="apply the regulariser every N steps (default: 1).")
    g.add_argument("--reg-samples", type=int, default=1, help="regularisation conditionings per application (default: 1).")
    g.add_argument("--reg-anchor", default=None, help="class word of the regulariser (default: the token's initializer word).")
    g.add_argument("--reg-interp", choices=INTERPOLATION_MODES, default="slerp", help="slerp, or vslerp around the centres of --norm-stats.")
    g.add_argument("--reg-template", action="append", default=None, help="regulariser prompt template(s) with {} (default: the training templates).")
    g.add_argument("--norm-stats", default=None, help="norm statistics JSON (from `norm-stats --space hidden`) giving vSLERP centres.")


def tune_config_from(args: argparse.Namespace, templates: list[str], schedule: str = "sequential") -> TuneConfig:
    return TuneConfig(
        rank=args.rank, alpha=args.alpha, targets=args.targets, train_text_encoder=args.train_text_encoder,
        learning_rate=args.lr, steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        seed=args.seed, timestep_range=(0, args.max_timestep) if args.max_timestep else None, schedule=schedule,
        templates=templates, clip_skip=args.clip_skip, history_every=args.history_every,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        **({"ti_learning_rate": args.ti_lr, "ti_frac": args.ti_frac} if schedule == "joint" else {}),
    )


def regularizer_from(args: argparse.Namespace, anchor: str, templates: list[str]):
    """`(RegularizerConfig or None, centres or None)` from the command-line options."""
    if args.reg == "none":
        return None, None
    config = RegularizerConfig(
        mode=args.reg, anchor=args.reg_anchor or anchor, templates=args.reg_template or templates,
        interpolation=args.reg_interp, t=args.reg_t, t_range=tuple(args.reg_t_range) if args.reg_t_range else None,
        weight=args.reg_weight, every=args.reg_every, samples=args.reg_samples,
    )
    centres = None
    if args.norm_stats:
        from ..norm_stats import NormStats

        centres = NormStats.load_json(args.norm_stats).centre_for_positions()
    check_centre_given(config, centres)
    return config, centres


def add_tune_command(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="LoRA-tune the UNet around a trained token (the pivot), optionally regularised.",
        description="Pivotal tuning, step 2: the token's embedding (from `invert`) is frozen and LoRA adapters on the "
        "UNet are trained on the same images, optionally kept local by the SLERP regulariser. Writes a kohya-format "
        "LoRA that ComfyUI's LoraLoader and diffusers' load_lora_weights load.")
    add_model_options(p)
    add_dataset_options(p)
    p.add_argument("--embedding", required=True, help="the token's embedding file (.safetensors from `invert`).")
    p.add_argument("--token", default=None, help="placeholder word (default: the one recorded in the embedding file).")
    p.add_argument("--template", action="append", default=None, help="prompt template(s) with {} (default: 'an anime illustration of {}').")
    add_tune_options(p)
    add_regularizer_options(p)
    p.add_argument("--out", required=True, help="output LoRA file (.safetensors).")
    p.add_argument("--history", default=None, help="also write the loss history as JSON here.")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files.")
    p.set_defaults(handler=run_tune_command)


def run_tune_command(args: argparse.Namespace) -> int:
    _check_suffix(args.out, "--out")
    check_outputs(args, args.out, args.history)
    embedding = load_embedding(args.embedding)
    token_word = args.token or embedding.metadata.get("placeholder")
    if not token_word:
        raise InvalidInputError(f"the embedding {args.embedding} records no placeholder: give --token.")
    templates = args.template or ["an anime illustration of {}"]
    config = tune_config_from(args, templates)
    initializer = embedding.metadata.get("initializer", "character")
    regularizer, centres = regularizer_from(args, initializer, templates)
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    dataset = load_dataset_for(args, bundle)
    vectors = embedding.for_family(bundle.family, bundle.embedding_dim)
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, token_word, initializer, vectors=vectors)
    progress = TerminalProgress(config.steps, f"tune LoRA around {token_word}")
    try:
        result = run_tuning(bundle, dataset, token, config, regularizer, centres, on_step=progress)
    finally:
        progress.close()
    path = save_lora(args.out, result.lora, result.metadata(token, bundle.name), overwrite=args.overwrite)
    logger.info("wrote %s (%d tensors); final loss %.4g", path, len(result.lora), result.history[-1]["loss"])
    if args.history:
        write_json(args.history, {"config": config.to_dict(), "regularizer": result.regularizer, "history": result.history},
                   overwrite=args.overwrite)
    return 0


def add_run_command(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="both phases: invert a token, then LoRA-tune around it.",
        description="Pivotal tuning end to end: textual inversion of the token (`sequential`), or token and LoRA "
        "together until --ti-frac (`joint`), then the LoRA with the token frozen. Writes the embedding and the LoRA.")
    add_model_options(p)
    add_dataset_options(p)
    add_inversion_options(p, prefix="ti-")
    add_tune_options(p)
    add_regularizer_options(p)
    p.add_argument("--schedule", choices=SCHEDULES, default="sequential", help="sequential (invert, then tune) or joint.")
    p.add_argument("--ti-frac", type=float, default=0.5, help="joint: fraction of the LoRA steps the token trains for (default: 0.5).")
    p.add_argument("--out-embedding", required=True, help="output embedding file (.safetensors).")
    p.add_argument("--out-lora", required=True, help="output LoRA file (.safetensors).")
    p.add_argument("--history", default=None, help="also write both phases' histories as JSON here.")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files.")
    p.set_defaults(handler=run_run_command)


def run_run_command(args: argparse.Namespace) -> int:
    _check_suffix(args.out_embedding, "--out-embedding")
    _check_suffix(args.out_lora, "--out-lora")
    check_outputs(args, args.out_embedding, args.out_lora, args.history)
    inversion = inversion_config_from(args, prefix="ti_")
    tuning = tune_config_from(args, inversion.templates, args.schedule)
    regularizer, centres = regularizer_from(args, inversion.initializer, inversion.templates)
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    dataset = load_dataset_for(args, bundle)
    total = tuning.steps + (inversion.steps if args.schedule == "sequential" else 0)
    progress = TerminalProgress(total, f"pivotal tuning of {inversion.placeholder}")
    try:
        result = run_pivotal_tuning(bundle, dataset, inversion, tuning, regularizer, centres, on_step=progress)
    finally:
        progress.close()
    meta = result.inversion.metadata(bundle.name) if result.inversion else {
        "placeholder": inversion.placeholder, "initializer": inversion.initializer, "schedule": "joint", "base_model": bundle.name}
    save_embedding(args.out_embedding, result.tuning.vectors, bundle.family, meta, overwrite=args.overwrite)
    save_lora(args.out_lora, result.tuning.lora, result.tuning.metadata(result.token, bundle.name), overwrite=args.overwrite)
    logger.info("wrote %s and %s", args.out_embedding, args.out_lora)
    if args.history:
        write_json(args.history, {
            "inversion": {"config": config_to_dict(inversion), "history": result.inversion.history} if result.inversion else None,
            "tuning": {"config": tuning.to_dict(), "regularizer": result.tuning.regularizer, "history": result.tuning.history},
        }, overwrite=args.overwrite)
    return 0


def _check_suffix(path: str, option: str) -> None:
    if not path.endswith(".safetensors"):
        raise InvalidInputError(f"{option} {path!r} must end in .safetensors.")
