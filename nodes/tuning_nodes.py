"""SlerpRegularizer and PivotalLoRATune: steps 2 and 3 of pivotal tuning (LoRA around the frozen pivot)."""

import logging

import torch

from ..pti_ops.errors import InvalidInputError, MissingModelFileError
from ..pti_ops.files import output_path
from ..pti_ops.lora_tune import SCHEDULES, UNET_TARGETS, TuneConfig, tune_around
from ..pti_ops.pivot import Pivot
from ..pti_ops.regularizer import INTERPOLATION_MODES, REGULARIZER_MODES, RegularizerConfig
from ..pti_ops.metrics import figure_to_array, history_figure
from . import bridge
from .common import (
    MEMORY_OPTIONS,
    OVERWRITE,
    SEED,
    TEMPLATES,
    history_every,
    split_lines,
    validate_name,
)

logger = logging.getLogger(__name__)
# The DDPM schedule of SD1.x has 1000 training timesteps, 0…999.
LAST_TIMESTEP = 999


class SlerpRegularizer:
    """The locality regulariser's settings → `PIVOTAL_REGULARIZER` (no computation happens here)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (
                    list(REGULARIZER_MODES),
                    {
                        "default": "path",
                        "tooltip": "Which prompts must keep their original images: path (the method's default: "
                        "halfway between the token's prompt and the class word's, per token position), sphere "
                        "(random points at the same angle), class (the class-word prompt), empty (the empty "
                        "prompt), none (off).",
                    },
                ),
                "anchor": (
                    "STRING",
                    {
                        "default": "character",
                        "tooltip": "The class word that replaces the token in the regularisation prompts; normally "
                        "the inversion's initializer. Must be as many tokens as the token has vectors.",
                    },
                ),
                "templates": (
                    TEMPLATES[0],
                    {**TEMPLATES[1], "tooltip": "Regularisation prompt templates, one per line, with {} where the "
                     "token / class word goes. Put spaces around {}."},
                ),  # fmt: skip
                "interpolation": (
                    list(INTERPOLATION_MODES),
                    {
                        "default": "slerp",
                        "tooltip": "slerp: around the origin. vslerp: around the centre of the text encoder's "
                        "vectors (connect norm_stats of the `hidden` space); matters where the shell is offset.",
                    },
                ),
                "t": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Position on the path: 0 = the token's prompt, 1 = the class word's. Lower keeps "
                        "more of the neighbourhood fixed, but fights the learning of the token itself.",
                    },
                ),
                "t_jitter": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.01,
                        "tooltip": "0: always t. Above 0: t is drawn uniformly in [t - jitter, t + jitter] (within "
                        "0…1) at each application, covering more of the path.",
                    },
                ),
                "weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.05,
                        "tooltip": "λ: weight of the locality loss next to the training loss (both are noise MSEs). "
                        "Higher keeps other prompts unchanged but learns the character more slowly. 0 turns it off.",
                    },
                ),
                "every": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Apply the regulariser every N training steps (each application costs extra "
                        "UNet work).",
                    },
                ),
                "samples": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Regularisation prompts per application (a UNet sample each).",
                    },
                ),
                "timestep_min": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": LAST_TIMESTEP,
                        "tooltip": "Lowest noise timestep of the regularisation samples. With 0…999 they reuse the "
                        "training batch's noisy latents (cheapest).",
                    },
                ),
                "timestep_max": (
                    "INT",
                    {
                        "default": LAST_TIMESTEP,
                        "min": 0,
                        "max": LAST_TIMESTEP,
                        "tooltip": "Highest noise timestep of the regularisation samples (high = composition, "
                        "low = detail).",
                    },
                ),
            },
            "optional": {
                "image_space": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Also compare the decoded images of the tuned and original predictions with LPIPS + "
                        "L2, as PTI does: closer to what you see, two VAE decodes more per application. Needs "
                        "torchvision's AlexNet weights in the torch hub cache (nothing is downloaded).",
                    },
                ),
                "image_l2_weight": (
                    "FLOAT",
                    {
                        "default": 0.1,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "Weight of the image-space L2 term next to LPIPS (PTI uses 0.1); only with image_space.",
                    },
                ),
                "norm_stats": (
                    "PIVOTAL_NORM_STATS",
                    {"tooltip": "Norm statistics of the `hidden` space (EmbeddingNormStats): their per-position "
                     "centres are the vSLERP centres. Needed for vslerp, refused for slerp."},
                ),  # fmt: skip
            },
        }

    RETURN_TYPES = ("PIVOTAL_REGULARIZER",)
    RETURN_NAMES = ("regularizer",)
    OUTPUT_TOOLTIPS = ("The regulariser's settings, for PivotalLoRATune.",)
    FUNCTION = "build"
    CATEGORY = "pivotal_tuning/train"
    DESCRIPTION = (
        "Settings of the SLERP locality regulariser: while the LoRA learns the token, the tuned model must keep "
        "predicting what the original predicts for prompts near the token's (between it and the class word)."
    )

    def build(self, mode, anchor, templates, interpolation, t, t_jitter, weight, every, samples,
              timestep_min, timestep_max, norm_stats=None, image_space=False, image_l2_weight=0.1):  # fmt: skip
        if timestep_min > timestep_max:
            raise InvalidInputError(f"`timestep_min` {timestep_min} is above `timestep_max` {timestep_max}.")
        centre = _centre_from_stats(norm_stats, interpolation)
        settings = dict(
            mode=mode, anchor=anchor, templates=split_lines(templates), interpolation=interpolation, centre=centre,
            weight=weight, every=every, samples=samples, image_space=image_space, image_l2_weight=image_l2_weight,
            timestep_range=None if (timestep_min, timestep_max) == (0, LAST_TIMESTEP) else (timestep_min, timestep_max),
        )  # fmt: skip
        if t_jitter > 0:
            settings["t_range"] = (max(0.0, t - t_jitter), min(1.0, t + t_jitter))
        else:
            settings["t"] = t
        config = RegularizerConfig(**settings)
        if image_space:
            _check_lpips_weights()
        return (config,)


def _check_lpips_weights() -> None:
    """Fail here, not after the model conversion, when LPIPS's backbone weights are not on disk."""
    from ..pti_ops.metrics import BACKBONE_URLS, backbone_path

    path = backbone_path("alex")
    if not path.is_file():
        raise MissingModelFileError(
            f"`image_space` needs LPIPS's AlexNet weights {path.name} in {path.parent} (nothing is downloaded): copy "
            f"the file there (it is {BACKBONE_URLS['alex']}), or turn `image_space` off."
        )


def _centre_from_stats(norm_stats, interpolation: str) -> torch.Tensor | None:
    if norm_stats is None:
        return None
    if interpolation != "vslerp":
        raise InvalidInputError(
            "`norm_stats` is connected but `interpolation` is `slerp`, which has no centre: choose `vslerp` or "
            "disconnect norm_stats."
        )
    if norm_stats.space != "hidden":
        raise InvalidInputError(
            f"`norm_stats` measure the `{norm_stats.space}` space, but the regulariser interpolates the text "
            "encoder's output: connect statistics of the `hidden` space."
        )
    return norm_stats.centre_for_positions()


class PivotalLoRATune:
    """LoRA tuning around the frozen pivot token; writes `models/loras/NAME.safetensors`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 model the embedding was trained on. It is not modified."}),
                "clip": ("CLIP", {"tooltip": "Its CLIP text encoder. It is not modified; CLIPSetLastLayer is honoured."}),
                "vae": ("VAE", {"tooltip": "Its VAE: encodes the training images once per run."}),
                "dataset": ("PIVOTAL_DATASET", {"tooltip": "The character's training images (the inversion's)."}),
                "embedding": ("PIVOTAL_EMBEDDING", {"tooltip": "The pivot from TokenInversion; its prompt templates are reused."}),
                "rank": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 256,
                        "tooltip": "LoRA rank: capacity of the tuning. 4–16 is light (small file, stays close to the "
                        "base model); higher learns more and forgets more.",
                    },
                ),
                "alpha": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "LoRA alpha: the update is scaled by alpha / rank. 0 means alpha = rank (scale 1).",
                    },
                ),
                "targets": (
                    list(UNET_TARGETS),
                    {
                        "default": "attention",
                        "tooltip": "UNet layers that get a LoRA: attention (to_q, to_k, to_v, to_out) or "
                        "attention_ff (also the feed-forward layers: more capacity, bigger file).",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 1e-4,
                        "min": 1e-7,
                        "max": 1.0,
                        "step": 1e-5,
                        "round": False,
                        "tooltip": "AdamW learning rate of the LoRA. Too high learns the training images' exact "
                        "poses and backgrounds.",
                    },
                ),
                "steps": (
                    "INT",
                    {"default": 500, "min": 1, "max": 100000, "tooltip": "Optimiser steps of the LoRA tuning."},
                ),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step (more memory, smoother steps)."},
                ),
                "seed": SEED,
                "schedule": (
                    list(SCHEDULES),
                    {
                        "default": "sequential",
                        "tooltip": "sequential: the token stays frozen (pivotal tuning). joint: the token trains "
                        "with the LoRA for the first half, then freezes; its new vectors are saved as "
                        "models/embeddings/LORA_NAME.safetensors and the trigger output names them.",
                    },
                ),
                "train_text_encoder": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Also put LoRA on the text encoder's attention: more likeness, less editability; "
                        "the CLIP output then carries it too.",
                    },
                ),
                "lora_name": (
                    "STRING",
                    {
                        "default": "tok1_lora",
                        "tooltip": "File name in ComfyUI's loras folder (letters, digits, _ - .), for LoraLoader in "
                        "later workflows.",
                    },
                ),
                "overwrite": OVERWRITE,
            },
            "optional": {
                "regularizer": (
                    "PIVOTAL_REGULARIZER",
                    {"tooltip": "Locality regulariser (SlerpRegularizer). Not connected: no regularisation."},
                ),
                **MEMORY_OPTIONS,
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "LORA_MODEL", "LOSS_MAP", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "lora", "loss", "plot", "lora_file", "trigger")
    OUTPUT_TOOLTIPS = (
        "The model with the trained LoRA applied (a patched clone), ready for KSampler in this run.",
        "The CLIP with the text-encoder LoRA applied when train_text_encoder is on (a clone otherwise).",
        "The LoRA as a kohya-keyed dict (stock LoraModelLoader / SaveLoRA read it).",
        "Training loss per record ({'loss': [...]}, as stock LossGraph reads it).",
        "Plot of the training loss and the locality loss against the step.",
        "The LoRA file name in models/loras.",
        "embedding:NAME of the token to prompt with (the joint schedule's own embedding when joint).",
    )
    FUNCTION = "tune"
    CATEGORY = "pivotal_tuning/train"
    DESCRIPTION = (
        "Steps 2–3 of pivotal tuning: a LoRA on the UNet learns the character around the frozen token, kept "
        "local by the optional regulariser. Writes the LoRA to models/loras and returns MODEL/CLIP with it "
        "applied, so one queued run trains and generates."
    )

    def tune(self, model, clip, vae, dataset, embedding: Pivot, rank, alpha, targets, learning_rate,
             steps, batch_size, seed, schedule, train_text_encoder, lora_name, overwrite, regularizer=None,
             mixed_precision="no", gradient_checkpointing=False):  # fmt: skip
        settings = dict(
            rank=rank, alpha=alpha or None, targets=targets, train_text_encoder=train_text_encoder,
            learning_rate=learning_rate, steps=steps, batch_size=batch_size, seed=seed, schedule=schedule,
            clip_skip=bridge.clip_skip(clip), history_every=history_every(steps),
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        if embedding.templates:  # the captions the pivot was trained with
            settings["templates"] = list(embedding.templates)
        config = TuneConfig(**settings)
        lora_path = output_path(bridge.loras_folder(), lora_name, ".safetensors", overwrite, "lora_name")
        joint_path = None
        if schedule == "joint":
            joint_path = output_path(bridge.embeddings_folder(), lora_name, ".safetensors", overwrite, "lora_name")
        bundle = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                bundle = bridge.bundle_from_comfy(model, clip, vae)
                bridge.check_interrupted()
                result = tune_around(bundle, dataset, embedding, config, regularizer, on_step=bridge.progress(steps))
        finally:
            bundle = None
            bridge.release()
        result.lora = {key: value.cpu() for key, value in result.lora.items()}
        result.save(lora_path, overwrite=overwrite)
        trigger = embedding.trigger
        if joint_path is not None:  # the token was retrained with the LoRA: it gets its own file
            result.pivot.save(joint_path, overwrite=overwrite)
            trigger = result.pivot.trigger
        model_out, clip_out = bridge.apply_lora(model, clip, result.lora)
        plot = figure_to_array(history_figure(result.history, "loss", "reg_loss", f"PivotalLoRATune {lora_path.name}"))
        return (model_out, clip_out, result.lora, bridge.loss_map(result.history), bridge.image_from_array(plot), lora_path.name, trigger)

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None):
        return validate_name(lora_name, "lora_name")


NODE_CLASS_MAPPINGS = {"SlerpRegularizer": SlerpRegularizer, "PivotalLoRATune": PivotalLoRATune}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SlerpRegularizer": "SLERP Locality Regularizer",
    "PivotalLoRATune": "Pivotal LoRA Tune",
}
