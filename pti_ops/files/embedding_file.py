"""Embedding files: the trained placeholder vectors, in the formats ComfyUI and diffusers load.

Written: `.safetensors` with one float32 tensor `[n_vectors, dim]` per text encoder, under its key
(the family's `embedding_keys`: `clip_l` for SD1.5; `clip_l` + `clip_g` for SDXL, as ComfyUI reads
them), plus string metadata (`model_family` among it). ComfyUI loads it with `embedding:NAME` in a
prompt, diffusers with `load_textual_inversion(path, token=…)` (SDXL: once per encoder and key).
Read: the same, the `emb_params` key of other trainers, and A1111 `.pt` files
(`string_to_param`), the latter with `weights_only=True` so a file cannot run code.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ..errors import InvalidInputError
from ..models import DEFAULT_FAMILY, FAMILIES, ModelFamily, get_family
from ..checks import check_finite
from ..safe_write import write_safetensors

FORMAT_VERSION = "1"


@dataclass
class EmbeddingFile:
    """Vectors read from an embedding file.

    Args:
        vectors (`dict[str, torch.Tensor]`): `[n_vectors, dim]` float32 per text-encoder key.
        metadata (`dict[str, str]`): the file's metadata (empty for `.pt` files).
    """

    vectors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def written_for(self) -> ModelFamily | None:
        """The family the file is for: its `model_family` metadata when it names a known one, else the family
        whose keys are exactly the file's (`clip_l` alone: SD1.5); None for a lone `emb_params`-style set."""
        named = self.metadata.get("model_family")
        if named in FAMILIES:
            return FAMILIES[named]
        return next((f for f in FAMILIES.values() if set(f.embedding_keys) == set(self.vectors)), None)

    def _check_family(self, family: ModelFamily) -> None:
        source = self.written_for()
        if source is not None and source != family:
            raise InvalidInputError(
                f"this embedding is for {source.display_name} (keys {', '.join(sorted(self.vectors))}) but the model is "
                f"{family.display_name}, which needs {' and '.join(family.embedding_keys)}: use an embedding trained for "
                f"{family.display_name}, or a {source.display_name} model."
            )

    def for_family(self, family: ModelFamily | str, dim: int) -> torch.Tensor:
        """The vectors for the first text encoder of `family` (a family or its name), checked against its width `dim`.

        An embedding of another family is refused, naming both; `vectors_for` gives every encoder's vectors.
        """
        family = get_family(family)
        self._check_family(family)
        key = family.embedding_keys[0]
        vectors = self.vectors.get(key)
        if vectors is None and len(self.vectors) == 1:
            vectors = next(iter(self.vectors.values()))
        if vectors is None:
            raise InvalidInputError(f"embedding has keys {sorted(self.vectors)} but none named {key!r} for a {family.name} model.")
        self._check_width(vectors, dim, family, "text encoder")
        return vectors

    def vectors_for(self, family: ModelFamily | str, dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """The vectors of every text encoder of `family`, keyed as `family.embedding_keys`, each `[n_vectors, dim]`.

        Args:
            family (`ModelFamily` or `str`): the model's family; an embedding of another family is refused.
            dims (`dict[str, int]`): width per key (`bundle.embedding_dims`).
        """
        family = get_family(family)
        self._check_family(family)
        keys = family.embedding_keys
        if len(keys) == 1 and keys[0] not in self.vectors and len(self.vectors) == 1:
            return {keys[0]: self.for_family(family, dims[keys[0]])}  # `emb_params`, A1111
        missing = [key for key in keys if key not in self.vectors]
        if missing:
            raise InvalidInputError(
                f"embedding has keys {sorted(self.vectors)} but a {family.display_name} model needs {list(keys)} "
                f"(missing {missing})."
            )
        for key in keys:
            self._check_width(self.vectors[key], dims[key], family, f"{key} text encoder")
        counts = {key: self.vectors[key].shape[0] for key in keys}
        if len(set(counts.values())) != 1:
            raise InvalidInputError(f"embedding has a different number of vectors per text encoder {counts}; they must match.")
        return {key: self.vectors[key] for key in keys}

    @staticmethod
    def _check_width(vectors: torch.Tensor, dim: int, family: ModelFamily, what: str) -> None:
        if vectors.shape[-1] != dim:
            raise InvalidInputError(
                f"embedding vectors are {vectors.shape[-1]} wide but this {family.name} model's {what} needs {dim}: "
                "the embedding was trained for another model family (SD1.5 uses 768, SDXL 768 + 1280)."
            )


# Header allowance of a written file: the JSON of keys, shapes and metadata (templates, settings).
HEADER_BYTES = 4 * 1024


def embedding_file_size(num_vectors: int, dims: dict[str, int]) -> int:
    """Bytes of the embedding file of `num_vectors` float32 vectors per encoder (`dims`: key → width), about."""
    return HEADER_BYTES + 4 * num_vectors * sum(dims.values())


def save_embedding(
    path: str | os.PathLike,
    vectors: torch.Tensor | dict[str, torch.Tensor],
    family: ModelFamily | str = DEFAULT_FAMILY,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the vectors atomically as `.safetensors` (never replacing a file unless `overwrite`).

    Args:
        path (`str`): output file, ending in `.safetensors`.
        vectors (`torch.Tensor` or `dict`): `[n_vectors, dim]` for the family's first text encoder,
            or a dict with exactly the family's `embedding_keys` (SDXL: `clip_l` and `clip_g`, same `n_vectors`).
        family (`ModelFamily` or `str`): the model family (or its name), which fixes the key(s).
        metadata (`dict[str, str]`): strings stored in the file (placeholder, initializer, lr, …).
        overwrite (`bool`): replace an existing file.
    """
    family = get_family(family)
    if str(path).endswith(".safetensors") is False:
        raise InvalidInputError(f"embedding path {str(path)!r} must end in .safetensors.")
    if isinstance(vectors, torch.Tensor):
        vectors = {family.embedding_keys[0]: vectors}
    if set(vectors) != set(family.embedding_keys):
        raise InvalidInputError(
            f"embedding keys {sorted(vectors)} are not the {family.display_name} text encoders' {list(family.embedding_keys)}."
        )
    tensors = {}
    for key, value in vectors.items():
        if value.ndim != 2:
            raise InvalidInputError(f"embedding {key!r} must be [n_vectors, dim], got shape {tuple(value.shape)}.")
        tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
    counts = {key: value.shape[0] for key, value in tensors.items()}
    if len(set(counts.values())) != 1:
        raise InvalidInputError(f"embedding has a different number of vectors per text encoder {counts}; they must match.")
    meta = {"format": "pt", "pivotal.format_version": FORMAT_VERSION, "model_family": family.name}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return write_safetensors(path, tensors, meta, overwrite=overwrite)


def load_embedding(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embedding file (`.safetensors`, or A1111/diffusers `.pt`/`.bin` without running pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"embedding file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InvalidInputError(f"embedding file {path} is not a readable .safetensors file: {err}") from err
    elif path.suffix.lower() in (".pt", ".bin"):
        state, metadata = _load_pickled_embedding(path), {}
    else:
        raise InvalidInputError(f"embedding file {path} must be .safetensors, .pt or .bin.")
    return EmbeddingFile(_embedding_tensors(state, path), metadata)


def _load_pickled_embedding(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others for unsafe content
        raise InvalidInputError(
            f"embedding file {path} was refused: it is not a plain tensor file ({type(err).__name__}). "
            "Pickled files may only contain tensors and dicts; convert it to .safetensors."
        ) from err


def _embedding_tensors(state, path: Path) -> dict[str, torch.Tensor]:
    """The vectors of a loaded state dict, keyed by text encoder (`clip_l`…) or `emb_params`.

    A1111 files hold one vector set for SD1.x's text encoder: it is keyed as the default family's.
    """
    if not isinstance(state, dict):
        raise InvalidInputError(f"embedding file {path} holds a {type(state).__name__}, not a dict of tensors.")
    if "string_to_param" in state:  # A1111: {"string_to_param": {"*": tensor}}
        params = state["string_to_param"]
        state = {DEFAULT_FAMILY.embedding_keys[0]: next(iter(params.values()))} if isinstance(params, dict) and params else {}
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.float()
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2:
            raise InvalidInputError(f"embedding {key!r} in {path} has shape {tuple(value.shape)}, expected [n_vectors, dim].")
        check_finite(value, f"embedding {key!r} in {path}")
        tensors[key] = value.contiguous()
    if not tensors:
        raise InvalidInputError(f"embedding file {path} contains no embedding tensor.")
    return tensors
