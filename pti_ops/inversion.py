"""Textual inversion of the placeholder token: step 1 of pivotal tuning (the TokenInversion core).

Only the placeholder's embedding rows are trained, with the ordinary denoising loss on the
character's images; UNet, VAE and the rest of the text encoder stay frozen. The distance the
token travels from its initializer is measured along the run, because the method chooses the
inversion learning rate by that distance (METHOD.md, step 1).
"""

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from .checks import check_choice, check_number, check_positive_int, check_positive_number
from .training.batches import BatchSampler, batch_time_ids, build_caption_table
from .training.bucket_batches import check_training_sizes, report_buckets, training_groups
from .models.bundle import ModelBundle
from .dataset import ImageDataset
from .training.diffusion_loss import LossWeighting, add_noise, check_timestep_range, denoising_loss
from .errors import InvalidInputError, TrainingStopped
from .pivot import Pivot, family_name
from .training.latent_cache import encode_latents
from .metrics.previews import Previews
from .training.loss_masks import LatentMasks, batch_weighting, latent_masks
from .metrics.distance import embedding_distance, nearest_tokens
from .training.options import TrainingOptions, build_lr_scheduler, build_optimizer, lr_factor
from .training.precision import MixedPrecision, GradientStep, autocast, check_mixed_precision, gradient_checkpointing
from .placeholder import DEFAULT_TEMPLATES, PlaceholderToken, TrainableVectors, add_placeholders, check_templates, placeholder_vectors, spliced_placeholders
from .training.snapshots import Snapshots
from .training.recorder import LossRecorder, StepCallback, diverged
from .training.text_conditioning import encode_ids

logger = logging.getLogger(__name__)

NormMode = Literal["none", "pull", "fixed"]
NORM_MODES: tuple[str, ...] = ("none", "pull", "fixed")


@dataclass
class InversionConfig(TrainingOptions):
    """Settings of a textual inversion run (with the optimiser, schedule and loss options of `TrainingOptions`).

    Args:
        placeholder (`str`): the new word prompts will use, e.g. `tok1`.
        initializer (`str`): class word whose embedding the placeholder starts from, e.g. `character`.
        num_vectors (`int`): embedding vectors behind the placeholder (more = more capacity, less editable).
        templates (`list[str]`): prompt templates with `{}` for the placeholder, used for images without
            their own caption.
        steps (`int`): optimiser steps (the notes fix 1000 and vary the learning rate).
        learning_rate (`float`): AdamW learning rate; the distance travelled grows with lr × steps.
        batch_size (`int`): images per micro-batch.
        gradient_accumulation_steps (`int`): micro-batches per optimiser step.
        seed (`int`): fixes noise, timesteps, image order, flips and caption choice.
        timestep_range (`tuple[int, int]`, *optional*): train on timesteps in [t_min, t_max) only.
        norm_mode (`str`): `none`; `pull` adds `norm_strength · (‖e‖ − m)²` with m the measured mean
            norm of the vocabulary rows; `fixed` learns directions only, the norm held at m.
        norm_strength (`float`): weight of the `pull` term.
        weight_decay (`float`): AdamW decay of the vectors (towards zero, so off by default).
        max_grad_norm (`float`, *optional*): clip the vectors' gradient norm.
        clip_skip (`int`, *optional*): 1 = last text-encoder layer, 2 = penultimate (as the model is
            sampled); None = the model family's default (SD1.5 1, SDXL 2).
        history_every (`int`): record loss and distances every this many steps (and at the last).
        nearest_k (`int`): vocabulary tokens nearest to each vector reported in the history.
        max_norm_ratio (`float`, *optional*): stop as diverged when a vector's norm exceeds this many
            times the vocabulary's mean norm (checked at each record).
        mixed_precision (`str`): `no`, `bf16` or `fp16` (GPU) autocast of the forward passes; the
            trained vectors stay float32.
        gradient_checkpointing (`bool`): recompute UNet activations in the backward pass (less memory, slower).
    """

    placeholder: str = "tok1"
    initializer: str = "character"
    num_vectors: int = 1
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    steps: int = 1000
    learning_rate: float = 5e-4
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    timestep_range: tuple[int, int] | None = None
    norm_mode: NormMode = "none"
    norm_strength: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    clip_skip: int | None = None
    history_every: int = 10
    nearest_k: int = 3
    max_norm_ratio: float | None = 100.0
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.templates = check_templates(self.templates)
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "history_every"):
            check_positive_int(name, getattr(self, name))
        self.check_training_options()
        if self.clip_skip is not None:
            check_positive_int("clip_skip", self.clip_skip)
        check_positive_number("learning_rate", self.learning_rate)
        check_choice("norm_mode", self.norm_mode, NORM_MODES)
        check_mixed_precision(self.mixed_precision)
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise InvalidInputError(f"`max_norm_ratio` must be above 1 or None, got {self.max_norm_ratio!r}.")
        check_number("norm_strength", self.norm_strength, low=0.0)  # NaN too
        check_number("weight_decay", self.weight_decay, low=0.0)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the settings."""
        data = asdict(self)
        data["timestep_range"] = list(self.timestep_range) if self.timestep_range else None
        return data

    def made_by(self) -> dict[str, str]:
        """The settings an embedding file records about the run that trained it."""
        return {"steps": str(self.steps), "lr": repr(self.learning_rate), "batch_size": str(self.batch_size),
                "seed": str(self.seed), "norm_mode": self.norm_mode}


@dataclass
class InversionResult:
    """What an inversion run produced.

    For a family with several text encoders (SDXL), `token`, `initial_vectors`, `vocabulary_norm`
    and `snapshots` are the first encoder's (CLIP-L); `tokens`, `initial_by_key` and
    `vocabulary_norms` hold every encoder's, keyed as the embedding file (`clip_l`, `clip_g`).

    Args:
        token (`PlaceholderToken`): the placeholder as added to the bundle's (first) tokenizer.
        pivot (`Pivot`): the trained token, its templates, history and settings (`save` writes it).
        initial_vectors (`torch.Tensor`): the (first encoder's) vectors before training.
        vocabulary_norm (`float`): measured mean norm of the (first encoder's) original vocabulary rows.
        config (`InversionConfig`): the settings used.
        snapshots (`dict[int, torch.Tensor]`): the (first encoder's) vectors at each recorded step (so
            one run also gives the embeddings at intermediate distances, for sweeps).
        tokens (`tuple[PlaceholderToken, ...]`): the placeholder in each tokenizer, in family order.
        initial_by_key (`dict[str, torch.Tensor]`): each encoder's vectors before training.
        vocabulary_norms (`dict[str, float]`): each encoder's vocabulary mean norm.
        extra_snapshots (`dict[int, dict[str, torch.Tensor]]`): the other encoders' vectors at each
            recorded step, keyed as the file (SDXL: `clip_g`); empty for one-encoder families.
    """

    token: PlaceholderToken
    pivot: Pivot
    initial_vectors: torch.Tensor
    vocabulary_norm: float
    config: InversionConfig
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: tuple[PlaceholderToken, ...] = ()
    initial_by_key: dict[str, torch.Tensor] = field(default_factory=dict)
    vocabulary_norms: dict[str, float] = field(default_factory=dict)
    extra_snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def snapshot_by_key(self, step: int) -> dict[str, torch.Tensor]:
        """Every encoder's vectors at a recorded `step` (0: before training), keyed as the embedding file."""
        if step == 0:
            return dict(self.initial_by_key)
        if step not in self.snapshots:
            raise InvalidInputError(f"step {step} was not recorded; recorded steps: {sorted(self.snapshots)}.")
        first = next(iter(self.pivot.vectors_by_key))
        return {first: self.snapshots[step], **self.extra_snapshots.get(step, {})}

    @property
    def vectors(self) -> torch.Tensor:
        """The trained (first encoder's) vectors `[num_vectors, dim]`, float32 on the CPU."""
        return self.pivot.vectors

    @property
    def history(self) -> list[dict]:
        """Records of step, loss, distance, norm, cosine, nearest tokens (SDXL: also per encoder)."""
        return self.pivot.history

    def save(self, path, overwrite: bool = False):
        """Write the embedding file (see `Pivot.save`)."""
        return self.pivot.save(path, overwrite=overwrite)


def vocabulary_mean_norm(bundle: ModelBundle, exclude_ids: tuple[int, ...] = (), text_encoder=None) -> float:
    """Mean L2 norm of the token-embedding rows, without the given (placeholder) rows.

    Args:
        text_encoder (*optional*): the encoder whose vocabulary is measured; the bundle's first when None.
    """
    encoder = bundle.text_encoder if text_encoder is None else text_encoder
    weight = encoder.get_input_embeddings().weight.detach()
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[list(exclude_ids)] = False
    return weight[keep].float().norm(dim=-1).mean().item()


def invert(
    bundle: ModelBundle,
    dataset: ImageDataset,
    config: InversionConfig,
    on_step: StepCallback | None = None,
    snapshots: Snapshots | None = None,
    previews: Previews | None = None,
) -> InversionResult:
    """Invert: train the placeholder's embedding on `dataset`; add the trained token to `bundle`.

    The bundle's tokenizers and text encoders (SDXL: both) gain the placeholder (its rows hold the
    trained vectors at the end, or the last vectors if `on_step` raised to stop); each encoder has
    its own vector set, initialised from the class word in its own vocabulary, and all are trained
    together. Everything else in the bundle is left bit-identical. If the loss stops being finite or
    a vector's norm explodes, `TrainingStopped` is raised with `.partial`, the result at the last
    good record, whose vectors are also the ones left in the bundle.

    Args:
        bundle (`ModelBundle`): the model; its modules are frozen by this function.
        dataset (`ImageDataset`): the character's images.
        config (`InversionConfig`): the settings.
        on_step (`callable`, *optional*): `on_step(step, total, logs)` after every optimiser step;
            `logs` holds the latest history record on recording steps. It may raise to stop.
        snapshots (`Snapshots`, *optional*): write the embedding every `snapshots.every` steps beside its final file.
        previews (`Previews`, *optional*): sample preview images every `previews.config.every` steps (and at
            the end), given to `on_step` as `logs["preview"]`; the training is unchanged by them.
    """
    if snapshots is not None:
        snapshots.check(config.steps)
    if previews is not None:
        previews.check(config.steps)
    bundle.freeze()
    check_mixed_precision(config.mixed_precision, bundle.device)
    check_training_sizes(bundle, dataset)
    t_range = check_timestep_range(config.timestep_range, bundle.noise_scheduler)
    report_buckets(dataset)
    encoders = bundle.text_encoders
    tokens = add_placeholders(bundle.tokenizers, encoders, config.placeholder, config.initializer, config.num_vectors)
    captions = build_caption_table(dataset, config.templates, tokens[0], list(bundle.tokenizers))
    vocab_norms = tuple(vocabulary_mean_norm(bundle, t.token_ids, e) for t, e in zip(tokens, encoders))
    initials = tuple(placeholder_vectors(e, t).to(bundle.device) for t, e in zip(tokens, encoders))
    vectors = tuple(TrainableVectors(init, fixed_norm=norm if config.norm_mode == "fixed" else None)
                    for init, norm in zip(initials, vocab_norms))
    latents = encode_latents(bundle.vae, dataset, batch_size=max(config.batch_size, 4))

    generator = torch.Generator().manual_seed(config.seed)
    sampler = BatchSampler(len(dataset), config.batch_size, latents.num_views, captions, generator, training_groups(dataset))
    params = [v.raw for v in vectors]
    optimizer = build_optimizer(config.optimizer, [{"params": params}], config.learning_rate, config.weight_decay)
    gradient_step = GradientStep(optimizer, params, config.max_grad_norm, bundle.device, config.mixed_precision)
    lr_scheduler = build_lr_scheduler(optimizer, [lr_factor(config.lr_schedule, config.warmup_steps, config.steps)])
    weighting = LossWeighting(bundle.noise_scheduler, config.snr_gamma) if config.snr_gamma is not None else None
    run = _Run(bundle, dataset, sampler, latents, vectors, gradient_step, config, t_range, vocab_norms,
               bundle.family.default_clip_skip if config.clip_skip is None else config.clip_skip, lr_scheduler, weighting,
               latent_masks(dataset, bundle.vae_scale_factor, bundle.device))
    tracker = _HistoryTracker(bundle, tokens, initials, vocab_norms, config)
    try:
        with spliced_placeholders(encoders, tokens, vectors), gradient_checkpointing(bundle.unet, config.gradient_checkpointing):
            for step in range(1, config.steps + 1):
                lr = optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
                loss = _inversion_step(run)
                try:
                    logs = tracker.update(step, loss, vectors, lr)
                except TrainingStopped as err:
                    with torch.no_grad():  # back to the last good vectors, written to the matrices on exit
                        for i, v in enumerate(vectors):
                            v.raw.copy_(tracker.last_good_raw[i] if tracker.last_good_raw is not None else initials[i])
                    err.partial = _result(bundle, tokens, [v().detach() for v in vectors], initials, vocab_norms, tracker, config)
                    raise
                if snapshots is not None and snapshots.due(step, config.steps):
                    current = _result(bundle, tokens, [v().detach() for v in vectors], initials, vocab_norms, tracker, config)
                    snapshots.write(step, lambda path, overwrite: current.save(path, overwrite=overwrite))
                if previews is not None and previews.due(step, config.steps):
                    logs = {**logs, "preview": previews.make(step, bundle, tokens[0])}
                if on_step is not None:
                    on_step(step, config.steps, logs)
    finally:
        del optimizer
    final = [placeholder_vectors(e, t) for t, e in zip(tokens, encoders)]
    return _result(bundle, tokens, final, initials, vocab_norms, tracker, config)


# The name of earlier releases.
run_inversion = invert


def _result(bundle, tokens, vectors, initials, vocab_norms, tracker, config) -> InversionResult:
    keys = bundle.family.embedding_keys
    token = tokens[0]
    extra = {key: v for key, v in zip(keys[1:], vectors[1:])}
    pivot = Pivot(token.placeholder, token.initializer, vectors[0], family_name(bundle), config.templates,
                  history=tracker.history, made_by=config.made_by(), base_model=bundle.name, extra_vectors=extra)
    return InversionResult(token, pivot, initials[0].cpu(), vocab_norms[0], config, tracker.snapshots, tuple(tokens),
                           {k: v.cpu() for k, v in zip(keys, initials)}, dict(zip(keys, vocab_norms)),
                           extra_snapshots=tracker.extra_snapshots)


@dataclass
class _Run:
    """What every step of one inversion run reads."""

    bundle: ModelBundle
    dataset: ImageDataset
    sampler: BatchSampler
    latents: object
    vectors: tuple[TrainableVectors, ...]
    gradient_step: GradientStep
    config: InversionConfig
    t_range: tuple[int, int]
    vocab_norms: tuple[float, ...]
    clip_skip: int
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    weighting: LossWeighting | None
    masks: LatentMasks | None = None


def _inversion_step(run: _Run) -> torch.Tensor:
    """One optimiser step over `gradient_accumulation_steps` micro-batches; returns the mean loss (no sync)."""
    bundle, config = run.bundle, run.config
    run.gradient_step.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=bundle.device)
    accum = config.gradient_accumulation_steps
    for _ in range(accum):
        batch = run.sampler.next_batch(run.latents)
        noised = add_noise(bundle.noise_scheduler, batch.latents.to(bundle.device), run.sampler.generator, run.t_range,
                           config.noise_offset)
        with autocast(bundle.device, config.mixed_precision):
            conditioning = encode_ids(bundle, batch.ids_per_encoder, run.clip_skip)
            # SDXL also conditions on each image's original size and crop (SD1.5: none)
            time_ids = None if conditioning.pooled is None else batch_time_ids(run.dataset, batch.indices, device=bundle.device)
            weighting = batch_weighting(run.weighting, run.masks, batch.indices, batch.views, bundle.noise_scheduler)
            loss = denoising_loss(bundle.unet, noised, conditioning, time_ids, weighting)
        if config.norm_mode == "pull":  # each encoder's vectors pulled to its own vocabulary's mean norm
            for vectors, vocab_norm in zip(run.vectors, run.vocab_norms):
                loss = loss + config.norm_strength * (vectors().norm(dim=-1) - vocab_norm).pow(2).mean()
        run.gradient_step.backward(loss / accum)
        total += loss.detach() / accum
    run.gradient_step.step()
    run.lr_scheduler.step()
    return total


class _HistoryTracker:
    """Records loss and the placeholder's distance from its start every `history_every` steps.

    A record's `distance`, `norm`, `cosine` and `nearest` are the first encoder's (SD1.5's only
    one; SDXL's CLIP-L). With several encoders each also has `{key}_distance`, `{key}_norm`,
    `{key}_cosine` and `{key}_nearest` (`clip_l_…`, `clip_g_…`), each measured in its own vocabulary.
    """

    def __init__(self, bundle: ModelBundle, tokens: tuple[PlaceholderToken, ...], initials: tuple[torch.Tensor, ...],
                 vocab_norms: tuple[float, ...], config: InversionConfig):
        self.config, self.bundle = config, bundle
        self.initials = tuple(i.float() for i in initials)
        self.keys = bundle.family.embedding_keys[: len(tokens)]
        # Nearest tokens are searched among each vocabulary before its placeholder rows.
        self.vocabulary_sizes = tuple(min(t.token_ids) for t in tokens)
        self.vocab_norms = vocab_norms
        self.losses = LossRecorder(("loss",), initials[0].device, config.history_every, config.steps)
        self.snapshots: dict[int, torch.Tensor] = {}
        self.extra_snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.last_good_raw: tuple[torch.Tensor, ...] | None = None

    @property
    def history(self) -> list[dict]:
        return self.losses.history

    def update(self, step: int, loss: torch.Tensor, vectors: tuple[TrainableVectors, ...], lr: float) -> dict:
        if not self.losses.add({"loss": loss}):
            return {}
        record = self.losses.record()
        record["lr"] = lr
        current = [v().detach().float() for v in vectors]
        for i, c in enumerate(current):
            self._check_divergence(step, record["loss"], c, self.vocab_norms[i], self._what(i))
        record.update(self.measure(current))
        self.history.append(record)
        self.snapshots[step] = current[0].cpu().clone()
        if len(current) > 1:
            self.extra_snapshots[step] = {key: c.cpu().clone() for key, c in zip(self.keys[1:], current[1:])}
        self.last_good_raw = tuple(v.raw.detach().clone() for v in vectors)
        return record

    def _what(self, i: int) -> str:
        return "token" if len(self.keys) == 1 else f"token's {self.keys[i]}"

    def _check_divergence(self, step: int, loss: float, current: torch.Tensor, vocab_norm: float, what: str) -> None:
        last_good = self.history[-1]["step"] if self.history else None
        lr = self.config.learning_rate
        if not math.isfinite(loss) or not torch.isfinite(current).all():
            raise diverged(f"the loss became {loss} at step {step}", lr, "token", last_good)
        ratio = self.config.max_norm_ratio
        norm = current.norm(dim=-1).max().item()
        if ratio is not None and norm > ratio * vocab_norm:
            raise diverged(f"the {what}'s norm reached {norm:.4g} at step {step}, over {ratio:g} times the vocabulary's "
                           f"mean norm {vocab_norm:.4g}", lr, "token", last_good)

    def measure(self, current: list[torch.Tensor]) -> dict:
        """‖e − e0‖ (over all vectors), mean ‖e‖, mean cos(e, e0), nearest vocabulary tokens per vector."""
        nearest = nearest_tokens(self.bundle, current[0], self.vocabulary_sizes[0], self.config.nearest_k)
        record = {**embedding_distance(current[0], self.initials[0]), "nearest": nearest}
        if len(current) > 1:
            for i, key in enumerate(self.keys):
                measured = embedding_distance(current[i], self.initials[i])
                record.update({f"{key}_{name}": value for name, value in measured.items()})
                record[f"{key}_nearest"] = nearest_tokens(self.bundle, current[i], self.vocabulary_sizes[i],
                                                          self.config.nearest_k, encoder=i)  # fmt: skip
        return record


def config_to_dict(config: InversionConfig) -> dict:
    """A JSON-ready dict of the settings."""
    return config.to_dict()
