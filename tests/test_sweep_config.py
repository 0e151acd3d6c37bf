"""SweepConfig and run_sweep: a sweep's settings checked when built, and one call that runs and writes it."""

import json

import pytest
import torch

from pti_ops.errors import InvalidInputError, OutputExistsError
from pti_ops.inversion import InversionConfig
from pti_ops.lora_tune import TuneConfig
from pti_ops.metrics.evaluation import EvaluationConfig, Scorers
from pti_ops.metrics.lpips_model import load_lpips
from pti_ops.metrics.sampling import SamplingConfig
from pti_ops.models import load_bundle
from pti_ops.regularizer import RegularizerConfig
from pti_ops.sweeps import SweepConfig, regularizers_for_modes, run_sweep
from pti_ops.user_warnings import collect_warnings
from helpers import warns_user

TEMPLATE = "an anime illustration of {}"


def _no_bundle():
    pytest.fail("a model was loaded before the settings were checked")


def small(**overrides) -> SweepConfig:
    settings = dict(learning_rates=[1e-2], steps=2, history_every=1, prompts=[TEMPLATE], edit_prompts=["a photo of {} on the beach"],
                    sample_seeds=[0, 1], sampling=SamplingConfig(steps=1))  # fmt: skip
    return SweepConfig(**{**settings, **overrides})


def test_defaults_are_the_training_and_evaluation_defaults():
    config = SweepConfig()
    inversion, tuning, evaluation = InversionConfig(), TuneConfig(), EvaluationConfig()
    assert config.steps == inversion.steps == tuning.steps == 1000
    assert (config.placeholder, config.initializer, config.templates) == (inversion.placeholder, inversion.initializer, inversion.templates)
    assert (config.rank, config.targets) == (tuning.rank, tuning.targets)
    assert (config.prompts, config.edit_prompts, config.sample_seeds) == (evaluation.prompts, evaluation.edit_prompts, evaluation.seeds)
    assert config.sampling == SamplingConfig() and config.regularizers == [None] and config.out is None
    assert config.runs == 4 and config.total_steps == 4000


def test_sub_configs_carry_the_sweep_settings():
    inversion = small(num_vectors=2, seed=3, clip_skip=2).training_config()
    assert isinstance(inversion, InversionConfig) and (inversion.num_vectors, inversion.seed, inversion.clip_skip) == (2, 3, 2)
    tuning = small(kind="lora", rank=8, alpha=4.0, targets="attention_ff").training_config()
    assert isinstance(tuning, TuneConfig) and (tuning.rank, tuning.alpha, tuning.targets, tuning.steps) == (8, 4.0, "attention_ff", 2)
    evaluation = small(placeholder="tok2", initializer="girl").evaluation_config()
    assert (evaluation.placeholder, evaluation.class_word, evaluation.seeds) == ("tok2", "girl", [0, 1])
    assert evaluation.locality_prompts == ["an anime illustration of girl", "a photo of girl on the beach"]


def test_dicts_become_configs_and_the_runs_count_the_regularisers():
    config = small(kind="lora", learning_rates=[1e-3, 1e-2], regularizers=[None, {"mode": "path", "weight": 0.5}],
                   sampling={"steps": 3})  # fmt: skip
    assert isinstance(config.regularizers[1], RegularizerConfig) and config.regularizers[1].weight == 0.5
    assert config.sampling.steps == 3 and config.runs == 4 and config.total_steps == 8
    assert json.loads(json.dumps(config.to_dict()))["regularizers"][1]["mode"] == "path"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(kind="gan"), "sweep kind must be one of inversion, lora, got 'gan'"),
        (dict(learning_rates=[]), "`learning_rates` is empty"),
        (dict(learning_rates=[1e-3, 1e-3]), "`learning_rates` lists 0.001 twice"),
        (dict(regularizers=[]), "`regularizers` is empty"),
        (dict(regularizers=["path"]), "each regulariser must be None, a RegularizerConfig or a dict"),
        (dict(eval_every=3, history_every=2), "`eval_every` \\(3\\) must be a multiple of `history_every` \\(2\\)"),
        (dict(knee_threshold=0), "`knee_threshold` must be a fraction in \\(0, 1\\], got 0"),
        (dict(onset_fraction=1.5), "`onset_fraction` must be a fraction"),
        (dict(steps=0), "`steps` must be a positive integer, got 0"),
        (dict(kind="lora", rank=0), "`rank` must be a positive integer, got 0"),
        (dict(prompts=["no slot"]), "prompt 'no slot' has no \\{\\}"),
        (dict(sample_seeds=[]), "`seeds` is empty"),
        (dict(sampling={"sampler": "plms"}), "`sampler` must be one of"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        small(**settings)


def test_ignored_settings_warn():
    with warns_user("`regularizers` are ignored by the inversion sweep"):
        small(regularizers=[None, RegularizerConfig()])
    with warns_user("`eval_every` is ignored by the LoRA sweep"):
        small(kind="lora", eval_every=1)
    with collect_warnings() as collected:
        small(eval_every=1)
    assert collected == []


def test_regularizers_for_modes():
    regs = regularizers_for_modes(["none", " path", "class "], anchor="girl", templates=[TEMPLATE], t=0.3, weight=0.5)
    assert regs[0] is None and [(r.mode, r.anchor, r.t, r.weight) for r in regs[1:]] == [("path", "girl", 0.3, 0.5), ("class", "girl", 0.3, 0.5)]
    with pytest.raises(InvalidInputError, match="--reg 'blur' is not a regulariser; choose from none, empty"):
        regularizers_for_modes(["none", "blur"], "character", [TEMPLATE], what="--reg")
    with pytest.raises(InvalidInputError, match="--reg names no regulariser"):
        regularizers_for_modes([" ", ""], "character", [TEMPLATE], what="--reg")


def test_run_sweep_refuses_before_loading_a_model(tiny_dataset, tmp_path):
    with pytest.raises(InvalidInputError, match="the LoRA sweep needs the trained token's vectors"):
        run_sweep(small(kind="lora"), _no_bundle, tiny_dataset)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="`out` .* is not empty"):
        run_sweep(small(out=tmp_path), _no_bundle, tiny_dataset)


def test_run_sweep_runs_and_writes_the_report(tiny_dataset, tmp_path):
    progress = []
    config = small(kind="lora", regularizers=[None, RegularizerConfig(mode="class")], out=tmp_path / "report")
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    scorers = Scorers(lpips=load_lpips("alex", random_backbone=True))
    report = run_sweep(config, lambda: load_bundle("tiny"), tiny_dataset, scorers, token_vectors=vectors,
                       on_progress=lambda done, total, logs: progress.append((done, total)), settings={"model": "tiny"})  # fmt: skip
    assert [row["run"] for row in report.rows] == ["base", "none lr=0.01", "class lr=0.01"]
    assert progress[-1] == (config.total_steps, config.total_steps) == (4, 4)
    saved = json.loads((tmp_path / "report" / "sweep.json").read_text())
    assert saved["settings"]["model"] == "tiny" and saved["settings"]["tuning"]["steps"] == 2
    assert len(list((tmp_path / "report" / "loras").glob("*.safetensors"))) == 2
