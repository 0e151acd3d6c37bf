"""Training prompts against CLIP's 77-token window: a placeholder cut off is refused, a long prompt warned about."""

import pytest
import torch
from helpers import warns_user

from pti_ops.dataset import ImageDataset
from pti_ops.errors import DatasetError
from pti_ops.placeholder import add_placeholder
from pti_ops.training.batches import build_caption_table
from pti_ops.user_warnings import collect_warnings


def dataset(captions):
    names = [f"img{i}.png" for i in range(len(captions))]
    return ImageDataset(torch.zeros(len(captions), 3, 8, 8, dtype=torch.uint8), names, captions)


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_a_placeholder_past_the_77_token_window_is_refused_naming_the_image(tiny_bundle, num_vectors):
    token = add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "tok1", "character", num_vectors=num_vectors)
    # CLIP keeps 75 tokens between its start and end tokens: 74 words + the placeholder's first token.
    edge = "word " * 74 + "{}"
    with pytest.raises(DatasetError, match=r"\(of img1.png\) puts the placeholder after CLIP's 77-token limit"):
        build_caption_table(dataset(["a {}", "word " * 80 + "{}"]), ["a {}"], token, tiny_bundle.tokenizer)
    if num_vectors == 2:  # the second of its tokens is cut: refused too
        with pytest.raises(DatasetError, match="puts the placeholder after"):
            build_caption_table(dataset([edge + " x"]), ["a {}"], token, tiny_bundle.tokenizer)


def test_a_long_prompt_with_the_placeholder_inside_the_window_is_kept_with_a_warning(tiny_bundle):
    token = add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "tok1", "character")
    with warns_user(r"1 training prompt\(s\) are longer than CLIP's 77 tokens and are cut there .*img0.png"):
        table = build_caption_table(dataset(["{} " + "word " * 200]), ["a {}"], token, tiny_bundle.tokenizer)
    assert token.token_ids[0] in table.input_ids[0].tolist()
    with collect_warnings() as collected:
        build_caption_table(dataset(["a picture of {}"]), ["a {}"], token, tiny_bundle.tokenizer)
    assert collected == []
