"""The options every trainer has: optimisers, learning-rate schedules, min-SNR-γ weighting, offset noise."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from pti_ops.dataset import dataset_from_tensor
from pti_ops.errors import InvalidInputError
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, run_tuning
from pti_ops.models import load_bundle
from pti_ops.placeholder import add_placeholder
from pti_ops.training.diffusion_loss import LossWeighting, NoisedBatch, add_noise, diffusion_mse
from pti_ops.training.options import LR_SCHEDULES, build_optimizer, lr_factor

STEPS = 20


def _dataset():
    return dataset_from_tensor(torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_recorded_lr_trace_is_diffusers_schedule(schedule):
    warmup = 0 if schedule == "constant" else 5
    result = invert(load_bundle("tiny"), _dataset(), InversionConfig(steps=STEPS, history_every=1, learning_rate=0.01,
                                                                      lr_schedule=schedule, warmup_steps=warmup))
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = get_scheduler(schedule, reference, num_warmup_steps=warmup, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    assert [record["lr"] for record in result.history] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lora_and_joint_token_follow_their_own_schedules():
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    config = TuneConfig(steps=10, history_every=1, schedule="joint", ti_frac=0.5, lr_schedule="linear", warmup_steps=2,
                        learning_rate=1e-3, ti_learning_rate=1e-2)
    history = run_tuning(bundle, _dataset(), token, config).history
    unet = [r["lr_unet"] for r in history]
    token_lr = [r["lr_token"] for r in history]
    assert unet == pytest.approx([1e-3 * f for f in map(lr_factor("linear", 2, 10), range(10))])
    assert token_lr[:5] == pytest.approx([1e-2 * f for f in map(lr_factor("linear", 2, 5), range(5))])
    assert token_lr[5:] == [0.0] * 5  # frozen after its phase, the optimiser kept


def test_min_snr_weights_are_the_closed_form_for_epsilon_and_v():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)
    eps = LossWeighting(scheduler, snr_gamma=5.0).sample_weights(timesteps)
    torch.testing.assert_close(eps, (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr).float())
    scheduler.register_to_config(prediction_type="v_prediction")
    v = LossWeighting(scheduler, snr_gamma=5.0).sample_weights(timesteps)
    torch.testing.assert_close(v, (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)).float())
    assert eps[0] < 1e-2 and eps[-1] == pytest.approx(1.0)  # low-noise steps down-weighted, high-noise ones kept


def test_weighted_mse_is_the_weighted_mean_and_none_is_plain_mse():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    batch = NoisedBatch(prediction, torch.tensor([5, 500, 900]), target)
    assert torch.equal(diffusion_mse(prediction, batch), torch.nn.functional.mse_loss(prediction, target))
    assert torch.equal(diffusion_mse(prediction, batch, LossWeighting(scheduler)), torch.nn.functional.mse_loss(prediction, target))
    weights = LossWeighting(scheduler, snr_gamma=5.0)
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    expected = (per_sample * weights.sample_weights(batch.timesteps)).mean()
    torch.testing.assert_close(diffusion_mse(prediction, batch, weights), expected)


def test_noise_offset_shifts_each_channel_and_zero_draws_nothing_more():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(64, 4, 16, 16)
    plain = add_noise(scheduler, latents, torch.Generator().manual_seed(0), (0, 1000))
    again = add_noise(scheduler, latents, torch.Generator().manual_seed(0), (0, 1000), noise_offset=0.0)
    assert torch.equal(plain.target, again.target) and torch.equal(plain.timesteps, again.timesteps)
    offset = add_noise(scheduler, latents, torch.Generator().manual_seed(0), (0, 1000), noise_offset=0.5)
    channel_means = offset.target.mean(dim=(2, 3))  # ≈ the offset draw: spread 0.5, not the ~1/16 of plain noise
    assert channel_means.std() > 0.3 > plain.target.mean(dim=(2, 3)).std()


def test_snr_gamma_and_noise_offset_change_training_and_off_is_bit_identical():
    def vectors(**options):
        return invert(load_bundle("tiny"), _dataset(), InversionConfig(steps=4, learning_rate=0.01, **options)).vectors

    base = vectors()
    assert torch.equal(base, vectors(snr_gamma=None, noise_offset=0.0, lr_schedule="constant", optimizer="adamw"))
    assert not torch.equal(base, vectors(snr_gamma=5.0))
    assert not torch.equal(base, vectors(noise_offset=0.1))


def test_adafactor_trains_and_prodigy_without_its_package_says_how_to_install(monkeypatch):
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    result = run_tuning(bundle, _dataset(), token, TuneConfig(steps=20, history_every=10, optimizer="adafactor", learning_rate=5e-3))
    assert result.history[-1]["loss"] == result.history[-1]["loss"] and any(v.abs().sum() > 0 for k, v in result.lora.items() if "up" in k)
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(InvalidInputError, match="pip install prodigyopt"):
        build_optimizer("prodigy", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1.0, 0.0)


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "sgd"}, "`optimizer` must be one of adamw, adafactor, prodigy"),
    ({"lr_schedule": "step"}, "`lr_schedule` must be one of"),
    ({"warmup_steps": 3}, "`warmup_steps` needs a schedule with warm-up"),
    ({"warmup_steps": 20, "lr_schedule": "cosine", "steps": 20}, r"`warmup_steps` \(20\) must be fewer than the `steps` \(20\)"),
    ({"warmup_steps": -1, "lr_schedule": "cosine"}, "`warmup_steps` must be a whole number"),
    ({"snr_gamma": 0.0}, "`snr_gamma`"),
    ({"noise_offset": 2.0}, "`noise_offset`"),
])
def test_bad_options_are_refused_in_both_configs(overrides, message):
    for config in (InversionConfig, TuneConfig):
        with pytest.raises(InvalidInputError, match=message):
            config(**overrides)


def test_prodigy_trains_with_its_lr_free_default():
    pytest.importorskip("prodigyopt")
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    result = run_tuning(bundle, _dataset(), token, TuneConfig(steps=30, history_every=10, optimizer="prodigy", learning_rate=1.0))
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5  # finite and not blown up
    assert any(v.abs().sum() > 0 for k, v in result.lora.items() if "lora_up" in k)
