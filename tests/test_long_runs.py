"""Nothing accumulates per step: between step 20 and step 100 the only new live tensors are the
inversion's snapshots, one small `[n_vectors, dim]` tensor per history record."""

import gc

import torch

from pti_ops.models import load_bundle
from pti_ops.dataset import dataset_from_tensor
from pti_ops.inversion import InversionConfig, run_inversion
from pti_ops.lora_tune import TuneConfig, run_tuning
from pti_ops.placeholder import add_placeholder
from pti_ops.regularizer import RegularizerConfig


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _watch(counts, at=(20, 100)):
    def on_step(step, total, logs):
        if step in at:
            counts[step] = _live_tensors()

    return on_step


def _data():
    return dataset_from_tensor(torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)


def test_inversion_holds_no_more_tensors_after_100_steps_than_after_20():
    counts = {}
    config = InversionConfig(steps=100, learning_rate=1e-3, history_every=10)
    result = run_inversion(load_bundle("tiny"), _data(), config, on_step=_watch(counts))
    snapshots_taken_between = sum(20 < step <= 100 for step in result.snapshots)
    assert snapshots_taken_between == 8
    assert counts[100] - counts[20] == snapshots_taken_between


def test_regularised_tuning_holds_no_more_tensors_after_100_steps_than_after_20():
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    counts = {}
    config = TuneConfig(steps=100, learning_rate=1e-4, history_every=10)
    run_tuning(bundle, _data(), token, config, RegularizerConfig(mode="sphere", every=2), on_step=_watch(counts))
    # History records are plain floats; the last-good copy is replaced, not accumulated.
    assert counts[100] == counts[20]
