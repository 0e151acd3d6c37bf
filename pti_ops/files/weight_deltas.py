"""Full weight deltas (a LoRA file's `.diff` / `.diff_b`) on a model, switchable like peft adapters.

ComfyUI's stock Train LoRA node trains a LoRA on every matrix and conv of the UNet and, besides,
the 1-D weights (the norms) and every bias as plain deltas, which no low-rank adapter can hold. They
are put on the model as a parametrization (`torch.nn.utils.parametrize`): the module's parameter
reads `original + scale · delta` at every use, the original stays untouched, and `enabled = False`
gives the base model back without a copy, as peft's `enable_adapters(False)` does for the LoRA part
(`training.adapters.adapters_disabled` switches both). `scale` is the LoRA strength, as ComfyUI
applies a "diff" patch: `weight + strength · diff`.
"""

import torch
from torch.nn.utils import parametrize


class WeightDelta(torch.nn.Module):
    """`weight ↦ weight + scale · delta` while `enabled` (a parametrization of one parameter).

    Args:
        delta (`torch.Tensor`): the parameter's change, the parameter's shape.
    """

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.register_buffer("delta", delta)
        self.scale = 1.0
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.scale == 0:
            return weight
        return weight + (self.scale * self.delta).to(weight.dtype)


def add_weight_delta(module: torch.nn.Module, parameter: str, delta: torch.Tensor) -> WeightDelta:
    """Put `delta` on `module.<parameter>` (`weight` or `bias`), in place; returns the switchable delta."""
    original = getattr(module, parameter)
    if tuple(delta.shape) != tuple(original.shape):
        raise ValueError(f"a delta of shape {list(delta.shape)} cannot change a {parameter} of shape {list(original.shape)}")
    change = WeightDelta(delta.detach().to(original.device, original.dtype).clone())
    parametrize.register_parametrization(module, parameter, change)
    return change


def weight_deltas(*models: torch.nn.Module | None) -> list[WeightDelta]:
    """Every `WeightDelta` on these models."""
    return [m for model in models if model is not None for m in model.modules() if isinstance(m, WeightDelta)]
