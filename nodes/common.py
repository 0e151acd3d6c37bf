"""What several nodes share: widget specs and input parsing. (The `PIVOTAL_EMBEDDING` value is the core's `Pivot`.)"""

from ..pti_ops.errors import InvalidInputError
from ..pti_ops.files import check_output_name
from ..pti_ops.training import MIXED_PRECISION_MODES

SEED = (
    "INT",
    {
        "default": 0,
        "min": 0,
        "max": 0xFFFFFFFFFFFFFFFF,
        "control_after_generate": True,
        "tooltip": "Fixes the noise, timesteps, image order, flips and caption choice: the same seed and inputs "
        "give the same result on the same device.",
    },
)
OVERWRITE = (
    "BOOLEAN",
    {
        "default": False,
        "tooltip": "Replace an existing file of the same name. Off: an existing file stops the run before "
        "training, so a finished result is never lost by accident.",
    },
)
TEMPLATES = (
    "STRING",
    {
        "default": "an anime illustration of {}",
        "multiline": True,
        "tooltip": "Prompt templates, one per line, with {} where the placeholder goes; used for images without "
        "their own caption. Describe what is constant in the images (style, framing), not the character.",
    },
)

# Memory options of both training nodes (optional inputs: older workflows keep the defaults).
MEMORY_OPTIONS = {
    "mixed_precision": (
        list(MIXED_PRECISION_MODES),
        {
            "default": "no",
            "tooltip": "no: float32. bf16 (GPU or CPU) / fp16 (GPU only): forward passes in half precision, "
            "about half the activation memory and faster on GPUs; the trained tensors stay float32.",
        },
    ),
    "gradient_checkpointing": (
        "BOOLEAN",
        {
            "default": False,
            "tooltip": "Recompute the UNet's activations during the backward pass instead of storing them: much "
            "less memory, about 30% slower.",
        },
    ),
}


def split_lines(text: str) -> list[str]:
    """Non-empty stripped lines of a multiline widget."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def stem(name: str) -> str:
    """A file name without the `.safetensors` extension (the name `embedding:NAME` uses)."""
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def validate_name(value, what: str):
    """`VALIDATE_INPUTS` answer for a file-name widget: True or the message."""
    if value is None:  # fed by a link: checked when the node runs
        return True
    try:
        check_output_name(value, what)
    except InvalidInputError as err:
        return str(err)
    return True


def history_every(steps: int) -> int:
    """Record interval giving one point per step for short runs and ~100 points for long ones."""
    return max(1, min(10, steps // 100))
