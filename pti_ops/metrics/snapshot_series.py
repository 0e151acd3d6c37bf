"""A folder of training snapshots evaluated one by one: the metrics against the step.

`--save-every` writes `NAME_stepNNNN.safetensors` beside a run's output; evaluating each, with the
same prompts and seeds, shows where reconstruction stops improving and where the LoRA starts to
learn the training images' positions, so the user keeps the step before that.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..files.bundled_embeddings import split_bundled
from ..files.lora_file import load_lora
from ..models.bundle import ModelBundle
from .evaluation import EvaluationConfig, EvaluationResult, Scorers, evaluate_tuned

_STEP = re.compile(r"_step(\d+)\.safetensors$")


@dataclass
class SeriesEntry:
    """One evaluated file: its step (None for a file without one, e.g. the final output) and the result."""

    file: Path
    step: int | None
    result: EvaluationResult


def snapshot_files(folder: str | Path) -> list[tuple[int | None, Path]]:
    """The `.safetensors` files of `folder` with their step, snapshots in step order, then the others by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"{folder} is not a folder of snapshots.")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidInputError(f"{folder} holds no .safetensors files: point at the folder the run's --save-every wrote into.")
    stepped = sorted((int(_STEP.search(f.name).group(1)), f) for f in files if _STEP.search(f.name))
    return [*stepped, *((None, f) for f in files if not _STEP.search(f.name))]


def evaluate_series(
    bundle_factory: Callable[[], ModelBundle],
    config: EvaluationConfig,
    files: list[tuple[int | None, Path]],
    kind: str,
    scorers: Scorers | None = None,
    load_pivot: Callable[[Path | None, ModelBundle], object] | None = None,
    lora_strength: float = 1.0,
    dataset=None,
) -> list[SeriesEntry]:
    """Evaluate each file on a fresh bundle (a LoRA is applied in place), same prompts and seeds.

    Args:
        bundle_factory (`callable`): a fresh base model per file.
        config (`EvaluationConfig`): prompts, seeds, sampling, as for one evaluation.
        files: `(step, path)` as `snapshot_files` gives them.
        kind (`str`): `embedding` (each file is the token) or `lora` (each file is a LoRA).
        load_pivot (`callable`): `(path, bundle) -> Pivot | None`, the token of each evaluation: the file itself
            for `embedding`; for `lora`, called with a path only when the LoRA file bundles the token
            (`joint` snapshots), else with None (the run's embedding, or no token).
    """
    if kind not in ("embedding", "lora"):
        raise InvalidInputError(f"snapshots are embeddings or LoRAs, not {kind!r}.")
    entries = []
    for step, path in files:
        bundle = bundle_factory()
        lora = None
        if kind == "embedding":
            pivot = load_pivot(path, bundle) if load_pivot else None
        else:
            tensors, _ = load_lora(path)
            lora, bundled = split_bundled(tensors, str(path))
            pivot = load_pivot(path if bundled else None, bundle) if load_pivot else None
        result = evaluate_tuned(bundle, config, scorers, pivot=pivot, lora=lora, lora_strength=lora_strength, dataset=dataset)
        result.report.settings.update(file=str(path), step=step)
        entries.append(SeriesEntry(path, step, result))
    return entries


def series_table(entries: list[SeriesEntry]) -> tuple[list[dict], str]:
    """One row per file (step, file, every metric's value or None) and the same as a Markdown table."""
    names = list(dict.fromkeys(name for e in entries for name in e.result.report.metrics))
    rows = []
    for e in entries:
        metrics = e.result.report.metrics
        rows.append({"step": e.step, "file": e.file.name,
                     **{n: (metrics[n].value if n in metrics and metrics[n].computed else None) for n in names}})
    lines = ["| step | file | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = ["" if row[n] is None else f"{row[n]:.4g}" for n in names]
        lines.append(f"| {'' if row['step'] is None else row['step']} | {row['file']} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"
