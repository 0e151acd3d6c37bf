import pytest
import torch

from pti_ops.training.diffusion_loss import NoisedBatch, add_noise, denoising_loss
from pti_ops.errors import InvalidInputError
from pti_ops.inversion import InversionConfig, run_inversion, vocabulary_mean_norm
from pti_ops.training.text_conditioning import encode_tokens, tokenize


def _fixed_batch_loss(bundle, dataset, prompt, seed=123):
    """Denoising loss on a fixed set of latents, noise and timesteps (the same before and after)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = bundle.vae.encode(dataset.pixels()).latent_dist.mean * bundle.vae.config.scaling_factor
        latents = latents.repeat(4, 1, 1, 1)
        batch = add_noise(bundle.noise_scheduler, latents, generator, (0, 1000))
        conditioning = encode_tokens(bundle.text_encoder, tokenize(bundle.tokenizer, [prompt] * len(latents)))
        return denoising_loss(bundle.unet, batch, conditioning).item()


def _config(**overrides):
    # A large lr makes the tiny model's token move visibly in few steps, far past the divergence
    # bound (its vocabulary norm is 0.11), so the bound is off unless a test sets it.
    settings = dict(steps=50, learning_rate=5e-2, batch_size=2, history_every=10, seed=0, max_norm_ratio=None)
    settings.update(overrides)
    return InversionConfig(**settings)


def test_loss_on_a_fixed_batch_decreases(tiny_bundle, tiny_dataset):
    prompt = "an anime illustration of tok1"
    result = run_inversion(tiny_bundle, tiny_dataset, _config(steps=50))
    trained = _fixed_batch_loss(tiny_bundle, tiny_dataset, prompt)
    # The same prompt with the initial vectors written back.
    weight = tiny_bundle.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[list(result.token.token_ids)] = result.initial_vectors
    initial = _fixed_batch_loss(tiny_bundle, tiny_dataset, prompt)
    assert trained < initial


def test_only_the_placeholder_rows_change(tiny_bundle, tiny_dataset):
    embedding_before = tiny_bundle.text_encoder.get_input_embeddings().weight.clone()
    others_before = {k: v.clone() for k, v in tiny_bundle.text_encoder.state_dict().items() if "token_embedding" not in k}
    unet_before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    result = run_inversion(tiny_bundle, tiny_dataset, _config(steps=5))
    weight = tiny_bundle.text_encoder.get_input_embeddings().weight
    n = len(embedding_before)
    assert torch.equal(weight[:n], embedding_before)
    assert torch.equal(weight[n:], result.vectors)
    assert not torch.equal(result.vectors, result.initial_vectors)
    assert all(torch.equal(v, others_before[k]) for k, v in tiny_bundle.text_encoder.state_dict().items() if k in others_before)
    assert all(torch.equal(v, unet_before[k]) for k, v in tiny_bundle.unet.state_dict().items())
    assert type(tiny_bundle.text_encoder.get_input_embeddings()).__name__ == "Embedding"


def test_history_records_distance_norm_cosine_and_nearest_tokens(tiny_bundle, tiny_dataset):
    result = run_inversion(tiny_bundle, tiny_dataset, _config(steps=25, history_every=10))
    assert [r["step"] for r in result.history] == [10, 20, 25]
    last = result.history[-1]
    expected_distance = (result.vectors - result.initial_vectors).norm().item()
    assert last["distance"] == pytest.approx(expected_distance, rel=1e-5)
    assert last["norm"] == pytest.approx(result.vectors.norm(dim=-1).mean().item(), rel=1e-5)
    assert -1 <= last["cosine"] < 1
    assert len(last["nearest"]) == 1 and len(last["nearest"][0]) == 3
    assert [r["distance"] for r in result.history] == sorted(r["distance"] for r in result.history)
    assert sorted(result.snapshots) == [10, 20, 25] and torch.equal(result.snapshots[25], result.vectors)
    assert (result.snapshots[10] - result.initial_vectors).norm().item() == pytest.approx(result.history[0]["distance"], rel=1e-5)


def test_fixed_norm_mode_keeps_the_vocabulary_mean_norm(tiny_bundle, tiny_dataset):
    target = vocabulary_mean_norm(tiny_bundle)
    result = run_inversion(tiny_bundle, tiny_dataset, _config(steps=20, norm_mode="fixed", num_vectors=2))
    assert torch.allclose(result.vectors.norm(dim=-1), torch.full((2,), target), atol=1e-5)
    assert result.vocabulary_norm == pytest.approx(target)
    assert result.history[-1]["distance"] > 0


def test_pull_mode_moves_the_norm_towards_the_vocabulary_mean():
    from pti_ops.models import load_bundle
    from pti_ops.dataset import dataset_from_tensor

    dataset = dataset_from_tensor(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1)), 32)
    gaps = {}
    for mode in ("none", "pull"):
        bundle = load_bundle("tiny")
        # Start far from the vocabulary norm so the pull has something to do.
        result = run_inversion(bundle, dataset, _config(steps=30, norm_mode=mode, norm_strength=10.0, initializer="a"))
        gaps[mode] = abs(result.vectors.norm() - result.vocabulary_norm).item()
    assert gaps["pull"] < gaps["none"]


def test_same_seed_gives_the_same_embedding_and_another_seed_does_not(tiny_dataset):
    from pti_ops.models import load_bundle

    runs = [run_inversion(load_bundle("tiny"), tiny_dataset, _config(steps=8, seed=s)).vectors for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_callback_sees_every_step_and_can_stop_the_run(tiny_bundle, tiny_dataset):
    seen = []

    def on_step(step, total, logs):
        seen.append((step, total, bool(logs)))
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_inversion(tiny_bundle, tiny_dataset, _config(steps=10, history_every=2), on_step=on_step)
    assert seen == [(1, 10, False), (2, 10, True), (3, 10, False)]
    assert type(tiny_bundle.text_encoder.get_input_embeddings()).__name__ == "Embedding"


def test_v_prediction_target_is_the_velocity(tiny_bundle):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config({**tiny_bundle.noise_scheduler.config, "prediction_type": "v_prediction"})
    latents = torch.randn(2, 4, 16, 16)
    batch = add_noise(scheduler, latents, torch.Generator().manual_seed(0), (0, 1000))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(batch.target, scheduler.get_velocity(latents, noise, batch.timesteps))
    assert isinstance(batch, NoisedBatch)


def test_gradient_accumulation_and_timestep_range_run(tiny_bundle, tiny_dataset):
    result = run_inversion(tiny_bundle, tiny_dataset, _config(steps=3, gradient_accumulation_steps=2, timestep_range=(100, 200)))
    assert result.history[-1]["step"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "`steps` must be a positive integer, got 0"),
        (dict(learning_rate=0.0), "`learning_rate` must be a positive finite number"),
        (dict(learning_rate=float("nan")), "`learning_rate` must be a positive finite number"),
        (dict(batch_size=-1), "`batch_size` must be a positive integer"),
        (dict(norm_mode="clamp"), "`norm_mode` must be one of"),
        (dict(templates=["a photo of tok1"]), "has no '\\{\\}'"),
        (dict(templates=[]), "`templates` must be a non-empty list"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        _config(**overrides)


def test_bad_timestep_range_is_refused_before_the_tokenizer_changes(tiny_bundle, tiny_dataset):
    size = len(tiny_bundle.tokenizer)
    with pytest.raises(InvalidInputError, match="`timestep_range` must satisfy"):
        run_inversion(tiny_bundle, tiny_dataset, _config(timestep_range=(500, 100)))
    assert len(tiny_bundle.tokenizer) == size


def test_an_exploding_norm_stops_the_run_at_the_last_good_vectors(tiny_bundle, tiny_dataset):
    from pti_ops.errors import TrainingStopped

    config = _config(steps=200, learning_rate=0.02, history_every=2, max_norm_ratio=3.0)
    with pytest.raises(TrainingStopped, match="over 3 times the vocabulary's mean norm.*Lower the learning rate") as info:
        run_inversion(tiny_bundle, tiny_dataset, config)
    partial = info.value.partial
    assert partial.history and partial.history[-1]["norm"] <= 3.0 * partial.vocabulary_norm
    assert torch.equal(partial.vectors, tiny_bundle.text_encoder.get_input_embeddings().weight[-1:].detach())
    expected = (partial.vectors - partial.initial_vectors).norm().item()
    assert partial.history[-1]["distance"] == pytest.approx(expected, rel=1e-5)


def test_a_nan_loss_stops_the_run(tiny_bundle, tiny_dataset):
    from pti_ops.errors import TrainingStopped

    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) > 3:
            return type(output)(sample=output.sample * float("nan"))

    tiny_bundle.unet.register_forward_hook(poison)
    with pytest.raises(TrainingStopped, match="the loss became nan at step 4.*reset to its state at step 2"):
        run_inversion(tiny_bundle, tiny_dataset, _config(steps=10, history_every=2))
