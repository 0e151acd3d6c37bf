import torch

from pti_ops.inversion import InversionConfig, run_inversion
from pti_ops.training.latent_cache import encode_latents


def test_mirrored_view_is_the_encoding_of_the_mirrored_image(tiny_bundle, tiny_dataset):
    tiny_dataset.flip = True
    cache = encode_latents(tiny_bundle.vae, tiny_dataset)
    assert cache.mean.shape[:2] == (len(tiny_dataset), 2)
    with torch.no_grad():
        mirrored = tiny_bundle.vae.encode(tiny_dataset.pixels([0]).flip(-1)).latent_dist.mean
    assert torch.allclose(cache.mean[0, 1], mirrored[0], atol=1e-5)
    sample = cache.sample(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.Generator().manual_seed(0))
    assert sample.shape == (2, 4, 16, 16)
    assert torch.allclose(cache.mode(torch.tensor([0])), cache.mean[0:1, 0] * cache.scaling_factor)


def test_the_vae_encoder_runs_once_per_run_not_per_step(tiny_bundle, tiny_dataset):
    calls = []
    tiny_bundle.vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    run_inversion(tiny_bundle, tiny_dataset, InversionConfig(steps=6, batch_size=1, learning_rate=1e-3))
    # 4 images encoded in one batch of 4: one encoder call for the whole run of 6 steps.
    assert len(calls) == 1
