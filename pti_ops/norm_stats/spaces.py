"""The spaces norm statistics measure, and how each is read from a CLIP text encoder.

Spaces (all fp32, the whole caption set in a few batched forward passes, no gradients):
- `hidden`: the per-token conditioning the UNet consumes, by the model family's rule
  (`ModelFamily.encode_tokens`): SD1.5 layer −`clip_skip` through the final LayerNorm; SDXL layer
  −`clip_skip` (default 2, the penultimate) as it is, without the final LayerNorm;
- `hidden_prenorm`: layer −`clip_skip` before the final LayerNorm (SDXL: the same as `hidden`);
- `hidden_postnorm`: layer −`clip_skip` through the final LayerNorm (SD1.5: the same as `hidden`;
  at `clip_skip` 1, transformers' `last_hidden_state`, the final hidden state);
- `pooled`: the final-layer EOS vector (after the final LayerNorm; `clip_skip` does not apply);
- `projected`: `pooled` through the text projection, the joint-space embedding the double-ellipsoid
  paper measured, and SDXL's pooled conditioning (bigG's `text_embeds`); only for encoders that
  have one (SD1.5's `CLIPTextModel` and SDXL's CLIP-L have none);
- `token_embedding`: the input embedding rows, the space textual inversion moves in.
"""

import copy
from typing import Literal, get_args

import torch

from ..errors import InvalidInputError
from ..models import DEFAULT_FAMILY, ModelFamily
from ..training.text_conditioning import encode_tokens, text_transformer

Space = Literal["hidden", "hidden_prenorm", "pooled", "projected", "token_embedding", "hidden_postnorm"]
SPACES: tuple[str, ...] = get_args(Space)
PER_TOKEN_SPACES = ("hidden", "hidden_prenorm", "token_embedding", "hidden_postnorm")
LAYER_SPACES = ("hidden", "hidden_prenorm", "hidden_postnorm")  # read at layer −clip_skip
# Read right after the final LayerNorm in every family; `hidden` too where the family applies it.
AFTER_NORM_SPACES = ("hidden", "pooled", "hidden_postnorm")
EOS = "eos"


def after_final_norm(space: str, family: ModelFamily = DEFAULT_FAMILY) -> bool:
    """Whether `space`'s vectors come right out of the final LayerNorm (their raw norms fixed by construction)."""
    if space == "hidden":
        return family.conditioning_final_norm
    return space in AFTER_NORM_SPACES


def first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first end token per row. Not `pooler_output`: with SD1.5's legacy
    `eos_token_id == 2` transformers takes the argmax id, which is an added placeholder token."""
    is_eos = ids == eos_id
    if not bool(is_eos.any(dim=1).all()):
        raise InvalidInputError(f"a tokenized prompt has no end token (id {eos_id}): the tokenizer does not match.")
    return is_eos.int().argmax(dim=1)


def checked_encoder(text_encoder, space: str, clip_skip: int):
    """The encoder to run: checked for the space, and in float32 (a copy if it is not)."""
    if space == "projected" and getattr(text_encoder, "text_projection", None) is None:
        raise InvalidInputError(
            f"space `projected` needs a text encoder with a text projection (CLIPTextModelWithProjection, "
            f"as in the full CLIP model the double-ellipsoid paper measured); this one "
            f"({type(text_encoder).__name__}, as in SD1.5) has none. Use `pooled` for the same EOS vector "
            "before the projection."
        )
    layers = text_encoder.config.num_hidden_layers
    if space in LAYER_SPACES and clip_skip > layers:
        raise InvalidInputError(f"`clip_skip` {clip_skip} is more than the text encoder's {layers} layers.")
    if any(p.dtype != torch.float32 for p in text_encoder.parameters()):
        # Statistics in fp16 would measure rounding; copy rather than change the caller's model.
        text_encoder = copy.deepcopy(text_encoder).float()
    return text_encoder


def final_layer_norm_affine(text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The final LayerNorm's gain γ and bias β, float64 `[dim]` copies (1 and 0 where it has none).

    Every `hidden`/`pooled` vector is γ ⊙ ẑ + β with ‖ẑ‖ = √dim (less LayerNorm's eps), so β is
    the exact centre of the shell they lie on; a sphere only when γ is uniform, else an ellipsoid.
    """
    norm = text_transformer(text_encoder).final_layer_norm
    dim = norm.normalized_shape[-1]
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    gain = torch.ones(dim, dtype=torch.float64) if weight is None else weight.detach().double().cpu()
    offset = torch.zeros(dim, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    return gain, offset


def encode_space(text_encoder, ids: torch.Tensor, space: str, clip_skip: int, eos_id: int,
                 family: ModelFamily = DEFAULT_FAMILY) -> torch.Tensor:  # fmt: skip
    """Vectors `[b, tokens, dim]` for per-token spaces, `[b, 1, dim]` for `pooled`/`projected`.

    Args:
        family (`ModelFamily`): whose rule makes `hidden` (the UNet's conditioning).
    """
    ids = ids.to(text_encoder.device)
    if space == "token_embedding":
        return text_encoder.get_input_embeddings()(ids)
    if space == "hidden":
        return encode_tokens(text_encoder, ids, clip_skip, family)
    transformer = text_transformer(text_encoder)
    if space in ("hidden_prenorm", "hidden_postnorm"):
        # hidden_states[-1] is the last layer's output before the final LayerNorm.
        layer = transformer(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return layer if space == "hidden_prenorm" else transformer.final_layer_norm(layer)
    last = transformer(ids).last_hidden_state
    pooled = last[torch.arange(ids.shape[0], device=last.device), first_eos(ids, eos_id).to(last.device)]
    if space == "projected":
        pooled = text_encoder.text_projection(pooled)
    return pooled[:, None]


def collect_vectors(
    text_encoder, ids: torch.Tensor, positions: torch.Tensor, space: str, clip_skip: int, batch_size: int, eos_id: int,
    family: ModelFamily = DEFAULT_FAMILY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors at `positions` `[n, dim]` and the mean over captions at every position, float64."""
    picked, total = [], None
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]
            out = encode_space(text_encoder, batch, space, clip_skip, eos_id, family).double().cpu()
            total = out.sum(dim=0) if total is None else total + out.sum(dim=0)
            rows = torch.arange(out.shape[0])
            picked.append(out[rows, positions[start : start + batch_size]])
    return torch.cat(picked), total / ids.shape[0]
