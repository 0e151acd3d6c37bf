"""Snapshots every N steps (embedding and LoRA), periodic checkpoints, and resuming a CLI run bit for bit."""

import pytest
import torch
from safetensors.torch import load_file

from pti_ops.cli import main
from pti_ops.cli import tune as tune_command
from pti_ops.dataset import dataset_from_tensor
from pti_ops.errors import OutputExistsError
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, run_tuning
from pti_ops.models import load_bundle
from pti_ops.pivot import Pivot
from pti_ops.placeholder import add_placeholder
from pti_ops.training import Snapshots

PIVOT = torch.randn(1, 32, generator=torch.Generator().manual_seed(5)) * 0.5


def _dataset():
    return dataset_from_tensor(torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)


def _tuned(steps, snapshots=None, on_step=None, **overrides):
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character", vectors=PIVOT)
    config = TuneConfig(steps=steps, learning_rate=2e-3, batch_size=2, history_every=1, **overrides)
    return run_tuning(bundle, _dataset(), token, config, snapshots=snapshots, on_step=on_step)


def test_inversion_snapshots_hold_the_vectors_of_their_step(tmp_path):
    bundle = load_bundle("tiny")
    snapshots = Snapshots(tmp_path / "tok1.safetensors", every=2)
    result = invert(bundle, _dataset(), InversionConfig(steps=5, learning_rate=0.01, history_every=1), snapshots=snapshots)
    assert [p.name for p in snapshots.written] == ["tok1_step0002.safetensors", "tok1_step0004.safetensors"]
    for path, step in zip(snapshots.written, (2, 4)):
        assert torch.equal(Pivot.load(path, load_bundle("tiny")).vectors, result.snapshots[step])
    assert not (tmp_path / "tok1.safetensors").exists()  # the final file is the caller's


def test_a_lora_snapshot_is_the_lora_of_a_run_that_stopped_there_and_does_not_change_the_run(tmp_path):
    snapshots = Snapshots(tmp_path / "lora.safetensors", every=2)
    long = _tuned(5, snapshots)
    assert [p.name for p in snapshots.written] == ["lora_step0002.safetensors", "lora_step0004.safetensors"]
    short = _tuned(2)
    saved = load_file(str(snapshots.written[0]))
    assert saved.keys() == short.lora.keys() and all(torch.equal(saved[k], short.lora[k]) for k in saved)
    plain = _tuned(5)
    assert all(torch.equal(plain.lora[k], long.lora[k]) for k in plain.lora)


def test_joint_snapshots_carry_the_moving_token(tmp_path):
    snapshots = Snapshots(tmp_path / "lora.safetensors", every=2)
    _tuned(4, snapshots, schedule="joint", ti_learning_rate=0.05)
    saved = load_file(str(snapshots.written[0]))
    assert "bundle_emb.tok1.clip_l" in saved and not torch.equal(saved["bundle_emb.tok1.clip_l"], PIVOT)


def test_existing_snapshots_are_refused_before_training_and_a_cancel_leaves_whole_files(tmp_path):
    (tmp_path / "lora_step0002.safetensors").write_bytes(b"earlier run")
    steps = []
    with pytest.raises(OutputExistsError, match="snapshot file"):
        _tuned(4, Snapshots(tmp_path / "lora.safetensors", every=2), on_step=lambda step, total, logs: steps.append(step))
    assert steps == [] and (tmp_path / "lora_step0002.safetensors").read_bytes() == b"earlier run"

    def cancel_at_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    folder = tmp_path / "fresh"
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        _tuned(6, Snapshots(folder / "lora.safetensors", every=2), on_step=cancel_at_3)
    assert sorted(p.name for p in folder.iterdir()) == ["lora_step0002.safetensors"]
    assert load_file(str(folder / "lora_step0002.safetensors"))


def _tune_args(image_folder, embedding, out, *extra):
    return ["tune", "--model", "tiny", "--images", str(image_folder), "--steps", "6", "--lr", "0.002", "--rank", "2",
            "--embedding", str(embedding), "--reg", "path", "--out", str(out), *extra]


def test_cli_resumed_run_gives_a_byte_identical_lora(tmp_path, image_folder, monkeypatch):
    embedding = tmp_path / "tok1.safetensors"
    assert main(["invert", "--model", "tiny", "--images", str(image_folder), "--steps", "2", "--out", str(embedding)]) == 0
    uninterrupted = tmp_path / "whole.safetensors"
    assert main(_tune_args(image_folder, embedding, uninterrupted)) == 0

    class StopAtStep4(tune_command.TerminalProgress):
        def __call__(self, step, total, logs):
            super().__call__(step, total, logs)
            if step == 4:
                raise KeyboardInterrupt

    checkpoint, resumed = tmp_path / "run.ckpt", tmp_path / "resumed.safetensors"
    monkeypatch.setattr(tune_command, "TerminalProgress", StopAtStep4)
    assert main(_tune_args(image_folder, embedding, resumed, "--checkpoint", str(checkpoint), "--checkpoint-every", "2")) == 130
    assert checkpoint.is_file() and not resumed.exists()
    monkeypatch.undo()
    assert main(_tune_args(image_folder, embedding, resumed, "--resume", str(checkpoint))) == 0
    assert resumed.read_bytes() == uninterrupted.read_bytes()


def test_cli_save_every_writes_snapshots_beside_both_outputs_of_run(tmp_path, image_folder):
    embedding, lora = tmp_path / "tok1.safetensors", tmp_path / "tok1_lora.safetensors"
    args = ["run", "--model", "tiny", "--images", str(image_folder), "--ti-steps", "4", "--steps", "4", "--save-every", "2",
            "--out-embedding", str(embedding), "--out-lora", str(lora)]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*_step*.safetensors")) == ["tok1_lora_step0002.safetensors",
                                                                             "tok1_step0002.safetensors"]
    assert main(args) == 2  # a second run refuses to replace them (and the outputs) without --overwrite
