"""Booru-style tag captions (pti_ops/tag_captions.py): shuffling, keep_tokens, caption dropout, the placeholder
prepended, and prompts made per draw in both loops."""

import dataclasses

import pytest
import torch

from pti_ops.dataset import DatasetConfig, dataset_from_tensor
from pti_ops.errors import InvalidInputError
from pti_ops.inversion import InversionConfig, invert
from pti_ops.lora_tune import TuneConfig, run_tuning, tune_around
from pti_ops.models import load_bundle
from pti_ops.placeholder import add_placeholder, caption_with_placeholder
from pti_ops.tag_captions import TagCaptions, split_tags
from pti_ops.training import batches as batches_module
from pti_ops.training.batches import BatchSampler, build_caption_table

CAPTION = "tok1, 1girl, red hair, blue hat, smile, outdoors, looking at viewer"


def _draws(tags: TagCaptions, seed: int, count: int, caption: str = CAPTION) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [tags.apply(caption, generator) for _ in range(count)]


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_shuffling_keeps_the_first_n_tags_and_every_tag(keep):
    original = split_tags(CAPTION)
    draws = _draws(TagCaptions(shuffle_tags=True, keep_tokens=keep), seed=0, count=50)
    for prompt in draws:
        tags = split_tags(prompt)
        assert tags[:keep] == original[:keep] and sorted(tags) == sorted(original)
    assert len({tuple(split_tags(p)[keep:]) for p in draws}) > 10  # the rest really moves


def test_the_dropout_rate_holds_over_many_draws():
    draws = _draws(TagCaptions(caption_dropout=0.3), seed=0, count=4000)
    dropped = sum(prompt == "" for prompt in draws) / len(draws)
    assert abs(dropped - 0.3) < 0.03  # 4 standard deviations of the binomial
    assert set(draws) == {"", CAPTION}  # without shuffling, a caption that is not dropped is left as it is


def test_draws_are_fixed_by_the_seed():
    tags = TagCaptions(shuffle_tags=True, caption_dropout=0.2)
    assert _draws(tags, 0, 30) == _draws(tags, 0, 30) and _draws(tags, 0, 30) != _draws(tags, 1, 30)


def test_off_by_default_and_bad_values_are_named():
    assert not DatasetConfig().tag_captions().active
    assert _draws(TagCaptions(), 0, 3) == [CAPTION] * 3
    with pytest.raises(InvalidInputError, match="`keep_tokens` must be a whole number of at least 0, got -1"):
        DatasetConfig(keep_tokens=-1)
    with pytest.raises(InvalidInputError, match="`caption_dropout` must be between 0.0 and 1.0, got 2"):
        DatasetConfig(caption_dropout=2)
    with pytest.raises(InvalidInputError, match="`caption_dropout` must be below 1"):
        DatasetConfig(caption_dropout=1.0)


def test_the_placeholder_goes_where_the_slot_is_or_first():
    assert caption_with_placeholder("1girl, {}, red hair", "tok1") == "1girl, tok1, red hair"
    assert caption_with_placeholder("tok1, 1girl", "tok1") == "tok1, 1girl"
    assert caption_with_placeholder("1girl, red hair", "tok1") == "tok1, 1girl, red hair"
    assert caption_with_placeholder("a tok10 and a cat", "tok1") == "tok1, a tok10 and a cat"


def _tagged_dataset(**options):
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    captions = ["1girl, red hair, blue hat, smile", "1girl, red hair, sitting, indoors"]
    return dataset_from_tensor(images, captions=captions, config=DatasetConfig(resolution=32, **options))


def test_each_draw_tokenizes_its_own_shuffled_prompt():
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    dataset = _tagged_dataset(shuffle_tags=True, keep_tokens=1)
    table = build_caption_table(dataset, ["a photo of {}"], token, bundle.tokenizer)
    assert table.prompts == ["tok1, 1girl, red hair, blue hat, smile", "tok1, 1girl, red hair, sitting, indoors"]
    assert table.varies
    sampler = BatchSampler(2, 2, 1, table, torch.Generator().manual_seed(0))
    latents = type("Latents", (), {"sample": lambda self, i, v, g: torch.zeros(len(i), 4, 16, 16)})()
    rows = {tuple(row.tolist()) for _ in range(20) for row in sampler.next_batch(latents).input_ids}
    placeholder_id = bundle.tokenizer.convert_tokens_to_ids("tok1")
    assert len(rows) > 4 and all(row[1] == placeholder_id for row in rows)  # shuffled, the token kept first


def test_both_loops_encode_the_changed_prompts_every_step(monkeypatch):
    seen = []
    tokenize = batches_module.tokenize
    monkeypatch.setattr(batches_module, "tokenize", lambda t, texts: seen.append(list(texts)) or tokenize(t, texts))
    dataset = _tagged_dataset(shuffle_tags=True, caption_dropout=0.3)
    bundle = load_bundle("tiny-sdxl")
    inverted = invert(bundle, dataset, InversionConfig(steps=4, batch_size=2, history_every=2))
    seen_in_inversion = len(seen)
    tuned = tune_around(bundle, dataset, inverted.pivot, TuneConfig(steps=4, batch_size=2, history_every=2))
    drawn = [prompt for texts in seen for prompt in texts]
    assert seen_in_inversion > 2 and len(seen) > seen_in_inversion + 2  # tokenized per step, in both loops
    assert "" in drawn and len(set(drawn)) > 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in tuned.history)


def test_fixed_captions_are_encoded_once_as_before(monkeypatch):
    seen = []
    tokenize = batches_module.tokenize
    monkeypatch.setattr(batches_module, "tokenize", lambda t, texts: seen.append(list(texts)) or tokenize(t, texts))
    bundle = load_bundle("tiny")
    invert(bundle, _tagged_dataset(), InversionConfig(steps=4, batch_size=2, history_every=2))
    assert len(seen) == 1  # the caption table, once


def test_offloading_the_text_encoders_needs_fixed_captions():
    bundle = load_bundle("tiny")
    token = add_placeholder(bundle.tokenizer, bundle.text_encoder, "tok1", "character")
    dataset = dataclasses.replace(_tagged_dataset(), tag_captions=TagCaptions(shuffle_tags=True))
    with pytest.raises(InvalidInputError, match="`offload_text_encoders` needs the training prompts encoded once, but "
                                                "the dataset's `shuffle_tags` or `caption_dropout`"):
        run_tuning(bundle, dataset, token, TuneConfig(steps=2, offload_text_encoders=True))
