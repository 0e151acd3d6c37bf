"""Booru-style tag captions: comma-separated tags shuffled each step, and caption dropout (kohya's options).

`shuffle_tags` reorders the tags of a caption every time it is drawn, except the first
`keep_tokens` (where the placeholder goes: a caption without `{}` gets it prepended as the first
tag); `caption_dropout` replaces the whole caption by an empty prompt with that probability, as
kohya's `caption_dropout_rate` does. Both draw from the run's generator, so a seed fixes them.
"""

from dataclasses import dataclass

import torch

from .checks import check_number
from .errors import InvalidInputError

TAG_SEPARATOR = ","


@dataclass(frozen=True)
class TagCaptions:
    """How a caption changes each time it is drawn (the `DatasetConfig` fields of the same names).

    Args:
        shuffle_tags (`bool`): shuffle the comma-separated tags.
        keep_tokens (`int`): the first N tags stay in place.
        caption_dropout (`float`): probability of the empty prompt instead of the caption.
    """

    shuffle_tags: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.keep_tokens, int) or isinstance(self.keep_tokens, bool) or self.keep_tokens < 0:
            raise InvalidInputError(f"`keep_tokens` must be a whole number of at least 0, got {self.keep_tokens!r}.")
        if check_number("caption_dropout", self.caption_dropout, 0.0, 1.0) == 1.0:
            raise InvalidInputError(
                "`caption_dropout` must be below 1: at 1 no caption (and no placeholder) is ever trained on."
            )

    @property
    def active(self) -> bool:
        """Whether captions change between draws (then the prompts cannot be encoded once for the run)."""
        return self.shuffle_tags or self.caption_dropout > 0

    def apply(self, caption: str, generator: torch.Generator) -> str:
        """This draw's prompt of `caption`: `""` with probability `caption_dropout`, else its tags shuffled."""
        if self.caption_dropout > 0 and torch.rand((), generator=generator).item() < self.caption_dropout:
            return ""
        if not self.shuffle_tags:
            return caption
        return shuffle_tags(caption, self.keep_tokens, generator)


def split_tags(caption: str) -> list[str]:
    """The caption's comma-separated tags, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """`caption`'s tags with the first `keep_tokens` in place and the others in a random order."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return f"{TAG_SEPARATOR} ".join(kept + rest)
