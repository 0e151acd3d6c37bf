"""Training batches: which images, which view (mirrored or not) and which caption, each step.

Captions are tokenized once: the distinct prompts (templates × placeholder, per-image captions)
are a small fixed set, so each step only indexes into a pre-built id tensor.
"""

from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer

from ..dataset import ImageDataset
from ..errors import DatasetError, InvalidInputError
from .latent_cache import LatentCache
from ..placeholder import PLACEHOLDER_SLOT, PlaceholderToken, check_templates, fill_placeholder
from .text_conditioning import tokenize

@dataclass
class CaptionTable:
    """Token ids of the distinct training prompts and, per image, which of them it may use.

    Args:
        prompts (`list[str]`): the distinct prompts, placeholder written in.
        input_ids (`torch.Tensor`): `[len(prompts), max_length]`.
        choices (`list[list[int]]`): for each image, indices into `prompts`.
    """

    prompts: list[str]
    input_ids: torch.Tensor
    choices: list[list[int]]


def build_caption_table(dataset: ImageDataset, templates: list[str], token: PlaceholderToken, tokenizer: CLIPTokenizer) -> CaptionTable:
    """Tokenize every distinct training prompt once."""
    templates = check_templates(templates)
    prompts: list[str] = []
    index: dict[str, int] = {}

    def add(prompt: str) -> int:
        if prompt not in index:
            index[prompt] = len(prompts)
            prompts.append(prompt)
        return index[prompt]

    choices = []
    for name, caption in zip(dataset.names, dataset.captions):
        if caption is None:
            choices.append([add(fill_placeholder(t, token.placeholder)) for t in templates])
        elif PLACEHOLDER_SLOT in caption:
            choices.append([add(fill_placeholder(caption, token.placeholder))])
        elif token.placeholder in caption.split():
            choices.append([add(caption)])
        else:
            raise DatasetError(
                f"caption of {name} ({caption!r}) contains neither '{{}}' nor the placeholder {token.placeholder!r}: "
                "the placeholder must appear in every training caption."
            )
    return CaptionTable(prompts, tokenize(tokenizer, [token.expand(p) for p in prompts]), choices)


class BatchSampler:
    """Draws micro-batches: images in shuffled epochs, random view and caption per sample.

    All randomness comes from one CPU `torch.Generator`, so a seed fixes the whole run.
    """

    def __init__(self, num_images: int, batch_size: int, num_views: int, captions: CaptionTable, generator: torch.Generator):
        if batch_size < 1:
            raise InvalidInputError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.num_images = num_images
        self.batch_size = batch_size
        self.num_views = num_views
        self.captions = captions
        self.generator = generator
        self._order: list[int] = []

    def _next_indices(self) -> torch.Tensor:
        picked = []
        while len(picked) < self.batch_size:
            if not self._order:
                self._order = torch.randperm(self.num_images, generator=self.generator).tolist()
            picked.append(self._order.pop())
        return torch.tensor(picked)

    def next(self, latents: LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`(latents [b, C, h, w], input_ids [b, max_length])` for the next micro-batch."""
        indices = self._next_indices()
        views = torch.randint(0, self.num_views, (len(indices),), generator=self.generator)
        caption_rows = []
        for i in indices.tolist():
            options = self.captions.choices[i]
            pick = torch.randint(0, len(options), (1,), generator=self.generator).item() if len(options) > 1 else 0
            caption_rows.append(options[pick])
        return latents.sample(indices, views, self.generator), self.captions.input_ids[caption_rows]
