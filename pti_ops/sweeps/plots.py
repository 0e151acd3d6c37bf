"""Plots and image grids of a sweep, as float `[H, W, 3]` arrays (see `plots.py`: no pyplot).

Inversion: reconstruction and editability against measured distance, one line per learning rate,
the knee marked; measured distance against lr × steps with the fitted line. LoRA: reconstruction,
diversity, position spread and locality against the learning rate, one line per regulariser, the
base model dashed and the onset of position learning marked. Grids: a row per run (and step), a
column per seed.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics.plots import figure_to_array, new_figure
from ..metrics.sampling import image_grid
from .report import GRID_CELL, SweepReport

# How to read each plotted measure, shown on its axis.
AXIS_HINTS = {
    "reconstruction_lpips": "lower = closer", "reconstruction_l2": "lower = closer", "reconstruction_clip": "higher = closer",
    "editability_clip": "higher = follows edits", "edit_drift_lpips": "lower = more class-like",
    "edit_drift_l2": "lower = more class-like", "locality_eps_mse": "0 = nothing else changed",
    "diversity_lpips": "low = collapsed", "position_spread": "low = positions learned",
}


def axis_label(name: str) -> str:
    """Metric name with how to read it, for an axis."""
    return f"{name} ({AXIS_HINTS[name]})" if name in AXIS_HINTS else name


def inversion_plots(report: SweepReport) -> dict[str, np.ndarray]:
    """`inversion_curves` (reconstruction, editability vs distance) and `distance_fit`."""
    return {"inversion_curves": _inversion_curves(report), "distance_fit": _distance_fit(report)}


def _inversion_curves(report: SweepReport) -> np.ndarray:
    axes_names = report.summary.get("knee_axes", {})
    knee = report.summary.get("knee")
    initial = [row for row in report.rows if row["run"] == "initial"]
    runs = [run for run in dict.fromkeys(row["run"] for row in report.rows) if run != "initial"]
    figure = new_figure(11, 4.2)
    for position, role in enumerate(("reconstruction", "editability"), 1):
        ax = figure.add_subplot(1, 2, position)
        name = axes_names.get(role)
        if name is None:
            _not_computed(ax, f"{role}: {report.summary.get('knee_reason', 'not computed')}")
            continue
        for run in runs:
            rows = initial + sorted((r for r in report.rows if r["run"] == run), key=lambda r: r["step"])
            points = [(r["distance"], r[name]) for r in rows if r.get(name) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=run)
        if knee:
            ax.axvline(knee["distance"], color="black", linestyle="--", linewidth=1)
            ax.plot([knee["distance"]], [knee["row_values"][role]], marker="*", markersize=14, color="black",
                    linestyle="none", label=f"knee ({knee['run']}, step {knee['step']})")
        ax.set_xlabel("measured distance ||e - e0||")
        ax.set_ylabel(axis_label(name))
        ax.set_title(f"{role} vs distance")
        ax.legend(fontsize=7)
    return figure_to_array(figure)


def _distance_fit(report: SweepReport) -> np.ndarray:
    figure = new_figure(6, 4.2)
    ax = figure.add_subplot(1, 1, 1)
    top = 0.0
    for run, trace in report.traces.items():
        xs, ys = [p["lr_x_steps"] for p in trace], [p["distance"] for p in trace]
        ax.plot(xs, ys, marker=".", linestyle="-", label=run)
        top = max([top, *xs])
    fit = report.summary.get("distance_fit")
    if fit and top > 0:
        r2 = "n/a" if fit["r_squared"] is None else f"{fit['r_squared']:.3f}"
        ax.plot([0, top], [0, fit["slope"] * top], color="black", linestyle="--",
                label=f"fit: distance = {fit['slope']:.4g} x lr x steps (R2 {r2})")
    ax.set_xlabel("lr x steps")
    ax.set_ylabel("measured distance ||e - e0||")
    ax.set_title("distance vs lr x steps")
    ax.legend(fontsize=7)
    return figure_to_array(figure)


LORA_PANELS = (("reconstruction_lpips", "reconstruction_l2"), ("diversity_lpips",), ("position_spread",), ("locality_eps_mse",))


def lora_plots(report: SweepReport) -> dict[str, np.ndarray]:
    """`lora_curves`: one panel per measure against lr, one line per regulariser."""
    base = next((row for row in report.rows if row["run"] == "base"), None)
    regularizers = list(dict.fromkeys(row["regularizer"] for row in report.rows if row["run"] != "base"))
    onset = report.summary.get("onset_lr", {})
    figure = new_figure(10, 7)
    for position, names in enumerate(LORA_PANELS, 1):
        ax = figure.add_subplot(2, 2, position)
        name = next((n for n in names if any(v is not None for v in report.column(n))), None)
        if name is None:
            _not_computed(ax, f"{names[0]}: {report.not_computed.get(names[0], 'not computed')}")
            continue
        for reg in regularizers:
            rows = sorted((r for r in report.rows if r["regularizer"] == reg and r["run"] != "base"), key=lambda r: r["lr"])
            points = [(r["lr"], r[name]) for r in rows if r.get(name) is not None]
            if points:
                line = ax.plot(*zip(*points), marker="o", label=reg)[0]
                if name == "position_spread" and onset.get(reg) is not None:
                    ax.axvline(onset[reg], color=line.get_color(), linestyle=":", linewidth=1.5, label=f"onset {reg}")
        if base is not None and base.get(name) is not None:
            ax.axhline(base[name], color="gray", linestyle="--", linewidth=1, label="base (no LoRA)")
            if name == "position_spread":
                limit = report.summary.get("onset_fraction", 0.5) * base[name]
                ax.axhline(limit, color="gray", linestyle=":", linewidth=1, label="onset threshold")
        ax.set_xscale("log")
        ax.set_xlabel("LoRA learning rate")
        ax.set_ylabel(axis_label(name))
        ax.legend(fontsize=7)
    return {"lora_curves": figure_to_array(figure)}


def _not_computed(ax, text: str) -> None:
    ax.text(0.5, 0.5, f"not computed:\n{text}", ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
    ax.set_axis_off()


class GridCollector:
    """Collects one row of thumbnails (one per seed) per run and set, then tiles them with `image_grid`.

    Args:
        seeds (`list[int]`): the columns.
        cell (`int`): thumbnail side in pixels (images are only ever shrunk).
    """

    def __init__(self, seeds: list[int], cell: int = GRID_CELL):
        self.seeds, self.cell = list(seeds), cell
        self.rows: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def add(self, grid: str, label: str, images: torch.Tensor) -> None:
        """Add `images` `[n_seeds, H, W, 3]` in [0, 1] as a row labelled `label` of grid `grid`."""
        x = images[: len(self.seeds)].float().permute(0, 3, 1, 2)
        side = max(x.shape[-2:])
        if side > self.cell:
            x = F.interpolate(x, scale_factor=self.cell / side, mode="bilinear", align_corners=False, antialias=True)
        thumbs = (x.clamp(0, 1).permute(0, 2, 3, 1) * 255 + 0.5).to(torch.uint8)  # uint8: a long sweep stays small
        self.rows.setdefault(grid, []).append((label, thumbs))

    def build(self) -> dict[str, np.ndarray]:
        out = {}
        for grid, rows in self.rows.items():
            images = torch.cat([thumbs for _, thumbs in rows]).float() / 255
            out[grid] = image_grid(images, rows=len(rows), cols=len(self.seeds), row_labels=[label for label, _ in rows],
                                   col_labels=[f"seed {s}" for s in self.seeds])
        return out
