"""Both phases in one call: textual inversion of the pivot, then LoRA tuning around it.

The phase calls every face uses (CLI, nodes, demo, sweeps):
- `invert(bundle, dataset, config, on_step) -> InversionResult` (inversion.py);
- `tune_around(bundle, dataset, pivot, config, regularizer, on_step) -> TuneResult` (lora_tune.py);
- `pivotal_tune(bundle, dataset, inversion, tuning, regularizer, on_step) -> PivotalResult` (here).
Each result saves itself (`result.save(path, overwrite=…)`), its file's metadata built in one place.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from .dataset import ImageDataset
from .inversion import InversionConfig, InversionResult, invert
from .lora_tune import TuneConfig, TuneResult, tune_around
from .models.bundle import ModelBundle
from .metrics.previews import Previews
from .training.snapshots import Snapshots
from .pivot import Pivot
from .regularizer import RegularizerConfig
from .training.recorder import StepCallback, offset_steps


@dataclass
class PivotalResult:
    """The inversion result (None for the `joint` schedule) and the LoRA tuning result."""

    inversion: InversionResult | None
    tuning: TuneResult

    @property
    def pivot(self) -> Pivot:
        """The final token (as tuned by `joint`, else as inverted)."""
        return self.tuning.pivot

    @property
    def token(self):
        """The placeholder as it is in the bundle's tokenizer."""
        return self.inversion.token if self.inversion is not None else None

    def save(self, embedding_path: str | os.PathLike, lora_path: str | os.PathLike, overwrite: bool = False,
             bundle_embedding: bool = False) -> tuple[Path, Path]:
        """Write the embedding and the LoRA file (with `bundle_embedding`, the LoRA file holds the embedding too)."""
        return (self.pivot.save(embedding_path, overwrite=overwrite),
                self.tuning.save(lora_path, overwrite=overwrite, bundle_embedding=bundle_embedding))


def pivotal_tune(
    bundle: ModelBundle,
    dataset: ImageDataset,
    inversion: InversionConfig,
    tuning: TuneConfig,
    regularizer: RegularizerConfig | None = None,
    on_step: StepCallback | None = None,
    inversion_snapshots: Snapshots | None = None,
    tuning_snapshots: Snapshots | None = None,
    previews: Previews | None = None,
) -> PivotalResult:
    """Invert the placeholder (`sequential`) or start it at its initializer (`joint`), then tune the LoRA.

    Progress is reported as one run of `inversion.steps + tuning.steps` steps (`tuning.steps` for `joint`).

    Args:
        bundle (`ModelBundle`): the model; it ends with the placeholder and the LoRA adapters.
        dataset (`ImageDataset`): the character's images.
        inversion (`InversionConfig`): placeholder, initializer, and the inversion's settings.
        tuning (`TuneConfig`): the LoRA's settings (and the schedule).
        regularizer (`RegularizerConfig`, *optional*): the locality regulariser.
        on_step (`callable`, *optional*): progress callback, may raise to stop.
        inversion_snapshots, tuning_snapshots (`Snapshots`, *optional*): intermediate embeddings (`sequential`
            only) and LoRAs, every so many steps of each phase.
        previews (`Previews`, *optional*): preview images along both phases (`ti_step_…` and `lora_step_…` files).
    """
    phases = (None, None) if previews is None else (previews.phase("ti_"), previews.phase("lora_"))
    for phase, steps in zip(phases, (inversion.steps, tuning.steps)):
        if phase is not None:
            phase.check(steps)
    for snapshots, steps in ((inversion_snapshots, inversion.steps), (tuning_snapshots, tuning.steps)):
        if snapshots is not None:  # both phases' files checked before the first step
            snapshots.check(steps)
    if tuning.schedule == "joint":
        pivot = Pivot.at_initializer(bundle, inversion.placeholder, inversion.initializer, inversion.num_vectors, inversion.templates)
        return PivotalResult(None, tune_around(bundle, dataset, pivot, tuning, regularizer, on_step=on_step,
                                               snapshots=tuning_snapshots, previews=phases[1]))
    total = inversion.steps + tuning.steps
    inverted = invert(bundle, dataset, inversion, offset_steps(on_step, 0, total), snapshots=inversion_snapshots,
                      previews=phases[0])
    tuned = tune_around(bundle, dataset, inverted.pivot, tuning, regularizer, on_step=offset_steps(on_step, inversion.steps, total),
                        snapshots=tuning_snapshots, previews=phases[1])
    return PivotalResult(inverted, tuned)


# The name of earlier releases.
run_pivotal_tuning = pivotal_tune
