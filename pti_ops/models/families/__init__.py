"""The known model families (one module each), looked up by name or recognised from a model.

Adding a family: one module with its `ModelFamily` description, and an entry in `FAMILIES`.
"""

from ...errors import InvalidInputError, ModelLoadError
from ..family import ModelFamily
from .sd15 import SD15
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD15, SDXL)}
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


def detect_family(text_encoder, unet, text_encoder_2=None) -> ModelFamily:
    """The family of a UNet and its text encoders, from the UNet's added conditioning; refuses mixed parts.

    Args:
        text_encoder (`CLIPTextModel`): the (first) text encoder.
        unet (`UNet2DConditionModel`): the UNet it conditions.
        text_encoder_2 (`CLIPTextModelWithProjection`, *optional*): SDXL's second text encoder.
    """
    added = unet.config.get("addition_embed_type")
    family = next((f for f in FAMILIES.values() if f.unet_addition_embed_type == added), None)
    if family is None:
        raise ModelLoadError(
            f"this UNet uses added conditioning {added!r}, which no supported family has: only "
            f"{supported_families()}-family models are supported for now."
        )
    encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
    if len(encoders) != len(family.text_encoders):
        names = " and ".join(spec.name for spec in family.text_encoders)
        raise ModelLoadError(
            f"this UNet has {family.display_name}'s added conditioning ({added!r}) but {len(encoders)} text encoder(s) "
            f"were given; {family.display_name} needs {len(family.text_encoders)} ({names}): the parts do not belong together."
        )
    widths = [encoder.config.hidden_size for encoder in encoders]
    if unet.config.cross_attention_dim != sum(widths):
        if len(widths) == 1:
            gives = f"the text encoder gives {widths[0]}"
        else:
            gives = f"the text encoders give {' + '.join(map(str, widths))} = {sum(widths)}"
        raise ModelLoadError(
            f"the UNet expects {unet.config.cross_attention_dim}-wide text conditioning but {gives}: "
            "the folder mixes parts of different models."
        )
    if family.num_time_ids:
        _check_added_conditioning(family, encoders[-1], unet)
    return family


def _check_added_conditioning(family: ModelFamily, pooling_encoder, unet) -> None:
    """SDXL's `label_emb` takes the pooled projection and one sinusoidal embedding per time id."""
    if not hasattr(pooling_encoder, "text_projection"):
        raise ModelLoadError(
            f"{family.display_name}'s last text encoder must have a projection (CLIPTextModelWithProjection), got "
            f"{type(pooling_encoder).__name__}."
        )
    pooled = pooling_encoder.config.projection_dim
    expected = pooled + family.num_time_ids * unet.config.addition_time_embed_dim
    if unet.config.projection_class_embeddings_input_dim != expected:
        raise ModelLoadError(
            f"the UNet's added conditioning takes {unet.config.projection_class_embeddings_input_dim} inputs but the "
            f"text encoder's pooled {pooled} + {family.num_time_ids} × {unet.config.addition_time_embed_dim} time ids "
            f"make {expected}: the folder mixes parts of different models."
        )
