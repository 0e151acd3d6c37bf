"""Norm statistics of every text encoder of a model, and the vSLERP centres of its whole conditioning.

A one-encoder family (SD1.5) gives a `NormStats`, as `compute_norm_stats` does. A family with
several encoders (SDXL: CLIP-L, bigG) gives a `PerEncoderNormStats`: one `NormStats` per encoder,
each measured in its own space (the regulariser interpolates each encoder's block separately), and,
for the `hidden` space, the mean of the pooled conditioning over the same captions (SDXL: bigG's
projected EOS vector, `text_embeds`). Its `centre_for_positions()` is the encoders' per-position
centres side by side in family order (`[77, 768 + 1280]`), the layout of the UNet's conditioning;
`pooled_centre()` is the pooled mean (`[1280]`): the two centres `RegularizerConfig` takes.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..checks import check_finite
from ..errors import InvalidInputError
from ..metrics.plots import figure_to_array, new_figure, save_png
from ..models import DEFAULT_FAMILY, ModelFamily, get_family
from ..placeholder import PlaceholderToken, placeholder_in_tokenizers
from ..safe_write import atomic_write
from ..training.text_conditioning import tokenize
from . import report as _report
from .captions import load_captions
from .compute import NormStats, NormStatsConfig, compute_norm_stats
from .spaces import checked_encoder, collect_vectors

FORMAT = "pti_ops.norm_stats.per_encoder"
VERSION = 1
POOLED_SPACE = "projected"  # the pooled conditioning is the projected EOS vector (SDXL's `text_embeds`)


@dataclass
class PerEncoderNormStats:
    """Norm statistics of one space, measured on each text encoder of a multi-encoder model.

    Args:
        family (`str`): the model family's name (which fixes the encoders and their order).
        encoders (`dict[str, NormStats]`): per embedding key (`clip_l`, `clip_g`), in family order;
            the encoders that were measured (`NormStatsConfig.encoder` may pick one).
        pooled_mean (`torch.Tensor`, *optional*): float32 `[pooled_dim]`, the mean pooled conditioning
            of the captions (SDXL: bigG's `text_embeds`), measured with the `hidden` space when the
            encoder that gives it was measured; None otherwise.
    """

    family: str
    encoders: dict[str, NormStats]
    pooled_mean: torch.Tensor | None = None

    @property
    def space(self) -> str:
        """The space measured (the same on every encoder)."""
        return next(iter(self.encoders.values())).space

    @property
    def model(self) -> str:
        return next(iter(self.encoders.values())).model

    def centre_for_positions(self, positions: Sequence[int] | slice | None = None) -> torch.Tensor:
        """The vSLERP centres of the whole conditioning, `[len(positions), sum(widths)]`: every encoder's
        `NormStats.centre_for_positions` side by side in family order (SDXL `hidden`: `[77, 2048]`).

        Args:
            positions (`list[int]` or `slice`, *optional*): token positions to return (all when None).
        """
        self._check_every_encoder("centre_for_positions")
        return torch.cat([stats.centre_for_positions(positions) for stats in self.encoders.values()], dim=-1)

    def pooled_centre(self) -> torch.Tensor | None:
        """The vSLERP centre of the pooled conditioning, `[pooled_dim]` (SDXL: `[1280]`); None when not measured."""
        return None if self.pooled_mean is None else self.pooled_mean.clone()

    def _check_every_encoder(self, what: str) -> None:
        family = get_family(self.family)
        missing = [key for key in family.embedding_keys if key not in self.encoders]
        if missing:
            raise InvalidInputError(
                f"these norm statistics measured {', '.join(self.encoders)} only, but {family.display_name}'s "
                f"conditioning is every text encoder's block side by side ({' + '.join(family.embedding_keys)}), so "
                f"{what} needs them all (missing {', '.join(missing)}): measure every encoder (leave `encoder` empty, "
                "or --encoder all)."
            )

    def summary(self) -> str:
        """Each encoder's conclusion, one per line."""
        return "\n".join(f"{key}: {stats.summary()}" for key, stats in self.encoders.items())

    def report(self) -> str:
        """Each encoder's report under its name, and the pooled centre."""
        parts = [f"text encoder {key} ({stats.centres.shape[-1]} wide)\n{stats.report()}" for key, stats in self.encoders.items()]
        if self.pooled_mean is not None:
            parts.append(f"pooled conditioning centre: mean of the captions' {POOLED_SPACE} EOS vectors, "
                         f"{self.pooled_mean.shape[0]} wide, norm {self.pooled_mean.norm():.5g}")  # fmt: skip
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        """A JSON-ready dict: each encoder's `NormStats.to_json()`, the pooled mean; `load_json` reads it back exactly."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "family": self.family,
            "summary": {key: stats.summary() for key, stats in self.encoders.items()},
            "encoders": {key: stats.to_json() for key, stats in self.encoders.items()},
            "pooled_centre": None if self.pooled_mean is None else self.pooled_mean.tolist(),
        }

    def save_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `to_json()` atomically (one line per encoder).

        Args:
            path (`str`): output `.json` file.
            overwrite (`bool`): replace an existing file.
        """
        data = self.to_json()
        lines = [f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in data.items() if key != "encoders"]
        encoders = [f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in data["encoders"].items()]
        lines.insert(4, ' "encoders": {\n' + ",\n".join(encoders) + "\n }")
        text = "{\n" + ",\n".join(lines) + "\n}\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)

    @classmethod
    def load_json(cls, source: str | os.PathLike | dict) -> "PerEncoderNormStats":
        """Read statistics written by `save_json` (a path) or `to_json` (a dict)."""
        data = source if isinstance(source, dict) else _read_json(source)
        name = "the data" if isinstance(source, dict) else str(source)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise InvalidInputError(f"{name} is not a per-encoder norm statistics file (expected format {FORMAT!r} "
                                    f"version {VERSION}): write one with `norm-stats --out`.")  # fmt: skip
        try:
            family = get_family(data["family"])
            encoders = {key: NormStats.load_json(data["encoders"][key]) for key in family.embedding_keys if key in data["encoders"]}
            unknown = sorted(set(data["encoders"]) - set(encoders))
            pooled = data["pooled_centre"]
        except (KeyError, TypeError) as err:
            raise InvalidInputError(f"norm statistics {name} are incomplete or damaged: {err!r}.") from err
        if unknown or not encoders:
            raise InvalidInputError(f"norm statistics {name} hold encoders {sorted(data['encoders'])}, not those of "
                                    f"{family.display_name} ({', '.join(family.embedding_keys)}).")  # fmt: skip
        # JSON has no NaN: a null in the list is one, which `check_finite` refuses with the file's name.
        pooled = None if pooled is None else torch.tensor([math.nan if v is None else v for v in pooled], dtype=torch.float32)
        if pooled is not None:
            check_finite(pooled, f"the pooled vSLERP centre of norm statistics {name}")
        return cls(family.name, encoders, pooled)

    def plot_figure(self):
        """Each encoder's histograms of raw vs centred held-out norms, one row per encoder."""
        figure = new_figure(9.0, 3.6 * len(self.encoders))
        rows = figure.subplots(len(self.encoders), 2, squeeze=False)
        for panels, (key, stats) in zip(rows, self.encoders.items()):
            _report.plot_into(panels, stats, label=key)
        first = next(iter(self.encoders.values()))
        figure.suptitle(f"`{self.space}` at {_report.where(first)}: held-out norms of {len(first.raw_norms)} captions", fontsize=10)
        return figure

    def plot_image(self) -> np.ndarray:
        """The plot as a `[height, width, 3]` float32 array in [0, 1]."""
        return figure_to_array(self.plot_figure())

    def save_plot(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the plot as PNG atomically."""
        return save_png(self.plot_figure(), path, overwrite=overwrite)


def measure_norm_stats(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    captions: str | os.PathLike | Sequence[str],
    config: NormStatsConfig | None = None,
    placeholder: PlaceholderToken | None = None,
    family: ModelFamily = DEFAULT_FAMILY,
    model_name: str = "",
) -> "NormStats | PerEncoderNormStats":
    """Norm statistics of a model's text encoders (`config.encoder`, or all of them).

    Args:
        tokenizers (`Sequence`): the model's tokenizers in family order (`bundle.tokenizers`).
        text_encoders (`Sequence`): its text encoders in the same order (`bundle.text_encoders`).
        captions (`str`, `Path` or `list[str]`): caption file (one per line) or captions.
        config (`NormStatsConfig`, *optional*): what to measure.
        placeholder (`PlaceholderToken`, *optional*): a trained placeholder already in every tokenizer
            (any tokenizer's token: `Pivot.apply(bundle)`), for the SLERP endpoints.
        family (`ModelFamily`): the model's family.
        model_name (`str`): recorded in the statistics.

    Returns a `NormStats` for a one-encoder family (SD1.5), else a `PerEncoderNormStats`.
    """
    config = config or NormStatsConfig()
    family = get_family(family)
    keys = family.embedding_keys
    if len(tokenizers) != len(keys) or len(text_encoders) != len(keys):
        raise InvalidInputError(f"{family.display_name} models have {len(keys)} text encoder(s) ({', '.join(keys)}); "
                                f"got {len(text_encoders)} encoder(s) and {len(tokenizers)} tokenizer(s).")  # fmt: skip
    config.check_family(family)
    picked = [i for i, key in enumerate(keys) if config.encoder in (None, key)]
    _check_projection(family, text_encoders, picked, config.space)
    tokens = None if placeholder is None else placeholder_in_tokenizers(tokenizers, placeholder)
    measured = {
        keys[i]: compute_norm_stats(tokenizers[i], text_encoders[i], captions, config, None if tokens is None else tokens[i],
                                    model_name, family)  # fmt: skip
        for i in picked
    }
    if len(keys) == 1:
        return measured[keys[0]]
    pooled = None
    pooling = [i for i in picked if family.text_encoders[i].with_projection]
    if config.space == "hidden" and pooling:  # the conditioning space: the regulariser also needs the pooled centre
        pooled = pooled_mean(tokenizers[pooling[0]], text_encoders[pooling[0]], captions, config.batch_size)
    return PerEncoderNormStats(family.name, measured, pooled)


def pooled_mean(tokenizer, text_encoder, captions, batch_size: int) -> torch.Tensor:
    """The mean projected EOS vector (the pooled conditioning) of the captions, float32 `[pooled_dim]`."""
    texts, _ = load_captions(captions)
    ids = tokenize(tokenizer, texts)
    encoder = checked_encoder(text_encoder, POOLED_SPACE, 1)
    rows = torch.zeros(ids.shape[0], dtype=torch.long)  # the single EOS row of each caption
    _, means = collect_vectors(encoder, ids, rows, POOLED_SPACE, 1, batch_size, tokenizer.eos_token_id)
    return means[0].float()


def _check_projection(family: ModelFamily, text_encoders, picked: list[int], space: str) -> None:
    if space != POOLED_SPACE or len(family.text_encoders) == 1:
        return  # one encoder: `checked_encoder` says it in SD1.5's words
    without = [family.text_encoders[i].name for i in picked if getattr(text_encoders[i], "text_projection", None) is None]
    if without:
        having = [spec.name for spec, encoder in zip(family.text_encoders, text_encoders)
                  if getattr(encoder, "text_projection", None) is not None]  # fmt: skip
        raise InvalidInputError(
            f"space `projected` needs a text encoder with a text projection; {family.display_name}'s "
            f"{', '.join(without)} has none: set `encoder` to {' or '.join(having) or 'an encoder that has one'}."
        )


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInputError(f"norm statistics file {path} cannot be read as JSON: {err}") from err


def load_norm_stats(source: str | os.PathLike | dict) -> "NormStats | PerEncoderNormStats":
    """Read any norm statistics file: one encoder's (`NormStats`) or a model's per encoder (`PerEncoderNormStats`)."""
    data = source if isinstance(source, dict) else _read_json(source)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return PerEncoderNormStats.load_json(data)
    return NormStats.load_json(source if not isinstance(source, dict) else data)
