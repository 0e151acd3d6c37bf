import pytest
import torch

from pti_ops.models import load_bundle
from pti_ops.dataset import dataset_from_tensor
from pti_ops.errors import InvalidInputError
from pti_ops.inversion import InversionConfig, run_inversion
from pti_ops.lora_tune import TuneConfig, run_tuning
from pti_ops.placeholder import add_placeholder
from pti_ops.training.precision import check_mixed_precision


def _tune(**overrides):
    bundle = load_bundle("tiny")
    dataset = dataset_from_tensor(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    config = TuneConfig(steps=3, learning_rate=1e-3, history_every=1, **overrides)
    return bundle, run_tuning(bundle, dataset, token, config)


def test_bf16_autocast_trains_float32_lora_weights():
    bundle, result = _tune(mixed_precision="bf16")
    assert all(v.dtype == torch.float32 for v in result.lora.values())
    lora_params = [p for n, p in bundle.unet.named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_gradient_checkpointing_gives_the_same_lora():
    _, plain = _tune()
    _, checkpointed = _tune(gradient_checkpointing=True)
    assert all(torch.allclose(plain.lora[k], checkpointed.lora[k], atol=1e-6) for k in plain.lora)


def test_inversion_in_bf16_keeps_float32_vectors():
    bundle = load_bundle("tiny")
    dataset = dataset_from_tensor(torch.rand(2, 32, 32, 3), 32)
    result = run_inversion(bundle, dataset, InversionConfig(steps=3, mixed_precision="bf16", learning_rate=1e-2))
    assert result.vectors.dtype == torch.float32 and torch.isfinite(result.vectors).all()


def test_unknown_mode_and_fp16_on_cpu_are_refused():
    with pytest.raises(InvalidInputError, match="`mixed_precision` must be one of"):
        TuneConfig(mixed_precision="fp8")
    with pytest.raises(InvalidInputError, match="fp16 needs a GPU; on the CPU use bf16"):
        check_mixed_precision("fp16", "cpu")
