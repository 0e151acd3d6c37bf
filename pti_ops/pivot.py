"""The pivot: the trained placeholder token that the LoRA is tuned around (METHOD.md step 2).

A `Pivot` is what the inversion produces and what the tuning consumes, whichever face runs them
(CLI, nodes, demo, sweeps): the placeholder word, the class word it started from, its vectors,
the templates it was trained with, the model family, its history, and how it was made. It saves
itself as an embedding file (`save`) whose metadata one function builds (`embedding_metadata`),
and reads one back (`load`) from our files or any textual-inversion file.
"""

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import InvalidInputError
from .files.embedding_file import load_embedding, save_embedding
from .models.bundle import ModelBundle
from .models.families import get_family
from .placeholder import DEFAULT_TEMPLATES, PlaceholderToken, add_placeholder, check_templates, placeholder_vectors

# The default class word when a file records none (the notes' `character`).
DEFAULT_INITIALIZER = "character"


@dataclass
class Pivot:
    """A placeholder token's trained embedding and what it was trained with.

    Args:
        placeholder (`str`): the word prompts use, e.g. `tok1`.
        initializer (`str`): the class word its vectors started from, e.g. `character`.
        vectors (`torch.Tensor`): `[num_vectors, dim]` float32 on the CPU.
        family (`str`): the model family the vectors belong to (which fixes the file's keys).
        templates (`list[str]`): the prompt templates it was trained with (the tuning reuses them).
        history (`list[dict]`): records of the run that made it (step, loss, distance, …).
        made_by (`dict[str, str]`): the settings of that run (steps, lr, seed, …), written to the file.
        base_model (`str`): the model it was trained on.
        file (`Path`, *optional*): where it was last saved or loaded from.
    """

    placeholder: str
    initializer: str
    vectors: torch.Tensor
    family: str
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    history: list[dict] = field(default_factory=list, repr=False)
    made_by: dict[str, str] = field(default_factory=dict)
    base_model: str = "unknown"
    file: Path | None = None

    def __post_init__(self):
        if not isinstance(self.vectors, torch.Tensor) or self.vectors.ndim != 2:
            raise InvalidInputError(f"a pivot's vectors must be a [num_vectors, dim] tensor, got {getattr(self.vectors, 'shape', self.vectors)!r}.")
        self.vectors = self.vectors.detach().to("cpu", torch.float32)
        self.templates = check_templates(self.templates)

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]

    @property
    def trigger(self) -> str:
        """What a ComfyUI prompt writes to use the saved file: `embedding:NAME` (needs `file`)."""
        if self.file is None:
            raise InvalidInputError(f"the pivot {self.placeholder!r} has not been saved to a file yet.")
        name = self.file.name
        return "embedding:" + (name[: -len(".safetensors")] if name.endswith(".safetensors") else self.file.stem)

    @classmethod
    def from_token(cls, bundle: ModelBundle, token: PlaceholderToken, templates, **details) -> "Pivot":
        """The pivot of a placeholder already in `bundle`, with its current rows as vectors."""
        return cls(token.placeholder, token.initializer, placeholder_vectors(bundle.text_encoder, token), family_name(bundle),
                   list(templates), base_model=bundle.name, **details)

    @classmethod
    def at_initializer(cls, bundle: ModelBundle, placeholder: str, initializer: str, num_vectors: int = 1,
                       templates=None) -> "Pivot":
        """A pivot that starts where its class word is (the `joint` schedule trains it with the LoRA).

        The placeholder is added to `bundle` (its rows set from the initializer).
        """
        token = add_placeholder(bundle.tokenizer, bundle.text_encoder, placeholder, initializer, num_vectors)
        return cls.from_token(bundle, token, templates if templates is not None else DEFAULT_TEMPLATES)

    def apply(self, bundle: ModelBundle) -> PlaceholderToken:
        """The placeholder in `bundle` with these vectors: added if absent, refreshed if present."""
        if family_name(bundle) != self.family:
            raise InvalidInputError(f"this pivot was trained for a {self.family} model, but the model is {family_name(bundle)}.")
        strings = [self.placeholder] if self.num_vectors == 1 else [f"{self.placeholder}_{i}" for i in range(self.num_vectors)]
        added = bundle.tokenizer.get_added_vocab()  # only tokens added as placeholders, never a vocabulary word
        if not all(s in added for s in strings):
            return add_placeholder(bundle.tokenizer, bundle.text_encoder, self.placeholder, self.initializer, vectors=self.vectors)
        ids = [added[s] for s in strings]
        token = PlaceholderToken(self.placeholder, tuple(strings), tuple(ids), self.initializer)
        weight = bundle.text_encoder.get_input_embeddings().weight
        if weight.shape[1] != self.vectors.shape[1]:
            raise InvalidInputError(f"pivot vectors are {self.vectors.shape[1]} wide but this text encoder needs {weight.shape[1]}.")
        with torch.no_grad():
            weight[list(ids)] = self.vectors.to(weight)
        return token

    def with_vectors(self, vectors: torch.Tensor, history: list[dict], made_by: dict[str, str]) -> "Pivot":
        """This pivot moved on by a later run (the `joint` schedule)."""
        return replace(self, vectors=vectors, history=history, made_by=made_by, file=None)

    def embedding_tensors(self) -> dict[str, torch.Tensor]:
        """The vectors keyed as the family's embedding files key them (`{"clip_l": [n, 768]}` for SD1.5)."""
        return {get_family(self.family).embedding_keys[0]: self.vectors}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the embedding file (atomically; an existing file only with `overwrite`)."""
        self.file = save_embedding(path, self.vectors, self.family, embedding_metadata(self), overwrite=overwrite)
        return self.file

    @classmethod
    def load(cls, path: str | os.PathLike, bundle: ModelBundle, placeholder: str | None = None,
             initializer: str | None = None) -> "Pivot":
        """Read an embedding file made for `bundle`'s family (ours, A1111's or diffusers').

        `placeholder` / `initializer` override what the file records; a file that records no
        placeholder needs `placeholder`.
        """
        embedding = load_embedding(path)
        meta = embedding.metadata
        word = placeholder or meta.get("placeholder")
        if not word:
            raise InvalidInputError(f"the embedding {path} records no placeholder: give the token word to use for it.")
        templates = [t.strip() for t in meta.get("templates", "").split(" | ") if t.strip()] or list(DEFAULT_TEMPLATES)
        made_by = {k: v for k, v in meta.items() if k in MADE_BY_KEYS}
        return cls(word, initializer or meta.get("initializer", DEFAULT_INITIALIZER),
                   embedding.for_family(bundle.family, bundle.embedding_dim), family_name(bundle), templates,
                   made_by=made_by, base_model=meta.get("base_model", "unknown"), file=Path(path))


# Settings of the run that made a pivot, as the embedding file's metadata records them.
MADE_BY_KEYS = ("steps", "lr", "batch_size", "seed", "norm_mode", "schedule")


def embedding_metadata(pivot: Pivot) -> dict[str, str]:
    """The embedding file's metadata: what the pivot is and the settings of the run that made it."""
    distance = pivot.history[-1].get("distance") if pivot.history else None
    return {
        "placeholder": pivot.placeholder,
        "initializer": pivot.initializer,
        "num_vectors": str(pivot.num_vectors),
        **{key: pivot.made_by[key] for key in MADE_BY_KEYS if key in pivot.made_by},
        "templates": " | ".join(pivot.templates),
        "base_model": pivot.base_model,
        "distance_from_init": f"{distance:.6g}" if distance is not None else "",
    }


def family_name(bundle: ModelBundle) -> str:
    """The bundle's model family, by name (what files record)."""
    family = bundle.family
    return family if isinstance(family, str) else family.name
