"""Learning-rate sweeps: inversion (reconstruction/editability vs distance, knee) and LoRA (onset of
position learning per regulariser), with their reports."""

from .analysis import DEFAULT_KNEE_THRESHOLD, DEFAULT_ONSET_FRACTION, check_fraction, check_learning_rates
from .report import SWEEP_KINDS, SweepReport, check_sweep_kind
from .run import inversion_sweep, lora_sweep

__all__ = [
    "DEFAULT_KNEE_THRESHOLD", "DEFAULT_ONSET_FRACTION", "SWEEP_KINDS", "SweepReport", "check_fraction",
    "check_learning_rates", "check_sweep_kind", "inversion_sweep", "lora_sweep",
]
