"""The options every trainer has, shared by both loops: optimiser, learning-rate schedule, loss weighting, noise.

`TrainingOptions` is a base of `InversionConfig` and `TuneConfig`, so each option has one name, one
default and one check in both (and the CLI and nodes read its default with `default_of`). All are
off or neutral by default: a run without them is bit-identical to one before they existed.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checks import check_choice, check_number, check_positive_int, check_positive_number
from ..errors import InvalidInputError

LR_SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adafactor", "prodigy")


@dataclass
class TrainingOptions:
    """Optimiser, schedule and loss options of a training loop.

    Args:
        optimizer (`str`): `adamw` (default), `adafactor` (transformers', with the given learning rate:
            no relative step) or `prodigy` (`pip install prodigyopt`): Prodigy estimates the step size
            itself, so its learning rate is a multiplier of that estimate — use 1.0.
        lr_schedule (`str`): `constant`, `constant_with_warmup`, `linear` (to 0 at the last step) or
            `cosine` (half a cosine to 0), all after `warmup_steps` of linear warm-up from 0, as diffusers'
            `get_scheduler`.
        warmup_steps (`int`): steps of linear warm-up (not with `constant`).
        snr_gamma (`float`, *optional*): min-SNR-γ loss weighting (5 is the paper's value); None: off.
        noise_offset (`float`): offset noise per sample and channel (0.05–0.1 is usual); 0: off.
    """

    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    snr_gamma: float | None = None
    noise_offset: float = 0.0

    def check_training_options(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise InvalidInputError(f"`warmup_steps` must be a whole number of at least 0, got {self.warmup_steps!r}.")
        if self.warmup_steps >= getattr(self, "steps", math.inf):
            raise InvalidInputError(f"`warmup_steps` ({self.warmup_steps}) must be fewer than the `steps` ({self.steps}).")
        if self.warmup_steps and self.lr_schedule == "constant":
            raise InvalidInputError("`warmup_steps` needs a schedule with warm-up: use `lr_schedule` constant_with_warmup, linear or cosine.")
        if self.snr_gamma is not None:
            check_positive_number("snr_gamma", self.snr_gamma)
        self.noise_offset = float(check_number("noise_offset", self.noise_offset, 0.0, 1.0))


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each step, as diffusers' `get_scheduler` computes it."""
    check_positive_int("steps", total_steps)

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        raise InvalidInputError(f"unknown learning-rate schedule {schedule!r}.")

    return factor


def build_optimizer(name: str, groups: list[dict], learning_rate: float, weight_decay: float,
                    foreach: bool | None = None) -> torch.optim.Optimizer:
    """The optimiser `name` over parameter `groups` (each may carry its own `lr` and `weight_decay`)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, foreach=foreach)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=learning_rate, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise InvalidInputError("`optimizer` prodigy needs the prodigyopt package: pip install prodigyopt "
                                    "(or pip install \"comfyui-pivotal-tuning[prodigy]\").") from None
        return Prodigy(groups, lr=learning_rate, weight_decay=weight_decay)
    raise InvalidInputError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, factors: list[Callable[[int], float]]) -> torch.optim.lr_scheduler.LambdaLR:
    """One multiplier function per parameter group (the `joint` token's ends at its phase's end)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
