"""What several nodes share: input parsing, running the core on ComfyUI's models, and telling the user its warnings.

The `PIVOTAL_EMBEDDING` value is the core's `Pivot` (`pti_ops.pivot`): placeholder, initializer, vectors,
templates, history, and the file it was saved to (`pivot.trigger` is its `embedding:NAME`).
"""

import contextlib
import functools
import math

import torch

from ..pti_ops.errors import InvalidInputError
from ..pti_ops.files import check_if_exists, check_output_name
from ..pti_ops.metrics import figure_to_array, history_figure
from ..pti_ops.user_warnings import collect_warnings, warn_user, warnings_section
from . import bridge


# --- input parsing --------------------------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    """Non-empty stripped lines of a multiline widget."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_ints(text: str, what: str) -> list[int]:
    """`"0, 1,2"` → `[0, 1, 2]`, or a message naming the input."""
    try:
        values = [int(item) for item in (text or "").replace(";", ",").split(",") if item.strip()]
    except ValueError as err:
        raise InvalidInputError(f"`{what}` {text!r} must be comma-separated whole numbers, e.g. 0,1,2,3.") from err
    if not values:
        raise InvalidInputError(f"`{what}` is empty: give comma-separated whole numbers, e.g. 0,1,2,3.")
    return values


def parse_floats(text: str, what: str) -> list[float]:
    """`"1e-4, 5e-4"` → `[1e-4, 5e-4]`, or a message naming the input."""
    try:
        return [float(item) for item in (text or "").replace(";", ",").split(",") if item.strip()]
    except ValueError as err:
        raise InvalidInputError(f"`{what}` {text!r} must be comma-separated numbers, e.g. 1e-4,5e-4,2e-3.") from err


def in_widget_words(**widgets: str):
    """Decorator of a node's FUNCTION: a config check naming a field (`` `t_range` ``) names the widget that fills it.

    Fields named as their widgets need nothing; `widgets` maps the others, e.g. `rank="lora_rank"`.
    """

    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except InvalidInputError as err:
                if err.field in widgets:
                    err.rename(f"`{widgets[err.field]}`")
                raise

        return run

    return decorate


def validation_message(*checks) -> bool | str:
    """`VALIDATE_INPUTS`'s answer: True, or the message of the first `InvalidInputError` a check raises."""
    try:
        for check in checks:
            check()
    except InvalidInputError as err:
        return str(err)
    return True


def validate_name(value, what: str):
    """`VALIDATE_INPUTS` answer for a file-name widget: True or the message."""
    if value is None:  # fed by a link: checked when the node runs
        return True
    return validation_message(lambda: check_output_name(value, what))


def if_exists_policy(overwrite: bool, if_exists: str) -> str:
    """The file-name policy of a node: its older `overwrite` switch, when on, wins over `if_exists`."""
    return "overwrite" if overwrite else check_if_exists(if_exists)


def history_every(steps: int, eval_every: int = 0) -> int:
    """Record interval giving one point per step for short runs and ~100 points for long ones.

    With `eval_every` (a sweep evaluating along the runs) it divides `eval_every`: snapshots exist at
    recorded steps only.
    """
    every = max(1, min(10, steps // 100))
    return math.gcd(every, eval_every) if eval_every else every


# --- running the core on ComfyUI's models -------------------------------------------------------


def trainer_options(widgets: dict) -> dict:
    """The `TrainingOptions` of a training node's TRAINER_OPTIONS widgets (absent ones: the defaults; 0 = off)."""
    from ..pti_ops.training import TrainingOptions

    defaults = TrainingOptions()
    options = {name: widgets.get(name, getattr(defaults, name)) for name in ("optimizer", "lr_schedule", "warmup_steps", "noise_offset")}
    return {**options, "snr_gamma": widgets.get("snr_gamma") or None}


def snapshots_beside(path, widgets: dict, overwrite: bool):
    """The `save_every` snapshots beside output `path`, or None when 0 / absent."""
    from ..pti_ops.training import Snapshots

    every = widgets.get("save_every") or 0
    return Snapshots(path, every, overwrite=overwrite) if every else None


def previews_from(widgets: dict, clip, dataset):
    """The `preview_every` previews (shown in the progress bar only), or None when 0 / absent."""
    every = widgets.get("preview_every") or 0
    if not every:
        return None
    from ..pti_ops.metrics import PreviewConfig, Previews, SamplingConfig

    sampling = SamplingConfig(steps=20, resolution=dataset.resolution, clip_skip=bridge.clip_skip(clip))
    prompts = split_lines(widgets.get("preview_prompts") or "an anime illustration of {}")
    return Previews(PreviewConfig(every, prompts, [0], sampling))


def snapshot_names(snapshots) -> str:
    """The snapshot files written, one name per line (the nodes' `snapshots` output)."""
    return "" if snapshots is None else "\n".join(p.name for p in snapshots.written)


@contextlib.contextmanager
def core_run(train: bool = True):
    """Run core code on converted models: outside ComfyUI's inference mode (the core adds placeholder rows
    in place and, with `train`, needs autograd), and the accelerator's memory released afterwards."""
    try:
        with torch.inference_mode(False), torch.enable_grad() if train else contextlib.nullcontext():
            yield
    finally:
        bridge.release()


def converted(model, clip, vae):
    """A core bundle converted from the connected MODEL, CLIP and VAE (which are not modified); Cancel is
    honoured once the conversion is done."""
    bundle = bridge.bundle_from_comfy(model, clip, vae)
    bridge.check_interrupted()
    return bundle


def history_plot(history: list[dict], left: str, right: str, title: str) -> torch.Tensor:
    """A training history's two curves as a ComfyUI IMAGE."""
    return bridge.image_from_array(figure_to_array(history_figure(history, left, right, title)))


# --- warnings, on every run ----------------------------------------------------------------------


@contextlib.contextmanager
def node_warnings(dataset=None):
    """The warnings of one node run, collected (and logged as they happen, on every run).

    A connected dataset's own warnings (skipped files, upscaled images) are said again first: ComfyUI may
    serve the dataset node from its cache, and this run trains on those images all the same.
    """
    with collect_warnings() as warned:
        for message in getattr(dataset, "warnings", None) or []:
            warn_user(f"the training images: {message}")
        yield warned


def node_result(outputs: tuple, warned: list[str], node_id=None) -> tuple | dict:
    """The node's return value: `outputs`, plus its run's warnings where the user looks.

    With warnings, they are shown on the node (ComfyUI's progress text) and returned as the node's UI text
    (kept in the prompt's history); the server log has them already.
    """
    if not warned:
        return outputs
    text = warnings_section(warned, title=f"{len(set(warned))} warning(s)")
    bridge.show_text(node_id, text)
    return {"ui": {"text": [text]}, "result": outputs}


def with_warnings(text: str, warned: list[str]) -> str:
    """A Markdown text output (summary, metrics, table) with the run's warnings at its end."""
    section = warnings_section(warned)
    return f"{text.rstrip()}\n\n{section}" if section else text
