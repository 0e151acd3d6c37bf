"""peft adapters (and a LoRA's full weight deltas) on a bundle's models: finding them and switching them off in place."""

from contextlib import contextmanager
from typing import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer

from ..files.weight_deltas import WeightDelta, weight_deltas
from ..models.bundle import ModelBundle


def lora_layers(bundle: ModelBundle) -> list[BaseTunerLayer]:
    """Every peft adapter layer in the bundle's UNet and text encoders (SDXL: both)."""
    return [m for model in (bundle.unet, *bundle.text_encoders) for m in model.modules() if isinstance(m, BaseTunerLayer)]


def bundle_deltas(bundle: ModelBundle) -> list[WeightDelta]:
    """Every full weight delta (a LoRA file's `.diff` / `.diff_b`) in the bundle's UNet and text encoders."""
    return weight_deltas(bundle.unet, *bundle.text_encoders)


def has_lora(bundle: ModelBundle) -> bool:
    """Whether a LoRA was applied: peft adapters or weight deltas."""
    return bool(lora_layers(bundle) or bundle_deltas(bundle))


@contextmanager
def adapters_disabled(bundle: ModelBundle, layers: list[BaseTunerLayer] | None = None) -> Iterator[None]:
    """Run the base model inside the block: every peft adapter is bypassed, then restored on exit.

    No weight is copied. peft's `enable_adapters(True)` also turns `requires_grad` on for the active
    adapters, so the flags are saved and restored too (a frozen evaluation bundle stays frozen). Full
    weight deltas are switched off too (when `layers` is not given: a caller giving them applied none).

    Args:
        bundle (`ModelBundle`): the model.
        layers (`list`, *optional*): `lora_layers(bundle)` found once by a caller that switches often
            (a training loop): walking every module each step costs ~5 % of a tiny model's step.
    """
    deltas = [d for d in bundle_deltas(bundle) if d.enabled] if layers is None else []
    layers = [m for m in (lora_layers(bundle) if layers is None else layers) if not m.disable_adapters]
    grads = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    for delta in deltas:
        delta.enabled = False
    try:
        yield
    finally:
        for delta in deltas:
            delta.enabled = True
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in grads.items():
            param.requires_grad_(flag)
