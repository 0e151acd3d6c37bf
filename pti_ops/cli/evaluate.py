"""`python -m pti_ops evaluate`: generate fixed prompt × seed sets and write the metrics report.

Writes into `--out`: `metrics.json` (values, descriptions, reasons, per-image details, settings),
`metrics.md` (one table) and `grid.png` (every generation, a row per prompt, a column per seed).
"""

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ..checks import check_number, default_of
from ..dataset import DatasetConfig, load_image_folder
from ..errors import InvalidInputError
from ..files import atomic_write, check_output_folder, load_embedding, load_lora
from ..pivot import Pivot
from ..metrics import DEFAULT_EDIT_PROMPTS, DEFAULT_PROMPTS, LPIPS_CHOICES, EvaluationConfig, Scorers, evaluate_tuned
from ..metrics import evaluate_series, load_scorers, sampling_side, series_table, snapshot_files
from ..models import load_bundle
from .option_words import in_option_words
from .outputs import check_output_space, images_bytes
from .options import add_model_options, add_sampling_options, check_seed, sampling_config, write_json

logger = logging.getLogger(__name__)

OUTPUT_FILES = ("metrics.json", "metrics.md", "grid.png")


def add_evaluate_command(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="measure reconstruction, editability, locality, diversity and distance of a tuned model.",
        description="Generate images for fixed prompts and seeds with a model (+ embedding, + LoRA) and score them. "
        "CLIP scores need a local CLIPModel folder; without one they are reported as not computed.",
    )
    add_model_options(p)
    p.add_argument("--embedding", default=None, help="trained embedding file (.safetensors or .pt) to load as --token; or a "
                   "folder of --save-every snapshots (NAME_stepNNNN.safetensors), each evaluated in turn.")
    p.add_argument("--token", default=None, help="placeholder word that fills {} in prompts (default: the embedding's, else tok1).")
    p.add_argument("--init-word", default=None,
                   help="class word: the embedding's initializer (distances start there), the word edit prompts are scored "
                        "with and of default locality prompts (default: the embedding's, else character).")
    p.add_argument("--lora", default=None, help="kohya LoRA file (.safetensors) to apply; or a folder of --save-every LoRA "
                   "snapshots, each evaluated in turn (with --embedding, or with the token a joint snapshot carries).")
    p.add_argument("--lora-strength", type=float, default=1.0, help="LoRA multiplier: 1 = as trained, 0 = base model (default: 1.0).")
    p.add_argument("--images", default=None, help="folder of the training images (reconstruction is not computed without it).")
    p.add_argument("--prompts", action="append", default=None, help=f"training prompt with {{}} for the token; repeat for several (default: {DEFAULT_PROMPTS[0]!r}).")
    p.add_argument("--edit-prompts", action="append", default=None, help="edit prompt with {} for the token; repeat for several (default: three built-in edits).")
    p.add_argument("--locality-prompts", action="append", default=None, help="prompt without the token for locality; repeat (default: the prompts with the class word).")
    seeds = ",".join(map(str, default_of(EvaluationConfig, "seeds")))
    p.add_argument("--seeds", default=seeds, help=f"comma-separated seeds, the same in every set (default: {seeds}).")
    add_sampling_options(p)
    p.add_argument("--clip-model", default=None, help="local transformers CLIPModel folder for the CLIP scores (nothing is downloaded).")
    add_lpips_option(p)
    p.add_argument("--out", required=True, help="report folder (metrics.json, metrics.md, grid.png).")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files.")
    p.set_defaults(handler=run_evaluate_command)


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` → `[0, 1, 2]`."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise InvalidInputError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2,3.") from err
    if not seeds:
        raise InvalidInputError("--seeds is empty: give comma-separated integers, e.g. 0,1,2,3.")
    return [check_seed(seed, "each of --seeds") for seed in seeds]


def fill_names_from_embedding(args: argparse.Namespace, embedding: str | Path | None = None) -> dict[str, str]:
    """Read the embedding's metadata (`embedding`, default --embedding); default --token and --init-word to the names
    it was trained with."""
    embedding = embedding if embedding is not None else args.embedding
    metadata = load_embedding(embedding).metadata if embedding else {}
    for option, key, default in (("token", "placeholder", "tok1"), ("init_word", "initializer", "character")):
        recorded = metadata.get(key)
        if getattr(args, option) is None:
            setattr(args, option, recorded or default)
        elif recorded and recorded != getattr(args, option):
            logger.warning("--%s %s differs from the embedding's %s %r.", option.replace("_", "-"), getattr(args, option), key, recorded)
    return metadata


def build_config(args: argparse.Namespace) -> EvaluationConfig:
    """The evaluation settings from the command line (checked before any model is loaded)."""
    sampling, seeds = sampling_config(args), parse_seeds(args.seeds)
    with in_option_words(args, {"placeholder": "token", "class_word": "init_word"}):
        check_number("lora_strength", args.lora_strength)  # NaN would blank every generation
        return EvaluationConfig(
            prompts=args.prompts or list(DEFAULT_PROMPTS),
            edit_prompts=args.edit_prompts if args.edit_prompts is not None else list(DEFAULT_EDIT_PROMPTS),
            locality_prompts=args.locality_prompts, placeholder=args.token, class_word=args.init_word,
            seeds=seeds, sampling=sampling,
        )


def add_lpips_option(parser) -> None:
    """`--lpips` of `evaluate` and `sweep`."""
    parser.add_argument("--lpips", choices=LPIPS_CHOICES, default="auto",
                        help="LPIPS backbone: auto = alex where torchvision's weights are in the torch hub cache, else "
                             "the LPIPS scores are reported as not computed, with the reason; alex or vgg = required "
                             "(a missing file stops before any generation); random = untrained backbone, only to test "
                             "the pipeline; off = not computed (default: auto).")


def build_scorers(args: argparse.Namespace) -> Scorers:
    """LPIPS and CLIP scorers of the options (`metrics.load_scorers`); an explicit --lpips alex/vgg must load."""
    return load_scorers(args.lpips, args.clip_model, args.device, required=True, what="--lpips", clip_what="--clip-model")


def run_evaluate_command(args: argparse.Namespace) -> int:
    if any(path and Path(path).is_dir() for path in (args.embedding, args.lora)):
        return evaluate_snapshot_folder(args)
    out = check_output_folder(args.out, args.overwrite, what="--out", hint="pass --overwrite", files=OUTPUT_FILES)
    fill_names_from_embedding(args)
    config = build_config(args)
    scorers = build_scorers(args)
    lora = load_lora(args.lora)[0] if args.lora else None  # a damaged file stops before the model loads
    bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)
    pivot = Pivot.load(args.embedding, bundle, placeholder=args.token, initializer=args.init_word) if args.embedding else None
    side = sampling_side(bundle, config.sampling.resolution)
    prompt_sets = len(config.prompts) + len(config.edit_prompts) + len(config.locality_prompts or config.prompts)
    check_output_space({out / "grid.png": images_bytes(prompt_sets * len(config.seeds), side)})
    dataset = load_image_folder(args.images, DatasetConfig(resolution=side), skip_hint=None) if args.images else None
    logger.info("model %s: generating with %d seed(s) per prompt", bundle.name, len(config.seeds))
    result = evaluate_tuned(bundle, config, scorers, pivot=pivot, lora=lora, lora_strength=args.lora_strength,
                            dataset=dataset)  # fmt: skip
    result.report.settings.update(embedding=args.embedding, lora=args.lora, lora_strength=args.lora_strength,
                                  images=args.images, clip_model=args.clip_model, lpips=args.lpips)
    write_report(out, result, args.overwrite)
    logger.info("%s", result.report.to_markdown())
    logger.info("wrote %s", ", ".join(str(out / name) for name in OUTPUT_FILES))
    return 0


SERIES_FILES = ("series.json", "series.md")


def evaluate_snapshot_folder(args: argparse.Namespace) -> int:
    """`--embedding DIR` or `--lora DIR`: each snapshot evaluated with the same prompts and seeds; a report per
    snapshot in `--out/NAME/` and one table of every metric against the step (`series.json`, `series.md`)."""
    if args.embedding and args.lora and Path(args.embedding).is_dir():
        raise InvalidInputError("give one folder of snapshots: --embedding DIR (embeddings) or --lora DIR (LoRAs), not both.")
    kind = "lora" if args.lora and Path(args.lora).is_dir() else "embedding"
    files = snapshot_files(args.lora if kind == "lora" else args.embedding)
    out = check_output_folder(args.out, args.overwrite, what="--out", hint="pass --overwrite", files=SERIES_FILES)
    fill_names_from_embedding(args, files[0][1] if kind == "embedding" else None)
    config, scorers = build_config(args), build_scorers(args)

    def load_pivot(path, bundle):
        names = dict(placeholder=args.token, initializer=args.init_word)
        if kind == "embedding":
            return Pivot.load(path, bundle, **names)
        if path is not None:  # a joint snapshot: the token of its step is inside
            return Pivot.from_lora_file(path, bundle, **names)
        return Pivot.load(args.embedding, bundle, **names) if args.embedding else None

    def fresh_bundle():
        return load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir)

    side = sampling_side(fresh_bundle(), config.sampling.resolution)
    dataset = load_image_folder(args.images, DatasetConfig(resolution=side), skip_hint=None) if args.images else None
    logger.info("evaluating %d %s file(s) of %s", len(files), kind, args.lora if kind == "lora" else args.embedding)
    entries = evaluate_series(fresh_bundle, config, files, kind, scorers, load_pivot, args.lora_strength, dataset)
    for entry in entries:
        write_report(out / entry.file.name[: -len(".safetensors")], entry.result, args.overwrite)
    rows, markdown = series_table(entries)
    write_json(out / "series.json", {"kind": kind, "rows": rows}, overwrite=args.overwrite)
    atomic_write(out / "series.md", lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"), overwrite=args.overwrite)
    logger.info("%s", markdown)
    logger.info("wrote %s and a report per file", ", ".join(str(out / name) for name in SERIES_FILES))
    return 0


def write_report(out: Path, result, overwrite: bool) -> None:
    """metrics.json, metrics.md and grid.png, each written atomically."""
    write_json(out / "metrics.json", result.report.to_dict(), overwrite=overwrite)
    markdown = result.report.to_markdown()
    atomic_write(out / "metrics.md", lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"), overwrite=overwrite)
    grid = (np.clip(result.grid(), 0, 1) * 255 + 0.5).astype(np.uint8)
    atomic_write(out / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"), overwrite=overwrite)
