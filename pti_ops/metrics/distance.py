"""How far the placeholder's embedding moved from its initializer: ‖e − e0‖, ‖e‖, cos(e, e0), nearest tokens.

The same quantities the inversion records in its history (`inversion.py`), computed here from two
sets of vectors (a saved embedding and the base model's initializer rows) or read from a history.
"""

import torch
import torch.nn.functional as F

from ..models.bundle import ModelBundle
from ..errors import InvalidInputError
from .scores import Metric, metric, not_computed


def embedding_distance(vectors: torch.Tensor, initial: torch.Tensor) -> dict[str, float]:
    """`distance` ‖e − e0‖ (all vectors), mean `norm` ‖e‖, mean `cosine` cos(e, e0); as the inversion history.

    Args:
        vectors (`torch.Tensor`): trained placeholder vectors `[n_vectors, dim]`.
        initial (`torch.Tensor`): their starting rows `[n_vectors, dim]`.
    """
    e, e0 = torch.as_tensor(vectors).double(), torch.as_tensor(initial).double()
    if e.ndim == 1:
        e, e0 = e[None], e0.reshape(1, -1)
    if e.shape != e0.shape:
        raise InvalidInputError(f"embedding of shape {tuple(e.shape)} cannot be compared with its initializer {tuple(e0.shape)}.")
    return {
        "distance": (e - e0).norm().item(),
        "norm": e.norm(dim=-1).mean().item(),
        "cosine": F.cosine_similarity(e, e0, dim=-1).mean().item(),
    }


def nearest_tokens(bundle: ModelBundle, vectors: torch.Tensor, vocabulary_size: int, k: int = 3, encoder: int = 0) -> list[list[str]]:
    """The `k` vocabulary tokens of highest cosine with each vector, `[n_vectors][k]` token strings.

    Args:
        bundle (`ModelBundle`): its tokenizers and token-embedding matrices.
        vectors (`torch.Tensor`): `[n_vectors, dim]`, in that encoder's token-embedding space.
        vocabulary_size (`int`): search rows `0 … vocabulary_size − 1` only (leave placeholders out).
        k (`int`): tokens per vector.
        encoder (`int`): which text encoder's vocabulary, in family order (SDXL: 0 CLIP-L, 1 bigG).
    """
    if not 0 <= encoder < len(bundle.text_encoders):
        raise InvalidInputError(f"`encoder` {encoder} is not one of this model's {len(bundle.text_encoders)} text encoder(s).")
    weight = bundle.text_encoders[encoder].get_input_embeddings().weight.detach().float()[:vocabulary_size]
    similarity = F.normalize(vectors.float().to(weight.device), dim=-1) @ F.normalize(weight, dim=-1).T
    ids = similarity.topk(min(k, vocabulary_size), dim=-1).indices.tolist()
    return [bundle.tokenizers[encoder].convert_ids_to_tokens(row) for row in ids]


def distance_from_history(history: list[dict]) -> dict[str, float]:
    """`distance`, `norm`, `cosine` of the last record of an inversion history (`InversionResult.history`)."""
    if not history:
        raise InvalidInputError("the inversion history is empty: no distance was recorded.")
    last = history[-1]
    return {key: float(last[key]) for key in ("distance", "norm", "cosine")}


def distance_metrics(distance: dict[str, float] | None, reason: str = "no embedding given (--embedding)") -> dict[str, Metric]:
    """The three distance metrics from `embedding_distance`/`distance_from_history`, or not computed.

    Args:
        distance (`dict`, *optional*): `distance`, `norm`, `cosine`; other keys (`nearest`, `initializer`)
            go into the details of `embedding_distance`.
        reason (`str`): why `distance` is None.
    """
    names = ("embedding_distance", "embedding_norm", "embedding_cosine")
    if distance is None:
        return not_computed(names, reason)
    extra = {k: v for k, v in distance.items() if k not in ("distance", "norm", "cosine")}
    out = {name: metric(name, distance[name.removeprefix("embedding_")]) for name in names}
    out["embedding_distance"].details.update(extra)
    return out
