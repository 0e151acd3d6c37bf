"""Learning-rate sweeps of the notes (METHOD.md, "Experiments"): inversion and LoRA.

Each run trains a fresh bundle from `bundle_factory` (training mutates its bundle), then the
evaluation generates fixed prompts × fixed seeds and scores them (`metrics.evaluation.evaluate`).
Nothing is validated during training: evaluation happens after each run, on the inversion's
snapshots (every `eval_every` steps, or only the last step by default) or on the tuned LoRA.

- `inversion_sweep`: per lr, one inversion at fixed steps; reconstruction and editability at each
  evaluated snapshot against the measured distance; the fit of distance vs lr × steps; the knee.
- `lora_sweep`: per (regulariser, lr), LoRA tuning around a fixed token; reconstruction,
  diversity, position spread and locality; the onset of position learning per regulariser.

Editability is CLIP's (TI protocol) when a CLIP model is given; the inversion sweep also always
reports the CLIP-free edit drift (`rows.py`). Rows, summaries: `rows.py`; the fit,
knee and onset: `analysis.py`; files: `report.py`; plots and grids: `plots.py`.
"""

import gc
import logging
import re
from dataclasses import replace
from typing import Callable

import torch

from ..models.bundle import ModelBundle
from ..dataset import ImageDataset
from ..errors import InvalidInputError, TrainingStopped
from ..inversion import InversionConfig, invert
from ..lora_tune import TuneConfig, tune_around
from ..metrics.scores import dataset_images
from ..metrics.evaluation import EvaluationConfig, Scorers, evaluate
from ..pivot import Pivot, family_name
from ..regularizer import RegularizerConfig
from ..metrics.sampling import apply_lora, sample_images, sampling_side
from ..placeholder import fill_placeholder
from ..training.recorder import StepCallback
from .analysis import DEFAULT_KNEE_THRESHOLD, DEFAULT_ONSET_FRACTION, check_fraction, check_learning_rates
from .plots import GridCollector, inversion_plots, lora_plots
from .report import SweepReport
from .rows import (
    INVERSION_METRICS,
    LORA_METRICS,
    edit_drift,
    inversion_row,
    inversion_summary,
    lora_row,
    lora_summary,
    metric_columns,
    scorer_names,
)
from ..user_warnings import warn_user

logger = logging.getLogger(__name__)

BundleFactory = Callable[[], ModelBundle]


def inversion_sweep(
    bundle_factory: BundleFactory,
    dataset: ImageDataset,
    base_config: InversionConfig,
    learning_rates: list[float],
    eval_config: EvaluationConfig,
    scorers: Scorers | None = None,
    on_progress: StepCallback | None = None,
    eval_every: int | None = None,
    knee_threshold: float = DEFAULT_KNEE_THRESHOLD,
    evaluate_initial: bool = True,
) -> SweepReport:
    """Invert the token once per learning rate at fixed steps; measure each evaluated snapshot.

    Rows: `initial` (the initializer's embedding, once) and one per (lr, evaluated step) with lr,
    step, lr × step, distance, norm, cosine, loss (from the run's history) and the metrics. The
    summary holds the fit of distance vs lr × steps over every history record, and the knee. Each
    evaluated embedding is kept for the report folder (`embedding_file`), so the knee's can be used.

    Args:
        bundle_factory (`callable`): returns a fresh bundle without the placeholder, e.g.
            `lambda: load_bundle("tiny")`; called once per learning rate.
        dataset (`ImageDataset`): the character's images.
        base_config (`InversionConfig`): everything but the learning rate (steps, seed, placeholder…).
        learning_rates (`list[float]`): one run each, in this order.
        eval_config (`EvaluationConfig`): prompts, edit prompts, seeds, sampling; its placeholder must
            be the inversion's.
        scorers (`Scorers`, *optional*): LPIPS and CLIP; missing ones give "not computed" columns.
        on_progress (`callable`, *optional*): `on_progress(done, total, logs)` over all training steps of
            the sweep; `logs` has `run` and `stage` (`train`/`evaluate`). It may raise to stop.
        eval_every (`int`, *optional*): evaluate every this many steps (a multiple of the config's
            `history_every`) and at the last; None = the last step only (evaluation is the costly part).
        knee_threshold (`float`): see `sweeps.analysis.find_knee`.
        evaluate_initial (`bool`): also evaluate the initializer's embedding (distance 0), once.
    """
    lrs = check_learning_rates(learning_rates)
    _check_eval_every(eval_every, base_config.history_every)
    knee_threshold = check_fraction("knee_threshold", knee_threshold)
    _check_eval_names(eval_config, base_config.placeholder, base_config.initializer)
    scorers = scorers or Scorers()
    progress = _Progress(on_progress, len(lrs) * base_config.steps)
    grids = GridCollector(eval_config.seeds)
    rows, traces, training, class_edits, skipped, files = [], {}, None, None, {}, {}
    for lr in lrs:
        run = f"lr={lr:g}"
        bundle = bundle_factory()
        if training is None:  # the same for every run: the class word's images do not depend on the token
            training = _training_images(bundle, dataset, eval_config)
            class_edits = _class_edit_images(bundle, eval_config)
        result, stopped = _invert(bundle, dataset, replace(base_config, learning_rate=lr), progress.for_run(run))
        if result is None:
            skipped[run] = stopped
            del bundle
            continue
        traces[run] = [{"step": h["step"], "lr_x_steps": lr * h["step"], **{k: h[k] for k in ("distance", "norm", "cosine", "loss")}}
                       for h in result.history]
        steps = [0] if evaluate_initial and not rows else []
        steps += _evaluation_steps(result.snapshots, eval_every)
        for step in steps:
            progress.tell({"run": run, "stage": "evaluate", "step": step})
            vectors = result.snapshot_by_key(step)  # every encoder's (SDXL: clip_l and clip_g)
            _write_vectors(bundle, result.tokens, vectors)
            evaluation = evaluate(bundle, eval_config, scorers, training, result.token)
            row = inversion_row(run, lr, step, result, stopped)
            row.update(metric_columns(evaluation.report, INVERSION_METRICS, row["reasons"]))
            row.update(edit_drift(evaluation.samples.get("editability"), class_edits, scorers, row["reasons"]))
            row["embedding_file"] = _embedding_file(files, result, lr, step, vectors, row)
            rows.append(row)
            _add_to_grids(grids, f"{row['run']} step {step}", evaluation.samples)
        del bundle, result
        gc.collect()
    settings = {"inversion": base_config.to_dict(), "learning_rates": lrs, "eval_every": eval_every,
                "evaluation": eval_config.to_dict(), "scorers": scorer_names(scorers)}
    summary = {**inversion_summary(rows, traces, knee_threshold), "stopped_before_any_record": skipped}
    report = SweepReport("inversion", rows, summary, settings, traces, files=files)
    report.plots, report.grids = inversion_plots(report), grids.build()
    return report


def lora_sweep(
    bundle_factory: BundleFactory,
    dataset: ImageDataset,
    token_vectors: torch.Tensor | dict[str, torch.Tensor],
    placeholder: str,
    initializer: str,
    base_config: TuneConfig,
    learning_rates: list[float],
    regularizers: list[RegularizerConfig | dict | None],
    eval_config: EvaluationConfig,
    scorers: Scorers | None = None,
    on_progress: StepCallback | None = None,
    onset_fraction: float = DEFAULT_ONSET_FRACTION,
) -> SweepReport:
    """Tune a LoRA around the fixed token once per (regulariser, learning rate); measure each.

    Rows: `base` (the token without LoRA, once) and one per (regulariser, lr) with the final
    losses and the metrics. The summary holds, per regulariser, the onset of position learning: the
    smallest lr whose position spread is below `onset_fraction` × the base model's. Each tuned LoRA
    is kept for the report folder (`lora_file`).

    Args:
        bundle_factory (`callable`): returns a fresh bundle without the placeholder; called once per run.
        dataset (`ImageDataset`): the character's images.
        token_vectors (`torch.Tensor` or `dict`): the trained embedding (the pivot): `[num_vectors, dim]` for a
            one-encoder family, or one set per embedding key (`Pivot.vectors_by_key`; SDXL: `clip_l`, `clip_g`).
        placeholder (`str`): its word, e.g. `tok1` (must be `eval_config.placeholder`).
        initializer (`str`): its class word.
        base_config (`TuneConfig`): everything but the learning rate.
        learning_rates (`list[float]`): LoRA learning rates.
        regularizers (`list`): `None` (off), `RegularizerConfig`s or their dicts; every lr runs with each.
        eval_config (`EvaluationConfig`): prompts, seeds, sampling (at least 2 seeds for the spread).
        scorers (`Scorers`, *optional*): LPIPS and CLIP.
        on_progress (`callable`, *optional*): as in `inversion_sweep`.
        onset_fraction (`float`): collapse threshold, a fraction in (0, 1] of the base spread.
    """
    lrs = check_learning_rates(learning_rates)
    regs = _check_regularizers(regularizers)
    onset_fraction = check_fraction("onset_fraction", onset_fraction)
    _check_eval_names(eval_config, placeholder, initializer)
    scorers = scorers or Scorers()
    progress = _Progress(on_progress, len(regs) * len(lrs) * base_config.steps)
    grids = GridCollector(eval_config.seeds)
    rows, training, skipped, files = [], None, {}, {}
    for label, reg, lr in [(label, reg, lr) for label, reg in regs.items() for lr in lrs]:
        bundle = bundle_factory()
        pivot = _pivot(bundle, token_vectors, placeholder, initializer, base_config.templates)
        token = pivot.apply(bundle)
        if training is None:  # the base row first: the model with the token and no LoRA
            training = _training_images(bundle, dataset, eval_config)
            progress.tell({"run": "base", "stage": "evaluate"})
            rows.append(lora_row("base", "", None, None, "", _evaluated(bundle, eval_config, scorers, training, token, grids, "base")))
        run = f"{label} lr={lr:g}"
        config = replace(base_config, learning_rate=lr)
        result, stopped = _tune(bundle, dataset, pivot, config, reg, scorers.lpips, progress.for_run(run))
        if result is None:
            skipped[run] = stopped
            del bundle
            continue
        progress.tell({"run": run, "stage": "evaluate"})
        row = lora_row(run, label, lr, result, stopped, _evaluated(bundle, eval_config, scorers, training, token, grids, run))
        row["lora_file"] = _lora_file(files, result, f"{label}_lr{lr:g}")
        rows.append(row)
        del bundle
        gc.collect()
    settings = {"tuning": base_config.to_dict(), "learning_rates": lrs, "placeholder": placeholder, "initializer": initializer,
                "regularizers": {label: reg.to_dict() if reg else None for label, reg in regs.items()},
                "evaluation": eval_config.to_dict(), "scorers": scorer_names(scorers)}
    summary = {**lora_summary(rows, list(regs), onset_fraction), "stopped_before_any_record": skipped}
    report = SweepReport("lora", rows, summary, settings, files=files)
    report.plots, report.grids = lora_plots(report), grids.build()
    return report


# --- checks -------------------------------------------------------------------------------------


def _check_eval_every(eval_every: int | None, history_every: int) -> None:
    if eval_every is None:
        return
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise InvalidInputError(f"`eval_every` must be a positive whole number of steps or None, got {eval_every!r}.")
    if eval_every % history_every:
        raise InvalidInputError(f"`eval_every` ({eval_every}) must be a multiple of `history_every` ({history_every}): "
                                "snapshots exist only at recorded steps.")


def _check_eval_names(eval_config: EvaluationConfig, placeholder: str, initializer: str) -> None:
    if eval_config.placeholder != placeholder:
        raise InvalidInputError(f"the evaluation's placeholder {eval_config.placeholder!r} is not the trained token "
                                f"{placeholder!r}: set `placeholder` of the EvaluationConfig to {placeholder!r}.")
    if eval_config.class_word != initializer:
        warn_user(f"the evaluation's class word {eval_config.class_word!r} differs from the initializer {initializer!r}: "
                  "edit drift and the TI editability protocol compare with the class word.")


def _check_regularizers(regularizers) -> dict[str, RegularizerConfig | None]:
    """Label → config (None = off); labels are the mode, with the weight when not 1, numbered on repeats."""
    if not regularizers:
        raise InvalidInputError("`regularizers` is empty: give [None] to tune without a regulariser.")
    out: dict[str, RegularizerConfig | None] = {}
    for reg in regularizers:
        if isinstance(reg, dict):
            reg = RegularizerConfig.from_dict(reg)
        if reg is not None and not isinstance(reg, RegularizerConfig):
            raise InvalidInputError(f"each regulariser must be None, a RegularizerConfig or a dict, got {type(reg).__name__}.")
        if reg is not None and (reg.mode == "none" or reg.weight == 0):
            reg = None
        label = "none" if reg is None else reg.mode + ("" if reg.weight == 1 else f" w={reg.weight:g}")
        base, n = label, 2
        while label in out:
            label, n = f"{base} #{n}", n + 1
        out[label] = reg
    return out


# --- runs ---------------------------------------------------------------------------------------


def _pivot(bundle: ModelBundle, token_vectors, placeholder: str, initializer: str, templates) -> Pivot:
    """The fixed token of the LoRA sweep, for this bundle's family (checked by `Pivot.apply`)."""
    by_key = {bundle.family.embedding_keys[0]: token_vectors} if isinstance(token_vectors, torch.Tensor) else dict(token_vectors)
    keys = list(by_key)
    return Pivot(placeholder, initializer, by_key[keys[0]], family_name(bundle), templates, base_model=bundle.name,
                 extra_vectors={key: by_key[key] for key in keys[1:]})  # fmt: skip


class _Progress:
    """Turns per-run `on_step` calls into one count over the whole sweep."""

    def __init__(self, callback: StepCallback | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def for_run(self, run: str):
        start = self.done

        def on_step(step: int, steps: int, logs: dict) -> None:
            self.done = start + step
            if self.callback is not None:
                self.callback(self.done, self.total, {"run": run, "stage": "train", **logs})
        return on_step

    def tell(self, logs: dict) -> None:
        logger.info("evaluating %s%s", logs["run"], f" at step {logs['step']}" if "step" in logs else "")
        if self.callback is not None:
            self.callback(self.done, self.total, logs)


def _invert(bundle, dataset, config, on_step):
    """`(result, "")`; when the run diverged, the partial result and why (`(None, why)` before any record)."""
    try:
        return invert(bundle, dataset, config, on_step), ""
    except TrainingStopped as err:
        if err.partial is None or not err.partial.history:
            logger.warning("lr %g: %s; nothing was recorded to evaluate.", config.learning_rate, err)
            return None, str(err)
        logger.warning("lr %g: %s; the records before are evaluated.", config.learning_rate, err)
        return err.partial, str(err)


def _tune(bundle, dataset, pivot, config, reg, lpips_model, on_step):
    """`(result, "")`; when the run diverged, the last good partial result (applied to the bundle) and
    why (`(None, why)` before any good record)."""
    try:
        return tune_around(bundle, dataset, pivot, config, reg, on_step=on_step, lpips_model=lpips_model), ""
    except TrainingStopped as err:
        if err.partial is None:
            logger.warning("lr %g: %s; nothing was recorded to evaluate.", config.learning_rate, err)
            return None, str(err)
        logger.warning("lr %g: %s; the last good LoRA is evaluated.", config.learning_rate, err)
        apply_lora(bundle, err.partial.lora)
        return err.partial, str(err)


def _evaluation_steps(snapshots: dict[int, torch.Tensor], eval_every: int | None) -> list[int]:
    recorded = sorted(snapshots)
    if not recorded:
        return []
    picked = [] if eval_every is None else [s for s in recorded if s % eval_every == 0]
    return picked if picked and picked[-1] == recorded[-1] else picked + [recorded[-1]]


@torch.no_grad()
def _write_vectors(bundle: ModelBundle, tokens, vectors: dict[str, torch.Tensor]) -> None:
    """Put each encoder's `[num_vectors, dim]` vectors into its placeholder rows (keys and tokens in family order)."""
    for token, encoder, rows in zip(tokens, bundle.text_encoders, vectors.values()):
        weight = encoder.get_input_embeddings().weight
        weight[list(token.token_ids)] = rows.to(weight)


def _training_images(bundle: ModelBundle, dataset: ImageDataset, config: EvaluationConfig) -> torch.Tensor:
    side = sampling_side(bundle, config.sampling.resolution)
    return dataset_images(dataset, (side, side))


def _class_edit_images(bundle: ModelBundle, config: EvaluationConfig) -> torch.Tensor | None:
    """The edit prompts with the class word, at the evaluation's seeds (the reference of the drift)."""
    if not config.edit_prompts:
        return None
    prompts = [fill_placeholder(p, config.class_word) for p in config.edit_prompts]
    return sample_images(bundle, prompts, config.seeds, config.sampling).images


def _evaluated(bundle, eval_config, scorers, training, token, grids: GridCollector, label: str) -> dict:
    evaluation = evaluate(bundle, eval_config, scorers, training, token)
    reasons: dict[str, str] = {}
    values = metric_columns(evaluation.report, LORA_METRICS, reasons)
    _add_to_grids(grids, label, evaluation.samples)
    return {**values, "reasons": reasons}


def _embedding_file(files: dict, result, lr: float, step: int, vectors: dict[str, torch.Tensor], row: dict) -> str | None:
    """Register the evaluated embedding for the report folder; its relative path (None for the initializer)."""
    if step == 0:
        row["reasons"]["embedding_file"] = "the initializer's own embedding: nothing trained to save"
        return None
    history = [h for h in result.history if h["step"] <= step]
    rows = [v.detach().clone() for v in vectors.values()]
    snapshot = result.pivot.with_vectors(rows, history, {**result.pivot.made_by, "lr": repr(lr), "steps": str(step)})
    relative = f"embeddings/{_file_stem(f'{result.token.placeholder}_lr{lr:g}_step{step}')}.safetensors"
    files[relative] = lambda path, overwrite: snapshot.save(path, overwrite=overwrite)
    return relative


def _lora_file(files: dict, result, name: str) -> str:
    """Register the tuned LoRA for the report folder; its relative path."""
    relative = f"loras/{_file_stem(f'{result.pivot.placeholder}_{name}')}.safetensors"
    files[relative] = lambda path, overwrite: result.save(path, overwrite=overwrite)
    return relative


def _file_stem(text: str) -> str:
    """`text` with every character outside letters, digits, `_`, `-`, `.` turned into `_` (a safe file name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _add_to_grids(grids: GridCollector, label: str, samples: dict) -> None:
    """The first training prompt's and the first edit prompt's images, one row each."""
    for name in ("reconstruction", "editability"):
        if name in samples:
            grids.add(name, label, samples[name].images)
