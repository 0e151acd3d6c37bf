"""TokenInversion: step 1 of pivotal tuning, the placeholder's embedding learned from the images."""

from ..pti_ops.limits import MAX_BATCH_SIZE, MAX_STEPS
from ..pti_ops.files import output_path
from ..pti_ops.inversion import NORM_MODES, InversionConfig, invert
from ..pti_ops.placeholder import MAX_VECTORS
from . import bridge
from .common import converted, core_run, history_every, history_plot, if_exists_policy, node_result, node_warnings
from .common import previews_from, snapshot_names, snapshots_beside, split_lines, trainer_options, validate_name
from .inputs import IF_EXISTS, MEMORY_OPTIONS, NODE_ID, OVERWRITE, SEED, TEMPLATES_TOOLTIP, TRAINER_OPTIONS, TRAINING_INPUTS, combo, default_of
from .inputs import float_input, int_input, lines_input, string_input


def _default(name: str):
    return default_of(InversionConfig, name)


class TokenInversion:
    """Textual inversion of a new token on the dataset; writes `models/embeddings/NAME.safetensors` (or `NAME_00001`…)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRAINING_INPUTS,
                "placeholder": string_input(_default("placeholder"), "The new word being learned (lowercase letters, "
                    "digits, _), used inside the training prompts. Must not be a word the tokenizer already knows."),
                "initializer": string_input(_default("initializer"), "Class word the token starts from (one token, e.g. "
                    "character, girl, robot). Distances are measured from it."),
                "num_vectors": int_input(_default("num_vectors"), 1, MAX_VECTORS, "Embedding vectors behind the token: "
                    "more capture more detail but edit worse and use more of the 75-token prompt."),
                "templates": lines_input(_default("templates"), TEMPLATES_TOOLTIP),
                "steps": int_input(_default("steps"), 1, MAX_STEPS, "Optimiser steps. Keep it fixed and sweep the learning "
                    "rate: lr × steps sets how far the token travels from its initializer."),
                "learning_rate": float_input(_default("learning_rate"), 1e-7, 1.0, 1e-5, "AdamW learning rate of the "
                    "token. Higher moves it further: better likeness, worse editability.", round=False),
                "batch_size": int_input(_default("batch_size"), 1, MAX_BATCH_SIZE, "Images per step. Larger is smoother but slower "
                    "and needs more memory."),
                "seed": SEED,
                "norm_mode": combo(NORM_MODES, _default("norm_mode"), "none: free. pull: penalise the token's norm "
                    "straying from the vocabulary's mean norm (keeps it editable). fixed: learn the direction only, "
                    "norm held at that mean."),
                "embedding_name": string_input("tok1", "File name in ComfyUI's embeddings folder (letters, digits, _ - .); "
                    "prompts use it as embedding:NAME (the trigger output names the file written, e.g. tok1_00001 "
                    "when tok1 exists and if_exists is increment)."),
                "overwrite": OVERWRITE,
            },
            "optional": {**MEMORY_OPTIONS, "if_exists": IF_EXISTS, **TRAINER_OPTIONS},
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("PIVOTAL_EMBEDDING", "CLIP", "STRING", "LOSS_MAP", "IMAGE", "STRING")
    RETURN_NAMES = ("embedding", "clip", "trigger", "loss", "plot", "snapshots")
    OUTPUT_TOOLTIPS = (
        "The trained token (a Pivot: vectors, placeholder, templates, file) for PivotalLoRATune, PivotalEvaluate and EmbeddingNormStats.",
        "The CLIP, for prompts that use the trigger in this same run.",
        "embedding:NAME: put it in prompt text (PivotalPrompt) to use the trained token.",
        "Denoising loss per record ({'loss': [...]}, as stock LossGraph reads it).",
        "Plot of the loss and of the token's distance from its initializer against the step.",
        "The snapshot files written in models/embeddings (save_every), one name per line; empty when off.",
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
               gradient_checkpointing=False, if_exists="increment", unique_id=None, **trainer_widgets):  # fmt: skip
        config = InversionConfig(
            placeholder=placeholder.strip(), initializer=initializer.strip(), num_vectors=num_vectors,
            templates=split_lines(templates), steps=steps, learning_rate=learning_rate, batch_size=batch_size,
            seed=seed, norm_mode=norm_mode, clip_skip=bridge.clip_skip(clip), history_every=history_every(steps),
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, **trainer_options(trainer_widgets),
        )  # fmt: skip
        policy = if_exists_policy(overwrite, if_exists)
        path = output_path(bridge.embeddings_folder(), embedding_name, ".safetensors", policy, "embedding_name")
        snapshots = snapshots_beside(path, trainer_widgets, overwrite=policy == "overwrite")
        with node_warnings(dataset) as warned, core_run():
            result = invert(converted(model, clip, vae), dataset, config, on_step=bridge.progress(steps), snapshots=snapshots,
                            previews=previews_from(trainer_widgets, clip, dataset))
        result.save(path, overwrite=policy == "overwrite")
        pivot = result.pivot
        plot = history_plot(result.history, "loss", "distance", f"TokenInversion {pivot.trigger}")
        outputs = (pivot, clip.clone(), pivot.trigger, bridge.loss_map(result.history), plot, snapshot_names(snapshots))
        return node_result(outputs, warned, unique_id)

    @classmethod
    def VALIDATE_INPUTS(cls, embedding_name=None):
        return validate_name(embedding_name, "embedding_name")


NODE_CLASS_MAPPINGS = {"TokenInversion": TokenInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"TokenInversion": "Token Inversion (pivot)"}
