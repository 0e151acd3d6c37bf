"""Sampling: determinism per seed, guidance, LoRA strength, base vs tuned, multi-vector placeholders, grids."""

import numpy as np
import pytest
import torch

from pti_ops.errors import InvalidInputError
from pti_ops.metrics.sampling import (
    GRID_PAD,
    SamplingConfig,
    apply_embedding,
    apply_lora,
    build_scheduler,
    decode_latents,
    image_grid,
    initial_noise,
    predict_noise,
    sample_images,
    set_lora_strength,
)
from pti_ops.placeholder import fill_placeholder
from pti_ops.training.adapters import adapters_disabled
from pti_ops.training.text_conditioning import encode_prompts
from pti_ops.models.tiny_model import build_tiny_bundle

from helpers import kohya_lora

FAST = dict(steps=3, batch_size=4)


def test_same_seed_same_images_and_batch_composition_does_not_matter(tiny_bundle):
    prompts, seeds = ["a red cat", "a blue dog"], [0, 1]
    first = sample_images(tiny_bundle, prompts, seeds, SamplingConfig(**FAST))
    again = sample_images(tiny_bundle, prompts, seeds, SamplingConfig(**FAST))
    assert torch.equal(first.images, again.images)
    assert first.items == [("a red cat", 0), ("a red cat", 1), ("a blue dog", 0), ("a blue dog", 1)]
    assert first.images.shape == (4, 32, 32, 3) and 0 <= first.images.min() and first.images.max() <= 1
    # The last image alone, in a batch of one: same noise, same result (up to float rounding of batched kernels).
    alone = sample_images(tiny_bundle, ["a blue dog"], [1], SamplingConfig(steps=3, batch_size=1))
    torch.testing.assert_close(alone.images[0], first.images[3], atol=1e-5, rtol=0)
    mixed = sample_images(tiny_bundle, prompts, seeds, SamplingConfig(steps=3, batch_size=3))
    torch.testing.assert_close(mixed.images, first.images, atol=1e-5, rtol=0)


def test_different_seeds_differ_and_one_seed_starts_every_prompt_from_the_same_noise(tiny_bundle):
    result = sample_images(tiny_bundle, ["a red cat"], [0, 1], SamplingConfig(**FAST))
    assert (result.images[0] - result.images[1]).abs().mean() > 0.01
    assert torch.equal(initial_noise(tiny_bundle, 7), initial_noise(tiny_bundle, 7))
    assert not torch.equal(initial_noise(tiny_bundle, 7), initial_noise(tiny_bundle, 8))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_cfg_one_is_the_conditional_prediction_alone(tiny_bundle, sampler):
    config = SamplingConfig(steps=3, cfg_scale=1.0, sampler=sampler)
    result = sample_images(tiny_bundle, ["a red cat"], [3], config)
    # The reference loop: conditional UNet prediction only, no negative prompt anywhere.
    scheduler = build_scheduler(tiny_bundle, sampler)
    scheduler.set_timesteps(3)
    cond = encode_prompts(tiny_bundle.tokenizer, tiny_bundle.text_encoder, ["a red cat"])
    latents = initial_noise(tiny_bundle, 3) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = tiny_bundle.unet(scheduler.scale_model_input(latents, t), t, cond).sample
            latents = scheduler.step(eps, t, latents).prev_sample
    assert torch.equal(result.images, decode_latents(tiny_bundle, latents))
    guided = sample_images(tiny_bundle, ["a red cat"], [3], SamplingConfig(steps=3, cfg_scale=5.0, sampler=sampler))
    assert not torch.equal(guided.images, result.images)


def test_cfg_zero_is_the_negative_prompt_alone(tiny_bundle):
    zero = sample_images(tiny_bundle, ["a red cat"], [0], SamplingConfig(steps=3, cfg_scale=0.0, negative_prompt="a dog"))
    negative = sample_images(tiny_bundle, ["a dog"], [0], SamplingConfig(steps=3, cfg_scale=1.0))
    torch.testing.assert_close(zero.images, negative.images, atol=1e-5, rtol=0)


def test_lora_strength_zero_gives_the_base_images_exactly():
    base = build_tiny_bundle()
    tuned = build_tiny_bundle()
    apply_lora(tuned, kohya_lora(text_encoder=True), strength=0.0)
    config = SamplingConfig(**FAST)
    expected = sample_images(base, ["a red cat"], [0, 1], config).images
    assert torch.equal(sample_images(tuned, ["a red cat"], [0, 1], config).images, expected)
    set_lora_strength(tuned, 1.0)
    assert not torch.equal(sample_images(tuned, ["a red cat"], [0, 1], config).images, expected)


def test_adapters_disabled_runs_the_base_model_and_restores_the_adapters():
    base, tuned = build_tiny_bundle(), build_tiny_bundle()
    apply_lora(tuned, kohya_lora(text_encoder=True))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, prompts = torch.tensor([10, 700]), ["a red cat", "a cat"]
    with_lora = predict_noise(tuned, prompts, latents, t)
    frozen = {name for name, p in tuned.unet.named_parameters() if not p.requires_grad}
    with adapters_disabled(tuned):
        assert torch.equal(predict_noise(tuned, prompts, latents, t), predict_noise(base, prompts, latents, t))
    assert torch.equal(predict_noise(tuned, prompts, latents, t), with_lora)
    assert not torch.equal(with_lora, predict_noise(base, prompts, latents, t))
    # apply_lora freezes the adapters, and they stay frozen when they come back (peft would unfreeze them).
    assert frozen == {name for name, _ in tuned.unet.named_parameters()}
    assert frozen == {name for name, p in tuned.unet.named_parameters() if not p.requires_grad}


def test_multi_vector_embedding_is_expanded_in_prompts(tiny_bundle):
    vectors = torch.randn(2, tiny_bundle.embedding_dim, generator=torch.Generator().manual_seed(0))
    token = apply_embedding(tiny_bundle, vectors, "tok1", "character")
    prompt = fill_placeholder("a picture of {}", "tok1")
    with_token = sample_images(tiny_bundle, [prompt], [0], SamplingConfig(steps=2), token=token)
    spelled_out = sample_images(tiny_bundle, ["a picture of tok1_0 tok1_1"], [0], SamplingConfig(steps=2))
    assert torch.equal(with_token.images, spelled_out.images)
    assert with_token.items == [("a picture of tok1", 0)]


def test_resolution_sets_the_image_size(tiny_bundle):
    result = sample_images(tiny_bundle, ["a cat"], [0], SamplingConfig(steps=2, resolution=16))
    assert result.images.shape == (1, 16, 16, 3)


def test_image_grid_places_each_image_and_labels():
    images = torch.zeros(3, 4, 5, 3)
    images[1] = 1.0
    grid = image_grid(images, rows=2, cols=2)
    assert grid.shape == (2 * (4 + GRID_PAD) + GRID_PAD, 2 * (5 + GRID_PAD) + GRID_PAD, 3)
    x, y = GRID_PAD + 5 + GRID_PAD, GRID_PAD  # second cell of the first row
    assert np.all(grid[y : y + 4, x : x + 5] == 1.0) and np.all(grid[GRID_PAD : GRID_PAD + 4, GRID_PAD : GRID_PAD + 5] == 0.0)
    labelled = image_grid(images, 2, 2, row_labels=["first prompt", "second"], col_labels=["seed 0", "seed 1"])
    assert labelled.shape[0] > grid.shape[0] and labelled.shape[1] > grid.shape[1]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: SamplingConfig(sampler="plms"), "`sampler` must be one of"),
        (lambda b: SamplingConfig(steps=0), "`steps` must be a positive integer, got 0"),
        (lambda b: sample_images(b, ["a cat"], [0], SamplingConfig(steps=1, resolution=21)), "multiple of 2 pixels, got 21"),
        (lambda b: sample_images(b, [], [0]), "at least one prompt and one seed"),
        (lambda b: predict_noise(b, ["a cat"], torch.zeros(2, 4, 16, 16), torch.tensor([1, 2])), "1 prompt\\(s\\) for 2 latent"),
        (lambda b: set_lora_strength(b, 0.5), "no LoRA adapter"),
        (lambda b: image_grid(torch.zeros(5, 4, 4, 3), 2, 2), "5 image\\(s\\) do not fit a 2 x 2 grid"),
        (lambda b: image_grid(torch.zeros(2, 4, 4, 3), 1, 2, labels=["one"]), "1 labels for 2 images"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_bundle, call, message):
    with pytest.raises(InvalidInputError, match=message):
        call(tiny_bundle)


def test_lora_for_another_model_is_refused_before_touching_the_bundle(tiny_bundle):
    bad = {k: v for k, v in kohya_lora().items()}
    key = next(k for k in bad if k.endswith("lora_down.weight"))
    bad[key] = torch.zeros(4, 999)
    with pytest.raises(InvalidInputError, match="does not fit the model's weight"):
        apply_lora(tiny_bundle, bad)
    assert not any("lora" in name for name, _ in tiny_bundle.unet.named_modules())
