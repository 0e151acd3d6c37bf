import json

from pti_ops.models.clip_vocab import build_bpe, make_clip_tokenizer, write_clip_vocab

WORDS = ["an", "anime", "illustration", "of", "on", "character", "drawing", "in"]


def test_every_word_is_one_token_and_unknown_words_still_tokenize():
    tokenizer = make_clip_tokenizer(WORDS)
    for word in WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    pieces = tokenizer.tokenize("zebra")
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "zebra"


def test_prompts_get_bos_eos_and_padding():
    tokenizer = make_clip_tokenizer(WORDS)
    ids = tokenizer("an anime illustration", padding="max_length", max_length=8).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[4] == tokenizer.eos_token_id and ids[5:] == [tokenizer.pad_token_id] * 3


def test_vocab_layout_matches_clip(tmp_path):
    vocab, merges = build_bpe(WORDS)
    # 256 byte symbols, 256 with </w>, one per merge, then the two special tokens.
    assert len(vocab) == 512 + len(merges) + 2
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    write_clip_vocab(tmp_path, WORDS)
    assert json.loads((tmp_path / "vocab.json").read_text()) == vocab
    assert (tmp_path / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"
