"""Figures for reports (norm histograms, loss curves): rendered off-screen to PNG or to an image array.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never with `pyplot`: pyplot keeps
global state and picks a GUI backend, and ComfyUI runs every workflow in one long-lived process.
An image array is `[height, width, 3]` float32 in [0, 1], the layout of one ComfyUI IMAGE.
"""

import io
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..safe_write import atomic_write

DEFAULT_DPI = 100


def new_figure(width_in: float = 8.0, height_in: float = 4.0, dpi: int = DEFAULT_DPI) -> Figure:
    """A blank figure attached to an off-screen Agg canvas.

    Args:
        width_in (`float`): width in inches (pixels = inches × dpi).
        height_in (`float`): height in inches.
        dpi (`int`): pixels per inch.
    """
    figure = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure as `[height, width, 3]` float32 RGB in [0, 1].

    Args:
        figure (`Figure`): a figure from `new_figure`.
    """
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (h, w, 4) uint8
    return rgba[..., :3].astype(np.float32) / 255.0


def figure_to_png_bytes(figure: Figure) -> bytes:
    """The figure encoded as PNG.

    Args:
        figure (`Figure`): a figure from `new_figure`.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(figure: Figure, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the figure as a PNG file atomically (no partial file, no silent overwrite).

    Args:
        figure (`Figure`): a figure from `new_figure`.
        path (`str`): output file.
        overwrite (`bool`): replace an existing file.
    """
    data = figure_to_png_bytes(figure)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def history_figure(history: list[dict], left: str, right: str | None = None, title: str = "") -> Figure:
    """Two quantities of a training history (`InversionResult.history`, `TuneResult.history`) against
    the step: `left` on the left axis, `right` (if recorded) on a second axis.

    Args:
        history (`list[dict]`): records with a `step` and the named keys.
        left (`str`): key on the left axis, e.g. `loss`.
        right (`str`, *optional*): key on the right axis, e.g. `distance` or `reg_loss`.
        title (`str`): figure title.
    """
    figure = new_figure(7.0, 3.6)
    axes = figure.add_subplot()
    _plot_series(axes, history, left, "tab:blue")
    axes.set_xlabel("step")
    axes.set_title(title)
    if right is not None and any(right in record for record in history):
        _plot_series(axes.twinx(), history, right, "tab:orange")
    return figure


def _plot_series(axes, history: list[dict], key: str, colour: str) -> None:
    points = [(record["step"], record[key]) for record in history if key in record]
    if points:
        xs, ys = zip(*points)
        axes.plot(xs, ys, color=colour, marker="." if len(points) < 30 else None)
    axes.set_ylabel(key.replace("_", " "), color=colour)
    axes.tick_params(axis="y", colors=colour)
