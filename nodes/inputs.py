"""Widget specs: short constructors, the inputs several nodes share, and defaults read from the core's configs.

A node's `INPUT_TYPES` reads as a list of named widgets: `"steps": int_input(default_of(TuneConfig,
"steps"), 1, 100000, "...")`. A default comes from the config field the widget fills, so the node,
the CLI and the core cannot disagree. Input names, types and order are what workflows store (by
position): never rename or reorder them.
"""

from ..pti_ops.checks import default_of
from ..pti_ops.files import IF_EXISTS_POLICIES
from ..pti_ops.training import LR_SCHEDULES, OPTIMIZERS, TrainingOptions
from ..pti_ops.inversion import InversionConfig
from ..pti_ops.training import MIXED_PRECISION_MODES

__all__ = ["default_of"]  # re-exported: the node modules read their widgets' defaults through it

# ComfyUI's widest INT (seeds).
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def link(kind: str, tooltip: str, **options) -> tuple:
    """A socket fed by another node's output (MODEL, PIVOTAL_DATASET, …)."""
    return (kind, {**options, "tooltip": tooltip})


def int_input(default: int, min: int, max: int, tooltip: str, **options) -> tuple:
    return ("INT", {"default": default, "min": min, "max": max, **options, "tooltip": tooltip})


def float_input(default: float, min: float, max: float, step: float, tooltip: str, **options) -> tuple:
    return ("FLOAT", {"default": default, "min": min, "max": max, "step": step, **options, "tooltip": tooltip})


def string_input(default: str, tooltip: str, multiline: bool = False, **options) -> tuple:
    return ("STRING", {"default": default, **({"multiline": True} if multiline else {}), **options, "tooltip": tooltip})


def lines_input(lines, tooltip: str) -> tuple:
    """A multiline STRING widget holding one entry per line (templates, prompts)."""
    return string_input("\n".join(lines), tooltip, multiline=True)


def bool_input(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def combo(values, default: str, tooltip: str) -> tuple:
    return (list(values), {"default": default, "tooltip": tooltip})


def retooltip(spec: tuple, tooltip: str) -> tuple:
    """`spec` with another tooltip (a shared widget whose meaning a node narrows)."""
    return (spec[0], {**spec[1], "tooltip": tooltip})


def format_numbers(values) -> str:
    """`[1e-4, 5e-4, 0.5]` → `"1e-4, 5e-4, 0.5"`: a comma list as people write learning rates."""

    def short(value: float) -> str:
        mantissa, exponent = f"{value:e}".split("e")
        if abs(int(exponent)) < 3:
            return f"{value:g}"
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"

    return ", ".join(short(value) for value in values)


# --- inputs several nodes share ---------------------------------------------------------------

MODEL_INPUTS = {
    "model": link("MODEL", "The SD1.5 or SDXL-family model (from Load Checkpoint; the family is read from the CLIP). It "
        "is only read: the core works on a converted copy. An upstream ModelSamplingDiscrete (eps / v_prediction, "
        "zsnr) sets what is trained."),
    "clip": link("CLIP", "The model's CLIP text encoder(s): CLIP-L, or SDXL's CLIP-L + bigG (both trained). It is only "
        "read; CLIPSetLastLayer is honoured (SDXL without it: the penultimate layer, as ComfyUI conditions SDXL)."),
    "vae": link("VAE", "The model's VAE (training images in, generated images out). It is only read."),
}
# The models and the training images: the first inputs of every node that trains.
TRAINING_INPUTS = {
    **MODEL_INPUTS,
    "dataset": link("PIVOTAL_DATASET", "The character's training images (PivotalDatasetFromFolder or FromImages)."),
}
SEED = int_input(
    0, 0, MAX_SEED, "Fixes the noise, timesteps, image order, flips and caption choice: the same seed and inputs give "
    "the same result on the same device.", control_after_generate=True,
)  # fmt: skip
OVERWRITE = bool_input(
    False, "On: replace an existing file of the same name (as if_exists = overwrite; kept so that saved workflows "
    "keep working). Off: if_exists decides.",
)  # fmt: skip
# The file-name policy, as ComfyUI's save nodes have one: an optional input (saved workflows get the default).
IF_EXISTS = combo(IF_EXISTS_POLICIES, "increment", "When a file of that name already exists: increment writes "
    "NAME_00001, NAME_00002, … (as Save Image numbers its files; the trigger and file-name outputs name the file "
    "written, so the workflow can be queued again and again), overwrite replaces it, error stops before training. "
    "With overwrite on, the file is replaced whatever this says.")  # fmt: skip
# The hidden input through which ComfyUI tells a node its id (to show its warnings on it).
NODE_ID = {"unique_id": "UNIQUE_ID"}
TEMPLATES_TOOLTIP = (
    "Prompt templates, one per line, with {} where the placeholder goes; used for images without their own caption. "
    "Describe what is constant in the images (style, framing), not the character."
)
# Memory options of the training nodes (optional inputs: older workflows keep the defaults).
MEMORY_OPTIONS = {
    "mixed_precision": combo(MIXED_PRECISION_MODES, default_of(InversionConfig, "mixed_precision"), "no: float32. "
        "bf16 (GPU or CPU) / fp16 (GPU only): forward passes in half precision, about half the activation memory and "
        "faster on GPUs; the trained tensors stay float32."),
    "gradient_checkpointing": bool_input(default_of(InversionConfig, "gradient_checkpointing"), "Recompute the UNet's "
        "activations during the backward pass instead of storing them: much less memory, about 30% slower."),
}  # fmt: skip
# The options every trainer has (optional, appended last: older workflows keep the defaults; 0 = off).
TRAINER_OPTIONS = {
    "optimizer": combo(OPTIMIZERS, default_of(TrainingOptions, "optimizer"), "adamw: the default. adafactor: less "
        "optimiser memory. prodigy (pip install prodigyopt): sets its own step size, give learning_rate 1.0."),
    "lr_schedule": combo(LR_SCHEDULES, default_of(TrainingOptions, "lr_schedule"), "Learning rate over the run, after "
        "warmup_steps of linear warm-up: constant, constant_with_warmup, linear (to 0) or cosine (to 0)."),
    "warmup_steps": int_input(default_of(TrainingOptions, "warmup_steps"), 0, 100000, "Steps of linear warm-up from 0 "
        "(not with constant)."),
    "snr_gamma": float_input(0.0, 0.0, 100.0, 0.5, "min-SNR-γ loss weighting (5 is usual): down-weights the "
        "low-noise steps. 0: off."),
    "noise_offset": float_input(default_of(TrainingOptions, "noise_offset"), 0.0, 1.0, 0.01, "Offset noise per image "
        "and channel (0.05–0.1 usual): lets the model shift overall brightness. 0: off."),
    "save_every": int_input(0, 0, 100000, "Also write the file every N steps as NAME_stepNNNN.safetensors (pick the "
        "step just before the LoRA learns the images' positions); the snapshots output lists them. 0: off."),
    "preview_every": int_input(0, 0, 100000, "Every N steps (and at the end), sample preview images of the model as it "
        "is now and show them in the node's progress bar. Each costs one sampling (20 steps) per prompt. 0: off."),
    "preview_prompts": lines_input("an anime illustration of {}", "Preview prompts, one per line, with {} for the "
        "token; seed 0, at the dataset's resolution."),
}  # fmt: skip
