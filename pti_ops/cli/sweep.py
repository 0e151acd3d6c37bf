"""`python -m pti_ops sweep`: the notes' learning-rate sweeps (inversion or LoRA) into a report folder.

Writes into `--out`: `sweep.csv` (one row per evaluated model), `sweep.json` (rows, summary,
settings, the distance traces), `sweep.md`, `plots/*.png` and `grids/*.png`. Every input is checked
and the output folder refused (unless `--overwrite`) before any model is trained. Nothing is
evaluated during training: the inversion's snapshots are evaluated after each run, every
`--eval-every` steps (default: the last step only).
"""

import argparse
import logging
from pathlib import Path

from ..checks import default_of
from ..errors import InvalidInputError
from ..files import check_output_folder, load_embedding
from ..lora_tune import UNET_TARGETS
from ..metrics import DEFAULT_EDIT_PROMPTS, DEFAULT_PROMPTS
from ..models import load_bundle
from ..regularizer import REGULARIZER_MODES, RegularizerConfig
from ..sweeps import (
    DEFAULT_KNEE_THRESHOLD,
    DEFAULT_ONSET_FRACTION,
    SweepConfig,
    check_fraction,
    check_learning_rates,
    check_sweep_kind,
    regularizers_for_modes,
    run_sweep,
)
from .evaluate import add_lpips_option, build_scorers, parse_seeds
from .invert import load_dataset_for
from .option_words import in_option_words
from .outputs import check_output_space, embedding_bytes, images_bytes, lora_bytes
from .options import (
    TerminalProgress,
    add_dataset_options,
    add_model_options,
    add_precision_options,
    add_sampling_options,
    sampling_config,
)

logger = logging.getLogger(__name__)

def _default(name: str):
    return default_of(SweepConfig, name)


def add_sweep_command(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="learning-rate sweep of the inversion or of the LoRA, with plots and image grids.",
        description="Repeat the notes' experiments: `--kind inversion` inverts the token once per learning rate at "
        "fixed steps and measures reconstruction and editability against the distance the token travelled (and "
        "fits distance vs lr x steps); `--kind lora` tunes a LoRA around a trained token (--embedding) once per "
        "learning rate and regulariser and measures reconstruction, diversity, position spread and locality.")
    add_model_options(p)
    add_dataset_options(p)
    p.add_argument("--kind", required=True, help="inversion (token learning rates) or lora (LoRA learning rates; needs --embedding).")
    p.add_argument("--lrs", required=True, help="comma-separated learning rates, one run each, e.g. 1e-4,5e-4,2e-3,5e-3.")
    p.add_argument("--steps", type=int, default=_default("steps"),
                   help=f"optimiser steps of every run (the notes fix 1000; default: {_default('steps')}).")
    p.add_argument("--embedding", default=None, help="lora: the trained token's embedding file (the pivot, from `invert`).")
    p.add_argument("--token", default=None, help="placeholder word (default: the embedding's, else tok1).")
    p.add_argument("--init-word", default=None, help="class word: the token's initializer and the edit prompts' reference (default: the embedding's, else character).")
    p.add_argument("--num-vectors", type=int, default=_default("num_vectors"),
                   help=f"inversion: embedding vectors behind the token (default: {_default('num_vectors')}).")
    p.add_argument("--template", action="append", default=None, help=f"training prompt template with {{}}; repeat for several (default: {_default('templates')[0]!r}).")
    p.add_argument("--seed", type=int, default=_default("seed"), help=f"training seed, the same in every run (default: {_default('seed')}).")
    p.add_argument("--batch-size", type=int, default=_default("batch_size"),
                   help=f"training images per step (default: {_default('batch_size')}).")
    p.add_argument("--history-every", type=int, default=_default("history_every"),
                   help=f"record distance and loss every N steps (the points of the distance fit; default: {_default('history_every')}).")
    p.add_argument("--eval-every", type=int, default=None,
                   help="inversion: evaluate the snapshots every N steps (a multiple of --history-every) and the last; "
                        "evaluation costs far more than training steps (default: the last step only).")
    g = p.add_argument_group("LoRA (--kind lora)")
    g.add_argument("--rank", type=int, default=_default("rank"), help=f"LoRA rank (default: {_default('rank')}).")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank).")
    g.add_argument("--targets", choices=tuple(UNET_TARGETS), default=_default("targets"),
                   help=f"UNet layers that get LoRA (default: {_default('targets')}).")
    g.add_argument("--reg", default="none", help=f"comma-separated regularisers, each run at every lr: {', '.join(REGULARIZER_MODES)} (default: none).")
    g.add_argument("--reg-weight", type=float, default=default_of(RegularizerConfig, "weight"),
                   help=f"λ_R of every regulariser (default: {default_of(RegularizerConfig, 'weight')}).")
    g.add_argument("--reg-t", type=float, default=default_of(RegularizerConfig, "t"),
                   help=f"position on the path, 0 = token prompt, 1 = class prompt (default: {default_of(RegularizerConfig, 't')}).")
    g = p.add_argument_group("evaluation")
    g.add_argument("--prompts", action="append", default=None, help=f"training prompt with {{}}; repeat (default: {DEFAULT_PROMPTS[0]!r}).")
    g.add_argument("--edit-prompts", action="append", default=None, help="edit prompt with {}; repeat (default: three built-in edits).")
    seeds = ",".join(map(str, _default("sample_seeds")))
    g.add_argument("--seeds", default=seeds, help=f"comma-separated sampling seeds, the same for every run (default: {seeds}).")
    add_sampling_options(g, steps_option="--sample-steps", batch_option="--sample-batch-size",
                         resolution_option="--sample-resolution")  # fmt: skip
    g.add_argument("--clip-model", default=None, help="local transformers CLIPModel folder for the CLIP scores (nothing is downloaded).")
    add_lpips_option(g)
    g.add_argument("--knee-threshold", type=float, default=DEFAULT_KNEE_THRESHOLD,
                   help="inversion knee: gain per unit distance below this fraction of the initial gain (default: 0.5).")
    g.add_argument("--onset-fraction", type=float, default=DEFAULT_ONSET_FRACTION,
                   help="LoRA onset: position spread below this fraction of the base model's (default: 0.5).")
    add_precision_options(p)
    p.add_argument("--out", required=True, help="report folder (sweep.csv, sweep.json, sweep.md, plots/, grids/).")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing the report's files.")
    p.set_defaults(handler=run_sweep_command)


def parse_learning_rates(text: str) -> list[float]:
    """`"1e-4,5e-4"` → `[1e-4, 5e-4]`, checked (positive, no repeats)."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise InvalidInputError(f"--lrs {text!r} must be comma-separated numbers, e.g. 1e-4,5e-4,2e-3,5e-3.") from err
    return check_learning_rates(values)  # its messages name `learning_rates`: --lrs where the sweep is built


def run_sweep_command(args: argparse.Namespace) -> int:
    # 1. Check every input before loading or training anything.
    check_sweep_kind(args.kind)
    check_output_folder(args.out, args.overwrite, what="--out", hint="pass --overwrite")
    with in_option_words(args, SWEEP_FIELDS):
        lrs = parse_learning_rates(args.lrs)
        knee_threshold = check_fraction("knee_threshold", args.knee_threshold)
        onset_fraction = check_fraction("onset_fraction", args.onset_fraction)
    embedding, token, init_word = _token_names(args, args.kind)
    templates = args.template or _default("templates")
    if args.kind == "inversion" and args.reg != "none":
        logger.warning("--reg is ignored by the inversion sweep (it applies to --kind lora).")
    regularizers = [None]
    sampling, seeds = sampling_config(args), parse_seeds(args.seeds)
    with in_option_words(args, SWEEP_FIELDS):
        if args.kind == "lora":
            regularizers = regularizers_for_modes(args.reg.split(","), anchor=init_word, templates=templates,
                                                  t=args.reg_t, weight=args.reg_weight, what="--reg")  # fmt: skip
        config = _sweep_config(args, lrs, token, init_word, templates, regularizers, sampling, seeds, knee_threshold,
                               onset_fraction)  # fmt: skip
    scorers = build_scorers(args)  # an explicit --lpips alex/vgg without its file stops here
    # 2. Load once for the dataset; that bundle serves the first run, later runs load fresh ones.
    first = [load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)]
    check_output_space({Path(args.out) / "sweep.json": _report_bytes(config, first[0])})
    dataset = load_dataset_for(args, first[0])
    vectors = None if embedding is None else embedding.vectors_for(first[0].family, first[0].embedding_dims)

    def bundle_factory():
        return first.pop() if first else load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)

    progress = TerminalProgress(config.total_steps, f"{config.kind} sweep, {config.runs} run(s)")
    try:
        report = run_sweep(config, bundle_factory, dataset, scorers, token_vectors=vectors, on_progress=progress,
                           settings={"model": args.model, "images": args.images, "embedding": args.embedding,
                                     "clip_model": args.clip_model, "lpips": args.lpips})  # fmt: skip
    finally:
        progress.close()
    logger.info("%s", "\n".join(f"{key}: {value}" for key, value in report.summary.items()))
    return 0


# `SweepConfig` (and its regularisers', inversion's and evaluation's) field → dest, where they differ.
SWEEP_FIELDS = {"learning_rates": "lrs", "learning_rate": "lrs", "placeholder": "token", "initializer": "init_word",
                "class_word": "init_word", "templates": "template", "sample_seeds": "seeds", "regularizers": "reg",
                "t": "reg_t", "weight": "reg_weight"}


def _sweep_config(args, lrs, token, init_word, templates, regularizers, sampling, seeds, knee_threshold,
                  onset_fraction) -> SweepConfig:  # fmt: skip
    return SweepConfig(
        kind=args.kind, learning_rates=lrs, steps=args.steps, placeholder=token, initializer=init_word,
        num_vectors=args.num_vectors, templates=templates, batch_size=args.batch_size, seed=args.seed,
        clip_skip=args.clip_skip, history_every=args.history_every, eval_every=args.eval_every, rank=args.rank,
        alpha=args.alpha, targets=args.targets, regularizers=regularizers,
        prompts=args.prompts or list(DEFAULT_PROMPTS),
        edit_prompts=args.edit_prompts if args.edit_prompts is not None else list(DEFAULT_EDIT_PROMPTS),
        sample_seeds=seeds, sampling=sampling, knee_threshold=knee_threshold,
        onset_fraction=onset_fraction, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, out=Path(args.out), overwrite=args.overwrite,
    )  # fmt: skip


def _report_bytes(config: SweepConfig, bundle) -> int:
    """The report folder's expected size: every run's trained file, two thumbnail grids, tables and plots."""
    if config.kind == "inversion":
        per_run = embedding_bytes(bundle, config.num_vectors)
    else:
        per_run = lora_bytes(bundle, config.training_config())
    side = config.sampling.resolution or bundle.unet.config.sample_size * bundle.vae_scale_factor
    return config.runs * per_run + 2 * images_bytes((config.runs + 1) * len(config.sample_seeds), side)


def _token_names(args: argparse.Namespace, kind: str):
    """`(EmbeddingFile or None, token, class word)`; the LoRA sweep reads them from --embedding."""
    if kind == "inversion":
        if args.embedding:
            logger.warning("--embedding is ignored by the inversion sweep: it learns the token from --init-word.")
        return None, args.token or "tok1", args.init_word or "character"
    if not args.embedding:
        raise InvalidInputError("--kind lora needs --embedding: the trained token the LoRA is tuned around (from `invert`).")
    embedding = load_embedding(args.embedding)
    token = args.token or embedding.metadata.get("placeholder") or "tok1"
    init_word = args.init_word or embedding.metadata.get("initializer") or "character"
    return embedding, token, init_word
