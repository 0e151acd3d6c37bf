"""SlerpRegularizer and PivotalLoRATune: steps 2 and 3 of pivotal tuning (LoRA around the frozen pivot)."""

from ..pti_ops.limits import MAX_BATCH_SIZE, MAX_RANK, MAX_REG_SAMPLES, MAX_STEPS
from ..pti_ops.errors import InvalidInputError, MissingModelFileError
from ..pti_ops.files import output_path, output_paths
from ..pti_ops.lora_tune import SCHEDULES, UNET_TARGETS, TuneConfig, tune_around
from ..pti_ops.metrics import BACKBONE_URLS, backbone_path
from ..pti_ops.pivot import Pivot
from ..pti_ops.regularizer import INTERPOLATION_MODES, MODES, REGULARIZER_MODES, RegularizerConfig
from . import bridge
from .common import converted, core_run, history_every, history_plot, if_exists_policy, node_result, node_warnings
from .common import in_widget_words, previews_from, snapshot_names, snapshots_beside, split_lines, trainer_options, validate_name
from .inputs import IF_EXISTS, MEMORY_OPTIONS, NODE_ID, OVERWRITE, SEED, TRAINER_OPTIONS, TRAINING_INPUTS, bool_input, combo, default_of
from .inputs import float_input, int_input, lines_input, link, string_input

# The mode combo's tooltip, from the registry's one-line summaries (the CLI's --reg help reads the same).
MODE_TOOLTIP = "Which prompts must keep the original model's predictions while the LoRA learns: " + "; ".join(
    f"{name}: {spec.summary}" for name, spec in MODES.items()) + "."

# The DDPM schedule of SD1.x has 1000 training timesteps, 0…999.
LAST_TIMESTEP = 999


def _reg(name: str):
    return default_of(RegularizerConfig, name)


def _tune(name: str):
    return default_of(TuneConfig, name)


class SlerpRegularizer:
    """The locality regulariser's settings → `PIVOTAL_REGULARIZER` (no computation happens here)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": combo(REGULARIZER_MODES, _reg("mode"), MODE_TOOLTIP),
                "anchor": string_input(_reg("anchor"), "The class word that replaces the token in the regularisation "
                    "prompts; normally the inversion's initializer. Must be as many tokens as the token has vectors."),
                "templates": lines_input(_reg("templates"), "Regularisation prompt templates, one per line, with {} where "
                    "the token / class word goes. Put spaces around {}."),
                "interpolation": combo(INTERPOLATION_MODES, _reg("interpolation"), "slerp: around the origin. vslerp: "
                    "around the centre of the text encoder's vectors (connect norm_stats of the `hidden` space); matters "
                    "where the shell is offset."),
                "t": float_input(_reg("t"), 0.0, 1.0, 0.01, "Position on the path: 0 = the token's prompt, 1 = the class "
                    "word's. Lower keeps more of the neighbourhood fixed, but fights the learning of the token itself."),
                "t_jitter": float_input(0.0, 0.0, 0.5, 0.01, "0: always t. Above 0: t is drawn uniformly in [t - jitter, "
                    "t + jitter] (within 0…1) at each application, covering more of the path."),
                "weight": float_input(_reg("weight"), 0.0, 100.0, 0.05, "λ: weight of the locality loss next to the "
                    "training loss (both are noise MSEs). Higher keeps other prompts unchanged but learns the character "
                    "more slowly. 0 turns it off."),
                "every": int_input(_reg("every"), 1, 1000, "Apply the regulariser every N training steps (each "
                    "application costs extra UNet work)."),
                "samples": int_input(_reg("samples"), 1, MAX_REG_SAMPLES, "Regularisation prompts per application (a UNet sample each)."),
                "timestep_min": int_input(0, 0, LAST_TIMESTEP, "Lowest noise timestep of the regularisation samples. With "
                    "0…999 they reuse the training batch's noisy latents (cheapest)."),
                "timestep_max": int_input(LAST_TIMESTEP, 0, LAST_TIMESTEP, "Highest noise timestep of the regularisation "
                    "samples (high = composition, low = detail)."),
            },
            "optional": {
                "image_space": bool_input(_reg("image_space"), "Also compare the decoded images of the tuned and original "
                    "predictions with LPIPS + L2, as PTI does: closer to what you see, two VAE decodes more per "
                    "application. Needs torchvision's AlexNet weights in the torch hub cache (nothing is downloaded)."),
                "image_l2_weight": float_input(_reg("image_l2_weight"), 0.0, 100.0, 0.01, "Weight of the image-space L2 "
                    "term next to LPIPS (PTI uses 0.1); only with image_space."),
                "norm_stats": link("PIVOTAL_NORM_STATS", "Norm statistics of the `hidden` space (EmbeddingNormStats): "
                    "their per-position centres are the vSLERP centres. Needed for vslerp, refused for slerp."),
            },
        }  # fmt: skip

    RETURN_TYPES = ("PIVOTAL_REGULARIZER",)
    RETURN_NAMES = ("regularizer",)
    OUTPUT_TOOLTIPS = ("The regulariser's settings, for PivotalLoRATune.",)
    FUNCTION = "build"
    CATEGORY = "pivotal_tuning/train"
    DESCRIPTION = (
        "Settings of the SLERP locality regulariser: while the LoRA learns the token, the tuned model must keep "
        "predicting what the original predicts for prompts near the token's (between it and the class word)."
    )

    @in_widget_words(t_range="t_jitter", timestep_range="timestep_min/timestep_max", centre="norm_stats")
    def build(self, mode, anchor, templates, interpolation, t, t_jitter, weight, every, samples,
              timestep_min, timestep_max, norm_stats=None, image_space=False, image_l2_weight=0.1):  # fmt: skip
        config = RegularizerConfig(
            mode=mode, anchor=anchor, templates=split_lines(templates), interpolation=interpolation,
            **_centres_from_stats(norm_stats, interpolation), t=t if not t_jitter else _reg("t"),
            t_range=_jittered(t, t_jitter), weight=weight, every=every, samples=samples, image_space=image_space,
            image_l2_weight=image_l2_weight, timestep_range=_timestep_range(timestep_min, timestep_max),
        )  # fmt: skip
        if image_space:
            _check_lpips_weights()
        return (config,)


def _jittered(t: float, jitter: float) -> tuple[float, float] | None:
    """`t_range` of a jittered t (within 0…1), None without jitter."""
    return (max(0.0, t - jitter), min(1.0, t + jitter)) if jitter > 0 else None


def _timestep_range(low: int, high: int) -> tuple[int, int] | None:
    """`timestep_range` of the two widgets; None (the training batch's timesteps) for the full range."""
    if low > high:
        raise InvalidInputError(f"`timestep_min` {low} is above `timestep_max` {high}.")
    return None if (low, high) == (0, LAST_TIMESTEP) else (low, high)


def _check_lpips_weights() -> None:
    """Fail here, not after the model conversion, when LPIPS's backbone weights are not on disk."""
    path = backbone_path("alex")
    if not path.is_file():
        raise MissingModelFileError(
            f"`image_space` needs LPIPS's AlexNet weights {path.name} in {path.parent} (nothing is downloaded): copy "
            f"the file there (it is {BACKBONE_URLS['alex']}), or turn `image_space` off."
        )


def _centres_from_stats(norm_stats, interpolation: str) -> dict:
    """`centre` and `pooled_centre` of connected `hidden`-space statistics: the per-position vSLERP centres
    `[tokens, sum(widths)]` (SDXL: both encoders') and the pooled conditioning's (SDXL; None for SD1.5).
    Both None when none are connected."""
    if norm_stats is None:
        return {"centre": None, "pooled_centre": None}
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
    return {"centre": norm_stats.centre_for_positions(), "pooled_centre": norm_stats.pooled_centre()}


class PivotalLoRATune:
    """LoRA tuning around the frozen pivot token; writes `models/loras/NAME.safetensors`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRAINING_INPUTS,
                "embedding": link("PIVOTAL_EMBEDDING", "The pivot from TokenInversion; its prompt templates are reused."),
                "rank": int_input(_tune("rank"), 1, MAX_RANK, "LoRA rank: capacity of the tuning. 4–16 is light (small file, "
                    "stays close to the base model); higher learns more and forgets more."),
                "alpha": float_input(0.0, 0.0, 1024.0, 0.5, "LoRA alpha: the update is scaled by alpha / rank. 0 means "
                    "alpha = rank (scale 1)."),
                "targets": combo(UNET_TARGETS, _tune("targets"), "UNet layers that get a LoRA: attention (to_q, to_k, "
                    "to_v, to_out) or attention_ff (also the feed-forward layers: more capacity, bigger file)."),
                "learning_rate": float_input(_tune("learning_rate"), 1e-7, 1.0, 1e-5, "AdamW learning rate of the LoRA. "
                    "Too high learns the training images' exact poses and backgrounds.", round=False),
                "steps": int_input(_tune("steps"), 1, MAX_STEPS, "Optimiser steps of the LoRA tuning."),
                "batch_size": int_input(_tune("batch_size"), 1, MAX_BATCH_SIZE, "Images per step (more memory, smoother steps)."),
                "seed": SEED,
                "schedule": combo(SCHEDULES, _tune("schedule"), "sequential: the token stays frozen (pivotal tuning). "
                    "joint: the token trains with the LoRA for the first half, then freezes; its new vectors are saved "
                    "as models/embeddings/LORA_NAME.safetensors and the trigger output names them."),
                "train_text_encoder": bool_input(_tune("train_text_encoder"), "Also put LoRA on the text encoder's "
                    "attention: more likeness, less editability; the CLIP output then carries it too."),
                "lora_name": string_input("tok1_lora", "File name in ComfyUI's loras folder (letters, digits, _ - .), for "
                    "LoraLoader in later workflows (the lora_file output names the file written, e.g. "
                    "tok1_lora_00001.safetensors when tok1_lora exists and if_exists is increment)."),
                "overwrite": OVERWRITE,
            },
            "optional": {
                "regularizer": link("PIVOTAL_REGULARIZER", "Locality regulariser (SlerpRegularizer). Not connected: no "
                    "regularisation."),
                **MEMORY_OPTIONS,
                "if_exists": IF_EXISTS,
                "bundle_embedding": bool_input(False, "Also put the token's embedding into the LoRA file "
                    "(bundle_emb.PLACEHOLDER.clip_l, and .clip_g on SDXL, as OneTrainer writes it): one file per character, which Pivotal LoRA "
                    "Loader applies to MODEL and CLIP with its trigger. Stock LoraLoader still loads every LoRA key of it "
                    "(it logs the bundle key as not loaded). The embedding file is written as well."),
                "offload_text_encoders": bool_input(_tune("offload_text_encoders"), "Move the text encoders to the CPU "
                    "once every prompt is encoded (SDXL's two take 1.6 GB in bf16). Needs them frozen: not with the joint "
                    "schedule or train_text_encoder."),
                **TRAINER_OPTIONS,
            },
            "hidden": NODE_ID,
        }  # fmt: skip

    RETURN_TYPES = ("MODEL", "CLIP", "LORA_MODEL", "LOSS_MAP", "IMAGE", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "lora", "loss", "plot", "lora_file", "trigger", "snapshots")
    OUTPUT_TOOLTIPS = (
        "The model with the trained LoRA applied (a patched clone), ready for KSampler in this run.",
        "The CLIP with the text-encoder LoRA applied when train_text_encoder is on (a clone otherwise).",
        "The LoRA as a kohya-keyed dict (stock LoraModelLoader / SaveLoRA read it).",
        "Training loss per record ({'loss': [...]}, as stock LossGraph reads it).",
        "Plot of the training loss and the locality loss against the step.",
        "The name of the LoRA file written in models/loras (with its counter when if_exists incremented it).",
        "embedding:NAME of the token to prompt with (the joint schedule's own embedding when joint).",
        "The snapshot LoRA files written in models/loras (save_every), one name per line; empty when off. With the joint "
        "schedule each carries its step's token (bundle_emb), for Pivotal LoRA Loader.",
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
             mixed_precision="no", gradient_checkpointing=False, if_exists="increment", bundle_embedding=False,
             offload_text_encoders=False, unique_id=None, **trainer_widgets):  # fmt: skip
        config = TuneConfig(
            rank=rank, alpha=alpha or None, targets=targets, train_text_encoder=train_text_encoder,
            learning_rate=learning_rate, steps=steps, batch_size=batch_size, seed=seed, schedule=schedule,
            templates=embedding.templates or _tune("templates"), clip_skip=bridge.clip_skip(clip),
            history_every=history_every(steps), mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, offload_text_encoders=offload_text_encoders,
            **trainer_options(trainer_widgets),
        )  # fmt: skip
        policy = if_exists_policy(overwrite, if_exists)
        lora_path, joint_path = _output_paths(lora_name, schedule, policy)
        snapshots = snapshots_beside(lora_path, trainer_widgets, overwrite=policy == "overwrite")
        with node_warnings(dataset) as warned, core_run():
            result = tune_around(converted(model, clip, vae), dataset, embedding, config, regularizer,
                                 on_step=bridge.progress(steps), snapshots=snapshots,
                                 previews=previews_from(trainer_widgets, clip, dataset))  # fmt: skip
        _write(result, lora_path, joint_path, policy == "overwrite", bundle_embedding)
        model_out, clip_out = bridge.apply_lora(model, clip, result.lora)
        plot = history_plot(result.history, "loss", "reg_loss", f"PivotalLoRATune {lora_path.name}")
        outputs = (model_out, clip_out, result.lora, bridge.loss_map(result.history), plot, lora_path.name,
                   result.pivot.trigger, snapshot_names(snapshots))  # fmt: skip
        return node_result(outputs, warned, unique_id)

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None):
        return validate_name(lora_name, "lora_name")


def _write(result, lora_path, joint_path, overwrite: bool, bundle_embedding: bool) -> None:
    """The LoRA file, and the `joint` schedule's retrained token in a file of its own."""
    result.lora = {key: value.cpu() for key, value in result.lora.items()}
    result.save(lora_path, overwrite=overwrite, bundle_embedding=bundle_embedding)
    if joint_path is not None:
        result.pivot.save(joint_path, overwrite=overwrite)


def _output_paths(lora_name: str, schedule: str, policy: str):
    """`(LoRA file, joint embedding file or None)` by the file-name policy, decided before training.

    The joint embedding shares the LoRA's name (and counter: `NAME_00001` in both folders).
    """
    if schedule != "joint":
        return output_path(bridge.loras_folder(), lora_name, ".safetensors", policy, "lora_name"), None
    lora_path, joint_path = output_paths([bridge.loras_folder(), bridge.embeddings_folder()], lora_name, ".safetensors",
                                         policy, "lora_name")  # fmt: skip
    return lora_path, joint_path


NODE_CLASS_MAPPINGS = {"SlerpRegularizer": SlerpRegularizer, "PivotalLoRATune": PivotalLoRATune}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SlerpRegularizer": "SLERP Locality Regularizer",
    "PivotalLoRATune": "Pivotal LoRA Tune",
}
