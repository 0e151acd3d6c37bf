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

from .errors import InvalidInputError, TokenizerError
from .files.bundled_embeddings import split_bundled
from .files.embedding_file import load_embedding, save_embedding
from .files.lora_file import load_lora
from .models.bundle import ModelBundle
from .models import get_family
from .placeholder import (DEFAULT_TEMPLATES, PlaceholderToken, add_placeholder, add_placeholders, check_templates,
                          placeholder_in_tokenizers, placeholder_vectors)

# The default class word when a file records none (the notes' `character`).
DEFAULT_INITIALIZER = "character"


@dataclass
class Pivot:
    """A placeholder token's trained embedding and what it was trained with.

    Args:
        placeholder (`str`): the word prompts use, e.g. `tok1`.
        initializer (`str`): the class word its vectors started from, e.g. `character`.
        vectors (`torch.Tensor`): `[num_vectors, dim]` float32 on the CPU, for the family's first text
            encoder (SD1.5's only one; SDXL's CLIP-L).
        family (`str`): the model family the vectors belong to (which fixes the file's keys).
        templates (`list[str]`): the prompt templates it was trained with (the tuning reuses them).
        history (`list[dict]`): records of the run that made it (step, loss, distance, …).
        made_by (`dict[str, str]`): the settings of that run (steps, lr, seed, …), written to the file.
        base_model (`str`): the model it was trained on.
        file (`Path`, *optional*): where it was last saved or loaded from.
        extra_vectors (`dict[str, torch.Tensor]`): the vectors of the family's other text encoders,
            keyed as the embedding file (SDXL: `{"clip_g": [num_vectors, 1280]}`); empty for SD1.5.
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
    extra_vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.vectors, torch.Tensor) or self.vectors.ndim != 2:
            raise InvalidInputError(f"a pivot's vectors must be a [num_vectors, dim] tensor, got {getattr(self.vectors, 'shape', self.vectors)!r}.")
        self.vectors = self.vectors.detach().to("cpu", torch.float32)
        for key, extra in self.extra_vectors.items():
            if not isinstance(extra, torch.Tensor) or extra.ndim != 2 or extra.shape[0] != self.vectors.shape[0]:
                raise InvalidInputError(f"a pivot's {key} vectors must be [{self.vectors.shape[0]}, dim] like its first "
                                        f"encoder's, got {getattr(extra, 'shape', extra)!r}.")
        self.extra_vectors = {key: v.detach().to("cpu", torch.float32) for key, v in self.extra_vectors.items()}
        self.templates = check_templates(self.templates)

    @property
    def vectors_by_key(self) -> dict[str, torch.Tensor]:
        """Every encoder's vectors keyed as the embedding file, in family order (SD1.5 `{"clip_l": …}`)."""
        return {get_family(self.family).embedding_keys[0]: self.vectors, **self.extra_vectors}

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
        """The pivot of a placeholder already in `bundle`, with its current rows (in every text encoder) as vectors."""
        tokens = placeholder_in_tokenizers(bundle.tokenizers, token)
        vectors = [placeholder_vectors(encoder, t) for t, encoder in zip(tokens, bundle.text_encoders)]
        extra = dict(zip(bundle.family.embedding_keys[1:], vectors[1:]))
        return cls(token.placeholder, token.initializer, vectors[0], family_name(bundle), list(templates),
                   base_model=bundle.name, extra_vectors=extra, **details)

    @classmethod
    def at_initializer(cls, bundle: ModelBundle, placeholder: str, initializer: str, num_vectors: int = 1,
                       templates=None) -> "Pivot":
        """A pivot that starts where its class word is (the `joint` schedule trains it with the LoRA).

        The placeholder is added to `bundle` (its rows set from the initializer).
        """
        tokens = add_placeholders(bundle.tokenizers, bundle.text_encoders, placeholder, initializer, num_vectors)
        return cls.from_token(bundle, tokens[0], templates if templates is not None else DEFAULT_TEMPLATES)

    def apply(self, bundle: ModelBundle) -> PlaceholderToken:
        """The placeholder in `bundle` with these vectors: added if absent, refreshed if present.

        With several text encoders (SDXL) every one gets its own vectors; the first encoder's token
        is returned (`apply_all` gives each).
        """
        return self.apply_all(bundle)[0]

    def apply_all(self, bundle: ModelBundle) -> tuple[PlaceholderToken, ...]:
        """`apply`, returning the placeholder in each of the bundle's tokenizers, in family order."""
        if family_name(bundle) != self.family:
            raise InvalidInputError(f"this pivot was trained for a {self.family} model, but the model is {family_name(bundle)}.")
        by_key = self.vectors_by_key
        keys = bundle.family.embedding_keys
        if set(by_key) != set(keys):
            raise InvalidInputError(f"this pivot holds vectors for {sorted(by_key)} but the model's text encoders are {list(keys)}.")
        vectors = [by_key[key] for key in keys]
        strings = [self.placeholder] if self.num_vectors == 1 else [f"{self.placeholder}_{i}" for i in range(self.num_vectors)]
        try:  # only tokens added as placeholders, never a vocabulary word
            tokens = placeholder_in_tokenizers(bundle.tokenizers, PlaceholderToken(self.placeholder, tuple(strings), (), self.initializer))
        except TokenizerError:
            if len(keys) == 1:
                return (add_placeholder(bundle.tokenizer, bundle.text_encoder, self.placeholder, self.initializer, vectors=self.vectors),)
            return add_placeholders(bundle.tokenizers, bundle.text_encoders, self.placeholder, self.initializer, vectors=vectors)
        for encoder, rows in zip(bundle.text_encoders, vectors):
            width = encoder.get_input_embeddings().weight.shape[1]
            if width != rows.shape[1]:
                raise InvalidInputError(f"pivot vectors are {rows.shape[1]} wide but this text encoder needs {width}.")
        for token, encoder, rows in zip(tokens, bundle.text_encoders, vectors):  # all checked: now write
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[list(token.token_ids)] = rows.to(weight)
        return tuple(tokens)

    def with_vectors(self, vectors: torch.Tensor | list[torch.Tensor], history: list[dict], made_by: dict[str, str]) -> "Pivot":
        """This pivot moved on by a later run (the `joint` schedule): the first encoder's vectors, or one per encoder."""
        if isinstance(vectors, torch.Tensor):
            vectors = [vectors]
        if len(vectors) != 1 + len(self.extra_vectors):
            raise InvalidInputError(f"{len(vectors)} vector sets given for a pivot of {1 + len(self.extra_vectors)} text encoder(s).")
        extra = dict(zip(self.extra_vectors, vectors[1:]))
        return replace(self, vectors=vectors[0], extra_vectors=extra, history=history, made_by=made_by, file=None)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the embedding file (atomically; an existing file only with `overwrite`)."""
        vectors = self.vectors_by_key if self.extra_vectors else self.vectors
        self.file = save_embedding(path, vectors, self.family, embedding_metadata(self), overwrite=overwrite)
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
        if len(bundle.text_encoders) == 1:
            first, extra = embedding.for_family(bundle.family, bundle.embedding_dim), {}
        else:  # one vector set per encoder (SDXL: clip_l, clip_g)
            by_key = embedding.vectors_for(bundle.family, bundle.embedding_dims)
            keys = bundle.family.embedding_keys
            first, extra = by_key[keys[0]], {key: by_key[key] for key in keys[1:]}
        return cls(word, initializer or meta.get("initializer", DEFAULT_INITIALIZER), first, family_name(bundle), templates,
                   made_by=made_by, base_model=meta.get("base_model", "unknown"), file=Path(path), extra_vectors=extra)


    @classmethod
    def from_lora_file(cls, path: str | os.PathLike, bundle: ModelBundle, placeholder: str | None = None,
                       initializer: str | None = None) -> "Pivot":
        """The token bundled in a LoRA file (`bundle_emb.NAME.clip_l`, as `--bundle-embedding` and `joint`
        snapshots write it); `placeholder` picks one when the file bundles several."""
        tensors, metadata = load_lora(path)
        _, bundled = split_bundled(tensors, str(path))
        name = placeholder or metadata.get("pivotal.placeholder") or (next(iter(bundled)) if len(bundled) == 1 else None)
        if name not in bundled:
            raise InvalidInputError(f"the LoRA {path} bundles no embedding named {name!r} (it bundles {sorted(bundled) or 'none'}).")
        keys = bundle.family.embedding_keys
        vectors = bundled[name]
        if set(vectors) != set(keys):
            raise InvalidInputError(f"the embedding bundled in {path} holds {sorted(vectors)}, but this model's text encoders "
                                    f"are {list(keys)}: it was made for another model family.")
        return cls(name, initializer or DEFAULT_INITIALIZER, vectors[keys[0]], family_name(bundle),
                   extra_vectors={key: vectors[key] for key in keys[1:]}, base_model=metadata.get("pivotal.base_model", "unknown"),
                   file=Path(path))


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
