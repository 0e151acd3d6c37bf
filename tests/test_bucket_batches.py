"""Training on aspect-ratio buckets (pti_ops/training/bucket_batches.py): one-bucket batches, per-image
latents, SDXL time ids of each image's true size, both loops on both families."""

import logging

import pytest
import torch

from example_images import write_shaped_images
from pti_ops.dataset import DatasetConfig, load_image_folder
from pti_ops.errors import InvalidInputError
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, run_tuning, tune_around
from pti_ops.models import load_bundle
from pti_ops.placeholder import add_placeholder
from pti_ops.training.batches import BatchSampler, batch_time_ids, build_caption_table
from pti_ops.training.bucket_batches import bucket_epoch
from pti_ops.training.latent_cache import encode_latents

# (width, height): three 1:1, two 5:3, two 3:5 images
SIZES = [(96, 96), (64, 64), (48, 48), (100, 60), (90, 54), (60, 100), (54, 90)]


@pytest.fixture
def bucketed(tmp_path):
    write_shaped_images(tmp_path, SIZES)
    return load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True, flip=True))


def _sampler(bundle, dataset, seed=0, batch_size=2):
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    captions = build_caption_table(dataset, ["a photo of {}"], token, bundle.tokenizer)
    latents = encode_latents(bundle.vae, dataset)
    groups = dataset.groups()
    return BatchSampler(len(dataset), batch_size, latents.num_views, captions, torch.Generator().manual_seed(seed), groups), latents


def test_batches_never_mix_buckets_and_each_epoch_holds_every_image_once(bucketed):
    bundle = load_bundle("tiny")
    sampler, latents = _sampler(bundle, bucketed)
    group_of = {i: g for g, group in enumerate(bucketed.groups()) for i in group}
    batches_per_epoch = 2 + 1 + 1  # 3 square images in batches of 2, and 2 + 2 in the others
    for epoch in range(3):
        seen = []
        for _ in range(batches_per_epoch):
            batch = sampler.next_batch(latents)
            indices = batch.indices.tolist()
            assert len({group_of[i] for i in indices}) == 1
            height, width = bucketed.image_size(indices[0])
            assert batch.latents.shape == (len(indices), 4, height // 2, width // 2)  # each at its bucket's size
            seen += indices
        assert sorted(seen) == list(range(len(SIZES)))


def test_the_bucket_order_is_fixed_by_the_seed():
    groups = [[0, 1, 2], [3, 4], [5, 6]]

    def epochs(seed):
        generator = torch.Generator().manual_seed(seed)
        return [bucket_epoch(groups, 2, generator) for _ in range(3)]

    assert epochs(0) == epochs(0) and epochs(0) != epochs(1)


def test_sdxl_time_ids_carry_each_images_original_size_crop_and_bucket(bucketed):
    ids = batch_time_ids(bucketed, torch.arange(len(SIZES)))
    for row, (width, height), (top, left), i in zip(ids.tolist(), SIZES, bucketed.crops_top_left, range(len(SIZES))):
        assert row == [height, width, top, left, *bucketed.image_size(i)]
    assert ids[3].tolist()[4:] == [24, 40] and ids[5].tolist()[4:] == [40, 24]


def test_both_loops_train_sdxl_on_buckets_with_each_images_time_ids(bucketed, caplog):
    bundle = load_bundle("tiny-sdxl")
    seen = []

    def record(module, args, kwargs):
        latents, time_ids = args[0], kwargs["added_cond_kwargs"]["time_ids"]
        seen.append((tuple(latents.shape[-2:]), [tuple(row[4:]) for row in time_ids.tolist()],
                     [tuple(row[:2]) for row in time_ids.tolist()]))

    hook = bundle.unet.register_forward_pre_hook(record, with_kwargs=True)
    with caplog.at_level(logging.INFO, logger="pti_ops"):
        inverted = invert(bundle, bucketed, InversionConfig(steps=4, batch_size=2, history_every=2, learning_rate=1e-2))
        tuned = tune_around(bundle, bucketed, inverted.pivot, TuneConfig(steps=4, batch_size=2, history_every=2))
    hook.remove()
    originals = {(h, w) for w, h in SIZES}
    assert len({shape for shape, _, _ in seen}) >= 2  # several buckets reached the UNet
    for shape, targets, sizes in seen:
        assert all(target == (shape[0] * 2, shape[1] * 2) for target in targets)  # target = the latents' bucket
        assert set(sizes) <= originals
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in inverted.history + tuned.history)
    assert any(v.abs().sum() > 0 for k, v in tuned.lora.items() if "lora_up" in k)
    assert sum("3 aspect-ratio buckets (width x height): 32x32: 3 images" in m for m in caplog.messages) == 2


def test_sd15_lora_on_buckets_resumes_to_the_same_result(bucketed, tmp_path):
    config = TuneConfig(steps=6, batch_size=2, history_every=2, learning_rate=1e-3)

    def setup():
        bundle = load_bundle("tiny")
        return bundle, add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")

    bundle, token = setup()
    uninterrupted = run_tuning(bundle, bucketed, token, config)

    def cancel_at_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    bundle, token = setup()
    with pytest.raises(KeyboardInterrupt):
        run_tuning(bundle, bucketed, token, config, on_step=cancel_at_3, checkpoint=str(tmp_path / "c.ckpt"))
    bundle, token = setup()
    resumed = run_tuning(bundle, bucketed, token, config, resume_from=str(tmp_path / "c.ckpt"))
    assert all(torch.equal(resumed.lora[k], uninterrupted.lora[k]) for k in uninterrupted.lora)


def test_a_bucket_the_model_cannot_take_is_named_before_training(tmp_path):
    write_shaped_images(tmp_path, [(100, 60)])
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True, bucket_step=6))
    with pytest.raises(InvalidInputError, match=r"aspect-ratio bucket \d+x\d+ \(of shaped_00.png\) .* set `bucket_step` to a multiple of 4"):
        invert(load_bundle("tiny"), data, InversionConfig(steps=1))
