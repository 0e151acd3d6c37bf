"""Embeddings inside a LoRA file: one file per character (`bundle_emb.NAME.clip_l`, `.clip_g`).

The convention OneTrainer writes: beside the LoRA's keys, `bundle_emb.<name>.<encoder key>` holds the
embedding `[n_vectors, dim]` for each text encoder (the family's `embedding_keys`). What ComfyUI does
with such a file (comfy/sd1_clip.py `load_embed`, comfy/lora.py `load_lora`, 0.3.64 and 0.33.0):
- in its embeddings folder, `embedding:FILE` reads the `bundle_emb.*.clip_l` tensors (all of them,
  concatenated, so a file bundling two embeddings would give their rows together);
- its LoRA loaders load every LoRA key and log each `bundle_emb` key once as "lora key not loaded";
- PivotalLoRALoader (nodes/loader_nodes.py) applies the LoRA and gives the CLIP the embedding.
"""

import re

import torch

from ..errors import InvalidInputError

BUNDLE_PREFIX = "bundle_emb."
# The name sits between two dots in the key, and is what `embedding:NAME` prompts use.
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def bundle_tensors(name: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{bundle_emb.NAME.KEY: vectors}` for one embedding (float32 `[n_vectors, dim]` per encoder key).

    Args:
        name (`str`): the embedding's name (the placeholder), letters, digits, `_` and `-`.
        vectors (`dict[str, Tensor]`): per encoder key (`clip_l`, `clip_g`) the embedding's rows.
    """
    if not _NAME.match(name or ""):
        raise InvalidInputError(f"bundled embedding name {name!r} may only use letters, digits, '_' and '-'.")
    out = {}
    for key, value in vectors.items():
        if value.ndim != 2:
            raise InvalidInputError(f"bundled embedding {name!r} {key!r} must be [n_vectors, dim], got {list(value.shape)}.")
        out[f"{BUNDLE_PREFIX}{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def split_bundled(tensors: dict[str, torch.Tensor], where: str = "LoRA") -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """`(the LoRA's tensors, {name: {encoder key: vectors}})` of a file's tensors; the input is not changed."""
    lora, embeddings = {}, {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            lora[key] = value
            continue
        name, _, encoder = key[len(BUNDLE_PREFIX):].rpartition(".")
        if not name or not encoder or value.ndim != 2:
            raise InvalidInputError(
                f"{where}: {key!r} is not a bundled embedding: expected `bundle_emb.NAME.clip_l` (or `.clip_g`) "
                f"holding [n_vectors, dim], got shape {list(value.shape)}."
            )
        embeddings.setdefault(name, {})[encoder] = value.float()
    return lora, embeddings
