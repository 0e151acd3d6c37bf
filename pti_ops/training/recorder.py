"""What both training loops report: the step callback, the loss history and the divergence guard.

Losses are summed on the device and read once per record (one host sync every `every` steps),
so recording costs nothing on the steps in between.
"""

import math
from typing import Callable

import torch

from ..errors import TrainingStopped

# `on_step(step, total, logs)` after every optimiser step; `logs` is the latest history record on
# recording steps (else empty). It may raise to stop the run (ComfyUI's Cancel does).
StepCallback = Callable[[int, int, dict], None]


def offset_steps(on_step: StepCallback | None, offset: int, total: int) -> StepCallback | None:
    """A callback that reports the steps of one phase as steps of a longer run."""
    if on_step is None:
        return None
    return lambda step, _, logs: on_step(offset + step, total, logs)


class LossRecorder:
    """Steps done, running loss sums per key (on the device) and the history of records.

    Args:
        keys (`tuple[str, ...]`): the losses summed, e.g. `("loss", "reg_loss")`; a key with no value
            since the last record is left out of the record.
        device (`torch.device`): where the sums live.
        every (`int`): record every this many steps, and at `total`.
        total (`int`): the run's last step.
    """

    def __init__(self, keys: tuple[str, ...], device: torch.device, every: int, total: int):
        self.keys, self.every, self.total = keys, every, total
        self.step = 0
        self.sums = {key: torch.zeros((), device=device) for key in keys}
        self.counts = {key: 0 for key in keys}
        self.history: list[dict] = []

    def add(self, losses: dict[str, torch.Tensor]) -> bool:
        """Count one finished optimiser step and its losses; True when this step is a recording step."""
        for key, value in losses.items():
            self.sums[key] += value
            self.counts[key] += 1
        self.step += 1
        return self.step % self.every == 0 or self.step == self.total

    def record(self) -> dict:
        """Mean losses since the last record (one host sync), then reset the sums. Not yet appended."""
        record = {"step": self.step}
        for key in self.keys:
            if self.counts[key]:
                record[key] = (self.sums[key] / self.counts[key]).item()
                self.sums[key].zero_()
                self.counts[key] = 0
        return record

    def state(self) -> dict:
        return {"step": self.step, "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
                "counts": dict(self.counts), "history": list(self.history)}

    def restore(self, state: dict) -> None:
        self.step = state["step"]
        for key in self.keys:
            self.sums[key].copy_(state["sums"][key])
            self.counts[key] = state["counts"][key]
        self.history = list(state["history"])


def check_losses_finite(record: dict, learning_rate: float, what: str, last_good_step: int | None) -> None:
    """The divergence guard: raise `TrainingStopped` (with advice) when a recorded loss is not finite."""
    for key, name in (("loss", "the loss"), ("reg_loss", "the regularisation loss")):
        value = record.get(key, 0.0)
        if not math.isfinite(value):
            raise diverged(f"{name} became {value} at step {record['step']}", learning_rate, what, last_good_step)


def diverged(cause: str, learning_rate: float, what: str, last_good_step: int | None) -> TrainingStopped:
    """The error both loops stop with: what happened, the advice, and what was kept."""
    kept = f" The {what} was reset to its state at step {last_good_step}." if last_good_step is not None else ""
    return TrainingStopped(f"{cause}: training diverged. Lower the learning rate (now {learning_rate:g}).{kept}")
