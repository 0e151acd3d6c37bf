"""LoRA tuning of the UNet around the frozen pivot token: step 2 of pivotal tuning (PivotalLoRATune core).

The placeholder token is the pivot; peft LoRA adapters on the UNet (optionally the text
encoder) are trained with the denoising loss on the same images and prompts, optionally kept
local by the `LocalityRegularizer` (step 3): at regularisation conditionings the tuned UNet must
predict what the original UNet predicts, the original being the same UNet with its adapters
disabled (no second copy in memory).

Schedules: `sequential` (the token was inverted first and stays frozen, as PTI) and `joint` (the
token trains with the LoRA until `ti_frac` of the steps, then freezes — its learning rate is set
to 0, keeping the optimiser and its Adam state).
"""

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from peft import LoraConfig

from .training.adapters import adapters_disabled, lora_layers
from .checks import check_choice, check_positive_int, check_positive_number
from .training.batches import BatchSampler, batch_time_ids, build_caption_table
from .training.bucket_batches import check_training_sizes, report_buckets, training_groups
from .models.bundle import ModelBundle
from .dataset import ImageDataset
from .training.diffusion_loss import LossWeighting, NoisedBatch, add_noise, check_timestep_range, diffusion_mse
from .errors import InvalidInputError, TokenizerError, TrainingStopped
from .training.image_locality import image_locality_loss
from .training.latent_cache import encode_latents
from .training.loss_masks import batch_weighting, latent_masks
from .files.lora_file import lora_state_dict_to_kohya, save_lora
from .training.options import TrainingOptions, build_lr_scheduler, build_optimizer, lr_factor
from .training.precision import MixedPrecision, GradientStep, autocast, check_mixed_precision, gradient_checkpointing
from .pivot import Pivot
from .models.conditioning import Conditioning
from .placeholder import (DEFAULT_TEMPLATES, PlaceholderToken, TrainableVectors, check_templates, placeholder_in_tokenizers,
                          placeholder_vectors, spliced_placeholders)
from .regularizer import LocalityRegularizer, RegularizerConfig, locality_loss
from .training.text_conditioning import encode_ids
from .training.checkpoints import load_checkpoint, save_checkpoint
from .metrics.previews import Previews
from .training.snapshots import Snapshots
from .training.recorder import LossRecorder, StepCallback, check_losses_finite

logger = logging.getLogger(__name__)

Schedule = Literal["sequential", "joint"]
SCHEDULES: tuple[str, ...] = ("sequential", "joint")
# Module-name suffixes that get LoRA adapters, by preset.
UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_NAME = "pivotal"


@dataclass
class TuneConfig(TrainingOptions):
    """Settings of the LoRA tuning around the pivot (with the optimiser, schedule and loss options of `TrainingOptions`).

    Args:
        rank (`int`): LoRA rank of each adapted layer (capacity; 4–16 is light tuning).
        alpha (`float`, *optional*): LoRA alpha; the update is scaled by alpha/rank. Default: rank.
        dropout (`float`): dropout on the LoRA branch.
        targets (`str`): `attention` (to_q, to_k, to_v, to_out.0) or `attention_ff` (+ feed-forward).
        train_text_encoder (`bool`): also put LoRA on the text encoders' attention projections (SDXL: both).
        learning_rate (`float`): AdamW learning rate of the UNet LoRA (the notes sweep it at fixed steps
            and stop before the model learns the training images' positions).
        text_encoder_lr (`float`, *optional*): learning rate of the text-encoder LoRA (default: learning_rate).
        steps (`int`): optimiser steps.
        batch_size (`int`): images per micro-batch.
        gradient_accumulation_steps (`int`): micro-batches per optimiser step.
        seed (`int`): fixes LoRA initialisation, noise, timesteps, order, flips, captions, regulariser draws.
        timestep_range (`tuple[int, int]`, *optional*): train on timesteps in [t_min, t_max) only (a cap).
        schedule (`str`): `sequential` (token frozen) or `joint` (token trained too until `ti_frac`).
        ti_learning_rate (`float`): learning rate of the token in the `joint` schedule.
        ti_frac (`float`): fraction of the steps during which the token trains (`joint`).
        templates (`list[str]`): prompt templates with `{}`, for images without their own caption.
        clip_skip (`int`, *optional*): text-encoder layer (1 = last), as the model is sampled; None = the
            model family's default (SD1.5 1, SDXL 2).
        max_grad_norm (`float`, *optional*): clip the global gradient norm of the trained parameters.
        weight_decay (`float`): AdamW weight decay of the LoRA weights.
        history_every (`int`): record the losses every this many steps (and at the last).
        mixed_precision (`str`): `no`, `bf16` or `fp16` (GPU) autocast of the forward passes; LoRA
            weights stay float32.
        gradient_checkpointing (`bool`): recompute UNet activations in the backward pass (less memory, slower).
        offload_text_encoders (`bool`): move the text encoders to the CPU once every prompt is encoded
            (SDXL's two are 1.6 GB in bf16); needs them frozen (`sequential`, no text-encoder LoRA).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: str = "attention"
    train_text_encoder: bool = False
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    timestep_range: tuple[int, int] | None = None
    schedule: Schedule = "sequential"
    ti_learning_rate: float = 5e-4
    ti_frac: float = 0.5
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    clip_skip: int | None = None
    max_grad_norm: float | None = 1.0
    weight_decay: float = 1e-2
    history_every: int = 10
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    offload_text_encoders: bool = False

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        for name in ("rank", "steps", "batch_size", "gradient_accumulation_steps", "history_every"):
            check_positive_int(name, getattr(self, name))
        self.check_training_options()
        if self.clip_skip is not None:
            check_positive_int("clip_skip", self.clip_skip)
        check_positive_number("learning_rate", self.learning_rate)
        check_positive_number("ti_learning_rate", self.ti_learning_rate)
        check_positive_number("text_encoder_lr", self.text_encoder_lr, optional=True)
        check_positive_number("alpha", self.alpha, optional=True)
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        check_choice("targets", self.targets, tuple(UNET_TARGETS))
        check_choice("schedule", self.schedule, SCHEDULES)
        if not 0.0 < self.ti_frac <= 1.0:
            raise InvalidInputError(f"`ti_frac` must be in (0, 1], got {self.ti_frac!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidInputError(f"`max_grad_norm` must be positive or None, got {self.max_grad_norm!r}.")
        self.templates = check_templates(self.templates)
        self.alpha = float(self.alpha if self.alpha is not None else self.rank)
        if self.offload_text_encoders and (self.schedule == "joint" or self.train_text_encoder):
            raise InvalidInputError(
                "`offload_text_encoders` needs the text encoders frozen during the tuning, but the `joint` schedule "
                "or `train_text_encoder` trains through them: turn one of them off."
            )

    @property
    def token_steps(self) -> int:
        """Steps during which the token trains (`joint`); 0 for `sequential`."""
        return math.ceil(self.ti_frac * self.steps) if self.schedule == "joint" else 0

    def made_by(self) -> dict[str, str]:
        """What an embedding file records about the `joint` run that trained its token."""
        return {"steps": str(self.token_steps), "lr": repr(self.ti_learning_rate), "batch_size": str(self.batch_size),
                "seed": str(self.seed), "schedule": self.schedule}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["timestep_range"] = list(self.timestep_range) if self.timestep_range else None
        return data


@dataclass
class TuneResult:
    """What a tuning run produced.

    Args:
        lora (`dict[str, torch.Tensor]`): the adapters in kohya format (see `files/lora_file.py`).
        pivot (`Pivot`): the token the LoRA was tuned around (moved on by the `joint` schedule).
        history (`list[dict]`): step, loss (denoising), reg_loss (locality, when active), lr.
        config (`TuneConfig`): the settings used.
        regularizer (`dict`, *optional*): the regulariser settings, if one was used.
    """

    lora: dict[str, torch.Tensor]
    pivot: Pivot
    history: list[dict]
    config: TuneConfig
    regularizer: dict | None = None

    @property
    def vectors(self) -> torch.Tensor:
        """The placeholder vectors at the end (changed only by `joint`)."""
        return self.pivot.vectors

    def metadata(self, token: PlaceholderToken | None = None, base_model: str | None = None) -> dict[str, str]:
        """String metadata for the LoRA file: the inputs that produced it."""
        c = self.config
        return {
            "pivotal.placeholder": token.placeholder if token is not None else self.pivot.placeholder,
            "pivotal.base_model": base_model if base_model is not None else self.pivot.base_model,
            "pivotal.rank": str(c.rank),
            "pivotal.alpha": f"{c.alpha:g}",
            "pivotal.steps": str(c.steps),
            "pivotal.lr": repr(c.learning_rate),
            "pivotal.schedule": c.schedule,
            "pivotal.seed": str(c.seed),
            "pivotal.targets": c.targets,
            "pivotal.train_text_encoder": str(c.train_text_encoder).lower(),
            "pivotal.regularizer": json.dumps(self.regularizer) if self.regularizer else "none",
        }

    def save(self, path, overwrite: bool = False, bundle_embedding: bool = False):
        """Write the LoRA file (kohya keys, atomically; an existing file only with `overwrite`).

        With `bundle_embedding`, the pivot's vectors go into the file too (`bundle_emb.PLACEHOLDER.clip_l`,
        and `.clip_g` on SDXL).
        """
        embeddings = {self.pivot.placeholder: self.pivot.vectors_by_key} if bundle_embedding else None
        return save_lora(path, self.lora, self.metadata(), overwrite=overwrite, embeddings=embeddings)


def lora_config(rank: int, alpha: float, dropout: float, targets: tuple[str, ...]) -> LoraConfig:
    """peft config for the adapters; LoRA B starts at zero, so step 0 reproduces the base model."""
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights=True)


def check_token_in_bundle(bundle: ModelBundle, token: PlaceholderToken) -> tuple[PlaceholderToken, ...]:
    """The placeholder in each of the bundle's tokenizers (family order); raises unless all hold it, the first with `token`'s ids."""
    tokens = placeholder_in_tokenizers(bundle.tokenizers, token)
    if tokens[0].token_ids != token.token_ids:
        raise TokenizerError(
            f"placeholder {token.placeholder!r} is not in this model's tokenizer with these ids: run the inversion "
            "first or load its embedding into the model (`Pivot.apply`)."
        )
    return tokens


def run_tuning(
    bundle: ModelBundle,
    dataset: ImageDataset,
    token: PlaceholderToken,
    config: TuneConfig,
    regularizer: RegularizerConfig | None = None,
    on_step: StepCallback | None = None,
    checkpoint: str | None = None,
    resume_from: str | None = None,
    lpips_model: torch.nn.Module | None = None,
    pivot: Pivot | None = None,
    checkpoint_every: int | None = None,
    snapshots: Snapshots | None = None,
    previews: Previews | None = None,
) -> TuneResult:
    """Train LoRA adapters around the pivot `token`; leave them active on the bundle's models.

    On an exception (including one raised by `on_step` to cancel) the adapters are removed again,
    so the bundle is as it was (in the `joint` schedule the placeholder rows keep their last values).
    If the loss diverges, `TrainingStopped` is raised with `.partial`: a `TuneResult` of the last
    recorded good state.

    Args:
        bundle (`ModelBundle`): the model, whose tokenizer already holds `token`.
        dataset (`ImageDataset`): the character's images.
        token (`PlaceholderToken`): the pivot, from `run_inversion` or `add_placeholder(vectors=...)`.
        config (`TuneConfig`): the settings.
        regularizer (`RegularizerConfig`, *optional*): the locality regulariser (None or mode `none`: off).
        on_step (`callable`, *optional*): `on_step(step, total, logs)` after every step; may raise to stop.
        checkpoint (`str`, *optional*): when the run is stopped, write a resumable checkpoint here.
        resume_from (`str`, *optional*): continue the run saved in this checkpoint (same settings).
        lpips_model (`lpips.LPIPS`, *optional*): for the regulariser's `image_space` term; loaded from
            local files (`metrics.load_lpips`) when needed and not given.
        pivot (`Pivot`, *optional*): what `token` stands for (templates, history, how it was made);
            recorded in the result. Default: a pivot of the token's current rows.
        checkpoint_every (`int`, *optional*): also write `checkpoint` every this many steps (a run killed
            outright resumes from the last one).
        snapshots (`Snapshots`, *optional*): write the LoRA every `snapshots.every` steps beside its final
            file (with the token bundled in it for the `joint` schedule, whose token moves).
        previews (`Previews`, *optional*): sample preview images every `previews.config.every` steps (and at
            the end), given to `on_step` as `logs["preview"]`; the training is unchanged by them.
    """
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint is None:
            raise InvalidInputError("`checkpoint_every` needs a `checkpoint` path to write to.")
    if snapshots is not None:
        snapshots.check(config.steps)
    if previews is not None:
        previews.check(config.steps)
    bundle.freeze()
    check_mixed_precision(config.mixed_precision, bundle.device)
    check_training_sizes(bundle, dataset)
    tokens = check_token_in_bundle(bundle, token)
    t_range = check_timestep_range(config.timestep_range, bundle.noise_scheduler)
    captions = build_caption_table(dataset, config.templates, token, list(bundle.tokenizers))
    if config.offload_text_encoders and captions.varies:
        raise InvalidInputError(
            "`offload_text_encoders` needs the training prompts encoded once, but the dataset's `shuffle_tags` or "
            "`caption_dropout` make new prompts every step: turn one of them off."
        )
    report_buckets(dataset)
    locality = _build_regularizer(bundle, token, regularizer, config)
    latents = encode_latents(bundle.vae, dataset, batch_size=max(config.batch_size, 4))
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # LoRA A matrices are initialised from torch's global generator
    if locality is not None and locality.config.image_space and lpips_model is None:
        from .metrics.lpips_model import load_lpips

        lpips_model = load_lpips(device=bundle.device)
    trainer = _Trainer(bundle, dataset, tokens, config, locality, captions, latents, generator, t_range)
    trainer.lpips_model = lpips_model
    reg_settings = locality.config.to_dict() if locality is not None else None
    trainer.pivot, trainer.reg_settings, trainer.snapshots, trainer.previews = pivot, reg_settings, snapshots, previews
    trainer.checkpoint, trainer.checkpoint_every = checkpoint, checkpoint_every
    try:
        if resume_from is not None:
            trainer.restore(load_checkpoint(resume_from, config.to_dict()))
        history = trainer.train(on_step)
        lora = trainer.export()
    except TrainingStopped as err:
        if err.partial is None and trainer.last_good is not None:
            trainer.load_trained(trainer.last_good["trained"])
            vectors = [v().detach() for v in trainer.vectors]
            partial = _pivot_after(bundle, token, vectors, config, pivot, trainer.last_good["history"])
            err.partial = TuneResult(trainer.export(), partial, trainer.last_good["history"], config, reg_settings)
        trainer.remove_adapters()
        raise
    except BaseException:
        trainer.text_encoders_back()
        if checkpoint is not None:
            save_checkpoint(checkpoint, trainer.state())
            logger.info("run stopped at step %d; resumable checkpoint written to %s", trainer.progress.step, checkpoint)
        trainer.remove_adapters()
        raise
    final = _pivot_after(bundle, token, [placeholder_vectors(e, t) for t, e in zip(tokens, bundle.text_encoders)],
                         config, pivot, history)
    return TuneResult(lora, final, history, config, reg_settings)


def tune_around(
    bundle: ModelBundle,
    dataset: ImageDataset,
    pivot: Pivot,
    config: TuneConfig,
    regularizer: RegularizerConfig | None = None,
    on_step: StepCallback | None = None,
    checkpoint: str | None = None,
    resume_from: str | None = None,
    lpips_model: torch.nn.Module | None = None,
    checkpoint_every: int | None = None,
    snapshots: Snapshots | None = None,
    previews: Previews | None = None,
) -> TuneResult:
    """Tune: train LoRA adapters around `pivot` (put into `bundle` first); the phase call of step 2.

    Arguments as `run_tuning`, with the pivot instead of a placeholder already in the bundle.
    """
    token = pivot.apply(bundle)
    return run_tuning(bundle, dataset, token, config, regularizer, on_step=on_step, checkpoint=checkpoint,
                      resume_from=resume_from, lpips_model=lpips_model, pivot=pivot, checkpoint_every=checkpoint_every,
                      snapshots=snapshots, previews=previews)


def _pivot_after(bundle, token, vectors, config: TuneConfig, pivot: Pivot | None, history) -> Pivot:
    """The pivot at the end of a tuning run: unchanged, or moved on by the `joint` schedule (`vectors`: one per encoder)."""
    if pivot is None:
        pivot = Pivot.from_token(bundle, token, config.templates)
    if config.schedule != "joint":
        return pivot
    return pivot.with_vectors(list(vectors), history, config.made_by())


def _build_regularizer(bundle, token, regularizer, config) -> LocalityRegularizer | None:
    if regularizer is None or not regularizer.is_active:
        return None
    locality = LocalityRegularizer(bundle, token, regularizer, clip_skip=config.clip_skip)
    # Encode now, before any adapter exists: c_r comes from the original text encoder.
    locality.conditionings(0, torch.Generator().manual_seed(config.seed))
    return locality


class _Trainer:
    """The training loop's state: adapters, optimiser, caches; one method per step of the loop."""

    def __init__(self, bundle, dataset, tokens, config, locality, captions, latents, generator, t_range):
        self.bundle, self.dataset, self.tokens, self.config, self.locality = bundle, dataset, tokens, config, locality
        self.latents, self.generator, self.t_range = latents, generator, t_range
        self.clip_skip = bundle.family.default_clip_skip if config.clip_skip is None else config.clip_skip
        self.sampler = BatchSampler(len(latents.mean), config.batch_size, latents.num_views, captions, generator,
                                    training_groups(dataset))
        self.masks = latent_masks(dataset, bundle.vae_scale_factor, bundle.device)
        self.unet_params = self._add_adapter(bundle.unet, UNET_TARGETS[config.targets])
        self.te_params = [p for encoder in bundle.text_encoders for p in self._add_adapter(encoder, TEXT_ENCODER_TARGETS)
                          ] if config.train_text_encoder else []
        self.adapter_layers = lora_layers(bundle)
        self.vectors = tuple(TrainableVectors(placeholder_vectors(e, t).to(bundle.device))
                             for t, e in zip(tokens, bundle.text_encoders))
        self.joint = config.schedule == "joint"
        groups = [{"params": self.unet_params, "lr": config.learning_rate, "name": "unet"}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": config.text_encoder_lr or config.learning_rate, "name": "text_encoder"})
        if self.joint:
            groups.append({"params": [v.raw for v in self.vectors], "lr": config.ti_learning_rate, "weight_decay": 0.0,
                           "name": "token"})
        # foreach: one fused update over the ~100 small LoRA tensors (torch picks it only on CUDA;
        # on the CPU the per-tensor loop cost ~2 % of a tiny-model step).
        self.optimizer = build_optimizer(config.optimizer, groups, config.learning_rate, config.weight_decay, foreach=True)
        schedule = lr_factor(config.lr_schedule, config.warmup_steps, config.steps)
        token_schedule = lr_factor(config.lr_schedule, min(config.warmup_steps, max(0, config.token_steps - 1)), max(1, config.token_steps))
        # the token's schedule runs over its own phase and ends at 0 (frozen, Adam state kept)
        factors = [(lambda step: token_schedule(step) if step < config.token_steps else 0.0) if g["name"] == "token" else schedule
                   for g in groups]
        self.lr_scheduler = build_lr_scheduler(self.optimizer, factors)
        self.weighting = LossWeighting(bundle.noise_scheduler, config.snr_gamma) if config.snr_gamma is not None else None
        self.step_lrs: dict[str, float] = {}
        # set by run_tuning: what snapshots and periodic checkpoints are made of
        self.pivot: Pivot | None = None
        self.reg_settings: dict | None = None
        self.snapshots: Snapshots | None = None
        self.previews: Previews | None = None
        self.checkpoint, self.checkpoint_every = None, None
        self.trained = [p for group in groups for p in group["params"]]
        self.gradient_step = GradientStep(self.optimizer, self.trained, config.max_grad_norm, bundle.device, config.mixed_precision)
        self.progress = LossRecorder(("loss", "reg_loss"), bundle.device, config.history_every, config.steps)
        self.last_good: dict | None = None
        # With the text encoders frozen the training prompts' encodings never change: encode them once
        # (unless tag shuffling or caption dropout make new prompts each step: then each batch's).
        self.cached_conditioning: Conditioning | None = None
        self.offloaded_from: torch.device | None = None
        if not self.joint and not self.te_params and not captions.varies:
            with torch.no_grad():
                self.cached_conditioning = encode_ids(bundle, captions.ids_per_encoder, self.clip_skip)
            self.caption_rows = {tuple(row.tolist()): i for i, row in enumerate(captions.input_ids)}
            if config.offload_text_encoders:
                self._offload_text_encoders()

    def _offload_text_encoders(self) -> None:
        """Every prompt is encoded (training captions here, the regulariser's when it was built): free their memory."""
        self.offloaded_from = self.bundle.device
        for encoder in self.bundle.text_encoders:
            encoder.to("cpu")
        if self.offloaded_from.type == "cuda":
            torch.cuda.empty_cache()

    def text_encoders_back(self) -> None:
        """Undo `_offload_text_encoders` (the bundle leaves the run on the device it came on)."""
        if self.offloaded_from is not None:
            for encoder in self.bundle.text_encoders:
                encoder.to(self.offloaded_from)
            self.offloaded_from = None

    def _add_adapter(self, model, targets) -> list[torch.nn.Parameter]:
        from peft import inject_adapter_in_model

        cfg = self.config
        inject_adapter_in_model(lora_config(cfg.rank, cfg.alpha, cfg.dropout, targets), model, adapter_name=ADAPTER_NAME)
        params = [p for name, p in model.named_parameters() if "lora_" in name]
        for p in params:
            p.requires_grad_(True)
        return params

    def remove_adapters(self) -> None:
        from peft.tuners.lora import LoraLayer

        for model in (self.bundle.unet, *self.bundle.text_encoders):
            for module in model.modules():
                if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                    module.delete_adapter(ADAPTER_NAME)

    def train(self, on_step: StepCallback | None) -> list[dict]:
        config, progress = self.config, self.progress
        freeze_at = config.token_steps if self.joint else None
        bundle = self.bundle
        splice = spliced_placeholders(bundle.text_encoders, self.tokens, self.vectors) if self.joint else contextlib.nullcontext()
        with splice, gradient_checkpointing(self.bundle.unet, config.gradient_checkpointing):
            if freeze_at is not None and progress.step >= freeze_at:
                self._freeze_token()  # resumed after the token phase
            while progress.step < config.steps:
                if progress.step == freeze_at:
                    self._freeze_token()
                logs = self._record() if progress.add(self._step(progress.step)) else {}
                self._write_along(progress.step)
                if self.previews is not None and self.previews.due(progress.step, config.steps):
                    logs = {**logs, "preview": self._preview(progress.step)}
                if on_step is not None:
                    on_step(progress.step, config.steps, logs)
        self.text_encoders_back()
        return progress.history

    def _write_along(self, step: int) -> None:
        """The periodic checkpoint and snapshot of `step`, when due."""
        total = self.config.steps
        if self.checkpoint_every and step % self.checkpoint_every == 0 and step < total:
            save_checkpoint(self.checkpoint, self.state())
        if self.snapshots is not None and self.snapshots.due(step, total):
            vectors = [v().detach() for v in self.vectors]
            pivot = _pivot_after(self.bundle, self.tokens[0], vectors, self.config, self.pivot, list(self.progress.history))
            current = TuneResult(self.export(), pivot, list(self.progress.history), self.config, self.reg_settings)
            self.snapshots.write(step, lambda path, overwrite: current.save(path, overwrite=overwrite, bundle_embedding=self.joint))

    def _preview(self, step: int) -> torch.Tensor:
        """The preview grid of `step`, with offloaded text encoders brought back for it."""
        offloaded = self.offloaded_from is not None
        self.text_encoders_back()
        try:
            return self.previews.make(step, self.bundle, self.tokens[0])
        finally:
            if offloaded:
                self._offload_text_encoders()

    def _freeze_token(self) -> None:
        """End of the token phase: its schedule is at lr 0 from here (Adam state kept, no optimiser rebuild)."""
        for vectors in self.vectors:
            vectors.raw.requires_grad_(False)

    def _record(self) -> dict:
        """Append a history record; keep a copy of the trained tensors while the losses are finite."""
        record = self.progress.record()
        check_losses_finite(record, self.config.learning_rate, "LoRA", self.last_good["step"] if self.last_good else None)
        for name, lr in self.step_lrs.items():
            record[f"lr_{name}"] = lr
        self.progress.history.append(record)
        self.last_good = {"step": record["step"], "trained": [p.detach().clone() for p in self.trained],
                          "history": list(self.progress.history)}
        return record

    # -- results and checkpoints ----------------------------------------------------------------

    def export(self) -> dict[str, torch.Tensor]:
        """The adapters in kohya format."""
        text_encoders = list(self.bundle.text_encoders) if self.config.train_text_encoder else None
        return lora_state_dict_to_kohya(self.bundle.unet, text_encoders, ADAPTER_NAME, family=self.bundle.family)

    def load_trained(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, value in zip(self.trained, tensors):
                param.copy_(value)

    def state(self) -> dict:
        """Everything the rest of the run depends on, for a resumable checkpoint."""
        return {
            "config": self.config.to_dict(),
            "trained": [p.detach().cpu().clone() for p in self.trained],
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "global_rng": torch.get_rng_state(),
            "sampler_order": list(self.sampler._order),
            **self.progress.state(),
        }

    def restore(self, state: dict) -> None:
        """Continue from `state()` of an earlier, stopped run with the same settings."""
        if len(state["trained"]) != len(self.trained) or any(a.shape != b.shape for a, b in zip(state["trained"], self.trained)):
            raise InvalidInputError("the checkpoint's trained tensors do not fit this model and these settings.")
        self.load_trained(state["trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["global_rng"])
        self.sampler._order = list(state["sampler_order"])
        self.progress.restore(state)

    def _step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the mean denoising loss and the locality loss (no host sync)."""
        config, accum = self.config, self.config.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lrs = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            reg_conditioning = self.locality.conditionings(step, self.generator) if (self.locality and micro == 0) else None
            with autocast(self.bundle.device, config.mixed_precision):
                losses = self._micro_step(reg_conditioning)
            loss = losses["loss"] + (self.locality.config.weight * losses["reg_loss"] if "reg_loss" in losses else 0.0)
            self.gradient_step.backward(loss / accum)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / (accum if key == "loss" else 1)
        self.gradient_step.step()
        self.lr_scheduler.step()
        return totals

    def _conditioning(self, ids_per_encoder: tuple[torch.Tensor, ...]) -> Conditioning:
        if self.cached_conditioning is not None:
            rows = [self.caption_rows[tuple(row.tolist())] for row in ids_per_encoder[0]]
            return self.cached_conditioning[rows]
        return encode_ids(self.bundle, ids_per_encoder, self.clip_skip)

    def _micro_step(self, reg_conditioning: Conditioning | None) -> dict[str, torch.Tensor]:
        """Denoising loss on a micro-batch, plus the locality loss when `reg_conditioning` is given.

        The regularisation samples reuse the batch's noisy latents and timesteps (or fresh ones in the
        regulariser's timestep range) and go through the same tuned forward pass as the batch; on
        SDXL they keep the size/crop ids of the image whose latents they reuse, in both passes.
        """
        bundle = self.bundle
        batch = self.sampler.next_batch(self.latents)
        batch_latents = batch.latents.to(bundle.device)
        noised = add_noise(bundle.noise_scheduler, batch_latents, self.generator, self.t_range, self.config.noise_offset)
        conditioning = self._conditioning(batch.ids_per_encoder)
        # SDXL also conditions on each image's original size and crop (SD1.5: none)
        time_ids = None if conditioning.pooled is None else batch_time_ids(self.dataset, batch.indices, device=bundle.device)
        # masked loss on the training images only: the regulariser's term is about other prompts
        weighting = batch_weighting(self.weighting, self.masks, batch.indices, batch.views, bundle.noise_scheduler)
        if reg_conditioning is None:
            prediction = bundle.unet(noised.noisy_latents, noised.timesteps, **conditioning.unet_kwargs(time_ids)).sample
            return {"loss": diffusion_mse(prediction, noised, weighting)}
        picks = torch.arange(reg_conditioning.batch_size) % len(batch_latents)
        reg = self._regularisation_batch(batch_latents, noised, picks)
        reg_time_ids = None if time_ids is None else time_ids[picks]
        n = len(batch_latents)
        both = Conditioning.cat([conditioning, reg_conditioning.to(dtype=conditioning.hidden.dtype)])
        prediction = bundle.unet(
            torch.cat([noised.noisy_latents, reg.noisy_latents]),
            torch.cat([noised.timesteps, reg.timesteps]),
            **both.unet_kwargs(None if time_ids is None else torch.cat([time_ids, reg_time_ids])),
        ).sample
        with torch.no_grad(), adapters_disabled(bundle, self.adapter_layers):
            base = bundle.unet(reg.noisy_latents, reg.timesteps, **reg_conditioning.unet_kwargs(reg_time_ids)).sample
        reg_loss = locality_loss(prediction[n:], base)
        if self.locality.config.image_space:
            l2_weight = self.locality.config.image_l2_weight
            reg_loss = reg_loss + image_locality_loss(bundle, self.lpips_model, reg, prediction[n:], base, l2_weight)
        return {
            "loss": diffusion_mse(prediction[:n], noised, weighting),
            "reg_loss": reg_loss,
        }

    def _regularisation_batch(self, latents: torch.Tensor, noised: NoisedBatch, picks: torch.Tensor) -> NoisedBatch:
        span = self.locality.config.timestep_range
        if span is None:
            return NoisedBatch(noised.noisy_latents[picks], noised.timesteps[picks], noised.target[picks])
        return add_noise(self.bundle.noise_scheduler, latents[picks], self.generator, (span[0], span[1] + 1))
