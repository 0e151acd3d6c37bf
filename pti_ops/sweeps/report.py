"""A sweep's result: its table (CSV, JSON, Markdown), plots and image grids, written atomically.

A row is one evaluated model (inversion: one learning rate at one recorded step; LoRA: one
learning rate with one regulariser) with flat values, a value of None meaning "not computed" and
`row["reasons"][column]` saying why. Plots and grids are float `[H, W, 3]` arrays in [0, 1] (one
ComfyUI IMAGE each), made by `plots.py`.
"""

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image

from ..errors import InvalidInputError
from ..safe_write import atomic_write
from ..metrics.scores import METRIC_DESCRIPTIONS

SweepKind = Literal["inversion", "lora"]
SWEEP_KINDS: tuple[str, ...] = ("inversion", "lora")

# What each column means, in one line (the metric columns keep metrics.py's descriptions).
COLUMN_DESCRIPTIONS: dict[str, str] = {
    "run": "which run the row comes from: `lr=…` (inversion), `REGULARISER lr=…` (LoRA), `initial` (the initializer's embedding) or `base` (no LoRA).",
    "lr": "learning rate of the run.",
    "regularizer": "locality regulariser of the LoRA run (`none` = off).",
    "step": "optimiser step the row was measured at.",
    "lr_x_steps": "learning rate × step: the distance the notes expect, up to a constant.",
    "distance": "||e - e0||, measured: how far the token moved from its initializer.",
    "norm": "mean ||e|| of the placeholder vectors.",
    "cosine": "mean cos(e, e0).",
    "nearest": "vocabulary tokens nearest to each placeholder vector.",
    "loss": "mean training loss over the steps since the previous record (inversion) or at the last record (LoRA).",
    "reg_loss": "locality-regulariser loss at the last record (LoRA, when a regulariser is on).",
    "stopped": "why the run stopped early (diverged), empty when it ran all its steps.",
    "embedding_file": "the evaluated embedding, saved in the report folder (loads like any trained embedding).",
    "lora_file": "the tuned LoRA, saved in the report folder (kohya format, loads in ComfyUI and diffusers).",
    **METRIC_DESCRIPTIONS,
    "edit_drift_lpips": "LPIPS between each edit prompt's image with the placeholder and with the class word, same seed, mean "
    "(0 at the initializer; grows as the token takes over the prompt; CLIP-free editability proxy, lower = more class-like).",
    "edit_drift_l2": "mean squared RGB difference of the same pairs as edit_drift_lpips (the proxy without LPIPS).",
}
# Per-encoder columns (`clip_g_distance`, …): a family with several text encoders measures each one's vectors.
PER_ENCODER_COLUMNS = ("distance", "norm", "cosine")


def column_description(name: str) -> str:
    """What a column means (empty for an unknown one); `KEY_distance` etc. are the named encoder's."""
    if name in COLUMN_DESCRIPTIONS:
        return COLUMN_DESCRIPTIONS[name]
    key, _, measure = name.rpartition("_")
    if key and measure in PER_ENCODER_COLUMNS:
        return f"{COLUMN_DESCRIPTIONS[measure][:-1]}, of the `{key}` text encoder's vectors (in its own vocabulary's space)."
    return ""


GRID_CELL = 128  # pixels: grid thumbnails are at most this side, so a long sweep's grid stays small


def check_sweep_kind(kind: str) -> str:
    """`kind` if it is a sweep kind, else a clear error."""
    if kind not in SWEEP_KINDS:
        raise InvalidInputError(f"sweep kind must be one of {', '.join(SWEEP_KINDS)}, got {kind!r}.")
    return kind


@dataclass
class SweepReport:
    """The rows, the summary numbers, the settings, plots and grids of one sweep.

    Args:
        kind (`str`): `inversion` or `lora`.
        rows (`list[dict]`): one per evaluated model; `reasons` maps a column to why it is None.
        summary (`dict`): the fit of distance vs lr × steps and the knee (inversion), the onset of
            position learning per regulariser (LoRA), with reasons where they are missing.
        settings (`dict`): JSON-ready inputs (model, configs, seeds, prompts).
        traces (`dict[str, list[dict]]`): per inversion run, every history record (step, lr_x_steps,
            distance, norm, cosine, loss): the points of the distance fit.
        plots (`dict[str, np.ndarray]`): name → `[H, W, 3]` figure.
        grids (`dict[str, np.ndarray]`): name → `[H, W, 3]` image grid (rows = runs, columns = seeds).
        files (`dict[str, callable]`): path inside the report folder → `write(path, overwrite)` of a model
            file (the evaluated embeddings, the tuned LoRAs), named in the rows' `*_file` columns.
    """

    kind: SweepKind
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    traces: dict[str, list[dict]] = field(default_factory=dict)
    plots: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    grids: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    files: dict[str, Callable[[Path, bool], Path]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_sweep_kind(self.kind)

    @property
    def columns(self) -> list[str]:
        """Column names in first-seen order (the `reasons` dict is not a column)."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update((key, None) for key in row if key != "reasons")
        return list(seen)

    def column(self, name: str) -> list:
        """The values of one column, None where a row lacks it."""
        return [row.get(name) for row in self.rows]

    @property
    def not_computed(self) -> dict[str, str]:
        """Columns that are None in every row, with the reason the first row gives."""
        out = {}
        for name in self.columns:
            if self.rows and all(row.get(name) is None for row in self.rows):
                reasons = [row.get("reasons", {}).get(name) for row in self.rows]
                out[name] = next((r for r in reasons if r), "not measured")
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "settings": self.settings, "summary": self.summary, "columns": self.columns,
                "descriptions": {c: column_description(c) for c in self.columns},
                "not_computed": self.not_computed, "rows": self.rows, "traces": self.traces}

    def to_csv(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the rows as CSV (one header line; an empty cell = not computed; full float precision)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in self.columns])
        text = buffer.getvalue()
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)

    def to_json(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write everything but the images as indented JSON (non-finite numbers become null)."""
        text = json.dumps(_finite(self.to_dict()), indent=2, default=str) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)

    def to_markdown(self) -> str:
        """The summary, the table (`n/c` = not computed), the reasons and what each column means."""
        lines = [f"# {'Inversion' if self.kind == 'inversion' else 'LoRA'} learning-rate sweep", ""]
        lines += [f"- {key}: {_short(value)}" for key, value in self.summary.items()]
        columns = self.columns
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
        if self.not_computed:
            lines += ["", "Not computed:"] + [f"- {name}: {reason}" for name, reason in self.not_computed.items()]
        lines += ["", "Columns:"] + [f"- {c}: {column_description(c)}" for c in columns if column_description(c)]
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """Write `sweep.csv`, `sweep.json`, `sweep.md`, `plots/NAME.png`, `grids/NAME.png` and the model files into `folder`."""
        folder = Path(folder)
        markdown = self.to_markdown()
        written = [self.to_csv(folder / "sweep.csv", overwrite), self.to_json(folder / "sweep.json", overwrite),
                   atomic_write(folder / "sweep.md", lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"), overwrite=overwrite)]
        for sub, images in (("plots", self.plots), ("grids", self.grids)):
            written += [save_image(folder / sub / f"{name}.png", image, overwrite) for name, image in images.items()]
        written += [write(folder / relative, overwrite) for relative, write in self.files.items()]
        return written


def save_image(path: str | Path, image: np.ndarray, overwrite: bool = False) -> Path:
    """Write a float `[H, W, 3]` image in [0, 1] as PNG, atomically."""
    data = (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(data).save(tmp, format="PNG"), overwrite=overwrite)


def _finite(value):
    """`value` with NaN/inf floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _cell(value) -> str:
    if value is None:
        return "n/c"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _short(value) -> str:
    if value is None or value == {}:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return str(value)
