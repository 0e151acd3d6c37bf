"""Training batches: which images, which view (mirrored or not) and which caption, each step.

Captions are tokenized once: the distinct prompts (templates × placeholder, per-image captions)
are a small fixed set, so each step only indexes into a pre-built id tensor. With tag shuffling or
caption dropout (`dataset.tag_captions`) every draw makes a new prompt, tokenized for its batch.
With aspect-ratio buckets every batch is drawn from one bucket (`bucket_batches.py`).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import CLIPTokenizer

from ..models.conditioning import add_time_ids
from ..dataset import ImageDataset
from ..errors import DatasetError, InvalidInputError
from ..tag_captions import TagCaptions
from .bucket_batches import bucket_epoch
from .latent_cache import LatentCache
from ..placeholder import PLACEHOLDER_SLOT, PlaceholderToken, caption_with_placeholder, check_templates, fill_placeholder
from .text_conditioning import tokenize
from ..user_warnings import warn_user

@dataclass
class CaptionTable:
    """Token ids of the distinct training prompts and, per image, which of them it may use.

    Args:
        prompts (`list[str]`): the distinct prompts, placeholder written in.
        input_ids (`torch.Tensor`): `[len(prompts), max_length]`, from the first tokenizer.
        choices (`list[list[int]]`): for each image, indices into `prompts`.
        ids_per_encoder (`tuple[torch.Tensor, ...]`): the ids from each tokenizer, in family order
            (its first is `input_ids`); `(input_ids,)` when not given.
        tags (`TagCaptions`): how a drawn prompt changes (tag shuffling, caption dropout); off by default.
        tokenizers (`tuple[CLIPTokenizer, ...]`): tokenize the changed prompts (needed when `tags` is active).
        token (`PlaceholderToken`, *optional*): expands the placeholder in the changed prompts.
    """

    prompts: list[str]
    input_ids: torch.Tensor
    choices: list[list[int]]
    ids_per_encoder: tuple[torch.Tensor, ...] = field(default=())
    tags: TagCaptions = field(default_factory=TagCaptions)
    tokenizers: tuple[CLIPTokenizer, ...] = ()
    token: PlaceholderToken | None = None

    def __post_init__(self):
        if not self.ids_per_encoder:
            self.ids_per_encoder = (self.input_ids,)

    @property
    def varies(self) -> bool:
        """Whether prompts change between draws, so they cannot be encoded once for the run."""
        return self.tags.active

    def ids_of(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Token ids per encoder of the prompts `rows`, each changed by `tags` for this draw."""
        if not self.varies:
            return tuple(table[rows] for table in self.ids_per_encoder)
        prompts = [self.token.expand(self.tags.apply(self.prompts[row], generator)) for row in rows]
        return tuple(tokenize(t, prompts) for t in self.tokenizers)


@dataclass
class TrainingBatch:
    """One micro-batch: latents, caption ids per encoder, and which images and views it holds.

    Args:
        latents (`torch.Tensor`): `[b, C, h, w]`.
        ids_per_encoder (`tuple[torch.Tensor, ...]`): `[b, max_length]` per tokenizer, in family order.
        indices (`torch.Tensor`): `[b]` image indices into the dataset.
        views (`torch.Tensor`): `[b]` view of each (0 = as is, 1 = mirrored).
    """

    latents: torch.Tensor
    ids_per_encoder: tuple[torch.Tensor, ...]
    indices: torch.Tensor
    views: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """The first tokenizer's ids (SD1.5's only ones)."""
        return self.ids_per_encoder[0]


def build_caption_table(
    dataset: ImageDataset, templates: list[str], token: PlaceholderToken, tokenizer: CLIPTokenizer | Sequence[CLIPTokenizer]
) -> CaptionTable:
    """Tokenize every distinct training prompt once, with one tokenizer or each of a family's (SDXL: two).

    The placeholder's token strings are the same in every tokenizer (`add_placeholders`), so the
    prompts are expanded once with `token`. A caption goes in with `{}` filled, as is when it holds
    the placeholder, else with the placeholder prepended (`caption_with_placeholder`); the dataset's
    `tag_captions` go into the table.
    """
    tokenizers = tuple(tokenizer) if isinstance(tokenizer, (list, tuple)) else (tokenizer,)
    templates = check_templates(templates)
    prompts: list[str] = []
    index: dict[str, int] = {}

    def add(prompt: str) -> int:
        if prompt not in index:
            index[prompt] = len(prompts)
            prompts.append(prompt)
        return index[prompt]

    choices, prepended = [], []
    for name, caption in zip(dataset.names, dataset.captions):
        if caption is None:
            choices.append([add(fill_placeholder(t, token.placeholder)) for t in templates])
            continue
        prompt = caption_with_placeholder(caption, token.placeholder)
        if PLACEHOLDER_SLOT not in caption and prompt == f"{token.placeholder}, {caption}":  # it went in front
            prepended.append(name)
        choices.append([add(prompt)])
    if prepended:
        shown = ", ".join(prepended[:5]) + (" …" if len(prepended) > 5 else "")
        warn_user(f"{len(prepended)} caption(s) hold neither {{}} nor the token {token.placeholder!r}; it was put in "
                  f"front of them as the first tag (\"{token.placeholder}, …\"): {shown}.")
    expanded = [token.expand(p) for p in prompts]
    ids = tuple(tokenize(t, expanded) for t in tokenizers)
    _check_placeholder_kept(prompts, expanded, ids[0], token, tokenizers[0], _users(choices, dataset.names))
    return CaptionTable(prompts, ids[0], choices, ids, dataset.tag_captions, tokenizers, token)


def _users(choices: list[list[int]], names: list[str]) -> dict[int, list[str]]:
    """Prompt index → the images that train with it."""
    users: dict[int, list[str]] = {}
    for name, options in zip(names, choices):
        for i in options:
            users.setdefault(i, []).append(name)
    return users


def _check_placeholder_kept(prompts, expanded, ids: torch.Tensor, token: PlaceholderToken, tokenizer,
                            users: dict[int, list[str]]) -> None:  # fmt: skip
    """Raise for a prompt whose placeholder lies beyond the tokenizer's 77 tokens (cut off, it would not train);
    warn for one that is only cut."""
    wanted = set(token.token_ids)
    cut = []
    for i, (prompt, row) in enumerate(zip(prompts, ids)):
        images = ", ".join(users.get(i, [])[:3]) or "no image"
        if not wanted <= set(row.tolist()):
            raise DatasetError(
                f"the prompt {prompt[:80]!r}{'…' if len(prompt) > 80 else ''} (of {images}) puts the placeholder after CLIP's {ids.shape[1]}-token "
                "limit, where the prompt is cut, so it would not be trained on: shorten the caption or template, or "
                "put {} near its start."
            )
        if len(tokenizer(expanded[i], truncation=False).input_ids) > ids.shape[1]:
            cut.append(images)
    if cut:
        warn_user(f"{len(cut)} training prompt(s) are longer than CLIP's {ids.shape[1]} tokens and are cut there (the "
                  f"rest is not seen), for: {'; '.join(cut[:3])}")  # fmt: skip


def batch_time_ids(dataset: ImageDataset, indices: torch.Tensor, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """SDXL's `add_time_ids` `[b, 6]` of the batch's images: their recorded original size and crop, and the
    size trained at as target (the square, or the image's aspect-ratio bucket).

    A mirrored view keeps its image's ids, as diffusers' SDXL scripts (flip, then the same centre crop).
    """
    rows = indices.tolist()
    return add_time_ids([dataset.original_sizes[i] for i in rows], [dataset.crops_top_left[i] for i in rows],
                        [dataset.image_size(i) for i in rows], batch_size=len(rows), dtype=dtype, device=device)


class BatchSampler:
    """Draws micro-batches: images in shuffled epochs, random view and caption per sample.

    All randomness comes from one CPU `torch.Generator`, so a seed fixes the whole run. With `groups`
    (the images of each aspect-ratio bucket, when there are several) every batch holds images of one
    group (`bucket_epoch`), at most `batch_size` of them.
    """

    def __init__(self, num_images: int, batch_size: int, num_views: int, captions: CaptionTable, generator: torch.Generator,
                 groups: list[list[int]] | None = None):
        if batch_size < 1:
            raise InvalidInputError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.num_images = num_images
        self.batch_size = batch_size
        self.num_views = num_views
        self.captions = captions
        self.generator = generator
        self.groups = groups if groups is not None and len(groups) > 1 else None
        # What is left of this epoch: image indices, or with groups the batches (lists of indices).
        self._order: list = []

    def _next_indices(self) -> torch.Tensor:
        if self.groups is not None:
            if not self._order:
                self._order = bucket_epoch(self.groups, self.batch_size, self.generator)
            return torch.tensor(self._order.pop())
        picked = []
        while len(picked) < self.batch_size:
            if not self._order:
                self._order = torch.randperm(self.num_images, generator=self.generator).tolist()
            picked.append(self._order.pop())
        return torch.tensor(picked)

    def next(self, latents: LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`(latents [b, C, h, w], input_ids [b, max_length])` for the next micro-batch (first tokenizer's ids)."""
        batch = self.next_batch(latents)
        return batch.latents, batch.input_ids

    def next_batch(self, latents: LatentCache) -> TrainingBatch:
        """The next micro-batch with every tokenizer's ids and its images' indices (the same draws as `next`)."""
        indices = self._next_indices()
        views = torch.randint(0, self.num_views, (len(indices),), generator=self.generator)
        caption_rows = []
        for i in indices.tolist():
            options = self.captions.choices[i]
            pick = torch.randint(0, len(options), (1,), generator=self.generator).item() if len(options) > 1 else 0
            caption_rows.append(options[pick])
        ids = self.captions.ids_of(caption_rows, self.generator)
        return TrainingBatch(latents.sample(indices, views, self.generator), ids, indices, views)
