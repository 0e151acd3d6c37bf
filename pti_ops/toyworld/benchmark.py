"""The notes' three studies on the toy world, over several held-out characters and seeds.

1. Inversion learning rate at fixed steps: reconstruction and editability against the measured
   distance from the initializer (snapshots along each run give intermediate distances), the fit
   of distance against lr × steps, and the knee of the curve.
2. LoRA learning rate at fixed steps: reconstruction and the onset of position learning (the
   spread of the character's centre across seeds falls below half of the inversion-only spread).
3. Each regulariser mode against none at the same learning rate, and `path` at a larger learning
   rate: reconstruction, editability, locality (ε drift on held-in prompts, their oracle accuracy)
   and position spread.
Every number is a mean over characters × seeds with its standard deviation.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import load_bundle
from ..safe_write import atomic_write
from ..inversion import InversionConfig, invert
from ..lora_tune import TuneConfig, tune_around
from ..pivot import Pivot
from ..regularizer import RegularizerConfig
from ..sweeps.analysis import find_knee, fit_through_origin, position_learning_onset
from .study import RECONSTRUCTION_PROMPT, StudySettings, measure
from .world import CLASS_WORD, HELD_OUT_CHARACTERS, character_dataset

PLACEHOLDER = "tok1"


@dataclass
class BenchmarkConfig:
    """Sizes of the studies (the defaults made docs/toyworld-results.md; see its header for the time).

    Args:
        characters (`tuple[int, ...]`): indices into `HELD_OUT_CHARACTERS`.
        seeds (`tuple[int, ...]`): training seeds (image offsets and training randomness).
        inversion_lrs (`tuple[float, ...]`), inversion_steps (`int`), snapshots (`int`): study 1;
            `snapshots` evenly spaced steps of each run are measured.
        pivot_lr (`float`): the inversion lr whose token the LoRA studies tune around.
        lora_lrs (`tuple[float, ...]`), lora_steps (`int`): study 2.
        modes (`tuple[str, ...]`), mode_lr (`float`), larger_lr (`float`): study 3.
        batch_size (`int`): images per training step.
        study (`StudySettings`): sampling seeds and settings of every measurement.
    """

    characters: tuple[int, ...] = (0, 1)
    seeds: tuple[int, ...] = (0, 1)
    inversion_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    inversion_steps: int = 240
    snapshots: int = 2
    pivot_lr: float = 1e-2
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lora_steps: int = 150
    modes: tuple[str, ...] = ("none", "class", "path", "sphere")
    mode_lr: float = 3e-3
    larger_lr: float = 1e-2
    batch_size: int = 4
    study: StudySettings = field(default_factory=lambda: StudySettings(seeds=list(range(4)), sample_steps=15, locality_prompts=4))
    model: str = "toy"

    @classmethod
    def quick(cls, model: str = "toy") -> "BenchmarkConfig":
        """One character, one seed, two learning rates, a few steps: the pipeline in a minute."""
        return cls(characters=(0,), seeds=(0,), inversion_lrs=(1e-3, 1e-2), inversion_steps=4, snapshots=2, pivot_lr=1e-2,
                   lora_lrs=(1e-3, 1e-2), lora_steps=3, modes=("none", "path"), mode_lr=1e-3, larger_lr=1e-2, model=model,
                   study=StudySettings(seeds=[0, 1], sample_steps=2, locality_prompts=1))


def run_benchmark(config: BenchmarkConfig | None = None, log=print) -> dict:
    """Run the three studies; returns the raw rows and the aggregated results."""
    config = config or BenchmarkConfig()
    started = time.perf_counter()
    inversion_rows, pivots = [], {}
    for char in config.characters:
        for seed in config.seeds:
            rows, pivot = _inversion_runs(config, char, seed)
            inversion_rows += rows
            pivots[(char, seed)] = pivot
            log(f"inversion study: character {char}, seed {seed} done ({time.perf_counter() - started:.0f} s)")
    lora_rows, mode_rows = [], []
    for (char, seed), (pivot, base_metrics) in pivots.items():
        for lr in config.lora_lrs:
            lora_rows.append({"character": char, "seed": seed, "lr": lr, "base_spread": base_metrics["position_spread_px"],
                              **_tune_and_measure(config, char, seed, pivot, lr, "none")})
        for mode, lr in [(m, config.mode_lr) for m in config.modes] + [("path", config.larger_lr)]:
            mode_rows.append({"character": char, "seed": seed, "mode": mode, "lr": lr,
                              **_tune_and_measure(config, char, seed, pivot, lr, mode)})
        log(f"LoRA studies: character {char}, seed {seed} done ({time.perf_counter() - started:.0f} s)")
    results = {"inversion": _inversion_summary(inversion_rows, config), "lora": _lora_summary(lora_rows, config),
               "modes": _mode_summary(mode_rows)}
    return {"config": json.loads(json.dumps(asdict(config), default=str)), "seconds": round(time.perf_counter() - started),
            "model": model_provenance(config.model),
            "rows": {"inversion": inversion_rows, "lora": lora_rows, "modes": mode_rows}, "results": results}


def model_provenance(model: str) -> dict:
    """Which model the numbers come from: its folder and the training stage and step recorded in `training.json`."""
    folder = Path(__file__).parent / "model" if model == "toy" else Path(model)
    path = folder / "training.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return {"name": model, "training_stage": record.get("stage", "denoiser"), "training_step": record.get("step")}


def _inversion_runs(config: BenchmarkConfig, char: int, seed: int):
    """One inversion per lr; measure evenly spaced snapshots. Returns rows and the pivot of `pivot_lr`."""
    character = HELD_OUT_CHARACTERS[char]
    dataset = character_dataset(character, seed=seed)
    rows, pivot = [], None
    every = max(1, config.inversion_steps // config.snapshots)
    for lr in config.inversion_lrs:
        bundle = load_bundle(config.model)
        result = invert(bundle, dataset, InversionConfig(
            placeholder=PLACEHOLDER, initializer=CLASS_WORD, templates=[RECONSTRUCTION_PROMPT], steps=config.inversion_steps,
            learning_rate=lr, batch_size=config.batch_size, seed=seed, history_every=every, max_norm_ratio=None))
        weight = bundle.text_encoder.get_input_embeddings().weight
        for record in result.history:
            with torch.no_grad():
                weight[list(result.token.token_ids)] = result.snapshots[record["step"]].to(weight)
            metrics, _ = measure(bundle, PLACEHOLDER, character, config.study, with_locality=False)
            rows.append({"character": char, "seed": seed, "lr": lr, "step": record["step"], "lr_x_steps": lr * record["step"],
                         "distance": record["distance"], "norm": record["norm"], "cosine": record["cosine"], **metrics})
            if lr == config.pivot_lr and record["step"] == result.history[-1]["step"]:
                pivot = (result.pivot, metrics)
    if pivot is None:
        raise ValueError("`pivot_lr` must be one of `inversion_lrs`.")
    return rows, pivot


def _tune_and_measure(config: BenchmarkConfig, char: int, seed: int, pivot: Pivot, lr: float, mode: str) -> dict:
    character = HELD_OUT_CHARACTERS[char]
    bundle = load_bundle(config.model)
    reg = None if mode == "none" else RegularizerConfig(mode=mode, anchor=CLASS_WORD, templates=[RECONSTRUCTION_PROMPT])
    tune = TuneConfig(learning_rate=lr, steps=config.lora_steps, batch_size=config.batch_size, seed=seed,
                      templates=[RECONSTRUCTION_PROMPT], history_every=config.lora_steps)
    tune_around(bundle, character_dataset(character, seed=seed), pivot, tune, reg)
    metrics, _ = measure(bundle, PLACEHOLDER, character, config.study)
    return metrics


def _mean_std(values) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return (float(array.mean()), float(array.std())) if len(array) else (float("nan"), float("nan"))


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _inversion_summary(rows: list[dict], config: BenchmarkConfig) -> dict:
    fit = fit_through_origin([r["lr_x_steps"] for r in rows], [r["distance"] for r in rows])
    points = []
    for (lr, step), group in sorted(_group(rows, ("lr", "step")).items()):
        points.append({"lr": lr, "step": step, **{k: _mean_std(r[k] for r in group) for k in ("distance", "reconstruction", "editability")}})
    points.sort(key=lambda p: p["distance"][0])
    knee, reason = find_knee([p["distance"][0] for p in points], [p["reconstruction"][0] for p in points],
                             [p["editability"][0] for p in points])
    return {"slope": fit.to_dict(), "points": points, "knee": knee.to_dict() if knee else None, "knee_reason": reason}


def _lora_summary(rows: list[dict], config: BenchmarkConfig) -> dict:
    per_lr = []
    for (lr,), group in sorted(_group(rows, ("lr",)).items()):
        per_lr.append({"lr": lr, **{k: _mean_std(r.get(k) for r in group)
                                    for k in ("reconstruction", "editability", "edit_obeyed", "position_spread_px", "locality_eps_mse")}})
    base = _mean_std(r["base_spread"] for r in rows)[0]
    onset, reason = position_learning_onset([p["lr"] for p in per_lr], [p["position_spread_px"][0] for p in per_lr], base)
    return {"per_lr": per_lr, "base_spread": base, "onset_lr": onset, "onset_reason": reason}


def _mode_summary(rows: list[dict]) -> list[dict]:
    keys = ("reconstruction", "editability", "edit_obeyed", "position_spread_px", "locality_eps_mse", "held_in_accuracy", "held_in_accuracy_base")
    return [{"mode": mode, "lr": lr, **{k: _mean_std(r.get(k) for r in group) for k in keys}}
            for (mode, lr), group in _group(rows, ("mode", "lr")).items()]


def write_results(report: dict, path: str | Path, overwrite: bool = True) -> Path:
    """Write the Markdown results (and the raw JSON beside it, same name `.json`)."""
    path = Path(path)
    text = json.dumps(report, indent=1, default=str) + "\n"
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(results_markdown(report)), overwrite=overwrite)


def _cell(pair) -> str:
    mean, std = pair
    return "—" if mean != mean else f"{mean:.3f} ± {std:.3f}"


def results_markdown(report: dict) -> str:
    """The results as a Markdown document (generated: do not edit by hand)."""
    c, r = report["config"], report["results"]
    inv, lora = r["inversion"], r["lora"]
    lines = ["# Toy-world benchmark results", "",
             f"Generated by `python -m pti_ops benchmark toyworld` in {report['seconds']} s on the model "
             f"`{report['model']['name']}` (training stage `{report['model']['training_stage']}`, step {report['model']['training_step']}): characters {c['characters']} "
             f"× training seeds {c['seeds']}, each measured on {len(c['study']['seeds'])} sampling seeds. Mean ± std over "
             "characters × training seeds. Scores are oracle fractions (1 = always as asked): editability = the edit prompts' "
             "size and position with the character intact, edit obeyed = the size and position alone; spreads in pixels.", "",
             "## 1. Inversion: reconstruction and editability against the distance travelled", "",
             f"Distance ≈ {inv['slope']['slope']:.3f} × lr × steps (least squares through the origin, "
             f"R² = {inv['slope']['r_squared'] if inv['slope']['r_squared'] is None else round(inv['slope']['r_squared'], 3)}, "
             f"{inv['slope']['points']} points).", "",
             "| lr | step | distance | reconstruction | editability |", "|---|---|---|---|---|"]
    lines += [f"| {p['lr']:g} | {p['step']} | {_cell(p['distance'])} | {_cell(p['reconstruction'])} | {_cell(p['editability'])} |"
              for p in inv["points"]]
    knee = inv["knee"]
    lines += ["", f"Knee: distance {knee['distance']:.3f} (reconstruction {knee['reconstruction']:.3f}, editability "
              f"{knee['editability']:.3f})." if knee else f"Knee: none found ({inv['knee_reason']}).", "",
              f"## 2. LoRA learning rate ({c['lora_steps']} steps, no regulariser): onset of position learning", "",
              "| lr | reconstruction | editability | edit obeyed | position spread | locality ε MSE |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['lr']:g} | {_cell(p['reconstruction'])} | {_cell(p['editability'])} | {_cell(p['edit_obeyed'])} | {_cell(p['position_spread_px'])} | "
              f"{_cell(p['locality_eps_mse'])} |" for p in lora["per_lr"]]
    lines += ["", f"Position spread of the inversion-only model: {lora['base_spread']:.2f} px. Onset of position learning "
              f"(spread below half of it): " + (f"lr {lora['onset_lr']:g}." if lora["onset_lr"] else f"none ({lora['onset_reason']})."),
              "", "## 3. Regulariser modes", "",
              "| mode | lr | reconstruction | editability | edit obeyed | position spread | locality ε MSE | held-in accuracy (base) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['mode']} | {m['lr']:g} | {_cell(m['reconstruction'])} | {_cell(m['editability'])} | "
              f"{_cell(m['edit_obeyed'])} | "
              f"{_cell(m['position_spread_px'])} | {_cell(m['locality_eps_mse'])} | {_cell(m['held_in_accuracy'])} "
              f"({_cell(m['held_in_accuracy_base'])}) |" for m in r["modes"]]
    return "\n".join(lines) + "\n"
