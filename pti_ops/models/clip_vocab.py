"""A real CLIP byte-level BPE tokenizer over a small vocabulary generated from a word list.

The layout is OpenAI CLIP's (`simple_tokenizer.py`): the 256 byte symbols, the same with the
end-of-word marker `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>`.
So every string still tokenizes (unknown words fall back to smaller pieces), and the words of
the list become single tokens. Used by the tiny test model and the toy world.
"""

import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _word_symbols(word: str) -> list[str]:
    chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + END_OF_WORD]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks) + 1), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank > len(ranks):
            break
        best = next(p for p in zip(symbols, symbols[1:]) if ranks.get(p) == rank)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges that make each word of `words` a single token.

    Args:
        words (`list[str]`): lowercase words without spaces; order fixes the token ids.

    Returns:
        `(vocab, merges)`: `vocab` maps token string to id, `merges` are `"left right"` strings
        in priority order, as in CLIP's `vocab.json` / `merges.txt`.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        if not word or word != word.lower() or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary word {word!r} must be lowercase, non-empty and without spaces")
    # A merge learned for one word ("o n</w>" for "on") can split another ("illustrati" + "on</w>"),
    # so each pass appends, at lowest priority, the merges that join what the previous merges left.
    for _ in range(64):
        ranks = {pair: i for i, pair in enumerate(merges)}
        added = False
        for word in words:
            pieces = _apply_merges(_word_symbols(word), ranks)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    added = True
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
        if not added:
            break
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + ["".join(p) for p in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


def write_clip_vocab(folder: str | Path, words: list[str]) -> None:
    """Write `vocab.json` and `merges.txt` for `words` (see `build_bpe`) into `folder`."""
    vocab, merges = build_bpe(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_clip_tokenizer(words: list[str], model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose vocabulary is generated from `words` (see `build_bpe`).

    Built through `from_pretrained` on the written files: the one path transformers 4.x and 5.x share.
    `pad_token` is the end token, as CLIP-L pads; SDXL's second tokenizer pads with `!` (id 0).
    """
    with tempfile.TemporaryDirectory() as folder:
        write_clip_vocab(folder, words)
        return CLIPTokenizer.from_pretrained(
            folder,
            unk_token=EOS_TOKEN,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=pad_token,
            model_max_length=model_max_length,
        )
