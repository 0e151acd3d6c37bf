"""Textual inversion on SDXL (tiny-sdxl): both encoders trained together, files with clip_l and clip_g."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from example_images import draw_character
from pti_ops.dataset import DatasetConfig, ImageDataset, load_image_folder
from pti_ops.inversion import InversionConfig, invert
from pti_ops.models import load_bundle
from pti_ops.pivot import Pivot
from pti_ops.training.batches import BatchSampler, batch_time_ids, build_caption_table
from pti_ops.training.latent_cache import encode_latents

RESOLUTION = 32
SIZES = ((48, 64), (40, 40))  # (height, width) of the images written: two different sizes


@pytest.fixture
def xl_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (height, width) in enumerate(SIZES * 2):
        square = draw_character(max(height, width), (0.5, 0.55), 0.25 + 0.03 * i)
        square.resize((width, height), Image.Resampling.LANCZOS).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture
def xl_dataset(xl_images):
    return load_image_folder(xl_images, DatasetConfig(resolution=RESOLUTION))


def _config(**overrides):
    settings = dict(steps=6, learning_rate=0.01, history_every=3, seed=0)
    return InversionConfig(**{**settings, **overrides})


def test_dataset_records_each_image_original_size_and_crop(xl_dataset):
    assert xl_dataset.original_sizes == [SIZES[0], SIZES[1]] * 2
    # 48x64 (h, w) → 32x43 resized: crop left (43 - 32) // 2 = 5; the square one is not cropped
    assert xl_dataset.crops_top_left == [(0, 5), (0, 0)] * 2


def test_time_ids_of_a_batch_are_its_images_sizes_and_crops(xl_dataset):
    bundle = load_bundle("tiny-sdxl")
    from pti_ops.placeholder import add_placeholders

    token = add_placeholders(bundle.tokenizers, bundle.text_encoders, "tok1", "character")[0]
    captions = build_caption_table(xl_dataset, ["a photo of {}"], token, list(bundle.tokenizers))
    assert len(captions.ids_per_encoder) == 2
    latents = encode_latents(bundle.vae, xl_dataset)
    sampler = BatchSampler(len(xl_dataset), 3, latents.num_views, captions, torch.Generator().manual_seed(0))
    batch = sampler.next_batch(latents)
    ids = batch_time_ids(xl_dataset, batch.indices)
    for row, index in zip(ids.tolist(), batch.indices.tolist()):
        assert row == [*xl_dataset.original_sizes[index], *xl_dataset.crops_top_left[index], RESOLUTION, RESOLUTION]
    assert {tuple(r[:2]) for r in ids.tolist()} <= {(48.0, 64.0), (40.0, 40.0)}


def test_loss_decreases_on_a_fixed_batch(xl_dataset):
    bundle = load_bundle("tiny-sdxl")
    one = ImageDataset(xl_dataset.images[:1], xl_dataset.names[:1], original_sizes=xl_dataset.original_sizes[:1],
                       crops_top_left=xl_dataset.crops_top_left[:1])
    result = invert(bundle, one, _config(steps=40, learning_rate=0.05, history_every=20, timestep_range=(400, 401)))
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0]


def test_only_the_placeholder_rows_change_in_both_encoders(xl_dataset):
    bundle = load_bundle("tiny-sdxl")
    before = [e.get_input_embeddings().weight.detach().clone() for e in bundle.text_encoders]
    result = invert(bundle, xl_dataset, _config())
    assert len(result.tokens) == 2
    for token, encoder, old, key in zip(result.tokens, bundle.text_encoders, before, ("clip_l", "clip_g")):
        weight = encoder.get_input_embeddings().weight.detach()
        ids = list(token.token_ids)
        assert torch.equal(weight[: old.shape[0]], old)  # every original row bit-identical
        assert weight.shape[0] == old.shape[0] + 1
        assert not torch.equal(weight[ids].float(), result.initial_by_key[key])
        assert torch.equal(weight[ids].float(), result.pivot.vectors_by_key[key])
    assert result.pivot.vectors.shape == (1, 32) and result.pivot.extra_vectors["clip_g"].shape == (1, 64)


def test_vectors_start_from_the_class_word_in_each_vocabulary(xl_dataset):
    bundle = load_bundle("tiny-sdxl")
    rows = [e.get_input_embeddings().weight[t("character", add_special_tokens=False).input_ids].detach().float()
            for e, t in zip(bundle.text_encoders, bundle.tokenizers)]
    result = invert(bundle, xl_dataset, _config(steps=1, history_every=1))
    assert torch.equal(result.initial_by_key["clip_l"], rows[0]) and torch.equal(result.initial_vectors, rows[0])
    assert torch.equal(result.initial_by_key["clip_g"], rows[1])


def test_history_is_recorded_per_encoder(xl_dataset):
    result = invert(load_bundle("tiny-sdxl"), xl_dataset, _config())
    record = result.history[-1]
    for key in ("clip_l", "clip_g"):
        expected = (result.pivot.vectors_by_key[key].double() - result.initial_by_key[key].double()).norm().item()
        assert record[f"{key}_distance"] == pytest.approx(expected, rel=1e-6)
        assert len(record[f"{key}_nearest"]) == 1 and len(record[f"{key}_nearest"][0]) == 3
        assert f"{key}_norm" in record and f"{key}_cosine" in record
    assert record["distance"] == record["clip_l_distance"] and record["nearest"] == record["clip_l_nearest"]
    assert set(result.vocabulary_norms) == {"clip_l", "clip_g"}


def test_fixed_norm_holds_each_encoder_at_its_own_vocabulary_mean(xl_dataset):
    result = invert(load_bundle("tiny-sdxl"), xl_dataset, _config(norm_mode="fixed"))
    for key, vectors in result.pivot.vectors_by_key.items():
        assert vectors.norm(dim=-1).item() == pytest.approx(result.vocabulary_norms[key], rel=1e-4)
    assert result.vocabulary_norms["clip_l"] != pytest.approx(result.vocabulary_norms["clip_g"])


def test_same_seed_gives_bit_identical_vectors(xl_dataset):
    a = invert(load_bundle("tiny-sdxl"), xl_dataset, _config()).pivot
    b = invert(load_bundle("tiny-sdxl"), xl_dataset, _config()).pivot
    assert all(torch.equal(a.vectors_by_key[k], b.vectors_by_key[k]) for k in ("clip_l", "clip_g"))


def test_saved_file_has_both_keys_and_loads_back_bit_exactly(tmp_path, xl_dataset):
    result = invert(load_bundle("tiny-sdxl"), xl_dataset, _config(num_vectors=2))
    path = result.save(tmp_path / "tok1.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.get_tensor("clip_l").shape == (2, 32) and f.get_tensor("clip_g").shape == (2, 64)
        assert f.get_tensor("clip_l").dtype == f.get_tensor("clip_g").dtype == torch.float32
        meta = f.metadata()
    assert meta["model_family"] == "sdxl" and meta["placeholder"] == "tok1" and meta["num_vectors"] == "2"
    fresh = load_bundle("tiny-sdxl")
    loaded = Pivot.load(path, fresh)
    for key in ("clip_l", "clip_g"):
        assert torch.equal(loaded.vectors_by_key[key], result.pivot.vectors_by_key[key])
    tokens = loaded.apply_all(fresh)
    for token, encoder, key in zip(tokens, fresh.text_encoders, ("clip_l", "clip_g")):
        assert torch.equal(encoder.get_input_embeddings().weight[list(token.token_ids)].detach(), loaded.vectors_by_key[key])
    loaded.extra_vectors["clip_g"] = loaded.extra_vectors["clip_g"] + 1  # refreshed in place when present
    loaded.apply(fresh)
    assert torch.equal(fresh.text_encoder_2.get_input_embeddings().weight[list(tokens[1].token_ids)].detach(),
                       loaded.extra_vectors["clip_g"])


def test_diffusers_sdxl_pipeline_loads_the_trained_file_per_encoder(tmp_path, xl_dataset):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    result = invert(load_bundle("tiny-sdxl"), xl_dataset, _config())
    path = result.save(tmp_path / "tok1.safetensors")
    bundle = load_bundle("tiny-sdxl")
    pipe = StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
        tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=bundle.noise_scheduler,
    )  # fmt: skip
    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token="tok1", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="tok1", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(pipe.maybe_convert_prompt("a tok1", tokenizer), add_special_tokens=False).input_ids[1:]
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), result.pivot.vectors_by_key[key])


def test_clip_skip_default_is_the_family_default():
    assert InversionConfig().clip_skip is None
    from pti_ops.training.text_conditioning import encode_conditioning

    bundle = load_bundle("tiny-sdxl")
    assert bundle.family.default_clip_skip == 2
    assert torch.equal(encode_conditioning(bundle, ["a"]).hidden, encode_conditioning(bundle, ["a"], clip_skip=2).hidden)


def test_cli_inverts_an_sdxl_model_and_writes_both_keys(tmp_path, xl_images):
    from pti_ops.cli import main

    out = tmp_path / "tok1.safetensors"
    args = ["invert", "--model", "tiny-sdxl", "--images", str(xl_images), "--token", "tok1", "--init-word", "character",
            "--steps", "3", "--lr", "0.01", "--out", str(out)]
    assert main(args) == 0
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()["model_family"] == "sdxl"


def test_training_uses_the_recorded_sizes_and_the_family_clip_skip(xl_dataset):
    """The time ids reach the UNet (other recorded sizes train other vectors); no `clip_skip` = SDXL's 2."""
    base = invert(load_bundle("tiny-sdxl"), xl_dataset, _config()).pivot.vectors_by_key["clip_g"]
    other = ImageDataset(xl_dataset.images, xl_dataset.names, original_sizes=[(1024, 1024)] * len(xl_dataset))
    moved = invert(load_bundle("tiny-sdxl"), other, _config()).pivot.vectors_by_key["clip_g"]
    assert not torch.equal(base, moved)
    penultimate = invert(load_bundle("tiny-sdxl"), xl_dataset, _config(clip_skip=2)).pivot.vectors_by_key["clip_g"]
    last = invert(load_bundle("tiny-sdxl"), xl_dataset, _config(clip_skip=1)).pivot.vectors_by_key["clip_g"]
    assert torch.equal(base, penultimate) and not torch.equal(base, last)


def test_an_exploding_norm_stops_at_the_last_good_vectors_of_both_encoders(xl_dataset):
    from pti_ops.errors import TrainingStopped

    bundle = load_bundle("tiny-sdxl")
    with pytest.raises(TrainingStopped, match="norm reached .* over 1.5 times the vocabulary's mean norm") as info:
        invert(bundle, xl_dataset, _config(steps=300, learning_rate=0.05, history_every=2, max_norm_ratio=1.5))
    partial = info.value.partial
    for key, encoder in zip(("clip_l", "clip_g"), bundle.text_encoders):
        vectors = partial.pivot.vectors_by_key[key]
        assert vectors.norm(dim=-1).max().item() <= 1.5 * partial.vocabulary_norms[key]
        assert torch.equal(vectors, encoder.get_input_embeddings().weight[-1:].detach())
