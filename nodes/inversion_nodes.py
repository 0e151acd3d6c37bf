"""TokenInversion: step 1 of pivotal tuning, the placeholder's embedding learned from the images."""

import torch

from ..pti_ops.files import output_path
from ..pti_ops.inversion import NORM_MODES, InversionConfig, invert
from ..pti_ops.placeholder import MAX_VECTORS
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


class TokenInversion:
    """Textual inversion of a new token on the dataset; writes `models/embeddings/NAME.safetensors`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 model (from Load Checkpoint). It is only read."}),
                "clip": ("CLIP", {"tooltip": "The model's CLIP text encoder. It is only read; CLIPSetLastLayer is honoured."}),
                "vae": ("VAE", {"tooltip": "The model's VAE: encodes the training images once per run."}),
                "dataset": ("PIVOTAL_DATASET", {"tooltip": "The character's training images."}),
                "placeholder": (
                    "STRING",
                    {
                        "default": "tok1",
                        "tooltip": "The new word being learned (lowercase letters, digits, _), used inside the "
                        "training prompts. Must not be a word the tokenizer already knows.",
                    },
                ),
                "initializer": (
                    "STRING",
                    {
                        "default": "character",
                        "tooltip": "Class word the token starts from (one token, e.g. character, girl, robot). "
                        "Distances are measured from it.",
                    },
                ),
                "num_vectors": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_VECTORS,
                        "tooltip": "Embedding vectors behind the token: more capture more detail but edit worse "
                        "and use more of the 75-token prompt.",
                    },
                ),
                "templates": TEMPLATES,
                "steps": (
                    "INT",
                    {
                        "default": 1000,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Optimiser steps. Keep it fixed and sweep the learning rate: lr × steps sets "
                        "how far the token travels from its initializer.",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": 5e-4,
                        "min": 1e-7,
                        "max": 1.0,
                        "step": 1e-5,
                        "round": False,
                        "tooltip": "AdamW learning rate of the token. Higher moves it further: better likeness, "
                        "worse editability.",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 64,
                        "tooltip": "Images per step. Larger is smoother but slower and needs more memory.",
                    },
                ),
                "seed": SEED,
                "norm_mode": (
                    list(NORM_MODES),
                    {
                        "default": "none",
                        "tooltip": "none: free. pull: penalise the token's norm straying from the vocabulary's "
                        "mean norm (keeps it editable). fixed: learn the direction only, norm held at that mean.",
                    },
                ),
                "embedding_name": (
                    "STRING",
                    {
                        "default": "tok1",
                        "tooltip": "File name in ComfyUI's embeddings folder (letters, digits, _ - .); prompts use "
                        "it as embedding:NAME (the trigger output).",
                    },
                ),
                "overwrite": OVERWRITE,
            },
            "optional": dict(MEMORY_OPTIONS),
        }

    RETURN_TYPES = ("PIVOTAL_EMBEDDING", "CLIP", "STRING", "LOSS_MAP", "IMAGE")
    RETURN_NAMES = ("embedding", "clip", "trigger", "loss", "plot")
    OUTPUT_TOOLTIPS = (
        "The trained token (vectors, placeholder, file) for PivotalLoRATune and EmbeddingNormStats.",
        "The CLIP, for prompts that use the trigger in this same run.",
        "embedding:NAME: put it in prompt text (PivotalPrompt) to use the trained token.",
        "Denoising loss per record ({'loss': [...]}, as stock LossGraph reads it).",
        "Plot of the loss and of the token's distance from its initializer against the step.",
    )
    FUNCTION = "invert"
    CATEGORY = "pivotal_tuning/train"
    DESCRIPTION = (
        "Step 1 of pivotal tuning: learns a new token's embedding from the character's images (only the "
        "token's rows train; the model is unchanged), writes it to models/embeddings and returns the "
        "embedding:NAME trigger."
    )

    def invert(self, model, clip, vae, dataset, placeholder, initializer, num_vectors, templates, steps,
               learning_rate, batch_size, seed, norm_mode, embedding_name, overwrite, mixed_precision="no",
               gradient_checkpointing=False):  # fmt: skip
        config = InversionConfig(
            placeholder=placeholder.strip(), initializer=initializer.strip(), num_vectors=num_vectors,
            templates=split_lines(templates), steps=steps, learning_rate=learning_rate, batch_size=batch_size,
            seed=seed, norm_mode=norm_mode, clip_skip=bridge.clip_skip(clip), history_every=history_every(steps),
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        path = output_path(bridge.embeddings_folder(), embedding_name, ".safetensors", overwrite, "embedding_name")
        bundle = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                bundle = bridge.bundle_from_comfy(model, clip, vae)
                bridge.check_interrupted()
                result = invert(bundle, dataset, config, on_step=bridge.progress(steps))
        finally:
            bundle = None
            bridge.release()
        pivot = result.pivot
        pivot.save(path, overwrite=overwrite)
        plot = figure_to_array(history_figure(result.history, "loss", "distance", f"TokenInversion {pivot.trigger}"))
        return (pivot, clip.clone(), pivot.trigger, bridge.loss_map(result.history), bridge.image_from_array(plot))

    @classmethod
    def VALIDATE_INPUTS(cls, embedding_name=None):
        return validate_name(embedding_name, "embedding_name")


NODE_CLASS_MAPPINGS = {"TokenInversion": TokenInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"TokenInversion": "Token Inversion (pivot)"}
