"""The known model families (one module each), looked up by name or recognised from a model.

Adding a family: one module with its `ModelFamily` description, and an entry in `FAMILIES`.
"""

from ...errors import InvalidInputError, ModelLoadError
from ..family import ModelFamily
from .sd15 import SD15

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD15,)}
# The family of callers and files that name none (the pack trained SD1.5 alone before families).
DEFAULT_FAMILY = SD15


def get_family(family: ModelFamily | str) -> ModelFamily:
    """The `ModelFamily` named `family` (a `ModelFamily` is returned as it is).

    Args:
        family (`ModelFamily` or `str`): a family or its name (`"sd15"`).
    """
    if isinstance(family, ModelFamily):
        return family
    if family not in FAMILIES:
        raise InvalidInputError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}.")
    return FAMILIES[family]


def supported_families() -> str:
    """The display names of the known families, for messages (`SD1.5`)."""
    return " and ".join(family.display_name for family in FAMILIES.values())


def detect_family(text_encoder, unet) -> ModelFamily:
    """The family of a text encoder and UNet, from the UNet's added conditioning; refuses mixed parts.

    Args:
        text_encoder (`CLIPTextModel`): the text encoder.
        unet (`UNet2DConditionModel`): the UNet it conditions.
    """
    added = unet.config.get("addition_embed_type")
    family = next((f for f in FAMILIES.values() if f.unet_addition_embed_type == added), None)
    if family is None:
        raise ModelLoadError(
            f"this UNet uses added conditioning ({added!r}, as SDXL does): only {supported_families()}-family "
            "models are supported for now."
        )
    width = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise ModelLoadError(
            f"the UNet expects {unet.config.cross_attention_dim}-wide text conditioning but the text encoder "
            f"gives {width}: the folder mixes parts of different models."
        )
    return family
