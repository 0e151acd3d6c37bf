"""PivotalDatasetFromFolder and PivotalDatasetFromImages."""

import pytest
import torch
from comfy_stubs import comfy_env, nodes, run_node, run_node_with_ui  # noqa: F401  (fixtures)

from example_images import write_example_images


@pytest.fixture
def character(comfy_env):
    """A folder of 3 drawn images under the stub ComfyUI input folder; yields its name there."""
    folder = comfy_env[1].folders["input"] / "character"
    for path in folder.glob("*") if folder.exists() else ():
        path.unlink()
    write_example_images(folder, count=3, size=64)
    return folder


def load(nodes, folder, **overrides):
    inputs = dict(folder=folder, resolution=64, flip=False, caption_source="template", on_bad_image="error")
    inputs.update(overrides)
    return run_node(nodes["PivotalDatasetFromFolder"], **inputs)[0]


def test_folder_relative_to_the_input_folder_or_absolute(nodes, character):
    relative = load(nodes, "character")
    absolute = load(nodes, str(character))
    assert relative.images.shape == (3, 3, 64, 64) and relative.images.dtype == torch.uint8
    assert torch.equal(relative.images, absolute.images) and relative.names == absolute.names


def test_caption_files(nodes, character):
    for path in sorted(character.glob("*.png")):
        path.with_suffix(".txt").write_text("a drawing of {} with a hat")
    dataset = load(nodes, "character", caption_source="files", flip=True)
    assert dataset.captions == ["a drawing of {} with a hat"] * 3 and dataset.flip


def test_is_changed_follows_the_folder_content(nodes, character):
    node = nodes["PivotalDatasetFromFolder"]
    first = node.IS_CHANGED(folder="character", resolution=64)
    assert node.IS_CHANGED(folder="character", resolution=64) == first
    image = sorted(character.glob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    assert node.IS_CHANGED(folder="character", resolution=64) != first


def test_validate_inputs_names_the_problem(nodes, character, comfy_env):
    node = nodes["PivotalDatasetFromFolder"]
    assert node.VALIDATE_INPUTS(folder="character") is True
    assert "does not exist" in node.VALIDATE_INPUTS(folder="nowhere")
    (comfy_env[1].folders["input"] / "empty").mkdir(exist_ok=True)
    assert "contains no .png" in node.VALIDATE_INPUTS(folder="empty")


def test_dataset_from_an_image_batch(nodes):
    images = torch.rand(2, 48, 40, 3)
    dataset = run_node(nodes["PivotalDatasetFromImages"], images=images, resolution=32, flip=False, captions="")
    assert dataset[0].images.shape == (2, 3, 32, 32) and dataset[0].captions == [None, None]
    captioned = run_node(
        nodes["PivotalDatasetFromImages"], images=images, resolution=32, flip=True, captions="a photo of {}\n\na toy {}\n"
    )[0]
    assert captioned.captions == ["a photo of {}", "a toy {}"] and captioned.flip


def test_caption_count_must_match_the_batch(nodes):
    with pytest.raises(ValueError, match="`captions` has 1 line"):
        run_node(nodes["PivotalDatasetFromImages"], images=torch.rand(2, 32, 32, 3), resolution=32, flip=False, captions="a {}")


def test_a_skipped_image_is_reported_on_the_node_on_every_run(nodes, character, comfy_env, caplog):
    """on_bad_image = skip: the warning is on the node (its text and UI output) and in the log, every run."""
    state = comfy_env[1]
    (character / "broken.png").write_bytes(b"not an image")
    inputs = dict(folder="character", resolution=64, flip=False, caption_source="template", on_bad_image="skip")
    with caplog.at_level("WARNING"):
        for run in range(2):
            (dataset,), ui = run_node_with_ui(nodes["PivotalDatasetFromFolder"], unique_id="7", **inputs)
            assert len(dataset) == 3 and "broken.png" in ui["text"][0] and "1 warning(s)" in ui["text"][0]
            assert state.node_texts[-1][0] == "7" and "skipped 1 unreadable image(s)" in state.node_texts[-1][1]
    assert sum("broken.png" in record.getMessage() for record in caplog.records) == 2
    (character / "broken.png").unlink()


def test_a_clean_folder_returns_plain_outputs(nodes, character):
    outputs, ui = run_node_with_ui(nodes["PivotalDatasetFromFolder"], folder="character", resolution=64, flip=False,
                                   caption_source="template", on_bad_image="error")  # fmt: skip
    assert ui is None and len(outputs) == 1


NEW_OPTIONS = ["buckets", "mask_from", "mask_floor", "shuffle_tags", "keep_tokens", "caption_dropout"]


def test_buckets_masks_and_tags_are_optional_inputs_after_the_old_ones(nodes):
    folder = nodes["PivotalDatasetFromFolder"].INPUT_TYPES()
    images = nodes["PivotalDatasetFromImages"].INPUT_TYPES()
    assert list(folder["optional"]) == NEW_OPTIONS  # workflows store widgets by position: appended, never inserted
    assert list(images["optional"]) == ["mask", *[n for n in NEW_OPTIONS if n != "mask_from"]]
    assert images["optional"]["mask"][0] == "MASK"


def test_the_folder_node_loads_buckets_alpha_masks_and_tag_options(nodes, comfy_env):
    from example_images import write_shaped_images

    folder = comfy_env[1].folders["input"] / "shaped"
    write_shaped_images(folder, [(64, 64), (80, 48)], alpha_left=True)
    dataset = load(nodes, "shaped", buckets=True, mask_from="alpha", mask_floor=0.2, shuffle_tags=True, keep_tokens=2,
                   caption_dropout=0.1)
    assert dataset.bucketed and [dataset.image_size(i) for i in range(2)] == [(64, 64), (48, 80)]
    assert dataset.masks[1][0, :, :38].max() == 0 and dataset.masks[1][0, :, 42:].min() == 255
    assert dataset.mask_floor == 0.2 and dataset.tag_captions.shuffle_tags and dataset.tag_captions.keep_tokens == 2
    plain = load(nodes, "shaped")
    assert not plain.bucketed and plain.masks is None and not plain.tag_captions.active


def test_the_images_node_takes_a_mask_batch(nodes):
    images = torch.rand(2, 48, 80, 3)
    mask = torch.zeros(2, 48, 80)
    mask[:, :, 40:] = 1.0
    dataset = run_node(nodes["PivotalDatasetFromImages"], images=images, resolution=64, flip=False, captions="1girl\nred hair",
                       mask=mask, buckets=True, mask_floor=0.1)[0]
    assert dataset.image_size(0) == (48, 80) and dataset.masks[0][0, :, :38].max() == 0 and dataset.mask_floor == 0.1
    assert dataset.captions == ["1girl", "red hair"]  # tag lines without {}: the placeholder is prepended in training
    with pytest.raises(ValueError, match=r"`mask` has shape \(1, 48, 80\) but the images are \(2, 48, 80\)"):
        run_node(nodes["PivotalDatasetFromImages"], images=images, resolution=64, flip=False, captions="", mask=mask[:1])
