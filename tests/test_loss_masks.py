"""Masked loss (pti_ops/training/loss_masks.py): masks on the latent grid weight the diffusion loss."""

import dataclasses

import pytest
import torch

from example_images import write_shaped_images
from pti_ops.dataset import DatasetConfig, dataset_from_tensor, load_image_folder
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, tune_around
from pti_ops.models import load_bundle
from pti_ops.training.diffusion_loss import LossWeighting, NoisedBatch, diffusion_mse
from pti_ops.training.loss_masks import batch_weighting, latent_masks

SCHEDULER = load_bundle("tiny").noise_scheduler


def _left_half_masked(n=2, side=32, floor=0.0, flip=False):
    images = torch.rand(n, side, side, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(n, side, side)
    masks[:, :, : side // 2] = 0.0
    return dataset_from_tensor(images, masks=masks, config=DatasetConfig(resolution=side, mask_floor=floor, flip=flip))


def _loss(prediction, target, dataset, snr_gamma=None):
    masks = latent_masks(dataset, factor=2)
    indices, views = torch.arange(len(dataset)), torch.zeros(len(dataset), dtype=torch.long)
    weighting = batch_weighting(LossWeighting(SCHEDULER, snr_gamma) if snr_gamma else None, masks, indices, views, SCHEDULER)
    return diffusion_mse(prediction, NoisedBatch(prediction.detach(), torch.tensor([10, 500]), target), weighting)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_a_mask_zero_on_the_left_half_leaves_that_half_out_of_the_loss(snr_gamma):
    dataset = _left_half_masked()
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(2, 4, 16, 16, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 16, 16, generator=generator)
    loss = _loss(prediction, target, dataset, snr_gamma)
    loss.backward()
    assert prediction.grad[..., :8].abs().max() == 0 and prediction.grad[..., 8:].abs().min() > 0
    changed_prediction, changed_target = prediction.detach().clone(), target.clone()
    changed_prediction[..., :8] += 100.0
    changed_target[..., :8] -= 3.0
    assert torch.equal(_loss(changed_prediction, changed_target, dataset, snr_gamma), loss.detach())
    assert not torch.equal(_loss(prediction.detach() + 1.0, target, dataset, snr_gamma), loss.detach())


def test_the_floor_weights_the_unmasked_area():
    floor = 0.25
    masked, plain = _left_half_masked(floor=floor), dataclasses.replace(_left_half_masked(), masks=None)
    prediction = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.zeros(2, 4, 16, 16)
    _loss(prediction, target, masked).backward()
    weighted = prediction.grad.clone()
    prediction.grad = None
    _loss(prediction, target, plain).backward()
    assert torch.allclose(weighted[..., :8], floor * prediction.grad[..., :8])
    assert torch.allclose(weighted[..., 8:], prediction.grad[..., 8:])


def test_the_mask_is_area_averaged_to_the_latent_grid_at_every_bucket_size(tmp_path):
    write_shaped_images(tmp_path, [(100, 60), (60, 100), (96, 96)], alpha_left=True)
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True, mask_from="alpha", flip=True))
    masks = latent_masks(data, factor=2)
    for i, grid in enumerate(masks.masks):
        pixels = data.mask_pixels([i])[0, 0]
        height, width = pixels.shape
        blocks = pixels.reshape(height // 2, 2, width // 2, 2).mean(dim=(1, 3))  # each latent cell's 2x2 pixels
        assert grid.shape == (2, 1, height // 2, width // 2)
        assert torch.allclose(grid[0, 0], blocks) and torch.equal(grid[1], grid[0].flip(-1))  # mirrored view, mirrored mask
        assert grid[0, 0, :, : width // 4 - 1].max() == 0 and grid[0, 0, :, width // 4 + 1:].min() == 1


def test_a_batch_of_full_masks_has_no_pixel_weights():
    dataset = _left_half_masked()
    full = dataclasses.replace(dataset, masks=torch.full_like(dataset.masks, 255), mask_floor=0.5)
    assert latent_masks(full, 2).pixel_weights(torch.arange(2), torch.zeros(2, dtype=torch.long)) is None
    assert latent_masks(dataclasses.replace(dataset, masks=None), 2) is None


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_a_mask_of_ones_trains_bit_identically_to_no_mask(model):
    plain = _left_half_masked(n=3, flip=True)
    plain = dataclasses.replace(plain, masks=None)
    ones = dataclasses.replace(plain, masks=torch.full((3, 1, 32, 32), 255, dtype=torch.uint8), mask_floor=0.3)
    results = []
    for dataset in (plain, ones):
        bundle = load_bundle(model)
        inverted = invert(bundle, dataset, InversionConfig(steps=3, batch_size=2, history_every=1, learning_rate=1e-2))
        tuned = tune_around(bundle, dataset, inverted.pivot, TuneConfig(steps=3, batch_size=2, history_every=1, learning_rate=1e-3))
        results.append((inverted.pivot.vectors_by_key, tuned.lora))
    (vectors_a, lora_a), (vectors_b, lora_b) = results
    assert all(torch.equal(vectors_a[k], vectors_b[k]) for k in vectors_a)
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_with_everything_masked_out_neither_loop_learns(model):
    """The mask reaches both loops' loss: all zero (floor 0) leaves the token and the LoRA where they started."""
    dataset = _left_half_masked(n=2)
    dataset = dataclasses.replace(dataset, masks=torch.zeros_like(dataset.masks))
    bundle = load_bundle(model)
    inverted = invert(bundle, dataset, InversionConfig(steps=3, batch_size=2, history_every=1, learning_rate=1e-1))
    assert all(r["loss"] == 0 and r["distance"] == 0 for r in inverted.history)
    tuned = tune_around(bundle, dataset, inverted.pivot, TuneConfig(steps=3, batch_size=2, history_every=1))
    assert all(r["loss"] == 0 for r in tuned.history) and all(v.abs().max() == 0 for k, v in tuned.lora.items() if "lora_up" in k)
