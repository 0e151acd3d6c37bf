"""One evaluation run: generate the fixed prompt × seed sets, then score them (see `metrics.py`).

Three image sets are generated with the same seeds, so two runs (two learning rates, with and
without the regulariser) compare image for image:
- training prompts with the placeholder → reconstruction, diversity, position spread;
- edit prompts with the placeholder → editability (scored with the class word in its place);
- prompts without the placeholder, tuned and base (adapters off) → locality.
"""

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..dataset import ImageDataset
from ..models.bundle import ModelBundle
from ..errors import InvalidInputError
from .scores import (
    DEFAULT_SUBJECT_THRESHOLD,
    LOCALITY_TIMESTEPS,
    EvaluationReport,
    Metric,
    dataset_images,
    diversity_metrics,
    editability_metric,
    locality_eps_mse,
    locality_lpips,
    metric,
    reconstruction_metrics,
)
from .clip import ClipScorer
from .distance import distance_metrics, embedding_distance, nearest_tokens
from ..placeholder import (
    DEFAULT_TEMPLATES,
    PLACEHOLDER_SLOT,
    PlaceholderToken,
    fill_placeholder,
    initializer_ids,
    placeholder_in_tokenizers,
    placeholder_vectors,
)
from ..training.adapters import adapters_disabled, has_lora
from ..training.recorder import StepCallback
from .sampling import (
    SampleResult,
    SamplingConfig,
    apply_lora,
    image_grid,
    sample_images,
    sampling_side,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = DEFAULT_TEMPLATES  # the training templates: reconstruction asks for what was trained
# Edit prompts in the TI paper's spirit (new setting, new medium, new attribute), in words the tiny model knows.
DEFAULT_EDIT_PROMPTS = ("a photo of {} on the beach", "a painting of {} in the forest", "a drawing of {} with a red hat")


@dataclass
class EvaluationConfig:
    """What to generate and how to score it.

    Args:
        prompts (`list[str]`): training prompts with `{}` for the placeholder (reconstruction, diversity).
        edit_prompts (`list[str]`): prompts with `{}` that ask for changes (editability).
        locality_prompts (`list[str]`, *optional*): prompts without the placeholder (locality); default
            the prompts and edit prompts with the class word in place of `{}`.
        placeholder (`str`): the word that fills `{}`, e.g. `tok1`.
        class_word (`str`): the class word of the TI protocol and of the default locality prompts.
        seeds (`list[int]`): one image per seed and prompt; the same seeds in every set.
        sampling (`SamplingConfig` or `dict`): steps, guidance, sampler, batch size, clip skip (None: the
            family's layer), resolution (None: the model's native size).
        locality_timesteps (`tuple[int, ...]`): noise levels of the ε-prediction locality check.
        subject_threshold (`float`): colour distance from the background that counts as subject.
    """

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    edit_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_EDIT_PROMPTS))
    locality_prompts: list[str] | None = None
    placeholder: str = "tok1"
    class_word: str = "character"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    sampling: SamplingConfig | dict = field(default_factory=SamplingConfig)
    locality_timesteps: tuple[int, ...] = LOCALITY_TIMESTEPS
    subject_threshold: float = DEFAULT_SUBJECT_THRESHOLD

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if not self.prompts:
            raise InvalidInputError("`prompts` is empty: give at least one training prompt with {} for the placeholder.")
        for p in list(self.prompts) + list(self.edit_prompts):
            if PLACEHOLDER_SLOT not in p:
                raise InvalidInputError(f"prompt {p!r} has no {{}}: write {{}} where the placeholder goes.")
        if not self.seeds:
            raise InvalidInputError("`seeds` is empty: give at least one seed.")
        if self.locality_prompts is None:
            self.locality_prompts = [fill_placeholder(p, self.class_word) for p in [*self.prompts, *self.edit_prompts]]
        leaking = [p for p in self.locality_prompts if self.placeholder in p.split() or PLACEHOLDER_SLOT in p]
        if leaking:
            raise InvalidInputError(f"locality prompts must not contain the placeholder, got {leaking[0]!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scorers:
    """The networks that score images, each None with the reason when unavailable.

    Args:
        lpips (`lpips.LPIPS`, *optional*): from `metrics.lpips_model.load_lpips`.
        clip (`ClipScorer`, *optional*): from `metrics.clip.try_load_clip`.
        lpips_reason (`str`): why `lpips` is None.
        clip_reason (`str`): why `clip` is None.
    """

    lpips: torch.nn.Module | None = None
    clip: ClipScorer | None = None
    lpips_reason: str = "no LPIPS model given"
    clip_reason: str = "no CLIP model folder given"


@dataclass
class EvaluationResult:
    """The report and the image sets it was computed from.

    Args:
        report (`EvaluationReport`): the metrics.
        samples (`dict[str, SampleResult]`): `reconstruction`, `editability`, `locality_tuned`,
            `locality_base` (those generated).
    """

    report: EvaluationReport
    samples: dict[str, SampleResult]

    def grid(self) -> np.ndarray:
        """All generations in one image: a row per (set, prompt), a column per seed, labelled."""
        seeds = list(self.report.settings["seeds"])
        images, row_labels = [], []
        for name, result in self.samples.items():
            images.append(result.images)
            # Items are prompt-major: every len(seeds)-th item starts a new prompt's row.
            row_labels += [f"{name}: {prompt}" for prompt, _ in result.items[:: len(seeds)]]
        return image_grid(torch.cat(images), rows=len(row_labels), cols=len(seeds), row_labels=row_labels,
                          col_labels=[f"seed {s}" for s in seeds])


def evaluate(
    bundle: ModelBundle,
    config: EvaluationConfig,
    scorers: Scorers | None = None,
    training_images: torch.Tensor | None = None,
    token: PlaceholderToken | None = None,
    on_step: StepCallback | None = None,
) -> EvaluationResult:
    """Generate the evaluation sets and compute every metric (missing inputs → "not computed", with why).

    Args:
        bundle (`ModelBundle`): the tuned model: embedding added, LoRA applied (or not).
        config (`EvaluationConfig`): prompts, seeds, sampling.
        scorers (`Scorers`, *optional*): LPIPS and CLIP networks.
        training_images (`torch.Tensor`, *optional*): `[m, H, W, 3]` in [0, 1] at the generation size
            (`metrics.dataset_images(dataset, size)`).
        token (`PlaceholderToken`, *optional*): the placeholder in the bundle (expands multi-vector
            prompts; its vectors give the distance metrics).
        on_step (`callable`, *optional*): `on_step(done, total, {"stage": …})` per generated batch, counting
            the batches of every set (`evaluation_batches`); may raise to stop.
    """
    scorers = scorers or Scorers()
    if token is None and config.placeholder not in bundle.tokenizer.get_vocab():
        logger.warning("placeholder %r is not a token of this model (no embedding given): prompts use it as plain text.",
                       config.placeholder)
    sets = _generate_sets(bundle, config, token, on_step)
    metrics: dict[str, Metric] = {}
    recon = sets["reconstruction"].images
    metrics.update(reconstruction_metrics(recon, training_images, scorers.lpips, scorers.clip, scorers.lpips_reason, scorers.clip_reason))
    class_prompts = [fill_placeholder(p, config.class_word) for p, _ in sets["editability"].items] if "editability" in sets else []
    edit_images = sets["editability"].images if "editability" in sets else recon[:0]
    metrics["editability_clip"] = editability_metric(edit_images, class_prompts, scorers.clip, scorers.clip_reason)
    metrics.update(_locality(bundle, config, sets, scorers))
    groups = list(recon.split(len(config.seeds)))  # prompt-major: one group of seeds per prompt
    metrics.update(diversity_metrics(groups, scorers.lpips, scorers.lpips_reason, config.subject_threshold))
    metrics.update(distance_metrics(_distance(bundle, token), reason="no embedding given (--embedding)"))
    settings = {**config.to_dict(), "model": bundle.name, "placeholder_vectors": token.num_vectors if token else 0}
    return EvaluationResult(EvaluationReport(metrics, settings), sets)


def evaluate_tuned(
    bundle: ModelBundle,
    config: EvaluationConfig,
    scorers: Scorers | None = None,
    pivot=None,
    lora: dict[str, torch.Tensor] | None = None,
    lora_strength: float = 1.0,
    dataset: ImageDataset | None = None,
    on_step: StepCallback | None = None,
) -> EvaluationResult:
    """Put a trained token and a LoRA into `bundle` (in place; each optional), then `evaluate` it.

    Args:
        bundle (`ModelBundle`): the base model; the caller lets it be modified.
        config (`EvaluationConfig`): prompts, seeds, sampling; its placeholder must be the pivot's.
        scorers (`Scorers`, *optional*): LPIPS and CLIP networks.
        pivot (`Pivot`, *optional*): the trained token (`pti_ops.pivot`; only its `placeholder` and
            `apply(bundle)` are used); None: `{}` is filled with the placeholder as plain text.
        lora (`dict[str, Tensor]`, *optional*): a kohya LoRA, applied at `lora_strength`.
        lora_strength (`float`): 1 = as trained, 0 = the base model.
        dataset (`ImageDataset`, *optional*): the training images, the reconstruction target (resized to
            the generation size); None: reconstruction is not computed.
        on_step (`callable`, *optional*): as in `evaluate`.
    """
    if pivot is not None and pivot.placeholder != config.placeholder:
        raise InvalidInputError(f"the evaluation's placeholder {config.placeholder!r} is not the trained token "
                                f"{pivot.placeholder!r}: set `placeholder` of the EvaluationConfig to {pivot.placeholder!r}.")
    token = None if pivot is None else pivot.apply(bundle)
    if lora is not None:
        apply_lora(bundle, lora, lora_strength)
    training = None
    if dataset is not None:
        side = sampling_side(bundle, config.sampling.resolution)
        training = dataset_images(dataset, (side, side))
    return evaluate(bundle, config, scorers, training, token, on_step)


def evaluation_batches(config: EvaluationConfig, with_lora: bool) -> int:
    """Batches an evaluation generates (what `evaluate`'s `on_step` counts to); `with_lora` adds the locality sets."""
    per_set = [len(prompts) * len(config.seeds) for _, prompts, _ in _plan(config, with_lora)]
    return sum(math.ceil(images / config.sampling.batch_size) for images in per_set)


def _plan(config: EvaluationConfig, with_lora: bool) -> list[tuple[str, list[str], bool]]:
    """`(set name, prompts, fill {})` of every set with prompts; locality only with a LoRA."""
    plan = [("reconstruction", config.prompts, True), ("editability", config.edit_prompts, True)]
    if with_lora:
        plan += [("locality_tuned", config.locality_prompts, False), ("locality_base", config.locality_prompts, False)]
    return [(name, prompts, fill) for name, prompts, fill in plan if prompts]


def _generate_sets(bundle, config: EvaluationConfig, token, on_step) -> dict[str, SampleResult]:
    """The image sets, keyed by name; prompts keep `{}` in `items` so reports show the template."""
    with_lora = has_lora(bundle)
    total, done, sets = evaluation_batches(config, with_lora), 0, {}
    for name, prompts, fill in _plan(config, with_lora):
        texts = [fill_placeholder(p, config.placeholder) for p in prompts] if fill else list(prompts)
        progress = None
        if on_step is not None:  # this set's batches as batches of the whole evaluation
            progress = lambda d, t, logs, name=name, start=done: on_step(start + d, total, {"stage": name})  # noqa: E731
        if name == "locality_base":
            with adapters_disabled(bundle):
                result = sample_images(bundle, texts, config.seeds, config.sampling, token, progress)
        else:
            result = sample_images(bundle, texts, config.seeds, config.sampling, token, progress)
        done += math.ceil(len(texts) * len(config.seeds) / config.sampling.batch_size)
        # Keep the user's template in the items (with {}), the image order is the same.
        result.items = [(p, s) for p in prompts for s in config.seeds]
        sets[name] = result
    return sets


def _locality(bundle, config: EvaluationConfig, sets, scorers: Scorers) -> dict[str, Metric]:
    reason = None
    if not has_lora(bundle):
        reason = "no LoRA applied: an embedding alone leaves prompts without the placeholder unchanged"
    elif not config.locality_prompts:
        reason = ("no prompts without the placeholder: connect the embedding the LoRA was tuned around (without one, {} "
                  "holds the class word, so every prompt shows the LoRA's subject)")
    if reason is not None:
        return {"locality_eps_mse": metric("locality_eps_mse", reason=reason), "locality_lpips": metric("locality_lpips", reason=reason)}
    mse = locality_eps_mse(bundle, config.locality_prompts, config.locality_timesteps, clip_skip=config.sampling.clip_skip,
                           batch_size=config.sampling.batch_size)
    out = {"locality_eps_mse": metric("locality_eps_mse", mse, timesteps=list(config.locality_timesteps))}
    if scorers.lpips is None:
        out["locality_lpips"] = metric("locality_lpips", reason=scorers.lpips_reason)
    else:
        values = locality_lpips(scorers.lpips, sets["locality_base"].images, sets["locality_tuned"].images)
        out["locality_lpips"] = metric("locality_lpips", values.mean(), per_image=values.tolist())
    return out


def _distance(bundle: ModelBundle, token: PlaceholderToken | None) -> dict | None:
    """The placeholder's distance from the rows of its initializer word in each (base) text encoder.

    `distance`, `norm`, `cosine`, `nearest` are the first encoder's (SD1.5's only one, SDXL's CLIP-L), as in
    the inversion history; with several encoders each also has `{key}_distance`, `{key}_norm`,
    `{key}_cosine` and `{key}_nearest` (`clip_l_…`, `clip_g_…`), measured in its own vocabulary.
    """
    if token is None:
        return None
    keys = bundle.family.embedding_keys
    out: dict = {}
    for i, found in enumerate(placeholder_in_tokenizers(bundle.tokenizers, token)):
        encoder = bundle.text_encoders[i]
        weight = encoder.get_input_embeddings().weight.detach().float()
        initial = weight[initializer_ids(bundle.tokenizers[i], found.initializer, found.num_vectors)]
        vectors = placeholder_vectors(encoder, found)
        # Nearest among the original vocabulary: placeholder rows are appended after it.
        measured = {**embedding_distance(vectors, initial), "nearest": nearest_tokens(bundle, vectors, min(found.token_ids), encoder=i)}
        if i == 0:
            out.update(measured)
        if len(keys) > 1:
            out.update({f"{keys[i]}_{name}": value for name, value in measured.items()})
    return {**out, "initializer": token.initializer}
