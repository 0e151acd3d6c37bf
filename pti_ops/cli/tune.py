"""`python -m pti_ops tune` (LoRA around a trained token) and `python -m pti_ops run` (both phases)."""

import argparse
import logging
import sys
from pathlib import Path

from ..checks import default_of
from ..errors import InvalidInputError
from ..lora_tune import SCHEDULES, UNET_TARGETS, TuneConfig, tune_around
from ..models import load_bundle
from ..pivot import Pivot
from ..pivotal import pivotal_tune
from ..placeholder import DEFAULT_TEMPLATES
from ..regularizer import INTERPOLATION_MODES, MODES, REGULARIZER_MODES, RegularizerConfig
from .invert import add_inversion_options, history_save, inversion_config_from, load_dataset_for, timestep_range_from
from .option_words import in_option_words
from .outputs import check_output_files, check_output_space, embedding_bytes, history_bytes, lora_bytes, save_outputs
from .options import (TerminalProgress, add_dataset_options, add_model_options, add_precision_options, add_preview_options,
                      add_training_options, at_resolution, previews_for, snapshots_for, training_options_from)

logger = logging.getLogger(__name__)


def _tune_default(name: str):
    return default_of(TuneConfig, name)


def _reg_default(name: str):
    return default_of(RegularizerConfig, name)


def add_tune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA tuning")
    g.add_argument("--rank", type=int, default=_tune_default("rank"), help=f"LoRA rank (default: {_tune_default('rank')}).")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha; updates are scaled by alpha/rank (default: rank).")
    g.add_argument("--targets", choices=tuple(UNET_TARGETS), default=_tune_default("targets"),
                   help=f"UNet layers that get LoRA (default: {_tune_default('targets')}).")
    g.add_argument("--train-text-encoder", action="store_true", help="also put LoRA on the text encoders' attention (SDXL: both).")
    g.add_argument("--lr", type=float, default=_tune_default("learning_rate"), help=f"LoRA learning rate (default: {_tune_default('learning_rate'):g}).")
    g.add_argument("--steps", type=int, default=_tune_default("steps"), help=f"LoRA optimiser steps (default: {_tune_default('steps')}).")
    g.add_argument("--batch-size", type=int, default=_tune_default("batch_size"), help=f"images per micro-batch (default: {_tune_default('batch_size')}).")
    g.add_argument("--grad-accum", type=int, default=_tune_default("gradient_accumulation_steps"),
                   help=f"micro-batches per optimiser step (default: {_tune_default('gradient_accumulation_steps')}).")
    g.add_argument("--seed", type=int, default=_tune_default("seed"), help=f"random seed (default: {_tune_default('seed')}).")
    g.add_argument("--max-timestep", type=int, default=None, help=argparse.SUPPRESS)  # the older name of --t-max
    g.add_argument("--clip-skip", type=int, default=_tune_default("clip_skip"),
                   help="1 = last text-encoder layer, 2 = penultimate (default: the model family's, 1 for SD1.5, 2 for SDXL).")
    g.add_argument("--history-every", type=int, default=_tune_default("history_every"),
                   help=f"record losses every N steps (default: {_tune_default('history_every')}).")
    add_precision_options(g)
    add_training_options(g)
    add_preview_options(g)
    g.add_argument("--offload-text-encoders", action="store_true",
                   help="move the text encoders to the CPU once every prompt is encoded (SDXL's two take 1.6 GB in bf16); "
                        "not with the joint schedule or --train-text-encoder, which train through them.")


def add_regularizer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("locality regulariser")
    g.add_argument("--reg", choices=REGULARIZER_MODES, default="none",
                   help="; ".join(f"{name} ({spec.summary})" for name, spec in MODES.items()) + " (default: none).")
    g.add_argument("--reg-weight", type=float, default=_reg_default("weight"),
                   help=f"λ_R, weight of the locality loss (default: {_reg_default('weight')}).")
    g.add_argument("--reg-t", type=float, default=_reg_default("t"),
                   help=f"position on the path, 0 = token prompt, 1 = class prompt (default: {_reg_default('t')}).")
    g.add_argument("--reg-t-range", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"), help="sample t in this range each time instead.")
    g.add_argument("--reg-every", type=int, default=_reg_default("every"), help=f"apply the regulariser every N steps (default: {_reg_default('every')}).")
    g.add_argument("--reg-samples", type=int, default=_reg_default("samples"),
                   help=f"regularisation conditionings per application (default: {_reg_default('samples')}).")
    g.add_argument("--reg-anchor", default=None, help="class word of the regulariser (default: the token's initializer word).")
    g.add_argument("--reg-interp", choices=INTERPOLATION_MODES, default=_reg_default("interpolation"),
                   help="slerp, or vslerp around the centres of --norm-stats.")
    g.add_argument("--reg-template", action="append", default=None, help="regulariser prompt template(s) with {} (default: the training templates).")
    g.add_argument("--norm-stats", default=None,
                   help="norm statistics JSON (from `norm-stats --space hidden`, every text encoder) giving the vSLERP "
                   "centres (SDXL: both encoders' and the pooled conditioning's).")


# `TuneConfig` and `RegularizerConfig` field → the dest of the option that fills it, where the two differ.
TUNE_FIELDS = {"learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "timestep_range": "--t-min/--t-max",
               "ti_learning_rate": "ti_lr", "templates": "template"}
REGULARIZER_FIELDS = {"mode": "reg", "anchor": "reg_anchor", "templates": "reg_template", "interpolation": "reg_interp",
                      "centre": "norm_stats", "t": "reg_t", "t_range": "reg_t_range", "weight": "reg_weight",
                      "every": "reg_every", "samples": "reg_samples"}


def tune_config_from(args: argparse.Namespace, templates: list[str], schedule: str = "sequential") -> TuneConfig:
    with in_option_words(args, TUNE_FIELDS):
        return _tune_config(args, templates, schedule)


def _tune_config(args: argparse.Namespace, templates: list[str], schedule: str) -> TuneConfig:
    joint = schedule == "joint"
    return TuneConfig(
        rank=args.rank, alpha=args.alpha, targets=args.targets, train_text_encoder=args.train_text_encoder,
        learning_rate=args.lr, steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        seed=args.seed, timestep_range=timestep_range_from(args), schedule=schedule,
        templates=templates, clip_skip=args.clip_skip, history_every=args.history_every,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        offload_text_encoders=args.offload_text_encoders, **training_options_from(args),
        ti_learning_rate=args.ti_lr if joint else _tune_default("ti_learning_rate"),
        ti_frac=args.ti_frac if joint else _tune_default("ti_frac"),
    )


def regularizer_from(args: argparse.Namespace, anchor: str, templates: list[str]) -> RegularizerConfig | None:
    """The regulariser of the command-line options (None for `--reg none`), its vSLERP centre inside."""
    if args.reg == "none":
        return None
    centre = pooled_centre = None
    if args.norm_stats:  # SDXL's statistics give every encoder's per-position centres and the pooled one
        from ..norm_stats import load_norm_stats

        stats = load_norm_stats(args.norm_stats)
        centre, pooled_centre = stats.centre_for_positions(), stats.pooled_centre()
    with in_option_words(args, REGULARIZER_FIELDS):
        return _regularizer(args, anchor, templates, centre, pooled_centre)


def _regularizer(args: argparse.Namespace, anchor: str, templates: list[str], centre, pooled_centre) -> RegularizerConfig:
    return RegularizerConfig(
        mode=args.reg, anchor=args.reg_anchor or anchor, templates=args.reg_template or templates,
        interpolation=args.reg_interp, centre=centre, pooled_centre=pooled_centre, t=args.reg_t,
        t_range=tuple(args.reg_t_range) if args.reg_t_range else None,
        weight=args.reg_weight, every=args.reg_every, samples=args.reg_samples,
    )


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
    p.add_argument("--template", action="append", default=None, help=f"prompt template(s) with {{}} (default: {DEFAULT_TEMPLATES[0]!r}).")
    add_tune_options(p)
    add_regularizer_options(p)
    p.add_argument("--out", required=True, help="output LoRA file (.safetensors).")
    p.add_argument("--bundle-embedding", action="store_true", help="also put the token's embedding into the LoRA file "
                   "(bundle_emb.TOKEN.clip_l, as OneTrainer writes it): one file per character, for PivotalLoRALoader.")
    p.add_argument("--history", default=None, help="also write the loss history as JSON here.")
    p.add_argument("--checkpoint", default=None, help="resumable checkpoint of the run, written when it is interrupted "
                   "(Ctrl-C) and every --checkpoint-every steps; continue with --resume.")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also write --checkpoint every N steps (default: only on interrupt).")
    p.add_argument("--resume", default=None, help="continue the run saved in this checkpoint (same settings; --steps may grow): "
                   "the result is bit-identical to an uninterrupted run on the CPU.")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files.")
    p.set_defaults(handler=run_tune_command, option_fields={**TUNE_FIELDS, **REGULARIZER_FIELDS})


def run_tune_command(args: argparse.Namespace) -> int:
    _check_suffix(args.out, "--out")
    outputs = check_output_files({"--out": args.out, "--history": args.history}, args.overwrite)
    if args.checkpoint_every is not None and args.checkpoint is None:
        raise InvalidInputError("--checkpoint-every needs --checkpoint PATH to write to.")
    if args.resume is not None and not Path(args.resume).is_file():
        raise InvalidInputError(f"--resume {args.resume!r}: no such checkpoint file.")
    config_templates = args.template or list(DEFAULT_TEMPLATES)
    config = tune_config_from(args, config_templates)
    snapshots, previews = snapshots_for(args, args.out), previews_for(args, args.out)
    if snapshots is not None:
        snapshots.check(config.steps)
    if previews is not None:
        previews.check(config.steps)
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    pivot = Pivot.load(args.embedding, bundle, placeholder=args.token)
    regularizer = regularizer_from(args, pivot.initializer, config_templates)
    bundled = pivot.vectors.shape[0] if args.bundle_embedding else 0
    check_output_space({outputs["--out"]: lora_bytes(bundle, config, bundled),
                        outputs.get("--history"): history_bytes(config.steps, config.history_every)})  # fmt: skip
    dataset = load_dataset_for(args, bundle)
    at_resolution(previews, dataset.resolution)
    progress = TerminalProgress(config.steps, f"tune LoRA around {pivot.placeholder}")
    try:
        result = tune_around(bundle, dataset, pivot, config, regularizer, on_step=progress, checkpoint=args.checkpoint,
                             resume_from=args.resume, checkpoint_every=args.checkpoint_every, snapshots=snapshots,
                             previews=previews)
    except KeyboardInterrupt:
        if args.checkpoint is None:
            raise
        print(f"interrupted: no LoRA was written; the run is saved in {args.checkpoint}: continue it with "
              f"--resume {args.checkpoint}.", file=sys.stderr)
        return 130
    finally:
        progress.close()
    history = {"config": config.to_dict(), "regularizer": result.regularizer, "history": result.history}
    save_outputs([("--out", outputs["--out"], lambda path, overwrite: result.save(path, overwrite=overwrite,
                                                                                bundle_embedding=args.bundle_embedding))]
                 + history_save(outputs, history), args.overwrite)  # fmt: skip
    logger.info("wrote %s (%d tensors); final loss %.4g", outputs["--out"], len(result.lora), result.history[-1]["loss"])
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
    p.add_argument("--ti-frac", type=float, default=_tune_default("ti_frac"),
                   help=f"joint: fraction of the LoRA steps the token trains for (default: {_tune_default('ti_frac')}).")
    p.add_argument("--out-embedding", required=True, help="output embedding file (.safetensors).")
    p.add_argument("--out-lora", required=True, help="output LoRA file (.safetensors).")
    p.add_argument("--bundle-embedding", action="store_true", help="also put the token's embedding into the LoRA file "
                   "(bundle_emb.TOKEN.clip_l, as OneTrainer writes it): one file per character, for PivotalLoRALoader.")
    p.add_argument("--history", default=None, help="also write both phases' histories as JSON here.")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files.")
    # Fields both phases have (steps, learning_rate) are named where each config is built.
    p.set_defaults(handler=run_run_command, option_fields={**REGULARIZER_FIELDS, "timestep_range": "--t-min/--t-max"})


def run_run_command(args: argparse.Namespace) -> int:
    _check_suffix(args.out_embedding, "--out-embedding")
    _check_suffix(args.out_lora, "--out-lora")
    outputs = check_output_files({"--out-embedding": args.out_embedding, "--out-lora": args.out_lora,
                                  "--history": args.history}, args.overwrite)  # fmt: skip
    inversion = inversion_config_from(args, prefix="ti_")
    tuning = tune_config_from(args, inversion.templates, args.schedule)
    inversion_snapshots = snapshots_for(args, args.out_embedding) if args.schedule == "sequential" else None
    tuning_snapshots = snapshots_for(args, args.out_lora)
    previews = previews_for(args, args.out_lora)
    for snapshots, steps in ((inversion_snapshots, inversion.steps), (tuning_snapshots, tuning.steps)):
        if snapshots is not None:
            snapshots.check(steps)
    regularizer = regularizer_from(args, inversion.initializer, inversion.templates)
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    bundled = inversion.num_vectors if args.bundle_embedding else 0
    check_output_space({outputs["--out-embedding"]: embedding_bytes(bundle, inversion.num_vectors),
                        outputs["--out-lora"]: lora_bytes(bundle, tuning, bundled),
                        outputs.get("--history"): history_bytes(inversion.steps + tuning.steps, tuning.history_every)})
    dataset = load_dataset_for(args, bundle)
    at_resolution(previews, dataset.resolution)
    total = tuning.steps + (inversion.steps if args.schedule == "sequential" else 0)
    progress = TerminalProgress(total, f"pivotal tuning of {inversion.placeholder}")
    try:
        result = pivotal_tune(bundle, dataset, inversion, tuning, regularizer, on_step=progress,
                              inversion_snapshots=inversion_snapshots, tuning_snapshots=tuning_snapshots, previews=previews)
    finally:
        progress.close()
    history = {
        "inversion": {"config": inversion.to_dict(), "history": result.inversion.history} if result.inversion else None,
        "tuning": {"config": tuning.to_dict(), "regularizer": result.tuning.regularizer, "history": result.tuning.history},
    }
    save_outputs([  # each file on its own: a LoRA that cannot be written does not lose the embedding
        ("--out-embedding", outputs["--out-embedding"], lambda path, overwrite: result.pivot.save(path, overwrite=overwrite)),
        ("--out-lora", outputs["--out-lora"],
         lambda path, overwrite: result.tuning.save(path, overwrite=overwrite, bundle_embedding=args.bundle_embedding)),
    ] + history_save(outputs, history), args.overwrite)  # fmt: skip
    logger.info("wrote %s and %s", args.out_embedding, args.out_lora)
    return 0


def _check_suffix(path: str, option: str) -> None:
    if not path.endswith(".safetensors"):
        raise InvalidInputError(f"{option} {path!r} must end in .safetensors.")
