"""A learning-rate sweep as one config and one call: what the CLI's `sweep` and the PivotalSweep node run.

`SweepConfig` holds every setting of a sweep (kind, learning rates, the training settings shared by
every run, the regularisers of the LoRA sweep, the evaluation, the report folder) and checks them
all when it is built, before any model is loaded. `run_sweep` runs it (`inversion_sweep` or
`lora_sweep`) and writes the report folder.
"""

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..dataset import ImageDataset
from ..errors import InvalidInputError
from ..safe_write import check_output_folder
from ..inversion import InversionConfig
from ..lora_tune import TuneConfig
from ..metrics.evaluation import DEFAULT_EDIT_PROMPTS, DEFAULT_PROMPTS, EvaluationConfig, Scorers
from ..metrics.sampling import SamplingConfig
from ..regularizer import DEFAULT_T, REGULARIZER_MODES, RegularizerConfig
from ..placeholder import DEFAULT_TEMPLATES
from ..training.recorder import StepCallback
from .analysis import DEFAULT_KNEE_THRESHOLD, DEFAULT_ONSET_FRACTION, check_fraction, check_learning_rates
from .report import SweepKind, SweepReport, check_sweep_kind
from .run import BundleFactory, _check_eval_every, _check_regularizers, inversion_sweep, lora_sweep
from ..user_warnings import warn_user

logger = logging.getLogger(__name__)

# The notes' learning rates (METHOD.md, "Experiments"): a factor of 2-5 apart, around the usual 5e-4.
DEFAULT_LEARNING_RATES = (1e-4, 5e-4, 2e-3, 5e-3)


@dataclass
class SweepConfig:
    """Settings of a learning-rate sweep: one training run per learning rate (and regulariser), each evaluated.

    Args:
        kind (`str`): `inversion` (invert the token once per learning rate) or `lora` (tune a LoRA around
            a trained token once per learning rate and regulariser).
        learning_rates (`list[float]`): one run each, in this order (the token's or the LoRA's).
        steps (`int`): training steps of every run (the notes fix 1000 and vary the learning rate, so the
            distance travelled ≈ lr × steps).
        placeholder (`str`): the token word; for `lora`, the trained token's.
        initializer (`str`): its class word: where the inversion starts, what edit prompts are scored with.
        num_vectors (`int`): `inversion`: embedding vectors behind the token.
        templates (`list[str]`): training prompt templates with `{}`.
        batch_size (`int`): training images per step.
        seed (`int`): the training seed, the same in every run.
        clip_skip (`int`, *optional*): text-encoder layer of the training runs (1 = last); None = the family's
            (SD1.5 1, SDXL 2, the penultimate). The evaluation samples with `sampling.clip_skip` (the CLI and
            the node set both from one option).
        history_every (`int`): record the losses and distances every N steps (the points of the distance fit).
        eval_every (`int`, *optional*): `inversion`: also evaluate every N steps along each run (a multiple
            of `history_every`); None = the last step only (evaluation costs far more than training).
        rank (`int`): `lora`: LoRA rank of every run.
        alpha (`float`, *optional*): `lora`: LoRA alpha (default: the rank).
        targets (`str`): `lora`: UNet layers that get a LoRA (`attention` or `attention_ff`).
        regularizers (`list`): `lora`: `None` (off), `RegularizerConfig`s or their dicts; every learning
            rate runs with each (a vSLERP centre travels inside its config).
        prompts (`list[str]`): evaluation prompts like the training ones, with `{}`.
        edit_prompts (`list[str]`): evaluation prompts that ask for changes, with `{}` (may be empty).
        sample_seeds (`list[int]`): sampling seeds, one image per seed and prompt, the same for every run.
        sampling (`SamplingConfig` or `dict`): how evaluation images are generated.
        knee_threshold (`float`): `inversion` knee: gain per unit distance below this fraction of the initial gain.
        onset_fraction (`float`): `lora` onset: position spread below this fraction of the base model's.
        mixed_precision (`str`): `no`, `bf16` or `fp16` (GPU) autocast of the training forward passes.
        gradient_checkpointing (`bool`): recompute UNet activations in the backward pass (less memory, slower).
        out (`Path`, *optional*): the report folder; None: `run_sweep` writes nothing.
        overwrite (`bool`): write into a non-empty `out`, replacing the report's files.
    """

    kind: SweepKind = "inversion"
    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LEARNING_RATES))
    steps: int = InversionConfig.steps
    placeholder: str = InversionConfig.placeholder
    initializer: str = InversionConfig.initializer
    num_vectors: int = InversionConfig.num_vectors
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    batch_size: int = InversionConfig.batch_size
    seed: int = InversionConfig.seed
    clip_skip: int | None = None  # one layer for both loops; None: the family's
    history_every: int = InversionConfig.history_every
    eval_every: int | None = None
    rank: int = TuneConfig.rank
    alpha: float | None = None
    targets: str = TuneConfig.targets
    regularizers: list[RegularizerConfig | dict | None] = field(default_factory=lambda: [None])
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    edit_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_EDIT_PROMPTS))
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    sampling: SamplingConfig | dict = field(default_factory=SamplingConfig)
    knee_threshold: float = DEFAULT_KNEE_THRESHOLD
    onset_fraction: float = DEFAULT_ONSET_FRACTION
    mixed_precision: str = InversionConfig.mixed_precision
    gradient_checkpointing: bool = False
    out: Path | None = None
    overwrite: bool = False

    def __post_init__(self):
        self.kind = check_sweep_kind(self.kind)
        self.learning_rates = check_learning_rates(self.learning_rates)
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        self.regularizers = [RegularizerConfig.from_dict(r) if isinstance(r, dict) else r for r in self.regularizers]
        _check_regularizers(self.regularizers)
        if self.kind == "inversion":
            _check_eval_every(self.eval_every, self.history_every)
        self.knee_threshold = check_fraction("knee_threshold", self.knee_threshold)
        self.onset_fraction = check_fraction("onset_fraction", self.onset_fraction)
        self.out = None if self.out is None else Path(self.out)
        if self.kind == "inversion" and any(reg is not None for reg in self.regularizers):
            warn_user("`regularizers` are ignored by the inversion sweep (they apply to kind `lora`).")
        if self.kind == "lora" and self.eval_every is not None:
            warn_user("`eval_every` is ignored by the LoRA sweep: each tuned LoRA is evaluated once, at its last step.")
        # Every setting is checked now, before any model is loaded.
        self.training_config()
        self.evaluation_config()

    @property
    def runs(self) -> int:
        """Training runs of the sweep: one per learning rate (and regulariser, for `lora`)."""
        return len(self.learning_rates) * (len(self.regularizers) if self.kind == "lora" else 1)

    @property
    def total_steps(self) -> int:
        """Training steps of the whole sweep (what its progress counts)."""
        return self.runs * self.steps

    def training_config(self) -> InversionConfig | TuneConfig:
        """The settings every run shares (each run sets its own learning rate)."""
        if self.kind == "inversion":
            return InversionConfig(
                placeholder=self.placeholder, initializer=self.initializer, num_vectors=self.num_vectors,
                templates=self.templates, steps=self.steps, batch_size=self.batch_size, seed=self.seed,
                clip_skip=self.clip_skip, history_every=self.history_every, mixed_precision=self.mixed_precision,
                gradient_checkpointing=self.gradient_checkpointing,
            )  # fmt: skip
        return TuneConfig(
            rank=self.rank, alpha=self.alpha, targets=self.targets, templates=self.templates, steps=self.steps,
            batch_size=self.batch_size, seed=self.seed, clip_skip=self.clip_skip, history_every=self.history_every,
            mixed_precision=self.mixed_precision, gradient_checkpointing=self.gradient_checkpointing,
        )  # fmt: skip

    def evaluation_config(self) -> EvaluationConfig:
        """The evaluation of every run: the sweep's token in the prompts, its class word for the edits."""
        return EvaluationConfig(
            prompts=self.prompts, edit_prompts=self.edit_prompts, placeholder=self.placeholder,
            class_word=self.initializer, seeds=self.sample_seeds, sampling=self.sampling,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """JSON-ready settings (regularisers as their dicts, the folder as a string)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(sampling=asdict(self.sampling), out=None if self.out is None else str(self.out),
                    regularizers=[None if reg is None else reg.to_dict() for reg in self.regularizers])
        return data


def regularizers_for_modes(
    modes: list[str], anchor: str, templates: list[str], t: float = DEFAULT_T, weight: float = 1.0,
    what: str = "`modes`",
) -> list[RegularizerConfig | None]:  # fmt: skip
    """One regulariser per mode name (`none` = off), all with the same anchor, templates, t and weight.

    Args:
        modes (`list[str]`): names from `REGULARIZER_MODES`, e.g. `["none", "path", "class"]`.
        anchor (`str`): the class word of the regularisation prompts (the token's initializer).
        templates (`list[str]`): regularisation prompt templates with `{}`.
        t (`float`): position on the path, 0 = token prompt, 1 = class prompt.
        weight (`float`): λ_R of every regulariser.
        what (`str`): the input as the user sees it, for the error message (e.g. `--reg`).
    """
    modes = [mode.strip() for mode in modes if mode.strip()]
    if not modes:
        raise InvalidInputError(f"{what} names no regulariser: give e.g. none,path,class.")
    unknown = [mode for mode in modes if mode not in REGULARIZER_MODES]
    if unknown:
        raise InvalidInputError(f"{what} {unknown[0]!r} is not a regulariser; choose from {', '.join(REGULARIZER_MODES)}.")
    return [None if mode == "none" else RegularizerConfig(mode=mode, anchor=anchor, templates=templates, t=t, weight=weight)
            for mode in modes]  # fmt: skip


def run_sweep(
    config: SweepConfig,
    bundle_factory: BundleFactory,
    dataset: ImageDataset,
    scorers: Scorers | None = None,
    token_vectors: torch.Tensor | dict[str, torch.Tensor] | None = None,
    on_progress: StepCallback | None = None,
    settings: dict | None = None,
) -> SweepReport:
    """Run the sweep and write its report into `config.out` (when given).

    Args:
        config (`SweepConfig`): the sweep.
        bundle_factory (`callable`): returns a fresh bundle without the placeholder; called once per run.
        dataset (`ImageDataset`): the character's images (also the reconstruction target).
        scorers (`Scorers`, *optional*): LPIPS and CLIP; missing ones give "not computed" columns.
        token_vectors (`torch.Tensor` or `dict`, *optional*): `lora`: the trained token (the pivot), `[num_vectors, dim]`
            or one set per embedding key (`Pivot.vectors_by_key`).
        on_progress (`callable`, *optional*): `on_progress(done, total, logs)` over `config.total_steps`.
        settings (`dict`, *optional*): more JSON-ready settings for the report (model, files, scorer names).
    """
    if config.kind == "lora" and token_vectors is None:
        raise InvalidInputError("the LoRA sweep needs the trained token's vectors (`token_vectors`): invert the token first.")
    if config.out is not None:  # callers check it first with their own wording; this guards other callers
        check_output_folder(config.out, config.overwrite, what="`out`", hint="set `overwrite`")
    if config.kind == "inversion":
        report = inversion_sweep(
            bundle_factory, dataset, config.training_config(), learning_rates=config.learning_rates,
            eval_config=config.evaluation_config(), scorers=scorers, on_progress=on_progress,
            eval_every=config.eval_every, knee_threshold=config.knee_threshold,
        )  # fmt: skip
    else:
        report = lora_sweep(
            bundle_factory, dataset, token_vectors, placeholder=config.placeholder, initializer=config.initializer,
            base_config=config.training_config(), learning_rates=config.learning_rates, regularizers=config.regularizers,
            eval_config=config.evaluation_config(), scorers=scorers, on_progress=on_progress,
            onset_fraction=config.onset_fraction,
        )  # fmt: skip
    report.settings.update(settings or {})
    if config.out is not None:
        written = report.save(config.out, overwrite=config.overwrite)
        logger.info("wrote %d file(s) into %s", len(written), config.out)
    return report

