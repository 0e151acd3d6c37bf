"""The placeholder token: adding it to a tokenizer and text encoder, and training only its rows.

A placeholder (`tok1`) is one new token, or `num_vectors` new tokens `tok1_0 … tok1_{N-1}` that
prompts write as the single word `tok1` (expanded before tokenizing). Its embedding rows start
from an initializer word. Training never touches the embedding matrix: a `SplicedEmbedding`
takes the placeholder rows from a small trainable tensor during the lookup (as peft's
`trainable_tokens` does), so the optimiser's cost does not grow with the vocabulary and every
other row stays bit-identical by construction.
"""

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Iterator

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import InvalidInputError, TokenizerError

MAX_VECTORS = 16
_PLACEHOLDER_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

# Where a prompt template puts the placeholder, and the templates every face defaults to.
PLACEHOLDER_SLOT = "{}"
DEFAULT_TEMPLATES: tuple[str, ...] = ("an anime illustration of {}",)


def fill_placeholder(template: str, word: str) -> str:
    """`template` with every `{}` replaced by `word` (plain replace, so other braces are left alone)."""
    return template.replace(PLACEHOLDER_SLOT, word)


def caption_with_placeholder(caption: str, word: str) -> str:
    """A training caption with the placeholder in it: `{}` filled, as is if it holds `word`, else `word` prepended.

    Prepended as the first comma-separated tag (`"tok1, 1girl, red hair"`), where tag shuffling keeps it
    with `keep_tokens` 1 (`tag_captions.py`).
    """
    if PLACEHOLDER_SLOT in caption:
        return fill_placeholder(caption, word)
    if re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", caption):
        return caption
    return f"{word}, {caption}"


def check_templates(templates, what: str = "templates") -> list[str]:
    """The templates as a list of stripped prompts, each with `{}` where the placeholder goes."""
    if isinstance(templates, str):  # one template given as text (JSON, a node's text box)
        templates = [templates]
    if not isinstance(templates, (list, tuple)):
        raise InvalidInputError(f"`{what}` must be a non-empty list of prompt templates, got {templates!r}.")
    checked = [t.strip() for t in templates if isinstance(t, str) and t.strip()]
    if len(checked) != len(templates) or not checked:
        raise InvalidInputError(
            f"`{what}` must be a non-empty list of prompt templates such as '{DEFAULT_TEMPLATES[0]}', got {list(templates)!r}."
        )
    for template in checked:
        if PLACEHOLDER_SLOT not in template:
            raise InvalidInputError(f"`{what}`: template {template!r} has no '{{}}': it must contain {{}} where the placeholder goes.")
    return checked


@dataclass(frozen=True)
class PlaceholderToken:
    """A placeholder added to a tokenizer.

    Args:
        placeholder (`str`): the word prompts use, e.g. `"tok1"`.
        token_strings (`tuple[str, ...]`): the tokens added: `("tok1",)` or `("tok1_0", "tok1_1", …)`.
        token_ids (`tuple[int, ...]`): their ids, in order.
        initializer (`str`): the word the rows were initialised from.
    """

    placeholder: str
    token_strings: tuple[str, ...]
    token_ids: tuple[int, ...]
    initializer: str

    @property
    def num_vectors(self) -> int:
        return len(self.token_ids)

    def fill(self, template: str) -> str:
        """The prompt the tokenizer sees for `template`: `{}` replaced by the placeholder, then expanded."""
        return self.expand(fill_placeholder(template, self.placeholder))

    def expand(self, text: str) -> str:
        """`text` with each whole-word occurrence of the placeholder replaced by its token strings."""
        if self.num_vectors == 1:
            return text
        return re.sub(rf"(?<![\w]){re.escape(self.placeholder)}(?![\w])", " ".join(self.token_strings), text)


def _check_placeholder_name(placeholder: str, tokenizer: CLIPTokenizer, num_vectors: int) -> tuple[str, ...]:
    if not isinstance(placeholder, str) or not _PLACEHOLDER_PATTERN.match(placeholder):
        raise InvalidInputError(
            f"placeholder {placeholder!r} must be one lowercase word of letters, digits and '_', starting "
            "with a letter (CLIP lowercases prompts), e.g. `tok1` or `sks_character`."
        )
    if not 1 <= num_vectors <= MAX_VECTORS:
        raise InvalidInputError(f"`num_vectors` must be between 1 and {MAX_VECTORS}, got {num_vectors}.")
    strings = (placeholder,) if num_vectors == 1 else tuple(f"{placeholder}_{i}" for i in range(num_vectors))
    vocab = tokenizer.get_vocab()
    for s in (placeholder,) + strings:
        if s in vocab or s + "</w>" in vocab:
            raise TokenizerError(
                f"The tokenizer already contains the token {s!r}. Please pass a different placeholder "
                "that is not already in the tokenizer (for example `tok1` or `sks_character`)."
            )
    return strings


def initializer_ids(tokenizer: CLIPTokenizer, initializer: str, num_vectors: int) -> list[int]:
    """Token ids of the initializer word(s), one per placeholder vector (a single id is repeated)."""
    if not isinstance(initializer, str) or not initializer.strip():
        raise InvalidInputError("`initializer` is empty: give a class word such as `character`.")
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids * num_vectors
    if len(ids) != num_vectors:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TokenizerError(
            f"initializer {initializer!r} is {len(ids)} tokens ({' '.join(pieces)}) but {num_vectors} "
            f"vector(s) were asked: use a single-token word, or set `num_vectors` to {len(ids)}."
        )
    return ids


def add_placeholder(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    placeholder: str,
    initializer: str,
    num_vectors: int = 1,
    vectors: torch.Tensor | None = None,
) -> PlaceholderToken:
    """Add `placeholder` to the tokenizer and text encoder, rows set from `initializer` (or `vectors`).

    Everything is checked before the tokenizer or the embedding matrix is modified.

    Args:
        placeholder (`str`): new word for prompts, e.g. `"tok1"`.
        initializer (`str`): class word whose embedding rows initialise the placeholder.
        num_vectors (`int`): number of embedding vectors (tokens) the placeholder stands for.
        vectors (`torch.Tensor`, *optional*): `[num_vectors, dim]` rows to use instead of the
            initializer's (loading a trained embedding).
    """
    embeddings = text_encoder.get_input_embeddings()
    if vectors is not None:
        vectors = torch.as_tensor(vectors)
        num_vectors = vectors.shape[0] if vectors.ndim == 2 else -1
        if vectors.ndim != 2 or vectors.shape[1] != embeddings.weight.shape[1]:
            raise InvalidInputError(
                f"embedding of shape {tuple(vectors.shape)} does not fit this text encoder, which expects "
                f"[n_vectors, {embeddings.weight.shape[1]}]: the file was made for another model family."
            )
    strings = _check_placeholder_name(placeholder, tokenizer, num_vectors)
    init_ids = initializer_ids(tokenizer, initializer, num_vectors)

    # 1. Add the tokens and check that each is one token and the expanded word gives exactly them.
    tokenizer.add_tokens(list(strings))
    token_ids = tuple(tokenizer.convert_tokens_to_ids(list(strings)))
    token = PlaceholderToken(placeholder, strings, token_ids, initializer)
    got = tuple(tokenizer(token.expand(placeholder), add_special_tokens=False).input_ids)
    if got != token_ids:
        raise TokenizerError(
            f"placeholder {placeholder!r} tokenizes as {tokenizer.convert_ids_to_tokens(list(got))} "
            f"after being added, not as the new token(s) {list(strings)}: choose another placeholder."
        )
    # 2. Grow the embedding matrix and set the new rows.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        rows = weight[list(init_ids)].clone() if vectors is None else vectors.to(weight)
        weight[list(token_ids)] = rows
    return token


def add_placeholders(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel],
    placeholder: str,
    initializer: str,
    num_vectors: int = 1,
    vectors: Sequence[torch.Tensor] | None = None,
) -> tuple[PlaceholderToken, ...]:
    """`add_placeholder` on every encoder of a family (SDXL: CLIP-L and bigG), the same token strings in each.

    Each encoder's rows start from the initializer in its own vocabulary (or from its entry of
    `vectors`). The name, the initializer and the vectors' widths are checked against every
    tokenizer and encoder before any is modified. The ids may differ between tokenizers.

    Args:
        tokenizers (`Sequence[CLIPTokenizer]`): in family order (`bundle.tokenizers`).
        text_encoders (`Sequence[CLIPTextModel]`): in the same order (`bundle.text_encoders`).
        vectors (`Sequence[torch.Tensor]`, *optional*): `[num_vectors, dim]` per encoder.
    """
    if vectors is not None:
        vectors = [torch.as_tensor(v) for v in vectors]
        if len(vectors) != len(text_encoders) or len({v.shape[0] if v.ndim == 2 else -1 for v in vectors}) != 1:
            raise InvalidInputError(f"give one [num_vectors, dim] tensor per text encoder ({len(text_encoders)}), "
                                    f"all with the same num_vectors; got shapes {[tuple(v.shape) for v in vectors]}.")
        num_vectors = vectors[0].shape[0]
        for v, encoder in zip(vectors, text_encoders):
            width = encoder.get_input_embeddings().weight.shape[1]
            if v.shape[1] != width:
                raise InvalidInputError(f"embedding of shape {tuple(v.shape)} does not fit a text encoder that expects "
                                        f"[n_vectors, {width}]: the file was made for another model family.")
    for tokenizer in tokenizers:  # check all before adding to any
        _check_placeholder_name(placeholder, tokenizer, num_vectors)
        initializer_ids(tokenizer, initializer, num_vectors)
    return tuple(
        add_placeholder(tokenizer, encoder, placeholder, initializer, num_vectors, None if vectors is None else vectors[i])
        for i, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders))
    )


def placeholder_in_tokenizers(tokenizers: Sequence[CLIPTokenizer], token: PlaceholderToken) -> tuple[PlaceholderToken, ...]:
    """`token` (from any one of them) as each tokenizer holds it, in order: same strings, that tokenizer's ids.

    Raises `TokenizerError` when a tokenizer lacks one of its token strings.
    """
    found = []
    for tokenizer in tokenizers:
        added = tokenizer.get_added_vocab()
        if not all(s in added for s in token.token_strings):
            raise TokenizerError(
                f"placeholder {token.placeholder!r} is not in this model's tokenizer(s): run the inversion first or "
                "load its embedding into the model (`Pivot.apply`)."
            )
        found.append(PlaceholderToken(token.placeholder, token.token_strings,
                                      tuple(added[s] for s in token.token_strings), token.initializer))
    return tuple(found)


def placeholder_vectors(text_encoder: CLIPTextModel, token: PlaceholderToken) -> torch.Tensor:
    """The placeholder's current embedding rows, `[num_vectors, dim]`, as a float32 copy."""
    weight = text_encoder.get_input_embeddings().weight
    return weight[list(token.token_ids)].detach().float().clone()


class TrainableVectors(nn.Module):
    """The placeholder vectors being optimised, `[num_vectors, dim]`.

    With `fixed_norm`, only directions are learned: each vector is `fixed_norm · raw/‖raw‖`.
    """

    def __init__(self, init: torch.Tensor, fixed_norm: float | None = None):
        super().__init__()
        self.raw = nn.Parameter(init.detach().clone().float())
        self.fixed_norm = fixed_norm

    def forward(self) -> torch.Tensor:
        if self.fixed_norm is None:
            return self.raw
        return self.raw * (self.fixed_norm / self.raw.norm(dim=-1, keepdim=True))


class SplicedEmbedding(nn.Module):
    """An embedding lookup whose placeholder rows come from a `TrainableVectors` module."""

    def __init__(self, base: nn.Embedding, token_ids: tuple[int, ...], vectors: TrainableVectors):
        super().__init__()
        self.base = base
        self.vectors = vectors
        self.register_buffer("token_ids", torch.tensor(token_ids, device=base.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (b, t, dim); detached so no gradient ever reaches the shared embedding matrix
        frozen = nn.functional.embedding(input_ids, self.base.weight.detach())
        match = input_ids.unsqueeze(-1) == self.token_ids  # (b, t, n_vectors)
        # One-hot matmul picks each position's trainable vector and carries the gradient to it.
        spliced = match.to(frozen.dtype) @ self.vectors().to(frozen.dtype)
        return torch.where(match.any(-1, keepdim=True), spliced, frozen)


@contextmanager
def spliced_placeholder(text_encoder: CLIPTextModel, token: PlaceholderToken, vectors: TrainableVectors) -> Iterator[SplicedEmbedding]:
    """Train `vectors` as the placeholder's rows; on exit write them into the embedding matrix.

    The text encoder's own lookup is restored on exit, also after an exception (cancel).
    """
    base = text_encoder.get_input_embeddings()
    spliced = SplicedEmbedding(base, token.token_ids, vectors)
    text_encoder.set_input_embeddings(spliced)
    try:
        yield spliced
    finally:
        text_encoder.set_input_embeddings(base)
        with torch.no_grad():
            base.weight[list(token.token_ids)] = vectors().detach().to(base.weight)


@contextmanager
def spliced_placeholders(text_encoders: Sequence[CLIPTextModel], tokens: Sequence[PlaceholderToken],
                         vectors: Sequence[TrainableVectors]) -> Iterator[tuple[SplicedEmbedding, ...]]:
    """`spliced_placeholder` on every encoder at once (one token and one `TrainableVectors` each)."""
    with ExitStack() as stack:
        yield tuple(stack.enter_context(spliced_placeholder(e, t, v)) for e, t, v in zip(text_encoders, tokens, vectors))
