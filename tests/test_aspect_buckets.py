"""Aspect-ratio buckets (pti_ops/aspect_buckets.py) and loading images into them (dataset.py)."""

import pytest
import torch
from PIL import Image

from example_images import write_shaped_images
from pti_ops.aspect_buckets import bucket_sizes, default_bucket_step, describe_histogram, nearest_bucket
from pti_ops.dataset import DatasetConfig, dataset_from_tensor, load_image_folder
from pti_ops.errors import InvalidInputError
from pti_ops.metrics import dataset_images

# kohya-ss/sd-scripts library/model_util.py make_bucket_resolutions((512, 512), 256, 1024, 64), as (width, height),
# each with its transpose: what its `--enable_bucket` trains SD1.5 at by default.
KOHYA_512 = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
             (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]  # fmt: skip


def test_the_buckets_at_512_are_kohyas():
    expected = {(h, w) for w, h in KOHYA_512} | {(w, h) for w, h in KOHYA_512}
    assert set(bucket_sizes(512, 64)) == expected


@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (768, 64), (32, 8)])
def test_buckets_have_about_the_resolutions_area_in_whole_steps(resolution, step):
    buckets = bucket_sizes(resolution, step)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    for height, width in buckets:
        assert height % step == 0 and width % step == 0
        assert resolution // 2 <= min(height, width) and max(height, width) <= 2 * resolution
        assert 0.75 * area <= height * width <= area
        assert (width, height) in buckets


def test_the_nearest_bucket_is_by_aspect_ratio_and_symmetric():
    buckets = bucket_sizes(512, 64)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert nearest_bucket((600, 800), buckets) == (448, 576)  # 4:3 landscape
    assert nearest_bucket((800, 600), buckets) == (576, 448)  # the same turned portrait
    assert nearest_bucket((100, 1000), buckets) == (256, 1024)  # beyond the widest: the widest


@pytest.mark.parametrize("resolution, multiple, step", [(512, 64, 64), (1024, 32, 64), (256, 64, 64), (128, 8, 16),
                                                        (64, 4, 8), (32, 4, 8), (32, 8, 8), (128, 64, 64)])  # fmt: skip
def test_the_default_step_is_kohyas_64_and_shrinks_only_for_test_sizes(resolution, multiple, step):
    assert default_bucket_step(resolution, multiple) == step


def test_three_aspect_ratios_land_in_three_buckets_with_no_crop_beyond_the_rounding(tmp_path):
    sizes = [(96, 96), (100, 60), (60, 100), (90, 60)]  # (width, height): square, 5:3, 3:5, 3:2
    write_shaped_images(tmp_path, sizes)
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True))
    trained = [data.image_size(i) for i in range(len(data))]
    assert trained == [(32, 32), (24, 40), (40, 24), (24, 40)] and len(data.groups()) == 3
    assert data.original_sizes == [(h, w) for w, h in sizes]
    for (width, height), (bucket_h, bucket_w), crop in zip(sizes, trained, data.crops_top_left):
        scale = max(bucket_w / width, bucket_h / height)  # resized to cover the bucket, the excess centre-cropped
        expected = ((round(height * scale) - bucket_h) // 2, (round(width * scale) - bucket_w) // 2)
        assert crop == expected and 0 in crop
    assert data.crops_top_left[:3] == [(0, 0)] * 3  # aspect ratios a bucket has exactly: nothing cropped
    assert data.crops_top_left[3] == (1, 0)  # 3:2 in the 5:3 bucket: 3 rows of 27 over
    assert describe_histogram(trained) == ("3 aspect-ratio buckets (width x height): 40x24: 2 images, 32x32: 1 image, "
                                           "24x40: 1 image")  # fmt: skip


def test_a_bucketed_image_keeps_what_the_square_crop_cuts_away(tmp_path):
    wide = Image.new("RGB", (100, 60), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 60))  # a blue strip at the left edge
    wide.save(tmp_path / "wide.png")
    square = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    bucketed = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True))
    assert square.images[0, 2].max() == 0  # the centre square has no blue
    assert bucketed.images[0].shape == (3, 24, 40) and bucketed.images[0][2, :, 0].min() > 200


def test_buckets_are_off_by_default_and_a_bad_step_is_named(tmp_path):
    write_shaped_images(tmp_path, [(100, 60)])
    assert load_image_folder(tmp_path, DatasetConfig(resolution=32)).images.shape == (1, 3, 32, 32)
    with pytest.raises(InvalidInputError, match="`bucket_step` must be a whole number of pixels from 1 to the resolution 32"):
        DatasetConfig(resolution=32, buckets=True, bucket_step=0)
    steps = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True, bucket_step=4))
    assert steps.image_size(0) == (24, 40)


def test_an_image_batch_goes_into_its_bucket():
    images = torch.rand(2, 60, 100, 3, generator=torch.Generator().manual_seed(0))
    data = dataset_from_tensor(images, config=DatasetConfig(resolution=32, buckets=True))
    assert data.bucketed and [tuple(i.shape) for i in data.images] == [(3, 24, 40)] * 2
    assert data.original_sizes == [(60, 100)] * 2 and data.resolution == 32


def test_bucketed_images_are_compared_with_square_generations_as_square_crops(tmp_path):
    write_shaped_images(tmp_path, [(96, 96), (100, 60), (60, 100)])
    bucketed = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True))
    square = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    compared = dataset_images(bucketed, (32, 32))
    assert compared.shape == (3, 32, 32, 3)
    # the centre of each, as the square dataset's, within resampling differences
    assert (compared - dataset_images(square, (32, 32))).abs().mean() < 0.05
    with pytest.raises(InvalidInputError, match="need the `size`"):
        dataset_images(bucketed)
