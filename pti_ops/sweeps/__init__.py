"""Learning-rate sweeps: inversion (reconstruction/editability vs distance, knee) and LoRA (onset of
position learning per regulariser), with their reports."""

from .analysis import DEFAULT_KNEE_THRESHOLD, DEFAULT_ONSET_FRACTION, check_fraction, check_learning_rates
from .report import SWEEP_KINDS, SweepReport, check_sweep_kind
from .run import inversion_sweep, lora_sweep
from .config import DEFAULT_LEARNING_RATES, SweepConfig, regularizers_for_modes, run_sweep

__all__ = [
    "DEFAULT_KNEE_THRESHOLD", "DEFAULT_LEARNING_RATES", "DEFAULT_ONSET_FRACTION", "SWEEP_KINDS", "SweepConfig", "SweepReport",
    "check_fraction", "check_learning_rates", "check_sweep_kind", "inversion_sweep", "lora_sweep", "regularizers_for_modes",
    "run_sweep",
]
