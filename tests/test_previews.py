"""Previews during training: images at the right steps, in the logs and the folder, and no change to the training."""

import torch

from pti_ops.dataset import dataset_from_tensor
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, run_tuning
from pti_ops.metrics import PreviewConfig, Previews, SamplingConfig
from pti_ops.models import load_bundle
from pti_ops.placeholder import add_placeholder

PIVOT = torch.randn(1, 32, generator=torch.Generator().manual_seed(5)) * 0.5
QUICK = SamplingConfig(steps=2, cfg_scale=1.0, resolution=32)


def _dataset():
    return dataset_from_tensor(torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)


def _previews(folder=None, every=2):
    return Previews(PreviewConfig(every, ["a photo of {}", "{} in the city"], [0, 1], QUICK), folder)


def test_inversion_previews_come_at_their_steps_and_leave_the_embedding_unchanged(tmp_path):
    seen = {}
    previews = _previews(tmp_path / "previews")
    with_previews = invert(load_bundle("tiny"), _dataset(), InversionConfig(steps=5, learning_rate=0.01), previews=previews,
                           on_step=lambda step, total, logs: seen.update({step: logs.get("preview")}))
    without = invert(load_bundle("tiny"), _dataset(), InversionConfig(steps=5, learning_rate=0.01))
    assert torch.equal(with_previews.vectors, without.vectors)
    assert [step for step, image in seen.items() if image is not None] == [2, 4, 5]  # every 2, and the last
    grid = seen[2]
    assert grid.ndim == 3 and grid.shape[-1] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert [p.name for p in previews.written] == ["step_0002.png", "step_0004.png", "step_0005.png"]


def test_lora_previews_leave_the_lora_bit_identical_and_change_as_it_trains(tmp_path):
    def tuned(previews=None, seen=None):
        bundle = load_bundle("tiny")
        token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character", vectors=PIVOT)
        config = TuneConfig(steps=6, learning_rate=2e-2, batch_size=2, history_every=2)
        callback = None if seen is None else (lambda step, total, logs: seen.update({step: logs.get("preview")}))
        return run_tuning(bundle, _dataset(), token, config, previews=previews, on_step=callback)

    seen = {}
    with_previews = tuned(_previews(every=3), seen)
    plain = tuned()
    assert all(torch.equal(with_previews.lora[k], plain.lora[k]) for k in plain.lora)
    assert sorted(k for k, v in seen.items() if v is not None) == [3, 6]
    assert not torch.equal(seen[3], seen[6])  # the LoRA moved the images on


def test_existing_preview_grids_are_refused_before_training(tmp_path):
    import pytest

    from pti_ops.errors import OutputExistsError

    folder = tmp_path / "previews"
    folder.mkdir()
    (folder / "step_0002.png").write_bytes(b"earlier")
    with pytest.raises(OutputExistsError, match="preview file"):
        invert(load_bundle("tiny"), _dataset(), InversionConfig(steps=3), previews=_previews(folder))
    assert (folder / "step_0002.png").read_bytes() == b"earlier"


def test_cli_run_writes_preview_grids_of_both_phases(tmp_path, image_folder):
    from pti_ops.cli import main

    args = ["run", "--model", "tiny", "--images", str(image_folder), "--resolution", "32", "--ti-steps", "2", "--steps", "2",
            "--preview-every", "2", "--preview-prompt", "a photo of {}", "--preview-seeds", "0,1", "--preview-steps", "2",
            "--out-embedding", str(tmp_path / "tok1.safetensors"), "--out-lora", str(tmp_path / "tok1_lora.safetensors")]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["lora_step_0002.png", "ti_step_0002.png"]
    assert main([*args, "--overwrite"]) == 0
    bad = [a if a != "0,1" else "zero" for a in args]
    assert main([*bad, "--overwrite"]) == 2
