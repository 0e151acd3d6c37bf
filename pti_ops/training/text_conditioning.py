"""Prompts to the conditioning the UNet consumes.

Tokenizing is here; how token ids become conditioning is the model family's rule
(`ModelFamily.encode_tokens` per encoder, `ModelFamily.encode_conditioning` for the whole
`Conditioning`; SD1.5's and SDXL's, with their `clip_skip`, are in `models/families/`).

Two levels of entry point:
- per encoder, SD1.5's signatures: `tokenize(tokenizer, texts)`, `encode_tokens(text_encoder, ids, clip_skip)`,
  `encode_prompts(tokenizer, text_encoder, prompts, clip_skip)` → a `[b, 77, dim]` tensor;
- per bundle, any family: `tokenize_per_encoder(bundle, texts)` → one id tensor per encoder,
  `encode_ids(bundle, ids, clip_skip)` and `encode_conditioning(bundle, prompts, clip_skip)` → `Conditioning`
  (for SD1.5 its `hidden` is exactly what `encode_tokens` gives).
"""

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..models import DEFAULT_FAMILY, Conditioning, ModelBundle, ModelFamily, text_transformer

__all__ = ["encode_conditioning", "encode_ids", "encode_prompts", "encode_tokens", "text_transformer", "tokenize", "tokenize_per_encoder"]


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids `[len(texts), model_max_length]`, padded (with the tokenizer's pad token) and truncated as SD1.5 and SDXL do."""
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


def tokenize_per_encoder(bundle: ModelBundle, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """Token ids `[len(texts), 77]` from each of the bundle's tokenizers, in family order (SDXL: CLIP-L's, bigG's)."""
    return tuple(tokenize(tokenizer, texts) for tokenizer in bundle.tokenizers)


def encode_ids(bundle: ModelBundle, input_ids: Sequence[torch.Tensor], clip_skip: int | None = None) -> Conditioning:
    """The `Conditioning` of one id tensor per encoder (gradients flow if enabled).

    Args:
        bundle (`ModelBundle`): gives the encoders and the family's rule.
        input_ids (`Sequence[torch.Tensor]`): `[b, 77]` per encoder, as `tokenize_per_encoder` gives.
        clip_skip (`int`, *optional*): layer from the end, as ComfyUI's `CLIPSetLastLayer` -n; the
            family's default (`family.default_clip_skip`: SD1.5 1, SDXL 2) when None.
    """
    clip_skip = bundle.family.default_clip_skip if clip_skip is None else clip_skip
    return bundle.family.encode_conditioning(bundle.text_encoders, tuple(input_ids), clip_skip)


def encode_conditioning(bundle: ModelBundle, prompts: list[str], clip_skip: int | None = None) -> Conditioning:
    """`tokenize_per_encoder` then `encode_ids`, without gradients."""
    with torch.no_grad():
        return encode_ids(bundle, tokenize_per_encoder(bundle, prompts), clip_skip)
