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

from .checks import check_choice, check_positive_int, check_positive_number
from .training.batches import BatchSampler, build_caption_table
from .models.bundle import ModelBundle
from .dataset import ImageDataset
from .training.diffusion_loss import add_noise, check_timestep_range, denoising_loss
from .errors import InvalidInputError, TrainingStopped
from .pivot import Pivot, family_name
from .training.latent_cache import encode_latents
from .metrics.distance import embedding_distance, nearest_tokens
from .training.precision import MixedPrecision, GradientStep, autocast, check_mixed_precision, gradient_checkpointing
from .placeholder import DEFAULT_TEMPLATES, PlaceholderToken, TrainableVectors, add_placeholder, check_templates, placeholder_vectors, spliced_placeholder
from .training.recorder import LossRecorder, StepCallback, diverged
from .training.text_conditioning import encode_tokens

logger = logging.getLogger(__name__)

NormMode = Literal["none", "pull", "fixed"]
NORM_MODES: tuple[str, ...] = ("none", "pull", "fixed")


@dataclass
class InversionConfig:
    """Settings of a textual inversion run.

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
        clip_skip (`int`): 1 = last text-encoder layer, 2 = penultimate (as the model is sampled).
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
    clip_skip: int = 1
    history_every: int = 10
    nearest_k: int = 3
    max_norm_ratio: float | None = 100.0
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.templates = check_templates(self.templates)
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "history_every"):
            check_positive_int(name, getattr(self, name))
        check_positive_number("learning_rate", self.learning_rate)
        check_choice("norm_mode", self.norm_mode, NORM_MODES)
        check_mixed_precision(self.mixed_precision)
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise InvalidInputError(f"`max_norm_ratio` must be above 1 or None, got {self.max_norm_ratio!r}.")
        if self.norm_strength < 0 or self.weight_decay < 0:
            raise InvalidInputError("`norm_strength` and `weight_decay` must not be negative.")

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

    Args:
        token (`PlaceholderToken`): the placeholder as added to the bundle's tokenizer.
        pivot (`Pivot`): the trained token, its templates, history and settings (`save` writes it).
        initial_vectors (`torch.Tensor`): the vectors before training.
        vocabulary_norm (`float`): measured mean norm of the original vocabulary rows.
        config (`InversionConfig`): the settings used.
        snapshots (`dict[int, torch.Tensor]`): the vectors at each recorded step (so one run also
            gives the embeddings at intermediate distances, for sweeps).
    """

    token: PlaceholderToken
    pivot: Pivot
    initial_vectors: torch.Tensor
    vocabulary_norm: float
    config: InversionConfig
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def vectors(self) -> torch.Tensor:
        """The trained vectors `[num_vectors, dim]`, float32 on the CPU."""
        return self.pivot.vectors

    @property
    def history(self) -> list[dict]:
        """Records of step, loss, distance, norm, cosine, nearest tokens."""
        return self.pivot.history

    def save(self, path, overwrite: bool = False):
        """Write the embedding file (see `Pivot.save`)."""
        return self.pivot.save(path, overwrite=overwrite)


def vocabulary_mean_norm(bundle: ModelBundle, exclude_ids: tuple[int, ...] = ()) -> float:
    """Mean L2 norm of the token-embedding rows, without the given (placeholder) rows."""
    weight = bundle.text_encoder.get_input_embeddings().weight.detach()
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[list(exclude_ids)] = False
    return weight[keep].float().norm(dim=-1).mean().item()


def invert(
    bundle: ModelBundle,
    dataset: ImageDataset,
    config: InversionConfig,
    on_step: StepCallback | None = None,
) -> InversionResult:
    """Invert: train the placeholder's embedding on `dataset`; add the trained token to `bundle`.

    The bundle's tokenizer and text encoder gain the placeholder (its rows hold the trained
    vectors at the end, or the last vectors if `on_step` raised to stop). Everything else in the
    bundle is left bit-identical. If the loss stops being finite or a vector's norm explodes,
    `TrainingStopped` is raised with `.partial`, the result at the last good record, whose vectors
    are also the ones left in the bundle.

    Args:
        bundle (`ModelBundle`): the model; its modules are frozen by this function.
        dataset (`ImageDataset`): the character's images.
        config (`InversionConfig`): the settings.
        on_step (`callable`, *optional*): `on_step(step, total, logs)` after every optimiser step;
            `logs` holds the latest history record on recording steps. It may raise to stop.
    """
    bundle.check_trainable("textual inversion")
    bundle.freeze()
    check_mixed_precision(config.mixed_precision, bundle.device)
    bundle.check_resolution(dataset.resolution)
    t_range = check_timestep_range(config.timestep_range, bundle.noise_scheduler)
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, config.placeholder, config.initializer, config.num_vectors)
    captions = build_caption_table(dataset, config.templates, token, bundle.tokenizer)
    vocab_norm = vocabulary_mean_norm(bundle, token.token_ids)
    initial = placeholder_vectors(bundle.text_encoder, token).to(bundle.device)
    vectors = TrainableVectors(initial, fixed_norm=vocab_norm if config.norm_mode == "fixed" else None)
    latents = encode_latents(bundle.vae, dataset, batch_size=max(config.batch_size, 4))

    generator = torch.Generator().manual_seed(config.seed)
    sampler = BatchSampler(len(dataset), config.batch_size, latents.num_views, captions, generator)
    optimizer = torch.optim.AdamW([vectors.raw], lr=config.learning_rate, weight_decay=config.weight_decay)
    gradient_step = GradientStep(optimizer, [vectors.raw], config.max_grad_norm, bundle.device, config.mixed_precision)
    tracker = _HistoryTracker(bundle, token, initial, vocab_norm, config)
    try:
        with spliced_placeholder(bundle.text_encoder, token, vectors), gradient_checkpointing(bundle.unet, config.gradient_checkpointing):
            for step in range(1, config.steps + 1):
                loss = _inversion_step(bundle, sampler, latents, vectors, gradient_step, config, t_range, vocab_norm)
                try:
                    logs = tracker.update(step, loss, vectors)
                except TrainingStopped as err:
                    with torch.no_grad():  # back to the last good vectors, written to the matrix on exit
                        vectors.raw.copy_(tracker.last_good_raw if tracker.last_good_raw is not None else initial)
                    err.partial = _result(bundle, token, vectors().detach(), initial, vocab_norm, tracker, config)
                    raise
                if on_step is not None:
                    on_step(step, config.steps, logs)
    finally:
        del optimizer
    return _result(bundle, token, placeholder_vectors(bundle.text_encoder, token), initial, vocab_norm, tracker, config)


# The name of earlier releases.
run_inversion = invert


def _result(bundle, token, vectors, initial, vocab_norm, tracker, config) -> InversionResult:
    pivot = Pivot(token.placeholder, token.initializer, vectors, family_name(bundle), config.templates,
                  history=tracker.history, made_by=config.made_by(), base_model=bundle.name)
    return InversionResult(token, pivot, initial.cpu(), vocab_norm, config, tracker.snapshots)


def _inversion_step(bundle, sampler, latents, vectors, gradient_step, config, t_range, vocab_norm) -> torch.Tensor:
    """One optimiser step over `gradient_accumulation_steps` micro-batches; returns the mean loss (no sync)."""
    gradient_step.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=bundle.device)
    accum = config.gradient_accumulation_steps
    for _ in range(accum):
        batch_latents, input_ids = sampler.next(latents)
        noised = add_noise(bundle.noise_scheduler, batch_latents.to(bundle.device), sampler.generator, t_range)
        with autocast(bundle.device, config.mixed_precision):
            conditioning = encode_tokens(bundle.text_encoder, input_ids, config.clip_skip)
            loss = denoising_loss(bundle.unet, noised, conditioning)
        if config.norm_mode == "pull":
            loss = loss + config.norm_strength * (vectors().norm(dim=-1) - vocab_norm).pow(2).mean()
        gradient_step.backward(loss / accum)
        total += loss.detach() / accum
    gradient_step.step()
    return total


class _HistoryTracker:
    """Records loss and the placeholder's distance from its start every `history_every` steps."""

    def __init__(self, bundle: ModelBundle, token: PlaceholderToken, initial: torch.Tensor, vocab_norm: float, config: InversionConfig):
        self.config, self.bundle = config, bundle
        self.initial = initial.float()
        # Nearest tokens are searched among the vocabulary before the placeholder rows.
        self.vocabulary_size = min(token.token_ids)
        self.vocab_norm = vocab_norm
        self.losses = LossRecorder(("loss",), initial.device, config.history_every, config.steps)
        self.snapshots: dict[int, torch.Tensor] = {}
        self.last_good_raw: torch.Tensor | None = None

    @property
    def history(self) -> list[dict]:
        return self.losses.history

    def update(self, step: int, loss: torch.Tensor, vectors: TrainableVectors) -> dict:
        if not self.losses.add({"loss": loss}):
            return {}
        record = self.losses.record()
        current = vectors().detach().float()
        self._check_divergence(step, record["loss"], current)
        record.update(self.measure(current))
        self.history.append(record)
        self.snapshots[step] = current.cpu().clone()
        self.last_good_raw = vectors.raw.detach().clone()
        return record

    def _check_divergence(self, step: int, loss: float, current: torch.Tensor) -> None:
        last_good = self.history[-1]["step"] if self.history else None
        lr = self.config.learning_rate
        if not math.isfinite(loss) or not torch.isfinite(current).all():
            raise diverged(f"the loss became {loss} at step {step}", lr, "token", last_good)
        ratio = self.config.max_norm_ratio
        norm = current.norm(dim=-1).max().item()
        if ratio is not None and norm > ratio * self.vocab_norm:
            raise diverged(f"the token's norm reached {norm:.4g} at step {step}, over {ratio:g} times the vocabulary's "
                           f"mean norm {self.vocab_norm:.4g}", lr, "token", last_good)

    def measure(self, current: torch.Tensor) -> dict:
        """‖e − e0‖ (over all vectors), mean ‖e‖, mean cos(e, e0), nearest vocabulary tokens per vector."""
        nearest = nearest_tokens(self.bundle, current, self.vocabulary_size, self.config.nearest_k)
        return {**embedding_distance(current, self.initial), "nearest": nearest}


def config_to_dict(config: InversionConfig) -> dict:
    """A JSON-ready dict of the settings."""
    return config.to_dict()
