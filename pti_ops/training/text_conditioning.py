"""Prompts to the per-token conditioning the UNet consumes.

Tokenizing is here; how token ids become conditioning is the model family's rule
(`ModelFamily.encode_tokens`; SD1.5's, with its `clip_skip`, is in `models/families/`).
"""

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..models import DEFAULT_FAMILY, ModelFamily, text_transformer

__all__ = ["encode_prompts", "encode_tokens", "text_transformer", "tokenize"]


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids `[len(texts), model_max_length]`, padded and truncated as SD1.5 does."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_tokens(
    text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1, family: ModelFamily = DEFAULT_FAMILY
) -> torch.Tensor:
    """Per-token conditioning `[batch, tokens, dim]` of `input_ids` by `family`'s rule (gradients flow if enabled)."""
    return family.encode_tokens(text_encoder, input_ids, clip_skip)


def encode_prompts(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompts: list[str],
    clip_skip: int = 1,
    family: ModelFamily = DEFAULT_FAMILY,
) -> torch.Tensor:
    """`tokenize` then `encode_tokens`, without gradients."""
    with torch.no_grad():
        return encode_tokens(text_encoder, tokenize(tokenizer, prompts), clip_skip, family)
