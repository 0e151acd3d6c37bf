"""Mixed precision and memory options shared by the training loops.

Autocast runs the forward passes in bf16 or fp16 while every trained tensor stays float32
(AdamW updates in full precision). fp16 needs loss scaling against gradient underflow, done
with torch's GradScaler on CUDA; bf16 has float32's range and needs none.
"""

import contextlib
from typing import Literal

import torch

from ..errors import InvalidInputError

MixedPrecision = Literal["no", "bf16", "fp16"]
MIXED_PRECISION_MODES: tuple[str, ...] = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_mixed_precision(mode: str, device: torch.device | str | None = None) -> None:
    """Raise for an unknown mode, or fp16 where no GPU can run it."""
    if mode not in MIXED_PRECISION_MODES:
        raise InvalidInputError(f"`mixed_precision` must be one of {MIXED_PRECISION_MODES}, got {mode!r}.")
    if mode == "fp16" and device is not None and torch.device(device).type == "cpu":
        raise InvalidInputError("`mixed_precision` fp16 needs a GPU; on the CPU use bf16 or no.")


def autocast(device: torch.device, mode: MixedPrecision):
    """The autocast context of `mode` on `device` (a no-op for `no`)."""
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[mode])


class GradientStep:
    """backward / clip / optimiser step, with loss scaling when fp16 on CUDA asks for it.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimiser of `params`.
        params (`list[torch.nn.Parameter]`): the trained tensors (a list: clipping must see them all).
        max_grad_norm (`float`, *optional*): clip their global gradient norm.
        device (`torch.device`): where the model runs.
        mode (`str`): the mixed-precision mode.
    """

    def __init__(self, optimizer, params, max_grad_norm: float | None, device: torch.device, mode: MixedPrecision):
        self.optimizer, self.params, self.max_grad_norm = optimizer, list(params), max_grad_norm
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" and device.type == "cuda" else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


@contextlib.contextmanager
def gradient_checkpointing(unet, enabled: bool):
    """Recompute the UNet's activations in the backward pass instead of storing them (less memory)."""
    if not enabled:
        yield
        return
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()
