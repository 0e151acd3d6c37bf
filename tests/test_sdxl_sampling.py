"""Sampling SDXL bundles: pooled embedding + time ids, guidance with the negative prompt's pooled vector,
the model's prediction type; checked against diffusers' own StableDiffusionXLPipeline."""

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from pti_ops.metrics.sampling import (
    SamplingConfig,
    build_scheduler,
    denoise,
    initial_noise,
    predict_noise,
    sample_images,
    sampling_time_ids,
)
from pti_ops.models.conditioning import add_time_ids
from pti_ops.models.tiny_model import build_tiny_bundle, build_tiny_sdxl_bundle

FAST = dict(steps=3, batch_size=4)


@pytest.fixture(scope="module")
def xl():
    return build_tiny_sdxl_bundle()


def _pipeline(bundle, sampler: str) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
        tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=build_scheduler(bundle, sampler),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(bundle, sampler: str, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    side = noise.shape[-1] * bundle.vae_scale_factor
    with torch.no_grad():
        return _pipeline(bundle, sampler)(
            prompt="a red cat", negative_prompt="", num_inference_steps=3, guidance_scale=5.0, height=side, width=side,
            latents=noise.clone(), output_type="latent", **kwargs,
        ).images  # fmt: skip


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sdxl_sampling_is_diffusers_sdxl_pipeline_with_an_empty_negative_prompt(xl, sampler):
    """Pooled + time ids (original = target = the image size, crop 0,0), the empty negative prompt encoded
    with its pooled vector, the penultimate layer: exactly what diffusers' SDXL pipeline computes."""
    noise = initial_noise(xl, 0)
    ours = denoise(xl, ["a red cat"], noise, SamplingConfig(steps=3, cfg_scale=5.0, sampler=sampler))
    torch.testing.assert_close(ours, _pipeline_latents(xl, sampler, noise), atol=1e-5, rtol=0)
    # The time ids reach the UNet: another original size gives another image.
    other = _pipeline_latents(xl, sampler, noise, original_size=(64, 64))
    assert (other - ours).abs().max() > 1e-2


def test_sdxl_image_depends_on_the_prompt_and_on_the_time_ids(xl):
    config = SamplingConfig(**FAST)
    result = sample_images(xl, ["a red cat", "a blue dog"], [0], config)
    assert result.images.shape == (2, 32, 32, 3) and torch.isfinite(result.images).all()
    assert (result.images[0] - result.images[1]).abs().mean() > 1e-3
    noise = initial_noise(xl, 0)
    default_ids = sampling_time_ids(xl, noise.shape)
    assert default_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    same = denoise(xl, ["a red cat"], noise, config, time_ids=add_time_ids((32, 32), (0, 0), (32, 32)))
    assert torch.equal(same, denoise(xl, ["a red cat"], noise, config))
    cropped = denoise(xl, ["a red cat"], noise, config, time_ids=add_time_ids((64, 64), (16, 0), (32, 32)))
    assert (cropped - same).abs().max() > 1e-3


def test_sdxl_resolution_sets_the_image_size_and_its_time_ids(xl):
    result = sample_images(xl, ["a cat"], [0], SamplingConfig(steps=2, resolution=64))
    assert result.images.shape == (1, 64, 64, 3)
    assert sampling_time_ids(xl, initial_noise(xl, 0, 64).shape).tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]


def test_sdxl_cfg_zero_is_the_negative_prompt_alone_and_clip_skip_defaults_to_the_penultimate_layer(xl):
    zero = sample_images(xl, ["a red cat"], [0], SamplingConfig(steps=3, cfg_scale=0.0, negative_prompt="a dog"))
    negative = sample_images(xl, ["a dog"], [0], SamplingConfig(steps=3, cfg_scale=1.0))
    torch.testing.assert_close(zero.images, negative.images, atol=1e-5, rtol=0)
    default = sample_images(xl, ["a red cat"], [0], SamplingConfig(**FAST)).images
    assert torch.equal(default, sample_images(xl, ["a red cat"], [0], SamplingConfig(**FAST, clip_skip=2)).images)
    assert not torch.equal(default, sample_images(xl, ["a red cat"], [0], SamplingConfig(**FAST, clip_skip=1)).images)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_v_prediction_is_honoured_and_differs_from_epsilon(sampler):
    """Same weights, v-prediction schedule: our sampler follows the scheduler's prediction type, as diffusers' does."""
    v_model = build_tiny_sdxl_bundle(prediction_type="v_prediction")
    config = SamplingConfig(steps=3, sampler=sampler)
    noise = initial_noise(v_model, 1)
    v_latents = denoise(v_model, ["a red cat"], noise, config)
    eps_latents = denoise(build_tiny_sdxl_bundle(), ["a red cat"], noise, config)
    assert (v_latents - eps_latents).abs().max() > 1e-2
    torch.testing.assert_close(v_latents, _pipeline_latents(v_model, sampler, noise), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_zero_terminal_snr_schedule_samples_finite_images(sampler):
    """`ztsnr` checkpoints (v-prediction, zero terminal SNR, trailing spacing) sample through the same loop."""
    zsnr = build_tiny_sdxl_bundle(prediction_type="v_prediction")
    zsnr.noise_scheduler = DDPMScheduler.from_config(
        {**zsnr.noise_scheduler.config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    plain = build_tiny_sdxl_bundle(prediction_type="v_prediction")
    config = SamplingConfig(steps=3, sampler=sampler)
    images = sample_images(zsnr, ["a cat"], [0], config).images
    assert torch.isfinite(images).all()
    assert (images - sample_images(plain, ["a cat"], [0], config).images).abs().max() > 1e-3


def test_sdxl_predict_noise_takes_pooled_and_time_ids_and_differs_by_prompt(xl):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    a = predict_noise(xl, ["a red cat", "a cat"], latents, t)
    b = predict_noise(xl, ["a blue dog", "a cat"], latents, t)
    assert a.shape == latents.shape and a.dtype == torch.float32
    assert (a[0] - b[0]).abs().max() > 1e-4 and torch.allclose(a[1], b[1], atol=1e-6)


def test_sd15_sampling_takes_no_time_ids(tiny_bundle):
    assert sampling_time_ids(tiny_bundle, (2, 4, 16, 16)) is None
    assert SamplingConfig().clip_skip is None  # the family's layer: SD1.5's last, as before
    base = sample_images(build_tiny_bundle(), ["a cat"], [0], SamplingConfig(steps=2)).images
    assert torch.equal(base, sample_images(tiny_bundle, ["a cat"], [0], SamplingConfig(steps=2, clip_skip=1)).images)


def test_previews_during_sdxl_inversion_leave_both_encoders_vectors_unchanged(tmp_path):
    """Previews sample the SDXL model mid-run (the spliced vectors of both encoders); training is unchanged."""
    from pti_ops.dataset import dataset_from_tensor
    from pti_ops.inversion import InversionConfig, invert
    from pti_ops.metrics import PreviewConfig, Previews

    def run(previews=None, seen=None):
        dataset = dataset_from_tensor(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)), 32)
        callback = None if seen is None else (lambda step, total, logs: seen.update({step: logs.get("preview")}))
        return invert(build_tiny_sdxl_bundle(), dataset, InversionConfig(steps=4, learning_rate=5e-2), previews=previews,
                      on_step=callback)  # fmt: skip

    seen = {}
    previews = Previews(PreviewConfig(2, ["a photo of {}"], [0], SamplingConfig(steps=2, cfg_scale=1.0)), tmp_path)
    with_previews, plain = run(previews, seen), run()
    assert all(torch.equal(with_previews.pivot.vectors_by_key[k], v) for k, v in plain.pivot.vectors_by_key.items())
    assert sorted(k for k, v in seen.items() if v is not None) == [2, 4]
    assert not torch.equal(seen[2], seen[4]) and [p.name for p in previews.written] == ["step_0002.png", "step_0004.png"]
