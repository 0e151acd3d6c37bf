"""Both phases in one call: textual inversion of the pivot, then LoRA tuning around it."""

from dataclasses import dataclass

import torch

from .models.bundle import ModelBundle
from .dataset import ImageDataset
from .inversion import InversionConfig, InversionResult, StepCallback, run_inversion
from .lora_tune import TuneConfig, TuneResult, run_tuning
from .placeholder import PlaceholderToken, add_placeholder
from .regularizer import RegularizerConfig, check_centre_given


@dataclass
class PivotalResult:
    """The pivot (inversion result, None for the `joint` schedule) and the LoRA tuning result."""

    token: PlaceholderToken
    inversion: InversionResult | None
    tuning: TuneResult


def _offset(on_step: StepCallback | None, offset: int, total: int) -> StepCallback | None:
    """A callback that reports the steps of one phase as steps of the whole run."""
    if on_step is None:
        return None
    return lambda step, _, logs: on_step(offset + step, total, logs)


def run_pivotal_tuning(
    bundle: ModelBundle,
    dataset: ImageDataset,
    inversion: InversionConfig,
    tuning: TuneConfig,
    regularizer: RegularizerConfig | None = None,
    centres: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
) -> PivotalResult:
    """Invert the placeholder (`sequential`) or add it at its initializer (`joint`), then tune the LoRA.

    Progress is reported as one run of `inversion.steps + tuning.steps` steps (`tuning.steps` for `joint`).

    Args:
        bundle (`ModelBundle`): the model; it ends with the placeholder and the LoRA adapters.
        dataset (`ImageDataset`): the character's images.
        inversion (`InversionConfig`): placeholder, initializer, and the inversion's settings.
        tuning (`TuneConfig`): the LoRA's settings (and the schedule).
        regularizer (`RegularizerConfig`, *optional*): the locality regulariser.
        centres (`torch.Tensor`, *optional*): vSLERP centres from the norm statistics.
        on_step (`callable`, *optional*): progress callback, may raise to stop.
    """
    if regularizer is not None:
        check_centre_given(regularizer, centres)  # before the inversion, not after it
    if tuning.schedule == "joint":
        token = add_placeholder(bundle.tokenizer, bundle.text_encoder, inversion.placeholder, inversion.initializer, inversion.num_vectors)
        tuned = run_tuning(bundle, dataset, token, tuning, regularizer, centres, on_step)
        return PivotalResult(token, None, tuned)
    total = inversion.steps + tuning.steps
    inverted = run_inversion(bundle, dataset, inversion, _offset(on_step, 0, total))
    tuned = run_tuning(bundle, dataset, inverted.token, tuning, regularizer, centres, _offset(on_step, inversion.steps, total))
    return PivotalResult(inverted.token, inverted, tuned)
