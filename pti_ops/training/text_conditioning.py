"""Prompts to the per-token conditioning the UNet consumes.

`clip_skip` counts layers A1111-style (ComfyUI's `CLIPSetLastLayer` -1/-2): 1 is the last layer,
2 the penultimate; the final LayerNorm is applied in every case, as A1111 and ComfyUI do for SD1.
"""

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import InvalidInputError


def text_transformer(text_encoder: CLIPTextModel) -> torch.nn.Module:
    """The module holding `final_layer_norm` (`text_model` in transformers 4.x, the model itself in 5.x)."""
    return getattr(text_encoder, "text_model", text_encoder)


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids `[len(texts), model_max_length]`, padded and truncated as SD1.5 does."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Per-token conditioning `[batch, tokens, dim]` of `input_ids` (gradients flow if enabled)."""
    if clip_skip < 1:
        raise InvalidInputError(f"`clip_skip` must be 1 (last layer) or more, got {clip_skip}.")
    input_ids = input_ids.to(text_encoder.device)
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    # hidden_states[-1] is the last layer before the final LayerNorm.
    return text_transformer(text_encoder).final_layer_norm(out.hidden_states[-clip_skip])


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """`tokenize` then `encode_tokens`, without gradients."""
    with torch.no_grad():
        return encode_tokens(text_encoder, tokenize(tokenizer, prompts), clip_skip)
