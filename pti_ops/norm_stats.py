"""Norm statistics of text-encoder vectors: is there a shell, is it offset, does SLERP vs vSLERP matter?

For a caption set, the vectors of one **space** at one **position** are collected and their norms
summarised raw and centred on the mean vector (METHOD.md, "Checking the shell structure"). The
centre is estimated on one half of the captions (even rows) and the spread evaluated on the other
half (odd rows), so a centre cannot shrink the spread of the very vectors it was fitted to.
Spreads are compared as CV = std/mean, never as absolute variances: centring changes the mean
norm. Why a raw spread can be smaller than a centred one is worked out in docs/norm-stats.md.

Spaces (all fp32, the whole caption set in a few batched forward passes, no gradients):
- `hidden`: the per-token conditioning the UNet consumes (after the final LayerNorm; with
  `clip_skip`, the earlier layer through the final LayerNorm, as in text_conditioning.py);
- `hidden_prenorm`: the same layer before the final LayerNorm;
- `pooled`: the final-layer EOS vector (after the final LayerNorm; `clip_skip` does not apply);
- `projected`: `pooled` through the text projection, the joint-space embedding the double-ellipsoid
  paper measured; only for encoders that have one (SD1.5's `CLIPTextModel` has none);
- `token_embedding`: the input embedding rows, the space textual inversion moves in.
"""

import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, NamedTuple, Sequence, get_args

import numpy as np
import torch

from .errors import InvalidInputError
from .file_io import atomic_write
from .interpolation import angle_between, lerp, slerp, vslerp
from .placeholder import PlaceholderToken
from .plots import figure_to_array, new_figure, save_png
from .text_conditioning import encode_tokens, text_transformer, tokenize

Space = Literal["hidden", "hidden_prenorm", "pooled", "projected", "token_embedding"]
SPACES: tuple[str, ...] = get_args(Space)
PER_TOKEN_SPACES = ("hidden", "hidden_prenorm", "token_embedding")
_AFTER_NORM = ("hidden", "pooled")  # spaces read right after the final LayerNorm
EOS = "eos"

# A shell is "thin" when the norms vary by less than 10 % of their mean. Any cloud in d dimensions
# has CV ~ 1/sqrt(2d) (0.026 at d=768), so this only screens out clouds that are not shells at all.
SHELL_CV = 0.1
# Raw norms count as fixed by construction (LayerNorm) below 1 % CV: in docs/norm-stats.md a
# unit-gain LayerNorm gives ~1e-7 (rounding), a spread-out gain 0.009, offset shells 0.015-0.076.
NEAR_CONSTANT_CV = 0.01
# When SLERP and vSLERP both stay within 1 % of the straight path (relative to its norm), they
# are within 2 % of each other everywhere: a convention for "immaterial", always shown with the numbers.
IMMATERIAL_GAP = 0.01
# Spreads below this fraction of the mean are float32 rounding (a unit-gain LayerNorm's outputs
# at width 32 show ~4e-6 on ‖x‖²): the along-mean share of such a "variance" is reported as
# undefined (NaN, `null` in JSON), and centred norms this small mean every vector is the same.
_ROUNDING = 1e-4
T_STEPS = 101  # points on [0, 1] where the SLERP/LERP gap is measured; the max is at t=0.5 for equal norms
JSON_FORMAT = "pti_ops.norm_stats"
JSON_VERSION = 1


@dataclass
class NormStatsConfig:
    """What to measure.

    Args:
        space (`str`): one of `SPACES` (see the module docstring).
        position (`int` or `str`, *optional*): a token index (5 is `tok1` in `an anime illustration
            of tok1`; 0 is the start token), `"eos"`, or a word whose first occurrence is located in
            each caption (captions without it are left out with a warning). Default: the template's
            placeholder index when `template` is given, else `"eos"`. Ignored by `pooled`/`projected`.
        clip_skip (`int`): 1 = last layer, 2 = penultimate… (hidden spaces only).
        template (`str`, *optional*): prompt with `{}` for the SLERP endpoints, e.g.
            `"an anime illustration of {}"`: placeholder prompt vs class-word prompt.
        class_word (`str`, *optional*): the word the placeholder is compared with, e.g. `character`.
        batch_size (`int`): captions per forward pass. Memory grows with it: at SD1.5 size about
            3 MB per caption for `hidden_prenorm` (every layer's output is kept), 0.25 MB otherwise.
    """

    space: Space = "hidden"
    position: int | str | None = None
    clip_skip: int = 1
    template: str | None = None
    class_word: str | None = None
    batch_size: int = 128

    def __post_init__(self):
        if self.space not in SPACES:
            raise InvalidInputError(f"`space` must be one of {', '.join(SPACES)}; got {self.space!r}.")
        self._check_position()
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise InvalidInputError(f"`clip_skip` must be 1 (last layer) or more, got {self.clip_skip!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidInputError(f"`batch_size` must be a positive integer, got {self.batch_size!r}.")
        if self.template is not None and self.template.count("{}") != 1:
            raise InvalidInputError(
                f"`template` must contain `{{}}` exactly once, where the placeholder goes; got {self.template!r}."
            )
        if self.template is not None and not (isinstance(self.class_word, str) and self.class_word.strip()):
            raise InvalidInputError("`template` is given but `class_word` is empty: give the class word, e.g. `character`.")
        if self.template is None and self.class_word is not None:
            warnings.warn("`class_word` is ignored because no `template` is given.", stacklevel=3)
        if self.space not in PER_TOKEN_SPACES and self.position not in (None, EOS):
            warnings.warn(f"`position` {self.position!r} is ignored: the `{self.space}` space is the EOS vector.", stacklevel=3)
        if self.space not in PER_TOKEN_SPACES and self.clip_skip != 1:
            warnings.warn(f"`clip_skip` is ignored: `{self.space}` is always the final layer's EOS vector.", stacklevel=3)

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


@dataclass
class ShellStats:
    """Spread of one set of vectors' norms.

    Args:
        mean_norm (`float`): mean of ‖x‖.
        std_norm (`float`): standard deviation of ‖x‖ (population, ddof 0).
        cv (`float`): std_norm / mean_norm: the spread relative to the radius (NaN if the mean is 0).
        var_sq_norm (`float`): variance of ‖x‖².
        along_mean_share (`float`): share of var(‖x‖²) carried by the component along the mean
            direction u: cov(⟨x,u⟩², ‖x‖²) / var(‖x‖²). Perpendicular parts are untouched by
            centring, so this share is where raw and centred spreads differ. NaN when var(‖x‖²)
            is rounding noise (norms fixed by a LayerNorm).
    """

    mean_norm: float
    std_norm: float
    cv: float
    var_sq_norm: float
    along_mean_share: float


@dataclass
class EndpointStats:
    """SLERP endpoints (placeholder prompt vs class prompt), per position of the space.

    Args:
        placeholder_prompt (`str`), class_prompt (`str`): the two prompts.
        index (`int`): the placeholder's first token index (positions before it are identical in
            both prompts, and under CLIP's causal mask their outputs are too).
        trained (`bool`): False when no placeholder embedding was given: the placeholder then
            equals its class-word initialisation and the endpoints coincide.
        angle_raw (`list[float]`): angle in degrees between the endpoints, per position.
        angle_centred (`list[float]`): the same around the per-position centre.
        slerp_gap (`list[float]`): max over t of ‖slerp − lerp‖ / ‖lerp‖, per position.
        vslerp_gap (`list[float]`): the same with vSLERP around the per-position centre.
    """

    placeholder_prompt: str
    class_prompt: str
    index: int
    trained: bool
    angle_raw: list[float]
    angle_centred: list[float]
    slerp_gap: list[float]
    vslerp_gap: list[float]

    @property
    def max_gap(self) -> tuple[float, float]:
        """(slerp, vslerp) largest relative gap to LERP over all positions."""
        return max(self.slerp_gap), max(self.vslerp_gap)


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
            centre fitted on the other half.
        centre_norm (`float`): ‖centre‖ of the fitted centre; `offset` compares it with the radius.
        centres (`torch.Tensor`): float32 mean vectors over all captions, `[positions, dim]`:
            every token position (77 for SD1.5) for per-token spaces, one row for EOS spaces.
        raw_norms (`torch.Tensor`), centred_norms (`torch.Tensor`): the held-out norms (plots).
        endpoints (`EndpointStats`, *optional*): SLERP endpoint geometry, when a template is given.
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

    @property
    def offset(self) -> float:
        """‖centre‖ / mean centred norm: how far the mean vector lies from the origin, in radii.

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

    def summary(self) -> str:
        """The conclusion in one sentence, with the numbers it rests on."""
        return _summary(self)

    def report(self) -> str:
        """A few lines: the numbers of both spreads, the endpoints, and the summary."""
        return _report(self)

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN as null); `load_json` reads it back exactly."""
        return _to_json(self)

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
        return _from_json(source)

    def plot_figure(self):
        """Histograms of raw vs centred held-out norms, absolute and relative to their means."""
        return _plot(self)

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


# ---------------------------------------------------------------------------------------------
# Statistics of vectors
# ---------------------------------------------------------------------------------------------


def shell_stats(vectors: torch.Tensor, direction: torch.Tensor) -> ShellStats:
    """Norm spread of `vectors` `[n, dim]`, with the share of var(‖x‖²) along the unit `direction`.

    Args:
        vectors (`torch.Tensor`): `[n, dim]`, any float dtype (computed in float64).
        direction (`torch.Tensor`): `[dim]` unit vector (the mean direction), or zeros.
    """
    x = vectors.double()
    norms = x.norm(dim=1)
    mean, std = norms.mean().item(), norms.std(correction=0).item()
    sq = norms**2
    var_sq = sq.var(correction=0).item()
    share = math.nan
    if math.sqrt(var_sq) > _ROUNDING * sq.mean().item():
        along_sq = (x @ direction.double()) ** 2
        share = ((along_sq - along_sq.mean()) * (sq - sq.mean())).mean().item() / var_sq
    cv = std / mean if mean > 0 else math.nan
    return ShellStats(mean_norm=mean, std_norm=std, cv=cv, var_sq_norm=var_sq, along_mean_share=share)


def held_out_stats(vectors: torch.Tensor) -> tuple[ShellStats, ShellStats, float, torch.Tensor, torch.Tensor]:
    """Raw and centred spreads of the odd rows around the centre of the even rows.

    Interleaving (rather than first/second half) keeps both halves alike when the caption file
    is sorted. Returns `(raw, centred, ‖centre‖, raw_norms, centred_norms)`.

    Args:
        vectors (`torch.Tensor`): `[n, dim]`, n ≥ 2.
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise InvalidInputError(
            f"norm statistics need at least 2 vectors (one half fits the centre, the other is measured); "
            f"got shape {tuple(vectors.shape)}."
        )
    x = vectors.double()
    fit, held = x[0::2], x[1::2]
    centre = fit.mean(dim=0)
    centre_norm = centre.norm().item()
    direction = centre / centre_norm if centre_norm > 0 else torch.zeros_like(centre)
    raw, centred = shell_stats(held, direction), shell_stats(held - centre, direction)
    return raw, centred, centre_norm, held.norm(dim=1).float(), (held - centre).norm(dim=1).float()


def stats_of_vectors(vectors: torch.Tensor, label: str = "vectors") -> NormStats:
    """`NormStats` of vectors given directly (synthetic data, or vectors collected elsewhere).

    Args:
        vectors (`torch.Tensor`): `[n, dim]`.
        label (`str`): what they are, shown as the space in the summary.
    """
    raw, centred, centre_norm, raw_norms, centred_norms = held_out_stats(vectors)
    centres = vectors.double().mean(dim=0, keepdim=True).float()
    return NormStats(label, EOS, 1, "", vectors.shape[0], raw, centred, centre_norm, centres, raw_norms, centred_norms)


def interpolation_gaps(a: torch.Tensor, b: torch.Tensor, centre: torch.Tensor, steps: int = T_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over t of ‖slerp − lerp‖/‖lerp‖ and ‖vslerp − lerp‖/‖lerp‖, per row of `a`, `b` `[p, dim]`.

    LERP is the same path raw or centred (μ + lerp(a−μ, b−μ) = lerp(a, b)), so both gaps are
    measured against it.

    Args:
        a (`torch.Tensor`), b (`torch.Tensor`): endpoints `[p, dim]`.
        centre (`torch.Tensor`): vSLERP centres, `[p, dim]` or `[dim]`.
        steps (`int`): points on [0, 1].
    """
    a, b, centre = a.double(), b.double(), centre.double()
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None, None]  # (steps, 1, 1)
    line = lerp(a, b, t)  # (steps, p, dim)
    scale = line.norm(dim=-1).clamp_min(1e-12)
    gap = ((slerp(a, b, t) - line).norm(dim=-1) / scale).amax(dim=0)
    vgap = ((vslerp(a, b, t, centre) - line).norm(dim=-1) / scale).amax(dim=0)
    return gap, vgap


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def load_captions(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[str]]:
    """Captions, blank ones skipped, and where each came from (`FILE line N` or `caption N`).

    A file is read as UTF-8 (a leading byte-order mark is allowed); bytes that are not UTF-8 are
    an error naming the file and line, rather than decoded with replacement characters, because
    a mangled word tokenizes into different tokens and silently changes the statistics.

    Args:
        source (`str`, `Path` or `list[str]`): a text file with one caption per line (a `str` is
            always a path), or the captions themselves.
    """
    if isinstance(source, (str, os.PathLike)):
        texts, labels = _read_caption_file(Path(source))
        where = f"captions file {source}"
    else:
        if not all(isinstance(text, str) for text in source):
            raise InvalidInputError("captions must be strings (one caption each).")
        kept = [(text.strip(), f"caption {i}") for i, text in enumerate(source, start=1) if text.strip()]
        texts, labels = [t for t, _ in kept], [label for _, label in kept]
        where = "the caption list"
    if not texts:
        raise InvalidInputError(f"{where} has no captions (empty, or only blank lines): give at least 2 captions.")
    return texts, labels


def _read_caption_file(path: Path) -> tuple[list[str], list[str]]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidInputError(f"captions file {path} cannot be read: {err.strerror or err}.") from err
    texts, labels = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInputError(
                f"captions file {path} line {number} is not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                f"byte {err.start + 1} of the line): save the file as UTF-8 and try again."
            ) from err
        text = text.removeprefix("\ufeff").strip() if number == 1 else text.strip()
        if text:
            texts.append(text)
            labels.append(f"{path.name} line {number}")
    return texts, labels


def _tokenize_captions(tokenizer, texts: list[str], labels: list[str]) -> torch.Tensor:
    """Token ids `[n, max_length]`, truncated as the UNet's conditioning is, with a warning."""
    max_length = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]
    too_long = [label for label, n in zip(labels, lengths) if n > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} caption(s) are longer than the model's {max_length} tokens and were truncated, "
            f"as the UNet's conditioning would be (first: {too_long[0]}).",
            stacklevel=3,
        )
    return tokenize(tokenizer, texts)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first end token per row. Not `pooler_output`: with SD1.5's legacy
    `eos_token_id == 2` transformers takes the argmax id, which is an added placeholder token."""
    is_eos = ids == eos_id
    if not bool(is_eos.any(dim=1).all()):
        raise InvalidInputError(f"a tokenized prompt has no end token (id {eos_id}): the tokenizer does not match.")
    return is_eos.int().argmax(dim=1)


def _checked_encoder(text_encoder, space: str, clip_skip: int):
    """The encoder to run: checked for the space, and in float32 (a copy if it is not)."""
    if space == "projected" and getattr(text_encoder, "text_projection", None) is None:
        raise InvalidInputError(
            f"space `projected` needs a text encoder with a text projection (CLIPTextModelWithProjection, "
            f"as in the full CLIP model the double-ellipsoid paper measured); this one "
            f"({type(text_encoder).__name__}, as in SD1.5) has none. Use `pooled` for the same EOS vector "
            "before the projection."
        )
    layers = text_encoder.config.num_hidden_layers
    if space in ("hidden", "hidden_prenorm") and clip_skip > layers:
        raise InvalidInputError(f"`clip_skip` {clip_skip} is more than the text encoder's {layers} layers.")
    if any(p.dtype != torch.float32 for p in text_encoder.parameters()):
        # Statistics in fp16 would measure rounding; copy rather than change the caller's model.
        text_encoder = copy.deepcopy(text_encoder).float()
    return text_encoder


def _encode_space(text_encoder, ids: torch.Tensor, space: str, clip_skip: int, eos_id: int) -> torch.Tensor:
    """Vectors `[b, tokens, dim]` for per-token spaces, `[b, 1, dim]` for `pooled`/`projected`."""
    ids = ids.to(text_encoder.device)
    if space == "token_embedding":
        return text_encoder.get_input_embeddings()(ids)
    if space == "hidden":
        return encode_tokens(text_encoder, ids, clip_skip)
    transformer = text_transformer(text_encoder)
    if space == "hidden_prenorm":
        # hidden_states[-1] is the last layer's output before the final LayerNorm.
        return transformer(ids, output_hidden_states=True).hidden_states[-clip_skip]
    last = transformer(ids).last_hidden_state
    pooled = last[torch.arange(ids.shape[0], device=last.device), _first_eos(ids, eos_id).to(last.device)]
    if space == "projected":
        pooled = text_encoder.text_projection(pooled)
    return pooled[:, None]


def _collect(text_encoder, ids: torch.Tensor, positions: torch.Tensor, config: NormStatsConfig, eos_id: int):
    """The vectors at `positions` `[n, dim]` and the mean over captions at every position, float64."""
    picked, total = [], None
    with torch.no_grad():
        for start in range(0, ids.shape[0], config.batch_size):
            batch = ids[start : start + config.batch_size]
            out = _encode_space(text_encoder, batch, config.space, config.clip_skip, eos_id).double().cpu()
            total = out.sum(dim=0) if total is None else total + out.sum(dim=0)
            rows = torch.arange(out.shape[0])
            picked.append(out[rows, positions[start : start + config.batch_size]])
    return torch.cat(picked), total / ids.shape[0]


def _positions(tokenizer, ids: torch.Tensor, labels: list[str], position, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption: the token index to read, and whether the caption is kept."""
    n, length = ids.shape
    keep = torch.ones(n, dtype=torch.bool)
    if space not in PER_TOKEN_SPACES:
        return torch.zeros(n, dtype=torch.long), keep  # one EOS row per caption
    eos = _first_eos(ids, tokenizer.eos_token_id)
    if position == EOS:
        return eos, keep
    if isinstance(position, int):
        if position >= length:
            raise InvalidInputError(f"`position` {position} is beyond the model's {length} tokens (0..{length - 1}).")
        if int((eos <= position).sum()):
            warnings.warn(
                f"{int((eos <= position).sum())} caption(s) end before position {position}: their vector there "
                "is the end token's or padding's (as the UNet sees it).",
                stacklevel=3,
            )
        return torch.full((n,), position, dtype=torch.long), keep
    word = torch.tensor(tokenizer(position, add_special_tokens=False).input_ids)
    match = (ids.unfold(1, len(word), 1) == word).all(dim=-1)  # (n, windows): word starts here
    keep = match.any(dim=1)
    if not bool(keep.any()):
        raise InvalidInputError(f"no caption contains the word {position!r} given as `position`.")
    if not bool(keep.all()):
        first = labels[int((~keep).nonzero()[0])]
        warnings.warn(f"{int((~keep).sum())} caption(s) without {position!r} are left out (first: {first}).", stacklevel=3)
    return match.int().argmax(dim=1), keep


# ---------------------------------------------------------------------------------------------
# Measuring a text encoder
# ---------------------------------------------------------------------------------------------


def compute_norm_stats(
    tokenizer,
    text_encoder,
    captions: str | os.PathLike | Sequence[str],
    config: NormStatsConfig | None = None,
    placeholder: PlaceholderToken | None = None,
    model_name: str = "",
) -> NormStats:
    """Norm statistics of `config.space` at `config.position` over `captions`.

    Nothing the caller owns is modified: the tokenizer and text encoder are only read (an fp16
    encoder is copied to fp32). To compare a trained placeholder with its class word, add it
    first (`add_placeholder(tokenizer, text_encoder, "tok1", "character", vectors=trained)`) and
    pass the returned `PlaceholderToken`; without one, the endpoints are the class prompt twice.

    Args:
        tokenizer (`CLIPTokenizer`): the model's tokenizer.
        text_encoder (`CLIPTextModel`): its text encoder (`CLIPTextModelWithProjection` for `projected`).
        captions (`str`, `Path` or `list[str]`): caption file (one per line) or captions.
        config (`NormStatsConfig`, *optional*): what to measure (default: `hidden` at EOS).
        placeholder (`PlaceholderToken`, *optional*): a placeholder already added to both.
        model_name (`str`): recorded in the statistics.
    """
    config = config or NormStatsConfig()
    # 1. Check everything before the forward passes.
    encoder = _checked_encoder(text_encoder, config.space, config.clip_skip)
    texts, labels = load_captions(captions)
    prompts = _endpoint_prompts(tokenizer, config, placeholder)
    position = config.position
    if position is None:
        position = prompts.index if prompts is not None else EOS
    ids = _tokenize_captions(tokenizer, texts, labels)
    positions, keep = _positions(tokenizer, ids, labels, position, config.space)
    if int(keep.sum()) < 2:
        raise InvalidInputError(f"norm statistics need at least 2 captions; {int(keep.sum())} can be used.")
    # 2. Encode the captions in batches, then summarise the held-out norms.
    vectors, centres = _collect(encoder, ids[keep], positions[keep], config, tokenizer.eos_token_id)
    raw, centred, centre_norm, raw_norms, centred_norms = held_out_stats(vectors)
    endpoints = None
    if prompts is not None:
        endpoints = _endpoint_stats(encoder, prompts, centres, config, tokenizer.eos_token_id)
    if config.space not in PER_TOKEN_SPACES:
        position = EOS
    return NormStats(
        config.space, position, config.clip_skip, model_name, vectors.shape[0], raw, centred, centre_norm,
        centres.float(), raw_norms, centred_norms, endpoints,
    )


class _EndpointPrompts(NamedTuple):
    prompt: str  # with the placeholder (the class prompt again when no placeholder is given)
    class_prompt: str
    index: int  # the placeholder's first token position
    ids: torch.Tensor  # (2, max_length): prompt, class prompt
    trained: bool


def _endpoint_prompts(tokenizer, config: NormStatsConfig, placeholder: PlaceholderToken | None) -> "_EndpointPrompts | None":
    """The two prompts of the SLERP endpoints, tokenized and checked; None without a template."""
    if config.template is None:
        if placeholder is not None:
            warnings.warn("`placeholder` is ignored because no `template` is given.", stacklevel=3)
        return None
    word = config.class_word.strip()
    class_prompt = config.template.replace("{}", word)
    prefix = config.template[: config.template.index("{}")]
    index = 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids)  # 1 for the start token
    if placeholder is None:
        prompt, first_id = class_prompt, tokenizer(word, add_special_tokens=False).input_ids[0]
    else:
        prompt = placeholder.expand(config.template.replace("{}", placeholder.placeholder))
        first_id = placeholder.token_ids[0]
    ids = tokenize(tokenizer, [prompt, class_prompt])
    if index >= ids.shape[1] - 1 or int(ids[0, index]) != first_id:
        raise InvalidInputError(
            f"`template` {config.template!r} does not put the placeholder at a word boundary within the model's "
            f"{ids.shape[1]} tokens: write it with spaces around `{{}}`, e.g. 'an anime illustration of {{}}'."
        )
    return _EndpointPrompts(prompt, class_prompt, index, ids, placeholder is not None)


def _endpoint_stats(text_encoder, prompts: _EndpointPrompts, centres: torch.Tensor, config: NormStatsConfig, eos_id: int) -> EndpointStats:
    """Angles and SLERP/LERP gaps between the two prompts' vectors, per position."""
    with torch.no_grad():
        out = _encode_space(text_encoder, prompts.ids, config.space, config.clip_skip, eos_id).double().cpu()
    a, b = out[0], out[1]  # (positions, dim)
    angle_raw = torch.rad2deg(angle_between(a, b)).squeeze(-1)
    angle_centred = torch.rad2deg(angle_between(a - centres, b - centres)).squeeze(-1)
    gap, vgap = interpolation_gaps(a, b, centres)
    return EndpointStats(
        prompts.prompt, prompts.class_prompt, prompts.index, prompts.trained,
        angle_raw.tolist(), angle_centred.tolist(), gap.tolist(), vgap.tolist(),
    )


# ---------------------------------------------------------------------------------------------
# Summary, report, JSON, plot
# ---------------------------------------------------------------------------------------------


def _where(stats: NormStats) -> str:
    if isinstance(stats.position, int):
        return f"position {stats.position}"
    return "the EOS vector" if stats.position == EOS else f"the word {stats.position!r}"


def _summary(stats: NormStats) -> str:
    raw, centred = stats.raw.cv, stats.centred.cv
    if not stats.centred.mean_norm > _ROUNDING * stats.raw.mean_norm:
        return (
            f"at {_where(stats)} of `{stats.space}` every caption gives the same vector (the same token there, "
            "after the same tokens), so there is no spread to measure: choose a position inside the captions' words."
        )
    holds = min(raw, centred) < SHELL_CV  # False if both are NaN
    parts = [
        f"shell structure {'holds' if holds else 'does not hold'} at {_where(stats)} of `{stats.space}`: "
        f"CV {raw:.3g} raw, {centred:.3g} centred (held-out; the centre lies {stats.offset:.2f} radii from the origin)"
    ]
    if raw < NEAR_CONSTANT_CV and not centred < raw:
        why = ", as the final LayerNorm makes them" if stats.space in _AFTER_NORM else " (as after a LayerNorm)"
        parts.append(
            f"raw norms are near-constant{why}, so centring cannot lower their spread and this says "
            "nothing against an offset centre"
        )
    elif centred < raw:
        parts.append("centring lowers the CV: the shell is offset from the origin and vSLERP around the stored centres follows it")
    else:
        after_norm = " (taken after the final LayerNorm, which nearly fixes raw norms)" if stats.space in _AFTER_NORM else ""
        parts.append(
            f"centring does not lower the CV{after_norm}: the spread around the centre (thickness or "
            "anisotropy of the shell) is divided by a smaller radius than the raw spread is, so compare the "
            "centre's distance from the origin, not the CVs, to judge the offset"
        )
    if stats.endpoints is not None:
        parts.append(_endpoint_verdict(stats.endpoints))
    return "; ".join(parts) + "."


def _endpoint_verdict(endpoints: EndpointStats) -> str:
    if not endpoints.trained:
        return (
            "no trained placeholder embedding was given, so the SLERP endpoints coincide (the placeholder "
            "starts as its class word) and the SLERP/vSLERP choice cannot be judged yet"
        )
    gap, vgap = endpoints.max_gap
    text = f"slerp and lerp differ by at most {gap:.2%} between the endpoints (vslerp: {vgap:.2%})"
    if max(gap, vgap) < IMMATERIAL_GAP:
        return text + ", so the SLERP/vSLERP choice is immaterial here"
    return text + ", so the SLERP/vSLERP choice matters here"


def _report(stats: NormStats) -> str:
    n_fit = (stats.num_captions + 1) // 2
    lines = [
        f"space `{stats.space}` at {_where(stats)}, clip_skip {stats.clip_skip}, model {stats.model or '?'}: "
        f"{stats.num_captions} captions ({n_fit} fit the centre, {stats.num_captions - n_fit} are measured)",
        f"{'':8} {'mean norm':>11} {'std norm':>11} {'CV':>9} {'var(|x|^2)':>12} {'along-mean':>11}",
    ]
    for name, s in (("raw", stats.raw), ("centred", stats.centred)):
        lines.append(
            f"{name:8} {s.mean_norm:11.5g} {s.std_norm:11.4g} {s.cv:9.4g} {s.var_sq_norm:12.4g} {s.along_mean_share:11.3g}"
        )
    lines.append(f"centre norm {stats.centre_norm:.5g} ({stats.offset:.3g} radii from the origin)")
    e = stats.endpoints
    if e is not None:
        i = min(e.index, len(e.angle_raw) - 1)
        lines.append(
            f"endpoints {e.placeholder_prompt!r} vs {e.class_prompt!r}: angle at position {e.index} "
            f"{e.angle_raw[i]:.4g} deg raw, {e.angle_centred[i]:.4g} deg centred; max |slerp-lerp|/|lerp| "
            f"{e.max_gap[0]:.3%}, vslerp {e.max_gap[1]:.3%}"
        )
    lines.append("conclusion: " + stats.summary())
    return "\n".join(lines)


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value


def _none_to_nan(value):
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return value


def _to_json(stats: NormStats) -> dict:
    return _nan_to_none({
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "summary": stats.summary(),
        "space": stats.space,
        "position": stats.position,
        "clip_skip": stats.clip_skip,
        "model": stats.model,
        "num_captions": stats.num_captions,
        "raw": asdict(stats.raw),
        "centred": asdict(stats.centred),
        "centre_norm": stats.centre_norm,
        "offset": stats.offset,  # derived; ignored when loading
        "endpoints": None if stats.endpoints is None else asdict(stats.endpoints),
        "centres": stats.centres.tolist(),
        "raw_norms": stats.raw_norms.tolist(),
        "centred_norms": stats.centred_norms.tolist(),
    })


def _from_json(source) -> NormStats:
    if isinstance(source, dict):
        data = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidInputError(f"norm statistics file {source} cannot be read as JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT or data.get("version") != JSON_VERSION:
        raise InvalidInputError(
            f"{source if not isinstance(source, dict) else 'the data'} is not a norm statistics file "
            f"(expected format {JSON_FORMAT!r} version {JSON_VERSION}): write one with `norm-stats --out`."
        )
    try:
        return _stats_from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidInputError(f"norm statistics {source if not isinstance(source, dict) else 'data'} are incomplete or damaged: {err!r}.") from err


def _stats_from_dict(data: dict) -> NormStats:
    def shell(d: dict) -> ShellStats:
        return ShellStats(**{f.name: _none_to_nan(d[f.name]) for f in fields(ShellStats)})

    e = data["endpoints"]
    endpoints = None if e is None else EndpointStats(**{f.name: _none_to_nan(e[f.name]) for f in fields(EndpointStats)})
    return NormStats(
        data["space"], data["position"], data["clip_skip"], data["model"], data["num_captions"],
        shell(data["raw"]), shell(data["centred"]), _none_to_nan(data["centre_norm"]),
        torch.tensor(data["centres"], dtype=torch.float32), torch.tensor(data["raw_norms"], dtype=torch.float32),
        torch.tensor(data["centred_norms"], dtype=torch.float32), endpoints,
    )


def _plot(stats: NormStats):
    figure = new_figure(9.0, 3.6)
    panels = figure.subplots(1, 2)
    sets = [("raw", stats.raw_norms.double().numpy(), stats.raw), ("centred", stats.centred_norms.double().numpy(), stats.centred)]
    for panel, relative in zip(panels, (False, True)):
        values = [v / s.mean_norm if relative else v for _, v, s in sets if not relative or s.mean_norm > 0]
        # Shared bins, so a near-constant set shows as one tall bar rather than an invisible sliver.
        edges = np.histogram_bin_edges(np.concatenate(values), bins=40)
        for (name, _, s), v in zip(sets, values):
            panel.hist(v, bins=edges, alpha=0.6, label=f"{name} (CV {s.cv:.3g})")
        panel.legend(fontsize=8)
    panels[0].set(xlabel="norm ‖x‖", ylabel="captions", title="norms")
    panels[1].set(xlabel="norm / mean norm", title="relative spread (compare these)")
    figure.suptitle(f"`{stats.space}` at {_where(stats)}: held-out norms of {len(stats.raw_norms)} captions", fontsize=10)
    return figure


# ---------------------------------------------------------------------------------------------
# Synthetic data with known answers (tests, docs/norm-stats.md)
# ---------------------------------------------------------------------------------------------


def synthetic_shell(num: int, centre, radii, thickness: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Points `c + r·A·v` on an offset ellipsoid shell, float64 `[num, dim]`.

    v is uniform on the unit sphere, A = diag(`radii`), and r = 1 + thickness·N(0, 1) makes the
    shell thick (a fraction `thickness` of each radius).

    Args:
        num (`int`): number of points.
        centre (`torch.Tensor`): `[dim]` centre c.
        radii (`torch.Tensor` or `float`): semi-axes `[dim]` (a float gives a sphere).
        thickness (`float`): relative radial standard deviation.
        seed (`int`): random seed.
    """
    generator = torch.Generator().manual_seed(seed)
    centre = torch.as_tensor(centre, dtype=torch.float64)
    radii = torch.as_tensor(radii, dtype=torch.float64).expand_as(centre)
    v = torch.randn(num, centre.shape[0], generator=generator, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    r = 1 + thickness * torch.randn(num, 1, generator=generator, dtype=torch.float64)
    return centre + r * v * radii


def shell_expectations(centre, radii, thickness: float = 0.0) -> dict[str, ShellStats]:
    """Closed-form `ShellStats` ("raw", "centred") of `synthetic_shell`'s distribution.

    var(‖x‖²) and the along-mean share are exact (moments of the uniform sphere:
    E v_i² = 1/d, E v_i⁴ = 3/(d(d+2)), E v_i²v_j² = 1/(d(d+2))); the mean and std of ‖x‖ are
    second-order delta-method approximations from E‖x‖² and var(‖x‖²). With y = r·A·v,
    ‖x‖² = ‖c‖² + 2‖c‖⟨y,u⟩ + ‖y‖², so centring removes exactly the along-mean terms.

    Args:
        centre (`torch.Tensor`): `[dim]` centre.
        radii (`torch.Tensor` or `float`): semi-axes.
        thickness (`float`): relative radial standard deviation.
    """
    c = torch.as_tensor(centre, dtype=torch.float64)
    a2 = torch.as_tensor(radii, dtype=torch.float64).expand_as(c) ** 2
    d, s = c.shape[0], thickness
    er2, er4 = 1 + s**2, 1 + 6 * s**2 + 3 * s**4  # E r², E r⁴ for r = 1 + s·N(0,1)
    s2, s4 = a2.sum().item(), (a2**2).sum().item()
    eq, eq2 = s2 / d, (2 * s4 + s2**2) / (d * (d + 2))  # E‖Av‖², E‖Av‖⁴
    cn2 = (c**2).sum().item()
    u2 = c**2 / cn2 if cn2 > 0 else torch.zeros_like(c)
    w = (a2 * u2).sum().item() / d  # E⟨Av, u⟩²
    along_var = er2 * w  # var of ⟨y, u⟩ (its mean is 0)
    # cov(⟨y,u⟩², ‖y‖²): E⟨Av,u⟩²‖Av‖² = Σ a_i² u_i² (2a_i² + Σa²) / (d(d+2)), odd moments vanish.
    cov_b2 = er4 * (a2 * u2 * (2 * a2 + s2)).sum().item() / (d * (d + 2)) - er2**2 * w * eq
    var_centred = er4 * eq2 - er2**2 * eq**2
    var_raw = var_centred + 4 * cn2 * along_var

    def stats(mean_sq: float, var: float, share: float) -> ShellStats:
        mean = math.sqrt(mean_sq) - var / (8 * mean_sq**1.5)
        std = math.sqrt(var) / (2 * math.sqrt(mean_sq))
        return ShellStats(mean, std, std / mean, var, share)

    return {
        "raw": stats(cn2 + er2 * eq, var_raw, (4 * cn2 * along_var + cov_b2) / var_raw),
        "centred": stats(er2 * eq, var_centred, cov_b2 / var_centred if var_centred > 0 else math.nan),
    }


def synthetic_layernorm(num: int, dim: int, spread: float = 1.0, weight=None, bias=None, seed: int = 0) -> torch.Tensor:
    """LayerNorm outputs of Gaussian inputs around a random mean, float64 `[num, dim]`.

    With unit gain and zero bias every output has norm √dim (up to LayerNorm's eps) whatever the
    input: the raw norms are fixed by construction, as in CLIP's `hidden` and `pooled` spaces.

    Args:
        num (`int`): number of vectors.
        dim (`int`): width.
        spread (`float`): input standard deviation around the (standard normal) input mean.
        weight (`torch.Tensor`, *optional*): LayerNorm gain `[dim]`.
        bias (`torch.Tensor`, *optional*): LayerNorm bias `[dim]`.
        seed (`int`): random seed.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    inputs = mean + spread * torch.randn(num, dim, generator=generator, dtype=torch.float64)
    as64 = (lambda t: None if t is None else torch.as_tensor(t, dtype=torch.float64))
    return torch.nn.functional.layer_norm(inputs, (dim,), as64(weight), as64(bias))
