"""PivotalEvaluate and PivotalSweep: the metrics of a tuned model, and the learning-rate sweeps of the notes.

Both delegate to the core (`pti_ops.metrics.evaluation.evaluate`, `pti_ops.sweeps.run.inversion_sweep` /
`lora_sweep`). A scorer whose weights are not on disk (LPIPS backbone, CLIP model folder) makes its
metrics "not computed" with the reason; nothing is downloaded.
"""

import logging
import math

import torch

from ..pti_ops.errors import InvalidInputError, ModelLoadError, OutputExistsError
from ..pti_ops.files import check_output_name
from ..pti_ops.inversion import InversionConfig
from ..pti_ops.lora_tune import TuneConfig
from ..pti_ops.metrics import dataset_images
from ..pti_ops.metrics import try_load_clip
from ..pti_ops.metrics import DEFAULT_EDIT_PROMPTS, DEFAULT_PROMPTS, EvaluationConfig, Scorers, evaluate
from ..pti_ops.metrics import LPIPS_NETS, load_lpips
from ..pti_ops.metrics import SAMPLERS, SamplingConfig, apply_embedding, apply_lora
from ..pti_ops.sweeps import inversion_sweep, lora_sweep
from ..pti_ops.sweeps import check_learning_rates
from ..pti_ops.sweeps import SWEEP_KINDS
from . import bridge
from ..pti_ops.pivot import Pivot
from .common import MEMORY_OPTIONS, OVERWRITE, SEED, TEMPLATES, history_every, split_lines

logger = logging.getLogger(__name__)

CATEGORY = "pivotal_tuning/analysis"
DEFAULT_CLASS_WORD = "character"
LPIPS_CHOICES = (*LPIPS_NETS, "off")

# Widgets both nodes share (the evaluation's prompts, seeds, sampling and scorers).
PROMPTS = (
    "STRING",
    {
        "default": "\n".join(DEFAULT_PROMPTS),
        "multiline": True,
        "tooltip": "Training-like prompts, one per line, with {} where the token goes: reconstruction (against the "
        "dataset's images), diversity and position spread are measured on their generations.",
    },
)
EDIT_PROMPTS = (
    "STRING",
    {
        "default": "\n".join(DEFAULT_EDIT_PROMPTS),
        "multiline": True,
        "tooltip": "Prompts that ask for changes, one per line, with {}: editability (CLIP text-image score against the "
        "prompt with the class word in place of {}, the TI paper's protocol; needs a CLIP model). Empty: not measured.",
    },
)
SAMPLE_SEEDS = (
    "STRING",
    {
        "default": "0,1,2,3",
        "tooltip": "Comma-separated sampling seeds, one image per seed and prompt, the same in every set and run so "
        "results compare image for image. More seeds: steadier numbers, proportionally slower.",
    },
)
SAMPLE_STEPS = (
    "INT",
    {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps per image: more are cleaner and proportionally slower."},
)
CFG = (
    "FLOAT",
    {
        "default": 5.0,
        "min": 0.0,
        "max": 100.0,
        "step": 0.1,
        "round": 0.01,
        "tooltip": "Classifier-free guidance. Higher values follow the prompt more closely but vary less; 1 skips the "
        "unconditional pass (half the work).",
    },
)
SAMPLER = (
    list(SAMPLERS),
    {"default": "ddim", "tooltip": "ddim (deterministic) or euler; both from the model's training schedule."},
)
RESOLUTION = (
    "INT",
    {
        "default": 0,
        "min": 0,
        "max": 2048,
        "step": 8,
        "tooltip": "Side of the generated images in pixels; 0 = the model's native size (512 for SD1.5). Smaller is "
        "much faster; the dataset's images are resized to it for reconstruction.",
    },
)
SAMPLE_BATCH = (
    "INT",
    {"default": 4, "min": 1, "max": 64, "tooltip": "Images generated together: faster on a GPU, more memory; no image changes."},
)
LPIPS = (
    list(LPIPS_CHOICES),
    {
        "default": "alex",
        "tooltip": "LPIPS backbone: alex (LPIPS' default) or vgg, read from torchvision's weights in the torch hub cache "
        "(nothing is downloaded; a missing file makes the LPIPS metrics 'not computed' with where to put it). off: "
        "no LPIPS metrics (L2 and position spread remain).",
    },
)
CLIP_MODEL_FOLDER = (
    "STRING",
    {
        "default": "",
        "tooltip": "Optional local transformers CLIPModel folder (e.g. clip-vit-large-patch14 with config.json, weights "
        "and tokenizer files): an absolute path, or a folder inside models/clip_vision. Empty or missing: the CLIP "
        "metrics (editability, CLIP reconstruction) are 'not computed' with the reason.",
    },
)


# ---------------------------------------------------------------------------------------------
# Input parsing shared by both nodes
# ---------------------------------------------------------------------------------------------


def parse_ints(text: str, what: str) -> list[int]:
    """`"0, 1,2"` → `[0, 1, 2]`, or a message naming the input."""
    try:
        values = [int(item) for item in (text or "").replace(";", ",").split(",") if item.strip()]
    except ValueError as err:
        raise InvalidInputError(f"`{what}` {text!r} must be comma-separated whole numbers, e.g. 0,1,2,3.") from err
    if not values:
        raise InvalidInputError(f"`{what}` is empty: give comma-separated whole numbers, e.g. 0,1,2,3.")
    return values


def parse_floats(text: str, what: str) -> list[float]:
    """`"1e-4, 5e-4"` → `[1e-4, 5e-4]`, or a message naming the input."""
    try:
        values = [float(item) for item in (text or "").replace(";", ",").split(",") if item.strip()]
    except ValueError as err:
        raise InvalidInputError(f"`{what}` {text!r} must be comma-separated numbers, e.g. 1e-4,5e-4,2e-3.") from err
    return values


def _validation_message(check) -> bool | str:
    """True, or the message of the `InvalidInputError` that `check()` raises (for `VALIDATE_INPUTS`)."""
    try:
        check()
    except InvalidInputError as err:
        return str(err)
    return True


def sampling_config(clip, steps: int, cfg: float, sampler: str, resolution: int, batch_size: int) -> SamplingConfig:
    """Sampling settings with the CLIP's layer (CLIPSetLastLayer) as `clip_skip`."""
    return SamplingConfig(steps=steps, cfg_scale=float(cfg), sampler=sampler, batch_size=batch_size,
                          clip_skip=bridge.clip_skip(clip), resolution=resolution or None)  # fmt: skip


def load_scorers(lpips: str, clip_model_folder: str) -> Scorers:
    """LPIPS and CLIP scorers on ComfyUI's device; a missing one is None with the reason, never an error."""
    device = bridge.torch_device()
    folder = bridge.resolve_clip_folder(clip_model_folder) if clip_model_folder.strip() else None
    clip_scorer, clip_reason = try_load_clip(folder, device)
    if folder is None:
        clip_reason = "no CLIP model folder given (clip_model_folder): CLIP scores need a local transformers CLIPModel folder"
    if lpips == "off":
        return Scorers(None, clip_scorer, "LPIPS switched off (lpips = off)", clip_reason)
    try:
        model = load_lpips(lpips, device=device)
    except (ModelLoadError, ModuleNotFoundError) as err:  # MissingModelFileError included
        logger.warning("LPIPS metrics not computed: %s", err)
        return Scorers(None, clip_scorer, str(err), clip_reason)
    return Scorers(model, clip_scorer, "", clip_reason)


def _clip_folder_changed(clip_model_folder: str) -> str:
    if not clip_model_folder or not clip_model_folder.strip():
        return ""
    return bridge.stat_folder(bridge.resolve_clip_folder(clip_model_folder))


class _Batches:
    """`on_step` for `evaluate`: one ComfyUI progress step per generated batch, over all image sets."""

    def __init__(self, total: int):
        self.done, self.report = 0, bridge.progress(total)
        self.total = total

    def __call__(self, done: int, total: int, logs: dict) -> None:
        self.done = min(self.done + 1, self.total)
        self.report(self.done, self.total, logs)


# ---------------------------------------------------------------------------------------------
# PivotalEvaluate
# ---------------------------------------------------------------------------------------------


class PivotalEvaluate:
    """Generate fixed prompt × seed sets with a model (+ embedding, + LoRA) and score them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 model to evaluate; it is only read. Connect the base model "
                          "when you also connect `lora` (otherwise the LoRA would count twice)."}),  # fmt: skip
                "clip": ("CLIP", {"tooltip": "Its CLIP text encoder (CLIPSetLastLayer is honoured); it is only read."}),
                "vae": ("VAE", {"tooltip": "Its VAE: decodes the generations."}),
                "prompts": PROMPTS,
                "edit_prompts": EDIT_PROMPTS,
                "class_word": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The class word (TI protocol: edit prompts are scored with it in place of {}). "
                        "Empty: the embedding's initializer, else 'character'. Without an embedding {} is filled "
                        "with it (the base model's reference numbers).",
                    },
                ),
                "seeds": SAMPLE_SEEDS,
                "steps": SAMPLE_STEPS,
                "cfg": CFG,
                "sampler": SAMPLER,
                "resolution": RESOLUTION,
                "batch_size": SAMPLE_BATCH,
                "lpips": LPIPS,
                "clip_model_folder": CLIP_MODEL_FOLDER,
            },
            "optional": {
                "embedding": (
                    "PIVOTAL_EMBEDDING",
                    {"tooltip": "The trained token (TokenInversion): fills {} in the prompts; its distance from the "
                     "initializer is reported. Not connected: {} is the class word."},
                ),  # fmt: skip
                "lora": (
                    "LORA_MODEL",
                    {"tooltip": "The tuned LoRA (PivotalLoRATune's lora output, kohya keys), applied on top of `model` "
                     "so that locality (tuned vs base on prompts without the token) can be measured. A LoRA already "
                     "inside MODEL (LoraLoader) is evaluated too, but without locality."},
                ),  # fmt: skip
                "lora_strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                     "tooltip": "Multiplier of the connected `lora`: 1 = as trained, 0 = the base model."},
                ),  # fmt: skip
                "dataset": (
                    "PIVOTAL_DATASET",
                    {"tooltip": "The training images: reconstruction (LPIPS, L2, CLIP image similarity) compares each "
                     "generation of the prompts with its closest training image. Not connected: not computed."},
                ),  # fmt: skip
            },
        }

    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("metrics", "metrics_json", "grid")
    OUTPUT_TOOLTIPS = (
        "Markdown table: each metric's value (or 'not computed' and why) and what it measures.",
        "The same as JSON, with per-image details and the settings (for files or other tools).",
        "Every generation: a row per (set, prompt), a column per seed.",
    )
    FUNCTION = "evaluate"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Measures a tuned model with fixed prompts and seeds: reconstruction of the training images, editability "
        "(with a CLIP model), locality (with a LoRA: the base vs the tuned model on prompts without the token), "
        "diversity and position spread, and the token's distance from its initializer."
    )

    def evaluate(self, model, clip, vae, prompts, edit_prompts, class_word, seeds, steps, cfg, sampler, resolution,
                 batch_size, lpips, clip_model_folder, embedding: Pivot | None = None, lora=None,
                 lora_strength=1.0, dataset=None):  # fmt: skip
        class_word = class_word.strip() or (embedding.initializer if embedding is not None else DEFAULT_CLASS_WORD)
        if lora is not None and embedding is None:
            raise InvalidInputError(
                "`lora` is connected without its `embedding`: connect the embedding the LoRA was tuned around (the one "
                "PivotalLoRATune received); locality needs prompts without it."
            )
        settings = dict(
            prompts=split_lines(prompts), edit_prompts=split_lines(edit_prompts), class_word=class_word,
            seeds=parse_ints(seeds, "seeds"), sampling=sampling_config(clip, steps, cfg, sampler, resolution, batch_size),
        )  # fmt: skip
        if embedding is not None:
            settings["placeholder"] = embedding.placeholder
        else:  # {} is the class word: no prompt is without it, and nothing else changed anyway
            settings.update(placeholder=class_word, locality_prompts=[])
        config = EvaluationConfig(**settings)
        scorers = load_scorers(lpips, clip_model_folder)
        bundle = None
        try:
            with torch.inference_mode(False):
                bundle = bridge.bundle_from_comfy(model, clip, vae)
                token = None
                if embedding is not None:
                    token = apply_embedding(bundle, embedding.vectors.clone(), embedding.placeholder, embedding.initializer)
                if lora is not None:
                    apply_lora(bundle, {key: value.clone() for key, value in lora.items()}, lora_strength)
                training = None
                if dataset is not None:
                    side = config.sampling.resolution or bundle.unet.config.sample_size * bundle.vae_scale_factor
                    training = dataset_images(dataset, (side, side))
                bridge.check_interrupted()
                result = evaluate(bundle, config, scorers, training, token, on_step=_Batches(_batches(config, lora)))
            grid = result.grid()
        finally:
            bundle = scorers = None
            bridge.release()
        report = result.report
        report.settings.update(lora=lora is not None, lora_strength=lora_strength if lora is not None else None,
                               dataset=dataset is not None, lpips=lpips, clip_model_folder=clip_model_folder)  # fmt: skip
        return (report.to_markdown(), report.to_json(), bridge.image_from_array(grid))

    @classmethod
    def VALIDATE_INPUTS(cls, seeds=None):
        if seeds is None:
            return True
        return _validation_message(lambda: parse_ints(seeds, "seeds"))

    @classmethod
    def IS_CHANGED(cls, clip_model_folder="", **_):
        return _clip_folder_changed(clip_model_folder)


def _batches(config: EvaluationConfig, lora) -> int:
    """Generated batches of one evaluation (`evaluate` reports one progress step per batch)."""
    per_prompt = len(config.seeds)
    sets = [config.prompts, config.edit_prompts] + ([config.locality_prompts] * 2 if lora is not None else [])
    return sum(math.ceil(len(prompts) * per_prompt / config.sampling.batch_size) for prompts in sets if prompts)


# ---------------------------------------------------------------------------------------------
# PivotalSweep
# ---------------------------------------------------------------------------------------------


class PivotalSweep:
    """One training run per learning rate (and regulariser), each evaluated → table, plots, grids, report folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 model. It is only read; every run starts from it."}),
                "clip": ("CLIP", {"tooltip": "Its CLIP text encoder (CLIPSetLastLayer is honoured). It is only read."}),
                "vae": ("VAE", {"tooltip": "Its VAE: encodes the training images, decodes the evaluations."}),
                "dataset": ("PIVOTAL_DATASET", {"tooltip": "The character's training images (also the reconstruction target)."}),
                "kind": (
                    list(SWEEP_KINDS),
                    {
                        "default": "inversion",
                        "tooltip": "inversion: invert the token once per learning rate; reconstruction and editability "
                        "against the distance it travelled, the knee, the fit distance ≈ slope × lr × steps. lora: tune "
                        "a LoRA around the connected embedding once per learning rate (and regulariser); reconstruction, "
                        "diversity, position spread, locality and the lr where positions start to be learned.",
                    },
                ),
                "learning_rates": (
                    "STRING",
                    {
                        "default": "1e-4, 5e-4, 2e-3, 5e-3",
                        "tooltip": "Comma-separated learning rates, one training run each (the token's for inversion, the "
                        "LoRA's for lora). Each run costs `steps` training steps plus its evaluation.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 1000,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Training steps of every run (the notes fix 1000 and vary the learning rate, so the "
                        "distance travelled ≈ lr × steps).",
                    },
                ),
                "eval_every": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 100000,
                        "tooltip": "inversion: also evaluate the token every N steps along each run (more points on the "
                        "curves from the same runs; each evaluation costs far more than a training step). 0: the last "
                        "step only. Ignored by lora.",
                    },
                ),
                "placeholder": (
                    "STRING",
                    {"default": "tok1", "tooltip": "inversion: the new word being learned (not a word the tokenizer "
                     "knows). lora uses the embedding's."},
                ),  # fmt: skip
                "initializer": (
                    "STRING",
                    {"default": DEFAULT_CLASS_WORD, "tooltip": "inversion: the class word the token starts from and "
                     "edit prompts are scored with. lora uses the embedding's."},
                ),  # fmt: skip
                "templates": (
                    TEMPLATES[0],
                    {**TEMPLATES[1], "tooltip": TEMPLATES[1]["tooltip"] + " lora uses the embedding's templates when "
                     "it has them."},
                ),  # fmt: skip
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 64, "tooltip": "Training images per step (more memory, smoother steps)."},
                ),
                "seed": SEED,
                "lora_rank": (
                    "INT",
                    {"default": 4, "min": 1, "max": 256, "tooltip": "lora: LoRA rank of every run (capacity; 4-16 is light)."},
                ),
                "compare_without_regularizer": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "lora with a connected regularizer: also run every learning rate without it, so the "
                        "regulariser's effect shows side by side (twice the runs). Without a regularizer every run is "
                        "unregularised anyway.",
                    },
                ),
                "prompts": PROMPTS,
                "edit_prompts": EDIT_PROMPTS,
                "sample_seeds": SAMPLE_SEEDS,
                "sample_steps": SAMPLE_STEPS,
                "cfg": CFG,
                "sampler": SAMPLER,
                "resolution": RESOLUTION,
                "lpips": LPIPS,
                "clip_model_folder": CLIP_MODEL_FOLDER,
                "output_folder": (
                    "STRING",
                    {
                        "default": "pivotal_lr_sweep",
                        "tooltip": "Folder name inside ComfyUI's output folder for the report: sweep.csv/json/md, "
                        "plots/, grids/ and every evaluated embedding or LoRA (letters, digits, _ - .).",
                    },
                ),
                "overwrite": (
                    OVERWRITE[0],
                    {**OVERWRITE[1], "tooltip": "Write into a non-empty output folder, replacing the report's files. "
                     "Off: a non-empty folder stops the sweep before any training."},
                ),  # fmt: skip
            },
            "optional": {
                "embedding": (
                    "PIVOTAL_EMBEDDING",
                    {"tooltip": "lora: the trained token the LoRAs are tuned around (TokenInversion). Needed for lora, "
                     "ignored by inversion."},
                ),  # fmt: skip
                "regularizer": (
                    "PIVOTAL_REGULARIZER",
                    {"tooltip": "lora: the locality regulariser (SlerpRegularizer) of the runs; see "
                     "compare_without_regularizer. Ignored by inversion."},
                ),  # fmt: skip
                **MEMORY_OPTIONS,
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("table", "plot", "grid")
    OUTPUT_TOOLTIPS = (
        "Markdown: the summary (fit, knee or onset), one row per evaluated model, what was not computed and why.",
        "The sweep's plots (inversion: curves vs distance and the distance fit; lora: measures vs lr), one per image.",
        "Thumbnail grids (reconstruction prompt, edit prompt): a row per run, a column per sampling seed.",
    )
    FUNCTION = "sweep"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "The learning-rate experiments of the method notes in one node: trains once per learning rate (inversion, or "
        "LoRA around a fixed token with/without a regulariser), evaluates each with fixed prompts and seeds, and "
        "writes the table, plots, grids and every trained file into a folder of ComfyUI's output."
    )

    def sweep(self, model, clip, vae, dataset, kind, learning_rates, steps, eval_every, placeholder, initializer,
              templates, batch_size, seed, lora_rank, compare_without_regularizer, prompts, edit_prompts, sample_seeds,
              sample_steps, cfg, sampler, resolution, lpips, clip_model_folder, output_folder, overwrite,
              embedding: Pivot | None = None, regularizer=None, mixed_precision="no",
              gradient_checkpointing=False):  # fmt: skip
        # 1. Every input is checked before any model is converted or trained.
        lrs = _check_lrs(learning_rates)
        folder = _report_folder(output_folder, overwrite)
        if kind == "lora" and embedding is None:
            raise InvalidInputError("kind `lora` needs `embedding`: connect the trained token (TokenInversion) the LoRAs "
                                    "are tuned around.")  # fmt: skip
        if kind == "lora":
            placeholder, initializer = embedding.placeholder, embedding.initializer
        elif embedding is not None or regularizer is not None:
            logger.warning("PivotalSweep: the inversion sweep ignores the connected embedding / regularizer (they are for kind lora).")
        token_templates = split_lines(templates)
        if kind == "lora" and embedding.templates:
            token_templates = list(embedding.templates)
        record_every = history_every(steps)
        if eval_every:  # snapshots exist at recorded steps only: record at a divisor of eval_every
            record_every = math.gcd(record_every, eval_every)
        common = dict(
            templates=token_templates, steps=steps, batch_size=batch_size, seed=seed, clip_skip=bridge.clip_skip(clip),
            history_every=record_every, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        eval_config = EvaluationConfig(
            prompts=split_lines(prompts), edit_prompts=split_lines(edit_prompts), placeholder=placeholder.strip(),
            class_word=initializer.strip(), seeds=parse_ints(sample_seeds, "sample_seeds"),
            sampling=sampling_config(clip, sample_steps, cfg, sampler, resolution, SAMPLE_BATCH[1]["default"]),
        )  # fmt: skip
        if kind == "inversion":
            config = InversionConfig(placeholder=placeholder.strip(), initializer=initializer.strip(), **common)
            regularizers = None
        else:
            config = TuneConfig(rank=lora_rank, **common)
            regularizers = [regularizer] if regularizer is not None else []
            if regularizer is None or compare_without_regularizer:
                regularizers.insert(0, None)
        scorers = load_scorers(lpips, clip_model_folder)

        # 2. The runs: each starts from a fresh conversion of the connected models.
        runs = len(lrs) * (len(regularizers) if regularizers else 1)
        try:
            with torch.inference_mode(False), torch.enable_grad():

                def bundle_factory():
                    bridge.check_interrupted()
                    return bridge.bundle_from_comfy(model, clip, vae)

                on_progress = bridge.progress(runs * steps)
                if kind == "inversion":
                    report = inversion_sweep(bundle_factory, dataset, config, lrs, eval_config, scorers, on_progress,
                                             eval_every=eval_every or None)  # fmt: skip
                else:
                    report = lora_sweep(bundle_factory, dataset, embedding.vectors.clone(), placeholder, initializer,
                                        config, lrs, regularizers, eval_config, scorers, on_progress)  # fmt: skip
        finally:
            scorers = None
            bridge.release()
        report.settings.update(output_folder=str(folder), lpips=lpips, clip_model_folder=clip_model_folder)
        written = report.save(folder, overwrite=overwrite)
        logger.info("PivotalSweep: wrote %d file(s) into %s", len(written), folder)
        plot = bridge.images_from_arrays(list(report.plots.values()))
        grid = bridge.images_from_arrays(list(report.grids.values()))
        return (report.to_markdown(), plot, grid)

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rates=None, sample_seeds=None, output_folder=None):
        checks = []
        if learning_rates is not None:
            checks.append(lambda: _check_lrs(learning_rates))
        if sample_seeds is not None:
            checks.append(lambda: parse_ints(sample_seeds, "sample_seeds"))
        if output_folder is not None:
            checks.append(lambda: check_output_name(output_folder, "output_folder"))
        for check in checks:
            message = _validation_message(check)
            if message is not True:
                return message
        return True

    @classmethod
    def IS_CHANGED(cls, clip_model_folder="", **_):
        return _clip_folder_changed(clip_model_folder)


def _check_lrs(text: str) -> list[float]:
    return check_learning_rates(parse_floats(text, "learning_rates"), "learning_rates")


def _report_folder(name: str, overwrite: bool):
    """`output/NAME`, refused when it is a file, or not empty without `overwrite`."""
    check_output_name(name, "output_folder")
    folder = bridge.output_directory() / name
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} is a file: choose another `output_folder`.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} is not empty. Choose another `output_folder` or set `overwrite` to replace "
                                "the report's files.")  # fmt: skip
    return folder


NODE_CLASS_MAPPINGS = {"PivotalEvaluate": PivotalEvaluate, "PivotalSweep": PivotalSweep}
NODE_DISPLAY_NAME_MAPPINGS = {"PivotalEvaluate": "Pivotal Evaluate", "PivotalSweep": "Pivotal Learning-Rate Sweep"}
