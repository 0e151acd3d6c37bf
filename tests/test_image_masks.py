"""Loss masks of training images (pti_ops/image_masks.py): alpha channels, NAME_mask.png files, MASK batches."""

import pytest
import torch
from PIL import Image

from example_images import write_example_images, write_shaped_images
from helpers import warns_user
from pti_ops.dataset import DatasetConfig, dataset_from_tensor, load_image_folder
from pti_ops.errors import DatasetError, InvalidInputError


def test_no_masks_by_default_and_alpha_is_still_composited_on_white(tmp_path):
    write_shaped_images(tmp_path, [(32, 32)], alpha_left=True)
    plain = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    masked = load_image_folder(tmp_path, DatasetConfig(resolution=32, mask_from="alpha"))
    assert plain.masks is None and plain.mask_pixels() is None
    assert torch.equal(plain.images, masked.images) and plain.images[0, :, :, :16].min() == 255  # white background
    mask = masked.masks[0, 0]
    assert masked.masks.shape == (1, 1, 32, 32) and masked.masks.dtype == torch.uint8
    assert mask[:, :16].max() == 0 and mask[:, 16:].min() == 255


def test_a_mask_goes_through_its_images_bucket_resize_and_crop(tmp_path):
    write_shaped_images(tmp_path, [(100, 60)], alpha_left=True)
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32, buckets=True, mask_from="alpha"))
    assert data.masks[0].shape == (1, 24, 40) == (1, *data.image_size(0))
    column = data.masks[0][0].float().mean(dim=0)
    assert column[:19].max() == 0 and column[21:].min() == 255  # the left half, bilinear at its edge


def test_mask_files_beside_the_images(tmp_path):
    write_example_images(tmp_path, count=3, size=40)
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (20, 0, 40, 40))
    mask.save(tmp_path / "character_00_mask.png")
    mask.convert("RGB").save(tmp_path / "character_01_mask.png")  # RGB masks read as grey levels
    with warns_user(r"1 of 3 image\(s\) have no NAME_mask.png file, so the whole image counts in their loss: character_02.png"):
        data = load_image_folder(tmp_path, DatasetConfig(resolution=32, mask_from="files"))
    assert data.names == ["character_00.png", "character_01.png", "character_02.png"]  # masks are not training images
    for i in (0, 1):
        assert data.masks[i, 0, :, :15].max() == 0 and data.masks[i, 0, :, 17:].min() == 255
    assert data.masks[2].min() == 255
    unmasked = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    assert len(unmasked) == 5  # without mask_from files, a NAME_mask.png is an image like any other (as before)


def test_a_mask_file_of_the_wrong_size_or_unreadable_is_named(tmp_path):
    write_example_images(tmp_path, count=1, size=40)
    Image.new("L", (32, 40), 255).save(tmp_path / "character_00_mask.png")
    with pytest.raises(DatasetError, match=r"mask file .*character_00_mask.png is 32x40 but its image is 40x40"):
        load_image_folder(tmp_path, DatasetConfig(resolution=32, mask_from="files"))
    (tmp_path / "character_00_mask.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"mask file .*character_00_mask.png could not be read as an image"):
        load_image_folder(tmp_path, DatasetConfig(resolution=32, mask_from="files"))


def test_images_without_an_alpha_channel_are_named(tmp_path):
    write_example_images(tmp_path, count=2, size=32)
    with warns_user(r"2 of 2 image\(s\) have no alpha channel"):
        data = load_image_folder(tmp_path, DatasetConfig(resolution=32, mask_from="alpha"))
    assert data.masks.min() == 255


def test_a_comfyui_mask_batch():
    images = torch.rand(2, 40, 40, 3)
    masks = torch.zeros(2, 40, 40)
    masks[:, :, 20:] = 1.0
    data = dataset_from_tensor(images, 32, masks=masks)
    assert data.masks.shape == (2, 1, 32, 32)
    assert data.masks[:, 0, :, :15].max() == 0 and data.masks[:, 0, :, 17:].min() == 255
    with pytest.raises(DatasetError, match=r"`mask` has shape \(1, 40, 40\) but the images are \(2, 40, 40\)"):
        dataset_from_tensor(images, 32, masks=masks[:1])


def test_bad_mask_settings_are_named():
    with pytest.raises(InvalidInputError, match="`mask_from` must be one of none, alpha, files; got 'depth'"):
        DatasetConfig(mask_from="depth")
    with pytest.raises(InvalidInputError, match="`mask_floor` must be between 0.0 and 1.0, got 1.5"):
        DatasetConfig(mask_floor=1.5)
