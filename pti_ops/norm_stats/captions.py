"""Captions for norm statistics: reading them, tokenizing them, and finding the position to read."""

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InvalidInputError
from .spaces import EOS, PER_TOKEN_SPACES, first_eos
from ..training.text_conditioning import tokenize
from ..user_warnings import warn_user


def load_captions(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[str]]:
    """Captions, blank ones skipped, and where each came from (`FILE line N` or `caption N`).

    A file is read as UTF-8 (a leading byte-order mark is allowed); bytes that are not UTF-8 are
    an error naming the file and line, rather than decoded with replacement characters, because
    a mangled word tokenizes into different tokens and silently changes the statistics.

    Args:
        source (`str`, `Path` or `list[str]`): a text file with one caption per line (a `str` is
            always a path), or the captions themselves.
    """
    if isinstance(source, (str, os.PathLike)):
        texts, labels = _read_caption_file(Path(source))
        where = f"captions file {source}"
    else:
        if not all(isinstance(text, str) for text in source):
            raise InvalidInputError("captions must be strings (one caption each).")
        kept = [(text.strip(), f"caption {i}") for i, text in enumerate(source, start=1) if text.strip()]
        texts, labels = [t for t, _ in kept], [label for _, label in kept]
        where = "the caption list"
    if not texts:
        raise InvalidInputError(f"{where} has no captions (empty, or only blank lines): give at least 2 captions.")
    return texts, labels


def _read_caption_file(path: Path) -> tuple[list[str], list[str]]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidInputError(f"captions file {path} cannot be read: {err.strerror or err}.") from err
    texts, labels = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInputError(
                f"captions file {path} line {number} is not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                f"byte {err.start + 1} of the line): save the file as UTF-8 and try again."
            ) from err
        text = text.removeprefix("\ufeff").strip() if number == 1 else text.strip()
        if text:
            texts.append(text)
            labels.append(f"{path.name} line {number}")
    return texts, labels


def tokenize_captions(tokenizer, texts: list[str], labels: list[str]) -> torch.Tensor:
    """Token ids `[n, max_length]`, truncated as the UNet's conditioning is, with a warning."""
    max_length = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]
    too_long = [label for label, n in zip(labels, lengths) if n > max_length]
    if too_long:
        warn_user(
            f"{len(too_long)} caption(s) are longer than the model's {max_length} tokens and were truncated, "
            f"as the UNet's conditioning would be (first: {too_long[0]})."
        )
    return tokenize(tokenizer, texts)


def caption_positions(tokenizer, ids: torch.Tensor, labels: list[str], position, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption: the token index to read, and whether the caption is kept.

    Args:
        tokenizer (`CLIPTokenizer`): the model's tokenizer.
        ids (`torch.Tensor`): token ids `[n, max_length]`.
        labels (`list[str]`): where each caption came from (for warnings).
        position (`int` or `str`): token index, `"eos"` or a word located per caption.
        space (`str`): EOS-only spaces read row 0 of their single-row output.
    """
    n, length = ids.shape
    keep = torch.ones(n, dtype=torch.bool)
    if space not in PER_TOKEN_SPACES:
        return torch.zeros(n, dtype=torch.long), keep  # one EOS row per caption
    eos = first_eos(ids, tokenizer.eos_token_id)
    if position == EOS:
        return eos, keep
    if isinstance(position, int):
        return _index_positions(eos, position, length), keep
    return _word_positions(tokenizer, ids, labels, position)


def _index_positions(eos: torch.Tensor, position: int, length: int) -> torch.Tensor:
    if position >= length:
        raise InvalidInputError(f"`position` {position} is beyond the model's {length} tokens (0..{length - 1}).")
    ended = int((eos <= position).sum())
    if ended:
        warn_user(
            f"{ended} caption(s) end before position {position}: their vector there "
            "is the end token's or padding's (as the UNet sees it)."
        )
    return torch.full((eos.shape[0],), position, dtype=torch.long)


def _word_positions(tokenizer, ids: torch.Tensor, labels: list[str], word_text: str) -> tuple[torch.Tensor, torch.Tensor]:
    word = torch.tensor(tokenizer(word_text, add_special_tokens=False).input_ids)
    match = (ids.unfold(1, len(word), 1) == word).all(dim=-1)  # (n, windows): word starts here
    keep = match.any(dim=1)
    if not bool(keep.any()):
        raise InvalidInputError(f"no caption contains the word {word_text!r} given as `position`.")
    if not bool(keep.all()):
        first = labels[int((~keep).nonzero()[0])]
        warn_user(f"{int((~keep).sum())} caption(s) without {word_text!r} are left out (first: {first}).")
    return match.int().argmax(dim=1), keep
