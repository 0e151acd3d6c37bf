"""A folder of snapshots evaluated one by one (the metrics against the step)."""

import pytest
import torch

from pti_ops.dataset import dataset_from_tensor
from pti_ops.errors import InvalidInputError
from pti_ops.lora_tune import TuneConfig, run_tuning
from pti_ops.metrics import SamplingConfig
from pti_ops.metrics.evaluation import EvaluationConfig
from pti_ops.metrics.snapshot_series import evaluate_series, series_table, snapshot_files
from pti_ops.models import load_bundle
from pti_ops.pivot import Pivot
from pti_ops.placeholder import add_placeholder
from pti_ops.training import Snapshots

PIVOT = torch.randn(1, 32, generator=torch.Generator().manual_seed(5)) * 0.5
CONFIG = EvaluationConfig(prompts=["a picture of {}"], edit_prompts=["a photo of {} on the beach"], seeds=[0],
                          sampling=SamplingConfig(steps=1, batch_size=2, resolution=32), locality_timesteps=(500,))


def _snapshot_folder(tmp_path, schedule="sequential"):
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character", vectors=PIVOT)
    dataset = dataset_from_tensor(torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)
    config = TuneConfig(steps=5, learning_rate=5e-2, history_every=1, schedule=schedule, ti_learning_rate=0.05)
    result = run_tuning(bundle, dataset, token, config, snapshots=Snapshots(tmp_path / "lora.safetensors", every=2))
    result.save(tmp_path / "lora.safetensors", bundle_embedding=schedule == "joint")
    return tmp_path


def test_snapshots_are_listed_in_step_order_then_the_final_file(tmp_path):
    files = snapshot_files(_snapshot_folder(tmp_path))
    assert [(step, path.name) for step, path in files] == [
        (2, "lora_step0002.safetensors"), (4, "lora_step0004.safetensors"), (None, "lora.safetensors")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no .safetensors files"):
        snapshot_files(tmp_path / "empty")


def test_each_lora_snapshot_is_evaluated_with_the_same_prompts_and_seeds(tmp_path):
    files = snapshot_files(_snapshot_folder(tmp_path))
    pivot = Pivot("tok1", "character", PIVOT, "sd15")
    entries = evaluate_series(lambda: load_bundle("tiny"), CONFIG, files, "lora", load_pivot=lambda path, bundle: pivot)
    assert [e.step for e in entries] == [2, 4, None]
    drift = [e.result.report.metrics["locality_eps_mse"].value for e in entries]
    assert drift[0] < drift[1] < drift[2]  # the LoRA moves the base model's predictions further step by step
    rows, markdown = series_table(entries)
    assert [row["step"] for row in rows] == [2, 4, None] and rows[0]["locality_eps_mse"] == drift[0]
    assert markdown.startswith("| step | file |") and "lora_step0004.safetensors" in markdown


def test_joint_snapshots_are_evaluated_with_the_token_they_carry(tmp_path):
    files = snapshot_files(_snapshot_folder(tmp_path, schedule="joint"))
    seen = []

    def load_pivot(path, bundle):
        seen.append(path)
        return Pivot.from_lora_file(path, bundle)

    entries = evaluate_series(lambda: load_bundle("tiny"), CONFIG, files, "lora", load_pivot=load_pivot)
    assert seen == [path for _, path in files] and len(entries) == 3  # every file carried its own token
    tokens = [Pivot.from_lora_file(path, load_bundle("tiny")).vectors for _, path in files]
    assert not torch.equal(tokens[0], tokens[1])  # the joint token moved between the snapshots


def test_cli_evaluate_takes_a_folder_of_snapshots(tmp_path, image_folder):
    import json

    from pti_ops.cli import main

    embedding, loras = tmp_path / "tok1.safetensors", tmp_path / "loras"
    assert main(["invert", "--model", "tiny", "--images", str(image_folder), "--steps", "2", "--out", str(embedding)]) == 0
    assert main(["tune", "--model", "tiny", "--images", str(image_folder), "--embedding", str(embedding), "--steps", "4",
                 "--lr", "0.01", "--save-every", "2", "--out", str(loras / "tok1_lora.safetensors")]) == 0
    report = tmp_path / "report"
    args = ["evaluate", "--model", "tiny", "--embedding", str(embedding), "--lora", str(loras), "--steps", "1", "--seeds", "0",
            "--resolution", "32", "--lpips", "off", "--out", str(report)]
    assert main(args) == 0
    series = json.loads((report / "series.json").read_text())
    assert series["kind"] == "lora" and [row["step"] for row in series["rows"]] == [2, None]
    assert (report / "tok1_lora_step0002" / "metrics.json").is_file() and (report / "series.md").is_file()
    assert main(args) == 2  # the report is not replaced without --overwrite
