"""Norm statistics of text-encoder vectors: is there a shell, is it offset, does SLERP vs vSLERP matter?

For a caption set, the vectors of one **space** at one **position** are collected and their norms
summarised raw and centred (METHOD.md, "Checking the shell structure"). The centre is either the
mean vector, estimated on one half of the captions (even rows) with the spread evaluated on the
other half (odd rows), so a centre cannot shrink the spread of the very vectors it was fitted to;
or, for spaces read after the final LayerNorm, that LayerNorm's bias β, the exact centre of the
shell γ ⊙ ẑ + β (‖ẑ‖ = √d) every such vector lies on. Spreads are compared as CV = std/mean, never
as absolute variances: centring changes the mean norm. Why a raw spread can be smaller than a
centred one is worked out in docs/norm-stats.md.

This module holds what a caller uses: `NormStatsConfig`, `NormStats` and `compute_norm_stats`,
and re-exports the parts, which live in one module per concept:
- spaces.py: the spaces (`SPACES`, `EOS`) and how each is read from an encoder;
- captions.py: caption files, tokenizing, the token position per caption;
- geometry.py: `ShellStats`, the held-out spread around a fitted or given centre;
- endpoints.py: SLERP endpoints and SLERP/vSLERP gaps;
- report.py: summary, report, JSON, plot;
- synthetic.py: synthetic shells and LayerNorm outputs with known answers.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np
import torch

from . import report as _report
from ..errors import InvalidInputError
from ..safe_write import atomic_write
from .captions import caption_positions, load_captions, tokenize_captions
from .endpoints import T_STEPS, EndpointStats, endpoint_prompts, endpoint_stats, interpolation_gaps
from .geometry import ShellStats, all_identical, held_out_stats, shell_stats
from .report import IMMATERIAL_GAP, JSON_FORMAT, JSON_VERSION, LAYERNORM_BIAS, NEAR_CONSTANT_CV, SHELL_CV
from .spaces import (
    AFTER_NORM_SPACES,
    EOS,
    LAYER_SPACES,
    PER_TOKEN_SPACES,
    SPACES,
    Space,
    after_final_norm,
    checked_encoder,
    collect_vectors,
    final_layer_norm_affine,
)
from ..models import DEFAULT_FAMILY, FAMILIES, ModelFamily
from .synthetic import shell_expectations, synthetic_layernorm, synthetic_shell
from ..placeholder import PlaceholderToken
from ..metrics.plots import figure_to_array, save_png
from ..user_warnings import warn_user

Centre = Literal["mean", "layernorm_bias"]
CENTRES: tuple[str, ...] = get_args(Centre)
# Every text encoder key of the known families (`clip_l`, `clip_g`): what `encoder` may name.
ENCODERS: tuple[str, ...] = tuple(dict.fromkeys(key for family in FAMILIES.values() for key in family.embedding_keys))

__all__ = [
    "NormStatsConfig", "NormStats", "ShellStats", "EndpointStats", "compute_norm_stats", "stats_of_vectors",
    "load_captions", "shell_stats", "held_out_stats", "interpolation_gaps",
    "synthetic_shell", "shell_expectations", "synthetic_layernorm",
    "Space", "SPACES", "PER_TOKEN_SPACES", "AFTER_NORM_SPACES", "EOS", "Centre", "CENTRES", "ENCODERS",
    "SHELL_CV", "NEAR_CONSTANT_CV", "IMMATERIAL_GAP", "T_STEPS", "JSON_FORMAT", "JSON_VERSION",
]


@dataclass
class NormStatsConfig:
    """What to measure.

    Args:
        space (`str`): one of `SPACES` (see spaces.py).
        position (`int` or `str`, *optional*): a token index (5 is `tok1` in `an anime illustration
            of tok1`; 0 is the start token), `"eos"`, or a word whose first occurrence is located in
            each caption (captions without it are left out with a warning). Default: the template's
            placeholder index when `template` is given, else `"eos"`. Ignored by `pooled`/`projected`.
        clip_skip (`int`, *optional*): 1 = last layer, 2 = penultimate… (hidden spaces only); None = the
            family's conditioning layer (SD1.5 1, SDXL 2).
        template (`str`, *optional*): prompt with `{}` for the SLERP endpoints, e.g.
            `"an anime illustration of {}"`: placeholder prompt vs class-word prompt.
        class_word (`str`, *optional*): the word the placeholder is compared with, e.g. `character`.
        batch_size (`int`): captions per forward pass. Memory grows with it: at SD1.5 size about
            3 MB per caption for `hidden_prenorm` (every layer's output is kept), 0.25 MB otherwise.
        centre (`str`): what the centred statistics, the stored vSLERP `centres` and the endpoint
            angles are taken around. `mean`: the captions' mean vector (fitted on half of them).
            `layernorm_bias`: the final LayerNorm's bias β, the exact centre of the shell γ⊙ẑ+β
            that vectors read right after it lie on (a sphere only when the gain γ is uniform);
            only for those spaces: `pooled`, `hidden_postnorm`, and `hidden` where the family's
            conditioning goes through the final LayerNorm (SD1.5; not SDXL).
        encoder (`str`, *optional*): which text encoder to measure, by its embedding key (`clip_l`,
            `clip_g`); None = every encoder of the model, each reported on its own.
    """

    space: Space = "hidden"
    position: int | str | None = None
    clip_skip: int | None = None
    template: str | None = None
    class_word: str | None = None
    batch_size: int = 128
    centre: Centre = "mean"
    encoder: str | None = None

    def __post_init__(self):
        if self.space not in SPACES:
            raise InvalidInputError(f"`space` must be one of {', '.join(SPACES)}; got {self.space!r}.")
        self._check_position()
        self._check_centre()
        if self.clip_skip is not None and (isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 1):
            raise InvalidInputError(f"`clip_skip` must be 1 (last layer) or more, got {self.clip_skip!r}.")
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise InvalidInputError(f"`encoder` must be one of {', '.join(ENCODERS)} (or empty for every encoder), got {self.encoder!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidInputError(f"`batch_size` must be a positive integer, got {self.batch_size!r}.")
        if self.template is not None and self.template.count("{}") != 1:
            raise InvalidInputError(
                f"`template` must contain `{{}}` exactly once, where the placeholder goes; got {self.template!r}."
            )
        if self.template is not None and not (isinstance(self.class_word, str) and self.class_word.strip()):
            raise InvalidInputError("`template` is given but `class_word` is empty: give the class word, e.g. `character`.")
        if self.template is None and self.class_word is not None:
            warn_user("`class_word` is ignored because no `template` is given.")
        if self.space not in PER_TOKEN_SPACES and self.position not in (None, EOS):
            warn_user(f"`position` {self.position!r} is ignored: the `{self.space}` space is the EOS vector.")
        if self.space not in PER_TOKEN_SPACES and self.clip_skip not in (None, 1):
            warn_user(f"`clip_skip` is ignored: `{self.space}` is always the final layer's EOS vector.")

    def _check_position(self) -> None:
        p = self.position
        if p is None or p == EOS:
            return
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise InvalidInputError(f"`position` must be a token index, `eos` or a word; got {p!r}.")
        if isinstance(p, int) and p < 0:
            raise InvalidInputError(f"`position` must be 0 or more (0 is the start token), got {p}.")
        if isinstance(p, str) and (not p.strip() or "{}" in p):
            raise InvalidInputError(f"`position` {p!r} is neither a token index, `eos` nor a word.")

    def _check_centre(self) -> None:
        if self.centre not in CENTRES:
            raise InvalidInputError(f"`centre` must be one of {', '.join(CENTRES)}; got {self.centre!r}.")
        if self.centre == LAYERNORM_BIAS and self.space not in AFTER_NORM_SPACES:
            raise InvalidInputError(
                f"`centre` 'layernorm_bias' needs a space read right after the final LayerNorm "
                f"({', '.join(AFTER_NORM_SPACES)}); `{self.space}` is not, so its vectors do not lie on that "
                "LayerNorm's shell: use `centre` 'mean'."
            )

    def check_family(self, family: ModelFamily) -> None:
        """Raise if a setting does not apply to `family`'s encoders (before any forward pass)."""
        if self.centre == LAYERNORM_BIAS and not after_final_norm(self.space, family):
            raise InvalidInputError(
                f"`centre` 'layernorm_bias' needs vectors read right after the final LayerNorm, but "
                f"{family.display_name}'s `{self.space}` conditioning is the raw hidden state (no final LayerNorm): "
                "use `space` hidden_postnorm or pooled, or `centre` 'mean'."
            )
        if self.encoder is not None and self.encoder not in family.embedding_keys:
            raise InvalidInputError(f"`encoder` {self.encoder!r} is not a text encoder of {family.display_name} models "
                                    f"({', '.join(family.embedding_keys)}).")  # fmt: skip

    def layer(self, family: ModelFamily) -> int:
        """The `clip_skip` measured: the given one, or the family's conditioning layer."""
        return family.default_clip_skip if self.clip_skip is None else self.clip_skip


@dataclass
class NormStats:
    """Norm statistics of one space at one position, with the centres vSLERP needs.

    Args:
        space (`str`): the space measured (`SPACES`, or a label for vectors given directly).
        position (`int` or `str`): token index, `"eos"` or the word located per caption.
        clip_skip (`int`): layer counted from the end (hidden spaces).
        model (`str`): base model name.
        num_captions (`int`): vectors measured (half fit the centre, half are evaluated).
        raw (`ShellStats`), centred (`ShellStats`): spreads of held-out norms, raw and around the
            centre (fitted on the other half, or the LayerNorm bias β).
        centre_norm (`float`): ‖centre‖ of that centre; `offset` compares it with the radius.
        centres (`torch.Tensor`): float32 vSLERP centres, `[positions, dim]`: every token position
            (77 for SD1.5) for per-token spaces, one row for EOS spaces. The mean vectors over all
            captions, or β repeated for every position.
        raw_norms (`torch.Tensor`), centred_norms (`torch.Tensor`): the held-out norms (plots).
        endpoints (`EndpointStats`, *optional*): SLERP endpoint geometry, when a template is given.
        centre (`str`): `mean` or `layernorm_bias` (`NormStatsConfig.centre`).
        after_final_norm (`bool`): the vectors were read right after the final LayerNorm, which fixes
            their raw norms by construction (SD1.5's `hidden`, `pooled`; not SDXL's `hidden`).
    """

    space: str
    position: int | str
    clip_skip: int
    model: str
    num_captions: int
    raw: ShellStats
    centred: ShellStats
    centre_norm: float
    centres: torch.Tensor
    raw_norms: torch.Tensor = field(repr=False)
    centred_norms: torch.Tensor = field(repr=False)
    endpoints: EndpointStats | None = None
    centre: Centre = "mean"
    after_final_norm: bool = False

    @property
    def offset(self) -> float:
        """‖centre‖ / mean centred norm: how far the centre lies from the origin, in radii.

        The mean is the shell's centre only when the captions cover the shell evenly; on a cap
        (e.g. LayerNorm outputs, whose exact centre is the LayerNorm bias) it lies inside, near the cap.
        """
        return self.centre_norm / self.centred.mean_norm if self.centred.mean_norm > 0 else math.nan

    def centre_for_positions(self, positions: Sequence[int] | slice | None = None) -> torch.Tensor:
        """Centres `[len(positions), dim]` for vSLERP (all positions when None).

        For the regulariser, take `hidden` statistics of the same model and `clip_skip` and pass
        `centre_for_positions()` (`[tokens, dim]`): each position gets its own centre.

        Args:
            positions (`list[int]` or `slice`, *optional*): token positions to return.
        """
        if positions is None:
            return self.centres.clone()
        if self.centres.shape[0] == 1 and self.space not in PER_TOKEN_SPACES:
            raise InvalidInputError(f"`{self.space}` statistics hold one EOS centre, not per-position centres.")
        index = positions if isinstance(positions, slice) else torch.as_tensor(list(positions), dtype=torch.long)
        if not isinstance(positions, slice) and ((index < 0) | (index >= self.centres.shape[0])).any():
            raise InvalidInputError(f"positions {list(positions)} are outside 0..{self.centres.shape[0] - 1}.")
        return self.centres[index].clone()

    def pooled_centre(self) -> None:
        """One text encoder's statistics hold no pooled centre (SD1.5 has no pooled conditioning); a
        family with one measures it beside its encoders (`PerEncoderNormStats.pooled_centre`)."""
        return None

    def summary(self) -> str:
        """The conclusion in one sentence, with the numbers it rests on."""
        return _report.summary(self)

    def report(self) -> str:
        """A few lines: the numbers of both spreads, the endpoints, and the summary."""
        return _report.report(self)

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN as null); `load_json` reads it back exactly."""
        return _report.to_json(self)

    def save_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `to_json()` atomically.

        Args:
            path (`str`): output `.json` file.
            overwrite (`bool`): replace an existing file.
        """
        # One line per top-level key: readable, yet the [77, dim] centres do not take a line per number.
        lines = [f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in self.to_json().items()]
        text = "{\n" + ",\n".join(lines) + "\n}"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"), overwrite=overwrite)

    @classmethod
    def load_json(cls, source: str | os.PathLike | dict) -> "NormStats":
        """Read statistics written by `save_json` (a path) or `to_json` (a dict).

        Args:
            source (`str` or `dict`): the file, or the dict itself.
        """
        return cls(**_report.fields_from_json(source))

    def plot_figure(self):
        """Histograms of raw vs centred held-out norms, absolute and relative to their means."""
        return _report.plot(self)

    def plot_image(self) -> np.ndarray:
        """The plot as a `[height, width, 3]` float32 array in [0, 1]."""
        return figure_to_array(self.plot_figure())

    def save_plot(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the plot as PNG atomically.

        Args:
            path (`str`): output `.png` file.
            overwrite (`bool`): replace an existing file.
        """
        return save_png(self.plot_figure(), path, overwrite=overwrite)


def stats_of_vectors(vectors: torch.Tensor, label: str = "vectors", layernorm_bias: torch.Tensor | None = None) -> NormStats:
    """`NormStats` of vectors given directly (synthetic data, or vectors collected elsewhere).

    Args:
        vectors (`torch.Tensor`): `[n, dim]`.
        label (`str`): what they are, shown as the space in the summary.
        layernorm_bias (`torch.Tensor`, *optional*): `[dim]` bias β of the LayerNorm the vectors
            came out of: centre on it (`centre="layernorm_bias"`) rather than on their mean.
    """
    raw, centred, centre_norm, raw_norms, centred_norms = held_out_stats(vectors, layernorm_bias)
    if layernorm_bias is None:
        centres = vectors.double().mean(dim=0, keepdim=True).float()
    else:
        centres = torch.as_tensor(layernorm_bias).double().reshape(1, -1).float()
    return NormStats(
        label, EOS, 1, "", vectors.shape[0], raw, centred, centre_norm, centres, raw_norms, centred_norms,
        centre="mean" if layernorm_bias is None else LAYERNORM_BIAS, after_final_norm=label in AFTER_NORM_SPACES,
    )


def compute_norm_stats(
    tokenizer,
    text_encoder,
    captions: str | os.PathLike | Sequence[str],
    config: NormStatsConfig | None = None,
    placeholder: PlaceholderToken | None = None,
    model_name: str = "",
    family: ModelFamily = DEFAULT_FAMILY,
) -> NormStats:
    """Norm statistics of `config.space` at `config.position` over `captions`, for one text encoder.

    Nothing the caller owns is modified: the tokenizer and text encoder are only read (an fp16
    encoder is copied to fp32). To compare a trained placeholder with its class word, add it
    first (`add_placeholder(tokenizer, text_encoder, "tok1", "character", vectors=trained)`) and
    pass the returned `PlaceholderToken`; without one, the endpoints are the class prompt twice.
    `measure_norm_stats` runs this for every encoder of a model (SDXL's two).

    Args:
        tokenizer (`CLIPTokenizer`): the model's tokenizer.
        text_encoder (`CLIPTextModel`): its text encoder (`CLIPTextModelWithProjection` for `projected`).
        captions (`str`, `Path` or `list[str]`): caption file (one per line) or captions.
        config (`NormStatsConfig`, *optional*): what to measure (default: `hidden` at EOS).
        placeholder (`PlaceholderToken`, *optional*): a placeholder already added to both.
        model_name (`str`): recorded in the statistics.
        family (`ModelFamily`): the model's family, whose rule makes `hidden` (SD1.5 when not given).
    """
    config = config or NormStatsConfig()
    config.check_family(family)
    clip_skip = config.layer(family)
    eos_id = tokenizer.eos_token_id
    # 1. Check everything before the forward passes.
    encoder = checked_encoder(text_encoder, config.space, clip_skip)
    texts, labels = load_captions(captions)
    prompts = endpoint_prompts(tokenizer, config.template, config.class_word, placeholder)
    position = config.position
    if position is None:
        position = prompts.index if prompts is not None else EOS
    ids = tokenize_captions(tokenizer, texts, labels)
    positions, keep = caption_positions(tokenizer, ids, labels, position, config.space)
    if int(keep.sum()) < 2:
        raise InvalidInputError(f"norm statistics need at least 2 captions; {int(keep.sum())} can be used.")
    # 2. Encode the captions in batches, then summarise the held-out norms around the centre.
    vectors, means = collect_vectors(encoder, ids[keep], positions[keep], config.space, clip_skip, config.batch_size, eos_id, family)
    centres, fixed = means, None  # (positions, dim) float64
    if config.centre == LAYERNORM_BIAS:
        centres, fixed = _layernorm_bias_centres(encoder, means, vectors, position, config.space)
    raw, centred, centre_norm, raw_norms, centred_norms = held_out_stats(vectors, fixed)
    endpoints = None
    if prompts is not None:
        endpoints = endpoint_stats(encoder, prompts, centres, config.space, clip_skip, eos_id, family)
    if config.space not in PER_TOKEN_SPACES:
        position = EOS
    recorded_skip = clip_skip if config.space in LAYER_SPACES else (config.clip_skip or 1)
    return NormStats(
        config.space, position, recorded_skip, model_name, vectors.shape[0], raw, centred, centre_norm,
        centres.float(), raw_norms, centred_norms, endpoints, centre=config.centre,
        after_final_norm=after_final_norm(config.space, family),
    )


def _layernorm_bias_centres(encoder, means: torch.Tensor, vectors: torch.Tensor, position, space: str):
    """`(centres, β)`: the final LayerNorm's bias at every position, with a warning when there is no spread."""
    bias = final_layer_norm_affine(encoder)[1]
    if all_identical(vectors):
        # The mean-centred summary says so itself; around β the same vectors look like a perfect shell.
        warn_user(
            f"every caption gives the same vector at position {position!r} of `{space}` (the same token there, after "
            "the same tokens): the spread around β says nothing about the captions."
        )
    return bias.expand_as(means).clone(), bias
