import numpy as np
import pytest
import torch
from PIL import Image

from pti_ops.dataset import DatasetConfig, dataset_from_tensor, load_image_folder
from pti_ops.errors import DatasetError, InvalidInputError
from example_images import write_animated, write_png_header
from helpers import warns_user


def _save(folder, name, image):
    folder.mkdir(exist_ok=True)
    image.save(folder / name)


def test_folder_images_are_resized_and_centre_cropped(tmp_path):
    wide = Image.new("RGB", (80, 40), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 40))  # blue strip on the left edge is cropped away
    _save(tmp_path, "a.png", wide)
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    assert data.images.shape == (1, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.images[0, 0].min() == 255 and data.images[0, 2].max() == 0
    assert data.names == ["a.png"] and data.captions == [None]
    assert data.pixels().min() >= -1 and data.pixels().max() <= 1


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("L", 128, (128, 128, 128)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # transparent -> white background
        ("RGBA", (0, 255, 0, 255), (0, 255, 0)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),
    ],
)
def test_image_modes_are_converted_to_rgb(tmp_path, mode, colour, expected):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    _save(tmp_path, "img" + suffix, Image.new(mode, (32, 32), colour))
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    pixel = tuple(data.images[0, :, 16, 16].tolist())
    assert np.allclose(pixel, expected, atol=2), pixel


def test_palette_image_with_transparency(tmp_path):
    image = Image.new("P", (32, 32), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    _save(tmp_path, "p.png", image)
    data = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    assert tuple(data.images[0, :, 0, 0].tolist()) == (255, 255, 255)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="contains no image"):
        load_image_folder(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_unreadable_image_stops_or_is_skipped(tmp_path, image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="could not be read as images: broken.png"):
        load_image_folder(image_folder, DatasetConfig(resolution=32))
    with warns_user("skipped 1 unreadable image.*training on the other 4: broken.png"):
        data = load_image_folder(image_folder, DatasetConfig(resolution=32, on_bad_image="skip"))
    assert len(data) == 4 and "broken.png" not in data.names
    assert len(data.warnings) == 1 and "broken.png" in data.warnings[0]


def test_skipped_images_are_reported_on_every_load_in_the_log(image_folder, caplog):
    """Not Python's once-per-place warning: the second load in the same process says it again (issue #16)."""
    (image_folder / "broken.png").write_bytes(b"garbage")
    config = DatasetConfig(resolution=32, on_bad_image="skip")
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert load_image_folder(image_folder, config).warnings
    assert [r.levelname for r in caplog.records if "broken.png" in r.getMessage()] == ["WARNING", "WARNING"]


def test_folder_with_only_unreadable_images_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="No usable image is left"):
        load_image_folder(tmp_path, DatasetConfig(on_bad_image="skip"))


def test_small_images_are_upscaled_with_a_warning(tmp_path):
    _save(tmp_path, "small.png", Image.new("RGB", (16, 16), (10, 20, 30)))
    with warns_user("smaller than the training resolution 32.*small.png 16x16"):
        data = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    assert data.images.shape[-1] == 32 and "upscaled" in data.warnings[0]
    with warns_user("1 image\\(s\\) are smaller than the training resolution 32.*image_0000 16x16"):
        data = dataset_from_tensor(torch.rand(1, 16, 16, 3), 32)
    assert data.warnings and not dataset_from_tensor(torch.rand(1, 32, 40, 3), 32).warnings


def test_caption_files(tmp_path, image_folder):
    first, second = sorted(image_folder.glob("*.png"))[:2]
    first.with_suffix(".txt").write_text("a drawing of {} on the beach\n")
    with pytest.raises(DatasetError, match="3 image\\(s\\) have no same-name .txt file"):
        load_image_folder(image_folder, DatasetConfig(resolution=32, caption_source="files"))
    data = load_image_folder(image_folder, DatasetConfig(resolution=32, caption_source="files_or_template"))
    assert data.captions[0] == "a drawing of {} on the beach" and data.captions[1:] == [None] * 3
    second.with_suffix(".txt").write_bytes(b"caf\xe9 {}")
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        load_image_folder(image_folder, DatasetConfig(resolution=32, caption_source="files_or_template"))
    second.with_suffix(".txt").write_text("  \n")
    with pytest.raises(DatasetError, match="is empty"):
        load_image_folder(image_folder, DatasetConfig(resolution=32, caption_source="files_or_template"))


def test_bad_config_values_are_named():
    with pytest.raises(InvalidInputError, match="`resolution` must be an integer"):
        DatasetConfig(resolution=0)
    with pytest.raises(InvalidInputError, match="`caption_source` must be one of"):
        DatasetConfig(caption_source="web")


def test_dataset_from_comfy_image_batch():
    batch = torch.zeros(2, 40, 60, 3)
    batch[..., 0] = 1.0
    data = dataset_from_tensor(batch, resolution=32, flip=True)
    assert data.images.shape == (2, 3, 32, 32) and data.flip
    assert data.images[:, 0].min() == 255 and data.images[:, 1:].max() == 0
    with pytest.raises(DatasetError, match="must be \\[N, H, W, 3\\]"):
        dataset_from_tensor(torch.zeros(3, 32, 32), 32)


# --- the sizes the loader accepts (limits.py) -------------------------------------------------------


@pytest.mark.parametrize("width, height, shown", [
    (10000, 10000, "10000x10000 px = 100 Mpx, above the limit of 64 Mpx"),  # under PIL's own error: our check
    (20000, 20000, "400 Mpx, above the limit of 64 Mpx"),  # PIL's DecompressionBombError at open
])  # fmt: skip
def test_an_image_above_the_pixel_limit_is_refused_or_skipped_before_decoding(image_folder, width, height, shown):
    write_png_header(image_folder / "huge.png", width, height)
    with pytest.raises(DatasetError, match=rf"1 image\(s\) in .* have a size the loader refuses: huge.png \({shown}\)\. "
                                           r"Fix or remove them, or set `on_bad_image` to skip"):
        load_image_folder(image_folder, DatasetConfig(resolution=32))
    with warns_user(rf"skipped 1 image\(s\) of a refused size .*training on the other 4: huge.png \({shown}\)"):
        data = load_image_folder(image_folder, DatasetConfig(resolution=32, on_bad_image="skip"))
    assert len(data) == 4 and "huge.png" not in data.names


def test_an_image_just_under_the_pixel_limit_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("pti_ops.dataset.MAX_IMAGE_PIXELS", 64 * 48)  # the same rule at a size a test can decode
    _save(tmp_path, "at_limit.png", Image.new("RGB", (64, 48)))
    assert len(load_image_folder(tmp_path, DatasetConfig(resolution=32))) == 1
    _save(tmp_path, "over.png", Image.new("RGB", (65, 48)))
    with pytest.raises(DatasetError, match="over.png"):
        load_image_folder(tmp_path, DatasetConfig(resolution=32))


def test_an_image_too_small_to_upscale_is_refused_and_the_smallest_accepted_is_upscaled(tmp_path, image_folder):
    _save(image_folder, "one.png", Image.new("RGB", (1, 1), (255, 0, 0)))
    with pytest.raises(DatasetError, match=r"one.png \(1x1 px, shorter side under 8 px = the training resolution 32 / 4: "
                                           r"too small to upscale\)"):
        load_image_folder(image_folder, DatasetConfig(resolution=32))
    with warns_user("skipped 1 image.*of a refused size.*one.png"):
        assert len(load_image_folder(image_folder, DatasetConfig(resolution=32, on_bad_image="skip"))) == 4
    only = tmp_path / "only"
    _save(only, "seven.png", Image.new("RGB", (7, 40)))
    with pytest.raises(DatasetError, match="seven.png.*No usable image is left"):
        load_image_folder(only, DatasetConfig(resolution=32, on_bad_image="skip"))
    (only / "seven.png").unlink()
    _save(only, "eight.png", Image.new("RGB", (8, 40)))
    with warns_user("upscaled.*eight.png 8x40"):
        assert len(load_image_folder(only, DatasetConfig(resolution=32))) == 1


def test_a_batch_too_small_to_upscale_is_refused():
    with pytest.raises(DatasetError, match=r"the images are 1x1 px: their shorter side is under 8 px \(`resolution` 32"):
        dataset_from_tensor(torch.rand(2, 1, 1, 3), 32)


@pytest.mark.parametrize("suffix", [".webp", ".png"])
def test_an_animated_image_gives_its_first_frame_with_a_warning(tmp_path, suffix):
    write_animated(tmp_path / f"moving{suffix}")
    with warns_user(rf"1 animated image\(s\) in .*only the first frame of each is trained on: moving{suffix} \(2 frames\)"):
        data = load_image_folder(tmp_path, DatasetConfig(resolution=32))
    red = data.images[0].float().mean(dim=(1, 2))
    assert red[0] > 250 and red[1] < 5 and red[2] < 5  # the first frame (red), not the second (green)
    assert any("animated" in message for message in data.warnings)
