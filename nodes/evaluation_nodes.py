"""PivotalEvaluate and PivotalSweep: the metrics of a tuned model, and the learning-rate sweeps of the notes.

Both delegate to the core (`pti_ops.metrics.evaluate_tuned`, `pti_ops.sweeps.run_sweep`). A scorer whose
weights are not on disk (LPIPS backbone, CLIP model folder) makes its metrics "not computed" with the
reason; nothing is downloaded.
"""

import logging

from ..pti_ops.limits import MAX_BATCH_SIZE, MAX_RANK, MAX_RESOLUTION, MAX_SAMPLE_STEPS, MAX_STEPS
from ..pti_ops.errors import InvalidInputError
from ..pti_ops.files import check_output_name, output_folder
from ..pti_ops.metrics import LPIPS_CHOICES, SAMPLERS, EvaluationConfig, SamplingConfig, Scorers, evaluate_tuned
from ..pti_ops.metrics import evaluation_batches, load_scorers as load_core_scorers
from ..pti_ops.pivot import Pivot
from ..pti_ops.user_warnings import warn_user
from ..pti_ops.sweeps import SWEEP_KINDS, SweepConfig, check_learning_rates, run_sweep
from . import bridge
from .common import converted, core_run, history_every, parse_floats, parse_ints, split_lines
from .common import if_exists_policy, in_widget_words, node_result, node_warnings, validation_message, with_warnings
from .inputs import IF_EXISTS, MEMORY_OPTIONS, MODEL_INPUTS, NODE_ID, OVERWRITE, SEED, TEMPLATES_TOOLTIP, TRAINING_INPUTS, bool_input, combo
from .inputs import default_of, float_input, format_numbers, int_input, lines_input, link, retooltip, string_input

logger = logging.getLogger(__name__)

CATEGORY = "pivotal_tuning/analysis"
DEFAULT_CLASS_WORD = default_of(EvaluationConfig, "class_word")


def _sampling(name: str):
    return default_of(SamplingConfig, name)


def _sweep(name: str):
    return default_of(SweepConfig, name)


# Widgets both nodes share (the evaluation's prompts, seeds, sampling and scorers).
PROMPTS = lines_input(default_of(EvaluationConfig, "prompts"), "Training-like prompts, one per line, with {} where the "
    "token goes: reconstruction (against the dataset's images), diversity and position spread are measured on their "
    "generations.")
EDIT_PROMPTS = lines_input(default_of(EvaluationConfig, "edit_prompts"), "Prompts that ask for changes, one per line, "
    "with {}: editability (CLIP text-image score against the prompt with the class word in place of {}, the TI paper's "
    "protocol; needs a CLIP model). Empty: not measured.")
SAMPLE_SEEDS = string_input(",".join(map(str, default_of(EvaluationConfig, "seeds"))), "Comma-separated sampling seeds, "
    "one image per seed and prompt, the same in every set and run so results compare image for image. More seeds: "
    "steadier numbers, proportionally slower.")
SAMPLE_STEPS = int_input(_sampling("steps"), 1, MAX_SAMPLE_STEPS, "Denoising steps per image: more are cleaner and proportionally "
    "slower.")
CFG = float_input(_sampling("cfg_scale"), 0.0, 100.0, 0.1, "Classifier-free guidance. Higher values follow the prompt "
    "more closely but vary less; 1 skips the unconditional pass (half the work).", round=0.01)
SAMPLER = combo(SAMPLERS, _sampling("sampler"), "ddim (deterministic) or euler; both from the model's training schedule.")
RESOLUTION = int_input(_sampling("resolution") or 0, 0, MAX_RESOLUTION, "Side of the generated images in pixels; 0 = the model's "
    "native size (512 for SD1.5). Smaller is much faster; the dataset's images are resized to it for reconstruction.",
    step=8)
SAMPLE_BATCH = int_input(_sampling("batch_size"), 1, MAX_BATCH_SIZE, "Images generated together: faster on a GPU, more memory; no "
    "image changes.")
LPIPS = combo(LPIPS_CHOICES, "auto", "LPIPS backbone: auto = alex (LPIPS' default) where torchvision's weights are in "
    "the torch hub cache; alex or vgg likewise (nothing is downloaded: a missing file makes the LPIPS metrics 'not "
    "computed' with where to put it). random: an untrained backbone, only to test a workflow. off: no LPIPS metrics "
    "(L2 and position spread remain).")
CLIP_MODEL_FOLDER = string_input("", "Optional local transformers CLIPModel folder (e.g. clip-vit-large-patch14 with "
    "config.json, weights and tokenizer files): an absolute path, or a folder inside models/clip_vision. Empty or "
    "missing: the CLIP metrics (editability, CLIP reconstruction) are 'not computed' with the reason.")  # fmt: skip


def sampling_config(clip, steps: int, cfg: float, sampler: str, resolution: int,
                    batch_size: int = _sampling("batch_size")) -> SamplingConfig:  # fmt: skip
    """Sampling settings with the CLIP's layer (CLIPSetLastLayer) as `clip_skip`."""
    return SamplingConfig(steps=steps, cfg_scale=float(cfg), sampler=sampler, batch_size=batch_size,
                          clip_skip=bridge.clip_skip(clip), resolution=resolution or None)  # fmt: skip


def load_scorers(lpips: str, clip_model_folder: str) -> Scorers:
    """LPIPS and CLIP scorers on ComfyUI's device (the core's `load_scorers`); a missing one is None with the reason."""
    folder = bridge.resolve_clip_folder(clip_model_folder) if clip_model_folder.strip() else None
    return load_core_scorers(lpips, folder, bridge.torch_device())


def _clip_folder_changed(clip_model_folder: str) -> str:
    if not clip_model_folder or not clip_model_folder.strip():
        return ""
    return bridge.stat_folder(bridge.resolve_clip_folder(clip_model_folder))


# ---------------------------------------------------------------------------------------------
# PivotalEvaluate
# ---------------------------------------------------------------------------------------------


class PivotalEvaluate:
    """Generate fixed prompt × seed sets with a model (+ embedding, + LoRA) and score them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **MODEL_INPUTS,
                "model": link("MODEL", "The SD1.5 model to evaluate; it is only read. Connect the base model when you "
                    "also connect `lora` (otherwise the LoRA would count twice)."),
                "prompts": PROMPTS,
                "edit_prompts": EDIT_PROMPTS,
                "class_word": string_input("", "The class word (TI protocol: edit prompts are scored with it in place of "
                    "{}). Empty: the embedding's initializer, else 'character'. Without an embedding {} is filled with it "
                    "(the base model's reference numbers)."),
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
                "embedding": link("PIVOTAL_EMBEDDING", "The trained token (TokenInversion): fills {} in the prompts; its "
                    "distance from the initializer is reported. Not connected: {} is the class word."),
                "lora": link("LORA_MODEL", "The tuned LoRA, applied on top of `model` so that locality (tuned vs base on "
                    "prompts without the token) can be measured: PivotalLoRATune's lora output, or the stock Train LoRA "
                    "node's (ComfyUI's own keys, its .diff/.diff_b deltas included; diffusers/PEFT keys work too). "
                    "Locality needs the embedding too. A LoRA already inside MODEL (LoraLoader) is evaluated, but "
                    "without locality."),
                "lora_strength": float_input(1.0, -10.0, 10.0, 0.05, "Multiplier of the connected `lora`: 1 = as "
                    "trained, 0 = the base model."),
                "dataset": link("PIVOTAL_DATASET", "The training images: reconstruction (LPIPS, L2, CLIP image "
                    "similarity) compares each generation of the prompts with its closest training image. Not "
                    "connected: not computed."),
            },
            "hidden": NODE_ID,
        }  # fmt: skip

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

    @in_widget_words(cfg_scale="cfg")
    def evaluate(self, model, clip, vae, prompts, edit_prompts, class_word, seeds, steps, cfg, sampler, resolution,
                 batch_size, lpips, clip_model_folder, embedding: Pivot | None = None, lora=None,
                 lora_strength=1.0, dataset=None, unique_id=None):  # fmt: skip
        config = _evaluation_config(class_word, embedding, lora, prompts=split_lines(prompts),
                                    edit_prompts=split_lines(edit_prompts), seeds=parse_ints(seeds, "seeds"),
                                    sampling=sampling_config(clip, steps, cfg, sampler, resolution, batch_size))  # fmt: skip
        with node_warnings(dataset) as warned, core_run(train=False):
            result = evaluate_tuned(
                converted(model, clip, vae), config, load_scorers(lpips, clip_model_folder), pivot=embedding,
                lora=None if lora is None else {key: value.clone() for key, value in lora.items()},
                lora_strength=lora_strength, dataset=dataset,
                on_step=bridge.progress(evaluation_batches(config, with_lora=lora is not None)),
            )  # fmt: skip
        result.report.settings.update(lora=lora is not None, lora_strength=lora_strength if lora is not None else None,
                                      dataset=dataset is not None, lpips=lpips, clip_model_folder=clip_model_folder)  # fmt: skip
        outputs = (with_warnings(result.report.to_markdown(), warned), result.report.to_json(), bridge.image_from_array(result.grid()))
        return node_result(outputs, warned, unique_id)

    @classmethod
    def VALIDATE_INPUTS(cls, seeds=None):
        if seeds is None:
            return True
        return validation_message(lambda: parse_ints(seeds, "seeds"))

    @classmethod
    def IS_CHANGED(cls, clip_model_folder="", **_):
        return _clip_folder_changed(clip_model_folder)


def _evaluation_config(class_word: str, embedding, lora, prompts, edit_prompts, seeds, sampling) -> EvaluationConfig:
    """The evaluation's settings. Without an embedding {} is the class word: no prompt is without it (no locality;
    a LoRA without an embedding, such as the stock Train LoRA node's, is measured on everything else)."""
    class_word = class_word.strip() or (embedding.initializer if embedding is not None else DEFAULT_CLASS_WORD)
    return EvaluationConfig(
        prompts=prompts, edit_prompts=edit_prompts, class_word=class_word, seeds=seeds, sampling=sampling,
        placeholder=class_word if embedding is None else embedding.placeholder,
        locality_prompts=[] if embedding is None else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# PivotalSweep
# ---------------------------------------------------------------------------------------------


class PivotalSweep:
    """One training run per learning rate (and regulariser), each evaluated → table, plots, grids, report folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRAINING_INPUTS,
                "kind": combo(SWEEP_KINDS, _sweep("kind"), "inversion: invert the token once per learning rate; "
                    "reconstruction and editability against the distance it travelled, the knee, the fit distance ≈ "
                    "slope × lr × steps. lora: tune a LoRA around the connected embedding once per learning rate (and "
                    "regulariser); reconstruction, diversity, position spread, locality and the lr where positions "
                    "start to be learned."),
                "learning_rates": string_input(format_numbers(_sweep("learning_rates")), "Comma-separated learning "
                    "rates, one training run each (the token's for inversion, the LoRA's for lora). Each run costs "
                    "`steps` training steps plus its evaluation."),
                "steps": int_input(_sweep("steps"), 1, MAX_STEPS, "Training steps of every run (the notes fix 1000 and "
                    "vary the learning rate, so the distance travelled ≈ lr × steps)."),
                "eval_every": int_input(_sweep("eval_every") or 0, 0, MAX_STEPS, "inversion: also evaluate the token every "
                    "N steps along each run (more points on the curves from the same runs; each evaluation costs far "
                    "more than a training step). 0: the last step only. Ignored by lora."),
                "placeholder": string_input(_sweep("placeholder"), "inversion: the new word being learned (not a word "
                    "the tokenizer knows). lora uses the embedding's."),
                "initializer": string_input(_sweep("initializer"), "inversion: the class word the token starts from and "
                    "edit prompts are scored with. lora uses the embedding's."),
                "templates": lines_input(_sweep("templates"), TEMPLATES_TOOLTIP + " lora uses the embedding's templates "
                    "when it has them."),
                "batch_size": int_input(_sweep("batch_size"), 1, MAX_BATCH_SIZE, "Training images per step (more memory, smoother "
                    "steps)."),
                "seed": SEED,
                "lora_rank": int_input(_sweep("rank"), 1, MAX_RANK, "lora: LoRA rank of every run (capacity; 4-16 is light)."),
                "compare_without_regularizer": bool_input(True, "lora with a connected regularizer: also run every "
                    "learning rate without it, so the regulariser's effect shows side by side (twice the runs). Without "
                    "a regularizer every run is unregularised anyway."),
                "prompts": PROMPTS,
                "edit_prompts": EDIT_PROMPTS,
                "sample_seeds": SAMPLE_SEEDS,
                "sample_steps": SAMPLE_STEPS,
                "cfg": CFG,
                "sampler": SAMPLER,
                "resolution": RESOLUTION,
                "lpips": LPIPS,
                "clip_model_folder": CLIP_MODEL_FOLDER,
                "output_folder": string_input("pivotal_lr_sweep", "Folder name inside ComfyUI's output folder for the "
                    "report: sweep.csv/json/md, plots/, grids/ and every evaluated embedding or LoRA (letters, digits, "
                    "_ - .)."),
                "overwrite": retooltip(OVERWRITE, "On: write into a non-empty output folder, replacing the report's "
                    "files (as if_exists = overwrite; kept so that saved workflows keep working). Off: if_exists decides."),
            },
            "optional": {
                "embedding": link("PIVOTAL_EMBEDDING", "lora: the trained token the LoRAs are tuned around "
                    "(TokenInversion). Needed for lora, ignored by inversion."),
                "regularizer": link("PIVOTAL_REGULARIZER", "lora: the locality regulariser (SlerpRegularizer) of the "
                    "runs; see compare_without_regularizer. Ignored by inversion."),
                **MEMORY_OPTIONS,
                "if_exists": retooltip(IF_EXISTS, "When output_folder already holds files: increment writes the report "
                    "to OUTPUT_FOLDER_00001, _00002, … (so the workflow can be queued again and again), overwrite "
                    "replaces the report's files in it, error stops before any training. With overwrite on, its "
                    "files are replaced whatever this says."),
            },
            "hidden": NODE_ID,
        }  # fmt: skip

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

    @in_widget_words(rank="lora_rank", cfg_scale="cfg", out="output_folder", regularizers="regularizer")
    def sweep(self, model, clip, vae, dataset, kind, learning_rates, steps, eval_every, placeholder, initializer,
              templates, batch_size, seed, lora_rank, compare_without_regularizer, prompts, edit_prompts, sample_seeds,
              sample_steps, cfg, sampler, resolution, lpips, clip_model_folder, output_folder, overwrite,
              embedding: Pivot | None = None, regularizer=None, mixed_precision="no",
              gradient_checkpointing=False, if_exists="increment", unique_id=None):  # fmt: skip
        policy = if_exists_policy(overwrite, if_exists)
        with node_warnings(dataset) as warned:  # the settings' warnings (ignored inputs) too
            placeholder, initializer, templates, vectors = _sweep_token(kind, embedding, placeholder, initializer, templates)
            config = SweepConfig(
                kind=kind, learning_rates=parse_floats(learning_rates, "learning_rates"), steps=steps,
                eval_every=eval_every or None, placeholder=placeholder, initializer=initializer, templates=templates,
                batch_size=batch_size, seed=seed, clip_skip=bridge.clip_skip(clip),
                history_every=history_every(steps, eval_every), rank=lora_rank,
                regularizers=_regularizers(regularizer, compare_without_regularizer), prompts=split_lines(prompts),
                edit_prompts=split_lines(edit_prompts), sample_seeds=parse_ints(sample_seeds, "sample_seeds"),
                sampling=sampling_config(clip, sample_steps, cfg, sampler, resolution), mixed_precision=mixed_precision,
                gradient_checkpointing=gradient_checkpointing, out=_report_folder(output_folder, policy),
                overwrite=policy == "overwrite",
            )  # fmt: skip
            settings = {"output_folder": str(config.out), "lpips": lpips, "clip_model_folder": clip_model_folder}
            with core_run():
                report = run_sweep(config, lambda: converted(model, clip, vae), dataset, load_scorers(lpips, clip_model_folder),
                                   token_vectors=vectors, on_progress=bridge.progress(config.total_steps), settings=settings)
        plot, grid = (bridge.images_from_arrays(list(images.values())) for images in (report.plots, report.grids))
        return node_result((with_warnings(report.to_markdown(), warned), plot, grid), warned, unique_id)

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rates=None, sample_seeds=None, output_folder=None):
        checks = []
        if learning_rates is not None:
            checks.append(lambda: check_learning_rates(parse_floats(learning_rates, "learning_rates"), "learning_rates"))
        if sample_seeds is not None:
            checks.append(lambda: parse_ints(sample_seeds, "sample_seeds"))
        if output_folder is not None:
            checks.append(lambda: check_output_name(output_folder, "output_folder"))
        return validation_message(*checks)

    @classmethod
    def IS_CHANGED(cls, clip_model_folder="", **_):
        return _clip_folder_changed(clip_model_folder)


def _sweep_token(kind: str, embedding, placeholder: str, initializer: str, templates: str):
    """`(placeholder, initializer, templates, vectors or None)`: the widgets', or the embedding's for `lora`."""
    if kind != "lora":
        if embedding is not None:
            warn_user("PivotalSweep: the inversion sweep ignores the connected embedding (it is for kind lora).")
        return placeholder.strip(), initializer.strip(), split_lines(templates), None
    if embedding is None:
        raise InvalidInputError("kind `lora` needs `embedding`: connect the trained token (TokenInversion) the LoRAs "
                                "are tuned around.")  # fmt: skip
    vectors = {key: v.clone() for key, v in embedding.vectors_by_key.items()}  # every encoder's (SDXL: clip_l, clip_g)
    return embedding.placeholder, embedding.initializer, list(embedding.templates), vectors


def _regularizers(regularizer, compare_without: bool) -> list:
    """The runs' regularisers: the connected one, and None (off) first when comparing or when none is connected."""
    if regularizer is None:
        return [None]
    return [None, regularizer] if compare_without else [regularizer]


def _report_folder(name: str, policy: str):
    """`output/NAME` by the file-name policy (`increment`: `NAME_00001`, … when it holds files)."""
    return output_folder(bridge.output_directory(), name, policy, what="`output_folder`")


NODE_CLASS_MAPPINGS = {"PivotalEvaluate": PivotalEvaluate, "PivotalSweep": PivotalSweep}
NODE_DISPLAY_NAME_MAPPINGS = {"PivotalEvaluate": "Pivotal Evaluate", "PivotalSweep": "Pivotal Learning-Rate Sweep"}
